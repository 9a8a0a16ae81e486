"""`implicit(fn)`: run any pure JAX function on implicit (factored) array leaves.

An `ImplicitArray` stands for a dense array it never has to build: a LoRA weight
`W + s * A @ B`, a quantized weight, ... `implicit(fn)` traces `fn` with each
implicit argument replaced by its abstract dense shape, then evaluates the jaxpr
equation by equation. An equation that consumes an implicit value is handed to
the rule registered for `(primitive, type(value))`; a rule computes the result
in factored form, returns a new implicit value, or returns `NotImplemented`, in
which case the value is materialized (with one warning naming the primitive and
the class) and the primitive bound as usual. Higher-order primitives (`jit`,
`scan`, `cond`, `while`, `remat`, `custom_jvp_call`, `custom_vjp_call`) are
rebuilt with their inner jaxpr interpreted, so structure, sharding and memory
behaviour survive.

The interpreter knows no concrete leaf type: each type registers its own rules
with `register_rule`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax import lax
from jax import tree_util as jtu
from jax.extend import core as jcore
from jax.extend.core import primitives as P

Rule = Callable[..., Any]

# (primitive, class) -> rule(primitive, *invals, **params)
_RULES: dict[tuple[jcore.Primitive, type], Rule] = {}
# primitive -> handler(eqn_params, invals) for higher-order primitives; these
# are generic over the implicit leaf type.
_HIGHER_ORDER: dict[jcore.Primitive, Callable[..., Any]] = {}
_WARNED: set[tuple[str, str]] = set()


class ImplicitArray:
  """Base class of array-like leaves that `implicit` computes with in factored form.

  Subclasses are frozen dataclasses registered as pytrees (array children as data
  fields, static settings as metadata), define `shape` and `dtype` of the dense
  array they stand for, and `materialize()` that builds it. All array children
  share the logical array's leading batch dims, so `scan` and `vmap` slice them.
  """

  shape: tuple[int, ...]
  dtype: Any

  def materialize(self) -> jax.Array:
    raise NotImplementedError

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def aval(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.shape, self.dtype)

  def __jax_array__(self):
    # Lets code outside `implicit` use the leaf as a plain array (slowly).
    return self.materialize()

  def partition_specs(self, spec):
    """This leaf with each array child replaced by its `PartitionSpec`, given the spec
    `spec` (one entry per logical axis) of the dense array it stands for."""
    raise NotImplementedError(
        f"{type(self).__name__} does not define partition_specs, so lj.partition_specs "
        "cannot shard it; define it to map the dense array's spec to its children's")


def is_implicit(x: Any) -> bool:
  return isinstance(x, ImplicitArray)


def materialize(x: Any) -> Any:
  """Dense form of an implicit value; anything else is returned unchanged."""
  return x.materialize() if isinstance(x, ImplicitArray) else x


def materialize_tree(tree: Any) -> Any:
  """Every implicit leaf of `tree` replaced by its dense array."""
  return jax.tree.map(materialize, tree, is_leaf=is_implicit)


def register_rule(primitive: jcore.Primitive, cls: type) -> Callable[[Rule], Rule]:
  """Decorator: `rule(primitive, *invals, **params)` for `primitive` on `cls` leaves.

  The rule returns the primitive's result (a list when the primitive has multiple
  results), possibly implicit, or `NotImplemented` to fall back to materializing.
  """
  def deco(rule: Rule) -> Rule:
    _RULES[(primitive, cls)] = rule
    return rule
  return deco


def _lookup(primitive, cls) -> Rule | None:
  for base in cls.__mro__:
    rule = _RULES.get((primitive, base))
    if rule is not None:
      return rule
  return None


def _warn_materialize(primitive, cls) -> None:
  key = (primitive.name, cls.__name__)
  if key not in _WARNED:
    _WARNED.add(key)
    warnings.warn(
        f"lora_jax.implicit: no rule for primitive '{primitive.name}' on "
        f"{cls.__name__}; materializing the dense array (correct, but not factored).",
        stacklevel=3)


def bind(primitive: jcore.Primitive, *invals: Any, **params: Any) -> Any:
  """Apply `primitive` to values that may be implicit, dispatching to rules.

  Rules use this to apply a primitive to children that may themselves be
  implicit (a LoRA weight whose base is quantized).
  """
  implicit_vals = [x for x in invals if isinstance(x, ImplicitArray)]
  if not implicit_vals:
    return primitive.bind(*invals, **params)
  tried = set()
  for x in implicit_vals:
    cls = type(x)
    if cls in tried:
      continue
    tried.add(cls)
    rule = _lookup(primitive, cls)
    if rule is None:
      continue
    out = rule(primitive, *invals, **params)
    if out is not NotImplemented:
      return out
  for cls in tried:
    _warn_materialize(primitive, cls)
  return primitive.bind(*[materialize(x) for x in invals], **params)


def _eval_jaxpr(jaxpr: jcore.Jaxpr, consts, args) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, val):
    if not isinstance(v, jcore.DropVar):
      env[v] = val

  for v, val in zip(jaxpr.constvars, consts):
    write(v, val)
  for v, val in zip(jaxpr.invars, args):
    write(v, val)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
      if any(isinstance(x, ImplicitArray) for x in invals):
        handler = _HIGHER_ORDER.get(eqn.primitive)
        if handler is not None:
          out = handler(eqn, params, invals)
        else:
          out = _bind_with_context(eqn, params, invals)
      else:
        out = eqn.primitive.bind(*invals, **params)
    if eqn.primitive.multiple_results:
      for v, val in zip(eqn.outvars, out):
        write(v, val)
    else:
      write(eqn.outvars[0], out)
  return [read(v) for v in jaxpr.outvars]


def _bind_with_context(eqn, params, invals):
  try:
    return bind(eqn.primitive, *invals, **params)
  except (TypeError, ValueError) as e:
    leaves = [f"{type(x).__name__}{tuple(x.shape)}:{np.dtype(x.dtype).name}"
              for x in invals if isinstance(x, ImplicitArray)]
    raise type(e)(f"lora_jax.implicit: primitive '{eqn.primitive.name}' on "
                  f"{', '.join(leaves)} failed: {e}") from e


def _closed_fun(closed: jcore.ClosedJaxpr, materialize_out: bool = False) -> Callable:
  def fun(*args):
    out = _eval_jaxpr(closed.jaxpr, closed.consts, args)
    return [materialize(o) for o in out] if materialize_out else out
  return fun


# ----------------------------------------------------------------------------
# Higher-order primitives: rebuilt with their inner jaxpr interpreted.

def _jit_handler(eqn, params, invals):
  closed = params["jaxpr"]
  fun = _closed_fun(closed)
  fun.__name__ = params.get("name", "inner")
  return jax.jit(fun)(*invals)


def _scan_handler(eqn, params, invals):
  closed = params["jaxpr"]
  nc, ncarry = params["num_consts"], params["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  init = [materialize(c) for c in init]  # a carry changes every step: keep it dense

  def body(carry, x):
    out = _eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *x])
    out = [materialize(o) for o in out]
    return out[:ncarry], out[ncarry:]

  carry, ys = lax.scan(body, init, xs, length=params["length"],
                       reverse=params["reverse"], unroll=params["unroll"])
  return [*carry, *ys]


def _cond_handler(eqn, params, invals):
  index, ops = invals[0], invals[1:]
  branches = [_closed_fun(br, materialize_out=True) for br in params["branches"]]
  return lax.switch(index, branches, *ops)


def _while_handler(eqn, params, invals):
  cn, bn = params["cond_nconsts"], params["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  cond_j, body_j = params["cond_jaxpr"], params["body_jaxpr"]

  def cond_fun(carry):
    return _eval_jaxpr(cond_j.jaxpr, cond_j.consts, [*cconsts, *carry])[0]

  def body_fun(carry):
    out = _eval_jaxpr(body_j.jaxpr, body_j.consts, [*bconsts, *carry])
    return [materialize(o) for o in out]

  return lax.while_loop(cond_fun, body_fun, [materialize(c) for c in init])


def _remat_handler(eqn, params, invals):
  jaxpr = params["jaxpr"]
  fun = jax.checkpoint(lambda *a: _eval_jaxpr(jaxpr, [], a),
                       prevent_cse=params["prevent_cse"], policy=params["policy"])
  return fun(*invals)


def _dense_and_tangents(primals, tangents):
  """Dense values of `primals` and the matching dense tangents (linear in tangents)."""
  return jax.jvp(lambda *p: [materialize(x) for x in p], tuple(primals), tuple(tangents))


def _custom_jvp_handler(eqn, params, invals):
  # Primal: the inner function interpreted, so implicit leaves stay factored.
  # Derivative: the user's own jvp rule on the dense values (the rule was written
  # for plain arrays), fed the dense tangent of each implicit leaf.
  prim = eqn.primitive
  closed = eqn.params["call_jaxpr"]

  def original(*dense):
    return prim.bind(*dense, **params)

  @jax.custom_jvp
  def fun(*args):
    return _eval_jaxpr(closed.jaxpr, closed.consts, args)

  @fun.defjvp
  def fun_jvp(primals, tangents):
    dense_p, dense_t = _dense_and_tangents(primals, tangents)
    return jax.jvp(original, tuple(dense_p), tuple(dense_t))

  return fun(*invals)


def _custom_vjp_handler(eqn, params, invals):
  prim = eqn.primitive
  closed = eqn.params["call_jaxpr"]

  def original(*dense):
    return prim.bind(*dense, **params)

  @jax.custom_vjp
  def fun(*args):
    return _eval_jaxpr(closed.jaxpr, closed.consts, args)

  def fwd(*args):
    dense, mat_vjp = jax.vjp(lambda *p: [materialize(x) for x in p], *args)
    out, inner_vjp = jax.vjp(original, *dense)
    return out, (mat_vjp, inner_vjp)

  def bwd(res, g):
    mat_vjp, inner_vjp = res
    return mat_vjp(list(inner_vjp(g)))

  fun.defvjp(fwd, bwd)
  return fun(*invals)


_HIGHER_ORDER.update({
    P.jit_p: _jit_handler,
    P.scan_p: _scan_handler,
    P.cond_p: _cond_handler,
    P.while_p: _while_handler,
    P.remat_p: _remat_handler,
    P.custom_jvp_call_p: _custom_jvp_handler,
    P.custom_vjp_call_p: _custom_vjp_handler,
})


# ----------------------------------------------------------------------------
# The transform.

def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, ImplicitArray))


def _abstract(x: ImplicitArray) -> jax.ShapeDtypeStruct:
  try:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  except AttributeError as e:
    raise TypeError(
        f"lora_jax.implicit: a {type(x).__name__} argument is incomplete ({e}); "
        "an adapter tree from lj.split has no base weights: pass "
        "lj.combine(adapter, frozen) to the transformed function") from None


def implicit(fn: Callable, *, materialize_outputs: bool = True) -> Callable:
  """Transform `fn` so it accepts `ImplicitArray` leaves anywhere in its arguments.

  Args:
    fn: a pure function written for plain arrays (a Flax `apply`, an NNX call
      through `nnx.merge`, a hand-written model, ...).
    materialize_outputs: return dense arrays where `fn` returns an implicit leaf.

  Returns:
    A function with the signature of `fn`. Array leaves are traced; implicit
    leaves are seen by `fn` as dense arrays of their shape and dtype, and every
    use of them goes through the rule registry; other leaves (ints, strings,
    config objects) are static.

  Example:
    >>> y = lj.implicit(model.apply)(lora_params, x)  # x @ W + s * (x @ A) @ B
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    leaves, treedef = jtu.tree_flatten((args, kwargs), is_leaf=is_implicit)
    # leaves that are only a wrapper (a fully trained weight) are their value
    leaves = [x.materialize() if getattr(x, "materialize_is_free", False) else x
              for x in leaves]
    dynamic_idx = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    dynamic = [leaves[i] for i in dynamic_idx]
    abstract = [_abstract(x) if is_implicit(x) else x for x in dynamic]

    def flat_fn(*dyn):
      full = list(leaves)
      for i, x in zip(dynamic_idx, dyn):
        full[i] = x
      a, k = jtu.tree_unflatten(treedef, full)
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*abstract)
    out_flat = _eval_jaxpr(closed.jaxpr, closed.consts, dynamic)
    if materialize_outputs:
      out_flat = [materialize(o) for o in out_flat]
    out_tree = jtu.tree_structure(out_shape)
    return jtu.tree_unflatten(out_tree, out_flat)

  return wrapped


__all__ = ["ImplicitArray", "implicit", "register_rule", "bind", "materialize",
           "materialize_tree", "is_implicit"]

