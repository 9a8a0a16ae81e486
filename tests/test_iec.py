"""IR-QLoRA's information elastic connection (IEC): `lj.LoraConfig(use_iec=True)`.

The oracle is the reference implementation's forward (htqin/IR-QLoRA, `utils.py`,
`IRQLoraLinear4bit.forward`), transcribed into torch below and differentiated by
torch's autograd: `h = lora_A(x) + A_scale * x.reshape(..., r, -1).mean(-1)`,
`out = base(x) + s * (lora_B(h).reshape(..., r, -1) + B_scale * h[..., None])
.reshape(..., out)`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import merging as mg
import quantization as qz

torch = pytest.importorskip("torch")

PATH = "layers/0/self_attn/q_proj/kernel"
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
K, N, R = 64, 48, 4


def _tree(w):
  return {"layers": {"0": {"self_attn": {"q_proj": {"kernel": w}}}}}


def _leaf(tree):
  return tree["layers"]["0"]["self_attn"]["q_proj"]["kernel"]


def _iec(base, key, scale=0.5, beta_a=0.7, beta_b=-0.4, rank=R):
  """An IEC leaf with random factors and non-zero betas on `base` (*batch, in, out)."""
  ka, kb = jax.random.split(key)
  *batch, k, n = base.shape
  a = jax.random.normal(ka, (*batch, k, rank), jnp.float32) * 0.3
  b = jax.random.normal(kb, (*batch, rank, n), jnp.float32) * 0.3
  full = lambda v: jnp.full(tuple(batch), v, jnp.float32)  # noqa: E731
  return lj.IecLoraWeight(w=base, a=a, b=b, scale=scale, axes="io", beta_a=full(beta_a),
                          beta_b=full(beta_b))


class _ReferenceIec(torch.nn.Module):
  """The reference implementation's IEC LoRA branch over a dense base (float64)."""

  def __init__(self, w, a, b, scale, beta_a, beta_b):
    super().__init__()
    t = lambda v: torch.tensor(np.asarray(v, np.float64))  # noqa: E731
    self.w = torch.nn.Parameter(t(np.asarray(w).T))                     # (out, in)
    self.lora_A = torch.nn.Parameter(t(np.asarray(a).T))                # (r, in)
    self.lora_B = torch.nn.Parameter(t(np.asarray(b).T))                # (out, r)
    self.lora_default_A_scale = torch.nn.Parameter(t([beta_a]))
    self.lora_default_B_scale = torch.nn.Parameter(t([beta_b]))
    self.scaling = scale

  def forward(self, x):
    result = x @ self.w.T
    r = self.lora_A.shape[0]
    h = x @ self.lora_A.T + self.lora_default_A_scale * x.reshape(
        [_ for _ in x.shape[:-1]] + [r] + [-1]).mean(dim=-1)
    h = ((h @ self.lora_B.T).reshape([_ for _ in h.shape] + [-1])
         + self.lora_default_B_scale * h.unsqueeze(-1)).reshape([_ for _ in h.shape[:-1]] + [-1])
    return result + h * self.scaling


def _ref_module(iw, base_dense=None):
  w = base_dense if base_dense is not None else iw.w
  return _ReferenceIec(w, iw.a, iw.b, iw.scale, float(iw.beta_a), float(iw.beta_b))


_matmul = jax.jit(lj.implicit(lambda w, x: x @ w))


def _base(kind):
  w = jax.random.normal(jax.random.key(1), (K, N), jnp.float32) * 0.05
  if kind == "nf4":
    return qz.quantize_kernel(w, qz.QuantConfig(format="nf4", block_size=32))
  return w


def _dense(base):
  return np.asarray(base.materialize() if lj.is_implicit(base) else base)


# ----------------------------------------------------------------------------

