"""`DoraWeight`: weight-decomposed low-rank adaptation (DoRA), PEFT's definition.

    W' = m * (W + s * A @ B) / ||W + s * A @ B||_c

with the norm taken per output column (over the kernel's input axes; PyTorch's
`(out, in)` weight normed over `dim=1`), `m` a trainable magnitude per output
column, and the norm treated as a constant (`stop_gradient`, PEFT's `.detach()`,
DoRA paper section 4.3).

Under `lj.implicit`, `x @ W'` is computed as PEFT's forward does,

    y = x @ W + (f - 1) * (x' @ W) + f * s * (x' @ A) @ B,     f = m / ||W + s A B||_c

(`x' = x` without dropout, so `y = f * (x @ W + s * (x @ A) @ B)`), never forming
`A @ B`: the column norm is expanded as
`||W||^2 + 2 s <W, A B>_c + s^2 diag(B^T (A^T A) B)`, which costs one `A^T W`
product of size `(r, out)`.

References:
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
  https://arxiv.org/abs/2402.09353; PEFT `peft/tuners/lora/dora.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from lora_jax._implicit import ImplicitArray, bind, register_dot_rule, register_rule, trainable
from lora_jax._lora_weight import LoraWeight, LowRankWeight, _delta_einsum, _lora_dropout


class DoraWeight(LowRankWeight):
  """A low-rank update with a DoRA magnitude `m`.

  Attributes:
    w, a, b, rng, scale, axes, dropout: as `LoraWeight` (both are `LowRankWeight`s).
    m: `(*batch, *out)` magnitude per output column (PEFT `lora_magnitude_vector`),
      trainable; a fresh adapter sets it to the column norms of `w`, which leaves
      the function unchanged.

  Not a subclass of `LoraWeight`: LoRA's rules (which would drop `m`) never apply;
  DoRA has its own `dot_general`, `convert_element_type` and `copy` rules, and the
  generic slicing rules of stacked layers.
  """

  m: Any = trainable(None)

  def __check_init__(self):
    if self.m is None:
      raise ValueError("DoraWeight: the magnitude m is required (lj.to_dora or "
                       "dora_from_lora computes it from the column norms)")
    want = self.m_shape(tuple(self.w.shape), self.axes)
    if tuple(self.m.shape) != want:
      raise ValueError(f"DoraWeight: magnitude m {tuple(self.m.shape)} does not fit w "
                       f"{tuple(self.w.shape)} (axes {self.axes!r}): expected {want}")

  @staticmethod
  def m_shape(w_shape: tuple, axes: str) -> tuple:
    nb = len(w_shape) - len(axes)
    kernel = w_shape[nb:]
    return (*w_shape[:nb], *(d for d, ax in zip(kernel, axes) if ax == "o"))

  def partition_specs(self, spec):
    """As `LoraWeight`; the magnitude `(*batch, *out)` split like the output axes."""
    from jax.sharding import PartitionSpec as PS
    from lora_jax._sharding import implicit_spec_parts
    batch, _, outs = implicit_spec_parts(spec, self.nbatch, self.axes)
    return super().partition_specs(spec).replace_children(m=PS(*batch, *outs))

  def _expand_m(self, v: jax.Array) -> jax.Array:
    """`(*batch, *out)` -> broadcastable to the kernel `(*batch, *kernel)`."""
    nb = self.nbatch
    shape = list(self.w.shape[:nb])
    outs = iter(v.shape[nb:])
    for ax in self.axes:
      shape.append(next(outs) if ax == "o" else 1)
    return jnp.reshape(v, shape)

  def materialize(self) -> jax.Array:
    """`m * (W + s A B) / ||W + s A B||_c`, computed in float32, cast to `w`'s dtype."""
    w = self.w.materialize() if isinstance(self.w, ImplicitArray) else self.w
    d = jnp.einsum(_delta_einsum(self.axes, self.nbatch),
                   self.a.astype(jnp.float32), self.b.astype(jnp.float32))
    wp = w.astype(jnp.float32) + jnp.float32(self.scale) * d
    norm = lax.stop_gradient(jnp.sqrt(jnp.sum(wp * wp, axis=self._in_axes())))
    f = self.m.astype(jnp.float32) / norm
    return (wp * self._expand_m(f)).astype(w.dtype)

  def as_lora(self) -> LoraWeight:
    """The plain LoRA part (`w`, `a`, `b`), without the magnitude."""
    return LoraWeight(w=self.w, a=self.a, b=self.b, rng=self.rng, scale=self.scale,
                      axes=self.axes, dropout=self.dropout)


