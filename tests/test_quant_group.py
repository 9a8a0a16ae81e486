"""Group-wise integer kernels (`GroupQuantizedArray`, int2/3/4/8, symmetric or with zero
points, optional g_idx) and ModuLoRA (LoRA over any quantized base).

Round-to-nearest codes, scales, zero points, packed words and dequantized weights are
compared with compressed-tensors' own `calculate_qparams` / `quantize` /
`pack_to_int32` / `dequantize`, run at test time."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
import quantization as qz
from quantization import _group as G

BITS = (2, 3, 4, 8)


def _normal(seed, shape, scale=0.05, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


# ----------------------------------------------------------------------------
# compressed-tensors as the oracle

def _ct_rtn(wt_np, bits, group, symmetric, torch_dtype):
  """compressed-tensors' RTN of a (out, in) weight: (codes int8, scales, zeros, packed,
  dequantized float32), all numpy."""
  torch = pytest.importorskip("torch")
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
  from compressed_tensors.quantization import QuantizationArgs
  from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
  from compressed_tensors.quantization.utils import calculate_qparams
  wt = torch.tensor(wt_np).to(torch_dtype)
  out, k = wt.shape
  if group == -1:
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    lo, hi = wt.amin(-1, keepdim=True), wt.amax(-1, keepdim=True)
  else:
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group)
    g = wt.reshape(out, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
  s, z = calculate_qparams(lo, hi, args)
  q = quantize(wt, s, z, args, dtype=torch.int8)
  deq = dequantize(q, s, None if symmetric else z, args)
  return (q.numpy(), s.float().numpy(), z.numpy(), pack_to_int32(q, bits).numpy(),
          deq.float().numpy())


@pytest.mark.interop
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rtn_equals_compressed_tensors(bits, symmetric, dtype):
  torch = pytest.importorskip("torch")
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  w = _normal(bits, (256, 48), dtype=jnp.dtype(dtype))             # kernel (in, out)
  wt = np.asarray(w.astype(jnp.float32)).T
  q_ct, s_ct, z_ct, p_ct, d_ct = _ct_rtn(wt, bits, 64, symmetric, tdt)
  q = qz.quantize_kernel(w, qz.QuantConfig(f"int{bits}", 64, symmetric=symmetric))
  assert isinstance(q, qz.GroupQuantizedArray) and q.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(q.codes()), q_ct)
  np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)), s_ct)
  np.testing.assert_array_equal(np.asarray(q.packed), p_ct)
  if symmetric:
    assert q.zeros is None
  else:
    np.testing.assert_array_equal(np.asarray(q.zeros), z_ct)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t(jnp.dtype(dtype)).astype(jnp.float32)),
                                d_ct)


@pytest.mark.interop
@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (3, False)])
def test_per_channel_equals_compressed_tensors(bits, symmetric):
  torch = pytest.importorskip("torch")
  w = _normal(20 + bits, (96, 40))
  q_ct, s_ct, z_ct, p_ct, d_ct = _ct_rtn(np.asarray(w).T, bits, -1, symmetric, torch.float32)
  q = qz.quantize_kernel(w, qz.QuantConfig(f"int{bits}", -1, symmetric=symmetric))
  assert q.group_size == 96 and q.scales.shape == (40, 1)
  np.testing.assert_array_equal(np.asarray(q.codes()), q_ct)
  np.testing.assert_array_equal(np.asarray(q.scales), s_ct)
  np.testing.assert_array_equal(np.asarray(q.packed), p_ct)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), d_ct)


@pytest.mark.interop
@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 2),
       n=st.sampled_from([1, 7, 31, 32, 33, 64, 100]), seed=st.integers(0, 2 ** 31 - 1))
def test_packing_equals_compressed_tensors(bits, rows, n, seed):
  """Dense bit-stream packing, any length (3-bit codes straddle words): our words equal
  `pack_to_int32`, and our unpacking of them equals `unpack_from_int32`."""
  torch = pytest.importorskip("torch")
  from compressed_tensors.compressors.pack_quantized.helpers import (pack_to_int32,
                                                                       unpack_from_int32)
  lo, hi = G.qrange(bits)
  q = np.random.default_rng(seed).integers(lo, hi + 1, (rows, n)).astype(np.int8)
  words = pack_to_int32(torch.tensor(q), bits).numpy()
  ours = np.asarray(G.pack_codes(jnp.asarray(q.astype(np.int16) - lo), bits))
  np.testing.assert_array_equal(ours, words)
  back = unpack_from_int32(torch.tensor(words), bits, torch.Size((rows, n))).numpy()
  np.testing.assert_array_equal(np.asarray(G.unpack_codes(jnp.asarray(words), bits, n))
                                .astype(np.int16) + lo, back)


# ----------------------------------------------------------------------------
# the format's own math (no peer: a partial last group and g_idx are ours)

def _reference_dequant(q: qz.GroupQuantizedArray) -> np.ndarray:
  """(out, in) float32 from the codes, scales, zeros and groups, in numpy."""
  codes = np.asarray(q.codes()).astype(np.float32)
  k = q.kernel_shape[0]
  g = np.arange(k) // q.group_size if q.g_idx is None else np.asarray(q.g_idx)
  s = np.asarray(q.scales, np.float32)[:, g]
  z = 0.0 if q.zeros is None else np.asarray(q.zeros, np.float32)[:, g]
  return (codes - z) * s


@pytest.mark.parametrize("bits", BITS)
def test_partial_last_group_quantizes_like_a_padded_one(bits):
  """in = 200 with groups of 64: four groups, the last of 8 inputs; its scale is what
  the 8 values alone give, and every weight stays within half a step of its value."""
  w = _normal(bits, (200, 24))
  q = qz.quantize_kernel(w, qz.QuantConfig(f"int{bits}", 64, symmetric=False))
  assert q.scales.shape == (24, 4)
  tail = np.asarray(w)[192:].T                                       # (out, 8)
  lo, hi = np.minimum(tail.min(1), 0), np.maximum(tail.max(1), 0)
  np.testing.assert_allclose(np.asarray(q.scales)[:, 3], (hi - lo) / (2 ** bits - 1),
                             rtol=1e-6)
  deq = np.asarray(q.dequantize_t())
  np.testing.assert_array_equal(deq, _reference_dequant(q))
  step = np.repeat(np.asarray(q.scales), 64, axis=1)[:, :200]
  assert np.all(np.abs(deq - np.asarray(w).T) <= 0.5 * step * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("bits", [3, 4])
def test_g_idx_groups_follow_the_index(bits):
  """With a g_idx (activation order), input i uses the scale of group g_idx[i]:
  quantizing equals quantizing the inputs sorted by group, then putting them back."""
  k, n, group = 128, 16, 32
  perm = np.random.default_rng(0).permutation(k)
  g_idx = np.empty(k, np.int32)
  g_idx[perm] = np.arange(k) // group                                # a permutation of groups
  w = _normal(5, (k, n))
  q = qz.quantize_group_array(w, bits, group, symmetric=False, g_idx=g_idx)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), _reference_dequant(q))
  order = np.argsort(g_idx, kind="stable")
  sorted_q = qz.quantize_group_array(w[order], bits, group, symmetric=False)
  np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(sorted_q.scales))
  np.testing.assert_array_equal(np.asarray(q.dequantize_t())[:, order],
                                np.asarray(sorted_q.dequantize_t()))
  y = qz.matmul(jnp.ones((2, k)), q)
  np.testing.assert_allclose(y, jnp.ones((2, k)) @ q.materialize(), rtol=1e-5, atol=1e-6)


def test_bits_per_param_counts_codes_scales_and_zero_points():
  w = _normal(1, (1024, 256))
  for fmt, sym, want in [("int4", True, 4 + 32 / 128), ("int4", False, 4 + 40 / 128),
                         ("int3", False, 3 + 40 / 128), ("int2", True, 2 + 32 / 128),
                         ("int8", True, 8 + 32 / 128)]:
    q = qz.quantize_kernel(w, qz.QuantConfig(fmt, 128, symmetric=sym))
    assert qz.bits_per_param(q) == pytest.approx(want)
  s = qz.summary({"w": qz.quantize_kernel(w, qz.QuantConfig("int3", 128, symmetric=False))})
  assert "int3" in s and "asym" in s and f"{3 + 40 / 128:.3f}" in s


# ----------------------------------------------------------------------------
# matmul, implicit, LoRA over quantized bases (ModuLoRA)

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_equals_dequantized(bits, symmetric):
  """Untiled and tiled (tiles of 64 output rows, with a remainder), x @ W and dy @ W^T."""
  w = _normal(bits, (192, 200))
  q = qz.quantize_kernel(w, qz.QuantConfig(f"int{bits}", 32, symmetric=symmetric))
  dense = q.materialize()
  x = _normal(9, (3, 5, 192), 1.0)
  for tile in (1 << 20, 64 * 192):
    np.testing.assert_allclose(qz.matmul_xla(x, q, tile_elements=tile), x @ dense,
                               rtol=1e-5, atol=1e-5)
    dy = _normal(10, (7, 200), 1.0)
    np.testing.assert_allclose(qz.matmul_t_xla(dy, q, tile_elements=tile), dy @ dense.T,
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lj.implicit(lambda p, x: x @ p)(q, x), x @ dense,
                             rtol=1e-5, atol=1e-5)


def _modulora_case(cfg):
  d, h = 64, 96
  base = {"up": {"kernel": _normal(1, (d, h))}, "down": {"kernel": _normal(2, (h, d))}}
  params = qz.quantize(base, cfg)
  params = lj.init(jax.random.key(3), params,
                   lj.LoraConfig(rank=4, alpha=8, targets=r".*kernel", init="gaussian"))
  params = jax.tree.map(
      lambda x: x.__class__(**{**x.__dict__, "b": jnp.full_like(x.b, 0.02)})
      if isinstance(x, lj.LoraWeight) else x, params, is_leaf=lj.is_implicit)
  x = _normal(4, (6, d), 1.0)

  def loss(p, x):
    return jnp.mean((jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]) ** 2)

  return params, x, loss


@pytest.mark.parametrize("cfg", [
    qz.QuantConfig("nf4", 32), qz.QuantConfig("fp4", 32, False), qz.QuantConfig("int4", 32),
    qz.QuantConfig("int8", 32), qz.QuantConfig("int2", 32, symmetric=True),
    qz.QuantConfig("int3", 32, symmetric=False), qz.QuantConfig("int4", 32, symmetric=False),
    qz.QuantConfig("int8", -1, symmetric=True)], ids=lambda c: f"{c.format}-{c.symmetric}")
def test_lora_over_any_quantized_base_equals_lora_over_dequantized(cfg):
  """ModuLoRA: loss and adapter gradients through the quantized rule equal LoRA on the
  dequantized base, for every format; only A and B get gradients."""
  params, x, loss = _modulora_case(cfg)
  adapter, frozen = lj.split(params)
  f = lambda ad, fr: lj.implicit(loss)(lj.combine(ad, fr), x)  # noqa: E731
  val, g = jax.jit(jax.value_and_grad(f))(adapter, frozen)
  d_adapter, d_frozen = lj.split(qz.dequantize(params))
  d_val, d_g = jax.jit(jax.value_and_grad(f))(d_adapter, d_frozen)
  np.testing.assert_allclose(val, d_val, rtol=1e-5)
  np.testing.assert_allclose(val, loss(lj.merge(qz.dequantize(params)), x), rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.leaves(g), jax.tree.leaves(d_g), rtol=1e-4, atol=1e-7)
  assert len(jax.tree.leaves(g)) == 4                     # a, b of each kernel
  assert not any(qz.is_quantized(x) for x in jax.tree.leaves(adapter, is_leaf=lj.is_implicit))


@pytest.mark.parametrize("cfg", [qz.QuantConfig("nf4", 64),
                                 qz.QuantConfig("int3", 128, symmetric=False),
                                 qz.QuantConfig("int2", 64, symmetric=True)],
                         ids=lambda c: c.format)
def test_lora_step_keeps_no_dense_kernel(cfg):
  """A jitted LoRA gradient step over a 2048 x 2048 quantized kernel: XLA's peak
  temporary memory stays below 30% of the dense float32 kernel (16 MiB; one 4 MiB
  dequantized tile of 2^20 elements and small buffers), so no kernel-sized dense buffer
  lives across the step: the forward dequantizes tiles, the backward dequantizes again."""
  k = 2048
  w = _normal(1, (k, k))
  x = _normal(2, (8, k), 1.0)
  q = lj.init(jax.random.key(0), {"w": qz.quantize_kernel(w, cfg)},
              lj.LoraConfig(rank=8, targets="w"))
  adapter, frozen = lj.split(q)
  f = lambda ad, fr: jnp.sum(lj.implicit(lambda p, x: x @ p["w"])(lj.combine(ad, fr), x) ** 2)  # noqa: E731
  mem = jax.jit(jax.grad(f)).lower(adapter, frozen).compile().memory_analysis()
  dense_bytes = k * k * 4
  assert mem.temp_size_in_bytes < 0.3 * dense_bytes, (mem.temp_size_in_bytes, dense_bytes)


def test_stacked_group_kernels_under_scan():
  L, d = 3, 64
  base = {"layers": {"up": _normal(1, (L, d, d)), "down": _normal(2, (L, d, d))}}
  q = qz.quantize(base, qz.QuantConfig("int4", 32, symmetric=False))
  assert q["layers"]["up"].shape == (L, d, d) and q["layers"]["up"].zeros.shape == (L, d, 2)
  x = _normal(3, (4, d), 1.0)

  def f(p, x):
    def body(h, lp):
      return h + jnp.tanh(h @ lp["up"]) @ lp["down"], None
    return jax.lax.scan(body, x, p["layers"])[0]

  np.testing.assert_allclose(lj.implicit(f)(q, x), f(qz.dequantize(q), x), rtol=1e-5,
                             atol=1e-6)


def test_group_kernel_shards_on_an_8_device_mesh():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  if devices.size < 8:
    pytest.fail("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = Mesh(devices, ("data", "model"))
  q = qz.quantize({"w": _normal(1, (256, 512))}, qz.QuantConfig("int4", 64, symmetric=False))
  specs = lj.partition_specs(q, {r"w": PS(None, "model")})
  assert specs["w"].packed == PS("model", None) and specs["w"].scales == PS("model", None)
  sharded = jax.device_put(q, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  assert sharded["w"].packed.sharding.shard_shape(sharded["w"].packed.shape) == (128, 32)
  x = _normal(2, (8, 256), 1.0)
  y = jax.jit(lj.implicit(lambda p, x: x @ p["w"]))(sharded, x)
  np.testing.assert_allclose(y, x @ q["w"].materialize(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"format": "int5"}, "unknown format 'int5'"),
    ({"format": "int3", "block_size": 100}, "power of two from 32 to 1024"),
    ({"format": "int4", "block_size": 2048, "symmetric": True}, "power of two from 32 to 1024"),
    ({"format": "nf4", "symmetric": False}, "no group-wise integer form"),
    ({"format": "int3", "double_quant": True}, "double_quant applies to the absmax"),
    ({"format": "int4", "symmetric": "yes"}, "symmetric must be None, True or False"),
    ({"format": "int4", "act_order": "dynamic"}, "act_order must be"),
])
def test_config_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    qz.QuantConfig(**kwargs)


def test_config_defaults_keep_todays_formats():
  assert not qz.QuantConfig("int4").group_wise and qz.QuantConfig("int4").block_size == 64
  assert qz.QuantConfig("int4").double_quant is True
  c = qz.QuantConfig("int3")
  assert c.group_wise and c.symmetric and c.block_size == 128 and c.double_quant is False
  assert isinstance(qz.quantize_kernel(_normal(0, (64, 8)), qz.QuantConfig("int4")),
                    qz.QuantizedArray)


def test_bad_leaves_and_inputs_name_what_is_wrong():
  w = _normal(0, (128, 16))
  q = qz.quantize_group_array(w, 4, 32)
  with pytest.raises(ValueError, match=r"packed \(16, 15\) does not fit kernel \(128, 16\) "
                                       r"at 4 bits; expected trailing \(16, 16\)"):
    qz.GroupQuantizedArray(packed=q.packed[:, :15], scales=q.scales, bits=4, group_size=32,
                           kernel_shape=(128, 16))
  with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
    qz.GroupQuantizedArray(packed=q.packed, scales=q.scales, bits=5, group_size=32,
                           kernel_shape=(128, 16))
  with pytest.raises(ValueError, match=r"scales \(16, 3\) do not fit"):
    qz.GroupQuantizedArray(packed=q.packed, scales=q.scales[:, :3], bits=4, group_size=32,
                           kernel_shape=(128, 16))
  with pytest.raises(ValueError, match="hold NaN/inf"):
    qz.GroupQuantizedArray(packed=q.packed, scales=q.scales.at[0, 0].set(jnp.nan), bits=4,
                           group_size=32, kernel_shape=(128, 16))
  bad = np.arange(128, dtype=np.int32) // 32
  bad[0] = 1                                            # group 1 gets 33 inputs
  with pytest.raises(ValueError, match="g_idx is not a permutation of the groups: group 0 "
                                       "has 31 inputs, expected 32"):
    qz.quantize_group_array(w, 4, 32, g_idx=bad, path="layers/0/q_proj")
  with pytest.raises(ValueError, match=r"layers/0/q_proj: group size 256 does not fit in=128"):
    qz.quantize_group_array(w, 4, 256, path="layers/0/q_proj")
  with pytest.raises(ValueError, match="NaN/inf value"):
    qz.quantize_group_array(w.at[3, 3].set(jnp.inf), 4, 32)
  with pytest.raises(ValueError, match="act_order needs calibration"):
    qz.quantize({"w": w}, qz.QuantConfig("int4", 32, act_order=True))
  with pytest.raises(ValueError, match="backend 'pallas' has kernels for QuantizedArray"):
    qz.matmul(jnp.ones((2, 128)), q, backend="pallas")


def test_nan_weight_under_jit_gives_an_all_nan_leaf_and_checkify_reports_it():
  from jax.experimental import checkify
  w = _normal(0, (64, 8)).at[5, 2].set(jnp.nan)
  f = jax.jit(lambda w: qz.quantize_group_array(w, 4, 32, symmetric=False).materialize())
  assert bool(jnp.all(jnp.isnan(f(w))))
  err, _ = checkify.checkify(f)(w)
  assert "1 NaN/inf value(s) in a weight of shape (64, 8)" in str(err.get())


def test_loftq_over_a_group_wise_base_starts_nearer_than_rtn():
  """LoftQ with a group-wise int4 config: dequantize(Q) + s a b is nearer to the float
  weight than the round-to-nearest base alone."""
  w = _normal(3, (128, 64))
  cfg = lj.LoraConfig(rank=8, alpha=8, targets="w")
  p = qz.loftq(jax.random.key(0), {"w": w}, cfg, qz.QuantConfig("int4", 32, symmetric=False),
               iters=2)
  lw = p["w"]
  assert isinstance(lw.w, qz.GroupQuantizedArray)
  start = lw.w.materialize() + lw.scale * lw.a @ lw.b
  rtn = qz.quantize_kernel(w, qz.QuantConfig("int4", 32, symmetric=False)).materialize()
  assert float(jnp.linalg.norm(start - w)) < 0.9 * float(jnp.linalg.norm(rtn - w))
