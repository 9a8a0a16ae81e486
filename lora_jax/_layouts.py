"""Read each target kernel's axis layout ("lio", "ioo", ...) from the function using it.

`trace_layouts(fn, params, args, targets)` traces `fn(params, *args)` once and
follows each target leaf through casts, transposes and higher-order primitives
(jit, scan, remat, cond, while, custom_jvp/vjp) to its first `dot_general` or
`gather`: contracting axes are "i", the others "o", and axes that `scan` slices
off (or that are dot batch dims) are stacked-layer axes "l".
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax import tree_util as jtu
from jax.extend import core as jcore

from lora_jax import _paths
from lora_jax._implicit import is_implicit

_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "sharding_constraint",
                 "reduce_precision", "optimization_barrier"}


def trace_layouts(fn: Callable, params: Any, args: Sequence[Any],
                  targets: set[str]) -> Mapping[str, str]:
  """{path: layout} for the `targets` that reach a `dot_general` or `gather` in `fn`."""
  flat, treedef = jtu.tree_flatten_with_path(params, is_leaf=is_implicit)
  paths = [_paths.path_str(kp) for kp, _ in flat]
  leaves = [x for _, x in flat]
  dyn = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]
  abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in dyn]
  structure = jtu.tree_structure(params, is_leaf=is_implicit)

  def flat_fn(*xs):
    full = list(leaves)
    for i, x in zip(dyn, xs):
      full[i] = x
    return fn(jtu.tree_unflatten(structure, full), *args)

  closed = jax.make_jaxpr(flat_fn)(*abstract)
  ndims = {paths[i]: leaves[i].ndim for i in dyn}
  env = {v: (paths[i], tuple(range(leaves[i].ndim)))
         for v, i in zip(closed.jaxpr.invars, dyn) if paths[i] in targets}
  found: dict[str, str] = {}
  sliced: dict[str, set[int]] = {}
  _walk(closed.jaxpr, env, found, sliced, ndims)
  del treedef
  return found


def _letters(path, amap, ndim, contract, batch, sliced) -> str:
  out = []
  for ax in range(ndim):
    if ax in sliced.get(path, set()) or ax not in amap:
      out.append("l")
    else:
      pos = amap.index(ax)
      out.append("i" if pos in contract else "l" if pos in batch else "o")
  return "".join(out)


def _inner(j):
  return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _walk(jaxpr, env, found, sliced, ndims):
  for eqn in jaxpr.eqns:
    ins = [None if isinstance(v, jcore.Literal) else env.get(v) for v in eqn.invars]
    if not any(ins):
      continue
    name = eqn.primitive.name
    p = eqn.params
    if name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for src, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if src and src[0] not in found:
          path, amap = src
          found[path] = _letters(path, amap, ndims[path], set(c), set(b), sliced)
    elif name == "gather":
      src = ins[0]
      if src and src[0] not in found:
        path, amap = src
        dn = p["dimension_numbers"]
        found[path] = _letters(path, amap, ndims[path], set(dn.collapsed_slice_dims),
                               set(getattr(dn, "operand_batching_dims", ())), sliced)
    elif name in _PASS_THROUGH:
      if ins[0]:
        env[eqn.outvars[0]] = ins[0]
    elif name == "transpose":
      path, amap = ins[0]
      env[eqn.outvars[0]] = (path, tuple(amap[k] for k in p["permutation"]))
    elif name == "scan":
      nc, ncar = p["num_consts"], p["num_carry"]
      inner = _inner(p["jaxpr"])
      sub = {}
      for k, (v, src) in enumerate(zip(inner.invars, ins)):
        if not src:
          continue
        path, amap = src
        if k >= nc + ncar:  # xs: scan slices the leading axis off
          sliced.setdefault(path, set()).add(amap[0])
          src = (path, amap[1:])
        sub[v] = src
      _walk(inner, sub, found, sliced, ndims)
    elif name == "cond":
      for br in p["branches"]:
        inner = _inner(br)
        _walk(inner, {v: s for v, s in zip(inner.invars, ins[1:]) if s}, found, sliced, ndims)
    elif name == "while":
      cn, bn = p["cond_nconsts"], p["body_nconsts"]
      body = _inner(p["body_jaxpr"])
      body_ins = ins[cn:cn + bn] + ins[cn + bn:]
      _walk(body, {v: s for v, s in zip(body.invars, body_ins) if s}, found, sliced, ndims)
    else:
      for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = p.get(key)
        if j is None:
          continue
        inner = _inner(j)
        if len(inner.invars) == len(eqn.invars):
          _walk(inner, {v: s for v, s in zip(inner.invars, ins) if s}, found, sliced, ndims)
        break


__all__ = ["trace_layouts"]

