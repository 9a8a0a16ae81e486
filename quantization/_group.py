"""`GroupQuantizedArray`: GPTQ-style group-wise integer kernels (2, 3, 4 and 8 bits).

The format llm-compressor writes and vLLM serves as compressed-tensors
"pack-quantized", and what GPTQ/AWQ models store: along the contracting axis `in`,
every `group_size` inputs of an output row share one scale and (asymmetric) one
zero point; a weight is `(q - z) * s` with `q` a signed `bits`-bit integer in
`[-2^(bits-1), 2^(bits-1) - 1]`.

Storage layout, PyTorch's `(out, in)` as for `QuantizedArray`, for a kernel
`(*batch, in, out)` used as `x @ W`:

    packed:  (*batch, out, ceil(in * bits / 32)) int32   compressed-tensors' dense bit
             stream of the unsigned codes `q + 2^(bits-1)`: element `i` of a row starts
             at bit `i * bits`, least significant bit first, words little-endian, so a
             3-bit code may straddle two words (0.20's `pack_to_int32`, byte for byte)
    scales:  (*batch, out, groups) floating (the weight's dtype, as compressed-tensors)
    zeros:   (*batch, out, groups) int8, or float32 (exact folds, e.g. QA-LoRA), or
             None (symmetric: zero point 0)
    g_idx:   (*batch, in) int32 group of each input, or None (input `i` is in group
             `i // group_size`; "activation order" checkpoints carry it)

`groups = ceil(in / group_size)`; a last group shorter than `group_size` is allowed
(compressed-tensors itself requires `in % group_size == 0`, so writing such a layer to
its format is an error). Per-channel quantization is one group of `in` inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import extend

GROUP_FORMATS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
GROUP_BITS = tuple(GROUP_FORMATS.values())
# group sizes one may ask for: powers of two from 32 to 1024, or -1 (per channel)
GROUP_SIZES = tuple(2 ** k for k in range(5, 11))


def _concrete(x) -> bool:
  return (not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)
          and hasattr(x, "shape"))


def qrange(bits: int) -> tuple[int, int]:
  """Signed code range `(qmin, qmax)` of `bits`-bit integers."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_words(n: int, bits: int) -> int:
  """int32 words holding `n` codes of `bits` bits in a dense bit stream."""
  return -(-n * bits // 32)


def check_bits(bits, where: str = "GroupQuantizedArray") -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in GROUP_BITS:
    raise ValueError(f"{where}: bits must be one of {', '.join(map(str, GROUP_BITS))} "
                     f"(formats {', '.join(GROUP_FORMATS)}), got {bits!r}")
  return int(bits)


def check_group_size(group_size, where: str = "QuantConfig") -> int:
  """A requested group size: a power of two from 32 to 1024, or -1 for per channel."""
  if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
      or (int(group_size) != -1 and int(group_size) not in GROUP_SIZES)):
    raise ValueError(f"{where}: the group size (block_size) of a group-wise integer format "
                     f"must be a power of two from 32 to 1024 "
                     f"({', '.join(map(str, GROUP_SIZES))}) or -1 (per channel), got "
                     f"{group_size!r}")
  return int(group_size)


# ----------------------------------------------------------------------------
# the dense bit stream (compressed-tensors 0.20 `pack_to_int32` / `unpack_from_int32`)

def _stream_layout(bits: int):
  """For the 32 codes of a `bits`-word chunk: word index, bit offset, straddle flag."""
  start = np.arange(32) * bits
  word, off = start // 32, start % 32
  straddle = off + bits > 32
  return word, off, straddle


