"""Code tables and the exact arithmetic of bitsandbytes' blockwise quantization.

Every table here is the one bitsandbytes 0.50.2 defines (`bitsandbytes.functional.
get_4bit_type`, `create_dynamic_map`), stored as float32:

- NF4: 16 quantiles of N(0, 1) scaled to [-1, 1] (QLoRA), sorted, index = code.
- FP4: 1 sign, 2 exponent, 1 mantissa bit, bias 2, listed in bit-pattern order
  (`0b0000 = +0`, `0b0001 = 0.0625/12`, ...; bit 3 is the sign), divided by 12.
  Code 8 is +0.0 in the table (bitsandbytes' `quant_map`), but bitsandbytes'
  dequantization kernels (CPU and CUDA) compute `sign * 0 * absmax`, so code 8
  dequantizes to -0.0: `VALUES` holds the values we dequantize to, `TABLES` the
  tables (quant maps) as bitsandbytes stores them.
- int4: symmetric, code `c` in 1..15 stands for `(c - 8) / 7` (code 0 is unused).
- int8: symmetric, int8 code `q` in -127..127 stands for `q / 127`.
- DYNAMIC8: the signed 8-bit dynamic map used to quantize absmax values in
  double quantization (bitsandbytes `create_dynamic_map()`), 256 sorted values.

The quantizers reproduce bitsandbytes' CPU arithmetic operation by operation so
the bytes are equal: `quantize_4bit` (scale by `1 / absmax`, clamp, bucketize
against the midpoints of the sorted table; ties go to the lower code), the 8-bit
blockwise quantizer (a 65536-entry lookup table over [-1, 1]), and torch's
float32 `mean` (a cascade sum with 8 float lanes) for the double-quant offset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("nf4", "fp4", "int4", "int8")
FOUR_BIT = ("nf4", "fp4", "int4")
BLOCK_SIZES = tuple(2 ** k for k in range(5, 13))   # 32 .. 4096
NESTED_BLOCK = 256                                  # bitsandbytes' double-quant block

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

# bitsandbytes writes `-0` for code 8 in Python, which is the integer 0: +0.0.
_FP4_RAW = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], np.float32)
FP4 = (_FP4_RAW / np.float32(12.0)).astype(np.float32)

INT4 = np.array([-8.0 / 7.0] + [(c - 8) / 7.0 for c in range(1, 16)], np.float32)

DYNAMIC8 = np.array([
    -0.992968738079071, -0.9789062738418579, -0.96484375, -0.9507812261581421,
    -0.936718761920929, -0.922656238079071, -0.9085937738418579, -0.89453125,
    -0.8804687261581421, -0.866406261920929, -0.852343738079071, -0.8382812738418579,
    -0.82421875, -0.8101562261581421, -0.796093761920929, -0.782031238079071,
    -0.7679687738418579, -0.75390625, -0.7398437261581421, -0.725781261920929,
    -0.7117187976837158, -0.6976562738418579, -0.68359375, -0.6695312261581421,
    -0.655468761920929, -0.6414062976837158, -0.6273437738418579, -0.61328125,
    -0.5992187261581421, -0.585156261920929, -0.5710937976837158, -0.5570312738418579,
    -0.54296875, -0.5289062261581421, -0.5148437023162842, -0.500781238079071,
    -0.48671871423721313, -0.47265625, -0.4585937261581421, -0.44453126192092896,
    -0.43046873807907104, -0.4164062440395355, -0.40234375, -0.3882812261581421,
    -0.37421876192092896, -0.36015623807907104, -0.3460937440395355, -0.33203125,
    -0.3179687261581421, -0.30390626192092896, -0.28984373807907104, -0.2757812738418579,
    -0.26171875, -0.24765624105930328, -0.23359374701976776, -0.21953125298023224,
    -0.20546874403953552, -0.19140625, -0.17734375596046448, -0.16328124701976776,
    -0.14921875298023224, -0.13515624403953552, -0.12109375, -0.10703125596046448,
    -0.09859374910593033, -0.09578125923871994, -0.09296875447034836,
    -0.09015624970197678, -0.08734375238418579, -0.08453124761581421,
    -0.08171875774860382, -0.07890625298023224, -0.07609374821186066,
    -0.07328125089406967, -0.07046874612569809, -0.0676562562584877,
    -0.06484375149011612, -0.062031250447034836, -0.05921875312924385,
    -0.05640624836087227, -0.053593751043081284, -0.05078125, -0.047968748956918716,
    -0.04515625163912773, -0.04234374687075615, -0.039531249552965164,
    -0.03671875223517418, -0.033906251192092896, -0.031093750149011612,
    -0.028281250968575478, -0.025468749925494194, -0.02265625074505806,
    -0.019843751564621925, -0.017031250521540642, -0.014218750409781933,
    -0.011406250298023224, -0.009718749672174454, -0.009156249463558197,
    -0.008593750186264515, -0.008031249977648258, -0.0074687497690320015,
    -0.006906250026077032, -0.006343749817460775, -0.005781250074505806,
    -0.0052187503315508366, -0.0046562496572732925, -0.004093749914318323,
    -0.0035312497057020664, -0.002968749962747097, -0.002406249986961484,
    -0.001843750011175871, -0.001281249918974936, -0.0009437500848434865,
    -0.0008312499849125743, -0.0007187500596046448, -0.0006062500760890543,
    -0.000493750034365803, -0.0003812500217463821, -0.0002687500382307917,
    -0.00015625001105945557, -8.874999912222847e-05, -6.625000241911039e-05,
    -4.374999844003469e-05, -2.1249998098937795e-05, -7.749999895168003e-06,
    -3.250000190746505e-06, -5.500000384017767e-07, 0.0, 5.500000384017767e-07,
    3.250000190746505e-06, 7.749999895168003e-06, 2.1249998098937795e-05,
    4.374999844003469e-05, 6.625000241911039e-05, 8.874999912222847e-05,
    0.00015625001105945557, 0.0002687500382307917, 0.0003812500217463821,
    0.000493750034365803, 0.0006062500760890543, 0.0007187500596046448,
    0.0008312499849125743, 0.0009437500848434865, 0.001281249918974936,
    0.001843750011175871, 0.002406249986961484, 0.002968749962747097,
    0.0035312497057020664, 0.004093749914318323, 0.0046562496572732925,
    0.0052187503315508366, 0.005781250074505806, 0.006343749817460775,
    0.006906250026077032, 0.0074687497690320015, 0.008031249977648258,
    0.008593750186264515, 0.009156249463558197, 0.009718749672174454,
    0.011406250298023224, 0.014218750409781933, 0.017031250521540642,
    0.019843751564621925, 0.02265625074505806, 0.025468749925494194,
    0.028281250968575478, 0.031093750149011612, 0.033906251192092896,
    0.03671875223517418, 0.039531249552965164, 0.04234374687075615, 0.04515625163912773,
    0.047968748956918716, 0.05078125, 0.053593751043081284, 0.05640624836087227,
    0.05921875312924385, 0.062031250447034836, 0.06484375149011612, 0.0676562562584877,
    0.07046874612569809, 0.07328125089406967, 0.07609374821186066, 0.07890625298023224,
    0.08171875774860382, 0.08453124761581421, 0.08734375238418579, 0.09015624970197678,
    0.09296875447034836, 0.09578125923871994, 0.09859374910593033, 0.10703125596046448,
    0.12109375, 0.13515624403953552, 0.14921875298023224, 0.16328124701976776,
    0.17734375596046448, 0.19140625, 0.20546874403953552, 0.21953125298023224,
    0.23359374701976776, 0.24765624105930328, 0.26171875, 0.2757812738418579,
    0.28984373807907104, 0.30390626192092896, 0.3179687261581421, 0.33203125,
    0.3460937440395355, 0.36015623807907104, 0.37421876192092896, 0.3882812261581421,
    0.40234375, 0.4164062440395355, 0.43046873807907104, 0.44453126192092896,
    0.4585937261581421, 0.47265625, 0.48671871423721313, 0.500781238079071,
    0.5148437023162842, 0.5289062261581421, 0.54296875, 0.5570312738418579,
    0.5710937976837158, 0.585156261920929, 0.5992187261581421, 0.61328125,
    0.6273437738418579, 0.6414062976837158, 0.655468761920929, 0.6695312261581421,
    0.68359375, 0.6976562738418579, 0.7117187976837158, 0.725781261920929,
    0.7398437261581421, 0.75390625, 0.7679687738418579, 0.782031238079071,
    0.796093761920929, 0.8101562261581421, 0.82421875, 0.8382812738418579,
    0.852343738079071, 0.866406261920929, 0.8804687261581421, 0.89453125,
    0.9085937738418579, 0.922656238079071, 0.936718761920929, 0.9507812261581421,
    0.96484375, 0.9789062738418579, 0.992968738079071, 1.0,
], np.float32)

TABLES = {"nf4": NF4, "fp4": FP4, "int4": INT4}

_FP4_VALUES = FP4.copy()
_FP4_VALUES[8] = np.float32(-0.0)      # sign bit set: bitsandbytes' kernels give -0.0
# float32 value each 4-bit code dequantizes to (before the absmax multiply).
VALUES = {"nf4": NF4, "fp4": _FP4_VALUES, "int4": INT4}


def byte_pair_table(fmt: str) -> np.ndarray:
  """(256, 2) float32: the values of the high and the low nibble of every code byte
  (a byte holds the even element in its high nibble), so one lookup decodes a byte."""
  v = VALUES[fmt]
  b = np.arange(256)
  return np.stack([v[b >> 4], v[b & 15]], axis=-1).astype(np.float32)


def _sorted_bounds(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Midpoints of the sorted table (float32, as bitsandbytes computes them) and the
  sorted-position -> code map (a stable argsort, equal to torch's for these tables)."""
  order = np.argsort(table, kind="stable")
  s = table[order]
  mids = ((s[:-1] + s[1:]) / np.float32(2.0)).astype(np.float32)
  return mids, order.astype(np.uint8)


