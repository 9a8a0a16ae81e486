"""Multi-LoRA serving: many adapters over one base in one batch, hot-swappable.

`stack_adapters([p1, p2, ...])` turns the `LoraWeight` leaves of several adapter trees
(same base) into `MultiLoraWeight` leaves holding every adapter's factors on an
adapter axis; ranks are zero-padded to the largest (exact) and each adapter keeps its
own scale. `with_adapter_ids(served, ids)` says which adapter each batch row uses
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
from lora_jax._implicit import ImplicitArray, bind, register_rule
from lora_jax._dora import DoraWeight
from lora_jax._lora_weight import LoraWeight
from lora_jax._trainable import Trainable


@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(ImplicitArray):
  """A base kernel with a bank of LoRA adapters; `ids` picks one per batch row."""

  w: Any
  a: Any
  b: Any
  scales: Any
  ids: Any = None
  mags: Any = None   # DoRA: (*L, n_adapters, *out) factor m / ||W + s A B||; 1 for LoRA
  axes: str = "io"

  @property
  def shape(self):
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

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
    return dataclasses.replace(
        self, w=child_spec(self.w, spec), a=PS(*batch, None, *ins, None),
        b=PS(*batch, None, None, *outs), scales=PS(*batch, None),
        ids=None if self.ids is None else PS(*batch, None),
        mags=None if self.mags is None else PS(*batch, None, *outs))

  def materialize(self):
    raise TypeError(
        "MultiLoraWeight has one weight per batch row, so it has no single dense form; "
        f"its kernel {self.shape} was used by an operation other than a batch-major "
        "x @ W or embedding lookup. Serve with adapters merged (lj.merge(params)) or "
        "use .adapter(slot) for one adapter.")


jax.tree_util.register_dataclass(MultiLoraWeight,
                                 data_fields=["w", "a", "b", "scales", "ids", "mags"],
                                 meta_fields=["axes"])


def _magnitude_factor(lw: LoraWeight) -> jax.Array:
  """DoRA's per-output-column factor `m / ||W + s A @ B||` (float32, `(*batch, *out)`),
  fixed for serving; 1 for a plain LoRA adapter."""
  if isinstance(lw, DoraWeight):
    return lw.m.astype(jnp.float32) / lw.column_norm()
  return jnp.ones(DoraWeight.m_shape(tuple(lw.shape), lw.axes), jnp.float32)


def _is_lora(x):
  return isinstance(x, LoraWeight)


def stack_adapters(trees: Sequence[Any]) -> Any:
  """Stack LoRA trees from `lj.init`/`lj.load_adapter` (same base) into one served tree.

  Raises:
    ValueError: the trees differ in structure, base shapes or layouts (names the path).
  """
  if not trees:
    raise ValueError("stack_adapters needs at least one adapter tree")
  for k, t in enumerate(trees):
    for path, x in _paths.leaves_with_paths(t, is_leaf=lambda x: isinstance(x, Trainable)):
      if isinstance(x, Trainable):
        raise ValueError(
            f"stack_adapters: {path} in adapter {k} is a fully trained module "
            "(modules_to_save); the rows of a served batch share one base, so it cannot "
            "differ per adapter. Serve that adapter on its own (lj.merge its module into "
            "the base), or train it without modules_to_save")
  flat = [_paths.leaves_with_paths(t, is_leaf=_is_lora) for t in trees]
  paths0 = [p for p, _ in flat[0]]
  for k, f in enumerate(flat[1:], 1):
    if [p for p, _ in f] != paths0:
      diff = sorted(set(paths0) ^ {p for p, _ in f})[:5]
      raise ValueError(f"stack_adapters: adapter {k} has a different tree than adapter 0; "
                       f"paths in one but not the other: {diff}")

  def stack(path, *leaves):
    if not isinstance(leaves[0], LoraWeight):
      return leaves[0]
    for k, lw in enumerate(leaves):
      if not isinstance(lw, LoraWeight):
        raise ValueError(f"{path}: adapter {k} has no LoRA weight here")
      if lw.axes != leaves[0].axes or tuple(lw.shape) != tuple(leaves[0].shape):
        raise ValueError(f"{path}: adapter {k} has kernel {tuple(lw.shape)} layout "
                         f"{lw.axes!r}; adapter 0 has {tuple(leaves[0].shape)} "
                         f"{leaves[0].axes!r}")
    nb = leaves[0].nbatch
    r = max(lw.rank for lw in leaves)
    a = jnp.stack([_pad_rank(lw.a, r, lw.a.ndim - 1) for lw in leaves], axis=nb)
    b = jnp.stack([_pad_rank(lw.b, r, nb) for lw in leaves], axis=nb)
    batch = tuple(leaves[0].w.shape[:nb])
    scales = jnp.broadcast_to(jnp.asarray([lw.scale for lw in leaves], jnp.float32),
                              (*batch, len(leaves)))
    mags = None
    if any(isinstance(lw, DoraWeight) for lw in leaves):
      mags = jnp.stack([_magnitude_factor(lw) for lw in leaves], axis=nb)
    return MultiLoraWeight(w=leaves[0].w, a=a, b=b, scales=scales, mags=mags,
                           axes=leaves[0].axes)

  structure = jax.tree.structure(trees[0], is_leaf=_is_lora)
  leaves = [[x for _, x in f] for f in flat]
  out = [stack(p, *ls) for p, ls in zip(paths0, zip(*leaves))]
  return jax.tree.unflatten(structure, out)


def _pad_rank(x, r, axis):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, r - x.shape[axis])
  return jnp.pad(x, pad)


def with_adapter_ids(served: Any, ids: jax.Array) -> Any:
  """Attach per-row adapter ids `(batch,)` int32 (`-1` = base only) to every leaf."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"adapter ids must be a 1-D integer array (batch,), got "
                     f"{ids.shape} {ids.dtype}")

  def attach(x):
    if not isinstance(x, MultiLoraWeight):
      return x
    batch = tuple(x.w.shape[:x.nbatch])
    return dataclasses.replace(x, ids=jnp.broadcast_to(ids.astype(jnp.int32),
                                                       (*batch, ids.shape[0])))
  return jax.tree.map(attach, served, is_leaf=lambda x: isinstance(x, MultiLoraWeight))


