"""QA-LoRA (`lj.QALoraWeight`, `LoraConfig(use_qalora=True)`, `qz.fold_qalora`): the
factored forward and its a/b gradients equal the dense reference (dense and group-wise
quantized bases, jitted), the forward equals PEFT's own `QALoraLinearVariant.forward`,
PEFT adapter files go both ways, and the fold into zero points equals the unmerged
model (float zero points) or costs what the test prints (int8 zero points)."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz
from quantization._group import quantize_group_array

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from peft.tuners.lora.variants import QALoraLinearVariant  # noqa: E402

PATH = "layers/0/self_attn/q_proj/kernel"
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
K, N, R, L = 128, 24, 4, 32


def _tree(w):
  return {"layers": {"0": {"self_attn": {"q_proj": {"kernel": w}}}}}


def _leaf(tree):
  return tree["layers"]["0"]["self_attn"]["q_proj"]["kernel"]


def _set_leaf(tree, leaf):
  return _tree(leaf) if tree is None else {"layers": {"0": {"self_attn": {"q_proj": {
      "kernel": leaf}}}}}


def _qa(base, key, scale=0.75, group=L, rank=R):
  """A QA-LoRA leaf with random (non-zero) factors on `base` (*batch, in, out)."""
  ka, kb = jax.random.split(key)
  *batch, k, n = base.shape
  a = jax.random.normal(ka, (*batch, k // group, rank), jnp.float32) * 0.3
  b = jax.random.normal(kb, (*batch, rank, n), jnp.float32) * 0.3
  return lj.QALoraWeight(w=base, a=a, b=b, scale=scale, axes="io", group_size=group)


def _dense_w(base):
  return np.asarray(base.materialize() if lj.is_implicit(base) else base, np.float64)


def _reference(x, w, a, b, scale, group):
  """PEFT's forward in numpy float64: x @ W + s * (mean_L(x) * (in/L)) @ a @ b."""
  x = np.asarray(x, np.float64)
  k = x.shape[-1]
  g = k // group
  pooled = x.reshape(*x.shape[:-1], g, group).mean(-1) * g
  return x @ w + scale * pooled @ np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def _int4_base(w, group=L, symmetric=False, g_idx=None):
  return quantize_group_array(w, bits=4, group_size=group, symmetric=symmetric, g_idx=g_idx)


def _bases():
  w = jax.random.normal(jax.random.key(1), (K, N), jnp.float32) * 0.05
  return {"dense": w, "int4": _int4_base(w)}


_matmul = jax.jit(lj.implicit(lambda w, x: x @ w))


# ----------------------------------------------------------------------------
# init and the tree utilities