BOUNDS = {name: _sorted_bounds(t) for name, t in (("nf4", NF4), ("fp4", FP4))}


def _build_lut8(code: np.ndarray, size: int = 65536) -> np.ndarray:
  """bitsandbytes' CPU 8-bit quantizer table: value grid over [-1, 1] -> nearest code."""
  mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
  i = np.arange(size, dtype=np.float32)
  val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(size - 1)).astype(np.float32)
  return np.minimum(np.searchsorted(mids, val, side="left"), code.size - 1).astype(np.uint8)


LUT8 = _build_lut8(DYNAMIC8)


def check_format(fmt: str, where: str = "QuantConfig") -> str:
  if fmt not in FORMATS:
    raise ValueError(f"{where}: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
  return fmt


def check_block_size(block_size, where: str = "QuantConfig") -> int:
  if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
      or int(block_size) not in BLOCK_SIZES):
    raise ValueError(f"{where}: block_size must be a power of two from 32 to 4096 "
                     f"({', '.join(map(str, BLOCK_SIZES))}), got {block_size!r}")
  return int(block_size)


def bits_per_code(fmt: str) -> int:
  return 8 if fmt == "int8" else 4


# ----------------------------------------------------------------------------
# Blockwise quantization of values already grouped as (..., nblocks, block).

