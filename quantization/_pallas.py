"""Pallas dequant-matmul kernels: `y = x @ W` with `W` dequantized inside the K loop.

Laid out as JAX's own Pallas ops (`jax/experimental/pallas/ops/`): a kernel
function (refs in, refs out, static settings keyword-only), a jitted wrapper that
validates its inputs and calls `pl.pallas_call`, a plain-jnp `qmatmul_reference`,
and tile sizes in a frozen dataclass.

Two kernels share the same math:

- GPU (Triton lowering, asked for explicitly with `pltriton.CompilerParams`):
  grid `(M / block_m, N / block_n)`; each program walks K in a `fori_loop`, loading
  `block_k` columns of x and of the packed codes per step. Triton's blocks are
  pointers into global memory, so the whole-K BlockSpecs cost no shared memory;
  block dims are powers of two, at least 16 (what `tl.dot` takes).
- TPU (Mosaic lowering): grid `(M / block_m, N / block_n, K / block_k)` with K
  last ("arbitrary", sequential); the float32 output block is the accumulator.
  Block shapes follow Mosaic's tiling rules, checked in the wrapper
  (`check_tpu_blocks`).

Why not Mosaic GPU, JAX's default GPU backend for `pl.pallas_call` since 0.9: a
Mosaic GPU kernel is a different program, not these kernels with other block
shapes. Its BlockSpecs are staged through shared memory (at most 256 elements per
block dimension), and with K tiled on the grid like the TPU kernel (which fits
those limits) its lowering still stops at the first `dot_general`: Mosaic GPU has
no dot in its lane-level semantics; matmuls are `plgpu.wgmma` on shared-memory refs
in warpgroup semantics (Hopper and newer), and `pl.pallas_call` on Mosaic GPU is
deprecated for `plgpu.kernel`. `GPU_LOWERING` is the one switch; a Mosaic GPU
kernel would be a third kernel behind it.

Inputs are prepared by the wrapper: for 4-bit formats x is split into its even
and odd columns (the high and low nibble of each code byte), so the kernel never
interleaves; the per-block scales (double quantization already decoded) are
passed transposed, `(K / block, N)`, so a K sub-block's scales are one row. Each
quantization block contributes `(x_even @ hi^T + x_odd @ lo^T) * scale`, in
float32. M, N and K are padded to the tiles with zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from quantization import _formats as F

# The Pallas GPU lowering the GPU kernel is written for (see the module docstring).
GPU_LOWERING = "triton"
# Triton's `tl.dot` takes power-of-two block dims of at least 16.
TRITON_MIN_BLOCK = 16
# Mosaic TPU: the last block dim a multiple of 128 lanes, the one before it of the
# sublane tiling for the dtype's width (8 rows of 32 bits, 16 of 16, 32 of 8), unless
# the block spans the whole array dim.
TPU_LANES = 128
TPU_SUBLANES = {4: 8, 2: 16, 1: 32}


@dataclasses.dataclass(frozen=True)
class QMatmulTiles:
  """Tile sizes. `block_k` is rounded to a multiple of the quantization block."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 512
  num_warps: int = 4          # Triton only
  num_stages: int = 2         # Triton only


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _triton_block(tile: int, extent: int) -> int:
  """The largest power of two <= `tile` that is not past `extent` rounded up to a power
  of two, and at least TRITON_MIN_BLOCK."""
  cover = 1 << max(0, int(extent) - 1).bit_length()
  return max(TRITON_MIN_BLOCK, 1 << (int(min(tile, cover)).bit_length() - 1))


def gpu_compiler_params(tiles: QMatmulTiles):
  """Compiler params that pick the Pallas GPU lowering `GPU_LOWERING` (jax 0.10 picks
  Mosaic GPU when none are given)."""
  if GPU_LOWERING == "triton":
    return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
  raise ValueError(f"qmatmul: no GPU kernel for the {GPU_LOWERING!r} lowering")


def check_tpu_blocks(blocks) -> None:
  """Raise a ValueError naming the operand unless every (name, block shape, array
  shape, dtype) follows Mosaic TPU's tiling rule for the last two block dims."""
  for name, block, full, dtype in blocks:
    sub = TPU_SUBLANES[np.dtype(dtype).itemsize]
    (b0, b1), (f0, f1) = block[-2:], full[-2:]
    ok1 = b1 == f1 or b1 % TPU_LANES == 0
    ok0 = b0 == f0 or b0 % sub == 0
    if not (ok0 and ok1):
      raise ValueError(
          f"qmatmul (TPU): the {name} block {tuple(block)} of the {np.dtype(dtype).name} "
          f"array {tuple(full)} breaks Mosaic's tiling: its last dim must be a multiple of "
          f"{TPU_LANES} or {f1}, the one before it a multiple of {sub} or {f0}; "
          "choose QMatmulTiles accordingly")