def test_init_shapes_inits_and_fresh_adapter_is_identity():
  w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
  cfg = lj.LoraConfig(rank=R, alpha=8, targets=r".*q_proj/kernel", use_qalora=True,
                      qalora_group_size=L)
  qw = _leaf(lj.init(jax.random.key(1), _tree(w), cfg))
  assert type(qw) is lj.QALoraWeight and not isinstance(qw, lj.LoraWeight)
  assert isinstance(qw, lj.LowRankWeight)
  assert qw.a.shape == (K // L, R) and qw.b.shape == (R, N) and qw.group_size == L
  assert qw.scale == 8 / R
  # PEFT: a fresh nn.Linear(in / L, r): kaiming-uniform, bound 1 / sqrt(in / L)
  bound = 1 / np.sqrt(K // L)
  assert float(jnp.max(jnp.abs(qw.a))) <= bound and float(jnp.max(jnp.abs(qw.a))) > 0.5 * bound
  assert not np.any(np.asarray(qw.b))
  x = jax.random.normal(jax.random.key(2), (3, K))
  np.testing.assert_array_equal(np.asarray(_matmul(qw, x)), np.asarray(x @ w))
  for init, check in [("gaussian", lambda a: 0 < float(jnp.std(a)) < 1),
                      ("zeros", lambda a: not np.any(np.asarray(a)))]:
    qa = _leaf(lj.init(jax.random.key(1), _tree(w), lj.LoraConfig(
        rank=R, targets=r".*q_proj/kernel", use_qalora=True, qalora_group_size=L, init=init)))
    assert qa.a.shape == (K // L, R) and check(qa.a)


def test_tree_utilities_through_the_protocol():
  qw = _qa(_bases()["int4"], jax.random.key(3))
  params = {**_tree(qw), "norm": {"scale": jnp.ones((N,))}}
  mask = lj.trainable_mask(params)
  m = _leaf(mask)
  assert (m.a, m.b) == (True, True) and not any(jax.tree.leaves(m.w))
  assert mask["norm"]["scale"] is False
  adapter, frozen = lj.split(params)
  assert _leaf(adapter).a is qw.a and not jax.tree.leaves(_leaf(adapter).w)
  assert not jax.tree.leaves((_leaf(frozen).a, _leaf(frozen).b))
  back = lj.combine(adapter, frozen)
  assert type(_leaf(back)) is lj.QALoraWeight
  merged = _leaf(lj.merge(params))
  assert isinstance(merged, jax.Array) and merged.shape == (K, N)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(qw.materialize()))
  text = lj.summary(params)
  assert PATH in text and f"{R}/qa{L}" in text
  assert f"trainable params: {K // L * R + R * N:,}" in text


def test_convert_copy_and_one_trace():
  qw = _qa(_bases()["dense"], jax.random.key(4))
  x = jax.random.normal(jax.random.key(5), (2, K), jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")          # no rule may fall back to materializing
    y = jax.jit(lj.implicit(lambda w, x: x @ w.astype(jnp.bfloat16)))(qw, x)
    y2 = jax.jit(lj.implicit(lambda w, x: x @ jnp.copy(w)))(qw, x.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16
  ref = _reference(np.asarray(x, np.float32), _dense_w(qw.w), qw.a, qw.b, qw.scale, L)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2)
  np.testing.assert_allclose(np.asarray(y2), ref, rtol=1e-4, atol=1e-4)
  traces = []

  @jax.jit
  def f(w, x):
    traces.append(1)
    return lj.implicit(lambda w, x: x @ w)(w, x)

  f(qw, x.astype(jnp.float32))
  f(qw.replace_children(a=qw.a + 1.0), x.astype(jnp.float32))
  assert len(traces) == 1


# ----------------------------------------------------------------------------
# forward and gradients against the dense reference

@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_forward_and_grads_equal_dense_reference(kind):
  base = _bases()[kind]
  qw = _qa(base, jax.random.key(6))
  x = jax.random.normal(jax.random.key(7), (2, 3, K), jnp.float32)
  wd = jnp.asarray(_dense_w(base), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")          # factored: QALoraWeight is never materialized
    y = _matmul(qw, x)
  np.testing.assert_allclose(np.asarray(y), _reference(x, _dense_w(base), qw.a, qw.b,
                                                       qw.scale, L), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ qw.materialize()), rtol=1e-4,
                             atol=1e-4)
  ct = jax.random.normal(jax.random.key(8), y.shape)

  def loss(a, b):
    leaf = qw.replace_children(a=a, b=b)
    return jnp.sum(lj.implicit(lambda w, x: x @ w)(leaf, x) * ct)

  def loss_ref(a, b):
    d = qw.scale * qw.pool_scale * jnp.repeat(a, L, axis=0) @ b
    return jnp.sum((x @ (wd + d)) * ct)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(qw.a, qw.b)
  ra, rb = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(qw.a, qw.b)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(ra), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=1e-4, atol=1e-3)


def test_quantized_base_keeps_its_dequant_matmul():
  """`x @ w` of a QA-LoRA leaf over a GroupQuantizedArray goes to the base's own rule:
  the QALoraWeight's dense kernel W + delta is never formed (no materialize warning,
  and no (in, out) add of base and update in the jaxpr)."""
  qw = _qa(_bases()["int4"], jax.random.key(9))
  x = jnp.ones((2, K), jnp.float32)
  jaxpr = jax.make_jaxpr(lj.implicit(lambda w, x: x @ w))(qw, x)
  adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "add"
          and tuple(e.outvars[0].aval.shape) == (K, N)]
  assert not adds


def test_stacked_layers_under_scan():
  w = jax.random.normal(jax.random.key(10), (3, K, K), jnp.float32) * 0.05
  cfg = lj.LoraConfig(rank=R, targets=r"w", use_qalora=True, qalora_group_size=L,
                      layouts={"w": "lio"})
  qw = lj.init(jax.random.key(11), {"w": w}, cfg)["w"]
  assert qw.a.shape == (3, K // L, R) and qw.b.shape == (3, R, K)
  qw = qw.replace_children(b=jax.random.normal(jax.random.key(12), qw.b.shape) * 0.1)

  def fwd(p, x):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, p["w"])[0]

  x = jax.random.normal(jax.random.key(13), (2, K))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = jax.jit(lj.implicit(fwd))({"w": qw}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(fwd({"w": qw.materialize()}, x)),
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# PEFT

def _peft_module(w_dense: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, rank: int,
                 group: int) -> PeftLinear:
  """A PEFT LoRA Linear on the (dequantized) base with QA-LoRA set up as PEFT's GPTQ
  layers do (`QALoraLinearVariant.init`; PEFT dispatches QA-LoRA only for GPTQ layers)."""
  k, n = w_dense.shape
  cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, use_qalora=True, qalora_group_size=group)
  base = torch.nn.Linear(k, n, bias=False)
  with torch.no_grad():
    base.weight.copy_(torch.from_numpy(np.ascontiguousarray(w_dense.T, np.float32)))
  m = PeftLinear(base, "default", r=rank, lora_alpha=alpha, config=cfg)
  QALoraLinearVariant.init(m, "default", cfg)
  m.lora_variant["default"] = QALoraLinearVariant()
  with torch.no_grad():
    m.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(a.T, np.float32)))
    m.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(b.T, np.float32)))
  return m.eval()


