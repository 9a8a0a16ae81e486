"""Multi-LoRA serving: many adapters over one base in one batch, hot-swappable.

`stack_adapters([p1, p2, ...])` turns the `LoraWeight` leaves of several adapter trees
(same base) into `MultiLoraWeight` leaves holding every adapter's factors on an
adapter axis; ranks are zero-padded to the largest (exact) and each adapter keeps its
own scale; `max_rank=R, slots=N` give the bank a capacity beyond the trees given (a
server's fixed device bank: empty slots serve the base). `with_adapter_ids(served, ids)` says which adapter each batch row uses
(`-1`: the base alone); the `dot_general` rule computes, per row `n`,

    y[n] = x[n] @ W + scale[ids[n]] * (x[n] @ A[ids[n]]) @ B[ids[n]]

without materializing any `W + A @ B`. `set_adapter(served, slot, p)` replaces one
adapter's factors in place of shape, so a jitted server does not recompile.

Layout: w (*L, *kernel); a (*L, n_adapters, *in, r); b (*L, n_adapters, r, *out);
scales (*L, n_adapters); ids (*L, batch) (broadcast over the stacked layer axes so that
`scan` slices every child alike).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from lora_jax import _paths
from lora_jax._implicit import (ImplicitArray, base, bind, data, frozen, is_implicit,
                                register_dot_rule, register_rule, static)
from lora_jax._dora import DoraWeight
from lora_jax._fingerprint import base_fingerprint
from lora_jax._iec import to_lora as iec_to_lora
from lora_jax._lora_weight import LoraWeight, LowRankWeight
from lora_jax._trainable import Trainable


class MultiLoraWeight(ImplicitArray):
  """A base kernel with a bank of LoRA adapters; `ids` picks one per batch row.

  Attributes:
    w: the shared base kernel `(*L, *kernel)` (plain or quantized).
    a: `(*L, n_adapters, *in, r)`, b: `(*L, n_adapters, r, *out)`: the bank, ranks
      zero-padded to the largest; frozen (served, not trained).
    scales: `(*L, n_adapters)` float32 LoRA scales.
    ids: `(*L, batch)` int32 adapter per batch row, -1 = base only (`with_adapter_ids`).
    mags: DoRA banks: `(*L, n_adapters, *out)` factor `m / ||W + s A B||`; None for LoRA.
    fingerprint: `(*L, 4)` float32 sums of the base adapters were trained on
      (`stack_adapters` refuses adapters of another base; `set_adapter` checks it).
    axes: the kernel layout. Static.
  """

  w: Any = base()
  a: Any = frozen()
  b: Any = frozen()
  scales: Any = frozen()
  ids: Any = data(None)
  mags: Any = frozen(None)
  fingerprint: Any = data(None)
  axes: str = static("io")

  @property
  def nbatch(self) -> int:
    return len(self.w.shape) - len(self.axes)

  @property
  def n_adapters(self) -> int:
    return int(self.a.shape[self.nbatch])

  def adapter(self, slot: int) -> LoraWeight:
    """One adapter as a `LoraWeight` (its scale folded into `b`), or a `DoraWeight`
    when the bank serves DoRA adapters."""
    nb = self.nbatch
    a = jnp.take(self.a, slot, axis=nb)
    b = jnp.take(self.b, slot, axis=nb)
    s = jnp.take(self.scales, slot, axis=nb)
    b = b * s.reshape(s.shape + (1,) * (b.ndim - nb)).astype(b.dtype)
    lw = LoraWeight(w=self.w, a=a, b=b, scale=1.0, axes=self.axes)
    if self.mags is None:
      return lw
    d = DoraWeight(w=self.w, a=a, b=b, scale=1.0, axes=self.axes,
                   m=jnp.ones(DoraWeight.m_shape(tuple(self.w.shape), self.axes), a.dtype))
    m = jnp.take(self.mags, slot, axis=nb) * d.column_norm()
    return dataclasses.replace(d, m=m.astype(a.dtype))

  def partition_specs(self, spec):
    """Children split like the kernel along shared axes; adapter and rank axes, the
    scales and the per-row ids replicated."""
    from jax.sharding import PartitionSpec as PS
    from lora_jax._sharding import child_spec, implicit_spec_parts
    batch, ins, outs = implicit_spec_parts(spec, self.nbatch, self.axes)
    return self.replace_children(
        w=child_spec(self.w, spec), a=PS(*batch, None, *ins, None),
        b=PS(*batch, None, None, *outs), scales=PS(*batch, None),
        ids=None if self.ids is None else PS(*batch, None),
        mags=None if self.mags is None else PS(*batch, None, *outs),
        fingerprint=None if self.fingerprint is None else PS(*batch, None))

  def materialize(self):
    raise TypeError(
        "MultiLoraWeight has one weight per batch row, so it has no single dense form; "
        f"its kernel {self.shape} was used by an operation other than a batch-major "
        "x @ W or embedding lookup. Serve with adapters merged (lj.merge(params)) or "
        "use .adapter(slot) for one adapter.")


def _magnitude_factor(lw: LowRankWeight) -> jax.Array:
  """DoRA's per-output-column factor `m / ||W + s A @ B||` (float32, `(*batch, *out)`),
  fixed for serving; 1 for a plain LoRA adapter."""
  if isinstance(lw, DoraWeight):
    return lw.m.astype(jnp.float32) / lw.column_norm()
  return jnp.ones(DoraWeight.m_shape(tuple(lw.shape), lw.axes), jnp.float32)


def _is_low_rank(x):
  return isinstance(x, LowRankWeight)


def _served_form(tree: Any) -> Any:
  """Every leaf in the exact plain-LoRA form a bank holds: IEC as its effective factors
  (`IecLoraWeight.as_lora()`), QA-LoRA with `a` expanded to `(in/L)/L * repeat(a, L)`
  (`QALoraWeight.as_lora()`: `pool_L(x) @ a == x @ a_exp`); others unchanged."""
  from lora_jax._qalora import QALoraWeight
  tree = iec_to_lora(tree)
  return jax.tree.map(lambda x: x.as_lora() if isinstance(x, QALoraWeight) else x, tree,
                      is_leaf=lambda x: isinstance(x, QALoraWeight))


def _servable(path: str, x: Any, k: int) -> None:
  """Refuse leaves a served batch cannot hold: anything trained other than LoRA / DoRA
  factors, whose rows would all share adapter 0's copy."""
  if _is_low_rank(x) and x.input_group() != 1:
    raise ValueError(
        f"stack_adapters: {path} in adapter {k} is a {type(x).__name__} (pooled a "
        f"{tuple(x.a.shape)}); served banks hold plain LoRA / DoRA factors. Merge it "
        "(lj.merge)")
  if isinstance(x, ImplicitArray) and x.trainable_fields and not _is_low_rank(x):
    if isinstance(x, Trainable):
      raise ValueError(
          f"stack_adapters: {path} in adapter {k} is a fully trained module "
          "(modules_to_save); the rows of a served batch share one base, so it cannot "
          "differ per adapter. Serve that adapter on its own (lj.merge its module into "
          "the base), or train it without modules_to_save")
    raise ValueError(
        f"stack_adapters: {path} in adapter {k} is a {type(x).__name__} with trainable "
        f"fields {x.trainable_fields}; only LoRA and DoRA leaves can be served per row")


