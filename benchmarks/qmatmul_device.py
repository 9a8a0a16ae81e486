"""Dequant-matmul on a GPU or TPU: the Pallas kernel against XLA's dequantize-then-dot
and a bf16 dense dot, side by side, with the outputs checked against each other.

For each weight (in x out: 4096 x 4096, 4096 x 11008, 11008 x 4096, Llama-7B's
shapes) and batch (1: GEMV, 256: GEMM) and format (nf4 with double quant, int8):

- "pallas": `qz.matmul(x, W, "pallas")`, the kernel for this platform (Triton on
  GPU, Mosaic on TPU), which dequantizes inside its K loop;
- "xla": `qz.matmul(x, W, "xla")`, dequantize by tiles, then `dot_general`;
- "bf16 dense": `x @ W` with W dense in bfloat16.

Prints median times, each path's ratio to the bf16 dense dot, and the memory-bandwidth
limit of the kernel: the bytes it must read (codes, scales, x) and write over the
copy bandwidth measured here (a large on-device array copy). A GEMV is bound by that
limit; a kernel that reads 4-bit codes can beat bf16 dense by up to ~3.5x there.
Exits non-zero if the paths disagree by more than bf16 accumulation explains.

    python benchmarks/qmatmul_device.py            # on a GPU or TPU host

Not yet run on hardware (benchmarks/RESULTS.md). On CPU it refuses, unless
`--allow-cpu`, which runs the kernel in the Pallas interpreter at small sizes only
to check this script (tests/test_platform_export.py does).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import quantization as qz
from qmatmul import _time        # benchmarks/ is on the path: run as a script or from it

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def copy_bandwidth(reps: int, mib: int) -> float:
  """Bytes per second of an on-device copy (read + write) of `mib` MiB of float32."""
  n = mib * (1 << 20) // 4
  a = jnp.arange(n, dtype=jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  t = _time(lambda: copy(a), reps)
  return 2 * n * 4 / t


def kernel_bytes(q, m: int, x_dtype) -> int:
  """What the kernel must move at least: the codes and scales once, x in, y out."""
  k, n = q.kernel_shape
  item = jnp.dtype(x_dtype).itemsize
  return q.nbytes() + m * k * item + m * n * item


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                  default=list(SHAPES), help="weights as INxOUT (default: Llama-7B's)")
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
  ap.add_argument("--formats", nargs="+", default=["nf4", "int8"])
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--copy-mib", type=int, default=1024)
  ap.add_argument("--allow-cpu", action="store_true",
                  help="run on CPU (the kernel in the interpreter: a check, not a timing)")
  args = ap.parse_args(argv)
  platform = jax.default_backend()
  if platform not in ("gpu", "cuda", "rocm", "tpu") and not args.allow_cpu:
    print(f"qmatmul_device: no GPU or TPU here (jax.default_backend() is {platform!r}); "
          "this script times the Pallas kernels on one. --allow-cpu runs a small check "
          "in the interpreter.", file=sys.stderr)
    return 2
  dev = jax.devices()[0]
  bw = copy_bandwidth(max(3, args.reps // 4), args.copy_mib)
  print(f"{dev.device_kind} ({platform}), jax {jax.__version__}; median of {args.reps}; "
        f"copy bandwidth {bw / 1e9:.1f} GB/s")
  if platform == "cpu":
    print("CPU: the Pallas kernel runs in the interpreter; times say nothing about speed")

  pallas = jax.jit(lambda x, q: qz.matmul(x, q, "pallas"))
  xla = jax.jit(lambda x, q: qz.matmul(x, q, "xla"))
  dense = jax.jit(lambda x, w: x @ w)
  rng = np.random.default_rng(0)
  worst = 0.0
  print(f"\n{'W (in x out)':<14} {'M':>4} {'fmt':<7} {'pallas ms':>10} {'xla ms':>9} "
        f"{'bf16 ms':>9} {'bf16/pallas':>12} {'xla/pallas':>11} {'limit ms':>9} "
        f"{'max rel err':>12}")
  for k, n in args.shapes:
    w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
    w16 = w.astype(jnp.bfloat16)
    for fmt in args.formats:
      q = qz.quantize_array(w16, fmt, 64, fmt in ("nf4", "fp4"))
      wq16 = qz.dequantize(q).astype(jnp.bfloat16)
      for m in args.batches:
        x = jnp.asarray(rng.standard_normal((m, k), np.float32)).astype(jnp.bfloat16)
        yp, yx = pallas(x, q), xla(x, q)
        yd = dense(x, wq16)              # the same (dequantized) weight, dense
        scale = float(jnp.max(jnp.abs(yd.astype(jnp.float32)))) or 1.0
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - yd.astype(jnp.float32))))
                  for a in (yp, yx)) / scale
        worst = max(worst, err)
        tp = _time(lambda: pallas(x, q), args.reps)
        tx = _time(lambda: xla(x, q), args.reps)
        td = _time(lambda: dense(x, w16), args.reps)
        limit = kernel_bytes(q, m, x.dtype) / bw
        print(f"{f'{k}x{n}':<14} {m:>4} {fmt:<7} {tp * 1e3:>10.3f} {tx * 1e3:>9.3f} "
              f"{td * 1e3:>9.3f} {td / tp:>11.2f}x {tx / tp:>10.2f}x {limit * 1e3:>9.3f} "
              f"{err:>12.2e}")
  # bf16 inputs, float32 accumulation in different orders: a few bf16 ulps of the max
  ok = worst < 3e-2
  print(f"\noutputs agree: {'yes' if ok else 'NO'} (worst max |diff| / max |y| = {worst:.2e}, "
        "bound 3e-2)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
