"""LoRA through `jax.lax.ragged_dot` (grouped matmuls: routed experts).

`ragged_dot(x, W, group_sizes)` multiplies consecutive row groups of `x (N, in)` by the
matching `W[g] (in, out)` of a stacked `W (G, in, out)`. For `W` a `LoraWeight` whose
one stacked axis is the group axis (one adapter per expert),

    ragged_dot(x, W + s A @ B) = ragged_dot(x, W) + s * ragged_dot(ragged_dot(x, A), B)

with `A (G, in, r)`, `B (G, r, out)`: two skinny grouped matmuls, never `A @ B`. `x @ W`
goes to the base's own rules (a quantized base keeps its path, or materializes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax._implicit import ImplicitArray, bind, register_rule
from lora_jax._lora_weight import LoraWeight, _lora_dropout


def _ragged_primitive():
  """`ragged_dot_general`'s primitive, read off a traced call (it is not exported)."""
  x = jax.ShapeDtypeStruct((2, 2), jnp.float32)
  w = jax.ShapeDtypeStruct((1, 2, 2), jnp.float32)
  g = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.make_jaxpr(jax.lax.ragged_dot)(x, w, g).eqns[0].primitive


RAGGED_DOT_P = _ragged_primitive()


def _standard(dn) -> bool:
  """The layout `jax.lax.ragged_dot` binds: x (N, in) ragged on N, W (G, in, out)."""
  (lc, rc), (lb, rb) = dn.dot_dimension_numbers
  return (tuple(lc) == (1,) and tuple(rc) == (1,) and not lb and not rb
          and tuple(dn.lhs_ragged_dimensions) == (0,) and tuple(dn.rhs_group_dimensions) == (0,))


@register_rule(RAGGED_DOT_P, LoraWeight)
def _ragged_dot_rule(prim, x, lw, group_sizes, **params):
  if (isinstance(x, ImplicitArray) or not isinstance(lw, LoraWeight) or lw.nbatch != 1
      or lw.axes != "io" or not _standard(params["ragged_dot_dimension_numbers"])):
    return NotImplemented
  base = bind(prim, x, lw.w, group_sizes, **params)
  dt = x.dtype
  xd = _lora_dropout(lw, x, ())
  t = prim.bind(xd, lw.a.astype(dt), group_sizes, **params)
  t = (t * jnp.asarray(lw.scale, t.dtype)).astype(dt)
  y = prim.bind(t, lw.b.astype(dt), group_sizes, **params)
  return base + y.astype(base.dtype)


__all__ = ["RAGGED_DOT_P"]
