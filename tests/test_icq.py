"""ICQ (IR-QLoRA's information calibration quantization, `QuantConfig(icq=True)`).

The oracle is a transcription of the reference's `search` / `nf4_quant` /
`evaluate_entropy` / `quantize_tensor` (htqin/IR-QLoRA, `utils.py`) run at test time
with torch and bitsandbytes on CPU (`bitsandbytes.functional.quantize_4bit` in place of
`Params4bit(...).cuda()`, which calls it); everything else is property tests.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import lora_jax as lj
import quantization as qz
from quantization import _formats as F
from quantization import _icq

# ----------------------------------------------------------------------------
# the reference, transcribed


def _reference_search(fp_weight, *, compress_statistics, quant_type, tau_range, tau_n,
                      blocksize=64, blocksize2=256):
  """IR-QLoRA's `search` (with `nf4_quant`, `evaluate_entropy`, `quantize_tensor`) on
  a PyTorch (out, in) weight; returns (packed codes, quant state, tau1, tau2)."""
  import torch
  from bitsandbytes import functional as BF
  from scipy.stats import norm
  sigma = 1 / norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]
  normal_map_fp8 = BF.create_dynamic_map()
  shape = fp_weight.shape

  def quantize_tensor(X, L):
    abs_diff = torch.abs(X.reshape(-1, 1) - L.reshape(1, -1))
    return torch.argmin(abs_diff, dim=-1).to(torch.uint8).reshape(X.shape)

  def nf4_quant(weight, tau):
    weight = weight.reshape(-1, 256, 64)
    tau = tau.reshape(-1, 256, 1)
    _weight = (weight - tau).reshape(shape)
    packed, state = BF.quantize_4bit(_weight, blocksize=64,
                                     compress_statistics=compress_statistics,
                                     quant_type=quant_type)
    tau2 = tau.abs().max(dim=1, keepdim=True)[0]
    tau1 = quantize_tensor(tau / tau2, normal_map_fp8)
    return packed, state, tau1.reshape(-1, 256), tau2.reshape(-1, 1)

  def evaluate_entropy(weight_int8, blocksize):
    _weight_int8 = weight_int8.reshape(-1, 1)
    weight_nf4 = torch.cat((_weight_int8 // 16, _weight_int8 % 16), 1).reshape(1, -1, blocksize)
    weight_nf4_repeat = weight_nf4.repeat(16, 1, 1)
    values = torch.tensor(range(16)).reshape(16, 1, 1)
    freqs = (weight_nf4_repeat == values).sum(dim=-1, keepdim=True) / blocksize
    entropy = -freqs * torch.log2(freqs)
    entropy = torch.where(torch.isnan(entropy), 0, entropy)
    return entropy.sum(dim=0)

  fp_weight = fp_weight.reshape(-1, blocksize2, blocksize)
  tau0 = fp_weight.median(2, keepdim=True)[0]
  absmax = (fp_weight - tau0).abs().max(2, keepdim=True)[0]
  entropy_max, factor_best = None, None
  for factor in np.linspace(-tau_range * sigma, tau_range * sigma, tau_n * 2 + 1):
    tau = factor * absmax + tau0
    packed, _, _, _ = nf4_quant(fp_weight, tau)
    entropy = evaluate_entropy(packed, blocksize)
    if entropy_max is None:
      entropy_max = entropy
      factor_best = torch.full_like(entropy, factor)
    else:
      factor_best = torch.where(entropy > entropy_max, factor, factor_best)
      entropy_max = torch.max(entropy_max, entropy)
  tau = factor_best.reshape(-1, 256, 1) * absmax + tau0
  return nf4_quant(fp_weight, tau)


def _reference_dequantize(packed, state, tau1, tau2):
  """The reference forward's weight (`IRQLoraLinear4bit.forward`), in float32."""
  import torch
  from bitsandbytes import functional as BF
  fp_b = BF.dequantize_4bit(packed, state).float()
  tau = (BF.create_dynamic_map()[tau1.reshape(-1).long()].reshape(-1, 256, 1)
         * tau2.reshape(-1, 1, 1))
  return (fp_b.reshape(-1, 64) + tau.reshape(-1, 1)).reshape(fp_b.shape)


def _weight(out, inn, seed, kind="normal"):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    w = rng.standard_normal((out, inn)) * 0.02
  elif kind == "student_t":
    w = rng.standard_t(3, (out, inn)) * 0.02
  elif kind == "shifted":
    # per-row offsets and scales, heavy tails: far from the N(0, s) blocks NF4 assumes
    w = (rng.standard_t(4, (out, inn)) * rng.uniform(0.005, 0.05, (out, 1))
         + rng.normal(0, 0.01, (out, 1)))
  else:
    raise ValueError(kind)
  return w.astype(np.float32)


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,kind", [((64, 256), "normal"), ((128, 256), "shifted")])
def test_equals_reference_search(fmt, dq, dtype, shape, kind):
  torch = pytest.importorskip("torch")
  pytest.importorskip("bitsandbytes")
  pytest.importorskip("scipy")
  tdt = getattr(torch, dtype)
  wt = torch.from_numpy(_weight(*shape, seed=sum(shape), kind=kind)).to(tdt)
  packed, state, tau1, tau2 = _reference_search(
      wt, compress_statistics=dq, quant_type=fmt, tau_range=0.1, tau_n=10)
  w = jnp.asarray(wt.float().numpy().T).astype(dtype)       # our kernel is W.T (in, out)
  q = qz.quantize_array(w, fmt, 64, dq, icq=True, icq_range=0.1, icq_steps=10)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  if dq:
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
    assert np.float32(q.offset) == state.offset.numpy()
  np.testing.assert_array_equal(np.asarray(q.tau).reshape(-1), tau1.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.tau_absmax),
                                tau2.float().numpy().reshape(-1))
  ref = _reference_dequantize(packed, state, tau1, tau2).numpy()
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), ref)


def test_sigma_is_the_references():
  torch = pytest.importorskip("torch")
  norm = pytest.importorskip("scipy.stats").norm
  assert _icq.SIGMA == 1 / norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]


def test_entropy_terms_are_torchs():
  torch = pytest.importorskip("torch")
  f = torch.arange(65).reshape(65, 1).repeat(1, 64).reshape(-1) / 64   # vectorized path
  t = -f * torch.log2(f)
  t = torch.where(torch.isnan(t), 0, t).reshape(65, 64)[:, 0].numpy()
  np.testing.assert_array_equal(_icq.entropy_terms(64), t)