def _inv_absmax(absmax):
  # bitsandbytes clamps absmax at 1e-38 before the reciprocal; an all-zero block
  # scales to zeros either way (and 1e-38 is subnormal, which XLA may flush).
  safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
  return jnp.where(absmax > 0, jnp.float32(1.0) / safe, jnp.zeros_like(absmax))


def quantize_blocks(blocks: jax.Array, fmt: str, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Codes and absmax of float32 `blocks`, each block running along `axis`
  (e.g. (..., nblocks, block) with axis=-1).

  Returns `(codes, absmax)`: codes uint8 4-bit values (0..15, unpacked) or int8 for
  "int8", shape of `blocks`; absmax float32, `blocks` without `axis`.
  """
  absmax = jnp.max(jnp.abs(blocks), axis=axis)
  scaled = blocks * jnp.expand_dims(_inv_absmax(absmax), axis)
  return codes_of_scaled(jnp.clip(scaled, -1.0, 1.0), fmt), absmax


def codes_of_scaled(scaled: jax.Array, fmt: str) -> jax.Array:
  """Codes of float32 values already scaled into [-1, 1]: uint8 4-bit codes (0..15,
  unpacked; nf4/fp4 bucketized against the table's midpoints as bitsandbytes does,
  ties to the lower code) or int8 for "int8"; same shape as `scaled`."""
  if fmt in ("nf4", "fp4"):
    mids, order = BOUNDS[fmt]
    # torch.bucketize(right=False): the number of midpoints strictly below the value.
    pos = jnp.zeros(scaled.shape, jnp.uint8)
    for m in mids:
      pos = pos + (scaled > m).astype(jnp.uint8)
    if fmt == "nf4":
      return pos
    return jnp.asarray(order)[pos]
  if fmt == "int4":
    q = jnp.round(scaled * jnp.float32(7.0)).astype(jnp.int32)
    return (q + 8).astype(jnp.uint8)
  if fmt == "int8":
    return jnp.round(scaled * jnp.float32(127.0)).astype(jnp.int8)
  raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")


# bitsandbytes clamps the absmax of a trailing partial block at 1e-38 and stores it so.
BNB_MIN_ABSMAX = np.float32(1e-38)


def quantize_flat(x: jax.Array, fmt: str, block: int) -> tuple[jax.Array, jax.Array]:
  """bitsandbytes' `quantize_4bit` of a flattened weight, blocks running over it.

  Args:
    x: float32 (n,), the weight flattened in PyTorch's (out, in) row-major order.
  Returns:
    codes: (n,) unpacked codes (uint8, or int8 for "int8"); absmax: float32
    (ceil(n / block),). Full blocks scale by `1 / absmax`; a trailing partial block
    divides by its absmax clamped at 1e-38 and stores that clamped absmax, exactly
    as bitsandbytes does.
  """
  n = x.shape[0]
  full = n // block * block
  codes, absmax = quantize_blocks(x[:full].reshape(full // block, block), fmt)
  codes = codes.reshape(full)
  if full == n:
    return codes, absmax
  tail = x[full:]
  am = jnp.max(jnp.abs(tail))
  safe = jnp.where(am > 0, am, jnp.float32(1.0))
  scaled = jnp.where(am > 0, tail / safe, jnp.zeros_like(tail))
  tail_codes = codes_of_scaled(jnp.clip(scaled, -1.0, 1.0), fmt)
  am = jnp.where(am > 0, am, jnp.asarray(BNB_MIN_ABSMAX))
  return jnp.concatenate([codes, tail_codes]), jnp.concatenate([absmax, am[None]])


def code_values(codes: jax.Array, fmt: str) -> jax.Array:
  """float32 value in [-1, 1] of each (unpacked) code (`VALUES`: FP4 code 8 is -0.0)."""
  if fmt == "int8":
    return codes.astype(jnp.float32) * jnp.float32(1.0 / 127.0)
  return jnp.asarray(VALUES[fmt]).at[codes.astype(jnp.uint8)].get(mode="promise_in_bounds")


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte along the last axis, bitsandbytes' order: the first
  (even) element in the high nibble, the second in the low nibble."""
  c = codes.astype(jnp.uint8)
  return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  hi = packed >> 4
  lo = packed & jnp.uint8(0x0F)
  return jnp.stack([hi, lo], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------
# Double quantization (bitsandbytes `compress_statistics=True`).

def _ceil_log2(x: int) -> int:
  return 1 if x <= 2 else int(x - 1).bit_length()


def _seq_sum(x: jax.Array) -> jax.Array:
  """Left-to-right float sum over axis 1 of (groups, count, ...) -> (groups, ...),
  starting from 0 as torch's accumulators do."""
  acc = jnp.zeros((x.shape[0],) + x.shape[2:], x.dtype)
  for k in range(x.shape[1]):
    acc = acc + x[:, k]
  return acc


def _grouped(x: jax.Array, step: int):
  n = x.shape[0] // step
  full = x[:n * step].reshape((n, step) + x.shape[1:])
  groups = _seq_sum(full) if n else jnp.zeros((0,) + x.shape[1:], x.dtype)
  rest = x[n * step:]
  rem = _seq_sum(rest[None])[0] if rest.shape[0] else jnp.zeros(x.shape[1:], x.dtype)
  return groups, rem


def _multi_row_sum(rows: jax.Array) -> jax.Array:
  """torch `multi_row_sum` (4 cascade levels) over rows (S, ...) -> (...)."""
  s = rows.shape[0]
  step = 1 << max(4, _ceil_log2(s) // 4)
  chunks, rem0 = _grouped(rows, step)
  g1, rem1 = _grouped(chunks, step)
  g2, rem2 = _grouped(g1, step)
  acc3 = _seq_sum(g2[None])[0] if g2.shape[0] else jnp.zeros(rows.shape[1:], rows.dtype)
  return ((rem0 + rem1) + rem2) + acc3


def _row_sum(rows: jax.Array) -> jax.Array:
  """torch `row_sum`: 4 interleaved accumulators over (n, ...) -> (...)."""
  n = rows.shape[0]
  s = n // 4
  acc = _multi_row_sum(rows[:s * 4].reshape((s, 4) + rows.shape[1:]))
  p = acc[0]
  for k in range(s * 4, n):
    p = p + rows[k]
  for k in range(1, 4):
    p = p + acc[k]
  return p


TORCH_SUM_LANES = 8   # torch's CPU sum kernel uses 8 float lanes (AVX2 build) here


def torch_sum_f32(x: jax.Array, lanes: int | None = None) -> jax.Array:
  """float32 sum of a 1-D array in the exact order of torch's CPU `sum` kernel.

  Bit-exact for fewer than 32768 elements (torch's single-thread path); above
  that torch splits the sum over threads and results can differ in the last bit.
  """
  lanes = lanes or TORCH_SUM_LANES
  x = x.astype(jnp.float32)
  n = x.shape[0]
  if n < lanes:
    return _row_sum(x)
  nvec = n // lanes
  vec = _row_sum(x[:nvec * lanes].reshape(nvec, lanes))
  acc = jnp.float32(0.0)
  for k in range(nvec * lanes, n):
    acc = acc + x[k]
  for k in range(lanes):
    acc = acc + vec[k]
  return acc


def torch_mean_f32(x: jax.Array) -> jax.Array:
  """torch's float32 `mean` on CPU: the cascade sum, then a division by n."""
  # The barrier keeps XLA from turning the division by a constant into a
  # multiplication by its (inexact) reciprocal.
  n = jax.lax.optimization_barrier(jnp.full((), x.shape[0], jnp.float32))
  return torch_sum_f32(x) / n


def quantize_dynamic8(values: jax.Array, block: int = NESTED_BLOCK):
  """bitsandbytes' CPU blockwise 8-bit quantizer with the dynamic map.

  Args:
    values: float32 (n,).
  Returns:
    codes uint8 (n,), absmax float32 (ceil(n / block),).
  """
  n = values.shape[0]
  nb = -(-n // block)
  x = jnp.pad(values, (0, nb * block - n)).reshape(nb, block)
  absmax = jnp.max(jnp.abs(x), axis=-1)
  safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
  inv = jnp.float32(1.0) / safe
  v = jnp.clip(x * inv[:, None], -1.0, 1.0)
  idx = ((v + jnp.float32(1.0)) * jnp.float32(0.5)) * jnp.float32(65535.0) + jnp.float32(0.5)
  idx = idx.astype(jnp.int32)
  codes = jnp.asarray(LUT8)[idx]
  codes = jnp.where((absmax > 0)[:, None], codes, jnp.zeros_like(codes))
  return codes.reshape(-1)[:n], absmax


def dequantize_dynamic8(codes: jax.Array, absmax: jax.Array, block: int = NESTED_BLOCK):
  """codes uint8 (..., n), absmax (..., ceil(n/block)) -> float32 (..., n): code[q] * absmax.

  Blocks are formed by padding and reshaping, so each scale multiplies its block by
  broadcasting (a `repeat` of the scales measured ~20x slower on CPU)."""
  n = codes.shape[-1]
  nb = absmax.shape[-1]
  lead = codes.shape[:-1]
  c = codes.astype(jnp.uint8)
  if nb * block != n:
    c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, nb * block - n)])
  vals = jnp.asarray(DYNAMIC8).at[c].get(mode="promise_in_bounds").reshape(*lead, nb, block)
  return (vals * absmax[..., None]).reshape(*lead, nb * block)[..., :n]


def double_quantize(absmax: jax.Array):
  """(qabsmax uint8 (n,), nested_absmax f32 (ceil(n/256),), offset f32 ()) as bitsandbytes:
  offset = mean(absmax); absmax - offset quantized blockwise (256) with the dynamic map."""
  offset = torch_mean_f32(absmax)
  q, nested = quantize_dynamic8(absmax - offset)
  return q, nested, offset


def _no_fma(p):
  """`p` unchanged, behind a select XLA/LLVM cannot see through, so a following add
  is not contracted with the multiply that made `p` into one FMA (bitsandbytes
  rounds the product first)."""
  return jnp.where(p == p, p, jnp.float32(jnp.nan))  # noqa: PLR0124


def double_dequantize(qabsmax, nested, offset):
  """float32 absmax: dynamic[q] * nested + offset, rounded after the multiply and
  after the add as bitsandbytes does."""
  return _no_fma(dequantize_dynamic8(qabsmax, nested)) + offset