@functools.partial(jax.jit, static_argnames=("bits",))
def pack_codes(u: jax.Array, bits: int) -> jax.Array:
  """Unsigned codes `u` (..., n) in `[0, 2^bits)` -> (..., ceil(n * bits / 32)) int32."""
  *lead, n = u.shape
  n32 = -(-n // 32)
  u = u.astype(jnp.uint32)
  if n32 * 32 != n:
    u = jnp.pad(u, [(0, 0)] * len(lead) + [(0, n32 * 32 - n)])
  u = u.reshape(*lead, n32, 32)
  word, off, straddle = _stream_layout(bits)
  words = [jnp.zeros((*lead, n32), jnp.uint32) for _ in range(bits)]
  for i in range(32):
    words[word[i]] = words[word[i]] | (u[..., i] << np.uint32(off[i]))
    if straddle[i]:
      words[word[i] + 1] = words[word[i] + 1] | (u[..., i] >> np.uint32(32 - off[i]))
  out = jnp.stack(words, axis=-1).reshape(*lead, n32 * bits)[..., :packed_words(n, bits)]
  return jax.lax.bitcast_convert_type(out, jnp.int32)


def _chunk_pieces(packed: jax.Array, bits: int) -> list[jax.Array]:
  """For `bits` that do not divide 32: the codes of (..., words) int32 as a list of
  uint32 arrays (..., chunks, m), in code order along the last axis (their
  concatenation is (..., chunks, 32)); a chunk is `bits` words holding 32 codes.

  Word by word: the codes inside word j are one broadcast shift of it; the code that
  straddles into word j + 1 takes its high bits from there. Static slices only: picking
  each code's word with an index array (`w[..., word]`) is a gather, and a concatenate
  inside a fused loop is a per-element branch; XLA:CPU runs both several times slower
  than a concatenate of finished pieces (see `_dequantize_t`)."""
  *lead, nw = packed.shape
  w = jax.lax.bitcast_convert_type(packed, jnp.uint32)
  mask = np.uint32((1 << bits) - 1)
  n32 = -(-nw // bits)
  if n32 * bits != nw:
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, n32 * bits - nw)])
  w = w.reshape(*lead, n32, bits)
  word, off, straddle = _stream_layout(bits)
  pieces = []
  for j in range(bits):
    wj = w[..., j]
    inside = np.flatnonzero((word == j) & ~straddle)
    shifts = off[inside].astype(np.uint32).reshape((1,) * wj.ndim + (-1,))
    pieces.append((wj[..., None] >> shifts) & mask)
    for i in np.flatnonzero((word == j) & straddle):
      hi = w[..., j + 1] << np.uint32(32 - off[i])
      pieces.append((((wj >> np.uint32(off[i])) | hi) & mask)[..., None])
  return pieces


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack_codes(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """(..., words) int32 -> the first `n` unsigned codes (..., n) as uint8."""
  *lead, nw = packed.shape
  w = jax.lax.bitcast_convert_type(packed, jnp.uint32)
  mask = np.uint32((1 << bits) - 1)
  if 32 % bits == 0:
    # codes never straddle a word: shift each word by every code position
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits)).reshape((1,) * w.ndim + (per,))
    u = (w[..., None] >> shifts) & mask
    return u.reshape(*lead, nw * per)[..., :n].astype(jnp.uint8)
  u = jnp.concatenate(_chunk_pieces(packed, bits), axis=-1)             # (..., n32, 32)
  return u.reshape(*lead, u.shape[-2] * 32)[..., :n].astype(jnp.uint8)


# ----------------------------------------------------------------------------
# the leaf

