"""Dequant-matmul on CPU, d = 4096: GEMV (batch 1) and GEMM (batch 256), side by side.

Rows: f32 dense dot, bf16 dense dot, our XLA dequant path (`qz.matmul(..., "xla")`,
jitted) for nf4 / fp4 / int4 / int8 (block 64, nf4 and fp4 with double quant as
QLoRA stores them), bitsandbytes' CPU 4-bit matmul (`bnb.matmul_4bit` on float32,
and `Linear4bit` in eval mode on bfloat16, which uses its fused CPU GEMV kernel when
the CPU has AVX512-BF16), and Google's qwix NF4 weight-only matmul, jitted: the
weight is `qwix.quantize(W, "nf4", channelwise_axes=(1,), tiled_axes={0: 64})` (the
QArray qwix's PTQ/QLoRA providers build for a Dense kernel with `tile_size=64`: uint4
codes, one float32 scale per 64 inputs per output, no double quant) and the matmul is
`qwix.dot_general(x, W, ...)`, the op those providers call. For nf4 qwix takes its
"dequantize the weight, then a float dot" path (NF4 cannot be dequantized on the
output). The bf16 qwix row casts the QArray's dequant type to bfloat16
(`QArray.astype`). Prints median times and ratios to f32 dense.

The Pallas kernels run only on GPU/TPU (on CPU they run in the interpreter, which
says nothing about speed), so they are not timed here: `--device` runs
benchmarks/qmatmul_device.py instead, which times them on a GPU or TPU.

    python benchmarks/qmatmul.py
    python benchmarks/qmatmul.py --device     # on a GPU or TPU host
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import quantization as qz


def _time(fn, reps):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _nbytes(tree) -> int:
  """Bytes of the array leaves; 4-bit dtypes count half a byte (XLA packs them on CPU)."""
  total = 0
  for x in jax.tree.leaves(tree):
    bits = 4 if np.dtype(x.dtype).name in ("int4", "uint4", "float4_e2m1fn") else \
        8 * np.dtype(x.dtype).itemsize
    total += x.size * bits // 8
  return total


def main():
  if "--device" in sys.argv[1:]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import qmatmul_device
    sys.exit(qmatmul_device.main([a for a in sys.argv[1:] if a != "--device"]))
  ap = argparse.ArgumentParser()
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  d = args.dim
  rng = np.random.default_rng(0)
  wt = (rng.standard_normal((d, d)) * 0.02).astype(np.float32)       # (out, in)
  w32 = jnp.asarray(wt.T)
  w16 = w32.astype(jnp.bfloat16)
  qs = {fmt: qz.quantize_array(w32, fmt, 64, fmt in ("nf4", "fp4"))
        for fmt in ("nf4", "fp4", "int4", "int8")}
  print(f"x @ W, W {d}x{d}, CPU ({os.cpu_count()} cores, jax {jax.__version__}); "
        f"median of {args.reps}")
  print(f"weight bytes: f32 {w32.nbytes / 1e6:.1f} MB, bf16 {w16.nbytes / 1e6:.1f} MB, "
        + ", ".join(f"{f} {q.nbytes() / 1e6:.1f} MB ({qz.bits_per_param(q):.3f} b/p)"
                    for f, q in qs.items()))

  dense = jax.jit(lambda x, w: x @ w)
  qmm = jax.jit(lambda x, q: qz.matmul(x, q, "xla"))
  # bf16 activations: the weight's logical dtype cast to bf16 (as the convert rule does)
  qmm16 = jax.jit(lambda x, q: qz.matmul(x, dataclasses.replace(q, dtype=jnp.bfloat16), "xla"))

  try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch
    tw = torch.from_numpy(wt)
    packed, state = bf.quantize_4bit(tw, blocksize=64, compress_statistics=True, quant_type="nf4")
    lin = bnb.nn.Linear4bit(d, d, bias=False, quant_type="nf4", compress_statistics=True,
                            compute_dtype=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(tw.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    lin = lin.to("cpu").eval()
    bnb_err = None
  except Exception as e:  # noqa: BLE001
    bnb_err = str(e)
  try:
    import qwix
    # As qwix's PtqProvider/LoraProvider quantize a Dense kernel (in, out) with
    # weight_qtype="nf4", tile_size=64: contracting axis 0 tiled by 64, axis 1 channelwise.
    qw = jax.block_until_ready(qwix.quantize(w32, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}))
    qw16 = qw.astype(jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    qwmm = jax.jit(lambda x, q: qwix.dot_general(x, q, dims))
    qw_bytes = _nbytes(qw)
    print(f"qwix nf4 (tile 64, f32 scales, no double quant): {qw_bytes / 1e6:.1f} MB "
          f"({qw_bytes * 8 / qw.qvalue.size:.3f} b/p; uint4 codes packed two per byte on CPU); "
          f"max |W - deq| qwix {float(jnp.max(jnp.abs(qwix.dequantize(qw) - w32))):.2e}, "
          f"ours nf4+dq {float(jnp.max(jnp.abs(qz.dequantize(qs['nf4']) - w32))):.2e}")
    qwix_err = None
  except Exception as e:  # noqa: BLE001
    qwix_err = f"unavailable: {type(e).__name__}: {e}"

  for m in args.batches:
    x32 = jnp.asarray(rng.standard_normal((m, d)).astype(np.float32))
    x16 = x32.astype(jnp.bfloat16)
    rows = [("f32 dense", _time(lambda x32=x32: dense(x32, w32), args.reps)),
            ("bf16 dense", _time(lambda x16=x16: dense(x16, w16), args.reps))]
    for fmt, q in qs.items():
      rows.append((f"ours xla {fmt}{'+dq' if q.double_quant else ''} f32",
                   _time(lambda q=q, x32=x32: qmm(x32, q), args.reps)))
    rows.append(("ours xla nf4+dq bf16", _time(lambda x16=x16: qmm16(x16, qs["nf4"]), args.reps)))
    if bnb_err is None:
      tx = torch.from_numpy(np.array(x32))
      with torch.no_grad():
        rows.append(("bnb matmul_4bit nf4+dq f32",
                     _time(lambda tx=tx: bnb.matmul_4bit(tx, packed.t(), quant_state=state),
                           args.reps)))
        tx16 = tx.to(torch.bfloat16)
        rows.append(("bnb Linear4bit eval nf4+dq bf16", _time(lambda tx16=tx16: lin(tx16), args.reps)))
    if qwix_err is None:
      rows.append(("qwix nf4 tile64 (no dq) f32", _time(lambda x32=x32: qwmm(x32, qw), args.reps)))
      rows.append(("qwix nf4 tile64 (no dq) bf16", _time(lambda x16=x16: qwmm(x16, qw16), args.reps)))
    base = rows[0][1]
    print(f"\nbatch {m} ({'GEMV' if m == 1 else 'GEMM'})")
    print(f"{'':<34} {'ms':>9} {'vs f32 dense':>13}")
    for name, t in rows:
      print(f"{name:<34} {t * 1e3:>9.2f} {base / t:>12.2f}x")
    if bnb_err is not None:
      print(f"{'bitsandbytes':<34} unavailable: {bnb_err}")
    if qwix_err is not None:
      print(f"{'qwix nf4':<34} {qwix_err}")
  print("\nmeasured on a shared, loaded 2-core machine")


if __name__ == "__main__":
  main()
