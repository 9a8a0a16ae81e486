"""quantization: qz.matmul (XLA path, tiling, custom_vjp), the Pallas kernels against
their reference (rerun in interpret mode, as jax's tests/pallas do), and the
`implicit` rules (dot_general on either side, transposed, batched; convert; gather)."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz
from quantization import _matmul


def _normal(seed, shape, scale=1.0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.PRNGKey(seed), shape) * scale).astype(dtype)


def _q(seed, k, n, fmt="nf4", block=32, dq=True, dtype=jnp.float32):
  return qz.quantize_array(_normal(seed, (k, n), 0.05, dtype), fmt, block, dq)


def _dense(x, q):
  return jnp.matmul(x, q.materialize().astype(x.dtype), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------
# Pallas kernels vs the XLA reference

ON_ACCEL = jax.default_backend() in ("gpu", "tpu")
SMALL = qz.QMatmulTiles(block_m=8, block_n=16, block_k=64)


class TestQMatmulKernel:
  """Compiled kernels (GPU/TPU only); `TestQMatmulKernelInterpret` reruns it on CPU."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _platform(self):
    if not self.INTERPRET and not ON_ACCEL:
      pytest.skip("compiled Pallas kernels need a GPU or TPU")

  def _check(self, m, k, n, fmt, dtype, platform, block=32, tiles=SMALL):
    if not self.INTERPRET and platform != jax.default_backend():
      pytest.skip(f"the {platform} kernel needs a {platform}")
    q = _q(m * 7 + n, k, n, fmt, block, dq=fmt != "int8")
    x = _normal(k + m, (m, k), 1.0, dtype)
    y = qz.qmatmul(x, q.codes, q.scales(), fmt=fmt, block=q.block_size, in_features=k,
                   tiles=tiles, platform=platform, interpret=self.INTERPRET,
                   out_dtype=jnp.float32)
    ref = qz.qmatmul_reference(x, q.codes, q.scales(), fmt=fmt, block=q.block_size,
                               in_features=k, out_dtype=jnp.float32)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref))))
    # the reference is the dense product
    np.testing.assert_allclose(ref, _dense(x, q), rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref))))

  @pytest.mark.parametrize("fmt", qz.FORMATS)
  @pytest.mark.parametrize("platform", ["gpu", "tpu"])
  def test_gemv_f32(self, fmt, platform):
    self._check(1, 96, 40, fmt, jnp.float32, platform)       # K, N not multiples of tiles

  @pytest.mark.parametrize("fmt", qz.FORMATS)
  def test_gemm_bf16(self, fmt):
    self._check(24, 80, 24, fmt, jnp.bfloat16, "gpu")

  @pytest.mark.parametrize("platform", ["gpu", "tpu"])
  def test_large_batch(self, platform):
    self._check(512, 64, 32, "nf4", jnp.float32, platform,
                tiles=qz.QMatmulTiles(block_m=256, block_n=32, block_k=64))

  def test_bf16_tpu(self):
    self._check(9, 64, 20, "fp4", jnp.bfloat16, "tpu")

  def test_bad_inputs_are_named(self):
    q = _q(0, 64, 16)
    with pytest.raises(ValueError, match=r"x.shape\[1\]=32 must equal in_features=64"):
      qz.qmatmul(jnp.ones((2, 32)), q.codes, q.scales(), fmt="nf4", block=32,
                 in_features=64, interpret=self.INTERPRET)
    with pytest.raises(ValueError, match=r"scales.shape=\(16, 1\) must be"):
      qz.qmatmul(jnp.ones((2, 64)), q.codes, q.scales()[:, :1], fmt="nf4", block=32,
                 in_features=64, interpret=self.INTERPRET)


