"""Indexing stacked layers of an implicit leaf (x[i], a fori_loop over layers with a
dynamic index, a layer range) keeps it factored, for LoRA, DoRA, QLoRA and multi-LoRA
leaves: outputs and gradients equal the materialized reference, no warning, no dense
kernel."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
import quantization as qz
from jaxpr_walk import dot_output_shapes
from lora_testing import randomize_b

KEY = jax.random.key(0)
L, D = 3, 64


def _tree(kind):
  base = {"k": jax.random.normal(KEY, (L, D, D)) / 8}
  if kind == "qlora":
    base = qz.quantize(base, qz.QuantConfig("nf4", 32, True))
  p = lj.init(KEY, base, lj.LoraConfig(rank=4, targets="k", layouts={"k": "lio"}))
  p = randomize_b(p)
  return lj.to_dora(p) if kind == "dora" else p


def static_index(p, x):
  return jnp.tanh(x @ p["k"][1]) @ p["k"][2]


def fori_layers(p, x):
  return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ lax.dynamic_index_in_dim(
      p["k"], i, 0, keepdims=False)), x)


def layer_range(p, x):
  ks = p["k"][1:]
  return lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, ks)[0]


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("fn", [static_index, fori_layers, layer_range])
def test_indexing_stacked_layers_stays_factored(kind, fn):
  p = _tree(kind)
  x = jax.random.normal(KEY, (5, D))
  want = fn(lj.merge(qz.dequantize(p)), x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")            # no "materializing" warning
    got = jax.jit(lj.implicit(fn))(p, x)
    shapes = dot_output_shapes(jax.make_jaxpr(lj.implicit(fn))(p, x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert (D, D) not in shapes and (L, D, D) not in shapes
  adapter, frozen = lj.split(p)
  loss = lambda f, ad: jnp.sum(f(lj.combine(ad, frozen), x) ** 2)  # noqa: E731
  g = jax.grad(lambda ad: loss(lj.implicit(fn), ad))(adapter)
  g_ref = jax.grad(lambda ad: loss(lambda q, y: fn(lj.merge(qz.dequantize(q)), y), ad))(adapter)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-3, atol=1e-4)


def test_multi_lora_bank_indexed_by_layer():
  base = {"k": jax.random.normal(KEY, (L, D, D)) / 8}
  ads = [_tree("lora"), lj.init(jax.random.key(5), base, lj.LoraConfig(
      rank=2, targets="k", layouts={"k": "lio"}))]
  ids = jnp.array([1, 0, -1, 0])
  served = lj.with_adapter_ids(lj.stack_adapters(ads), ids)
  x = jax.random.normal(KEY, (4, D))
  got = jax.jit(lj.implicit(fori_layers))(served, x)
  for row, i in enumerate(np.asarray(ids)):
    ref = base if i < 0 else lj.merge(ads[i])
    np.testing.assert_allclose(got[row], fori_layers(ref, x[row:row + 1])[0], rtol=1e-4,
                               atol=1e-5)


def test_slicing_a_kernel_axis_still_materializes_correctly():
  p = _tree("lora")
  f = lambda p, x: x[:, :32] @ p["k"][0][:32]  # noqa: E731  (cuts an "in" axis)
  x = jax.random.normal(KEY, (2, D))
  from lora_jax import _implicit
  _implicit._WARNED.clear()          # the warning is given once per process
  with pytest.warns(UserWarning, match="materializing"):
    got = lj.implicit(f)(p, x)
  np.testing.assert_allclose(got, f(lj.merge(p), x), rtol=1e-5, atol=1e-5)
