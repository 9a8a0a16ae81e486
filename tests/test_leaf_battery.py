"""One conformance battery for every leaf kind.

Each kind (LoRA, DoRA, QLoRA NF4, QDoRA, multi-LoRA, a quantized leaf alone in either
layout, a fully trained `Trainable`, and a small kind defined here as a user would, through
`lora_jax.extend`) is one factory. Every case runs on every kind that supports it,
eager and under `jit`: `implicit(f)(params, x)` equals the reference computed on the
dense weights (values, dtypes, shapes), gradients with respect to the trainable parts
and to `x` equal the reference's, and for `x @ W`-like cases no `dot_general` in the
jaxpr (inner jaxprs included) produces an array of the kernel's shape.

A new leaf kind joins by adding one `Kind` to `KINDS`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
import quantization as qz
from jaxpr_walk import dot_output_shapes
from test_implicit_rules import _cj_matmul, _cv_matmul
from lora_jax import extend

BATCH = 4            # rows of x; the multi-LoRA bank serves one adapter per row
IDS = jnp.array([1, -1, 0, 1], jnp.int32)


# ----------------------------------------------------------------------------
# A leaf kind written outside the library, as the README shows leaf authors.

class ColumnScaled(lj.ImplicitArray):
  """`W * s`: a frozen kernel `(*L, in, out)` with a trainable scale per output column."""

  w: Any = extend.base()
  s: Any = extend.trainable()

  def __check_init__(self):
    if tuple(self.s.shape) != tuple(self.w.shape[:-2]) + tuple(self.w.shape[-1:]):
      raise ValueError(f"ColumnScaled: s {tuple(self.s.shape)} does not fit w "
                       f"{tuple(self.w.shape)}")

  shape = property(lambda self: tuple(self.w.shape))
  dtype = property(lambda self: self.w.dtype)
  nbatch = property(lambda self: len(self.w.shape) - 2)

  def materialize(self):
    return self.w * self.s[..., None, :]


@extend.register_dot_rule(ColumnScaled)
def _column_scaled_dot(prim, x, leaf, *, dimension_numbers, **params):
  """`x @ (W * s) = (x @ W) * s` when the kernel's out axis stays free and last."""
  (xc, wc), (xb, wb) = dimension_numbers
  nb = leaf.nbatch
  if tuple(wb) != tuple(range(nb)) or tuple(wc) != (nb,):
    return NotImplemented
  y = extend.bind(prim, lj.materialize(x), leaf.w, dimension_numbers=dimension_numbers,
                  **params)
  s = leaf.s.astype(y.dtype)
  return y * s.reshape(s.shape[:nb] + (1,) * (y.ndim - nb - 1) + s.shape[nb:])


# ----------------------------------------------------------------------------
# the kinds

def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float32)


def _lora(key, shape, axes="io", rank=3):
  kw, ka, kb = jax.random.split(key, 3)
  nb = len(shape) - len(axes)
  batch, kernel = shape[:nb], shape[nb:]
  ins = [d for d, ax in zip(kernel, axes) if ax == "i"]
  outs = [d for d, ax in zip(kernel, axes) if ax == "o"]
  return lj.LoraWeight(w=_normal(kw, shape), a=_normal(ka, (*batch, *ins, rank)),
                       b=_normal(kb, (*batch, rank, *outs), 0.5), scale=0.7, axes=axes)


def _dora(key, shape, axes="io"):
  lw = _lora(key, shape, axes)
  m = lw.column_norm() * (1.0 + 0.1 * jax.random.uniform(jax.random.fold_in(key, 7),
                                                         lw.column_norm().shape))
  return lj.to_dora({"w": lw})["w"].replace_children(m=m.astype(jnp.float32))


def _qbase(key, shape):
  return qz.quantize_array(_normal(key, shape), "nf4", 32, double_quant=True)


def _qlora(key, shape, axes="io"):
  return dataclasses.replace(_lora(key, shape, axes), w=_qbase(jax.random.fold_in(key, 3), shape))


def _qdora(key, shape, axes="io"):
  d = _dora(key, shape, axes)
  return d.with_base(_qbase(jax.random.fold_in(key, 3), shape))


def _multi(key, shape, axes="io"):
  base = {"w": _normal(key, shape)}
  trees = []
  for k in range(2):
    lw = _lora(jax.random.fold_in(key, k + 1), shape, axes, rank=2 + k)
    trees.append({"w": dataclasses.replace(lw, w=base["w"])})
  served = lj.with_adapter_ids(lj.stack_adapters(trees), IDS)
  return served["w"]