class GroupQuantizedArray(lj.ImplicitArray):
  """A group-wise integer kernel `(*batch, in, out)`; `materialize()` dequantizes it.

  Attributes:
    packed: `(*batch, out, ceil(in * bits / 32))` int32, the dense bit stream of the
      unsigned codes `q + 2^(bits-1)` (compressed-tensors' `weight_packed`).
    scales: `(*batch, out, groups)` floating scales.
    zeros: `(*batch, out, groups)` int8 (or float32) zero points in the signed code
      range, or None for symmetric quantization.
    g_idx: `(*batch, in)` int32 group of each input row, or None (contiguous groups).
    bits: 2, 3, 4 or 8. Static.
    group_size: inputs per group (`in` for per-channel). Static.
    kernel_shape: logical `(in, out)`. Static.
    dtype: logical dtype (the dtype of the weight that was quantized). Static.

  A weight is `W[i, o] = (q[o, i] - zeros[o, g(i)]) * scales[o, g(i)]`, computed in
  float32 and rounded once to `dtype` (for bf16/fp16 scales that equals
  compressed-tensors' arithmetic in the scales' dtype: both products are exact in
  float32).
  """

  packed: Any = extend.frozen()
  scales: Any = extend.frozen()
  zeros: Any = extend.frozen(None)
  g_idx: Any = extend.frozen(None)
  bits: int = extend.static(4)
  group_size: int = extend.static(128)
  kernel_shape: tuple = extend.static(())
  dtype: Any = extend.static(jnp.float32)

  def __check_init__(self):
    where = "GroupQuantizedArray"
    object.__setattr__(self, "kernel_shape", tuple(int(d) for d in self.kernel_shape))
    try:
      object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    except TypeError:
      raise TypeError(f"{where}: dtype {self.dtype!r} is not a dtype") from None
    check_bits(self.bits, where)
    if len(self.kernel_shape) != 2:
      raise ValueError(f"{where}: kernel_shape must be (in, out), got {self.kernel_shape}")
    k, n = self.kernel_shape
    if (isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer))
        or not 1 <= int(self.group_size) <= max(k, 1)):
      raise ValueError(f"{where}: group_size must be an int from 1 to in={k}, got "
                       f"{self.group_size!r}")
    for name in ("packed", "scales"):
      x = getattr(self, name)
      if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{where}: {name} must be an array, got {type(x).__name__}")
    if np.dtype(self.packed.dtype) != np.int32:
      raise TypeError(f"{where}: packed {tuple(self.packed.shape)} has dtype "
                      f"{np.dtype(self.packed.dtype).name}; expected int32")
    if not jnp.issubdtype(self.scales.dtype, jnp.floating):
      raise TypeError(f"{where}: scales {tuple(self.scales.shape)} have dtype "
                      f"{np.dtype(self.scales.dtype).name}; expected a floating dtype")
    batch = tuple(self.packed.shape[:-2])
    want = (n, packed_words(k, self.bits))
    if tuple(self.packed.shape[-2:]) != want:
      raise ValueError(f"{where}: packed {tuple(self.packed.shape)} does not fit kernel "
                       f"{self.kernel_shape} at {self.bits} bits; expected trailing {want}")
    groups = -(-k // self.group_size)
    if tuple(self.scales.shape) != (*batch, n, groups):
      raise ValueError(f"{where}: scales {tuple(self.scales.shape)} do not fit kernel "
                       f"{self.kernel_shape} with group_size {self.group_size}; expected "
                       f"{(*batch, n, groups)}")
    if self.zeros is not None:
      z = self.zeros
      if tuple(z.shape) != tuple(self.scales.shape):
        raise ValueError(f"{where}: zeros {tuple(z.shape)} do not match scales "
                         f"{tuple(self.scales.shape)}")
      if not (jnp.issubdtype(z.dtype, jnp.integer) or jnp.issubdtype(z.dtype, jnp.floating)):
        raise TypeError(f"{where}: zeros have dtype {np.dtype(z.dtype).name}")
    if self.g_idx is not None:
      g = self.g_idx
      if tuple(g.shape) != (*batch, k) or not jnp.issubdtype(g.dtype, jnp.integer):
        raise ValueError(f"{where}: g_idx {tuple(g.shape)} {np.dtype(g.dtype).name} must be "
                         f"{(*batch, k)} integers (the group of each input)")
      if _concrete(g):
        check_g_idx(np.asarray(g), self.group_size, where)
    if _concrete(self.scales) and not bool(np.all(np.isfinite(np.asarray(self.scales, np.float32)))):
      raise ValueError(f"{where}: scales {tuple(self.scales.shape)} hold NaN/inf; the weight "
                       "would dequantize to NaN/inf")

  # --- logical array
  @property
  def nbatch(self) -> int:
    return len(self.packed.shape) - 2

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.packed.shape[:-2]) + self.kernel_shape

  @property
  def groups(self) -> int:
    return int(self.scales.shape[-1])

  @property
  def symmetric(self) -> bool:
    return self.zeros is None

  @property
  def format(self) -> str:
    return f"int{self.bits}"

  def codes(self) -> jax.Array:
    """Signed integer codes `(*batch, out, in)` int8 (compressed-tensors' quantized weight)."""
    k = self.kernel_shape[0]
    lo, _ = qrange(self.bits)
    return (unpack_codes(self.packed, self.bits, k).astype(jnp.int16) + lo).astype(jnp.int8)

  def dequantize_t(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized weight in storage layout `(*batch, out, in)`, as `dtype`."""
    return _dequantize_t(self.packed, self.scales, self.zeros, self.g_idx, bits=self.bits,
                         group=self.group_size, k=self.kernel_shape[0], dtype=jnp.dtype(dtype))

  def materialize(self) -> jax.Array:
    return jnp.swapaxes(self.dequantize_t(jnp.float32), -1, -2).astype(self.dtype)

  # --- rows of the storage layout, for the tiled matmuls (quantization/_matmul.py)
  def for_rows(self) -> "GroupQuantizedArray":
    return self

  def rows(self, start, size: int) -> "GroupQuantizedArray":
    """Output rows `[start, start + size)` (start may be traced) of an unbatched leaf."""
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)  # noqa: E731
    new = self.replace_children(packed=cut(self.packed), scales=cut(self.scales),
                                zeros=None if self.zeros is None else cut(self.zeros))
    object.__setattr__(new, "kernel_shape", (self.kernel_shape[0], size))
    return new

  def partition_specs(self, spec):
    """Children split like the kernel `(*batch, in, out)`: the stored `(out, in)` rows
    take the kernel's `out` entry; packed words and contiguous groups take its `in`
    entry; with a `g_idx` the scales are replicated along `in` (a shard's inputs may
    belong to any group)."""
    from jax.sharding import PartitionSpec as PS
    s = tuple(spec)
    batch, (s_in, s_out) = s[:self.nbatch], s[self.nbatch:]
    g_in = s_in if self.g_idx is None else None
    return self.replace_children(
        packed=PS(*batch, s_out, s_in), scales=PS(*batch, s_out, g_in),
        zeros=None if self.zeros is None else PS(*batch, s_out, g_in),
        g_idx=None if self.g_idx is None else PS(*batch, s_in))

  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  def summary_label(self) -> str:
    return f"int{self.bits}/g{self.group_size}"


def check_g_idx(g: np.ndarray, group_size: int, where: str) -> None:
  """`g` (..., in): every group holds as many inputs as in contiguous groups of
  `group_size` (a permutation of the groups), else a ValueError naming the counts."""
  k = g.shape[-1]
  groups = -(-k // group_size)
  want = np.bincount(np.arange(k) // group_size, minlength=groups)
  for row in g.reshape(-1, k):
    if row.min(initial=0) < 0 or row.max(initial=0) >= groups:
      raise ValueError(f"{where}: g_idx values must lie in [0, {groups}), got "
                       f"[{row.min()}, {row.max()}]")
    got = np.bincount(row, minlength=groups)
    if not np.array_equal(got, want):
      bad = int(np.flatnonzero(got != want)[0])
      raise ValueError(f"{where}: g_idx is not a permutation of the groups: group {bad} has "
                       f"{got[bad]} inputs, expected {want[bad]} (group_size {group_size}, "
                       f"in {k})")


@functools.partial(jax.jit, static_argnames=("bits", "group", "k", "dtype"))
def _dequantize_t(packed, scales, zeros, g_idx, *, bits, group, k, dtype):
  lo, _ = qrange(bits)
  s = scales.astype(jnp.float32)
  z = None if zeros is None else zeros.astype(jnp.float32)
  if g_idx is None and 32 % bits and group % 32 == 0:
    # 3 bits: dequantize each piece of the 32-code chunks (a chunk lies in one group),
    # then concatenate the finished values: the same arithmetic per element as below
    # (bit-identical). On CPU the 28 kernels of benchmarks/modulora_step.py take 44 ms
    # this way, 124 ms with the earlier gather (int4: 14 ms); an int3 GEMV 4096 x 4096
    # 52 ms against 132 ms
    per = group // 32
    s_c = jnp.repeat(s, per, axis=-1)                                   # (..., out, chunks+)
    z_c = None if z is None else jnp.repeat(z, per, axis=-1)
    parts = []
    for u in _chunk_pieces(packed, bits):
      n32 = u.shape[-2]
      q = u.astype(jnp.uint8).astype(jnp.float32) + jnp.float32(lo)
      if z_c is not None:
        q = q - z_c[..., :n32, None]
      parts.append((q * s_c[..., :n32, None]).astype(dtype))
    w = jnp.concatenate(parts, axis=-1)                                 # (..., out, n32, 32)
    return w.reshape(*w.shape[:-2], w.shape[-2] * 32)[..., :k]
  q = unpack_codes(packed, bits, k).astype(jnp.float32) + jnp.float32(lo)   # (..., out, k)
  if g_idx is None:
    groups = s.shape[-1]
    pad = groups * group - k
    if pad:
      q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
    q = q.reshape(*q.shape[:-1], groups, group)
    w = (q if z is None else q - z[..., None]) * s[..., None]
    w = w.reshape(*w.shape[:-2], groups * group)[..., :k]
  else:
    take = lambda t: jnp.take_along_axis(  # noqa: E731
        t, jnp.broadcast_to(g_idx[..., None, :], (*t.shape[:-1], k)).astype(jnp.int32), -1)
    w = (q if z is None else q - take(z)) * take(s)
  return w.astype(dtype)


# ----------------------------------------------------------------------------
# round-to-nearest quantization (compressed-tensors' arithmetic)

def div_rn(a, b):
  """`a / b` correctly rounded, as torch divides. XLA rewrites a division by a
  broadcast (or constant) divisor into a multiply by its reciprocal, which is off by
  one ulp in about a quarter of the cases; a full-shape divisor behind an
  optimization barrier keeps the true division."""
  a = jnp.asarray(a, jnp.float32)
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  b = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), shape))
  return jnp.broadcast_to(a, shape) / b


def group_qparams(wt: jax.Array, bits: int, symmetric: bool, wdtype) -> tuple[jax.Array, jax.Array | None]:
  """Scales and zero points of grouped weights, as compressed-tensors' min-max observer
  and `calculate_qparams` compute them.

  Args:
    wt: (..., groups, group) float32 values (padding, if any, is zeros: the range
      always includes 0, so zero padding changes nothing).
    bits, symmetric: the format.
    wdtype: the weight's dtype; scales are rounded to it (compressed-tensors keeps
      scales in the weight's dtype).

  Returns:
    (scales (..., groups) `wdtype`, zeros (..., groups) int8 or None).
  """
  qmin, qmax = qrange(bits)
  lo = jnp.minimum(jnp.min(wt, axis=-1), 0.0)
  hi = jnp.maximum(jnp.max(wt, axis=-1), 0.0)
  rnd = lambda x: x.astype(wdtype).astype(jnp.float32)  # noqa: E731  (torch's per-op rounding)
  eps = jnp.float32(jnp.finfo(wdtype).eps)
  if symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = rnd(div_rn(amax, (qmax - qmin) / 2))
    return jnp.where(s == 0, eps, s).astype(wdtype), None
  s = rnd(div_rn(rnd(hi - lo), qmax - qmin))
  z = rnd(jnp.float32(qmin) - rnd(div_rn(lo, s)))
  z = jnp.clip(z, qmin, qmax)
  # an all-zero group (scale 0): 0/0 in torch; any zero point dequantizes it to 0
  z = jnp.where(s == 0, jnp.float32(qmin), z)
  s = jnp.where(s == 0, eps, s)
  return s.astype(wdtype), jnp.round(z).astype(jnp.int8)


def quantize_values(wt: jax.Array, scales: jax.Array, zeros, bits: int, wdtype) -> jax.Array:
  """Signed codes of `wt` (..., groups, group) with per-group `scales`/`zeros`
  (..., groups): `clamp(round(w / s + z), qmin, qmax)` as int8, with torch's rounding
  of every intermediate to the weight's dtype."""
  qmin, qmax = qrange(bits)
  rnd = lambda x: x.astype(wdtype).astype(jnp.float32)  # noqa: E731
  x = rnd(div_rn(wt, scales.astype(jnp.float32)[..., None]))
  if zeros is not None:
    x = rnd(x + zeros.astype(jnp.float32)[..., None])
  return jnp.round(jnp.clip(x, qmin, qmax)).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("bits", "group", "symmetric", "wdtype"))
