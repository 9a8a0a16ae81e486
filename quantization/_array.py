"""`QuantizedArray`: a blockwise-quantized kernel, and `quantize`/`dequantize` over pytrees.

Storage layout. A kernel `W` used as `x @ W` has trailing axes `(in, out)`; any
leading axes are batch axes (stacked layers under `scan`) shared by every child.
The codes are stored in PyTorch's `(out, in)` order, row-major, in one of two layouts
(the static `layout` field):

"rows" (the default of `quantize_array` / `quantize`): blocks run along the
contracting axis `in`, each row padded to a whole number of blocks. For a 2-D kernel
whose `in` is a multiple of the block the bytes are exactly those bitsandbytes writes
for the weight `W.T`:

    codes:          (*batch, out, in_pad // 2) uint8   nf4 / fp4 / int4, two codes per
                    byte, the even element in the high nibble (bitsandbytes' order)
                    (*batch, out, in_pad)      int8    int8
    absmax:         (*batch, out, in_pad // block) float32, or uint8 with double quant
    nested_absmax:  (*batch, ceil(out * in_pad / block / 256)) float32   double quant only
    offset:         (*batch,) float32                                    double quant only

`in_pad` is `in` rounded up to a multiple of the block; the padding (zeros) is
recorded in the static `pad` field and never shows in the logical array.

"flat": bitsandbytes' own layout for any shape. The `(out, in)` weight is flattened
(`numel = out * in`) and cut into blocks of `block` consecutive values, which run
across rows when `in` is not a multiple of the block; the last block may be partial.
No padding (`pad == 0`):

    codes:          (*batch, ceil(numel / 2)) uint8   4-bit formats (an odd numel ends
                    with the code of 0.0 in the last low nibble, as bitsandbytes)
                    (*batch, numel)            int8    int8
    absmax:         (*batch, ceil(numel / block)) float32, or uint8 with double quant
    nested_absmax:  (*batch, ceil(ceil(numel / block) / 256)) float32   double quant only
    offset:         (*batch,) float32                                    double quant only

`qz.from_bnb_state_dict` reads a layer whose `in` is not a multiple of the block in
this layout; `quantize_array(..., layout="flat")` makes it from a weight. It
dequantizes and multiplies (XLA) like the rows layout; the Pallas kernels read only
the rows layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lora_jax as lj
from lora_jax import extend
from quantization import _formats as F

LAYOUTS = ("rows", "flat")


def _concrete(x) -> bool:
  """A value whose contents can be read here (not a tracer, not split across processes)."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _has_shape(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, bool)


def _per_byte(fmt: str) -> int:
  return 1 if fmt == "int8" else 2


def check_layout(layout, where: str = "quantize_array") -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"{where}: unknown layout {layout!r}; known layouts: "
                     f"{', '.join(LAYOUTS)}")
  return layout


