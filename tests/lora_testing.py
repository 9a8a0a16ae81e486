"""Helpers shared by the tests."""

import dataclasses

import jax

import lora_jax as lj


def randomize_b(params, key=jax.random.key(0), std=0.1):
  """Fresh adapters have b = 0; give every LoRA (or DoRA) leaf's b values so that the
  low-rank branch matters. Leaf i (flattening order) draws from fold_in(key, i + 1)."""
  count = [0]

  def fill(x):
    if isinstance(x, lj.LowRankWeight):
      count[0] += 1
      k = jax.random.fold_in(key, count[0])
      return dataclasses.replace(x, b=std * jax.random.normal(k, x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, lj.LowRankWeight))
