"""`qz.matmul(x, q)`: `x @ W` for a `QuantizedArray` W, and its `implicit` rules.

Backends: "xla" dequantizes and calls `dot_general`; when the weight is large it
walks the output columns in tiles (`lax.map`), so at most one tile of
dequantized weight exists at a time. "pallas" runs the Pallas kernel for the
platform (Triton on GPU, Mosaic on TPU; the interpreter on CPU), which dequantizes
inside its K loop. "auto" runs the kernel on GPU/TPU and XLA elsewhere. Both are
chosen per platform when the program is lowered (`extend.per_platform`), not from
`jax.default_backend()` at trace time, so an AOT-compiled or exported program gets
the right path on each platform.

Gradients: a `custom_vjp` sends `dx = dy @ W^T` (W dequantized on the fly, tiled
the same way) to x, and zeros to the quantized weight's children: the codes are
never trained.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

import lora_jax as lj
from lora_jax.extend import per_platform
from quantization import _pallas
from quantization import _formats as F
from quantization._array import QuantizedArray, add_tau
from quantization._group import GroupQuantizedArray

BACKENDS = ("auto", "xla", "pallas")
# Dequantize the whole weight at once below this many elements; tile above it.
# 1M elements (a 4 MiB float32 tile) measured fastest on CPU for 4096 x 4096
# (GEMV 14.7 -> 5.8 ms, GEMM at batch 256 71 -> 50 ms against 16M): a tile's
# dequantized values are still in cache when the dot reads them.
TILE_ELEMENTS = 1 << 20


def _tile_rows(n: int, k: int, max_elements: int) -> int:
  if n * k <= max_elements:
    return n
  return max(8, (max_elements // max(k, 1)) // 8 * 8)


def _aligned_tile_rows(q, max_elements: int) -> int:
  """Output rows per tile, a multiple of the kind's `row_step` (a flat-layout
  `QuantizedArray` tile must start and end on a block of its flattened weight)."""
  k, n = q.kernel_shape
  tn = _tile_rows(n, k, max_elements)
  step = int(getattr(q, "row_step", 1))
  if tn >= n or step <= 1:
    return tn
  return min(max(step, tn // step * step), n)


def _row_tiles(q, tn: int):
  """(leaf ready for `rows`, number of full tiles of `tn` output rows, remainder rows)."""
  n = q.kernel_shape[1]
  return q.for_rows(), n // tn, n - (n // tn) * tn


def _byte_tables(fmt: str):
  """(256,) float32 values of the high and the low nibble of every code byte."""
  t = F.VALUES[fmt]
  b = np.arange(256)
  return jnp.asarray(t[b >> 4]), jnp.asarray(t[b & 15])


def _gemv_lut_rows(xe, xo, codes, scales, fmt: str, block: int, taus=None):
  """One activation row against packed rows: xe, xo (K_pad/2,) f32; codes (r, K_pad/2).

  Builds, per byte position j, the 256 possible products `xe[j] * T[hi] + xo[j] * T[lo]`
  (a (K_pad/2, 256) table), so each code byte costs one lookup and one add; the
  weight itself is never dequantized. ICQ taus (r, nblk) add `tau * sum(x over the
  block)` per block.
  """
  hi, lo = _byte_tables(fmt)
  table = xe[:, None] * hi[None, :] + xo[:, None] * lo[None, :]          # (K/2, 256)
  pos = jnp.arange(codes.shape[-1])[None, :]
  terms = table[pos, codes.astype(jnp.int32)]                            # (r, K/2)
  r, half = codes.shape
  per_block = terms.reshape(r, half // (block // 2), block // 2).sum(-1)  # (r, nblk)
  if taus is not None:
    xsum = (xe + xo).reshape(-1, block // 2).sum(-1)                     # (nblk,)
    return jnp.sum(per_block * scales + xsum[None, :] * taus, axis=-1)
  return jnp.sum(per_block * scales, axis=-1)                            # (r,)


def _gemv_lut(x, q: QuantizedArray, tile_elements: int, out_dtype):
  """`x @ W` for a single activation row (GEMV), 4-bit formats."""
  k, n = q.kernel_shape
  x1 = jnp.pad(x.reshape(k).astype(jnp.float32), (0, q.pad))
  xe, xo = x1[0::2], x1[1::2]
  tn = _aligned_tile_rows(q, tile_elements)
  lut = lambda qq: _gemv_lut_rows(xe, xo, qq.codes, qq.absmax, q.format, q.block_size,  # noqa: E731
                                  qq.tau)
  qd, t, r = _row_tiles(q, tn)
  if t <= 1 and not (t == 1 and r):
    return lut(qd).reshape(*x.shape[:-1], n).astype(out_dtype)
  y = lax.map(lambda i: lut(qd.rows(i * tn, tn)), jnp.arange(t)).reshape(-1)
  if r:
    y = jnp.concatenate([y, lut(qd.rows(t * tn, r))])
  return y.reshape(*x.shape[:-1], n).astype(out_dtype)


def matmul_xla(x: jax.Array, q, *, precision=None,
               preferred_element_type=None, tile_elements: int = TILE_ELEMENTS) -> jax.Array:
  """`x @ W`, x (..., in) -> (..., out), for any quantized kind: dequantize by tiles of
  output rows (`q.rows`), then dot_general; at most one tile is dense at a time.

  A single activation row (GEMV) with a 4-bit rows-layout `QuantizedArray` takes a
  lookup-table path instead: per byte position, the 256 possible partial products are tabulated
  from x, and each code byte is one lookup (about 2x faster on CPU, accumulates in f32).
  """
  k, n = q.kernel_shape
  dt = q.dtype if x.dtype == q.dtype else x.dtype
  if (isinstance(q, QuantizedArray) and q.format in F.FOUR_BIT and q.layout == "rows"
      and int(np.prod(x.shape[:-1])) == 1):
    return _gemv_lut(x, q, tile_elements, preferred_element_type or x.dtype)
  kw = {"precision": precision, "preferred_element_type": preferred_element_type}
  dims = (((x.ndim - 1,), (1,)), ((), ()))
  tn = _aligned_tile_rows(q, tile_elements)
  if tn >= n:
    return lax.dot_general(x, q.dequantize_t(dt), dims, **kw)
  qd, t, r = _row_tiles(q, tn)

  def tile(i):
    return lax.dot_general(x, qd.rows(i * tn, tn).dequantize_t(dt), dims, **kw)

  ys = lax.map(tile, jnp.arange(t))                   # (T, ..., tn)
  y = jnp.moveaxis(ys, 0, -2).reshape(*x.shape[:-1], -1)
  if r:
    y = jnp.concatenate([y, lax.dot_general(x, qd.rows(t * tn, r).dequantize_t(dt), dims,
                                            **kw)], axis=-1)
  return y


def matmul_t_xla(y: jax.Array, q, *, precision=None,
                 preferred_element_type=None, tile_elements: int = TILE_ELEMENTS) -> jax.Array:
  """`y @ W^T`, y (..., out) -> (..., in), contracting W's output axis (tiled likewise:
  the backward of `x @ W` dequantizes again, one tile at a time)."""
  k, n = q.kernel_shape
  dt = q.dtype if y.dtype == q.dtype else y.dtype
  kw = {"precision": precision, "preferred_element_type": preferred_element_type}
  dims = (((y.ndim - 1,), (0,)), ((), ()))
  tn = _aligned_tile_rows(q, tile_elements)
  if tn >= n:
    return lax.dot_general(y, q.dequantize_t(dt), dims, **kw)
  qd, t, r = _row_tiles(q, tn)
  yt = jnp.moveaxis(y[..., :t * tn].reshape(*y.shape[:-1], t, tn), -2, 0)
  out_dtype = preferred_element_type or y.dtype

  def step(acc, args):
    i, yy = args
    part = lax.dot_general(yy, qd.rows(i * tn, tn).dequantize_t(dt), dims, **kw)
    return acc + part.astype(acc.dtype), None

  acc = jnp.zeros((*y.shape[:-1], k), jnp.float32)
  acc, _ = lax.scan(step, acc, (jnp.arange(t), yt))
  if r:
    acc = acc + lax.dot_general(y[..., t * tn:], qd.rows(t * tn, r).dequantize_t(dt), dims,
                                **kw).astype(jnp.float32)
  return acc.astype(out_dtype)


def _check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"qz.matmul: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
  return backend


def _has_kernel(q) -> bool:
  return isinstance(q, QuantizedArray) and q.layout == "rows" and not q.icq


def _check_kernel_leaf(q) -> None:
  if not isinstance(q, QuantizedArray):
    raise ValueError(f"qz.matmul: backend 'pallas' has kernels for QuantizedArray "
                     f"(nf4/fp4/int4/int8) only, not {type(q).__name__}; use 'xla' or 'auto'")
  if q.layout != "rows":
    raise ValueError(
        f"qz.matmul: backend 'pallas' reads the rows layout (blocks along each row); this "
        f"weight {q.shape} ({q.format}, block {q.block_size}) has the {q.layout!r} layout "
        "(bitsandbytes' blocks across rows, in_features not a multiple of the block); "
        "use backend='xla' or 'auto'")
  if q.icq:
    raise ValueError(
        f"qz.matmul: backend 'pallas' has no kernel for ICQ taus (QuantConfig(icq=True)); "
        f"this weight {q.shape} ({q.format}, block {q.block_size}) has them: use "
        "backend='xla' or 'auto'")


def _kernel(x, q, platform, tiles, interpret, out_dtype):
  """The Pallas kernel for `platform` ("gpu" or "tpu") on x (..., in)."""
  x2 = x.reshape(-1, x.shape[-1])
  k, n = q.kernel_shape
  y = _pallas.qmatmul(x2, q.codes, q.scales(), fmt=q.format, block=q.block_size,
                      in_features=k, tiles=tiles, platform=platform, interpret=interpret,
                      out_dtype=out_dtype)
  return y.reshape(*x.shape[:-1], n)


def _forward(x, q, backend, tiles, interpret, precision, preferred_element_type):
  if backend == "xla" or (backend == "auto" and not _has_kernel(q)):
    # group-wise kinds, bnb's flat layout and ICQ have no Pallas kernel: "auto" takes XLA
    return matmul_xla(x, q, precision=precision,
                      preferred_element_type=preferred_element_type)
  _check_kernel_leaf(q)
  out_dtype = preferred_element_type or x.dtype
  if interpret is not None:
    # forced either way: one path, the kernel of the platform traced on
    kind = "tpu" if jax.default_backend() == "tpu" else "gpu"
    return _kernel(x, q, kind, tiles, interpret, out_dtype)
  # Chosen per platform when the program is lowered (`extend.per_platform`), not
  # from `jax.default_backend()` now: a program traced on a CPU host and compiled or
  # exported for GPU/TPU carries the kernel there and XLA (or the interpreter) on CPU.
  if backend == "auto":
    cpu = functools.partial(matmul_xla, precision=precision,
                            preferred_element_type=preferred_element_type)
  else:
    cpu = functools.partial(_kernel, platform="gpu", tiles=tiles, interpret=True,
                            out_dtype=out_dtype)
  gpu = functools.partial(_kernel, platform="gpu", tiles=tiles, interpret=False,
                          out_dtype=out_dtype)
  tpu = functools.partial(_kernel, platform="tpu", tiles=tiles, interpret=False,
                          out_dtype=out_dtype)
  return per_platform({"cpu": lambda x, q: cpu(x, q).astype(out_dtype), "cuda": gpu,
                       "rocm": gpu, "tpu": tpu}, x, q)


def _zero_cotangent(q):
  def zero(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, jax.dtypes.float0)
  return jax.tree.map(zero, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _qmatmul(x, q, backend, tiles, interpret, precision, preferred_element_type):
  return _forward(x, q, backend, tiles, interpret, precision, preferred_element_type)


def _qmatmul_fwd(x, q, backend, tiles, interpret, precision, preferred_element_type):
  y = _forward(x, q, backend, tiles, interpret, precision, preferred_element_type)
  return y, (q, jnp.zeros((), x.dtype))


def _qmatmul_bwd(backend, tiles, interpret, precision, preferred_element_type, res, g):
  q, xz = res
  dx = matmul_t_xla(g.astype(xz.dtype), q, precision=precision,
                    preferred_element_type=jnp.float32)
  return dx.astype(xz.dtype), _zero_cotangent(q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def matmul(x: jax.Array, q, backend: str = "auto", *,
           tiles: _pallas.QMatmulTiles | None = None, interpret: bool | None = None,
           precision=None, preferred_element_type=None) -> jax.Array:
  """`x @ W` for a quantized kernel `W` (in, out), never forming W in full when large.

  Args:
    x: (..., in) floating activations.
    q: an unbatched quantized kernel (`QuantizedArray`, `GroupQuantizedArray`, or a
      kind registered with `register_quantized_kind`) with logical shape (in, out)
      (use `jax.vmap` for stacked weights).
    backend: "auto" (Pallas on GPU/TPU for a rows-layout `QuantizedArray` without ICQ
      taus, XLA elsewhere, for bnb's flat layout, ICQ and the other kinds), "xla" or "pallas"
      ("pallas" on CPU runs the kernel in the interpreter; it refuses the other kinds,
      the flat layout and ICQ leaves with a ValueError).
    tiles: `QMatmulTiles` for the Pallas kernels.
    interpret: force (or forbid) Pallas interpret mode, which also fixes the kernel at
      trace time (the TPU one if tracing on TPU, else the GPU one); default None: per
      platform at lowering, the interpreter on CPU and the compiled kernels on GPU/TPU.
    precision, preferred_element_type: as `lax.dot_general`.

  Returns:
    (..., out), in `preferred_element_type` or x's dtype. Differentiable in x
    (`dx = dy @ W^T`, dequantized on the fly); the codes get zero cotangents.

  Example:
    >>> y = qz.matmul(x, qz.quantize_array(w, "nf4"))
  """
  if type(q) not in QUANTIZED_KINDS:
    raise TypeError(f"qz.matmul: q must be a quantized kernel ("
                    f"{', '.join(sorted(c.__name__ for c in QUANTIZED_KINDS))}), got "
                    f"{type(q).__name__}")
  if q.nbatch:
    raise ValueError(f"qz.matmul: q has stacked batch axes (shape {q.shape}); slice it or "
                     "use jax.vmap")
  if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != q.kernel_shape[0]:
    raise ValueError(f"qz.matmul: x {getattr(x, 'shape', None)} does not contract with "
                     f"W {q.shape}: the last axis of x must be {q.kernel_shape[0]}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"qz.matmul: x must be floating, got {np.dtype(x.dtype).name}")
  backend = _check_backend(backend)
  return _qmatmul(x, q, backend, tiles or _pallas.QMatmulTiles(), interpret, precision,
                  preferred_element_type)


# ----------------------------------------------------------------------------
# implicit rules

DEFAULT_BACKEND = "auto"


def _dot_general_rule(prim, x, q, *, dimension_numbers, precision=None,
                      preferred_element_type=None, **params):
  """x @ W (contracting W's in axis) or x @ W^T (its out axis); the leaf-on-the-left
  case is derived by `register_dot_rule`. One rule for every quantized kind: LoRA over
  any of them (QLoRA, ModuLoRA) reaches it through the LoRA rule's `x @ w`, so the
  forward dequantizes tile by tile, the backward (`custom_vjp`) dequantizes again for
  `dx`, and no dense kernel is kept between the two."""
  if type(x) in QUANTIZED_KINDS:
    return NotImplemented
  (xc, wc), (xb, wb) = dimension_numbers
  x = lj.materialize(x)
  nb = q.nbatch
  if tuple(wb) != tuple(range(nb)) or len(wc) != 1 or x.dtype != q.dtype:
    return NotImplemented
  axis = wc[0] - nb
  if axis not in (0, 1):
    return NotImplemented
  xfree = [d for d in range(x.ndim) if d not in xb and d != xc[0]]
  xt = jnp.transpose(x, (*xb, *xfree, xc[0]))
  kw = {"precision": precision, "preferred_element_type": preferred_element_type}
  if axis == 0:
    fn = lambda xx, qq: matmul(xx, qq, DEFAULT_BACKEND, **kw)
  else:
    fn = lambda xx, qq: matmul_t_xla(xx, qq, **kw)
  for _ in range(nb):
    fn = jax.vmap(fn)
  return fn(xt, q)                               # (batch, xfree, qfree)


def _convert_rule(prim, q, *, new_dtype, **params):
  """Casting a quantized weight keeps it quantized: only its logical dtype changes.

  (An upcast of a bf16 weight dequantizes straight to the wider type, skipping the
  bf16 rounding a dense cast would have kept.)"""
  if not jnp.issubdtype(new_dtype, jnp.floating):
    return NotImplemented
  # only the static dtype changes: no re-validation (which would read the scales back
  # to the host on every eager cast)
  return q.replace_children(dtype=jnp.dtype(new_dtype))


def _copy_rule(prim, q, **params):
  return q


QUANTIZED_KINDS: set[type] = set()


def register_quantized_kind(cls: type) -> type:
  """Make `cls` a quantized kernel kind that `qz.matmul`, `implicit` (and so LoRA over
  it), `qz.dequantize` and `qz.summary` handle. Needs only dequantization:

    kernel_shape: static (in, out); dtype; nbatch (leading stacked axes).
    dequantize_t(dtype) -> (*batch, out, in): the weight in storage layout.
    for_rows() -> a leaf ready for `rows` (e.g. scales decoded once).
    rows(start, size) -> the leaf of output rows [start, start + size) of an unbatched
      leaf (start may be traced; size is static); its `dequantize_t` is that tile.
    nbytes() -> stored bytes (bits per parameter in `qz.summary`).

  Registers the dot_general, convert_element_type and copy rules for `cls`. Returns
  `cls`, so it can decorate the class.
  """
  QUANTIZED_KINDS.add(cls)
  lj.register_dot_rule(cls)(_dot_general_rule)
  lj.register_rule(P.convert_element_type_p, cls)(_convert_rule)
  lj.register_rule(P.copy_p, cls)(_copy_rule)
  return cls


register_quantized_kind(QuantizedArray)
register_quantized_kind(GroupQuantizedArray)


@lj.register_rule(P.gather_p, QuantizedArray)
def _gather_rule(prim, q, indices, *, dimension_numbers, slice_sizes, **params):
  """Embedding lookup `W[ids]` of a 2-D table: only the rows asked for are dequantized."""
  dn = dimension_numbers
  if q.nbatch:
    return NotImplemented
  vocab, dim = q.shape
  if (tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
      or tuple(slice_sizes) != (1, dim) or len(dn.offset_dims) != 1
      or getattr(dn, "operand_batching_dims", ()) != ()
      or tuple(dn.offset_dims) != (indices.ndim - 1,)):
    return NotImplemented
  ids = jnp.clip(indices[..., 0], 0, vocab - 1).astype(jnp.int32)
  if q.layout == "flat":
    if vocab * dim >= 2 ** 31:
      return NotImplemented            # flat indices would overflow int32
    # kernel element (v, d) is storage element (d, v): flat index d * vocab + v
    flat = jnp.arange(dim, dtype=jnp.int32).reshape(dim, *([1] * ids.ndim)) * vocab + ids[None]
    s = q.scales()[flat // q.block_size]                 # (dim, *ids)
    t = None if not q.icq else q.taus()[flat // q.block_size]
    if q.format == "int8":
      vals = F.code_values(q.codes[flat], q.format)
    else:
      byte = q.codes[flat // 2]
      vals = F.code_values(jnp.where(flat % 2 == 0, byte >> 4, byte & jnp.uint8(15)),
                           q.format)
    return jnp.moveaxis(add_tau(vals * s, t).astype(q.dtype), 0, -1)
  scales = q.scales()                                    # (dim, vocab_pad / block)
  s = scales[:, ids // q.block_size]                     # (dim, *ids)
  t = None if not q.icq else q.taus()[:, ids // q.block_size]
  if q.format == "int8":
    c = q.codes[:, ids]
    vals = c.astype(jnp.float32) * jnp.float32(1.0 / 127.0)
  else:
    byte = q.codes[:, ids // 2]
    nib = jnp.where(ids % 2 == 0, byte >> 4, byte & jnp.uint8(15))
    vals = F.code_values(nib, q.format)
  rows = add_tau(vals * s, t).astype(q.dtype)         # (dim, *ids)
  return jnp.moveaxis(rows, 0, -1)



__all__ = ["BACKENDS", "QUANTIZED_KINDS", "matmul", "matmul_t_xla", "matmul_xla",
           "register_quantized_kind"]
