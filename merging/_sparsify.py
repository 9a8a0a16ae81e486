"""Sparsifiers for task vectors, in float32 jnp, jit-able (mergekit's `sparsify.py`).

Counts that depend on the density (`k`, the number of outliers) are computed on the
host from the Python density and the leaf size, exactly as mergekit does
(`int(density * numel)`), and passed in as traced integers, so one compiled
function serves every density.

Top-k selection does not sort: the k-th largest magnitude is found by bisection
on the float32 bit pattern (31 O(n) passes), ties at the threshold are broken by
flat index. mergekit uses `torch.argsort`, whose tie order is unspecified; the
kept set only differs on exactly equal magnitudes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
RESCALE_EPS = 1e-7


def _bits(absx):
  return lax.bitcast_convert_type(absx.reshape(-1).astype(F32), jnp.int32)


def kth_largest(bits: jax.Array, k) -> tuple[jax.Array, jax.Array]:
  """`(thr, cut)` such that `select(bits, thr, cut)` keeps exactly the `k` largest.

  `bits`: flat int32 bit patterns of non-negative float32 values (ordered like the
  values). `thr` is the k-th largest pattern, found by bisection (31 fused counting
  passes); among entries equal to `thr`, those with flat index `< cut` are kept.
  The index bisection runs only when several entries tie at the threshold.
  """
  n = bits.shape[0]
  k = jnp.asarray(k, jnp.int32)

  def body(b, thr):
    cand = thr | jnp.left_shift(jnp.int32(1), 30 - b)
    ok = jnp.sum(bits >= cand, dtype=jnp.int32) >= k
    return jnp.where(ok, cand, thr)

  thr = lax.fori_loop(0, 31, body, jnp.int32(0))
  need = k - jnp.sum(bits > thr, dtype=jnp.int32)
  n_eq = jnp.sum(bits == thr, dtype=jnp.int32)

  def cutoff_by_index(_):
    # the smallest c with #(bits == thr & idx < c) >= need, by bisection on c
    idx = lax.iota(jnp.int32, n)
    def step(b, c):
      cand = c | jnp.left_shift(jnp.int32(1), 30 - b)
      few = jnp.sum((bits == thr) & (idx < cand), dtype=jnp.int32) < need
      return jnp.where(few, cand, c)
    return lax.fori_loop(0, 31, step, jnp.int32(0)) + 1

  cut = lax.cond(n_eq <= need, lambda _: jnp.int32(n), cutoff_by_index, None)
  return thr, cut


def select(bits, thr, cut):
  """The elementwise mask of `kth_largest` (fuses into its consumer)."""
  return (bits > thr) | ((bits == thr) & (lax.iota(jnp.int32, bits.shape[0]) < cut))


@jax.jit
def topk_mask(absx: jax.Array, k) -> jax.Array:
  """Boolean mask of the `k` largest entries of `absx` (>= 0), exactly `k`; ties at
  the k-th value are taken in flat-index order. `k` may be traced."""
  bits = _bits(absx)
  thr, cut = kth_largest(bits, k)
  return select(bits, thr, cut).reshape(absx.shape)


def rescaled(x: jax.Array, mask: jax.Array, norm) -> jax.Array:
  """`x * mask`, rescaled to `x`'s L1 norm when `norm == "l1"` (mergekit)."""
  masked = jnp.where(mask, x, jnp.zeros((), x.dtype))
  if norm is None:
    return masked
  if norm != "l1":
    raise ValueError(f"unknown rescale norm {norm!r}; expected 'l1' or None")
  before = jnp.sum(jnp.abs(x))
  after = jnp.sum(jnp.abs(masked))
  small = (before < RESCALE_EPS) | (after < RESCALE_EPS)
  ratio = jnp.where(small, jnp.ones((), x.dtype), before / jnp.where(small, 1, after))
  return masked * ratio


def magnitude_k(numel: int, density: float) -> int:
  """mergekit's count for `magnitude`: all at density >= 1, none at <= 0, else >= 1."""
  if density >= 1:
    return numel
  if density <= 0 or numel == 0:
    return 0
  return max(1, int(density * numel))