class TestQMatmulKernelInterpret(TestQMatmulKernel):
  INTERPRET = True


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_matmul_pallas_backend_matches_xla(fmt):
  q = _q(1, 100, 24, fmt, 32, dq=True)           # K padded to 128
  x = _normal(2, (3, 5, 100))
  y = qz.matmul(x, q, "pallas", tiles=SMALL)
  chex.assert_trees_all_close(y, qz.matmul(x, q, "xla"), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# XLA path

@pytest.mark.parametrize("fmt", qz.FORMATS)
@pytest.mark.parametrize("xshape", [(2, 3, 96), (1, 96), (96,)])   # GEMM, GEMV (LUT path)
def test_xla_matmul_equals_dense(fmt, xshape):
  q = _q(3, 96, 48, fmt, 64, dq=True)                              # K padded to 128
  x = _normal(4, xshape)
  want = x @ q.materialize()
  chex.assert_trees_all_close(qz.matmul(x, q, "xla"), want, atol=1e-5)
  chex.assert_trees_all_close(qz.matmul_xla(x, q, tile_elements=96 * 16), want, atol=1e-5)
  x16 = x.astype(jnp.bfloat16)
  q16 = qz.QuantizedArray(**{**q.__dict__, "dtype": jnp.bfloat16})
  y16 = qz.matmul(x16, q16, "xla")
  assert y16.dtype == jnp.bfloat16 and y16.shape == want.shape
  chex.assert_trees_all_close(y16.astype(jnp.float32), want, atol=5e-2, rtol=5e-2)


def test_xla_tiling_matches_untiled_and_bounds_memory():
  q = _q(5, 64, 100, "nf4", 32, dq=True)
  x = _normal(6, (4, 64))
  full = qz.matmul_xla(x, q)
  tiled = qz.matmul_xla(x, q, tile_elements=64 * 16)      # tiles of 16 rows + remainder 4
  chex.assert_trees_all_close(tiled, full, atol=1e-5)
  dyt = qz.matmul_t_xla(full, q, tile_elements=64 * 16)
  chex.assert_trees_all_close(dyt, full @ q.materialize().T, atol=1e-4)
  # no array as large as the dequantized weight (64 x 100 floats) inside the tiled program
  hlo = jax.jit(lambda x, q: qz.matmul_xla(x, q, tile_elements=64 * 16)).lower(x, q).as_text()
  assert "100x64xf32" not in hlo and "64x100xf32" not in hlo
  assert "16x64xf32" in hlo


def test_auto_picks_xla_on_cpu():
  if ON_ACCEL:
    pytest.skip("CPU-only check")
  q = _q(0, 64, 8)
  x = jnp.ones((2, 64))
  hlo = jax.jit(lambda x, q: qz.matmul(x, q)).lower(x, q).as_text()
  assert "custom_call" not in hlo                  # no kernel in the CPU program
  np.testing.assert_array_equal(qz.matmul(x, q), qz.matmul(x, q, "xla"))
  with pytest.raises(ValueError, match="unknown backend 'cuda'; known: auto, xla, pallas"):
    qz.matmul(jnp.ones((1, 64)), _q(0, 64, 8), "cuda")


def test_matmul_shape_errors():
  q = _q(0, 64, 8)
  with pytest.raises(ValueError, match=r"last axis of x must be 64"):
    qz.matmul(jnp.ones((2, 32)), q)
  with pytest.raises(TypeError, match="QuantizedArray"):
    qz.matmul(jnp.ones((2, 64)), jnp.ones((64, 8)))
  with pytest.raises(ValueError, match="stacked batch axes"):
    qz.matmul(jnp.ones((2, 64)), qz.quantize_array(jnp.ones((2, 64, 8)), "nf4"))


# ----------------------------------------------------------------------------
# gradients

@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_grad_flows_to_x_only(backend):
  q = _q(7, 64, 24, "nf4", 32)
  x = _normal(8, (3, 64))
  w = q.materialize()
  f = lambda x, q: jnp.sum(jnp.sin(qz.matmul(x, q, backend, tiles=SMALL)))
  _, vjp = jax.vjp(f, x, q)
  gx, gq = vjp(jnp.float32(1.0))
  gx_ref = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))(x)
  chex.assert_trees_all_close(gx, gx_ref, atol=1e-5)
  assert gq.codes.dtype == jax.dtypes.float0          # never a gradient for the codes
  assert not np.any(np.asarray(gq.nested_absmax))
  assert not np.any(np.asarray(gq.offset))


def test_grad_bf16_activations():
  q = _q(9, 64, 16, "nf4", 64, dtype=jnp.bfloat16)
  x = _normal(10, (2, 64), 1.0, jnp.bfloat16)
  gx = jax.grad(lambda x: jnp.sum(qz.matmul(x, q).astype(jnp.float32)))(x)
  assert gx.dtype == jnp.bfloat16
  ref = jnp.sum(q.materialize().astype(jnp.float32), axis=1)
  chex.assert_trees_all_close(gx[0].astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------
# implicit rules: implicit(f)(q) == f(q.materialize())

CASES = {
    "x@w": lambda w, x: x @ w,
    "einsum_3d": lambda w, x: jnp.einsum("bti,io->bto", x[None], w),
    "w_lhs": lambda w, x: jnp.einsum("io,ti->ot", w, x),
    "tied_transpose_free": lambda w, x: jnp.einsum("ti,oi->to", (x @ w), w),
    "dot_general_lhs_contract_out": lambda w, x: jax.lax.dot_general(
        w, x @ w, (((1,), (1,)), ((), ()))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dot_general_rule(name):
  f = CASES[name]
  q = _q(11, 64, 32, "fp4", 32)
  x = _normal(12, (5, 64))
  with warnings.catch_warnings():
    warnings.simplefilter("error")          # no materialize fallback
    got = lj.implicit(f)(q, x)
  chex.assert_trees_all_close(got, f(q.materialize(), x), atol=1e-4, rtol=1e-5)


def test_dot_general_rule_batched_vmap():
  w = _normal(13, (3, 64, 16), 0.05)
  q = qz.quantize_array(w, "nf4", 32, True)
  x = _normal(14, (3, 4, 64))
  f = lambda w, x: jax.vmap(lambda wl, xl: xl @ wl)(w, x)
  chex.assert_trees_all_close(lj.implicit(f)(q, x), f(q.materialize(), x), atol=1e-5)


def test_jit_implicit_traces_once():
  q = _q(15, 64, 16)
  x = _normal(16, (2, 64))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, x):
    return lj.implicit(lambda w, x: x @ w)(q, x)

  a = f(q, x)
  b = f(jax.tree.map(lambda t: t, q), x + 1.0)
  assert a.shape == b.shape == (2, 16)


def test_gather_rule_embedding_lookup():
  table = _normal(17, (96, 40), 0.1)
  q = qz.quantize_array(table, "nf4", 32, True)
  ids = jnp.array([[0, 5, 95], [31, 32, 64]])
  f = lambda t, ids: t[ids]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = lj.implicit(f)(q, ids)
  chex.assert_trees_all_close(got, q.materialize()[ids], atol=0)
  q8 = qz.quantize_array(table, "int8", 32, False)
  chex.assert_trees_all_close(lj.implicit(f)(q8, ids), q8.materialize()[ids], atol=0)


def test_unsupported_primitive_falls_back_with_warning():
  q = _q(18, 64, 16)
  with pytest.warns(UserWarning, match="no rule for primitive 'reduce_sum' on QuantizedArray"):
    got = lj.implicit(lambda w: jnp.sum(w, axis=0))(q)
  chex.assert_trees_all_close(got, jnp.sum(q.materialize(), axis=0), atol=1e-6)
