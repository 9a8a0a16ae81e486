"""Element-selective merges, as mergekit's: SCE (select, calculate, erase), NearSwap,
Arcee Fusion, and RAM / RAM+ (reinforced agent merging)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from merging._methods import F32, _f32
from merging._registry import METHODS, P, method


@jax.jit
def nearswap_leaf(base, model, t):
  """mergekit's `nearswap`: take `model`'s value where it is within about `t` of
  `base`'s: `w = clip(t / max(|base - model|, 1e-6), 0, 1)`, `w * model + (1-w) * base`."""
  a, b = _f32(base), _f32(model)
  w = jnp.clip(_f32(t) / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
  return (w * b + (1 - w) * a).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("select",))
def sce_leaf(base, models, select_topk, *, select: bool):
  """SCE (Wan et al. 2024, arXiv:2408.07990) on one leaf, as mergekit's `sce`.

  1. Select: keep the `select_topk` fraction of elements (of those with non-zero
     variance) with the largest variance of the task vectors across models.
  2. Calculate: weight each model by its mean squared (selected) task vector,
     normalised to sum to 1 (uniform when the sum is below 1e-6).
  3. Erase: drop elements whose sign disagrees with the sign of the summed task
     vectors (TIES' election), and divide by the summed weights that remain.

  Ties in variance at the selection threshold are all kept (mergekit's `topk`
  picks among them arbitrarily); with float data that is a measure-zero event.

  Args:
    base: array; models: tuple of N arrays of its shape; select_topk: float32 scalar
    in (0, 1) when `select`.
  """
  b = _f32(base)
  tv = jnp.stack([_f32(m) - b for m in models])                     # (N, *shape)
  if select:
    var = jnp.var(tv, axis=0)
    flat = jnp.abs(var).reshape(-1)
    k = jnp.floor(jnp.count_nonzero(flat).astype(jnp.float32) * select_topk).astype(jnp.int32)
    ranked = -jnp.sort(-flat)
    thresh = ranked[jnp.maximum(k - 1, 0)]
    mask = (jnp.abs(var) >= thresh) & (k > 0)
    tv = tv * mask[None].astype(tv.dtype)
  n = tv.shape[0]
  weights = jnp.mean(jnp.square(tv).reshape(n, -1), axis=1)
  total = jnp.sum(weights)
  weights = jnp.where(jnp.abs(total) < 1e-6, 1.0 / n, weights / jnp.where(total == 0, 1.0, total))
  majority = jnp.where(jnp.sum(tv, axis=0) >= 0, 1.0, -1.0)
  keep = jnp.sign(tv) == majority[None]
  ew = weights.reshape((n,) + (1,) * (tv.ndim - 1)) * keep.astype(tv.dtype)
  merged = jnp.sum(tv * ew, axis=0) / jnp.maximum(jnp.sum(ew, axis=0), 1e-6)
  return (b + merged).astype(base.dtype)


def fusion_kl(base, model):
  """`KL(p || q)` per row (last axis, kept as size 1) with `p = softmax(model) + 1e-8`,
  `q = softmax(base) + 1e-8` (mergekit's `arcee_fusion` score), computed without
  cancellation when the rows are nearly equal.

  With `d = model - base` (exact for close floats), the log-sum-exp difference is
  `c = log1p(sum_j q0_j expm1(d_j))` (`q0 = softmax(base)`), so
  `p - q = q0 * expm1(d - c)`. As `sum(p - q) = 0`, `KL = sum_j q_j h(x_j)` with
  `x = (p - q) / q` and `h(x) = (1 + x) log1p(x) - x >= 0` (a series for small x):
  a sum of non-negative terms, where `sum p * (log p - log q)` in float32 loses
  all accuracy (rows whose KL is below ~1e-7 get noise, even negative values).
  """
  b, m = _f32(base), _f32(model)
  d = m - b
  q0 = jax.nn.softmax(b, axis=-1)
  c = jnp.log1p(jnp.sum(q0 * jnp.expm1(d), axis=-1, keepdims=True))
  q = q0 + 1e-8
  x = q0 * jnp.expm1(d - c) / q                  # (p - q) / q
  small = jnp.abs(x) < 1e-2
  xs = jnp.where(small, x, 0.0)
  series = xs * xs * (0.5 + xs * (-1.0 / 6 + xs * (1.0 / 12 + xs * (-1.0 / 20))))
  xl = jnp.where(small, 1.0, x)
  direct = (1 + xl) * jnp.log1p(xl) - xl
  return jnp.sum(q * jnp.where(small, series, direct), axis=-1, keepdims=True)