def magnitude(x, k, rescale=None):
  """Keep the `k` largest-magnitude entries (TIES trim)."""
  bits = _bits(jnp.abs(x))
  thr, cut = kth_largest(bits, k)
  return rescaled(x, select(bits, thr, cut).reshape(x.shape), rescale)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
  """(keep_top, drop_top) for breadcrumbs: keep ranks [n_bot, n_bot + target) ascending."""
  if density >= 1:   # mergekit returns the tensor unchanged (gamma ignored)
    return numel, 0
  target = int(density * numel)
  n_top = int(gamma * numel)
  n_bot = max(0, numel - target - n_top)
  # ascending positions [n_bot, n_bot + target) == top (numel - n_bot) minus top (numel - n_bot - target)
  return numel - n_bot, numel - n_bot - target


def magnitude_outliers(x, keep_top, drop_top, rescale=None):
  """Breadcrumbs: drop the largest `gamma` fraction and the smallest ones."""
  bits = _bits(jnp.abs(x))
  t1, c1 = kth_largest(bits, keep_top)
  t2, c2 = kth_largest(bits, drop_top)
  mask = select(bits, t1, c1) & ~select(bits, t2, c2)
  return rescaled(x, mask.reshape(x.shape), rescale)


def bernoulli(x, density, key, rescale=None):
  """DARE: keep each entry with probability `density`.

  `rescale`: "l1" (mergekit 0.1.5: match the L1 norm of the delta), "inverse"
  (the DARE paper: divide kept entries by `density`) or None.
  """
  p = jnp.asarray(density, F32)
  mask = jax.random.bernoulli(key, p, x.shape)
  if rescale == "inverse":
    return jnp.where(mask, x / jnp.where(p > 0, p, 1), jnp.zeros((), x.dtype))
  return rescaled(x, mask, rescale)


def della_probs(x, lo, span):
  """DELLA keep probabilities: `lo + span * rank_norm`, ranks of |x| along axis 1.

  mergekit ranks each row of a 2-D (out, in) tensor along dim 1 (a 1-D tensor is
  one row); `lo = density - epsilon`, `span = 2 * epsilon`.
  """
  x2 = x[None] if x.ndim < 2 else x
  a = jnp.abs(x2)
  order = jnp.argsort(a, axis=1)
  ranks = jnp.argsort(order, axis=1).astype(F32)    # 0-based; min 0, max n-1
  n = x2.shape[1]
  rank_norm = ranks / max(n - 1, 1) if n > 1 else jnp.zeros_like(ranks)
  probs = jnp.asarray(lo, F32) + rank_norm * jnp.asarray(span, F32)
  return probs.reshape(x.shape) if x.ndim < 2 else probs


def della_magprune(x, lo, span, key, rescale=None):
  """DELLA MAGPRUNE: drop with magnitude-ranked probabilities.

  `rescale`: "l1" (mergekit) or "inverse" (the paper: divide by each entry's keep
  probability) or None.
  """
  probs = della_probs(x, lo, span)
  mask = jax.random.uniform(key, x.shape, F32) < probs
  if rescale == "inverse":
    return jnp.where(mask, x / jnp.where(probs > 0, probs, 1), jnp.zeros((), x.dtype))
  return rescaled(x, mask, rescale)


def della_bounds(density: float, epsilon: float, where: str = "") -> tuple[float, float]:
  """(lo, span) for DELLA, with mergekit's validation and density edge cases."""
  if density >= 1:
    return 1.0, 0.0
  if density <= 0:
    return 0.0, 0.0
  if density + epsilon >= 1 or density - epsilon <= 0:
    raise ValueError(f"{where}della: epsilon {epsilon:g} must keep density +/- epsilon in (0, 1); "
                     f"density is {density:g}")
  return density - epsilon, 2 * epsilon


__all__ = ["kth_largest", "select", "topk_mask", "rescaled", "magnitude", "magnitude_k", "magnitude_outliers",
           "outlier_counts", "bernoulli", "della_magprune", "della_probs", "della_bounds"]
