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

import dataclasses
import functools
import warnings
from typing import Any, Callable, ClassVar

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


# ----------------------------------------------------------------------------
# The leaf protocol: a leaf kind declares its children once, with their roles.

BASE, FROZEN, TRAINABLE, DATA, STATIC = "base", "frozen", "trainable", "data", "static"
ROLES = (BASE, FROZEN, TRAINABLE, DATA, STATIC)
_NO_DEFAULT = dataclasses.MISSING


def _field(role: str, default: Any = _NO_DEFAULT) -> Any:
  return dataclasses.field(default=default, metadata={"lora_jax_role": role})


def base(default: Any = _NO_DEFAULT) -> Any:
  """The dense weight this leaf adapts (`LoraWeight.w`); at most one per kind. Frozen;
  a plain array or itself implicit (a quantized base)."""
  return _field(BASE, default)


def frozen(default: Any = _NO_DEFAULT) -> Any:
  """Another frozen array child (packed codes, scales, a served bank of factors)."""
  return _field(FROZEN, default)


def trainable(default: Any = _NO_DEFAULT) -> Any:
  """An array child a trainer updates (LoRA `a`/`b`, DoRA `m`, a fully trained weight)."""
  return _field(TRAINABLE, default)


def data(default: Any = _NO_DEFAULT) -> Any:
  """An array child that is neither a parameter nor trained (a dropout key, adapter ids)."""
  return _field(DATA, default)


def static(default: Any = _NO_DEFAULT) -> Any:
  """Static metadata (hashable: `scale`, `axes`, `block_size`): part of the tree
  structure, so a change retraces and a Python scalar is never a leaf by accident."""
  return _field(STATIC, default)


@dataclasses.dataclass(frozen=True)
class LeafCount:
  """Parameters and bytes one leaf holds (for `lj.summary`)."""
  params: int
  bytes: int
  trainable_params: int
  trainable_bytes: int


def _size(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64))


def _count_child(x) -> LeafCount:
  if isinstance(x, ImplicitArray):
    return x.count()
  n = _size(x)
  return LeafCount(n, n * np.dtype(x.dtype).itemsize, 0, 0)