def test_init_fresh_adapter_is_plain_lora():
  w = _base("dense")
  cfg = lj.LoraConfig(rank=R, alpha=8, targets=".*q_proj/kernel", use_iec=True)
  p = lj.init(jax.random.key(2), _tree(w), cfg)
  iw = _leaf(p)
  assert type(iw) is lj.IecLoraWeight
  assert iw.beta_a.shape == () and float(iw.beta_a) == 0.0 and float(iw.beta_b) == 0.0
  plain = _leaf(lj.init(jax.random.key(2), _tree(w), lj.LoraConfig(
      rank=R, alpha=8, targets=".*q_proj/kernel")))
  np.testing.assert_array_equal(np.asarray(iw.a), np.asarray(plain.a))
  # betas at 0 with trained (non-zero) factors: exactly LoRA
  b = jax.random.normal(jax.random.key(3), iw.b.shape) * 0.2
  iw, plain = iw.replace_children(b=b), plain.replace_children(b=b)
  x = jax.random.normal(jax.random.key(4), (3, K))
  np.testing.assert_allclose(np.asarray(_matmul(iw, x)), np.asarray(_matmul(plain, x)),
                             rtol=1e-6, atol=1e-6)
  # the betas are trainable and counted; split / combine keep them
  adapter, frozen = lj.split(p)
  assert _leaf(adapter).beta_a is not None and _leaf(frozen).beta_a is None
  assert lj.summary(p).count("/iec") == 1
  back = lj.combine(adapter, frozen)
  assert type(_leaf(back)) is lj.IecLoraWeight


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_forward_and_grads_equal_the_reference_implementation(kind):
  base = _base(kind)
  iw = _iec(base, jax.random.key(5))
  x = np.asarray(jax.random.normal(jax.random.key(6), (2, 3, K)))
  ref = _ref_module(iw, _dense(base))
  xt = torch.tensor(x, dtype=torch.float64)
  yt = ref(xt)
  np.testing.assert_allclose(np.asarray(_matmul(iw, jnp.asarray(x))), yt.detach().numpy(),
                             rtol=2e-5, atol=2e-5)
  # gradients of a loss w.r.t. a, b and both betas
  g_out = np.asarray(jax.random.normal(jax.random.key(7), (2, 3, N)))
  (yt * torch.tensor(g_out)).sum().backward()

  def loss(ch):
    leaf = iw.replace_children(**ch)
    return jnp.sum(lj.implicit(lambda w, x: x @ w)(leaf, jnp.asarray(x)) * g_out)

  g = jax.jit(jax.grad(loss))({k: getattr(iw, k) for k in ("a", "b", "beta_a", "beta_b")})
  np.testing.assert_allclose(np.asarray(g["a"]), ref.lora_A.grad.numpy().T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g["b"]), ref.lora_B.grad.numpy().T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(g["beta_a"]), ref.lora_default_A_scale.grad.item(), rtol=1e-4)
  np.testing.assert_allclose(float(g["beta_b"]), ref.lora_default_B_scale.grad.item(), rtol=1e-4)