def _lookup(codes, fmt: str):
  """float32 code values via a select chain (no gathers inside kernels)."""
  if fmt == "int8":
    return codes.astype(jnp.float32) * jnp.float32(1.0 / 127.0)
  table = F.VALUES[fmt]
  c = codes.astype(jnp.int32)
  out = jnp.zeros(c.shape, jnp.float32)
  for i, v in enumerate(table):
    out = jnp.where(c == i, jnp.float32(v), out)
  return out


def _block_product(xs, codes, scale, *, fmt: str, compute_dtype):
  """One quantization block: xs = (x_even, x_odd) or (x,), codes (bn, w), scale (1, bn)."""
  dims = (((1,), (1,)), ((), ()))
  if fmt == "int8":
    w = _lookup(codes, fmt).astype(compute_dtype)
    y = lax.dot_general(xs[0].astype(compute_dtype), w, dims,
                        preferred_element_type=jnp.float32)
  else:
    c = codes.astype(jnp.int32)
    hi = _lookup(c >> 4, fmt).astype(compute_dtype)
    lo = _lookup(c & 15, fmt).astype(compute_dtype)
    y = (lax.dot_general(xs[0].astype(compute_dtype), hi, dims,
                         preferred_element_type=jnp.float32)
         + lax.dot_general(xs[1].astype(compute_dtype), lo, dims,
                           preferred_element_type=jnp.float32))
  return y * scale