def set_adapter(served: Any, slot: int | jax.Array, tree: Any) -> Any:
  """Replace adapter `slot` with the LoRA tree `tree` (same base). Shapes do not change
  (a smaller rank is zero-padded), so a jitted server keeps its compiled program."""
  new = dict(_paths.leaves_with_paths(tree, is_leaf=_is_lora))

  def put(path, x):
    if not isinstance(x, MultiLoraWeight):
      return x
    lw = new.get(path)
    if not isinstance(lw, LoraWeight):
      raise ValueError(f"set_adapter: {path} has no LoRA weight in the new adapter")
    nb, r = x.nbatch, x.a.shape[-1]
    if lw.rank > r:
      raise ValueError(f"set_adapter: {path} has rank {lw.rank}; the served bank holds rank "
                       f"<= {r} (stack it with a larger-rank adapter first)")
    if tuple(lw.shape) != tuple(x.shape):
      raise ValueError(f"set_adapter: {path} kernel {tuple(lw.shape)} does not match the "
                       f"served base {tuple(x.shape)}")
    idx = (slice(None),) * nb + (slot,)
    a = x.a.at[idx].set(_pad_rank(lw.a, r, lw.a.ndim - 1).astype(x.a.dtype))
    b = x.b.at[idx].set(_pad_rank(lw.b, r, nb).astype(x.b.dtype))
    scales = x.scales.at[idx].set(lw.scale)
    mags = x.mags
    if mags is None and isinstance(lw, DoraWeight):
      raise ValueError(f"set_adapter: {path} is a DoRA adapter but the served bank holds "
                       "plain LoRA only (stack_adapters with a DoRA adapter to serve DoRA)")
    if mags is not None:
      mags = mags.at[idx].set(_magnitude_factor(lw))
    return dataclasses.replace(x, a=a, b=b, scales=scales, mags=mags)

  return _paths.map_with_path(put, served, is_leaf=lambda x: isinstance(x, MultiLoraWeight))


def _row_factors(m: MultiLoraWeight):
  """Per-row (a, b) with the scale folded into b, zero for ids == -1."""
  ids = m.ids
  if ids is None:
    raise ValueError("MultiLoraWeight used without adapter ids: call "
                     "lj.with_adapter_ids(served, ids) first")
  valid = ids >= 0
  safe = jnp.where(valid, ids, 0)
  a = jnp.take(m.a, safe, axis=0)                                  # (batch, *in, r)
  b = jnp.take(m.b, safe, axis=0)                                  # (batch, r, *out)
  s = jnp.where(valid, jnp.take(m.scales, safe, axis=0), 0.0)       # (batch,)
  b = b * s.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype)
  return a, b


@register_rule(P.dot_general_p, MultiLoraWeight)
def _multi_dot_rule(prim, lhs, rhs, *, dimension_numbers, precision=None,
                    preferred_element_type=None, **params):
  """Batch-major `x @ W`: x (batch, ..., *in) contracting the kernel's in axes."""
  (lc, rc), (lb, rb) = dimension_numbers
  if not isinstance(rhs, MultiLoraWeight) or isinstance(lhs, ImplicitArray):
    return NotImplemented
  m, x = rhs, lhs
  if m.ids is None:
    raise ValueError("MultiLoraWeight used without adapter ids: call "
                     "lj.with_adapter_ids(served, ids) first")
  if m.nbatch or lb or rb or 0 in lc or x.shape[0] != m.ids.shape[0]:
    return NotImplemented
  in_pos = [k for k, ax in enumerate(m.axes) if ax == "i"]
  if sorted(rc) != in_pos:
    return NotImplemented
  base = bind(prim, x, m.w, dimension_numbers=dimension_numbers, precision=precision,
              preferred_element_type=preferred_element_type, **params)
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
    valid = m.ids >= 0
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
del np