def _quantize_t(wt, g_idx, *, bits, group, symmetric, wdtype):
  """wt: (..., out, k) float32 storage-layout weight -> (packed, scales, zeros)."""
  k = wt.shape[-1]
  if g_idx is not None:
    # groups made contiguous: sort the inputs by group (stable), quantize, put back
    order = jnp.argsort(g_idx, axis=-1, stable=True)
    wt = jnp.take_along_axis(wt, jnp.broadcast_to(order[..., None, :], wt.shape), -1)
  groups = -(-k // group)
  pad = groups * group - k
  if pad:
    wt = jnp.pad(wt, [(0, 0)] * (wt.ndim - 1) + [(0, pad)])
  g = wt.reshape(*wt.shape[:-1], groups, group)
  scales, zeros = group_qparams(g, bits, symmetric, wdtype)
  q = quantize_values(g, scales, zeros, bits, wdtype).reshape(*wt.shape[:-1], groups * group)
  q = q[..., :k]
  if g_idx is not None:
    inv = jnp.argsort(order, axis=-1)
    q = jnp.take_along_axis(q, jnp.broadcast_to(inv[..., None, :], q.shape), -1)
  lo, _ = qrange(bits)
  packed = pack_codes((q.astype(jnp.int16) - lo).astype(jnp.uint8), bits)
  # A NaN/inf weight makes every scale of the leaf NaN (it dequantizes to NaN, never to
  # a finite wrong value: min/max may skip a NaN). Outside jit the caller raises first.
  bad = jnp.sum(~jnp.isfinite(wt))
  scales = jnp.where(bad > 0, jnp.asarray(jnp.nan, scales.dtype), scales)
  return packed, scales, zeros, bad


def quantize_group_array(w: jax.Array, bits: int = 4, group_size: int = 128,
                         symmetric: bool = True, g_idx=None, *,
                         path: str = "array") -> GroupQuantizedArray:
  """Round-to-nearest group-wise integer quantization of one kernel `(*batch, in, out)`.

  Args:
    w: floating kernel; leading axes (stacked layers) are quantized independently.
    bits: 2, 3, 4 or 8. group_size: inputs per group along `in` (any size from 1 to
      `in`; -1 for per channel); a last partial group is allowed.
    symmetric: no zero points (`s = max|w| / ((2^bits - 1) / 2)`) or, if False,
      per-group zero points (`s = (max - min) / (2^bits - 1)`), as compressed-tensors.
    g_idx: optional `(*batch, in)` group of each input (activation order).
    path: name used in error messages.

  Returns:
    A `GroupQuantizedArray` whose codes, scales and zero points equal
    compressed-tensors' `calculate_qparams` + `quantize` of `w.T` (group strategy).

  Raises:
    ValueError on NaN/inf weights when `w` is concrete; under `jit` such a weight gives
    a leaf whose scales are all NaN, and `jax.experimental.checkify` reports it.
  """
  bits = check_bits(bits, path)
  if not (hasattr(w, "shape") and hasattr(w, "dtype")):
    raise TypeError(f"{path}: expected an array, got {type(w).__name__}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{path}: cannot quantize dtype {np.dtype(w.dtype).name} (shape "
                    f"{tuple(w.shape)}); only floating kernels are quantized")
  if w.ndim < 2:
    raise ValueError(f"{path}: cannot quantize shape {tuple(w.shape)}; a kernel needs at "
                     "least 2 axes (in, out)")
  *batch, k, n = w.shape
  group = k if group_size == -1 else int(group_size)
  if isinstance(group_size, bool) or not 1 <= group <= k:
    raise ValueError(f"{path}: group size {group_size!r} does not fit in={k} (kernel "
                     f"{tuple(w.shape)}); use 1..{k} or -1 (per channel)")
  if g_idx is not None:
    g_idx = jnp.asarray(g_idx, jnp.int32)
    if tuple(g_idx.shape) != (*batch, k):
      raise ValueError(f"{path}: g_idx {tuple(g_idx.shape)} must be {(*batch, k)}")
    if _concrete(g_idx):
      check_g_idx(np.asarray(g_idx), group, path)
  w = jnp.asarray(w)
  if _concrete(w) and not bool(jnp.all(jnp.isfinite(w))):
    bad = int(jnp.sum(~jnp.isfinite(w)))
    raise ValueError(f"{path}: {bad} NaN/inf value(s) in a weight of shape {tuple(w.shape)}; "
                     "refusing to quantize")
  wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)
  packed, scales, zeros, bad = _quantize_t(wt, g_idx, bits=bits, group=group,
                                           symmetric=bool(symmetric), wdtype=jnp.dtype(w.dtype))
  if isinstance(bad, jax.core.Tracer):
    from jax.experimental import checkify
    checkify.debug_check(bad == 0, f"{path}: {{n}} NaN/inf value(s) in a weight of shape "
                         f"{tuple(w.shape)}; its scales are NaN", n=bad)
  return GroupQuantizedArray(packed=packed, scales=scales, zeros=zeros, g_idx=g_idx,
                             bits=bits, group_size=group, kernel_shape=(k, n),
                             dtype=jnp.dtype(w.dtype))


def group_bits_per_param(q: GroupQuantizedArray) -> float:
  """Stored bits per logical parameter: codes + scales + zero points (+ g_idx)."""
  return 8 * q.nbytes() / math.prod(q.shape)


__all__ = ["GROUP_BITS", "GROUP_FORMATS", "GroupQuantizedArray", "pack_codes",
           "quantize_group_array", "unpack_codes"]