def _fingerprints_match(fa, fb) -> bool:
  fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
  return bool(np.allclose(fa, fb, rtol=1e-5, atol=1e-6 * (1.0 + np.abs(fb).max())))


def _check_same_base(path: str, k: int, lw: LowRankWeight, ref_w: Any, ref_fp: Any,
                     what: str) -> None:
  """Adapters of one bank must share their base: the same object, or the same values
  (compared by fingerprint when concrete; under `jit` the check is skipped)."""
  if lw.w is ref_w or ref_fp is None or _traced(lw.w) or _traced(ref_fp):
    return
  fp = base_fingerprint(lw.w, lw.nbatch)
  if not _fingerprints_match(fp, ref_fp):
    raise ValueError(
        f"{what}: {path}: adapter {k} was made on another base weight than {'the served bank' if k == 'new' else 'adapter 0'} (same "
        f"shape {tuple(lw.shape)}, other values: fingerprint {np.asarray(fp).reshape(-1)[:4]} vs "
        f"{np.asarray(ref_fp).reshape(-1)[:4]}); adapters served together must share one base")


def _traced(x) -> bool:
  return any(isinstance(c, jax.core.Tracer) for c in jax.tree.leaves(x))


def stack_adapters(trees: Sequence[Any], *, max_rank: int | None = None,
                   slots: int | None = None, dora: bool = False) -> Any:
  """Stack LoRA/DoRA trees from `lj.init`/`lj.load_adapter` (one base) into one served tree
  (IEC and QA-LoRA leaves enter as their exact LoRA form, `as_lora()`).

  Each adapted kernel becomes a `MultiLoraWeight` whose bank holds every adapter's
  factors (ranks zero-padded); plain leaves are shared.

  Args:
    trees: one or more adapter trees over the same base.
    max_rank: the bank's rank capacity (default: the largest rank given), so that
      `set_adapter` can later put in an adapter of any rank up to it.
    slots: the bank's number of adapters (default `len(trees)`); slots past the given
      trees start empty (zero factors and scale: they serve the base) until
      `set_adapter` fills them.
    dora: keep DoRA magnitude factors in the bank even when no tree given is DoRA, so
      that a DoRA adapter can be set later (LoRA slots get factor 1).

  Raises:
    ValueError naming the path: the trees differ in structure, base shapes, layouts or
    base values (adapters trained on another base: same shapes, other weights; checked
    by fingerprint), hold fully trained / other trainable leaf kinds, an adapter's
    rank exceeds `max_rank`, or more trees than `slots`.
  """
  if not trees:
    raise ValueError("stack_adapters needs at least one adapter tree")
  n_slots = len(trees) if slots is None else int(slots)
  if n_slots < len(trees):
    raise ValueError(f"stack_adapters: {len(trees)} adapters do not fit slots={slots}")
  if max_rank is not None and int(max_rank) < 1:
    raise ValueError(f"stack_adapters: max_rank={max_rank} must be >= 1")
  trees = [_served_form(t) for t in trees]
  for k, t in enumerate(trees):
    for path, x in _paths.leaves_with_paths(t, is_leaf=is_implicit):
      _servable(path, x, k)
  flat = [_paths.leaves_with_paths(t, is_leaf=_is_low_rank) for t in trees]
  paths0 = [p for p, _ in flat[0]]
  for k, f in enumerate(flat[1:], 1):
    if [p for p, _ in f] != paths0:
      diff = sorted(set(paths0) ^ {p for p, _ in f})[:5]
      raise ValueError(f"stack_adapters: adapter {k} has a different tree than adapter 0; "
                       f"paths in one but not the other: {diff}")

  def stack(path, *leaves):
    if not _is_low_rank(leaves[0]):
      for k, x in enumerate(leaves[1:], 1):
        if _is_low_rank(x):
          raise ValueError(f"stack_adapters: {path}: adapter {k} has a "
                           f"{type(x).__name__} here, adapter 0 a plain leaf")
      return leaves[0]
    for k, lw in enumerate(leaves):
      if not _is_low_rank(lw):
        raise ValueError(f"stack_adapters: {path}: adapter {k} has no LoRA weight here")
      if lw.axes != leaves[0].axes or tuple(lw.shape) != tuple(leaves[0].shape):
        raise ValueError(f"stack_adapters: {path}: adapter {k} has kernel {tuple(lw.shape)} "
                         f"layout {lw.axes!r}; adapter 0 has {tuple(leaves[0].shape)} "
                         f"{leaves[0].axes!r}")
    nb = leaves[0].nbatch
    fp = None if _traced(leaves[0].w) else base_fingerprint(leaves[0].w, nb)
    for k, lw in enumerate(leaves[1:], 1):
      _check_same_base(path, k, lw, leaves[0].w, fp, "stack_adapters")
    r = max(lw.rank for lw in leaves)
    if max_rank is not None:
      for k, lw in enumerate(leaves):
        if lw.rank > int(max_rank):
          raise ValueError(f"stack_adapters: {path}: adapter {k} has rank {lw.rank}, more "
                           f"than max_rank={max_rank}")
      r = int(max_rank)
    empty = n_slots - len(leaves)
    a = jnp.stack([_pad_rank(lw.a, r, lw.a.ndim - 1) for lw in leaves], axis=nb)
    b = jnp.stack([_pad_rank(lw.b, r, nb) for lw in leaves], axis=nb)
    a, b = _pad_axis(a, n_slots, nb), _pad_axis(b, n_slots, nb)
    batch = tuple(leaves[0].w.shape[:nb])
    scales = jnp.broadcast_to(
        jnp.asarray([lw.scale for lw in leaves] + [0.0] * empty, jnp.float32),
        (*batch, n_slots))
    mags = None
    if dora or any(isinstance(lw, DoraWeight) for lw in leaves):
      mags = jnp.stack([_magnitude_factor(lw) for lw in leaves], axis=nb)
      mags = jnp.concatenate([mags, jnp.ones_like(jnp.take(mags, jnp.zeros(
          (empty,), jnp.int32), axis=nb))], axis=nb) if empty else mags
    return MultiLoraWeight(w=leaves[0].w, a=a, b=b, scales=scales, mags=mags,
                           fingerprint=fp, axes=leaves[0].axes)

  structure = jax.tree.structure(trees[0], is_leaf=_is_low_rank)
  leaves = [[x for _, x in f] for f in flat]
  out = [stack(p, *ls) for p, ls in zip(paths0, zip(*leaves))]
  return jax.tree.unflatten(structure, out)


