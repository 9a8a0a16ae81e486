"""IR-QLoRA's information calibration quantization (ICQ) for the bnb 4-bit formats.

Per quantization block, ICQ subtracts a calibration constant `tau` before NF4 (or
FP4) quantization and adds it back after dequantization, choosing `tau` to maximize
the entropy of the block's 16-code histogram (Qin et al., "Accurate LoRA-Finetuning
Quantization of LLMs via Information Retention", ICML 2024, arXiv:2402.05445; the
reference implementation is `search` / `nf4_quant` in htqin/IR-QLoRA's `utils.py`):

    tau0   = median of the block (the lower middle value for an even count, as torch)
    absmax = max |w - tau0|
    tau    = factor * absmax + tau0,  factor in linspace(-r * SIGMA, r * SIGMA, 2 n + 1)
    keep the first factor (grid order) whose codes of `w - tau` have the largest
    entropy -sum f log2 f (f = count / block, 0 log 0 = 0)

The codes and absmax (and its double quantization) are bitsandbytes' `quantize_4bit`
of `W - tau`. The taus are stored as 8-bit codes of bitsandbytes' dynamic map in
groups of `TAU_GROUP = 256` consecutive blocks: `tau_absmax = max |tau|` per group
and `code = argmin |tau / tau_absmax - DYNAMIC8|` (ties to the lower index). The
weight dequantizes to `dequantize_4bit(codes) + DYNAMIC8[code] * tau_absmax`.

Arithmetic follows the reference operation by operation, so the result is equal to it
bit for bit (tests/test_icq.py runs it against a transcription of the reference):
`factor` is rounded to float32 before it multiplies; during the search every
operation is rounded to the weight's dtype (the reference computes in the weight's
dtype, bf16 for a bf16 model), while the final `tau` and `W - tau` are float32 (in
the reference the float32 best-factor tensor promotes them). The entropy adds the
16 terms in code order, each `-f * log2(f)` rounded to float32 as torch does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quantization import _formats as F

ICQ_FORMATS = ("nf4", "fp4")
TAU_GROUP = 256           # the reference's blocksize2: taus per float32 tau scale
# The reference's sigma: `1 / norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1]).tolist()[0]`
# (the probability is rounded to float32 first, hence not exactly 1 / ppf(0.9677083)).
SIGMA = 0.5410872368978237


def factor_grid(icq_range: float, icq_steps: int) -> np.ndarray:
  """The `2 * icq_steps + 1` factors the search tries, float32 (the reference's
  float64 `np.linspace(-range * SIGMA, range * SIGMA, 2 * steps + 1)`, each rounded to
  float32 as torch rounds a Python scalar multiplying a float32 tensor)."""
  r = icq_range * SIGMA
  return np.linspace(-r, r, 2 * icq_steps + 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def entropy_terms(block: int) -> np.ndarray:
  """(block + 1,) float32: `-f * log2(f)` for f = count / block, as torch computes it
  in float32 (`log2` correctly rounded, then one rounded product; 0 for count 0)."""
  f = (np.arange(block + 1, dtype=np.float32) / np.float32(block)).astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    lg = np.log2(f.astype(np.float64)).astype(np.float32)
    t = (-f * lg).astype(np.float32)
  t[0] = 0.0
  return t


def _round(x, dtype):
  """float32 `x` rounded to `dtype`'s precision (kept float32); identity for float32.
  `reduce_precision` is not folded away, unlike a cast there and back."""
  if jnp.dtype(dtype) == jnp.float32:
    return x
  fi = jnp.finfo(dtype)
  return lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _lower_median(blocks, valid):
  """torch's `median(dim=-1)` (the lower middle value) of the valid entries."""
  if valid is None:
    return jnp.sort(blocks, axis=-1)[..., (blocks.shape[-1] - 1) // 2]
  s = jnp.sort(jnp.where(valid, blocks, jnp.inf), axis=-1)
  m = jnp.sum(valid, axis=-1)
  idx = jnp.maximum(m - 1, 0) // 2
  return jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]


def code_counts(rows, n_rows: int, valid, fmt: str):
  """(nb, 16) int32 histogram of the codes of `n_rows` rows of values already divided
  by their block's absmax: `rows(i)` is row `i` (nb,) of a (block, nb) array whose
  columns are the blocks; `valid` (block, nb) bool or None.

  Counts the values above each of the 15 midpoints (the codes themselves are never
  formed), walking the block's rows in a loop: each row updates all blocks at once,
  which XLA vectorizes (a reduction over the block axis measured 3-5x slower on CPU).
  """
  mids, order = F.BOUNDS[fmt]
  m = jnp.asarray(mids)[:, None]

  def row(i, acc):
    hit = rows(i)[None, :] > m
    if valid is not None:
      hit = hit & lax.dynamic_index_in_dim(valid, i, 0, keepdims=False)[None, :]
    return acc + hit.astype(jnp.int32)

  nb = jax.eval_shape(rows, 0).shape[0]
  above = lax.fori_loop(0, n_rows, row, jnp.zeros((len(mids), nb), jnp.int32))
  if valid is None:
    n = jnp.full((nb,), n_rows, jnp.int32)
  else:
    n = jnp.sum(valid, axis=0, dtype=jnp.int32)
  ge = [n] + [above[j] for j in range(len(mids))] + [jnp.zeros_like(n)]
  by_pos = [ge[p] - ge[p + 1] for p in range(16)]        # sorted position p
  if fmt == "nf4":
    return jnp.stack(by_pos, axis=-1)
  by_code = [None] * 16
  for p, c in enumerate(order):
    by_code[int(c)] = by_pos[p]
  return jnp.stack(by_code, axis=-1)


