"""Indexing the stacked-layer axes of an implicit leaf keeps it implicit.

Every implicit leaf's array children share the logical array's leading batch axes
(stacked layers; docs/ARCHITECTURE.md, "How `implicit` works"). So `params["layers"]["kernel"][i]`,
a `lax.dynamic_index_in_dim` in a `fori_loop` over layers, or a slice of a layer range
is the same operation on every child: `slice`, `dynamic_slice` and `squeeze` rules that
touch only those leading axes apply it child by child (recursively, for a quantized
base inside a LoRA weight) and return a leaf of the same class. Without them, a model
that loops over stacked layers by index would build every layer's dense `W + A @ B`.

The rules are registered for the `ImplicitArray` base class and need only `nbatch`
(the number of leading batch axes) from a leaf type.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
from jax.extend.core import primitives as P

from lora_jax._implicit import ImplicitArray, register_rule


def _nbatch(x: Any) -> int | None:
  return getattr(x, "nbatch", None) if isinstance(x, ImplicitArray) else None


def _map_children(x: ImplicitArray, fn, nb: int) -> ImplicitArray | None:
  """`fn(child, rest)` on every array child (recursing into implicit children), `rest`
  the child's axes after the `nb` batch axes; None when a nested leaf has other batch
  axes."""
  leaves, treedef = jax.tree_util.tree_flatten(
      x, is_leaf=lambda y: y is not x and isinstance(y, ImplicitArray))
  out = []
  for c in leaves:
    if isinstance(c, ImplicitArray):
      c = _map_children(c, fn, nb) if c.nbatch == nb else None
      if c is None:
        return None
      out.append(c)
    else:
      out.append(fn(c, tuple(c.shape[nb:])))
  return jax.tree_util.tree_unflatten(treedef, out)


def _or_not_implemented(y):
  return NotImplemented if y is None else y


@register_rule(P.slice_p, ImplicitArray)
def _slice_rule(prim, x, *, start_indices, limit_indices, strides):
  nb = _nbatch(x)
  if not nb:
    return NotImplemented
  shape = x.shape
  strides = strides or (1,) * len(shape)
  for k in range(nb, len(shape)):   # only the batch axes may be cut
    if start_indices[k] != 0 or limit_indices[k] != shape[k] or strides[k] != 1:
      return NotImplemented
  s, lim, st = start_indices[:nb], limit_indices[:nb], strides[:nb]
  return _or_not_implemented(_map_children(x, lambda c, rest: lax.slice(
      c, s + (0,) * len(rest), lim + rest, st + (1,) * len(rest)), nb))


@register_rule(P.dynamic_slice_p, ImplicitArray)
def _dynamic_slice_rule(prim, x, *starts, slice_sizes):
  nb = _nbatch(x)
  if not nb:
    return NotImplemented
  shape = x.shape
  if tuple(slice_sizes[nb:]) != tuple(shape[nb:]):
    return NotImplemented         # a full-size axis clamps its start to 0: ignore it
  s, sizes = list(starts[:nb]), tuple(slice_sizes[:nb])
  return _or_not_implemented(_map_children(x, lambda c, rest: lax.dynamic_slice(
      c, s + [0] * len(rest), sizes + rest), nb))


@register_rule(P.squeeze_p, ImplicitArray)
def _squeeze_rule(prim, x, *, dimensions):
  nb = _nbatch(x)
  if not nb or any(d >= nb or d < 0 for d in dimensions):
    return NotImplemented
  return _or_not_implemented(_map_children(x, lambda c, rest: lax.squeeze(c, dimensions), nb))