def _pad_rank(x, r, axis):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, r - x.shape[axis])
  return jnp.pad(x, pad)


_pad_axis = _pad_rank     # zero-pad `axis` to length n (ranks, or empty adapter slots)


def _is_multi(x):
  return isinstance(x, MultiLoraWeight)


def with_adapter_ids(served: Any, ids: jax.Array) -> Any:
  """Attach per-row adapter ids `(batch,)` int (`-1` = base only) to every served leaf.

  Concrete ids are checked: each must be -1 or a slot of the bank (`0 <= id < n`).
  Under `jit` (traced ids) an id outside `[-1, n)` serves its row the base only, never
  NaN or another adapter's output, and `jax.experimental.checkify` reports it
  (`checkify.checkify(fn)(...)` returns the error).

  Raises:
    ValueError: ids not a 1-D integer array, or a concrete id outside `[-1, n)`.
  """
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter ids must be a 1-D integer array (batch,), got "
                     f"{ids.shape} {ids.dtype}")
  multis = [x for _, x in _paths.leaves_with_paths(served, is_leaf=_is_multi) if _is_multi(x)]
  if not multis:
    raise ValueError("with_adapter_ids: the tree has no MultiLoraWeight leaves; build the "
                     "served tree with lj.stack_adapters first")
  n = multis[0].n_adapters
  if not isinstance(ids, jax.core.Tracer):
    bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
    if bad.size:
      raise ValueError(f"with_adapter_ids: ids {bad[:8].tolist()} are outside [-1, {n}) for "
                       f"a bank of {n} adapters (-1 = base only); ids: {np.asarray(ids)[:16].tolist()}")

  def attach(x):
    if not _is_multi(x):
      return x
    batch = tuple(x.w.shape[:x.nbatch])
    return dataclasses.replace(x, ids=jnp.broadcast_to(ids.astype(jnp.int32),
                                                       (*batch, ids.shape[0])))
  return jax.tree.map(attach, served, is_leaf=_is_multi)