def dora_from_lora(lw: LoraWeight, m: jax.Array | None = None) -> DoraWeight:
  """A `DoraWeight` from a `LoraWeight`; `m` defaults to the column norms of `W + s A B`
  (PEFT's initialisation), so the function is unchanged."""
  if m is None:
    m = lw.column_norm().astype(lw.dtype)
  return DoraWeight(w=lw.w, a=lw.a, b=lw.b, rng=lw.rng, scale=lw.scale, axes=lw.axes,
                    dropout=lw.dropout, m=m)


def to_dora(params: Any) -> Any:
  """Every plain `LoraWeight` leaf of `params` as a `DoraWeight` (PEFT's `use_dora=True`).

  The magnitude starts at the column norms of `W + s A B`, so the function is
  unchanged. Use after `lj.init`: `params = to_dora(lj.init(key, base, cfg))`.
  """
  def conv(x):
    return dora_from_lora(x) if isinstance(x, LoraWeight) else x
  return jax.tree.map(conv, params, is_leaf=lambda x: isinstance(x, LowRankWeight))


# ----------------------------------------------------------------------------
# implicit rules

@register_dot_rule(DoraWeight)
def _dot_general_rule(prim, x, dw, *, dimension_numbers, precision=None,
                      preferred_element_type=None, **params):
  """`x @ W'` for a DoRA kernel, contracting its input axes (either side of the dot:
  `register_dot_rule` derives the leaf-on-the-left case)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if isinstance(x, ImplicitArray):
    return NotImplemented
  nb = dw.nbatch
  if tuple(rb) != tuple(range(nb)):
    return NotImplemented
  in_pos = [k for k, ax in enumerate(dw.axes) if ax == "i"]
  if sorted(c - nb for c in rc) != in_pos:
    return NotImplemented
  # the out axes of the kernel must come out last, in order: true when the
  # kernel's free axes are exactly its out axes (they are, after contracting "i").
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  base = bind(prim, x, dw.w, dimension_numbers=dimension_numbers, **kw, **params)
  dt = x.dtype
  xd = _lora_dropout(dw, x, lb)
  dropped = xd is not x
  # low-rank branch s * (x' @ A) @ B
  pos_in_a = {k: nb + j for j, k in enumerate(in_pos)}
  a_c = tuple(pos_in_a[c - nb] for c in rc)
  batch = tuple(range(nb))
  t = lax.dot_general(xd, dw.a.astype(dt), ((tuple(lc), a_c), (tuple(lb), batch)), **kw)
  t = (t * jnp.asarray(dw.scale, t.dtype)).astype(dt)
  lora = lax.dot_general(t, dw.b.astype(dt), (((t.ndim - 1,), (nb,)), (batch, batch)), **kw)
  lora = lora.astype(base.dtype)
  # f = m / ||W + s A B||_c, broadcast over the x-free axes of the result
  f = (dw.m.astype(jnp.float32) / dw.column_norm()).astype(base.dtype)
  nout = dw.axes.count("o")
  nfree = base.ndim - nb - nout
  f = jnp.reshape(f, (*f.shape[:nb], *([1] * nfree), *f.shape[nb:]))
  if dropped:
    base_d = bind(prim, xd, dw.w, dimension_numbers=dimension_numbers, **kw, **params)
    return base + (f - jnp.ones((), f.dtype)) * base_d + f * lora
  return base + (f - jnp.ones((), f.dtype)) * base + f * lora


@register_rule(P.convert_element_type_p, DoraWeight)
def _convert_rule(prim, dw, *, new_dtype, **params):
  w = bind(prim, dw.w, new_dtype=new_dtype, **params)
  return dataclasses.replace(dw, w=w, a=lax.convert_element_type(dw.a, new_dtype),
                             b=lax.convert_element_type(dw.b, new_dtype),
                             m=lax.convert_element_type(dw.m, new_dtype))


@register_rule(P.copy_p, DoraWeight)
def _copy_rule(prim, dw, **params):
  return dw


__all__ = ["DoraWeight", "dora_from_lora", "to_dora"]
