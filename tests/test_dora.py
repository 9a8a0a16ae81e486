"""`DoraWeight`: PEFT's DoRA weight `m * (W + s A B) / ||W + s A B||_c`, its factored
`implicit` rule (outputs and gradients equal the dense reference, no `A @ B` built),
and its place in the LoRA tree utilities."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.extend import core as jcore

import lora_jax as lj
from lora_jax._dora import DoraWeight, dora_from_lora, to_dora


def _dora(key, shape, rank=3, scale=0.7, dtype=jnp.float32):
  """Random DoRA weight with a random magnitude; shape (*batch, in, out)."""
  kw, ka, kb, km = jax.random.split(key, 4)
  *batch, din, dout = shape
  w = jax.random.normal(kw, shape, dtype)
  a = jax.random.normal(ka, (*batch, din, rank), dtype)
  b = jax.random.normal(kb, (*batch, rank, dout), dtype)
  m = jax.random.uniform(km, (*batch, dout), dtype, 0.5, 2.0)
  return DoraWeight(w=w, a=a, b=b, m=m, scale=scale, axes="io")


def _reference(dw):
  """numpy, PEFT's formula in torch layout: W (out, in), norm over dim=1."""
  w = np.asarray(dw.w, np.float64)
  a = np.asarray(dw.a, np.float64)
  b = np.asarray(dw.b, np.float64)
  wt = np.swapaxes(w, -1, -2) + dw.scale * np.swapaxes(a @ b, -1, -2)    # (.., out, in)
  norm = np.linalg.norm(wt, axis=-1)                                       # (.., out)
  mt = (np.asarray(dw.m, np.float64) / norm)[..., :, None] * wt
  return np.swapaxes(mt, -1, -2)                                           # (.., in, out)


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(7, 3), (2, 9)]), rank=st.sampled_from([1, 2]),
       scale=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_materialize_is_peft_formula(shape, rank, scale, seed):
  dw = _dora(jax.random.key(seed), shape, rank, scale)
  np.testing.assert_allclose(np.asarray(_materialize(dw)), _reference(dw), rtol=1e-4, atol=1e-5)
  # the factored column norm equals the dense one
  dense = np.linalg.norm(np.asarray(dw.w) + scale * np.asarray(dw.a) @ np.asarray(dw.b), axis=0)
  np.testing.assert_allclose(np.asarray(_column_norm(dw)), dense, rtol=1e-4, atol=1e-5)


_materialize = jax.jit(lambda d: d.materialize())
_column_norm = jax.jit(lambda d: d.column_norm())


def test_materialize_stacked():
  dw = _dora(jax.random.key(1), (3, 5, 4))
  np.testing.assert_allclose(np.asarray(_materialize(dw)), _reference(dw), rtol=1e-5, atol=1e-5)


def _loss(params, x):
  h = jnp.tanh(x @ params["w"])
  return jnp.sum(h * h)


@pytest.mark.parametrize("xshape", [(4, 6), (2, 3, 6)])
def test_implicit_forward_and_grads_equal_dense(xshape):
  dw = _dora(jax.random.key(2), (6, 5))
  x = jax.random.normal(jax.random.key(3), xshape)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # no materialize fallback
    y = jax.jit(lj.implicit(lambda p, x: x @ p["w"]))({"w": dw}, x)
  chex.assert_trees_all_close(y, x @ dw.materialize(), atol=1e-5, rtol=1e-5)
  # gradients with respect to a, b, m: the norm is a constant (PEFT's detach)
  adapter, frozen = lj.split({"w": dw})
  g_impl = jax.grad(lambda ad: lj.implicit(_loss)(lj.combine(ad, frozen), x))(adapter)
  g_ref = jax.grad(lambda ad: _loss({"w": lj.combine(ad, frozen)["w"].materialize()}, x))(adapter)
  chex.assert_trees_all_close(g_impl, g_ref, atol=1e-4, rtol=1e-4)
  gm = g_impl["w"].m
  assert gm is not None and float(jnp.abs(gm).max()) > 0


