"""`QALoraWeight`: quantization-aware LoRA (QA-LoRA), PEFT's forward.

QA-LoRA pools the input of the low-rank branch over groups of `L` consecutive input
features (the quantization groups of a group-wise base), so `a` has one row per group:

    delta(x) = s * (mean_L(x) * (in / L)) @ a @ b       a: (in/L, r), b: (r, out)

(PEFT's `QALoraLinearVariant.forward` multiplies the pooled features by the number of
groups `in / L`; we follow it, so adapters move between PEFT and us unchanged.) The
dense form is

    W' = W + s * (in / L) / L * repeat(a, L, axis=0) @ b

which is constant within each group of `L` inputs of an output column: for a group-wise
quantized base with group size `L` and zero points, it folds into the zero points
(`qz.fold_qalora`), and the merged model is still a quantized model.

References:
  Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language
  Models", ICLR 2024, https://arxiv.org/abs/2309.14717; PEFT
  `peft/tuners/lora/variants.py::QALoraLinearVariant`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from lora_jax._implicit import ImplicitArray, bind, register_dot_rule, register_rule, static
from lora_jax._lora_weight import LoraWeight, LowRankWeight, _lora_dropout
from lora_jax._lora_weight import _convert_rule as _lw_convert_rule, _copy_rule as _lw_copy_rule


class QALoraWeight(LowRankWeight):
  """A kernel with a QA-LoRA update (group-pooled input on the low-rank branch).

  Attributes:
    w: base kernel `(*batch, in, out)` ("io" layout), plain or implicit (a
      `GroupQuantizedArray` base is QA-LoRA proper).
    a: `(*batch, in / group_size, r)`: one row per input group (PEFT's `lora_A`
      `(r, in / L)`, transposed).
    b: `(*batch, r, out)`.
    rng, scale, dropout: as `LoraWeight`. `axes` is always "io".
    group_size: `L`, inputs pooled per row of `a` (PEFT `qalora_group_size`). Static.

  Not a subclass of `LoraWeight`: LoRA's rules (which would contract `x` with `a`
  directly) never apply; QA-LoRA has its own `dot_general`, `convert_element_type` and
  `copy` rules, and the generic slicing rules of stacked layers.
  """

  group_size: int = static(16)

  def input_group(self) -> int:
    return self.group_size     # LowRankWeight's check: a is (*batch, in / L, r)

  @property
  def groups(self) -> int:
    """`in / group_size`: rows of `a`."""
    return int(self.w.shape[-2]) // int(self.group_size)

  @property
  def pool_scale(self) -> float:
    """`(in / L) / L`: the factor of `repeat(a, L) @ b` in the dense form."""
    return self.groups / int(self.group_size)

  def expanded_a(self) -> jax.Array:
    """`(in / L) / L * repeat(a, L, axis=in)`, float32 `(*batch, in, r)`: the `a` of
    the plain LoRA update this one equals."""
    a = jnp.repeat(self.a.astype(jnp.float32), int(self.group_size), axis=self.nbatch)
    return a * jnp.float32(self.pool_scale)

  def as_lora(self) -> "LoraWeight":
    """The plain LoRA this update equals: `a` expanded to `(in/L)/L * repeat(a, L)`
    `(*batch, in, r)` in `a`'s dtype, same `b`, scale, dropout and key. `x @ a_exp` is
    `pool_L(x) @ a`, at the cost of LoRA's own `x @ a` (r columns)."""
    return LoraWeight(w=self.w, a=self.expanded_a().astype(self.a.dtype), b=self.b, rng=self.rng,
                      scale=self.scale, axes=self.axes, dropout=self.dropout)

  def delta(self) -> jax.Array:
    """`scale * (in/L)/L * repeat(a, L) @ b` in `w`'s layout, float32 math, `w`'s dtype."""
    d = jnp.einsum("...ir,...ro->...io", self.expanded_a(), self.b.astype(jnp.float32))
    return (self.scale * d).astype(self.dtype)

  def materialize(self) -> jax.Array:
    w = self.w.materialize() if isinstance(self.w, ImplicitArray) else self.w
    d = jnp.einsum("...ir,...ro->...io", self.expanded_a(), self.b.astype(jnp.float32))
    return (w.astype(jnp.float32) + jnp.float32(self.scale) * d).astype(w.dtype)

  def column_norm(self) -> jax.Array:
    """`||W'||` per output column (float32, gradient stopped), computed densely."""
    return lax.stop_gradient(jnp.sqrt(jnp.sum(
        jnp.square(self.materialize().astype(jnp.float32)), axis=self.nbatch)))

  def summary_label(self) -> str:
    return f"{self.rank}/qa{self.group_size}"


_DELEGATE = [True]   # a list so a benchmark can compare with pooling first


def pool(x: jax.Array, axis: int, group_size: int) -> jax.Array:
  """PEFT's pooling: the mean over each group of `group_size` consecutive entries of
  `axis`, times the number of groups (`x.shape[axis] / group_size`)."""
  n = x.shape[axis]
  g = n // group_size
  xs = jnp.reshape(x, (*x.shape[:axis], g, group_size, *x.shape[axis + 1:]))
  m = jnp.mean(xs, axis=axis + 1)
  return m * jnp.asarray(g, m.dtype)


# ----------------------------------------------------------------------------
# implicit rules

@register_dot_rule(QALoraWeight)
def _dot_general_rule(prim, x, qw, *, dimension_numbers, precision=None,
                      preferred_element_type=None, **params):
  """`x @ W'` as `x @ w + s * (pool_L(x) @ a) @ b`, computed as LoRA's rule on
  `as_lora()` (`pool_L(x) @ a = x @ a_exp`): the fused `x @ [w | a_exp]` GEMM and
  LoRA's backward, 1.4x faster per training step than pooling first (measured on a
  2-layer 128-wide Llama). `x @ w` goes to the base's own rules (a quantized base keeps
  its dequant-matmul path). Contracting `W'`'s output axis (a tied embedding) falls
  back to the dense form."""
  (lc, rc), (lb, rb) = dimension_numbers
  if isinstance(x, ImplicitArray):
    return NotImplemented
  nb = qw.nbatch
  if tuple(rb) != tuple(range(nb)) or tuple(rc) != (nb,) or len(lc) != 1:
    return NotImplemented
  if _DELEGATE[0]:
    return bind(prim, x, qw.as_lora(), dimension_numbers=dimension_numbers,
                precision=precision, preferred_element_type=preferred_element_type, **params)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  base = bind(prim, x, qw.w, dimension_numbers=dimension_numbers, **kw, **params)
  dt = x.dtype
  xd = _lora_dropout(qw, x, lb)
  xp = pool(xd, lc[0], int(qw.group_size))
  batch = tuple(range(nb))
  t = lax.dot_general(xp, qw.a.astype(dt), ((tuple(lc), (nb,)), (tuple(lb), batch)), **kw)
  t = (t * jnp.asarray(qw.scale, t.dtype)).astype(dt)
  y = lax.dot_general(t, qw.b.astype(dt), (((t.ndim - 1,), (nb,)), (batch, batch)), **kw)
  return base + y.astype(base.dtype)


# casting and copying touch only w, a and b: LoRA's own rules
register_rule(P.convert_element_type_p, QALoraWeight)(_lw_convert_rule)
register_rule(P.copy_p, QALoraWeight)(_lw_copy_rule)


__all__ = ["QALoraWeight", "pool"]