def qmatmul_kernel_gpu(*refs, fmt: str, block: int, block_k: int, k_steps: int,
                       compute_dtype):
  """Triton kernel: one (block_m, block_n) output tile, K walked in a loop."""
  *x_refs, c_ref, s_ref, o_ref = refs
  per = 1 if fmt == "int8" else 2          # codes per byte
  cw = block // per                         # code columns per quantization block
  nsub = block_k // block

  def body(kk, acc):
    for j in range(nsub):
      col = kk * (block_k // per) + j * cw
      xs = [r[:, pl.ds(col, cw)] for r in x_refs]
      codes = c_ref[:, pl.ds(col, cw)]
      scale = s_ref[pl.ds(kk * nsub + j, 1), :]
      acc = acc + _block_product(xs, codes, scale, fmt=fmt, compute_dtype=compute_dtype)
    return acc

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  acc = lax.fori_loop(0, k_steps, body, acc)
  o_ref[...] = acc.astype(o_ref.dtype)


def qmatmul_kernel_tpu(*refs, fmt: str, block: int, block_k: int, compute_dtype):
  """Mosaic kernel: K is the last (sequential) grid axis; o_ref accumulates in f32."""
  *x_refs, c_ref, s_ref, o_ref = refs
  per = 1 if fmt == "int8" else 2
  cw = block // per

  @pl.when(pl.program_id(2) == 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

  acc = o_ref[...]
  for j in range(block_k // block):
    xs = [r[:, j * cw:(j + 1) * cw] for r in x_refs]
    codes = c_ref[:, j * cw:(j + 1) * cw]
    scale = s_ref[j:j + 1, :]
    acc = acc + _block_product(xs, codes, scale, fmt=fmt, compute_dtype=compute_dtype)
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=(
    "fmt", "block", "in_features", "tiles", "platform", "interpret", "out_dtype"))
def qmatmul(x: jax.Array, codes: jax.Array, scales: jax.Array, *, fmt: str, block: int,
            in_features: int, tiles: QMatmulTiles = QMatmulTiles(), platform: str = "gpu",
            interpret: bool = False, out_dtype=None) -> jax.Array:
  """`x @ W` for a quantized `W`, dequantizing inside the kernel.

  Args:
    x: (M, K) floating activations.
    codes: (N, K_pad // 2) uint8 packed 4-bit codes, or (N, K_pad) int8.
    scales: (N, K_pad // block) float32 per-block scales (decoded absmax).
    fmt: "nf4", "fp4", "int4" or "int8".
    block: quantization block size; `in_features`: K (the unpadded length).
    tiles: `QMatmulTiles`. platform: "gpu" (Triton) or "tpu" (Mosaic).
    interpret: run the kernel in the Pallas interpreter (CPU tests).
    out_dtype: output dtype, default `x.dtype`.

  Returns:
    (M, N) in `out_dtype`.
  """
  if x.ndim != 2:
    raise ValueError(f"qmatmul: x must be 2-D (M, K), got {x.shape=}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"qmatmul: x must be floating, got {x.dtype=}")
  if fmt not in F.FORMATS:
    raise ValueError(f"qmatmul: unknown {fmt=}; known formats: {F.FORMATS}")
  per = 1 if fmt == "int8" else 2
  m, k = x.shape
  n, kc = codes.shape
  k_pad = kc * per
  if k != in_features:
    raise ValueError(f"qmatmul: {x.shape[1]=} must equal {in_features=}")
  if k_pad % block or k_pad < k:
    raise ValueError(f"qmatmul: codes {codes.shape=} hold K_pad={k_pad}, which must be a "
                     f"multiple of {block=} and >= {in_features=}")
  if scales.shape != (n, k_pad // block):
    raise ValueError(f"qmatmul: {scales.shape=} must be (N, K_pad // block) = "
                     f"{(n, k_pad // block)}")
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"qmatmul: {platform=} must be 'gpu' or 'tpu'")
  out_dtype = out_dtype or x.dtype
  compute_dtype = x.dtype

  if min(tiles.block_m, tiles.block_n, tiles.block_k) <= 0:
    raise ValueError(f"qmatmul: tiles must be positive, got {tiles=}")
  if platform == "gpu":
    # powers of two, >= 16: Triton's block shapes
    block_m, block_n = _triton_block(tiles.block_m, m), _triton_block(tiles.block_n, n)
    block_k = max(block, _round_up(min(tiles.block_k, k_pad), block))
  else:
    # rounded to Mosaic's tiling: a block spans its whole (padded) array dim or is a
    # multiple of the sublane (rows) or lane (128) tile
    sub = TPU_SUBLANES[jnp.dtype(x.dtype).itemsize]
    block_m = _round_up(min(tiles.block_m, m), sub)
    block_n = _round_up(n, 32) if tiles.block_n >= n else _round_up(tiles.block_n, TPU_LANES)
    # whole quantization blocks whose scale rows fill a sublane tile (8 f32 rows) and
    # whose code columns fill 128 lanes, unless one K block covers all of K
    step = int(np.lcm(block * 8, TPU_LANES * per))
    block_k = _round_up(min(tiles.block_k, k_pad), step)
    if block_k >= k_pad:
      block_k = k_pad
  mp, np_, kp = _round_up(m, block_m), _round_up(n, block_n), _round_up(k_pad, block_k)

  x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
  codes = jnp.pad(codes, ((0, np_ - n), (0, (kp - k_pad) // per)))
  scales_t = jnp.pad(scales.astype(jnp.float32),
                     ((0, np_ - n), (0, (kp - k_pad) // block))).T   # (kp/block, np_)
  xs = [x] if fmt == "int8" else [x[:, 0::2], x[:, 1::2]]
  xw = kp // per
  grid_m, grid_n, k_steps = mp // block_m, np_ // block_n, kp // block_k

  if platform == "gpu":
    kernel = functools.partial(qmatmul_kernel_gpu, fmt=fmt, block=block, block_k=block_k,
                               k_steps=k_steps, compute_dtype=compute_dtype)
    in_specs = ([pl.BlockSpec((block_m, xw), lambda i, j: (i, 0)) for _ in xs]
                + [pl.BlockSpec((block_n, xw), lambda i, j: (j, 0)),
                   pl.BlockSpec((kp // block, block_n), lambda i, j: (0, j))])
    out = pl.pallas_call(
        kernel, grid=(grid_m, grid_n), in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=gpu_compiler_params(tiles),
        interpret=interpret, name=f"qmatmul_{fmt}_gpu")(*xs, codes, scales_t)
  else:
    kernel = functools.partial(qmatmul_kernel_tpu, fmt=fmt, block=block, block_k=block_k,
                               compute_dtype=compute_dtype)
    bkc = block_k // per
    check_tpu_blocks([*((f"x{'' if len(xs) == 1 else ('_even', '_odd')[i]}", (block_m, bkc),
                         xx.shape, xx.dtype) for i, xx in enumerate(xs)),
                      ("codes", (block_n, bkc), codes.shape, codes.dtype),
                      ("scales", (block_k // block, block_n), scales_t.shape, scales_t.dtype),
                      ("output", (block_m, block_n), (mp, np_), jnp.float32)])
    in_specs = ([pl.BlockSpec((block_m, bkc), lambda i, j, kk: (i, kk)) for _ in xs]
                + [pl.BlockSpec((block_n, bkc), lambda i, j, kk: (j, kk)),
                   pl.BlockSpec((block_k // block, block_n), lambda i, j, kk: (kk, j))])
    out = pl.pallas_call(
        kernel, grid=(grid_m, grid_n, k_steps), in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name=f"qmatmul_{fmt}_tpu")(*xs, codes, scales_t)
  return out[:m, :n].astype(out_dtype)


def qmatmul_reference(x: jax.Array, codes: jax.Array, scales: jax.Array, *, fmt: str,
                      block: int, in_features: int, out_dtype=None) -> jax.Array:
  """Plain jnp: dequantize W (N, K) in float32, then `x @ W^T` in x's dtype."""
  if fmt == "int8":
    vals = F.code_values(codes, "int8")
  else:
    vals = F.code_values(F.unpack_nibbles(codes), fmt)
  n, kp = vals.shape
  w = (vals.reshape(n, kp // block, block) * scales[..., None]).reshape(n, kp)
  w = w[:, :in_features].astype(x.dtype)
  y = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