def _torch_reference_grads(dw, x):
  torch = pytest.importorskip("torch")
  peft_dora = pytest.importorskip("peft.tuners.lora.dora")
  w = torch.tensor(np.asarray(dw.w).T.copy())                       # (out, in)
  lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
  lin.weight.data = w
  A = torch.nn.Linear(w.shape[1], dw.rank, bias=False)
  B = torch.nn.Linear(dw.rank, w.shape[0], bias=False)
  A.weight.data = torch.tensor(np.asarray(dw.a).T.copy())
  B.weight.data = torch.tensor(np.asarray(dw.b).T.copy())
  layer = peft_dora.DoraLinearLayer(fan_in_fan_out=False)
  layer.update_layer(base_layer=lin, lora_A=A.weight, lora_B=B.weight, scaling=dw.scale)
  layer.weight.data = torch.tensor(np.asarray(dw.m).copy())
  xt = torch.tensor(np.asarray(x))
  y = lin(xt) + layer(xt, lora_A=A, lora_B=B, scaling=dw.scale, base_layer=lin,
                      base_result=lin(xt))
  loss = (torch.tanh(y) ** 2).sum()
  loss.backward()
  return (y.detach().numpy(), A.weight.grad.numpy().T, B.weight.grad.numpy().T,
          layer.weight.grad.numpy())


@pytest.mark.interop
def test_forward_and_grads_match_peft_dora_layer():
  dw = _dora(jax.random.key(4), (6, 5), rank=2, scale=1.5)
  x = jax.random.normal(jax.random.key(5), (4, 6))
  y_ref, ga, gb, gm = _torch_reference_grads(dw, x)
  y = lj.implicit(lambda p, x: x @ p["w"])({"w": dw}, x)
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5, rtol=1e-5)
  adapter, frozen = lj.split({"w": dw})
  g = jax.grad(lambda ad: lj.implicit(_loss)(lj.combine(ad, frozen), x))(adapter)["w"]
  np.testing.assert_allclose(np.asarray(g.a), ga, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(g.b), gb, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(g.m), gm, atol=1e-4, rtol=1e-4)


