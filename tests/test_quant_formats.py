"""quantization: code tables, QuantizedArray, quantize/dequantize/summary, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
import quantization as qz
from quantization import _formats as F


def _normal(seed, shape, scale=0.02, dtype=jnp.float32):
  return (jax.random.normal(jax.random.PRNGKey(seed), shape) * scale).astype(dtype)


# ----------------------------------------------------------------------------
# tables, against bitsandbytes at test time

@pytest.mark.interop
def test_tables_equal_bitsandbytes():
  torch = pytest.importorskip("torch")
  bf = pytest.importorskip("bitsandbytes.functional")
  bits = lambda t: np.asarray(t, np.float32).view(np.uint32)  # noqa: E731  (signed zeros)
  np.testing.assert_array_equal(bits(F.NF4), bits(bf.get_4bit_type("nf4", device="cpu")))
  np.testing.assert_array_equal(bits(F.FP4), bits(bf.get_4bit_type("fp4", device="cpu")))
  np.testing.assert_array_equal(bits(F.DYNAMIC8), bits(bf.create_dynamic_map()))
  # the values codes dequantize to: the tables, except FP4's code 8, which bitsandbytes'
  # kernels dequantize to -0.0 (sign bit set) though its table holds +0.0
  np.testing.assert_array_equal(bits(F.VALUES["nf4"]), bits(F.NF4))
  assert bits(F.VALUES["fp4"])[8] == np.float32(-0.0).view(np.uint32) != bits(F.FP4)[8]
  np.testing.assert_array_equal(np.delete(bits(F.VALUES["fp4"]), 8), np.delete(bits(F.FP4), 8))
  # FP4's sorted order (bucket -> code) is torch.argsort of the table, as bnb uses it.
  np.testing.assert_array_equal(F.BOUNDS["fp4"][1],
                                torch.argsort(torch.from_numpy(F.FP4)).numpy())


def test_nf4_table_is_sorted_and_symmetric_range():
  assert np.all(np.diff(F.NF4) > 0)
  assert F.NF4[0] == -1.0 and F.NF4[-1] == 1.0 and F.NF4[7] == 0.0


def test_fp4_bit_order():
  # bit 3 is the sign; 0b0011 is the largest magnitude (12 / 12), 0b0001 the subnormal.
  assert F.FP4[3] == 1.0 and F.FP4[11] == -1.0
  assert F.FP4[1] == np.float32(0.0625 / 12)
  np.testing.assert_array_equal(F.FP4[8:], -F.FP4[:8])


def test_nibble_packing_order():
  codes = jnp.array([[1, 2, 15, 0]], jnp.uint8)
  packed = F.pack_nibbles(codes)
  np.testing.assert_array_equal(packed, np.array([[0x12, 0xF0]], np.uint8))
  np.testing.assert_array_equal(F.unpack_nibbles(packed), codes)


@pytest.mark.interop
@pytest.mark.parametrize("n", [1, 3, 7, 8, 15, 16, 33, 100, 321, 1000, 5000])
def test_torch_mean_emulation(n):
  torch = pytest.importorskip("torch")
  a = np.abs(np.random.default_rng(n).standard_normal(n)).astype(np.float32)
  got = np.asarray(jax.jit(F.torch_mean_f32)(jnp.asarray(a)))
  assert got == torch.from_numpy(a).mean().numpy()


# ----------------------------------------------------------------------------
# QuantizedArray

@pytest.mark.parametrize("fmt", qz.FORMATS)
@pytest.mark.parametrize("dq", [False, True])
def test_roundtrip_error_is_bounded(fmt, dq):
  w = _normal(0, (128, 48))
  q = qz.quantize_array(w, fmt, 64, dq)
  assert q.shape == w.shape and q.dtype == w.dtype
  d = q.materialize()
  # every value within half the largest gap of its block's code grid (plus dq slack)
  gap = {"nf4": 0.32, "fp4": 0.34, "int4": 1 / 7, "int8": 1 / 127}[fmt]
  absmax = np.max(np.abs(np.asarray(w).T.reshape(48, 2, 64)), axis=-1)
  bound = np.repeat(absmax, 64, axis=-1).T * (gap / 2 + (0.02 if dq else 1e-6))
  assert np.all(np.abs(np.asarray(d) - np.asarray(w)) <= bound + 1e-7)


def test_quantize_tree_targets_none_selects_float_kernels():
  params = {"dense": {"kernel": _normal(0, (64, 32)), "bias": jnp.zeros(32)},
            "ids": jnp.arange(64 * 2, dtype=jnp.int32).reshape(64, 2),
            "emb": _normal(1, (96, 64), dtype=jnp.bfloat16)}
  q = qz.quantize(params, qz.QuantConfig())
  assert isinstance(q["dense"]["kernel"], qz.QuantizedArray)
  assert isinstance(q["emb"], qz.QuantizedArray) and q["emb"].dtype == jnp.bfloat16
  assert q["dense"]["bias"] is params["dense"]["bias"]
  assert q["ids"] is params["ids"]
  back = qz.dequantize(q)
  chex.assert_trees_all_equal_shapes_and_dtypes(back, params)


def test_padding_is_recorded_and_invisible():
  w = _normal(2, (100, 24))            # 100 is not a multiple of 64
  q = qz.quantize_array(w, "nf4", 64, True)
  assert q.pad == 28 and q.codes.shape == (24, 64) and q.shape == (100, 24)
  d = q.materialize()
  assert d.shape == (100, 24)
  np.testing.assert_allclose(d, w, atol=0.35 * float(jnp.max(jnp.abs(w))))


def test_stacked_layers_equal_per_layer_quantization():
  w = _normal(3, (3, 64, 40))
  q = qz.quantize_array(w, "nf4", 32, True)
  assert q.shape == (3, 64, 40) and q.offset.shape == (3,)
  for i in range(3):
    qi = qz.quantize_array(w[i], "nf4", 32, True)
    np.testing.assert_array_equal(q.codes[i], qi.codes)
    np.testing.assert_array_equal(q.absmax[i], qi.absmax)
    np.testing.assert_array_equal(q.nested_absmax[i], qi.nested_absmax)
    np.testing.assert_array_equal(q.materialize()[i], qi.materialize())


def test_slicing_under_scan_and_vmap():
  w = _normal(4, (3, 64, 64), 0.1)
  q = qz.quantize_array(w, "fp4", 64, True)
  x = _normal(5, (2, 64), 1.0)

  def f(ws, x):
    def body(h, wl):
      return jnp.tanh(h @ wl), None
    return jax.lax.scan(body, x, ws)[0]

  chex.assert_trees_all_close(lj.implicit(f)(q, x), f(q.materialize(), x), atol=1e-6)
  per = jax.vmap(lambda qq: qq.materialize())(q)
  chex.assert_trees_all_close(per, q.materialize())


def test_quantize_under_jit_traces_once_and_matches_eager():
  w = _normal(6, (64, 32))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def qf(w):
    return qz.quantize_array(w, "nf4", 64, True)

  a, b = qf(w), qf(w + 1.0)
  e = qz.quantize_array(w, "nf4", 64, True)
  chex.assert_trees_all_equal(a, e)
  assert b.format == "nf4"


def test_materialize_jit_one_trace_static_meta():
  q = qz.quantize_array(_normal(7, (64, 32)), "int4", 32, False)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def m(q):
    return q.materialize()

  m(q)
  m(jax.tree.map(lambda x: x, q))
  leaves = jax.tree.leaves(q)
  assert all(hasattr(x, "shape") for x in leaves)      # no Python scalars as leaves


@pytest.mark.parametrize("fmt,dq,want", [("nf4", True, 4.127), ("nf4", False, 4.5),
                                         ("int8", False, 8.5)])
def test_summary_bits_per_param(fmt, dq, want):
  q = qz.quantize({"w": _normal(8, (1024, 1024))}, qz.QuantConfig(fmt, 64, dq))
  assert round(qz.bits_per_param(q["w"]), 3) == want
  s = qz.summary(q)
  assert f"{want:.3f}" in s and "w" in s


def test_summary_counts_every_stored_array():
  """Totals agree with a count of every array the tree holds: LoRA factors, DoRA's
  magnitude, fully trained leaves, quantized codes (at their logical size)."""
  p = {"k": _normal(1, (64, 32)), "h": _normal(2, (32, 4)), "n": _normal(3, (32,))}
  q = qz.quantize(p, qz.QuantConfig("nf4", 32, targets="k"))
  t = lj.to_dora(lj.init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k",
                                                             modules_to_save="h")))
  want = 64 * 32 + 32 * 4 + 32 + (64 * 2 + 2 * 32 + 32)     # k, h, n, a + b + m
  assert f"all params: {want:,} at" in qz.summary(t)


def test_convert_element_type_keeps_quantized():
  q = qz.quantize_array(_normal(9, (64, 16)), "nf4", 64, True)
  x = _normal(10, (3, 64), 1.0, jnp.bfloat16)
  f = lambda w, x: x @ w.astype(jnp.bfloat16)
  y = lj.implicit(f)(q, x)
  chex.assert_trees_all_close(y.astype(jnp.float32),
                              f(q.materialize(), x).astype(jnp.float32), atol=2e-2)
  assert y.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# quality (QLoRA paper): NF4 beats FP4 and int4 on normal data at equal block size

@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), block=st.sampled_from([32, 64, 128]),
       scale=st.floats(1e-3, 10.0))
def test_nf4_has_lowest_error_on_normal_data(seed, block, scale):
  w = _normal(seed, (256, 32), scale)
  err = {fmt: float(jnp.mean(jnp.abs(qz.quantize_array(w, fmt, block).materialize() - w)))
         for fmt in ("nf4", "fp4", "int4")}
  assert err["nf4"] < err["fp4"]
  assert err["nf4"] < err["int4"]


# ----------------------------------------------------------------------------
# bad input

def test_nan_inf_rejected_with_path():
  w = _normal(0, (64, 8)).at[3, 2].set(jnp.nan).at[5, 1].set(jnp.inf)
  with pytest.raises(ValueError, match=r"layer/kernel: 2 NaN/inf"):
    qz.quantize({"layer": {"kernel": w}}, qz.QuantConfig())


def test_unknown_format_lists_known():
  with pytest.raises(ValueError, match=r"unknown format 'nf3'.*nf4, fp4, int4, int8"):
    qz.QuantConfig(format="nf3")


@pytest.mark.parametrize("bs", [16, 48, 8192, True, 64.0])
def test_bad_block_size(bs):
  with pytest.raises(ValueError, match="block_size must be a power of two from 32 to 4096"):
    qz.QuantConfig(block_size=bs)


def test_non_float_target_rejected():
  params = {"ids": jnp.ones((64, 4), jnp.int32), "w": _normal(0, (64, 4))}
  with pytest.raises(TypeError, match=r"ids: cannot quantize dtype int32"):
    qz.quantize(params, qz.QuantConfig(targets=r"ids|w"))


def test_vector_target_rejected():
  with pytest.raises(ValueError, match=r"b: cannot quantize shape \(8,\)"):
    qz.quantize({"b": jnp.ones(8)}, qz.QuantConfig(targets="b"))


def test_target_matching_nothing_names_closest():
  with pytest.raises(ValueError, match=r"matches no parameter path.*dense/kernel"):
    qz.quantize({"dense": {"kernel": _normal(0, (64, 4))}}, qz.QuantConfig(targets="dense/kern"))


def test_quantized_array_shape_mismatch():
  q = qz.quantize_array(_normal(0, (64, 8)), "nf4", 64)
  with pytest.raises(ValueError, match=r"absmax .* does not fit codes"):
    qz.QuantizedArray(codes=q.codes, absmax=q.absmax[:4], format="nf4", block_size=64,
                      kernel_shape=(64, 8))