def block_entropy(counts, block: int):
  """float32 entropy of each block's code histogram (..., 16), terms added in code
  order as the reference's `evaluate_entropy` does."""
  terms = jnp.asarray(entropy_terms(block))[counts]
  acc = jnp.zeros(counts.shape[:-1], jnp.float32)
  for v in range(16):
    acc = acc + terms[..., v]
  return acc


def search(blocks, valid, *, fmt: str, grid: np.ndarray, dtype):
  """Per-block float32 `tau` of ICQ's entropy search.

  Args:
    blocks: (nb, block) float32 weight values (exactly representable in `dtype`).
    valid: (nb, block) bool, False on padding (excluded from median, absmax and the
      histogram), or None.
    fmt: "nf4" or "fp4". grid: float32 factors. dtype: the weight's dtype (the
      search rounds each operation to it, as the reference).

  Returns:
    (nb,) float32 taus, `factor * absmax + tau0` in float32 for the best factor.

  The factors are scanned keeping the best one so far, so memory stays a few copies
  of the weight. Inside the scan the blocks are columns (`(block, nb)`), so the
  histogram is a loop over rows that updates every block at once (`code_counts`).
  """
  tau0 = _lower_median(blocks, valid)
  bt = blocks.T                                          # (block, nb)
  vt = None if valid is None else valid.T
  # Rounding is monotone, so max |round(w - t)| over a block is reached at its largest
  # or smallest (valid) value: the absmax of every shifted block from two values.
  hi = jnp.max(blocks if valid is None else jnp.where(valid, blocks, -jnp.inf), axis=-1)
  lo = jnp.min(blocks if valid is None else jnp.where(valid, blocks, jnp.inf), axis=-1)
  spread = lambda t: jnp.maximum(jnp.abs(_round(hi - t, dtype)),  # noqa: E731
                                 jnp.abs(_round(lo - t, dtype)))
  absmax0 = spread(tau0)
  block = blocks.shape[-1]

  def step(carry, factor):
    best_e, best_f = carry
    tau = _round(F._no_fma(_round(factor * absmax0, dtype)) + tau0, dtype)
    inv = F._inv_absmax(spread(tau))
    rows = lambda i: _round(  # noqa: E731
        lax.dynamic_index_in_dim(bt, i, 0, keepdims=False) - tau, dtype) * inv
    e = block_entropy(code_counts(rows, block, vt, fmt), block)
    better = e > best_e                                  # strictly: ties keep the first
    return (jnp.where(better, e, best_e), jnp.where(better, factor, best_f)), None

  init = (jnp.full(tau0.shape, -jnp.inf, jnp.float32), jnp.zeros(tau0.shape, jnp.float32))
  (_, best), _ = lax.scan(step, init, jnp.asarray(grid, jnp.float32))
  return F._no_fma(best * absmax0) + tau0


def nearest_dynamic8(x):
  """uint8 index of the nearest entry of `F.DYNAMIC8` to each float32 `x` in [-1, 1]
  (`argmin |x - DYNAMIC8|`, ties to the lower index): the two neighbours in the sorted
  map are the only candidates, since the rounded distances are monotone on each side."""
  table = jnp.asarray(F.DYNAMIC8)
  hi = jnp.clip(jnp.searchsorted(table, x, side="right"), 1, table.shape[0] - 1)
  lo = hi - 1
  d_lo = jnp.abs(x - table[lo])
  d_hi = jnp.abs(x - table[hi])
  return jnp.where(d_hi < d_lo, hi, lo).astype(jnp.uint8)


def quantize_taus(tau):
  """(nb,) float32 taus -> (codes uint8 (nb,), tau_absmax float32 (ceil(nb / 256),)).
  The last group is padded with zeros; a group of zeros has scale 0 and the codes of
  0.0."""
  nb = tau.shape[0]
  ng = -(-nb // TAU_GROUP)
  g = jnp.pad(tau, (0, ng * TAU_GROUP - nb)).reshape(ng, TAU_GROUP)
  scale = jnp.max(jnp.abs(g), axis=-1)
  safe = jnp.where(scale > 0, scale, jnp.float32(1.0))
  ratio = jnp.where((scale > 0)[:, None], g / safe[:, None], jnp.float32(0.0))
  return nearest_dynamic8(ratio).reshape(-1)[:nb], scale


def dequantize_taus(codes, tau_absmax):
  """float32 taus (..., nb) from codes (..., nb) and scales (..., ceil(nb / 256))."""
  return F.dequantize_dynamic8(codes, tau_absmax, block=TAU_GROUP)


def check_icq(fmt: str, icq_range, icq_steps, where: str) -> None:
  if fmt not in ICQ_FORMATS:
    raise ValueError(f"{where}: icq=True calibrates the bitsandbytes 4-bit formats "
                     f"({', '.join(ICQ_FORMATS)}); format {fmt!r} has no ICQ form")
  if (isinstance(icq_steps, bool) or not isinstance(icq_steps, (int, np.integer))
      or icq_steps < 0):
    raise ValueError(f"{where}: icq_steps must be an int >= 0 (the search tries "
                     f"2 * icq_steps + 1 factors), got {icq_steps!r}")
  if (isinstance(icq_range, bool) or not isinstance(icq_range, (int, float, np.floating))
      or not np.isfinite(icq_range) or icq_range < 0):
    raise ValueError(f"{where}: icq_range must be a finite float >= 0, got {icq_range!r}")