def test_grads_equal_the_materialized_reference_and_merge_equals_unmerged():
  iw = _iec(_base("dense"), jax.random.key(8))
  x = jax.random.normal(jax.random.key(9), (5, K))
  merged = lj.merge({"w": iw})["w"]
  assert type(merged) is not lj.IecLoraWeight
  np.testing.assert_allclose(np.asarray(x @ merged), np.asarray(_matmul(iw, x)),
                             rtol=1e-5, atol=1e-5)
  # the dense form by hand: W + s (a + beta_a P)(b + beta_b R)
  P = np.kron(np.eye(R), np.full((K // R, 1), R / K))
  Rm = np.kron(np.eye(R), np.ones((1, N // R)))
  want = (np.asarray(iw.w, np.float64) + iw.scale * (np.asarray(iw.a) + 0.7 * P)
          @ (np.asarray(iw.b) - 0.4 * Rm))
  np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-5, atol=1e-6)

  def implicit_loss(ba, bb):
    return jnp.sum(jnp.sin(_matmul(iw.replace_children(beta_a=ba, beta_b=bb), x)))

  def dense_loss(ba, bb):
    return jnp.sum(jnp.sin(x @ iw.replace_children(beta_a=ba, beta_b=bb).materialize()))

  gi = jax.grad(implicit_loss, argnums=(0, 1))(iw.beta_a, iw.beta_b)
  gd = jax.grad(dense_loss, argnums=(0, 1))(iw.beta_a, iw.beta_b)
  np.testing.assert_allclose(np.asarray(gi), np.asarray(gd), rtol=1e-4, atol=1e-5)


def test_dropout_masks_the_factor_term_not_the_mean():
  iw = _iec(_base("dense"), jax.random.key(10))
  iw = lj.IecLoraWeight(w=iw.w, a=iw.a, b=iw.b, scale=iw.scale, axes="io", dropout=0.5,
                        beta_a=iw.beta_a, beta_b=iw.beta_b)
  p = lj.with_dropout_rng({"w": iw}, jax.random.key(11))
  leaf = p["w"]
  x = jax.random.normal(jax.random.key(12), (6, K))
  y = _matmul(leaf, x)
  keep = jax.random.bernoulli(leaf.rng, 0.5, x.shape)
  xd = jnp.where(keep, x / 0.5, 0.0)
  h = xd @ iw.a + 0.7 * x.reshape(6, R, K // R).mean(-1)
  want = x @ iw.w + iw.scale * (h @ iw.b - 0.4 * jnp.repeat(h, N // R, axis=-1))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
  # without a key: no dropout (inference)
  np.testing.assert_allclose(np.asarray(_matmul(iw, x)), np.asarray(x @ iw.materialize()),
                             rtol=1e-5, atol=1e-5)


def test_stacked_layers_under_scan_with_a_quantized_base():
  w = jax.random.normal(jax.random.key(13), (3, K, K), jnp.float32) * 0.05
  q = qz.quantize({"w": w}, qz.QuantConfig(format="nf4", block_size=32))
  cfg = lj.LoraConfig(rank=R, targets="w", use_iec=True, layouts={"w": "lio"})
  iw = lj.init(jax.random.key(14), q, cfg)["w"]
  assert iw.beta_a.shape == (3,)
  iw = iw.replace_children(b=jax.random.normal(jax.random.key(15), iw.b.shape) * 0.1,
                           beta_a=jnp.array([0.5, -0.2, 0.1]), beta_b=jnp.array([0.3, 0.0, -0.6]))

  def fwd(p, x):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, p["w"])[0]

  x = jax.random.normal(jax.random.key(16), (2, K))
  y = jax.jit(lj.implicit(fwd))({"w": iw}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(fwd({"w": iw.materialize()}, x)),
                             rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda ba: jnp.sum(lj.implicit(fwd)({"w": iw.replace_children(beta_a=ba)}, x)))(
      iw.beta_a)
  gd = jax.grad(lambda ba: jnp.sum(fwd({"w": iw.replace_children(beta_a=ba).materialize()}, x)))(
      iw.beta_a)
  np.testing.assert_allclose(np.asarray(g), np.asarray(gd), rtol=1e-4, atol=1e-5)


def test_sharded_on_an_8_device_mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  from jax.sharding import Mesh, PartitionSpec as PS
  w = jax.random.normal(jax.random.key(30), (2, K, N), jnp.float32) * 0.05
  iw = _iec(w, jax.random.key(31))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  specs = lj.partition_specs({"w": iw}, {"w": PS(None, None, "model")})
  assert specs["w"].beta_a == PS(None) and specs["w"].b == PS(None, None, "model")
  sharded = lj.shard({"w": iw}, mesh, {"w": PS(None, None, "model")})
  x = jax.random.normal(jax.random.key(32), (2, 4, K))
  f = jax.jit(lj.implicit(lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["w"])))
  np.testing.assert_allclose(np.asarray(f(sharded, x)),
                             np.asarray(jnp.einsum("lbi,lio->lbo", x, iw.materialize())),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# files

def test_saved_adapter_roundtrips_and_peft_computes_the_same_function(tmp_path):
  import safetensors.numpy as stnp
  peft = pytest.importorskip("peft")
  w = _base("dense")
  cfg = lj.LoraConfig(rank=R, alpha=2, targets=".*q_proj/kernel", use_iec=True)
  iw = _iec(w, jax.random.key(17), scale=cfg.scale_for(PATH))
  lj.save_adapter(tmp_path, _tree(iw), cfg)
  raw = json.loads((tmp_path / "adapter_config.json").read_text())
  assert raw["use_iec"] is True
  tensors = stnp.load_file(str(tmp_path / "adapter_model.safetensors"))
  assert tensors[MODULE + ".lora_default_A_scale"].shape == (1,)
  np.testing.assert_allclose(tensors[MODULE + ".lora_default_B_scale"], [-0.4])
  back = _leaf(lj.load_adapter(tmp_path, _tree(w)))
  assert type(back) is lj.IecLoraWeight
  np.testing.assert_allclose(np.asarray(back.a), np.asarray(iw.a), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(back.b), np.asarray(iw.b), rtol=1e-6, atol=1e-6)
  assert float(back.beta_a) == pytest.approx(0.7) and float(back.beta_b) == pytest.approx(-0.4)
  # PEFT: a plain LoRA Linear loading lora_A / lora_B gives IEC's function exactly
  from peft.tuners.lora.layer import Linear as PeftLinear
  lin = torch.nn.Linear(K, N, bias=False)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(w).T)))
  with pytest.warns(UserWarning, match="use_iec"):    # PEFT ignores our key, and says so
    pc = peft.LoraConfig.from_pretrained(str(tmp_path))
  m = PeftLinear(lin, "default", r=pc.r, lora_alpha=pc.lora_alpha, config=pc).eval()
  with torch.no_grad():
    m.lora_A["default"].weight.copy_(torch.from_numpy(tensors[MODULE + ".lora_A.weight"]))
    m.lora_B["default"].weight.copy_(torch.from_numpy(tensors[MODULE + ".lora_B.weight"]))
  x = np.asarray(jax.random.normal(jax.random.key(18), (3, K)))
  with torch.no_grad():
    yp = m(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(yp, np.asarray(_matmul(iw, jnp.asarray(x))), rtol=1e-5, atol=1e-5)


def test_reference_implementation_files_load_here(tmp_path):
  """What PEFT's save_pretrained writes for the reference's IRQLoraLinear4bit modules:
  raw lora_A / lora_B and the two `lora_default_*_scale` parameters, no use_iec key."""
  import safetensors.torch as stt
  w = _base("dense")
  iw = _iec(w, jax.random.key(19), scale=16 / R)
  ref = _ref_module(iw)
  import peft
  peft.LoraConfig(r=R, lora_alpha=16, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
  f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
  stt.save_file({MODULE + ".lora_A.weight": f32(ref.lora_A),
                 MODULE + ".lora_B.weight": f32(ref.lora_B),
                 MODULE + ".lora_default_A_scale": f32(ref.lora_default_A_scale),
                 MODULE + ".lora_default_B_scale": f32(ref.lora_default_B_scale)},
                str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  back = _leaf(lj.load_adapter(tmp_path, _tree(w)))
  assert type(back) is lj.IecLoraWeight
  x = np.asarray(jax.random.normal(jax.random.key(20), (4, K)))
  with torch.no_grad():
    want = ref(torch.tensor(x, dtype=torch.float64)).numpy()
  np.testing.assert_allclose(np.asarray(_matmul(back, jnp.asarray(x))), want,
                             rtol=1e-5, atol=1e-5)
  # tensor by tensor (lora-jax merge's base+adapter): the same dense weight
  from lora_jax._peft_io import read_adapter_updates
  up = read_adapter_updates(tmp_path)["model.layers.0.self_attn.q_proj"]["weight"]
  np.testing.assert_allclose(up.apply(np.asarray(w).T).T, np.asarray(back.materialize()),
                             rtol=1e-5, atol=1e-5)


def test_stacked_files_roundtrip(tmp_path):
  w = jax.random.normal(jax.random.key(21), (2, K, N), jnp.float32)
  params = {"layers": {"self_attn": {"q_proj": {"kernel": w}}}}
  iw = _iec(w, jax.random.key(22)).replace_children(beta_a=jnp.array([0.2, -0.9]))
  lj.save_adapter(tmp_path, {"layers": {"self_attn": {"q_proj": {"kernel": iw}}}})
  back = lj.load_adapter(tmp_path, params)["layers"]["self_attn"]["q_proj"]["kernel"]
  assert type(back) is lj.IecLoraWeight and back.beta_a.shape == (2,)
  np.testing.assert_allclose(np.asarray(back.beta_a), [0.2, -0.9], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(back.materialize()), np.asarray(iw.materialize()),
                             rtol=1e-5, atol=1e-5)


def test_bad_iec_files(tmp_path):
  import safetensors.numpy as stnp
  w = _base("dense")
  iw = _iec(w, jax.random.key(23))
  lj.save_adapter(tmp_path, _tree(iw))
  f = tmp_path / "adapter_model.safetensors"
  t = stnp.load_file(str(f))
  only_a = {k: v for k, v in t.items() if not k.endswith("lora_default_B_scale")}
  stnp.save_file(only_a, str(f))
  with pytest.raises(ValueError, match="lora_default_B_scale"):
    lj.load_adapter(tmp_path, _tree(w))
  t[MODULE + ".lora_default_A_scale"] = np.array([1.0, 2.0], np.float32)
  stnp.save_file(t, str(f))
  with pytest.raises(ValueError, match=r"lora_default_A_scale has shape \(2,\)"):
    lj.load_adapter(tmp_path, _tree(w))


# ----------------------------------------------------------------------------
# serving and adapter merges take IEC in its exact LoRA form

def test_serving_bank_and_adapter_merges_use_the_lora_form():
  w = _base("dense")
  i1 = _iec(w, jax.random.key(24))
  i2 = _iec(w, jax.random.key(25), beta_a=-0.3, beta_b=0.9)
  served = lj.stack_adapters([_tree(i1), _tree(i2)])
  x = jax.random.normal(jax.random.key(26), (2, K))
  f = jax.jit(lj.implicit(lambda p, x: x @ _leaf(p)))
  y = f(lj.with_adapter_ids(served, jnp.array([1, 0])), x)
  np.testing.assert_allclose(np.asarray(y[0]), np.asarray(_matmul(i2, x[:1]))[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y[1]), np.asarray(_matmul(i1, x[1:]))[0],
                             rtol=1e-5, atol=1e-5)
  cat = _leaf(mg.merge_adapters([_tree(i1), _tree(i2)], method="cat", weights=[0.5, 0.5]))
  want = 0.5 * (i1.materialize() - w) + 0.5 * (i2.materialize() - w) + w
  np.testing.assert_allclose(np.asarray(cat.materialize()), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  std = _leaf(lj.to_standard_lora(_tree(i1)))
  assert type(std) is lj.LoraWeight and std.rank == R
  np.testing.assert_allclose(np.asarray(std.materialize()), np.asarray(i1.materialize()),
                             rtol=1e-6, atol=1e-6)


def test_config_and_shape_errors():
  with pytest.raises(ValueError, match="use_iec=True with use_dora"):
    lj.LoraConfig(use_iec=True, use_dora=True)
  with pytest.raises(ValueError, match="use_iec=True with use_qalora"):
    lj.LoraConfig(use_iec=True, use_qalora=True)
  w = jax.random.normal(jax.random.key(27), (K, 30))
  with pytest.raises(ValueError, match=r"w \(layout 'io'\): IEC needs the rank r=4 to divide .* output size 30"):
    lj.init(jax.random.key(28), {"w": w}, lj.LoraConfig(rank=4, targets="w", use_iec=True))
  with pytest.raises(ValueError, match="beta_a has shape"):
    lj.IecLoraWeight(w=jnp.zeros((K, N)), a=jnp.zeros((K, R)), b=jnp.zeros((R, N)),
                     beta_a=jnp.zeros((2,)), beta_b=jnp.zeros(()))


def test_loftq_with_iec_starts_from_loftq_with_betas_at_zero():
  w = {"w": jax.random.normal(jax.random.key(29), (K, N)) * 0.05}
  qc = qz.QuantConfig(format="nf4", block_size=32)
  plain = qz.loftq(jax.random.key(0), w, lj.LoraConfig(rank=R, targets="w"), qc)["w"]
  iec = qz.loftq(jax.random.key(0), w, lj.LoraConfig(rank=R, targets="w", use_iec=True), qc)["w"]
  assert type(iec) is lj.IecLoraWeight and float(iec.beta_a) == 0.0
  np.testing.assert_array_equal(np.asarray(iec.a), np.asarray(plain.a))
  np.testing.assert_array_equal(np.asarray(iec.materialize()), np.asarray(plain.materialize()))