class ImplicitArray:
  """Base class of array-like leaves that `implicit` computes with in factored form.

  A leaf kind is declared once: a subclass lists its fields with their roles,

      class LoraWeight(lj.ImplicitArray):
        w: Any = lj.extend.base()        # the frozen weight it adapts
        a: Any = lj.extend.trainable()
        b: Any = lj.extend.trainable()
        scale: float = lj.extend.static(1.0)

  and becomes a frozen dataclass and a pytree (array children: every role but
  `static`; key paths name the fields). `__check_init__(self)` validates at
  construction (each class in the MRO that defines one), never on unflatten, so tree
  utilities may rebuild a leaf with placeholder children. The kind defines `shape`,
  `dtype` and `materialize()`; every array child shares the logical array's leading
  `nbatch` (stacked-layer) axes, so `scan`, `vmap` and the slicing rules cut every
  child alike.

  The rest of the library asks the protocol, never the class: `trainable_fields`
  (`lj.split`, `lj.trainable_mask`), `base_field` / `with_base` (`qz.quantize`
  quantizes the base inside any adapter leaf), `count()` (`lj.summary`),
  `with_rng(key)` (`lj.with_dropout_rng`), `partition_specs(spec)` (`lj.shard`).
  Rules are looked up for the exact class, then for the class named by
  `rules_from` (a kind that computes exactly like another), then the generic
  rules registered for `ImplicitArray` itself.
  """

  # Filled in by __init_subclass__ from the declaration.
  base_field: ClassVar[str | None] = None
  frozen_fields: ClassVar[tuple[str, ...]] = ()
  trainable_fields: ClassVar[tuple[str, ...]] = ()
  data_fields: ClassVar[tuple[str, ...]] = ()     # every array child, declaration order
  static_fields: ClassVar[tuple[str, ...]] = ()
  # A kind whose rules this one reuses (exact-class lookup otherwise).
  rules_from: ClassVar[type | None] = None
  # `implicit` unwraps the leaf before tracing (a wrapper with nothing to factor).
  materialize_is_free: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    dataclasses.dataclass(frozen=True)(cls)
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    for f in dataclasses.fields(cls):
      role = f.metadata.get("lora_jax_role")
      if role is None:
        raise TypeError(
            f"{cls.__name__}.{f.name}: declare the field with its role, one of "
            "lj.extend.base() / frozen() / trainable() / data() / static()")
      roles[role].append(f.name)
    if len(roles[BASE]) > 1:
      raise TypeError(f"{cls.__name__}: at most one base field, got {roles[BASE]}")
    cls.base_field = roles[BASE][0] if roles[BASE] else None
    cls.frozen_fields = tuple(roles[FROZEN])
    cls.trainable_fields = tuple(roles[TRAINABLE])
    cls.static_fields = tuple(roles[STATIC])
    cls.data_fields = tuple(f.name for f in dataclasses.fields(cls)
                            if f.metadata["lora_jax_role"] != STATIC)
    children, statics = cls.data_fields, cls.static_fields
    keys = tuple(jtu.GetAttrKey(n) for n in children)

    def flatten_with_keys(x):
      return ([(k, getattr(x, n)) for k, n in zip(keys, children)],
              tuple(getattr(x, n) for n in statics))

    def flatten(x):
      return [getattr(x, n) for n in children], tuple(getattr(x, n) for n in statics)

    def unflatten(meta, kids):
      # No __init__: validation runs once, at construction.
      new = object.__new__(cls)
      for n, v in zip(children, kids):
        object.__setattr__(new, n, v)
      for n, v in zip(statics, meta):
        object.__setattr__(new, n, v)
      return new

    jtu.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Run every `__check_init__` of the class and its bases (done at construction;
    call it on a leaf rebuilt from parts, e.g. after `lj.combine`)."""
    for klass in reversed(type(self).__mro__):
      check = klass.__dict__.get("__check_init__")
      if check is not None:
        check(self)

  # --- the logical array: by default the base weight's shape and dtype
  @property
  def shape(self) -> tuple[int, ...]:
    if self.base_field is None:
      raise NotImplementedError(f"{type(self).__name__} has no base field: define shape")
    return tuple(getattr(self, self.base_field).shape)

  @property
  def dtype(self) -> Any:
    if self.base_field is None:
      raise NotImplementedError(f"{type(self).__name__} has no base field: define dtype")
    return getattr(self, self.base_field).dtype

  def materialize(self) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} does not define materialize()")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def aval(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.shape, self.dtype)

  @property
  def nbatch(self) -> int:
    """Leading axes (stacked layers) that every array child shares."""
    return 0

  def __jax_array__(self):
    # Lets code outside `implicit` use the leaf as a plain array (slowly).
    return self.materialize()

  # --- the protocol
  def with_base(self, new_base: Any) -> "ImplicitArray":
    """This leaf with its base weight replaced (`qz.quantize` quantizes it)."""
    if self.base_field is None:
      raise TypeError(f"{type(self).__name__} has no base weight")
    return dataclasses.replace(self, **{self.base_field: new_base})

  def frozen_base(self) -> Any:
    """The base weight this leaf adapts, or None for a kind that has none."""
    return None if self.base_field is None else getattr(self, self.base_field)

  def replace_children(self, **children: Any) -> "ImplicitArray":
    """A copy with some children replaced, without validation (for trees of specs,
    masks or placeholders that have this leaf's structure)."""
    new = object.__new__(type(self))
    for f in dataclasses.fields(self):
      object.__setattr__(new, f.name, children.get(f.name, getattr(self, f.name)))
    return new

  def count(self) -> LeafCount:
    """Parameters and bytes of this leaf. The base counts as its logical array (its
    own `count()` when implicit); frozen and trainable children by their sizes; a kind
    without a base whose frozen children encode the array (packed codes) counts its
    logical size; `data` children (keys, ids) do not count."""
    tn = sum(_size(getattr(self, n)) for n in self.trainable_fields
             if getattr(self, n) is not None)
    tb = sum(_size(x) * np.dtype(x.dtype).itemsize
             for x in (getattr(self, n) for n in self.trainable_fields) if x is not None)
    frozen_arrays = [x for n in self.frozen_fields
                     for x in jax.tree.leaves(getattr(self, n))]
    fb = sum(_size(x) * np.dtype(x.dtype).itemsize for x in frozen_arrays)
    if self.base_field is not None:
      bc = _count_child(getattr(self, self.base_field))
      n = bc.params + tn + sum(_size(x) for x in frozen_arrays)
      return LeafCount(n, bc.bytes + fb + tb, tn + bc.trainable_params,
                       tb + bc.trainable_bytes)
    n = (self.size if frozen_arrays else 0) + tn
    return LeafCount(n, fb + tb, tn, tb)

  def summary_label(self) -> str:
    """What `lj.summary` prints in its rank column for this leaf."""
    return type(self).__name__

  def with_rng(self, key: jax.Array) -> "ImplicitArray":
    """This leaf with a dropout key attached (`lj.with_dropout_rng`); unchanged by default."""
    del key
    return self

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
  Rules apply to `cls` itself, not to its subclasses (a subclass that computes the
  same way says so with `rules_from = cls`); a rule registered for `ImplicitArray`
  is generic and applies to every kind that has no rule of its own.
  """
  def deco(rule: Rule) -> Rule:
    _RULES[(primitive, cls)] = rule
    return rule
  return deco


def register_dot_rule(cls: type) -> Callable[[Rule], Rule]:
  """Decorator: the `dot_general` rule of `cls`, written once for the leaf on the right.

  `rule(prim, x, leaf, *, dimension_numbers, precision, preferred_element_type,
  **params)` computes `dot_general(x, leaf)`; `x` may itself be implicit. The case
  with the leaf on the left, `dot_general(leaf, x)`, is derived here: the operands
  and dimension numbers are swapped, the rule is called, and the free axes of the
  result are put back in `dot_general`'s order `(batch, lhs free, rhs free)`.
  """
  def deco(rule: Rule) -> Rule:
    def dot_rule(prim, lhs, rhs, *, dimension_numbers, **params):
      if isinstance(rhs, ImplicitArray) and _lookup(P.dot_general_p, type(rhs)) is dot_rule:
        return rule(prim, lhs, rhs, dimension_numbers=dimension_numbers, **params)
      (lc, rc), (lb, rb) = dimension_numbers
      y = rule(prim, rhs, lhs, dimension_numbers=((rc, lc), (rb, lb)), **params)
      if y is NotImplemented:
        return y
      nb = len(lb)
      n_rhs_free = len(rhs.shape) - len(rc) - len(rb)
      n_lhs_free = len(lhs.shape) - len(lc) - len(lb)
      perm = (*range(nb), *range(nb + n_rhs_free, nb + n_rhs_free + n_lhs_free),
              *range(nb, nb + n_rhs_free))
      return lax.transpose(y, perm)
    dot_rule.__wrapped__ = rule
    _RULES[(P.dot_general_p, cls)] = dot_rule
    return rule
  return deco


def _lookup(primitive, cls) -> Rule | None:
  seen = set()
  k = cls
  while k is not None and k not in seen:     # the class, then its rules_from chain
    seen.add(k)
    rule = _RULES.get((primitive, k))
    if rule is not None:
      return rule
    k = k.__dict__.get("rules_from")
  return _RULES.get((primitive, ImplicitArray))


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


__all__ = ["ImplicitArray", "LeafCount", "implicit", "register_rule", "register_dot_rule",
           "bind", "materialize", "materialize_tree", "is_implicit", "base", "frozen",
           "trainable", "data", "static"]

