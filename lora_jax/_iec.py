"""`IecLoraWeight`: LoRA with IR-QLoRA's information elastic connection (IEC).

IEC adds two trained scalars per adapted layer to the low-rank branch (Qin et al.,
section 3.3; the reference implementation's `lora_default_A_scale` /
`lora_default_B_scale`):

    h   = x' @ a + beta_a * groupmean_r(x)            (..., r)
    out = x @ w + s * (h @ b + beta_b * repeat_r(h))  (..., out)

`groupmean_r` averages each of `r` contiguous groups of `in / r` inputs (the
reference reshapes `x` to `(..., r, in / r)` and takes the mean), `repeat_r` repeats
each of the `r` entries of `h` for `out / r` contiguous outputs; `x'` is `x` after the
branch's dropout (the mean term sees `x` itself, as in the reference). Both are
linear, so IEC is a LoRA with the same rank and the effective factors

    a_eff = a + beta_a * P,   P[i, j] = (r / in) [i // (in / r) == j]     (in, r)
    b_eff = b + beta_b * R,   R[j, o] = [o // (out / r) == j]              (r, out)

`as_lora()` returns that `LoraWeight`, and every rule of this kind delegates to it
(so the fused GEMM, the QLoRA `custom_vjp` and the stacked-layer rules are LoRA's
own, and gradients reach the betas through `a_eff`, `b_eff`). With dropout active the
branch is computed as written above. `r` must divide both `in` and `out`.

References:
  Qin et al., "Accurate LoRA-Finetuning Quantization of LLMs via Information
  Retention" (IR-QLoRA), ICML 2024, https://arxiv.org/abs/2402.05445; reference code
  github.com/htqin/IR-QLoRA (`utils.py`, `IRQLoraLinear4bit.forward`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from lora_jax._implicit import ImplicitArray, bind, register_dot_rule, register_rule, trainable
from lora_jax._lora_weight import LoraWeight, LowRankWeight, _lora_dropout
from lora_jax._lora_weight import _convert_rule as _lw_convert_rule, _copy_rule as _lw_copy_rule


def check_iec_shape(w_shape, axes: str, r: int, where: str) -> None:
  """Raise `ValueError` unless IEC applies: an "io" kernel whose `in` and `out` sizes
  the rank `r` divides."""
  if axes != "io":
    raise ValueError(f"{where}: IEC (use_iec) groups one input and one output axis; "
                     f"layout {axes!r} of w {tuple(w_shape)} is not 'io' (stacked axes in "
                     "front are fine)")
  k, n = int(w_shape[-2]), int(w_shape[-1])
  if k % r or n % r:
    raise ValueError(f"{where}: IEC needs the rank r={r} to divide the input size {k} and "
                     f"the output size {n} of w {tuple(w_shape)} (it averages r groups of "
                     "inputs and repeats h over r groups of outputs)")


class IecLoraWeight(LowRankWeight):
  """A kernel with a LoRA update and IR-QLoRA's elastic connection.

  Attributes:
    w, a, b, rng, scale, dropout: as `LoraWeight`; `axes` is always "io" (stacked
      axes in front allowed). `a: (*batch, in, r)`, `b: (*batch, r, out)`.
    beta_a: `(*batch,)` trained scalar on the input group mean (the reference's
      `lora_default_A_scale`), 0 at init.
    beta_b: `(*batch,)` trained scalar on the repeated `h` (`lora_default_B_scale`),
      0 at init.

  Not a subclass of `LoraWeight`: code about LoRA factors (serving banks, adapter
  merges, PEFT files) sees this kind and either converts it with `as_lora()` (exact)
  or refuses it; it never drops the betas.
  """

  beta_a: Any = trainable(None)
  beta_b: Any = trainable(None)

  def __check_init__(self):
    where = type(self).__name__
    check_iec_shape(self.w.shape, self.axes, self.rank, where)
    batch = tuple(self.w.shape[:self.nbatch])
    for name in ("beta_a", "beta_b"):
      v = getattr(self, name)
      if v is None or not hasattr(v, "shape"):
        raise TypeError(f"{where}: {name} must be an array of shape {batch}, got "
                        f"{type(v).__name__}")
      if tuple(v.shape) != batch:
        raise ValueError(f"{where}: {name} has shape {tuple(v.shape)}; expected the "
                         f"stacked batch shape {batch} of w {tuple(self.w.shape)} (one "
                         "scalar per layer)")
      if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{where}: {name} has dtype {jnp.dtype(v.dtype).name}; expected "
                        "a floating dtype")

  def _beta(self, v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32).reshape(*v.shape, 1, 1)

  def mean_matrix(self) -> jax.Array:
    """`P (in, r)` float32: `x @ P` is the mean of each of `r` contiguous input groups."""
    k, r = int(self.w.shape[-2]), self.rank
    g = k // r
    return jnp.repeat(jnp.eye(r, dtype=jnp.float32), g, axis=0) / jnp.float32(g)

  def repeat_matrix(self) -> jax.Array:
    """`R (r, out)` float32: `h @ R` repeats each entry of `h` over `out / r` outputs."""
    n, r = int(self.w.shape[-1]), self.rank
    return jnp.repeat(jnp.eye(r, dtype=jnp.float32), n // r, axis=1)

  def effective_factors(self) -> tuple[jax.Array, jax.Array]:
    """`(a + beta_a * P, b + beta_b * R)` in float32, `(*batch, in, r)`, `(*batch, r, out)`."""
    lead = (1,) * self.nbatch
    a = self.a.astype(jnp.float32) + self._beta(self.beta_a) * self.mean_matrix().reshape(
        *lead, *self.a.shape[-2:])
    b = self.b.astype(jnp.float32) + self._beta(self.beta_b) * self.repeat_matrix().reshape(
        *lead, *self.b.shape[-2:])
    return a, b

  def as_lora(self) -> LoraWeight:
    """The `LoraWeight` with the effective factors (same rank, scale, dropout, rng,
    factors in `a`'s dtype): equal to this leaf without dropout, and exactly what PEFT
    and every LoRA consumer can hold."""
    a, b = self.effective_factors()
    return LoraWeight(w=self.w, a=a.astype(self.a.dtype), b=b.astype(self.b.dtype),
                      rng=self.rng, scale=self.scale, axes=self.axes, dropout=self.dropout)

  def delta(self) -> jax.Array:
    a, b = self.effective_factors()
    d = jnp.einsum("...ir,...ro->...io", a, b)
    return (self.scale * d).astype(self.dtype)

  def materialize(self) -> jax.Array:
    w = self.w.materialize() if isinstance(self.w, ImplicitArray) else self.w
    a, b = self.effective_factors()
    d = jnp.einsum("...ir,...ro->...io", a, b)
    return (w.astype(jnp.float32) + jnp.float32(self.scale) * d).astype(w.dtype)

  def column_norm(self) -> jax.Array:
    return self.as_lora().column_norm()

  def summary_label(self) -> str:
    return f"{self.rank}/iec"

  def partition_specs(self, spec):
    """As `LoraWeight`; the per-layer betas split like the stacked axes."""
    from jax.sharding import PartitionSpec as PS
    from lora_jax._sharding import implicit_spec_parts
    batch, _, _ = implicit_spec_parts(spec, self.nbatch, self.axes)
    return super().partition_specs(spec).replace_children(beta_a=PS(*batch), beta_b=PS(*batch))


def to_lora(params: Any) -> Any:
  """Every `IecLoraWeight` in `params` replaced by its exact `LoraWeight` form
  (`as_lora()`); other leaves unchanged."""
  return jax.tree.map(lambda x: x.as_lora() if isinstance(x, IecLoraWeight) else x, params,
                      is_leaf=lambda x: isinstance(x, IecLoraWeight))


# ----------------------------------------------------------------------------
# implicit rules: LoRA's, on the effective factors

def _dropout_active(iw: IecLoraWeight) -> bool:
  return iw.rng is not None and iw.dropout > 0.0


@register_dot_rule(IecLoraWeight)
def _dot_general_rule(prim, x, iw, *, dimension_numbers, precision=None,
                      preferred_element_type=None, **params):
  """`x @ W'` through LoRA's rule on `as_lora()`; with dropout, the reference's branch
  `s * (h @ b + beta_b * repeat(h))`, `h = drop(x) @ a + beta_a * groupmean(x)`."""
  kw = dict(dimension_numbers=dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, **params)
  if not _dropout_active(iw) or isinstance(x, ImplicitArray):
    return bind(prim, x, iw.as_lora(), **kw)
  (lc, rc), (lb, rb) = dimension_numbers
  nb = iw.nbatch
  if tuple(rb) != tuple(range(nb)) or tuple(rc) != (nb,) or len(lc) != 1:
    return NotImplemented
  base = bind(prim, x, iw.w, **kw)
  dt = x.dtype
  batch = tuple(range(nb))
  dims = ((tuple(lc), (nb,)), (tuple(lb), batch))
  pk = dict(precision=precision, preferred_element_type=preferred_element_type)
  mean = jnp.broadcast_to(iw.mean_matrix(), (*iw.w.shape[:nb], *iw.mean_matrix().shape))
  h = lax.dot_general(_lora_dropout(iw, x, lb), iw.a.astype(dt), dims, **pk)
  h = h + _expand(iw.beta_a, h.ndim, dt) * lax.dot_general(x, mean.astype(dt), dims, **pk)
  rep = jnp.broadcast_to(iw.repeat_matrix(), (*iw.w.shape[:nb], *iw.repeat_matrix().shape))
  hd = (((h.ndim - 1,), (nb,)), (batch, batch))
  y = lax.dot_general(h, iw.b.astype(dt), hd, **pk)
  y = y + _expand(iw.beta_b, y.ndim, dt) * lax.dot_general(h, rep.astype(dt), hd, **pk)
  y = y * jnp.asarray(iw.scale, y.dtype)
  return base + y.astype(base.dtype)


def _expand(beta: jax.Array, ndim: int, dt) -> jax.Array:
  """`(*batch,)` -> `(*batch, 1, ...)` of rank `ndim`, against a dot_general output
  whose leading axes are the stacked batch."""
  return beta.astype(dt).reshape(*beta.shape, *([1] * (ndim - beta.ndim)))


def _as_lora_rule(prim, iw, *args, **params):
  """Transpose, reshape, embedding gather: LoRA's rule on the effective factors."""
  return bind(prim, iw.as_lora(), *args, **params)


for _p in (P.transpose_p, P.reshape_p, P.gather_p):
  register_rule(_p, IecLoraWeight)(_as_lora_rule)


# casting and copying touch only w, a and b: LoRA's own rules
register_rule(P.convert_element_type_p, IecLoraWeight)(_lw_convert_rule)
register_rule(P.copy_p, IecLoraWeight)(_lw_copy_rule)


__all__ = ["IecLoraWeight", "check_iec_shape", "to_lora"]