def set_adapter(served: Any, slot: int | jax.Array, tree: Any) -> Any:
  """Replace adapter `slot` with the LoRA tree `tree` (same base). Shapes do not change
  (a smaller rank is zero-padded), so a jitted server keeps its compiled program.

  A concrete `slot` must be in `[0, n)`; a traced one outside it leaves the bank
  unchanged (and `checkify` reports it). The new adapter's base is checked against the
  served one (same object, or equal fingerprint) when concrete.
  """
  new = dict(_paths.leaves_with_paths(_served_form(tree), is_leaf=is_implicit))
  for path, x in new.items():
    _servable(path, x, "new")
  multis = [x for _, x in _paths.leaves_with_paths(served, is_leaf=_is_multi) if _is_multi(x)]
  if not multis:
    raise ValueError("set_adapter: the served tree has no MultiLoraWeight leaves; build it "
                     "with lj.stack_adapters first")
  n = multis[0].n_adapters
  if isinstance(slot, jax.core.Tracer):
    from jax.experimental import checkify
    checkify.debug_check((slot >= 0) & (slot < n), "set_adapter: slot {s} is outside the "
                         "bank of " + str(n) + " adapters", s=slot)
  else:
    s = np.asarray(slot)
    if s.ndim or not np.issubdtype(s.dtype, np.integer) or not 0 <= int(s) < n:
      raise ValueError(f"set_adapter: slot {slot!r} must be an int in [0, {n}) for a bank "
                       f"of {n} adapters")

  def put(path, x):
    if not _is_multi(x):
      return x
    lw = new.get(path)
    if not _is_low_rank(lw):
      raise ValueError(f"set_adapter: {path} has no LoRA weight in the new adapter (got "
                       f"{type(lw).__name__ if lw is not None else 'nothing'})")
    nb, r = x.nbatch, x.a.shape[-1]
    if lw.rank > r:
      raise ValueError(f"set_adapter: {path} has rank {lw.rank}; the served bank holds rank "
                       f"<= {r} (build it with lj.stack_adapters(..., max_rank={lw.rank}) "
                       "or more)")
    if tuple(lw.shape) != tuple(x.shape) or lw.axes != x.axes:
      raise ValueError(f"set_adapter: {path} kernel {tuple(lw.shape)} ({lw.axes!r}) does not "
                       f"match the served base {tuple(x.shape)} ({x.axes!r})")
    _check_same_base(path, "new", lw, x.w, x.fingerprint, "set_adapter")
    idx = (slice(None),) * nb + (slot,)
    a = x.a.at[idx].set(_pad_rank(lw.a, r, lw.a.ndim - 1).astype(x.a.dtype), mode="drop")
    b = x.b.at[idx].set(_pad_rank(lw.b, r, nb).astype(x.b.dtype), mode="drop")
    scales = x.scales.at[idx].set(lw.scale, mode="drop")
    mags = x.mags
    if mags is None and isinstance(lw, DoraWeight):
      raise ValueError(f"set_adapter: {path} is a DoRA adapter but the served bank holds "
                       "plain LoRA only (stack_adapters with a DoRA adapter to serve DoRA)")
    if mags is not None:
      mags = mags.at[idx].set(_magnitude_factor(lw), mode="drop")
    return dataclasses.replace(x, a=a, b=b, scales=scales, mags=mags)

  return _paths.map_with_path(put, served, is_leaf=_is_multi)