def test_rule_never_builds_a_at_b():
  din, dout, r = 12, 10, 3
  dw = _dora(jax.random.key(6), (din, dout), rank=r)
  x = jnp.ones((7, din))
  f = lj.implicit(lambda p, x: x @ p["w"])
  jaxpr = jax.make_jaxpr(lambda d, x: f({"w": d}, x))(dw, x)

  def dot_shapes(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        yield tuple(eqn.outvars[0].aval.shape)
      for sub in jcore.jaxprs_in_params(eqn.params):
        yield from dot_shapes(sub)
  shapes = list(dot_shapes(jaxpr.jaxpr))
  assert shapes, "no dot_general traced"
  assert (din, dout) not in shapes, shapes   # no (in, out) product: A @ B never formed
  assert all(r in s or s[-1] == dout for s in shapes), shapes


def test_scan_over_stacked_dora():
  dw = _dora(jax.random.key(7), (3, 5, 5), rank=2)
  x = jax.random.normal(jax.random.key(8), (4, 5))

  def f(p, x):
    def body(h, w):
      return jnp.tanh(h @ w), None
    return lax.scan(body, x, p["w"])[0]

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = jax.jit(lj.implicit(f))({"w": dw}, x)
  chex.assert_trees_all_close(y, f({"w": dw.materialize()}, x), atol=1e-5, rtol=1e-5)


def test_fresh_dora_is_identity_and_tree_utilities():
  params = {"w": jax.random.normal(jax.random.key(9), (6, 4)),
            "bias": jnp.zeros((4,))}
  lp = lj.init(jax.random.key(10), params, lj.LoraConfig(rank=2, alpha=4, targets="w"))
  dp = to_dora(lp)
  assert to_dora(dp)["w"] is dp["w"]   # DoRA leaves are left alone
  via_cfg = lj.init(jax.random.key(10), params,
                    lj.LoraConfig(rank=2, alpha=4, targets="w", use_dora=True))
  chex.assert_trees_all_close(via_cfg, dp)
  d = dp["w"]
  assert isinstance(d, DoraWeight) and d.m.shape == (4,)
  np.testing.assert_allclose(np.asarray(d.m), np.linalg.norm(np.asarray(params["w"]), axis=0),
                             rtol=1e-5)
  chex.assert_trees_all_close(lj.merge(dp)["w"], params["w"], atol=1e-5)
  # dora_from_lora with an explicit magnitude
  m2 = dora_from_lora(lp["w"], m=2 * d.m)
  chex.assert_trees_all_close(m2.materialize(), 2 * params["w"], atol=1e-5)
  mask = lj.trainable_mask(dp)
  assert mask["w"].a and mask["w"].b and mask["w"].m and not mask["w"].w
  adapter, frozen = lj.split(dp)
  assert adapter["w"].m is not None and frozen["w"].m is None
  back = lj.combine(adapter, frozen)
  chex.assert_trees_all_equal(back, dp)
  assert "trainable params: 24" in lj.summary(dp)   # a 12 + b 8 + m 4


def test_shape_errors_and_fallback_warning():
  dw = _dora(jax.random.key(11), (6, 5))
  with pytest.raises(ValueError, match=r"magnitude m \(4,\) does not fit w \(6, 5\)"):
    DoraWeight(w=dw.w, a=dw.a, b=dw.b, m=jnp.ones((4,)), scale=1.0)
  # an op without a DoRA rule (transpose) materializes, with one warning, correctly
  x = jnp.ones((3, 5))
  with pytest.warns(UserWarning, match="transpose.*DoraWeight"):
    y = lj.implicit(lambda p, x: x @ p["w"].T)({"w": dw}, x)
  chex.assert_trees_all_close(y, x @ dw.materialize().T, atol=1e-5)


def test_dtype_is_kept():
  dw = _dora(jax.random.key(12), (6, 5), dtype=jnp.bfloat16)
  x = jnp.ones((2, 6), jnp.bfloat16)
  y = lj.implicit(lambda p, x: x @ p["w"])({"w": dw}, x)
  assert y.dtype == jnp.bfloat16
  assert dw.materialize().dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(x.astype(jnp.float32) @ dw.materialize()
                                        .astype(jnp.float32)), rtol=5e-2, atol=5e-2)


def test_qdora_on_nf4_base_equals_dora_on_the_dequantized_base():
  """QDoRA: DoRA on a quantized base gives the outputs and adapter gradients (a, b, m)
  of DoRA on the dequantized base, with the codes kept packed."""
  import quantization as qz
  key = jax.random.key(7)
  base = {"k": jax.random.normal(key, (128, 48)) / 10}
  q = qz.quantize(base, qz.QuantConfig("nf4", 64, True))
  p = to_dora(lj.init(key, q, lj.LoraConfig(rank=4, alpha=8, targets="k")))
  p = {"k": DoraWeight(w=p["k"].w, a=p["k"].a, b=0.1 * jax.random.normal(key, p["k"].b.shape),
                       m=p["k"].m * 1.2, scale=p["k"].scale, axes=p["k"].axes)}
  dense = qz.dequantize(p)
  assert isinstance(p["k"].w, qz.QuantizedArray) and not isinstance(dense["k"].w, qz.QuantizedArray)
  x = jax.random.normal(key, (6, 128))
  f = lambda prm, x: jnp.tanh(x @ prm["k"])  # noqa: E731
  np.testing.assert_allclose(lj.implicit(f)(p, x), lj.implicit(f)(dense, x), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(lj.implicit(f)(p, x), f(lj.merge(dense), x), rtol=1e-4, atol=1e-5)
  ad, fr = lj.split(p)
  ad_d, fr_d = lj.split(dense)
  g = jax.grad(lambda a: jnp.sum(lj.implicit(f)(lj.combine(a, fr), x) ** 2))(ad)
  g_d = jax.grad(lambda a: jnp.sum(lj.implicit(f)(lj.combine(a, fr_d), x) ** 2))(ad_d)
  for f_ in ("a", "b", "m"):                # (the two trees differ only in their w node)
    np.testing.assert_allclose(getattr(g["k"], f_), getattr(g_d["k"], f_), rtol=1e-4,
                               atol=1e-5)
