"""`qz.loftq` against PEFT's own `loftq_init` (run at test time on CPU: PEFT hard-codes a
CUDA/XPU compute device, which the test redirects to the CPU), and the properties LoftQ
exists for: a starting model nearer to the float weights than plain QLoRA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
  """PEFT's `loftq_init`, with its `.to("cuda")` calls sent to the CPU."""
  from peft.utils import loftq_utils

  def on_cpu(orig):
    def to(self, *args, **kwargs):
      args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
      if kwargs.get("device") in ("cuda", "xpu"):
        kwargs["device"] = "cpu"
      return orig(self, *args, **kwargs)
    return to
  monkeypatch.setattr(torch.Tensor, "to", on_cpu(torch.Tensor.to))
  monkeypatch.setattr(bnb.nn.Params4bit, "to", on_cpu(bnb.nn.Params4bit.to))
  return loftq_utils.loftq_init


@pytest.mark.interop
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft(peft_loftq_on_cpu, iters):
  torch.manual_seed(0)
  w = 0.1 * torch.randn(96, 256)                        # PyTorch (out, in)
  q_peft, a_peft, b_peft = peft_loftq_on_cpu(w, num_bits=4, reduced_rank=8, num_iter=iters)
  # PEFT's factors are right for scale 1 (lora_alpha = r); use that here
  ours = qz.loftq(jax.random.key(0), {"k": jnp.asarray(w.numpy().T)},
                  lj.LoraConfig(rank=8, alpha=8, targets="k"),
                  qz.QuantConfig("nf4", 64, double_quant=False), iters=iters)["k"]
  assert isinstance(ours.w, qz.QuantizedArray)
  # same NF4 codes (bitsandbytes' Params4bit, blocksize 64, no double quant)
  np.testing.assert_allclose(ours.w.materialize(), q_peft.numpy().T, atol=2e-7)
  np.testing.assert_allclose(ours.a @ ours.b, (b_peft @ a_peft).numpy().T, atol=1e-5)


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("int4", False), ("fp4", True)])
def test_loftq_starts_nearer_than_qlora(fmt, dq):
  w = {"layers": 0.05 * jax.random.normal(jax.random.key(1), (2, 128, 192))}
  cfg = lj.LoraConfig(rank=16, alpha=32, targets="layers", layouts={"layers": "lio"})
  qcfg = qz.QuantConfig(fmt, 64, dq)
  qlora_err = jnp.linalg.norm(qz.dequantize(qz.quantize(w, qcfg))["layers"] - w["layers"])
  errs = []
  for iters in (1, 4):
    p = qz.loftq(jax.random.key(0), w, cfg, qcfg, iters=iters)
    errs.append(float(jnp.linalg.norm(lj.merge(p)["layers"] - w["layers"])))
    # the LoRA branch carries the scale: s * a @ b, whatever alpha is
    lw = p["layers"]
    assert lw.scale == 2.0 and lw.w.format == fmt and lw.w.double_quant == dq
  assert errs[0] < 0.9 * float(qlora_err), (errs, float(qlora_err))
  assert errs[1] <= errs[0] * 1.0001, errs
  # and the adapted model runs through implicit like any QLoRA tree
  x = jax.random.normal(jax.random.key(2), (4, 128))
  layer1 = jax.tree.map(lambda c: c[1], p)          # slice every child, as scan does
  f = lambda p, x: x @ p["layers"]  # noqa: E731
  np.testing.assert_allclose(lj.implicit(f)(layer1, x), f(lj.merge(layer1), x),
                             rtol=1e-4, atol=1e-5)


def test_loftq_errors():
  with pytest.raises(ValueError, match="iters=0 must be >= 1"):
    qz.loftq(jax.random.key(0), {"k": jnp.ones((64, 64))}, lj.LoraConfig(targets="k"), iters=0)
  with pytest.raises(ValueError, match=r"k: LoftQ quantizes \(in, out\) kernels; layout 'iio'"):
    qz.loftq(jax.random.key(0), {"k": jnp.ones((4, 64, 64))},
             lj.LoraConfig(rank=2, targets="k", layouts={"k": "iio"}))
  with pytest.raises(ValueError, match=r"k: .*NaN/inf"):
    qz.loftq(jax.random.key(0), {"k": jnp.full((64, 64), jnp.nan)},
             lj.LoraConfig(rank=2, targets="k"))