def _valid_ids(m: MultiLoraWeight):
  """Rows with an adapter: `0 <= id < n`. -1 (base only) and, under `jit`, any id
  outside the bank serve the base only; checkify reports the latter."""
  from jax.experimental import checkify
  ids, n = m.ids, m.n_adapters
  checkify.debug_check(jnp.all((ids >= -1) & (ids < n)),
                       "lora_jax: adapter ids outside [-1, " + str(n) + "): {ids}", ids=ids)
  return (ids >= 0) & (ids < n)


def _row_factors(m: MultiLoraWeight):
  """Per-row (a, b) with the scale folded into b, zero for rows without an adapter."""
  ids = m.ids
  if ids is None:
    raise ValueError("MultiLoraWeight used without adapter ids: call "
                     "lj.with_adapter_ids(served, ids) first")
  valid = _valid_ids(m)
  safe = jnp.where(valid, ids, 0)
  a = jnp.take(m.a, safe, axis=0)                                  # (batch, *in, r)
  b = jnp.take(m.b, safe, axis=0)                                  # (batch, r, *out)
  s = jnp.where(valid, jnp.take(m.scales, safe, axis=0), 0.0)       # (batch,)
  b = b * s.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype)
  return a, b


# From this many batch rows on, the LoRA term runs as SGMV (rows sorted by adapter,
# `lax.ragged_dot` over the bank: each adapter's factors read once) instead of the per-row
# gather (BGMV: every row gathers its own (in, r) and (r, out) factors). Measured on CPU
# (benchmarks/lora_gather.py, d 1024, rank 16, 8 adapters): SGMV/BGMV 2.5x at 1 row,
# 1.5x at 16, 0.93x at 64, 0.26x at 256, 0.62x at 1024; a decode batch of a few rows
# keeps the gather, a batched forward of many sequences sorts.
SGMV_MIN_ROWS = 64