class QuantizedArray(lj.ImplicitArray):
  """A blockwise-quantized kernel `(*batch, in, out)`; `materialize()` dequantizes it.

  Attributes:
    codes: packed codes. Layout "rows": `(*batch, out, in_pad // 2)` uint8 (4-bit
      formats) or `(*batch, out, in_pad)` int8. Layout "flat": `(*batch,
      ceil(out * in / 2))` uint8 or `(*batch, out * in)` int8.
    absmax: per-block scales, float32, or uint8 codes of the dynamic 8-bit map with
      double quantization: `(*batch, out, in_pad // block_size)` ("rows") or
      `(*batch, ceil(out * in / block_size))` ("flat").
    nested_absmax: `(*batch, n_nested)` float32 scales of the absmax codes
      (double quantization), else None.
    offset: `(*batch,)` float32 mean subtracted from absmax (double quantization),
      else None.
    tau: ICQ (IR-QLoRA's information calibration, `QuantConfig(icq=True)`) only, else
      None: the per-block constant subtracted before quantization and added back
      after, shaped like `absmax`: uint8 codes of the dynamic 8-bit map (with
      `tau_absmax`), or float32 taus (decoded, `tau_absmax` None, as `for_rows`
      leaves it).
    tau_absmax: `(*batch, ceil(n_blocks / 256))` float32 scale of each group of 256
      consecutive tau codes (blocks in storage order), or None.
    format: "nf4", "fp4", "int4" or "int8". Static.
    block_size: values per block (along `in` for "rows", along the flattened
      `(out, in)` weight for "flat"). Static.
    kernel_shape: logical `(in, out)`. Static.
    dtype: logical dtype (the dtype of the weight that was quantized). Static.
    pad: zeros appended to `in` to fill the last block ("rows"; 0 for "flat"). Static.
    layout: "rows" (blocks per row, padded) or "flat" (bitsandbytes' blocks over the
      flattened weight, for any shape). Static.
  """

  codes: Any = extend.frozen()
  absmax: Any = extend.frozen()
  nested_absmax: Any = extend.frozen(None)
  offset: Any = extend.frozen(None)
  tau: Any = extend.frozen(None)
  tau_absmax: Any = extend.frozen(None)
  format: str = extend.static("nf4")
  block_size: int = extend.static(64)
  kernel_shape: tuple = extend.static(())
  dtype: Any = extend.static(jnp.float32)
  pad: int = extend.static(0)
  layout: str = extend.static("rows")

  def __check_init__(self):
    where = "QuantizedArray"
    object.__setattr__(self, "kernel_shape", tuple(int(d) for d in self.kernel_shape))
    try:
      object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    except TypeError:
      raise TypeError(f"{where}: dtype {self.dtype!r} is not a dtype") from None
    check_layout(self.layout, where)
    for name in ("codes", "absmax"):
      if not _has_shape(getattr(self, name)):
        raise TypeError(f"{where}: {name} must be an array, got "
                        f"{type(getattr(self, name)).__name__}")
    if (_concrete(self.absmax) and self.nested_absmax is None
        and jnp.issubdtype(self.absmax.dtype, jnp.floating)
        and not bool(np.all(np.isfinite(np.asarray(self.absmax))))):
      raise ValueError(f"{where}: absmax {tuple(self.absmax.shape)} holds NaN/inf scales; "
                       "the weight would dequantize to NaN/inf")
    if (self.nested_absmax is not None and _concrete(self.nested_absmax)
        and not bool(np.all(np.isfinite(np.asarray(self.nested_absmax))))):
      raise ValueError(f"{where}: nested_absmax {tuple(self.nested_absmax.shape)} holds "
                       "NaN/inf scales; the weight would dequantize to NaN/inf")
    want_dt = np.dtype(np.int8) if self.format == "int8" else np.dtype(np.uint8)
    if np.dtype(self.codes.dtype) != want_dt:
      raise TypeError(f"{where}: {self.format} codes {tuple(self.codes.shape)} have dtype "
                      f"{np.dtype(self.codes.dtype).name}; expected {want_dt.name}")
    F.check_format(self.format, where)
    F.check_block_size(self.block_size, where)
    if len(self.kernel_shape) != 2:
      raise ValueError(f"{where}: kernel_shape must be (in, out), got {self.kernel_shape}")
    k, n = self.kernel_shape
    per_byte = _per_byte(self.format)
    if self.layout == "flat":
      if self.pad:
        raise ValueError(f"{where}: the flat layout has no padding, got pad {self.pad} "
                         f"(kernel {self.kernel_shape})")
      numel = k * n
      want = (-(-numel // per_byte),)
      if tuple(self.codes.shape[-1:]) != want:
        raise ValueError(f"{where}: codes {tuple(self.codes.shape)} do not fit kernel "
                         f"{self.kernel_shape} (format {self.format}, flat layout); "
                         f"expected trailing {want}")
      batch = tuple(self.codes.shape[:-1])
      want_abs = (*batch, -(-numel // self.block_size))
    else:
      kp = k + self.pad
      if kp % self.block_size or kp % per_byte:
        raise ValueError(f"{where}: in {k} + pad {self.pad} is not a multiple of block "
                         f"{self.block_size}")
      want = (n, kp // per_byte)
      if tuple(self.codes.shape[-2:]) != want:
        raise ValueError(f"{where}: codes {tuple(self.codes.shape)} do not fit kernel "
                         f"{self.kernel_shape} (format {self.format}, pad {self.pad}); "
                         f"expected trailing {want}")
      batch = tuple(self.codes.shape[:-2])
      want_abs = (*batch, n, kp // self.block_size)
    if tuple(self.absmax.shape) != want_abs:
      raise ValueError(f"{where}: absmax {tuple(self.absmax.shape)} does not fit codes "
                       f"{tuple(self.codes.shape)} ({self.layout} layout); expected "
                       f"{want_abs}")
    if (self.nested_absmax is None) != (self.offset is None):
      raise ValueError(f"{where}: nested_absmax and offset must both be set (double "
                       "quantization) or both be None")
    if self.tau is not None:
      self._check_tau(where, batch)
    elif self.tau_absmax is not None:
      raise ValueError(f"{where}: tau_absmax {tuple(self.tau_absmax.shape)} without tau")

  def _check_tau(self, where: str, batch: tuple) -> None:
    from quantization import _icq
    if self.format not in _icq.ICQ_FORMATS:
      raise ValueError(f"{where}: ICQ taus apply to {', '.join(_icq.ICQ_FORMATS)}, not "
                       f"format {self.format!r}")
    if not _has_shape(self.tau) or tuple(self.tau.shape) != tuple(self.absmax.shape):
      raise ValueError(f"{where}: tau {tuple(getattr(self.tau, 'shape', ()))} must be "
                       f"shaped like absmax {tuple(self.absmax.shape)} (one per block)")
    want_dt = np.dtype(np.float32 if self.tau_absmax is None else np.uint8)
    if np.dtype(self.tau.dtype) != want_dt:
      raise TypeError(f"{where}: tau has dtype {np.dtype(self.tau.dtype).name}; expected "
                      f"{want_dt.name} ({'decoded taus' if self.tau_absmax is None else 'codes with tau_absmax'})")
    if self.tau_absmax is not None:
      nblk = int(np.prod(self.absmax.shape[len(batch):]))
      want = (*batch, -(-nblk // _icq.TAU_GROUP))
      if (not _has_shape(self.tau_absmax) or tuple(self.tau_absmax.shape) != want
          or np.dtype(self.tau_absmax.dtype) != np.float32):
        raise ValueError(f"{where}: tau_absmax {tuple(getattr(self.tau_absmax, 'shape', ()))} "
                         f"must be float32 {want} (one scale per {_icq.TAU_GROUP} taus)")
      if (_concrete(self.tau_absmax)
          and not bool(np.all(np.isfinite(np.asarray(self.tau_absmax))))):
        raise ValueError(f"{where}: tau_absmax {tuple(self.tau_absmax.shape)} holds NaN/inf "
                         "scales; the weight would dequantize to NaN/inf")

  # --- logical array
  @property
  def nbatch(self) -> int:
    return len(self.codes.shape) - (1 if self.layout == "flat" else 2)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:self.nbatch]) + self.kernel_shape

  @property
  def double_quant(self) -> bool:
    return self.nested_absmax is not None

  @property
  def icq(self) -> bool:
    """True for a leaf with ICQ taus (`QuantConfig(icq=True)`)."""
    return self.tau is not None

  def taus(self) -> jax.Array | None:
    """float32 per-block taus shaped like `absmax` (decoded), or None without ICQ."""
    if self.tau is None or self.tau_absmax is None:
      return self.tau
    return _decode_taus(self.tau, self.tau_absmax, nbatch=self.nbatch)

  def scales(self) -> jax.Array:
    """float32 per-block scales, shaped like `absmax` (double quant decoded):
    `(*batch, out, in_pad // block)` ("rows") or `(*batch, n_blocks)` ("flat")."""
    if not self.double_quant:
      return self.absmax.astype(jnp.float32)
    return _decode_scales(self.absmax, self.nested_absmax, self.offset, nbatch=self.nbatch)

  def dequantize_t(self, dtype=jnp.float32) -> jax.Array:
    """The dequantized weight in storage layout `(*batch, out, in)` (PyTorch's), as `dtype`.

    Values are `VALUES[code] * absmax` in float32, as bitsandbytes computes them
    (bit for bit), plus the block's tau with ICQ (rounded after the multiply and after
    the add), then cast to `dtype`.
    """
    dtype = jnp.dtype(dtype)
    if self.layout == "flat":
      return _dequantize_flat_t(self.codes, self.scales(), self.taus(), fmt=self.format,
                                block=self.block_size, kernel_shape=self.kernel_shape,
                                dtype=dtype)
    return _dequantize_t(self.codes, self.scales(), self.taus(), fmt=self.format,
                         block=self.block_size, pad=self.pad, dtype=dtype)

  def materialize(self) -> jax.Array:
    """The dequantized kernel `(*batch, in, out)` in `self.dtype` (the same values as
    `dequantize_t`, transposed; the "rows" layout is decoded straight into this
    layout, without a float transpose)."""
    if self.layout == "flat":
      return _materialize_flat(self.codes, self.scales(), self.taus(), fmt=self.format,
                               block=self.block_size, kernel_shape=self.kernel_shape,
                               dtype=self.dtype)
    return _dequantize_k(self.codes, self.scales(), self.taus(), fmt=self.format,
                         block=self.block_size, pad=self.pad, dtype=self.dtype)

  # --- rows of the storage layout, for the tiled matmuls (quantization/_matmul.py)
  def for_rows(self) -> "QuantizedArray":
    """This leaf with its scales (and ICQ taus) decoded once (float32 absmax, no double
    quant; float32 taus, no tau_absmax), so that `rows` tiles slice plain arrays."""
    new = self
    if self.double_quant:
      new = new.replace_children(absmax=self.scales(), nested_absmax=None, offset=None)
    if self.tau_absmax is not None:
      new = new.replace_children(tau=self.taus(), tau_absmax=None)
    return new

  @property
  def row_step(self) -> int:
    """Tiles of output rows must hold a multiple of this many rows: 1 for the rows
    layout; for the flat layout `block / gcd(in, block)`, so that a tile starts and
    ends on a block of the flattened weight."""
    if self.layout != "flat":
      return 1
    return self.block_size // math.gcd(self.kernel_shape[0], self.block_size)

  def rows(self, start, size: int) -> "QuantizedArray":
    """Output rows `[start, start + size)` (start may be traced) of an unbatched leaf
    from `for_rows()`. Flat layout: `start` is a multiple of `row_step`, and `size` too
    unless the tile runs to the last row (whose last block may be partial)."""
    if self.layout == "flat":
      k = self.kernel_shape[0]
      pb = _per_byte(self.format)
      codes = jax.lax.dynamic_slice_in_dim(self.codes, start * k // pb,
                                           -(-size * k // pb), axis=0)
      cut = lambda x: jax.lax.dynamic_slice_in_dim(  # noqa: E731
          x, start * k // self.block_size, -(-size * k // self.block_size), axis=0)
    else:
      cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)  # noqa: E731
      codes = cut(self.codes)
    if self.tau_absmax is not None:
      raise ValueError("QuantizedArray.rows: the ICQ taus are still coded; call for_rows() "
                       "first")
    new = self.replace_children(codes=codes, absmax=cut(self.absmax),
                                tau=None if self.tau is None else cut(self.tau))
    object.__setattr__(new, "kernel_shape", (self.kernel_shape[0], size))
    return new

  def partition_specs(self, spec):
    """Children split like the kernel `(*batch, in, out)`. "rows": codes and absmax,
    stored `(*batch, out, in)`, take the kernel's `out` and `in` entries swapped; the
    small nested scales and offset are replicated along their own axis. "flat": a
    block may span two rows, so the weight cannot be split by rows or columns: every
    child keeps the batch entries and is replicated along its own axis."""
    from jax.sharding import PartitionSpec as PS
    s = tuple(spec)
    batch, (s_in, s_out) = s[:self.nbatch], s[self.nbatch:]
    dq = self.double_quant
    if self.layout == "flat":
      blocks = PS(*batch, None)
    else:
      blocks = PS(*batch, s_out, s_in)
    return self.replace_children(
        codes=blocks, absmax=blocks,
        nested_absmax=PS(*batch, None) if dq else None, offset=PS(*batch) if dq else None,
        tau=None if self.tau is None else blocks,
        tau_absmax=None if self.tau_absmax is None else PS(*batch, None))

  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))


@functools.partial(jax.jit, static_argnames=("nbatch",))
def _decode_scales(absmax, nested, offset, *, nbatch):
  batch = tuple(absmax.shape[:nbatch])
  flat = absmax.reshape(*batch, -1)
  fn = F.double_dequantize
  for _ in batch:
    fn = jax.vmap(fn)
  return fn(flat, nested, offset).reshape(absmax.shape)


@functools.partial(jax.jit, static_argnames=("nbatch",))
def _decode_taus(codes, tau_absmax, *, nbatch):
  from quantization import _icq
  batch = tuple(codes.shape[:nbatch])
  return _icq.dequantize_taus(codes.reshape(*batch, -1), tau_absmax).reshape(codes.shape)


def add_tau(w, t):
  """Dequantized values `w` plus their ICQ taus `t` (broadcast; None: no ICQ), the
  product that made `w` rounded first (no FMA), as the reference adds them."""
  return w if t is None else F._no_fma(w) + t


def _plus_tau(w, taus):
  """Dequantized blocks `w` (..., nblk, block) plus their taus (..., nblk) or None."""
  return add_tau(w, None if taus is None else taus[..., None])


# ----------------------------------------------------------------------------
# dequantize

def _code_values(codes, fmt: str):
  """float32 values of packed codes (..., nbytes) -> (..., nbytes * per_byte): one
  lookup per byte in a (256, 2) table for the 4-bit formats (both nibbles at once)."""
  if fmt == "int8":
    return F.code_values(codes, fmt)
  pairs = jnp.asarray(F.byte_pair_table(fmt))
  # uint8 indices: no negative-index wrapping in the gather
  vals = pairs.at[codes.astype(jnp.uint8)].get(mode="promise_in_bounds")  # (..., nbytes, 2)
  return vals.reshape(*codes.shape[:-1], codes.shape[-1] * 2)


@functools.partial(jax.jit, static_argnames=("fmt", "block", "pad", "dtype"))
def _dequantize_t(codes, scales, taus, *, fmt, block, pad, dtype):
  """Rows layout: codes (..., out, in_pad / per byte), scales (..., out, in_pad / block)
  (and ICQ taus like scales, or None) -> (..., out, in) in `dtype`."""
  vals = _code_values(codes, fmt)
  kp = vals.shape[-1]
  vals = vals.reshape(*vals.shape[:-1], kp // block, block)
  w = _plus_tau(vals * scales[..., None], taus).reshape(*vals.shape[:-2], kp)
  if pad:
    w = w[..., :kp - pad]
  return w.astype(dtype)


def _dequantize_flat(codes, scales, taus, *, fmt, block, numel, dtype):
  """Flat layout: codes (..., ceil(numel / per byte)), scales (..., ceil(numel / block))
  -> (..., numel) in `dtype`: value `i` is `VALUES[code i] * scale[i // block]`."""
  vals = _code_values(codes, fmt)[..., :numel]
  nblk = scales.shape[-1]
  full = nblk * block
  if full != numel:
    vals = jnp.pad(vals, [(0, 0)] * (vals.ndim - 1) + [(0, full - numel)])
  w = _plus_tau(vals.reshape(*vals.shape[:-1], nblk, block) * scales[..., None], taus)
  w = w.reshape(*w.shape[:-2], full)
  if full != numel:
    w = w[..., :numel]
  return w.astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "block", "kernel_shape", "dtype"))
def _dequantize_flat_t(codes, scales, taus, *, fmt, block, kernel_shape, dtype):
  k, n = kernel_shape
  w = _dequantize_flat(codes, scales, taus, fmt=fmt, block=block, numel=k * n, dtype=dtype)
  return w.reshape(*w.shape[:-1], n, k)


@functools.partial(jax.jit, static_argnames=("fmt", "block", "kernel_shape", "dtype"))
def _materialize_flat(codes, scales, taus, *, fmt, block, kernel_shape, dtype):
  k, n = kernel_shape
  w = _dequantize_flat(codes, scales, taus, fmt=fmt, block=block, numel=k * n, dtype=jnp.float32)
  return jnp.swapaxes(w.reshape(*w.shape[:-1], n, k), -1, -2).astype(dtype)


# Kernel-layout decoding of the rows layout. Four code bytes of a row are gathered into
# one uint32 word (byte j at bits 8j), the (out, words) word matrix is transposed (a
# quarter of the elements a byte transpose would move), and each word decodes into the
# 8 (4-bit) or 4 (int8) consecutive `in` rows it holds, written contiguously along `out`
# by one fused (multi-threaded) loop.
_NIBBLE_SHIFTS = np.array([4, 0, 12, 8, 20, 16, 28, 24], np.uint32)   # element r of a word
_BYTE_SHIFTS = np.array([0, 8, 16, 24], np.uint32)
# Below this many elements the transposes are left to XLA (fused into the decode).
_SMALL = 1 << 16
# Elements of the small transposes per step (cache blocking).
_TRANSPOSE_TILE = 1 << 17


def _words(codes):
  """(out, nbytes) uint8/int8 codes, nbytes % 4 == 0 -> (out, nbytes / 4) uint32."""
  c = lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
  return c[:, 0::4] | (c[:, 1::4] << 8) | (c[:, 2::4] << 16) | (c[:, 3::4] << 24)


def _transposed(x, fn=lambda rows: rows):
  """`fn(x).T` for a 2-D `x` (`fn` maps a block of rows to as many rows), written out
  row-major by a loop over blocks of rows of `x`.

  Left to itself XLA turns a transpose into a layout change and fuses it into the
  consumer, which then reads its input with a stride per element (measured 3-6x slower
  than decoding from a transposed copy); a loop's result keeps its layout. Applying
  `fn` inside the loop keeps its (larger) result in cache.
  """
  n = x.shape[0]
  row = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
  m, out_dtype = row.shape[1], row.dtype
  if n < 2:
    return fn(x).reshape(m, n)
  r = min(max(1, _TRANSPOSE_TILE // max(m, 1)), n // 2)    # >= 2 steps
  steps = n // r

  def step(t, buf):
    part = fn(lax.dynamic_slice_in_dim(x, t * r, r, axis=0))
    return lax.dynamic_update_slice_in_dim(buf, part.T, t * r, axis=1)

  out = lax.fori_loop(0, steps, step, jnp.zeros((m, n), out_dtype))
  if n % r:
    out = lax.dynamic_update_slice_in_dim(out, fn(x[steps * r:]).T, steps * r, axis=1)
  return out


def _select_values(nib, fmt: str):
  """float32 `VALUES[fmt][nib]` for uint32 nibbles, as a tree of 15 selects on the
  nibble's bits (vectorizes, unlike a gather from the 16-entry table; exact)."""
  level = [jnp.float32(v) for v in F.VALUES[fmt]]
  for bit in range(4):
    on = (nib & jnp.uint32(1 << bit)) != 0
    level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
  return level[0]


def _decode_words(words_t, scales_t, taus_t=None, *, fmt, block, dtype):
  """words_t (W, out) uint32, scales_t (W * per_word / block, out) float32 (and ICQ
  taus_t like scales_t, or None) -> (W * per_word, out) kernel rows in `dtype`."""
  r, n = words_t.shape
  if fmt == "int8":
    b = (words_t[:, None, :] >> jnp.asarray(_BYTE_SHIFTS)[None, :, None]) & jnp.uint32(255)
    vals = F.code_values(lax.bitcast_convert_type(b.astype(jnp.uint8), jnp.int8), fmt)
  else:
    nib = (words_t[:, None, :] >> jnp.asarray(_NIBBLE_SHIFTS)[None, :, None]) & jnp.uint32(15)
    vals = _select_values(nib, fmt)
  rows = vals.shape[0] * vals.shape[1]
  w = vals.reshape(rows // block, block, n) * scales_t[:, None, :]
  w = add_tau(w, None if taus_t is None else taus_t[:, None, :])
  return w.reshape(rows, n).astype(dtype)


def _dequantize_k_2d(codes, scales, taus, *, fmt, block, pad, dtype):
  n, nbytes = codes.shape
  kp = nbytes * _per_byte(fmt)
  small = kp * n <= _SMALL
  if small:
    words_t, scales_t = _words(codes).T, scales.T
  else:
    words_t, scales_t = _transposed(codes, _words), _transposed(scales)
  taus_t = None if taus is None else (taus.T if small else _transposed(taus))
  w = _decode_words(words_t, scales_t, taus_t, fmt=fmt, block=block, dtype=dtype)
  return w[:kp - pad] if pad else w


@functools.partial(jax.jit, static_argnames=("fmt", "block", "pad", "dtype"))
def _dequantize_k(codes, scales, taus, *, fmt, block, pad, dtype):
  """Rows layout -> the kernel `(..., in, out)` in `dtype`, decoded in kernel layout
  (bit for bit the transpose of `_dequantize_t`)."""
  fn = functools.partial(_dequantize_k_2d, fmt=fmt, block=block, pad=pad, dtype=dtype)
  for _ in range(codes.ndim - 2):
    fn = jax.vmap(fn)
  return fn(codes, scales, taus)


# ----------------------------------------------------------------------------
# quantize one array

def _quantize_2d(w: jax.Array, *, fmt: str, block_size: int, double_quant: bool):
  """w: (in_pad, out) float32 kernel -> (codes, absmax, nested, offset) in storage layout.

  Blocks are formed along `in` in the kernel's own layout and only the (4x smaller)
  codes are transposed to PyTorch's (out, in) order, so no float transpose is made.
  """
  kp, n = w.shape
  codes, absmax = F.quantize_blocks(w.reshape(kp // block_size, block_size, n), fmt, axis=1)
  codes = codes.reshape(kp, n)
  if fmt != "int8":
    codes = (codes[0::2] << 4) | codes[1::2]          # bnb's nibble order along `in`
  codes, absmax = codes.T, absmax.T                   # (out, in_pad / per byte), (out, nblk)
  if not double_quant:
    return codes, absmax, None, None
  q, nested, offset = F.double_quantize(absmax.reshape(-1))
  return codes, q.reshape(absmax.shape), nested, offset


def _quantize_flat_2d(w: jax.Array, *, fmt: str, block_size: int, double_quant: bool):
  """w: (in, out) float32 kernel -> flat-layout (codes, absmax, nested, offset): the
  PyTorch weight `w.T` flattened and quantized exactly as bitsandbytes' `quantize_4bit`."""
  codes, absmax = _pack_flat(*F.quantize_flat(w.T.reshape(-1), fmt, block_size), fmt)
  if not double_quant:
    return codes, absmax, None, None
  q, nested, offset = F.double_quantize(absmax)
  return codes, q, nested, offset


def _icq_blocks(w: jax.Array, *, block_size: int, layout: str):
  """w: (in, out) float32 kernel -> (blocks (nb, block) of the PyTorch weight `w.T` in
  storage order, zero-padded; valid mask (nb, block), or None without padding)."""
  k, n = w.shape
  wt = w.T
  if layout == "flat":
    numel = k * n
    nb = -(-numel // block_size)
    blocks = jnp.pad(wt.reshape(-1), (0, nb * block_size - numel)).reshape(nb, block_size)
    if nb * block_size == numel:
      return blocks, None
    return blocks, (jnp.arange(nb * block_size) < numel).reshape(nb, block_size)
  pad = (-k) % block_size
  kp = k + pad
  blocks = jnp.pad(wt, ((0, 0), (0, pad))).reshape(n * kp // block_size, block_size)
  if not pad:
    return blocks, None
  valid = jnp.broadcast_to((jnp.arange(kp) < k).reshape(kp // block_size, block_size),
                           (n, kp // block_size, block_size))
  return blocks, valid.reshape(-1, block_size)


def _quantize_icq_2d(w: jax.Array, *, fmt: str, block_size: int, double_quant: bool,
                     layout: str, icq: tuple, dtype):
  """w: (in, out) float32 kernel (values of `dtype`) -> (codes, absmax, nested, offset,
  tau codes, tau_absmax) with ICQ: bitsandbytes' quantization of `W - tau` (padding
  stays zero), taus from the entropy search (quantization/_icq.py)."""
  from quantization import _icq
  k, n = w.shape
  blocks, valid = _icq_blocks(w, block_size=block_size, layout=layout)
  grid = _icq.factor_grid(*icq)
  tau = _icq.search(blocks, valid, fmt=fmt, grid=grid, dtype=dtype)
  shifted = blocks - tau[:, None]
  if valid is not None:
    shifted = jnp.where(valid, shifted, jnp.float32(0.0))
  tcodes, tau_absmax = _icq.quantize_taus(tau)
  if layout == "flat":
    codes, absmax = _pack_flat(*F.quantize_flat(shifted.reshape(-1)[:k * n], fmt, block_size),
                               fmt)
  else:
    nblk = (k + (-k) % block_size) // block_size
    codes, absmax = F.quantize_blocks(shifted.reshape(n, nblk, block_size), fmt)
    codes = F.pack_nibbles(codes.reshape(n, nblk * block_size))
    tcodes = tcodes.reshape(n, nblk)
  if not double_quant:
    return codes, absmax, None, None, tcodes, tau_absmax
  q, nested, offset = F.double_quantize(absmax.reshape(-1))
  return codes, q.reshape(absmax.shape), nested, offset, tcodes, tau_absmax


def _pack_flat(codes, absmax, fmt: str):
  """Flat-layout codes (n,) packed two per byte (an odd n ends with the code of 0.0,
  as bitsandbytes pads), int8 left as is."""
  if fmt != "int8":
    if codes.shape[0] % 2:                            # bnb pads with the code of 0.0
      codes = jnp.concatenate([codes, F.codes_of_scaled(jnp.zeros((1,), jnp.float32), fmt)])
    codes = (codes[0::2] << 4) | codes[1::2]
  return codes, absmax


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant", "layout",
                                             "icq"))
def _quantize_leaf(w: jax.Array, *, fmt: str, block_size: int, double_quant: bool,
                   layout: str = "rows", icq: tuple | None = None):
  """w: (*batch, in, out) -> (codes, absmax, nested, offset, tau codes, tau_absmax,
  number of NaN/inf values); `icq` = (icq_range, icq_steps) or None (no taus)."""
  k = w.shape[-2]
  wf = w.astype(jnp.float32)
  if icq is not None:
    fn = functools.partial(_quantize_icq_2d, fmt=fmt, block_size=block_size,
                           double_quant=double_quant, layout=layout, icq=icq, dtype=w.dtype)
  elif layout == "flat":
    fn = lambda x: (*_quantize_flat_2d(x, fmt=fmt, block_size=block_size,  # noqa: E731
                                       double_quant=double_quant), None, None)
  else:
    pad = (-k) % block_size
    if pad:
      wf = jnp.pad(wf, [(0, 0)] * (wf.ndim - 2) + [(0, pad), (0, 0)])
    fn = lambda x: (*_quantize_2d(x, fmt=fmt, block_size=block_size,  # noqa: E731
                                  double_quant=double_quant), None, None)
  for _ in range(w.ndim - 2):
    fn = jax.vmap(fn)
  bad = jnp.sum(~jnp.isfinite(w))
  codes, absmax, nested, offset, tcodes, tau_absmax = fn(wf)
  # A NaN/inf weight makes the whole leaf NaN (every scale), never a finite wrong value
  # (XLA's max skips NaN, so its block would otherwise quantize it to a finite code).
  # Outside jit, quantize_array raises before this result is used.
  poison = lambda s: None if s is None else jnp.where(bad > 0, jnp.nan, s)  # noqa: E731
  if double_quant:
    nested, offset = poison(nested), poison(offset)
  else:
    absmax = poison(absmax)
  return codes, absmax, nested, offset, tcodes, poison(tau_absmax), bad


def quantize_array(w: jax.Array, fmt: str = "nf4", block_size: int = 64,
                   double_quant: bool = False, *, path: str = "array",
                   layout: str = "rows", icq: bool = False, icq_range: float = 0.1,
                   icq_steps: int = 100) -> QuantizedArray:
  """Quantize one kernel `(*batch, in, out)` blockwise.

  Args:
    w: floating kernel; leading axes (stacked layers) are quantized independently,
      each exactly as bitsandbytes quantizes the 2-D PyTorch weight `w[i].T` (with
      "rows", when `in` is a multiple of the block; with "flat", for any shape).
    fmt: "nf4", "fp4", "int4" or "int8". block_size: 32 .. 4096, a power of two.
    double_quant: also quantize the absmax values (bitsandbytes' double quant).
    path: name used in error messages.
    layout: "rows" (default): blocks along `in`, each row zero-padded to whole
      blocks (what the Pallas kernels read). "flat": bitsandbytes' layout, blocks
      over the flattened `(out, in)` weight, running across rows when `in` is not a
      multiple of the block; what `qz.to_bnb_state_dict` needs for such a weight.
    icq: nf4/fp4 only: IR-QLoRA's information calibration (quantization/_icq.py): per
      block, subtract the tau (searched over `2 * icq_steps + 1` factors in
      `[-icq_range, icq_range] * SIGMA` of the block's spread around its median) that
      maximizes the entropy of the block's codes, and store the taus (8-bit codes, a
      float32 scale per 256 blocks). With padding (the rows layout when `in` is not a
      multiple of the block, the flat layout's partial last block) the median, spread
      and entropy are those of the block's real values; the padding is zero after the
      shift (as plain quantization pads with zeros).

  Raises:
    TypeError: non-floating `w`. ValueError: fewer than 2 axes, an unknown layout,
    NaN or inf values (checked when `w` is concrete, i.e. outside `jit`; under `jit`
    such a weight quantizes to a leaf whose scales are all NaN, so it dequantizes to
    NaN everywhere, and `jax.experimental.checkify` reports it).
  """
  F.check_format(fmt, path)
  block_size = F.check_block_size(block_size, path)
  check_layout(layout, path)
  if icq:
    from quantization import _icq
    _icq.check_icq(fmt, icq_range, icq_steps, path)
  if not _has_shape(w):
    raise TypeError(f"{path}: expected an array, got {type(w).__name__}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"{path}: cannot quantize dtype {np.dtype(w.dtype).name} (shape "
                    f"{tuple(w.shape)}); only floating kernels are quantized")
  if w.ndim < 2:
    raise ValueError(f"{path}: cannot quantize shape {tuple(w.shape)}; a kernel needs "
                     "at least 2 axes (in, out)")
  *_, k, n = w.shape
  codes, absmax, nested, offset, tau, tau_absmax, bad = _quantize_leaf(
      jnp.asarray(w), fmt=fmt, block_size=block_size, double_quant=double_quant,
      layout=layout, icq=(float(icq_range), int(icq_steps)) if icq else None)
  if isinstance(bad, jax.core.Tracer):
    # Under jit the values are unknown here: a NaN/inf weight makes every scale of the
    # leaf NaN (so it dequantizes to NaN, never to a finite wrong value), and
    # `checkify.checkify` reports it.
    from jax.experimental import checkify
    checkify.debug_check(bad == 0, f"{path}: {{n}} NaN/inf value(s) in a weight of shape "
                         f"{tuple(w.shape)}; the quantized blocks holding them are NaN", n=bad)
  elif int(bad):
    raise ValueError(f"{path}: {int(bad)} NaN/inf value(s) in a weight of shape "
                     f"{tuple(w.shape)}; refusing to quantize (absmax would be inf/NaN)")
  return QuantizedArray(codes=codes, absmax=absmax, nested_absmax=nested, offset=offset,
                        tau=tau, tau_absmax=tau_absmax, format=fmt, block_size=block_size, kernel_shape=(k, n),
                        dtype=jnp.dtype(w.dtype),
                        pad=0 if layout == "flat" else (-k) % block_size, layout=layout)


# ----------------------------------------------------------------------------
# pytrees

@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What to quantize and how.

  Two families of formats, one config:

  - bitsandbytes' absmax formats, `format="nf4" | "fp4" | "int4" | "int8"` (with
    `symmetric` left None): a `QuantizedArray`, one float32 absmax per block,
    optionally double-quantized; bytes equal to bitsandbytes'.
  - GPTQ-style group-wise integers, `format="int2" | "int3" | "int4" | "int8"` with
    `symmetric=True` (no zero points) or `symmetric=False` (per-group zero points);
    int2/int3 are always group-wise: a `GroupQuantizedArray` with compressed-tensors'
    arithmetic and packing. `qz.gptq` quantizes them with calibration data.

  Attributes:
    format: "nf4" (default), "fp4", "int4", "int8", "int2" or "int3".
    block_size: values per block (absmax formats: a power of two from 32 to 4096,
      default 64 as QLoRA) or per group (group-wise: a power of two from 32 to 1024,
      or -1 for one group per output channel; default 128 as GPTQ).
    double_quant: absmax formats only: quantize the absmax values too (bitsandbytes
      `bnb_4bit_use_double_quant`): 8-bit dynamic codes in blocks of 256 after
      subtracting their mean. Default True there; group-wise formats have none.
    targets: regex or list of regexes fullmatched against "/"-joined leaf paths;
      None quantizes every floating leaf with ndim >= 2 (the last two axes are
      `(in, out)`, leading axes stacked layers). With layer-stacked parameters a
      norm scale `(layers, hidden)` is 2-D too: pass `targets` (e.g.
      `r".*kernel"`) so only kernels are quantized.
    symmetric: None (absmax formats; int2/int3 then mean True), True or False
      (group-wise integers without / with zero points).
    act_order: GPTQ only (`qz.gptq`): False; True or "weight" (quantize the columns in
      order of decreasing activation, groups stay contiguous, no `g_idx`: what
      llm-compressor's `actorder="weight"` does); "group" (groups formed in that order,
      with a `g_idx`, as GPTQ's `desc_act=True`).
    icq: "nf4" / "fp4" only: IR-QLoRA's information calibration quantization: each
      block is shifted by the tau that maximizes the entropy of its codes before
      quantization, and the taus are stored (8 bits per block plus a float32 per 256
      blocks: NF4 at block 64 with double quant is 4.254 bits per parameter instead
      of 4.127). Default False.
    icq_range, icq_steps: the tau search grid (IR-QLoRA's `tau_lambda`, `tau_n`):
      `2 * icq_steps + 1` factors evenly spaced in `[-icq_range, icq_range] * SIGMA`
      (`SIGMA` = 0.541, 1 / the N(0, 1) quantile of 0.9677) of the block's largest
      deviation from its median. Defaults 0.1 and 100, IR-QLoRA's training setting.
  """

  format: str = "nf4"
  block_size: int | None = None
  double_quant: bool | None = None
  targets: str | Sequence[str] | None = None
  symmetric: bool | None = None
  act_order: bool | str = False
  icq: bool = False
  icq_range: float = 0.1
  icq_steps: int = 100

  def __post_init__(self):
    from quantization import _group as G
    fmt = self.format
    if fmt not in F.FORMATS and fmt not in G.GROUP_FORMATS:
      raise ValueError(f"QuantConfig: unknown format {fmt!r}; known formats: "
                       f"{', '.join(dict.fromkeys((*F.FORMATS, *G.GROUP_FORMATS)))}")
    if self.symmetric is not None and not isinstance(self.symmetric, bool):
      raise TypeError(f"QuantConfig: symmetric must be None, True or False, got "
                      f"{self.symmetric!r}")
    if self.act_order not in (False, True, "weight", "group"):
      raise ValueError(f"QuantConfig: act_order must be False, True, 'weight' or 'group', "
                       f"got {self.act_order!r}")
    grouped = fmt in ("int2", "int3") or self.symmetric is not None or bool(self.act_order)
    if not isinstance(self.icq, bool):
      raise TypeError(f"QuantConfig: icq must be True or False, got {self.icq!r}")
    if self.icq:
      from quantization import _icq
      if grouped:
        raise ValueError(f"QuantConfig: icq=True calibrates the bitsandbytes 4-bit formats "
                         f"({', '.join(_icq.ICQ_FORMATS)}), not group-wise {fmt}")
      _icq.check_icq(fmt, self.icq_range, self.icq_steps, "QuantConfig")
    if grouped and fmt not in G.GROUP_FORMATS:
      raise ValueError(f"QuantConfig: format {fmt!r} has no group-wise integer form "
                       f"(symmetric / act_order apply to {', '.join(G.GROUP_FORMATS)})")
    if grouped:
      if self.double_quant:
        raise ValueError(f"QuantConfig: double_quant applies to the absmax formats "
                         f"({', '.join(F.FORMATS)} without `symmetric`), not to group-wise "
                         f"{fmt}")
      object.__setattr__(self, "double_quant", False)
      if self.symmetric is None:
        object.__setattr__(self, "symmetric", True)
      block = 128 if self.block_size is None else self.block_size
      object.__setattr__(self, "block_size", G.check_group_size(block))
    else:
      block = 64 if self.block_size is None else self.block_size
      object.__setattr__(self, "block_size", F.check_block_size(block))
      object.__setattr__(self, "double_quant",
                         True if self.double_quant is None else bool(self.double_quant))

  @property
  def group_wise(self) -> bool:
    """True for the GPTQ-style group-wise integer formats (`GroupQuantizedArray`)."""
    return self.symmetric is not None

  @property
  def bits(self) -> int:
    return {"int2": 2, "int3": 3, "int4": 4, "int8": 8}.get(self.format, 4)


def quantize_kernel(w: jax.Array, cfg: QuantConfig, *, path: str = "array", g_idx=None):
  """One kernel `(*batch, in, out)` quantized round-to-nearest as `cfg` says: a
  `QuantizedArray` (absmax formats) or a `GroupQuantizedArray` (group-wise)."""
  if cfg.group_wise:
    from quantization._group import quantize_group_array
    return quantize_group_array(w, cfg.bits, cfg.block_size, cfg.symmetric, g_idx, path=path)
  return quantize_array(w, cfg.format, cfg.block_size, cfg.double_quant, path=path,
                        icq=cfg.icq, icq_range=cfg.icq_range, icq_steps=cfg.icq_steps)


def is_quantized(x) -> bool:
  """A quantized kernel leaf of any registered kind (`QuantizedArray`,
  `GroupQuantizedArray`, or one registered with `qz.register_quantized_kind`)."""
  from quantization import _matmul
  return type(x) in _matmul.QUANTIZED_KINDS


def _is_leaf(x) -> bool:
  return lj.is_implicit(x)


def quantize(tree: Any, cfg: QuantConfig = QuantConfig()) -> Any:
  """Replace kernels in `tree` with `QuantizedArray`s.

  Args:
    tree: a parameter pytree; LoRA leaves are quantized in their base `w`
      (QLoRA; over a group-wise base, ModuLoRA), other implicit leaves are left alone.
    cfg: `QuantConfig`.

  Returns:
    `tree` with each selected leaf `(*batch, in, out)` replaced by a
    `QuantizedArray` of the same logical shape and dtype.

  Raises:
    ValueError / TypeError naming the path: a target pattern matching nothing,
    a matched leaf that is not floating or has fewer than 2 axes, NaN/inf values.

  Example:
    >>> qparams = qz.quantize(params, qz.QuantConfig("nf4", 64, double_quant=True))
  """
  leaves = extend.leaves_with_paths(tree, is_leaf=_is_leaf)
  paths = [p for p, _ in leaves]
  if cfg.act_order:
    raise ValueError("qz.quantize: act_order needs calibration activations; use "
                     "qz.gptq(params, forward, calibration_batches, config)")
  if cfg.targets is None:
    targets = {p for p, x in leaves if extend.is_float_kernel(_weight_of(x))}
  else:
    targets = set(extend.select_paths(paths, cfg.targets))

  def make(path, leaf):
    if path not in targets:
      return leaf
    if lj.is_implicit(leaf):
      w = leaf.frozen_base()
      if w is None:
        raise TypeError(f"{path}: cannot quantize a {type(leaf).__name__} (it has no base "
                        "weight to quantize)")
      if lj.is_implicit(w):
        raise TypeError(f"{path}: base weight of the {type(leaf).__name__} is already a "
                        f"{type(w).__name__}")
      axes = getattr(leaf, "axes", "io")
      if axes != "io":
        raise ValueError(f"{path}: {type(leaf).__name__} layout {axes!r}; only 'io' kernels "
                         "can be quantized")
      return leaf.with_base(quantize_kernel(w, cfg, path=path))
    return quantize_kernel(leaf, cfg, path=path)

  return extend.map_with_path(make, tree, is_leaf=_is_leaf)


def _weight_of(leaf):
  """The array a leaf stands for as a weight: its base for an adapter leaf (a kind with
  a base field), the leaf itself otherwise."""
  if lj.is_implicit(leaf) and leaf.base_field is not None:
    return leaf.frozen_base()
  return leaf


def dequantize(x: Any) -> Any:
  """Dense arrays again: a `QuantizedArray` (or every one in a pytree) dequantized.

  LoRA leaves keep their factors; only their quantized base is dequantized.
  """
  def deq(leaf):
    if is_quantized(leaf):
      return leaf.materialize()
    if lj.is_implicit(leaf) and is_quantized(leaf.frozen_base()):
      return leaf.with_base(leaf.frozen_base().materialize())
    return leaf
  return jax.tree.map(deq, x, is_leaf=_is_leaf)


def _leaf_bits(q) -> tuple[int, int]:
  return int(np.prod(q.shape)), 8 * q.nbytes()


def _block_label(q) -> str:
  if isinstance(q, QuantizedArray):
    return str(q.block_size)
  group = getattr(q, "group_size", None)
  if group is None:
    return "-"
  return "channel" if group == q.kernel_shape[0] else str(group)


def _scales_label(q) -> str:
  """How the scales are stored: absmax (+ double quant), or group-wise symmetric /
  with zero points (+ g_idx)."""
  if isinstance(q, QuantizedArray):
    return ("absmax+dq" if q.double_quant else "absmax") + ("+icq" if q.icq else "")
  zeros = getattr(q, "zeros", None)
  label = "sym" if zeros is None else "asym"
  return label + ("+g_idx" if getattr(q, "g_idx", None) is not None else "")


def summary(tree: Any) -> str:
  """Bits per parameter of every quantized leaf and in total.

  A row per quantized leaf (path, logical shape, format, block or group size, how the
  scales are stored, bits per parameter = 8 * stored bytes / logical parameters:
  codes, scales, zero points and `g_idx` all count); then the total over
  quantized leaves and over the whole tree (dense leaves count their own bits).
  NF4 with double quantization at block 64 stores 4 + 8/64 + 32/(64*256) = 4.127
  bits per parameter; without double quantization 4 + 32/64 = 4.5; ICQ's taus add
  8/64 + 32/(64*256) more (4.254 with double quantization).
  """
  rows = []
  qn = qb = tn = tb = 0
  for path, leaf in extend.leaves_with_paths(tree, is_leaf=_is_leaf):
    q = _weight_of(leaf)
    if q is not leaf:
      # an adapter leaf: everything but its base, counted by the protocol
      c = leaf.count()
      base_c = q.count() if lj.is_implicit(q) else extend.LeafCount(
          int(np.prod(q.shape)), int(np.prod(q.shape)) * np.dtype(q.dtype).itemsize, 0, 0)
      tn += c.params - base_c.params
      tb += 8 * (c.bytes - base_c.bytes)
    if is_quantized(q):
      n, b = _leaf_bits(q)
      rows.append((path, "x".join(map(str, q.shape)), q.format, _block_label(q),
                   _scales_label(q), f"{b / n:.3f}"))
      qn += n
      qb += b
      tn += n
      tb += b
    elif lj.is_implicit(q):                  # another leaf type: count what it stores
      c = q.count()
      tn += c.params
      tb += 8 * c.bytes
    elif _has_shape(q):
      tn += int(np.prod(q.shape))
      tb += 8 * int(np.prod(q.shape)) * np.dtype(q.dtype).itemsize
  head = ("path", "shape", "format", "block", "scales", "bits/param")
  widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*r) for r in rows]
  lines.append("")
  lines.append(f"quantized params: {qn:,} at {qb / qn if qn else 0.0:.3f} bits/param || "
               f"all params: {tn:,} at {tb / tn if tn else 0.0:.3f} bits/param || "
               f"bytes: {tb // 8:,}")
  return "\n".join(lines)


def bits_per_param(q) -> float:
  """8 * stored bytes / logical parameters of one quantized leaf (any kind)."""
  n, b = _leaf_bits(q)
  return b / n


del re