def _divisor(n, *prefer):
  return next((d for d in prefer if n % d == 0), 1)


def _qalora(key, shape, axes="io", base=None):
  """QA-LoRA: `a` has one row per group of 2 (or 3) inputs; group 1 where neither divides."""
  kw, ka, kb = jax.random.split(key, 3)
  *batch, k, n = shape
  g = _divisor(k, 2, 3)
  w = _normal(kw, shape) if base is None else base
  return lj.QALoraWeight(w=w, a=_normal(ka, (*batch, k // g, 2)),
                         b=_normal(kb, (*batch, 2, n), 0.5), scale=0.7, group_size=g)


def _group_base(key, shape):
  """A group-wise int4 kernel with zero points (groups of 2 or 3 inputs, or per channel)."""
  k = shape[-2]
  return qz.quantize_group_array(_normal(key, shape), bits=4, group_size=_divisor(k, 2, 3, k),
                                 symmetric=False)


def _iec(key, shape, axes="io", base=None):
  """IEC at rank 1 (the rank must divide in and out): mean of all inputs, repeat to all."""
  lw = _lora(key, shape, axes, rank=1)
  batch = shape[:-2]
  ka, kb = jax.random.split(jax.random.fold_in(key, 5))
  return lj.IecLoraWeight(w=lw.w if base is None else base, a=lw.a, b=lw.b, scale=lw.scale,
                          axes=axes, beta_a=_normal(ka, batch), beta_b=_normal(kb, batch))


def _trainable(key, shape, axes="io"):
  return lj.Trainable(_normal(key, shape))


def _column_scaled(key, shape, axes="io"):
  ks, kw = jax.random.split(key)
  return ColumnScaled(w=_normal(kw, shape),
                      s=1.0 + 0.3 * _normal(ks, (*shape[:-2], shape[-1])))


@dataclasses.dataclass(frozen=True)
class Kind:
  name: str
  make: Callable[..., Any]          # (key, shape, axes="io") -> leaf
  nd: bool = True                   # N-D kernels with layouts such as "ioo"
  tags: frozenset = frozenset({"dot", "dot_lhs", "out_contract", "convert", "transpose",
                               "reshape", "gather", "stacked", "control", "custom", "vmap"})
  rowwise: bool = False             # multi-LoRA: one weight per batch row


_COMPOSED = frozenset({"dot", "dot_lhs", "convert", "stacked"})

KINDS = [
    Kind("lora", _lora),
    Kind("dora", _dora),
    Kind("qlora_nf4", _qlora, nd=False),
    Kind("qdora_nf4", _qdora, nd=False),
    Kind("quantized", lambda key, shape, axes="io": _qbase(key, shape), nd=False),
    # bitsandbytes' layout: blocks over the flattened weight, crossing its rows; only the
    # cases whose rules read the layout (control flow is the interpreter's, layout-blind)
    Kind("quantized_flat", lambda key, shape, axes="io": qz.quantize_array(
        _normal(key, shape), "fp4", 32, double_quant=True, layout="flat"), nd=False,
         tags=frozenset({"dot", "dot_lhs", "out_contract", "convert", "gather", "stacked",
                         "vmap"})),
    Kind("group_int4", lambda key, shape, axes="io": _group_base(key, shape), nd=False),
    Kind("qalora", _qalora, nd=False),
    Kind("iec", _iec, nd=False),
    # the compositions: only the cases where the low-rank rule hands x @ w to the
    # quantized base's own rule (the rest is covered by each kind alone)
    Kind("qalora_int4", lambda key, shape, axes="io": _qalora(
        key, shape, base=_group_base(jax.random.fold_in(key, 3), shape)), nd=False,
         tags=_COMPOSED),
    Kind("iec_nf4", lambda key, shape, axes="io": _iec(
        key, shape, base=_qbase(jax.random.fold_in(key, 3), shape)), nd=False,
         tags=_COMPOSED),
    Kind("trainable", _trainable),
    Kind("column_scaled", _column_scaled, nd=False),
    # one weight per row: no dense form, so no user jvp/vjp rule can be fed one
    Kind("multi_lora", _multi, rowwise=True, tags=frozenset({"dot", "dot_lhs", "control"})),
]


def _x(shape, key=1):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


# ----------------------------------------------------------------------------
# the cases: (name, tag, f(p, x), kernel shape, axes, x, batch axis of the output)

# custom_jvp / custom_vjp matmuls shared with the LoRA rule battery
_cj, _cv = _cj_matmul, _cv_matmul


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  tag: str
  f: Callable
  shape: tuple
  x: Any
  axes: str = "io"
  out_batch: int = 0        # where the batch rows of x land in the output
  factored: bool = False    # no dot_general may produce an array of the kernel's shape
  nd: bool = False          # needs an N-D kernel layout


CASES = [
    Case("x@W", "dot", lambda p, x: x @ p["w"], (6, 5), _x((BATCH, 6)), factored=True),
    Case("x@W_3d_tokens", "dot", lambda p, x: jnp.einsum("btd,df->btf", x, p["w"]), (6, 5),
         _x((BATCH, 3, 6)), factored=True),
    Case("W^T@x^T", "dot_lhs", lambda p, x: jnp.einsum("io,bi->ob", p["w"], x), (6, 5),
         _x((BATCH, 6)), out_batch=1, factored=True),
    Case("einsum_heads_out", "dot", lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["w"]),
         (6, 2, 4), _x((BATCH, 3, 6)), axes="ioo", factored=True, nd=True),
    Case("einsum_heads_in", "dot", lambda p, x: jnp.einsum("bthk,hkd->btd", x, p["w"]),
         (2, 4, 6), _x((BATCH, 3, 2, 4)), axes="iio", factored=True, nd=True),
    Case("tied_h@E^T", "out_contract", lambda p, h: h @ p["w"].T, (11, 6), _x((BATCH, 6))),
    Case("convert_bf16", "convert", lambda p, x: (x.astype(jnp.bfloat16)
                                                  @ p["w"].astype(jnp.bfloat16)
                                                  ).astype(jnp.float32), (6, 5),
         _x((BATCH, 6))),
    Case("transpose", "transpose", lambda p, x: x @ p["w"].T.T, (6, 5), _x((BATCH, 6))),
    Case("reshape_out", "reshape", lambda p, x: jnp.einsum("bd,dhk->bhk", x,
                                                           p["w"].reshape(6, 2, 4)),
         (6, 8), _x((BATCH, 6))),
    Case("gather_rows", "gather", lambda p, ids: jnp.take(p["w"], ids, axis=0), (11, 6),
         jnp.array([[1, 5, 10], [0, 3, 3]])),
    Case("stacked_index", "stacked", lambda p, x: x @ p["w"][1], (3, 6, 5), _x((BATCH, 6))),
    Case("stacked_scan", "stacked", lambda p, x: lax.scan(
        lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0], (3, 6, 6), _x((BATCH, 6))),
    Case("stacked_fori", "stacked", lambda p, x: lax.fori_loop(
        0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x), (3, 6, 6), _x((BATCH, 6))),
    Case("jit", "control", lambda p, x: jax.jit(lambda w, y: jnp.tanh(y @ w))(p["w"], x),
         (6, 5), _x((BATCH, 6))),
    Case("scan_carry", "control", lambda p, x: lax.scan(
        lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=2)[0], (6, 6),
         _x((BATCH, 6))),
    Case("cond", "control", lambda p, x: lax.cond(x.sum() > 0, lambda w, y: y @ w,
                                                  lambda w, y: -(y @ w), p["w"], x),
         (6, 5), _x((BATCH, 6))),
    Case("while", "control", lambda p, x: lax.fori_loop(
        0, 2, lambda i, h: jnp.tanh(h @ p["w"]), x), (6, 6), _x((BATCH, 6))),
    Case("remat", "control", lambda p, x: jax.checkpoint(lambda w, y: jnp.sin(y @ w))(
        p["w"], x), (6, 5), _x((BATCH, 6))),
    Case("custom_jvp", "custom", lambda p, x: _cj(x, p["w"]), (6, 5), _x((BATCH, 6))),
    Case("custom_vjp", "custom", lambda p, x: _cv(x, p["w"]), (6, 5), _x((BATCH, 6))),
    Case("vmap_inside", "vmap", lambda p, x: jax.vmap(lambda y: y @ p["w"])(x), (6, 5),
         _x((BATCH, 6))),
]


# Eager runs op by op (slow); these cases cover every rule eagerly, the rest run jitted.
EAGER = ("x@W", "W^T@x^T", "einsum_heads_out", "tied_h@E^T", "gather_rows", "stacked_index",
         "cond")


def _pairs():
  for kind in KINDS:
    for case in CASES:
      if case.tag in kind.tags and (kind.nd or not case.nd):
        for use_jit in (False, True):
          if use_jit or case.name in EAGER:
            yield pytest.param(kind, case, use_jit,
                               id=f"{kind.name}-{case.name}-{'jit' if use_jit else 'eager'}")


def _reference(kind, case, leaf, x):
  """The function on dense weights; for multi-LoRA, each row with its own adapter."""
  if not kind.rowwise:
    return case.f({"w": lj.materialize(leaf)}, x)
  outs = []
  for k in range(leaf.n_adapters):
    outs.append(case.f({"w": lj.materialize(leaf.adapter(k))}, x))
  base = case.f({"w": lj.materialize(leaf.w)}, x)
  rows = []
  for i, r in enumerate(np.asarray(IDS)):
    y = base if r < 0 else outs[r]
    rows.append(jnp.take(y, i, axis=case.out_batch))
  return jnp.stack(rows, axis=case.out_batch)


@pytest.mark.parametrize("kind,case,use_jit", list(_pairs()))
def test_leaf_kind_conformance(kind, case, use_jit):
  leaf = kind.make(jax.random.key(KINDS.index(kind)), case.shape, case.axes)
  params = {"w": leaf}
  x = case.x
  tol = 1e-1 if "bf16" in case.name else 2e-3
  fn = lj.implicit(case.f)
  run = jax.jit(fn) if use_jit else fn
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")           # a fallback is allowed; its value is checked
    got = run(params, x)
  want = _reference(kind, case, leaf, x)
  chex.assert_trees_all_equal_shapes(got, want)
  chex.assert_trees_all_equal_dtypes(got, want)   # a transform never changes the dtype
  chex.assert_trees_all_close(got, want, atol=tol, rtol=tol)

  if not use_jit:      # eager: values; jit: the jaxpr and every gradient, compiled
    return
  if case.factored:
    dots = dot_output_shapes(jax.make_jaxpr(fn)(params, x))
    kernel = tuple(case.shape)
    assert kernel not in dots, f"{kind.name}: a dot_general built the dense kernel {kernel}"

  if "bf16" in case.name:   # gradients through a bf16 cast carry bf16 rounding only
    return
  # d/dx through the implicit leaf, and d/d(adapter) against the dense reference; both
  # in one jitted gradient per side (the reference jitted too: op by op it is slower)
  wrt_x = bool(jnp.issubdtype(x.dtype, jnp.floating))
  wrt_ad = bool(leaf.trainable_fields) and not kind.rowwise
  if not (wrt_x or wrt_ad):
    return
  adapter, frozen = lj.split(params)

  def loss(forward, ad, y):
    return jnp.sum(jnp.sin(forward(lj.combine(ad, frozen), y).astype(jnp.float32)))

  def reference(p, y):
    return _reference(kind, case, lj.merge(p)["w"] if wrt_ad else leaf, y)

  argnums = (0, 1) if wrt_x and wrt_ad else (1,) if wrt_x else (0,)
  g = jax.jit(jax.grad(lambda ad, y: loss(fn, ad, y), argnums=argnums))(adapter, x)
  g_ref = jax.jit(jax.grad(lambda ad, y: loss(reference, ad, y), argnums=argnums))(adapter, x)
  chex.assert_trees_all_close(g, g_ref, atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_leaf_kind_protocol(kind):
  """What the rest of the library asks a leaf: trainable parts (split / mask), counts
  (summary), a pytree whose static fields are metadata (one trace), and slicing of
  stacked layers that keeps the kind."""
  leaf = kind.make(jax.random.key(3), (3, 6, 5))
  params = {"w": leaf, "bias": jnp.zeros((5,))}
  adapter, frozen = lj.split(params)
  trained = [getattr(leaf, n) for n in leaf.trainable_fields]
  got = [x for x in jax.tree.leaves(adapter) if x is not None]
  assert len(got) == len(trained)
  for a, b in zip(got, trained):
    assert a is b
  chex.assert_trees_all_equal(lj.combine(adapter, frozen), params)
  mask = lj.trainable_mask(params)
  assert sum(bool(m) for m in jax.tree.leaves(mask)) == len(trained)
  c = leaf.count()
  text = lj.summary(params)
  assert f"trainable params: {c.trainable_params:,}" in text
  assert f"all params: {c.params + 5:,}" in text
  n_train = sum(int(np.prod(t.shape)) for t in trained)
  assert c.trainable_params == n_train
  # stacked layers slice to the same kind, children cut alike
  sliced = lj.implicit(lambda p: p["w"][1], materialize_outputs=False)(params)
  if not kind.rowwise and not leaf.materialize_is_free:
    assert type(sliced) is type(leaf)
    chex.assert_trees_all_close(lj.materialize(sliced), lj.materialize(leaf)[1],
                                atol=1e-5, rtol=1e-5)

  traces = []

  @jax.jit
  def f(p, x):
    traces.append(1)
    return lj.implicit(lambda q, y: y @ q["w"][0])(p, x)

  for s in range(2):
    f(params, _x((BATCH, 6), key=s))
  assert len(traces) == 1


def test_rules_are_looked_up_for_the_exact_class():
  """A subclass of LoraWeight does not silently get LoRA's rules; `rules_from` opts in."""

  class Plain(lj.LoraWeight):
    pass

  class Reusing(lj.LoraWeight):
    rules_from = lj.LoraWeight

  lw = _lora(jax.random.key(0), (6, 5))
  x = _x((BATCH, 6))
  f = lambda w, y: y @ w  # noqa: E731
  for cls, warns in ((Plain, True), (Reusing, False)):
    leaf = cls(w=lw.w, a=lw.a, b=lw.b, scale=lw.scale, axes=lw.axes)
    with warnings.catch_warnings(record=True) as rec:
      warnings.simplefilter("always")
      y = lj.implicit(f)(leaf, x)
    chex.assert_trees_all_close(y, f(lw.materialize(), x), atol=1e-5, rtol=1e-5)
    assert any("materializing" in str(w.message) for w in rec) == warns


def test_a_field_without_a_role_is_an_error():
  with pytest.raises(TypeError, match=r"Bad\.w: declare the field with its role"):
    class Bad(lj.ImplicitArray):  # noqa: F841
      w: Any = None


def test_validation_runs_at_construction_not_on_unflatten():
  lw = _lora(jax.random.key(0), (6, 5))
  leaves, treedef = jax.tree.flatten(lw)
  odd = jax.tree.unflatten(treedef, [object(), object(), object()])   # placeholders are fine
  assert type(odd) is lj.LoraWeight
  with pytest.raises(ValueError, match=r"expected a \(6, 3\) and b \(3, 5\)"):
    lj.LoraWeight(w=lw.w, a=jnp.zeros((5, 3)), b=lw.b)
  with pytest.raises(ValueError, match=r"ColumnScaled: s \(4,\) does not fit w \(6, 5\)"):
    ColumnScaled(w=lw.w, s=jnp.ones((4,)))


def test_user_kind_through_split_summary_and_implicit():
  """The README's leaf-author example: a kind defined outside the library trains."""
  leaf = _column_scaled(jax.random.key(5), (6, 5))
  params = {"w": leaf}
  adapter, frozen = lj.split(params)
  assert adapter["w"].s is leaf.s and adapter["w"].w is None
  assert "trainable params: 5 " in lj.summary(params)
  x = _x((BATCH, 6))
  target = _x((BATCH, 5), key=9)

  def loss(ad):
    y = lj.implicit(lambda p, v: v @ p["w"])(lj.combine(ad, frozen), x)
    return jnp.mean((y - target) ** 2)

  g = jax.grad(loss)(adapter)
  ad2 = jax.tree.map(lambda p, d: p - 0.5 * d, adapter, g)
  assert float(loss(ad2)) < float(loss(adapter))
  # the dot rule never built W * s
  dots = dot_output_shapes(jax.make_jaxpr(lambda ad: lj.implicit(
      lambda p, v: v @ p["w"])(lj.combine(ad, frozen), x))(adapter))
  assert (6, 5) not in dots


def test_readme_leaf_kind_example_runs_as_written():
  """The README's "Writing a leaf kind" block, executed as a user would paste it, gives a
  kind that trains through split/combine/implicit with the dense reference's values."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("## Writing a leaf kind", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  ns: dict = {}
  exec(compile(code, "README.md", "exec"), ns)   # noqa: S102  (our own README, as a doctest)
  kind = ns["ColumnScaled"]
  leaf = kind(w=_normal(jax.random.key(1), (3, 6, 5)),
              s=1.0 + _normal(jax.random.key(2), (3, 5), 0.3))
  x = _x((BATCH, 6))
  f = lambda p, y: lax.scan(lambda h, w: (h, y @ w), 0.0, p["w"])[1]  # noqa: E731
  chex.assert_trees_all_close(lj.implicit(f)({"w": leaf}, x), f({"w": leaf.materialize()}, x),
                              atol=1e-5, rtol=1e-5)
  adapter, frozen = lj.split({"w": leaf})
  assert adapter["w"].s is leaf.s and frozen["w"].w is leaf.w
  assert "trainable params: 15 " in lj.summary({"w": leaf})