def _sgmv(x, m: MultiLoraWeight, precision, preferred_element_type):
  """The LoRA term of every row of `x (B, ..., in)` (2-D "io" kernel, contracting x's last
  axis) by sort-by-adapter and `ragged_dot`; rows without an adapter get zeros."""
  n = m.n_adapters
  valid = _valid_ids(m)
  ids = jnp.where(valid, m.ids, n)                                  # n: a zero group
  per_row = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
  tok = jnp.repeat(ids, per_row)
  xf = x.reshape(-1, x.shape[-1])
  order = jnp.argsort(tok)
  sizes = jnp.bincount(tok, length=n + 1).astype(jnp.int32)
  a = jnp.concatenate([m.a, jnp.zeros((1,) + m.a.shape[1:], m.a.dtype)]).astype(x.dtype)
  b = m.b * m.scales.reshape(-1, 1, 1).astype(m.b.dtype)
  b = jnp.concatenate([b, jnp.zeros((1,) + b.shape[1:], b.dtype)]).astype(x.dtype)
  t = lax.ragged_dot(xf[order], a, sizes, precision=precision,
                     preferred_element_type=preferred_element_type).astype(x.dtype)
  y = lax.ragged_dot(t, b, sizes, precision=precision,
                     preferred_element_type=preferred_element_type)
  y = jnp.zeros_like(y).at[order].set(y)
  return y.reshape(x.shape[:-1] + (y.shape[-1],))


@register_dot_rule(MultiLoraWeight)
def _multi_dot_rule(prim, x, m, *, dimension_numbers, precision=None,
                    preferred_element_type=None, **params):
  """Batch-major `x @ W`: x (batch, ..., *in) contracting the kernel's in axes."""
  (lc, rc), (lb, rb) = dimension_numbers
  if isinstance(x, ImplicitArray):
    return NotImplemented
  if m.ids is None:
    raise ValueError("MultiLoraWeight used without adapter ids: call "
                     "lj.with_adapter_ids(served, ids) first")
  if not m.nbatch and not lb and not rb and 0 not in lc and x.shape[0] != m.ids.shape[0]:
    raise ValueError(f"MultiLoraWeight {m.shape}: lj.with_adapter_ids got "
                     f"{m.ids.shape[0]} ids but x {tuple(x.shape)} has {x.shape[0]} batch rows; "
                     "give one adapter id per row")
  if m.nbatch or lb or rb or 0 in lc:
    return NotImplemented
  in_pos = [k for k, ax in enumerate(m.axes) if ax == "i"]
  if sorted(rc) != in_pos:
    return NotImplemented
  base = bind(prim, x, m.w, dimension_numbers=dimension_numbers, precision=precision,
              preferred_element_type=preferred_element_type, **params)
  if (x.shape[0] >= SGMV_MIN_ROWS and m.axes == "io" and tuple(lc) == (x.ndim - 1,)
      and m.mags is None):
    y = _sgmv(x, m, precision, preferred_element_type)
    return base + y.astype(base.dtype)
  a, b = _row_factors(m)
  a, b = a.astype(x.dtype), b.astype(x.dtype)
  # contract x's lc with a's matching in axes (a: batch, *in, r), batch over rows
  a_c = tuple(1 + in_pos.index(c) for c in rc)
  t = lax.dot_general(x, a, ((tuple(lc), a_c), ((0,), (0,))), precision=precision,
                      preferred_element_type=preferred_element_type).astype(x.dtype)
  y = lax.dot_general(t, b, (((t.ndim - 1,), (1,)), ((0,), (0,))), precision=precision,
                      preferred_element_type=preferred_element_type)
  out = base + y.astype(base.dtype)
  if m.mags is not None:
    # DoRA rows: (x W + s x A B) * m / ||W + s A B|| per output column; 1 elsewhere
    valid = _valid_ids(m)
    mag = jnp.take(m.mags, jnp.where(valid, m.ids, 0), axis=0)          # (batch, *out)
    mag = jnp.where(valid.reshape((-1,) + (1,) * (mag.ndim - 1)), mag, 1.0)
    nout = mag.ndim - 1
    mag = mag.reshape(mag.shape[:1] + (1,) * (out.ndim - 1 - nout) + mag.shape[1:])
    out = (out.astype(jnp.float32) * mag).astype(out.dtype)
  return out


@register_rule(P.convert_element_type_p, MultiLoraWeight)
def _multi_convert_rule(prim, m, *, new_dtype, **params):
  return dataclasses.replace(m, w=bind(prim, m.w, new_dtype=new_dtype, **params),
                             a=m.a.astype(new_dtype), b=m.b.astype(new_dtype))


__all__ = ["MultiLoraWeight", "stack_adapters", "with_adapter_ids", "set_adapter"]