def _peft_forward(m, x) -> np.ndarray:
  with torch.no_grad():
    return m(torch.from_numpy(np.array(x, np.float32))).numpy()


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_forward_equals_peft_qalora_variant(kind):
  base = _bases()[kind]
  qw = _qa(base, jax.random.key(14), scale=8 / R)
  m = _peft_module(_dense_w(base), np.asarray(qw.a), np.asarray(qw.b), alpha=8, rank=R,
                   group=L)
  assert m.scaling["default"] == qw.scale
  assert tuple(m.lora_A["default"].weight.shape) == (R, K // L)
  x = np.asarray(jax.random.normal(jax.random.key(15), (2, 5, K)))
  np.testing.assert_allclose(np.asarray(_matmul(qw, jnp.asarray(x))), _peft_forward(m, x),
                             rtol=1e-4, atol=1e-4)


def test_saved_adapter_loads_in_peft(tmp_path):
  import safetensors.numpy as stnp
  w = _bases()["dense"]
  cfg = lj.LoraConfig(rank=R, alpha=8, targets=r".*q_proj/kernel", use_qalora=True,
                      qalora_group_size=L)
  params = lj.init(jax.random.key(16), _tree(w), cfg)
  qw = _leaf(params)
  qw = qw.replace_children(b=jax.random.normal(jax.random.key(17), qw.b.shape) * 0.2)
  params = _tree(qw)
  lj.save_adapter(tmp_path, params, cfg)
  pc = peft.LoraConfig.from_pretrained(str(tmp_path))
  assert pc.use_qalora is True and pc.qalora_group_size == L
  assert pc.r == R and pc.lora_alpha == 8 and pc.use_dora is False
  raw = json.loads((tmp_path / "adapter_config.json").read_text())
  assert raw["use_qalora"] is True and raw["qalora_group_size"] == L
  tensors = stnp.load_file(str(tmp_path / "adapter_model.safetensors"))
  assert tensors[MODULE + ".lora_A.weight"].shape == (R, K // L)
  assert tensors[MODULE + ".lora_B.weight"].shape == (N, R)
  m = _peft_module(np.asarray(w), np.zeros((K // L, R)), np.zeros((R, N)), 8, R, L)
  sd = {k.removeprefix(MODULE + ".").replace(".weight", ".default.weight"):
        torch.from_numpy(v) for k, v in tensors.items()}
  missing, unexpected = m.load_state_dict(sd, strict=False)
  assert not unexpected and all(k.startswith("base_layer") for k in missing)
  x = np.asarray(jax.random.normal(jax.random.key(18), (3, K)))
  np.testing.assert_allclose(_peft_forward(m, x), np.asarray(_matmul(qw, jnp.asarray(x))),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_peft_written_adapter_loads_here(kind, tmp_path):
  import safetensors.torch as stt
  base = _bases()[kind]
  rng = np.random.default_rng(0)
  a = rng.normal(size=(K // L, R)).astype(np.float32) * 0.3
  b = rng.normal(size=(R, N)).astype(np.float32) * 0.3
  m = _peft_module(_dense_w(base), a, b, alpha=16, rank=R, group=L)
  pc = peft.LoraConfig(r=R, lora_alpha=16, use_qalora=True, qalora_group_size=L,
                       target_modules=["q_proj"])
  pc.save_pretrained(str(tmp_path))
  stt.save_file({MODULE + ".lora_A.weight": m.lora_A["default"].weight.detach().contiguous(),
                 MODULE + ".lora_B.weight": m.lora_B["default"].weight.detach().contiguous()},
                str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  params = lj.load_adapter(tmp_path, _tree(base))
  qw = _leaf(params)
  assert type(qw) is lj.QALoraWeight and qw.group_size == L and qw.scale == 16 / R
  assert qw.w is base
  x = np.asarray(jax.random.normal(jax.random.key(19), (4, K)))
  np.testing.assert_allclose(np.asarray(_matmul(qw, jnp.asarray(x))), _peft_forward(m, x),
                             rtol=1e-4, atol=1e-4)
  # the tensor-by-tensor view (lora-jax merge's base+adapter) gives the same dense weight
  from lora_jax._peft_io import read_adapter_updates
  up = read_adapter_updates(tmp_path)["model.layers.0.self_attn.q_proj"]["weight"]
  np.testing.assert_allclose(up.apply(np.asarray(_dense_w(base).T, np.float32)).T,
                             np.asarray(qw.materialize()), rtol=1e-5, atol=1e-5)


def test_peft_files_stacked_roundtrip(tmp_path):
  w = jax.random.normal(jax.random.key(20), (2, K, N), jnp.float32)
  params = {"layers": {"self_attn": {"q_proj": {"kernel": w}}}}
  cfg = lj.LoraConfig(rank=R, targets=r".*q_proj/kernel", use_qalora=True,
                      qalora_group_size=L, layouts={r".*": "lio"})
  p = lj.init(jax.random.key(21), params, cfg)
  qw = p["layers"]["self_attn"]["q_proj"]["kernel"]
  qw = qw.replace_children(b=jax.random.normal(jax.random.key(22), qw.b.shape))
  p = {"layers": {"self_attn": {"q_proj": {"kernel": qw}}}}
  lj.save_adapter(tmp_path, p, cfg)
  back = lj.load_adapter(tmp_path, params)["layers"]["self_attn"]["q_proj"]["kernel"]
  assert type(back) is lj.QALoraWeight and back.a.shape == (2, K // L, R)
  np.testing.assert_allclose(np.asarray(back.materialize()), np.asarray(qw.materialize()),
                             rtol=1e-6, atol=1e-6)


def test_bad_qalora_files(tmp_path):
  w = _bases()["dense"]
  cfg = lj.LoraConfig(rank=R, targets=r".*q_proj/kernel", use_qalora=True, qalora_group_size=L)
  lj.save_adapter(tmp_path, lj.init(jax.random.key(23), _tree(w), cfg), cfg)
  c = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**c, "qalora_group_size": 16}))
  with pytest.raises(ValueError, match=r"lora_A \(4, 4\).*qalora_group_size 16.*expected "
                                       r"lora_A \(4, 8\)"):
    lj.load_adapter(tmp_path, _tree(w))
  (tmp_path / "adapter_config.json").write_text(json.dumps({**c, "qalora_group_size": 0}))
  with pytest.raises(ValueError, match="qalora_group_size=0"):
    lj.load_adapter(tmp_path, _tree(w))
  (tmp_path / "adapter_config.json").write_text(json.dumps({**c, "qalora_group_size": 48}))
  with pytest.raises(ValueError, match="qalora_group_size 48 does not divide the input size 128"):
    lj.load_adapter(tmp_path, _tree(w))
  lora = lj.init(jax.random.key(0), {"x": {"q_proj": {"kernel": w}}},
                 lj.LoraConfig(rank=R, targets=r".*q_proj/kernel"))
  with pytest.raises(ValueError, match="mix"):
    lj.save_adapter(tmp_path / "mix", {**lj.init(jax.random.key(23), _tree(w), cfg),
                                       "model": {"layers": {"1": lora["x"]}}},
                    name_map=[("model.layers.{layer}.self_attn.{proj}",
                               "layers/{layer}/self_attn/{proj}/kernel"),
                              ("model.layers.{layer}.{proj}", "model/layers/{layer}/{proj}/kernel")])


# ----------------------------------------------------------------------------
# the fold into zero points

def _qa_model(key, layers=2, width=K):
  """A small model: `layers` int4/g32 (zero-point) kernels with QA-LoRA adapters whose
  factors are random (as after training), and an input batch."""
  ks = jax.random.split(key, 3 * layers + 1)
  params = {}
  for i in range(layers):
    w = jax.random.normal(ks[3 * i], (width, width), jnp.float32) / np.sqrt(width)
    qw = _qa(_int4_base(w), ks[3 * i + 1], scale=2.0)
    params[f"l{i}"] = qw.replace_children(b=qw.b * 0.1)
  x = jax.random.normal(ks[-1], (16, width), jnp.float32)
  return params, x


def _mlp(params, x):
  for i in range(len(params)):
    x = jax.nn.gelu(x @ params[f"l{i}"])
  return x


_mlp_j = jax.jit(lj.implicit(_mlp))


def test_fold_equals_unmerged_and_keeps_codes_and_scales():
  params, x = _qa_model(jax.random.key(24))
  folded = qz.fold_qalora(params)
  for name, qw in params.items():
    f = folded[name]
    assert type(f) is qz.GroupQuantizedArray
    assert f.packed is qw.w.packed and f.scales is qw.w.scales
    np.testing.assert_array_equal(np.asarray(f.packed), np.asarray(qw.w.packed))
    np.testing.assert_array_equal(np.asarray(f.scales), np.asarray(qw.w.scales))
    assert f.zeros.dtype == jnp.float32 and f.group_size == L and f.bits == 4
    np.testing.assert_allclose(np.asarray(f.materialize()), np.asarray(qw.materialize()),
                               rtol=1e-5, atol=1e-5)
  y, yf = _mlp_j(params, x), _mlp_j(folded, x)
  np.testing.assert_allclose(np.asarray(yf), np.asarray(y), rtol=1e-5, atol=1e-5)
  # stacked leaves fold too
  w = jax.random.normal(jax.random.key(25), (2, K, N), jnp.float32)
  sq = _qa(quantize_group_array(w, 4, L, symmetric=False), jax.random.key(26))
  np.testing.assert_allclose(np.asarray(qz.fold_qalora({"w": sq})["w"].materialize()),
                             np.asarray(sq.materialize()), rtol=1e-5, atol=1e-5)
  # other leaves pass through
  other = {"lora": lj.LoraWeight(w=w[0], a=jnp.zeros((K, 2)), b=jnp.zeros((2, N))),
           "x": jnp.ones(3)}
  out = qz.fold_qalora(other)
  assert out["lora"] is other["lora"] and out["x"] is other["x"]


def test_fold_integer_zero_points_cost(capsys):
  params, x = _qa_model(jax.random.key(27))
  y = _mlp_j(params, x)
  yf = _mlp_j(qz.fold_qalora(params), x)
  folded_i = qz.fold_qalora(params, integer_zero_points=True)
  yi = _mlp_j(folded_i, x)
  folded_f = qz.fold_qalora(params)
  clamped = total = 0
  for name, qw in params.items():
    f = folded_i[name]
    assert f.zeros.dtype == jnp.int8 and f.packed is qw.w.packed and f.scales is qw.w.scales
    assert int(jnp.min(f.zeros)) >= -8 and int(jnp.max(f.zeros)) <= 7
    # each weight moves by at most half its group's scale where z' was not clamped
    zf = np.asarray(folded_f[name].zeros)
    inside = (zf >= -8.5) & (zf <= 7.5)
    clamped += int(np.sum(~inside))
    total += zf.size
    dw = np.abs(np.asarray(f.dequantize_t()) - np.asarray(folded_f[name].dequantize_t()))
    bound = 0.5 * np.asarray(qw.w.scales, np.float32)[..., None] * (1 + 1e-5)
    dw, bound = dw.reshape(*zf.shape, L), np.broadcast_to(bound, (*zf.shape, L))
    assert np.all(dw[inside] <= bound[inside])
  d_float = np.abs(np.asarray(yf) - np.asarray(y))
  d_int = np.abs(np.asarray(yi) - np.asarray(y))
  d_base = np.abs(np.asarray(_mlp_j({k: v.w for k, v in params.items()}, x)) - np.asarray(y))
  scale = float(np.mean(np.abs(np.asarray(y))))
  with capsys.disabled():
    print(f"\nfold_qalora on a 2-layer {K}-wide int4/g{L} MLP, |output| mean {scale:.4f}: "
          f"float zero points max {d_float.max():.2e} mean {d_float.mean():.2e}; "
          f"int8 zero points max {d_int.max():.4f} mean {d_int.mean():.4f}; "
          f"dropping the adapter max {d_base.max():.4f} mean {d_base.mean():.4f}; "
          f"{clamped}/{total} zero points clamped")
  assert d_float.max() < 1e-5
  assert d_int.mean() > 100 * d_float.mean()     # rounding is not free


def test_fold_errors_name_path_and_shapes():
  w = jax.random.normal(jax.random.key(28), (K, N), jnp.float32)
  key = jax.random.key(29)
  with pytest.raises(ValueError, match=r"l0: fold_qalora: .*not quantized.*lj.merge"):
    qz.fold_qalora({"l0": _qa(w, key)})
  with pytest.raises(ValueError, match=r"l0: fold_qalora: .*int4/g32 \(128, 24\) is symmetric"):
    qz.fold_qalora({"l0": _qa(_int4_base(w, symmetric=True), key)})
  with pytest.raises(ValueError, match=r"group size 64 differs from the QA-LoRA group size 32"):
    qz.fold_qalora({"l0": _qa(_int4_base(w, group=64), key)})
  g_idx = np.random.default_rng(0).permutation(np.arange(K) // L).astype(np.int32)
  with pytest.raises(ValueError, match=r"has a g_idx"):
    qz.fold_qalora({"l0": _qa(_int4_base(w, g_idx=g_idx), key)})
  nf4 = qz.quantize_kernel(w, qz.QuantConfig(format="nf4", block_size=64))
  with pytest.raises(ValueError, match=r"QuantizedArray \(128, 24\).*not a group-wise"):
    qz.fold_qalora({"l0": _qa(nf4, key)})
  # a leaf rebuilt around a group size that does not divide the input
  bad = _qa(_int4_base(w), key).replace_children()
  object.__setattr__(bad, "group_size", 48)
  with pytest.raises(ValueError, match=r"group size 48 does not divide the input size 128"):
    qz.fold_qalora({"l0": bad})


# ----------------------------------------------------------------------------
# config and init errors

def test_config_and_init_errors():
  w = jax.random.normal(jax.random.key(30), (K, N), jnp.float32)
  with pytest.raises(ValueError, match="use_qalora=True with use_dora=True"):
    lj.LoraConfig(use_qalora=True, use_dora=True)
  for init in ("pissa", "olora", "pissa_niter_4"):
    with pytest.raises(ValueError, match=f"use_qalora=True needs init.*{init!r}"):
      lj.LoraConfig(use_qalora=True, init=init)
  with pytest.raises(ValueError, match="qalora_group_size must be a positive int"):
    lj.LoraConfig(use_qalora=True, qalora_group_size=0)
  with pytest.raises(ValueError, match=rf"{PATH}: qalora_group_size 48 does not divide the "
                                       r"input size 128 of kernel \(128, 24\)"):
    lj.init(jax.random.key(0), _tree(w), lj.LoraConfig(
        targets=r".*q_proj/kernel", use_qalora=True, qalora_group_size=48))
  with pytest.raises(ValueError, match=rf"{PATH}: rank 8 exceeds the 4 pooled inputs"):
    lj.init(jax.random.key(0), _tree(w), lj.LoraConfig(
        rank=8, targets=r".*q_proj/kernel", use_qalora=True, qalora_group_size=32))
  with pytest.raises(ValueError, match=r"w: use_qalora pools one input axis.*'iio'"):
    lj.init(jax.random.key(0), {"w": jnp.ones((4, 32, N))}, lj.LoraConfig(
        targets="w", use_qalora=True, qalora_group_size=8, layouts={"w": "iio"}))
  with pytest.raises(ValueError, match="loftq: use_qalora=True is not supported"):
    qz.loftq(jax.random.key(0), _tree(w), lj.LoraConfig(
        targets=r".*q_proj/kernel", use_qalora=True, qalora_group_size=L),
        qz.QuantConfig(format="nf4", block_size=64))
  with pytest.raises(ValueError, match=r"a \(5, 4\) and b \(4, 24\)"):
    lj.QALoraWeight(w=w, a=jnp.zeros((5, R)), b=jnp.zeros((R, N)), group_size=L)
  # served as its exact LoRA since stack_adapters takes QA-LoRA (tests/test_serving.py);
  # a QA-LoRA leaf that is not an adapter of the bank's base is still refused
  with pytest.raises(ValueError, match=r"stack_adapters: .*q_proj/kernel: adapter 1 has "
                                       r"kernel \(128, 12\)"):
    lj.stack_adapters([_tree(_qa(w, jax.random.key(1))),
                       _tree(_qa(w[:, :12], jax.random.key(2)))])