@jax.jit
def arcee_fusion_leaf(base, model):
  """mergekit's `arcee_fusion`: keep `model`'s change only where its importance
  `|model - base| * KL(softmax(model) || softmax(base))` (KL along the last axis) is
  an outlier, at or above `median + 1.5 * IQR` of the tensor's importances.

  The KL is computed stably (`fusion_kl`): mergekit's float32 formula cancels on
  nearly equal rows and flips keep/drop decisions there; this one agrees with the
  same formula evaluated in float64. Quantiles are mergekit's: the sorted value at
  index `floor(q * (n - 1))`. mergekit estimates them from 1M random samples when a
  tensor has more elements; we use every element (the same up to that sampling)."""
  b, m = _f32(base), _f32(model)
  imp = jnp.abs(m - b) * fusion_kl(b, m)
  srt = jnp.sort(imp.reshape(-1))
  n = srt.shape[0]
  q1, med, q3 = (srt[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
  keep = (imp >= med + 1.5 * (q3 - q1)).astype(F32)
  return (b + (m - b) * keep).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("plus",))
def ram_leaf(base, models, epsilon, r=0.1, alpha=0.2, *, plus: bool = False):
  """mergekit's `ram` / `ramplus_tl` (arXiv:2601.13572): task-vector entries above
  `epsilon` that only one model changes are kept whole, entries several models change
  are averaged over those models. RAM+ (tensor-local) scales each model's unique
  entries by `1 + r * clip(shared / unique, 0, alpha)`, its counts of shared and
  unique entries in this tensor."""
  b = _f32(base)
  tv = jnp.stack([(_f32(x) - b).reshape(-1) for x in models])          # (N, D)
  nz = jnp.abs(tv) > epsilon
  counts = jnp.sum(nz, axis=0, keepdims=True)
  overlap, unique = counts > 1, counts == 1
  tvz = tv * nz.astype(F32)
  uniq = tvz * unique.astype(F32)
  if plus:
    shared_n = jnp.sum(nz & overlap, axis=1).astype(F32)
    unique_n = jnp.sum(nz & unique, axis=1).astype(F32)
    lam = 1 + r * jnp.clip(shared_n / jnp.maximum(unique_n, epsilon), 0.0, alpha)
    uniq = uniq * lam[:, None]
  merged = jnp.sum(uniq + tvz * overlap.astype(F32) / jnp.maximum(counts, 1).astype(F32),
                   axis=0)
  return (b + merged.reshape(b.shape)).astype(base.dtype)


@method("nearswap", reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        base="required", models=1, inputs=("base", "model"))
def _nearswap(base, models, *, t: float = P(lo=0, positional=True,
                                            doc="distance under which the model's value is taken")):
  """NearSwap: take the model's value where it is within about `t` of the base's."""
  return nearswap_leaf(base, models[0], np.float32(t))


@method("sce", reference="https://arxiv.org/abs/2408.07990", base="required")
def _sce(base, models, *,
         select_topk: float = P(1.0, lo=0, hi=1, doc="fraction kept by variance (1: all)"),
         int8_mask: bool = P(False, doc="accepted for mergekit; no effect")):
  """SCE: select by variance, weight by task-vector energy, erase sign conflicts."""
  if select_topk <= 0:
    return base
  return sce_leaf(base, models, np.float32(select_topk), select=bool(select_topk < 1))


@method("arcee_fusion", reference="https://arcee.ai", base="required", models=1,
        inputs=("base", "model"))
def _arcee_fusion(base, models):
  """Arcee Fusion: keep the model's change where its KL-weighted importance is an outlier."""
  return arcee_fusion_leaf(base, models[0])


@method("ram", reference="https://arxiv.org/abs/2601.13572", base="required")
def _ram(base, models, *, epsilon: float = P(1e-5, lo=0, doc="|delta| above which an entry "
                                                             "counts as changed")):
  """RAM: task-vector entries one model changes kept whole, shared ones averaged."""
  return ram_leaf(base, models, np.float32(epsilon))


@method("ramplus_tl", reference="https://arxiv.org/abs/2601.13572", base="required")
def _ramplus_tl(base, models, *,
                r: float = P(0.1, lo=0, doc="strength of the overlap boost"),
                alpha: float = P(0.2, lo=0, doc="cap of the shared-to-unique ratio"),
                epsilon: float = P(1e-5, lo=0, doc="|delta| above which an entry counts")):
  """RAM+ (tensor-local): RAM with each model's unique entries scaled up by its overlap."""
  return ram_leaf(base, models, np.float32(epsilon), np.float32(r), np.float32(alpha),
                  plus=True)


nearswap = METHODS["nearswap"].fn
sce = METHODS["sce"].fn
arcee_fusion = METHODS["arcee_fusion"].fn
ram = METHODS["ram"].fn
ramplus_tl = METHODS["ramplus_tl"].fn
