"""Every implicit rule for LoraWeight through one battery: outputs AND gradients of
`implicit(f)(params)` equal the materialized reference `f(lj.merge(params))`."""

from __future__ import annotations

import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import lora_jax as lj
from jaxpr_walk import dot_output_shapes

KEY = jax.random.key(0)


def _rand_lora(key, shape, axes, rank=3, scale=0.7, dtype=jnp.float32):
  """A LoraWeight with random non-zero factors (so the low-rank branch matters)."""
  kw, ka, kb = jax.random.split(key, 3)
  nb = len(shape) - len(axes)
  batch, kernel = shape[:nb], shape[nb:]
  ins = [d for d, ax in zip(kernel, axes) if ax == "i"]
  outs = [d for d, ax in zip(kernel, axes) if ax == "o"]
  w = jax.random.normal(kw, shape, dtype)
  a = jax.random.normal(ka, (*batch, *ins, rank), dtype)
  b = jax.random.normal(kb, (*batch, rank, *outs), dtype)
  return lj.LoraWeight(w=w, a=a, b=b, scale=scale, axes=axes)


def _x(shape, key=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


# Each case: (name, f(params, x), params, x). `params` is a dict holding LoraWeights.
CASES = [
    ("matmul_rhs", lambda p, x: x @ p["w"], {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("matmul_lhs", lambda p, x: p["w"] @ x, {"w": _rand_lora(KEY, (6, 5), "oi")}, _x((5, 3))),
    ("einsum_lhs_io", lambda p, x: jnp.einsum("io,bi->ob", p["w"], x),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("tied_out_contract", lambda p, h: h @ p["emb"].T,
     {"emb": _rand_lora(KEY, (11, 6), "io")}, _x((2, 3, 6))),
    ("tied_out_contract_lhs", lambda p, h: jnp.einsum("vd,btd->bvt", p["emb"], h),
     {"emb": _rand_lora(KEY, (11, 6), "io")}, _x((2, 3, 6))),
    ("batched_x", lambda p, x: jnp.einsum("btd,df->btf", x, p["w"]),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((2, 3, 6))),
    ("einsum_3d_heads_out", lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["w"]),
     {"w": _rand_lora(KEY, (6, 2, 4), "ioo")}, _x((2, 3, 6))),
    ("einsum_3d_heads_in", lambda p, x: jnp.einsum("bthk,hkd->btd", x, p["w"]),
     {"w": _rand_lora(KEY, (2, 4, 6), "iio")}, _x((2, 3, 2, 4))),
    ("stacked_batch_dot", lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["w"]),
     {"w": _rand_lora(KEY, (3, 6, 5), "io")}, _x((3, 4, 6))),
    ("convert_bf16", lambda p, x: (x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
                                   ).astype(jnp.float32),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("transpose", lambda p, x: x @ p["w"].T, {"w": _rand_lora(KEY, (5, 6), "oi")}, _x((4, 6))),
    ("transpose_3d", lambda p, x: jnp.einsum("bi,hki->bhk", x, jnp.transpose(p["w"], (1, 2, 0))),
     {"w": _rand_lora(KEY, (6, 2, 4), "ioo")}, _x((4, 6))),
    ("reshape_out", lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(6, 2, 4)),
     {"w": _rand_lora(KEY, (6, 8), "io")}, _x((3, 6))),
    ("reshape_in", lambda p, x: x.reshape(3, 6) @ p["w"].reshape(6, 5),
     {"w": _rand_lora(KEY, (2, 3, 5), "iio")}, _x((3, 2, 3))),
    ("gather_embed", lambda p, ids: jnp.take(p["emb"], ids, axis=0),
     {"emb": _rand_lora(KEY, (11, 6), "io")}, jnp.array([[1, 5, 10], [0, 3, 3]])),
    ("index_embed", lambda p, ids: p["emb"][ids],
     {"emb": _rand_lora(KEY, (11, 6), "io")}, jnp.array([1, 5, 10, 0])),
    ("nested_jit", lambda p, x: jax.jit(lambda w, y: jnp.tanh(y @ w))(p["w"], x),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("scan_layers", lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0],
     {"w": _rand_lora(KEY, (3, 6, 6), "io")}, _x((4, 6))),
    ("scan_layers_reverse", lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), h.sum()),
                                                  x, p["w"], reverse=True)[0],
     {"w": _rand_lora(KEY, (3, 6, 6), "io")}, _x((4, 6))),
    ("cond", lambda p, x: lax.cond(x.sum() > 0, lambda w, y: y @ w, lambda w, y: -(y @ w),
                                   p["w"], x), {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("while", lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x),
     {"w": _rand_lora(KEY, (6, 6), "io")}, _x((4, 6))),
    ("remat", lambda p, x: jax.checkpoint(lambda w, y: jnp.sin(y @ w))(p["w"], x),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("vmap_inside", lambda p, x: jax.vmap(lambda y: y @ p["w"])(x),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
]


@jax.custom_jvp
def _cj_matmul(x, w):
  return jnp.tanh(x @ w)


@_cj_matmul.defjvp
def _cj_matmul_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = jnp.tanh(x @ w)
  return y, (1 - y**2) * (dx @ w + x @ dw)


@jax.custom_vjp
def _cv_matmul(x, w):
  return jnp.sin(x @ w)


def _cv_fwd(x, w):
  return jnp.sin(x @ w), (x, w)


def _cv_bwd(res, g):
  x, w = res
  gz = g * jnp.cos(x @ w)
  return gz @ w.T, x.T @ gz


_cv_matmul.defvjp(_cv_fwd, _cv_bwd)

CASES += [
    ("custom_jvp_weight", lambda p, x: _cj_matmul(x, p["w"]),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("custom_vjp_weight", lambda p, x: _cv_matmul(x, p["w"]),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
    ("custom_jvp_activation", lambda p, x: jax.nn.relu(x @ p["w"]) + jax.nn.gelu(x @ p["w"]),
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6))),
]

# Cases whose result needs the dense weight: they must still be correct and warn.
MATERIALIZING = [
    ("sum_of_weight", lambda p, x: x @ p["w"] + jnp.sum(p["w"]) * 0.1,
     {"w": _rand_lora(KEY, (6, 5), "io")}, _x((4, 6)), "reduce_sum"),
    ("elementwise", lambda p, x: x @ (p["w"] * 2.0), {"w": _rand_lora(KEY, (6, 5), "io")},
     _x((4, 6)), "mul"),
]


def _check_case(f, params, x, atol=1e-4, rtol=1e-4):
  want = f(lj.merge(params), x)
  got = lj.implicit(f)(params, x)
  chex.assert_trees_all_close(got, want, atol=atol, rtol=rtol)
  chex.assert_trees_all_equal_dtypes(got, want)   # a transform never changes the dtype
  chex.assert_trees_all_equal_shapes(got, want)
  adapter, frozen = lj.split(params)

  def loss(fn, ad):
    return jnp.sum(jnp.sin(fn(lj.combine(ad, frozen), x).astype(jnp.float32)))

  g_ref = jax.grad(lambda ad: loss(lambda p, y: f(lj.merge(p), y), ad))(adapter)
  g_impl = jax.grad(lambda ad: loss(lj.implicit(f), ad))(adapter)
  chex.assert_trees_all_close(g_impl, g_ref, atol=atol * 10, rtol=rtol * 10)
  return got


@pytest.mark.parametrize("name,f,params,x", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_materialized(name, f, params, x):
  tol = 3e-2 if "bf16" in name else 1e-4
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a factored rule must not fall back to materializing
    _check_case(f, params, x, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,f,params,x", CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_jit_equals_eager(name, f, params, x):
  eager = lj.implicit(f)(params, x)
  jitted = jax.jit(lj.implicit(f))(params, x)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,f,params,x,prim", MATERIALIZING,
                         ids=[c[0] for c in MATERIALIZING])
def test_unknown_primitive_materializes_with_one_warning(name, f, params, x, prim):
  with pytest.warns(UserWarning, match=rf"'{prim}' on LoraWeight") as rec:
    got = lj.implicit(f)(params, x)
    lj.implicit(f)(params, x)  # second call: no second warning
  assert sum(prim in str(w.message) for w in rec) == 1
  chex.assert_trees_all_close(got, f(lj.merge(params), x), atol=1e-4, rtol=1e-4)


def test_convert_keeps_leaf_implicit():
  lw = _rand_lora(KEY, (6, 5), "io")
  seen = {}

  def f(p, x):
    w16 = p.astype(jnp.bfloat16)
    return x.astype(jnp.bfloat16) @ w16

  # Walk the implicit jaxpr: the bf16 cast must be applied to w, a and b (small),
  # and no (6, 5) array may be produced by anything but a cast of w.
  jaxpr = jax.make_jaxpr(lj.implicit(f))(lw, _x((4, 6)))
  for eqn in jaxpr.eqns:
    seen.setdefault(eqn.primitive.name, []).append([tuple(v.aval.shape) for v in eqn.outvars])
  assert [(6, 3)] in seen["convert_element_type"] and [(3, 5)] in seen["convert_element_type"]
  dots = dot_output_shapes(jaxpr)
  assert dots and (6, 5) not in dots


def test_bad_factor_shapes_raise_with_shapes():
  w = jnp.zeros((6, 5))
  with pytest.raises(ValueError, match=r"w \(6, 5\).*expected a \(6, 3\) and b \(3, 5\)"):
    lj.LoraWeight(w=w, a=jnp.zeros((5, 3)), b=jnp.zeros((3, 5)), axes="io")
  with pytest.raises(ValueError, match="axes"):
    lj.LoraWeight(w=w, a=jnp.zeros((6, 3)), b=jnp.zeros((3, 5)), axes="ix")


def test_lora_weight_is_pytree_with_static_metadata():
  lw = _rand_lora(KEY, (6, 5), "io", scale=0.25)
  leaves, treedef = jax.tree.flatten(lw)
  assert len(leaves) == 3  # w, a, b; rng None; scale/axes/dropout are static
  back = jax.tree.unflatten(treedef, leaves)
  assert back.scale == 0.25 and back.axes == "io"

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(p, x):
    return lj.implicit(lambda w, y: y @ w)(p, x)

  for s in range(3):
    f(dataclasses.replace(lw, a=lw.a + s), _x((4, 6), key=s))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("xshape", [(4, 6), (2, 3, 6)])
def test_gradients_wrt_everything(fuse, xshape, monkeypatch):
  """x, w, a and b all get the materialized reference's gradients, on the fused
  one-GEMM path and on the general path."""
  from lora_jax import _lora_weight
  monkeypatch.setattr(_lora_weight, "_FUSE", [fuse])
  lw = _rand_lora(KEY, (6, 5), "io")
  x = _x(xshape)

  def loss(fn, w, a, b, x):
    p = lj.LoraWeight(w=w, a=a, b=b, scale=lw.scale, axes="io")
    return jnp.sum(jnp.sin(fn(p, x)))

  f = lambda p, y: y @ p  # noqa: E731
  args = (lw.w, lw.a, lw.b, x)
  g = jax.grad(lambda *a: loss(lj.implicit(f), *a), argnums=(0, 1, 2, 3))(*args)
  g_ref = jax.grad(lambda *a: loss(lambda p, y: f(p.materialize(), y), *a),
                   argnums=(0, 1, 2, 3))(*args)
  chex.assert_trees_all_close(g, g_ref, atol=1e-4, rtol=1e-4)
  jaxpr = str(jax.make_jaxpr(lj.implicit(f))(lw, x))
  assert ("concatenate" in jaxpr) == fuse  # the fused path is the one taken


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("shape,axes,spec,xshape", [
    ((6, 2, 4), "ioo", "btd,dhk->bthk", (2, 3, 6)),      # DenseGeneral q/k/v projection
    ((2, 4, 6), "iio", "bthk,hkd->btd", (2, 3, 2, 4)),   # DenseGeneral o projection
])
def test_nd_kernels_take_the_fused_path_with_exact_gradients(fuse, shape, axes, spec, xshape,
                                                             monkeypatch):
  """N-D kernels whose in axes lead are fused as their 2-D view: outputs and gradients
  of x, w, a and b equal the materialized reference."""
  from lora_jax import _lora_weight
  monkeypatch.setattr(_lora_weight, "_FUSE", [fuse])
  lw = _rand_lora(KEY, shape, axes)
  x = _x(xshape)
  f = lambda p, y: jnp.einsum(spec, y, p)  # noqa: E731

  def loss(fn, w, a, b, x):
    p = lj.LoraWeight(w=w, a=a, b=b, scale=lw.scale, axes=axes)
    return jnp.sum(jnp.sin(fn(p, x)))

  args = (lw.w, lw.a, lw.b, x)
  g = jax.grad(lambda *a: loss(lj.implicit(f), *a), argnums=(0, 1, 2, 3))(*args)
  g_ref = jax.grad(lambda *a: loss(lambda p, y: f(p.materialize(), y), *a),
                   argnums=(0, 1, 2, 3))(*args)
  chex.assert_trees_all_close(g, g_ref, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(lj.implicit(f)(lw, x), f(lw.materialize(), x),
                              atol=1e-4, rtol=1e-4)
  jaxpr = str(jax.make_jaxpr(lj.implicit(f))(lw, x))
  assert ("_fused_lora_matmul" in jaxpr) == fuse
