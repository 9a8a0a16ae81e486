"""NF4 quantization throughput on CPU: ours (jitted, bit-exact) vs bitsandbytes, side by side.

Quantizes one float32 matrix (PyTorch layout (out, in) for bitsandbytes; our kernel is
its transpose) with block 64, with and without double quantization, and prints the
median wall time, throughput (M params/s, GB/s of float32 input) and the ratio
bnb time / our time (target >= 2). Also checks that the bytes are equal.

Double quantization's offset is torch's float32 `mean` of the absmax values; above
32768 blocks torch sums on several threads, so for this 4096 x 4096 matrix the
offset (and so the absmax codes) may differ from bitsandbytes' in the last bit;
the 4-bit codes and block absmax are always equal. The "bytes equal" column reports
what was seen.

    python benchmarks/quantize.py               # 4096 x 4096
    python benchmarks/quantize.py --dim 1024    # smaller
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import quantization as qz


def _time(fn, reps):
  fn()  # warm-up (compile)
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  d = args.dim
  rng = np.random.default_rng(0)
  wt = (rng.standard_normal((d, d)) * 0.02).astype(np.float32)        # (out, in)
  w = jnp.asarray(wt.T)                                              # our kernel (in, out)
  print(f"NF4 quantization of a {d}x{d} float32 matrix, block 64, CPU "
        f"({os.cpu_count()} cores, jax {jax.__version__})")
  try:
    import bitsandbytes.functional as bf
    import torch
    torch_w = torch.from_numpy(wt)
    have_bnb = True
  except Exception as e:  # noqa: BLE001
    print(f"bitsandbytes unavailable: {e}")
    have_bnb = False

  head = f"{'double quant':<13} {'ours s':>9} {'ours Mp/s':>10} {'bnb s':>9} {'bnb Mp/s':>9} " \
         f"{'bnb/ours':>9} {'bytes equal':>12}"
  print(head)
  print("-" * len(head))
  for dq in (False, True):
    def ours(dq=dq):
      q = qz.quantize_array(w, "nf4", 64, dq)
      jax.block_until_ready(q)
      return q
    t_ours = _time(ours, args.reps)
    row = f"{dq!s:<13} {t_ours:>9.4f} {d * d / t_ours / 1e6:>10.1f}"
    if have_bnb:
      def theirs(dq=dq):
        return bf.quantize_4bit(torch_w, blocksize=64, compress_statistics=dq, quant_type="nf4")
      t_bnb = _time(theirs, args.reps)
      q = ours()
      packed, st = theirs()
      same_codes = np.array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
      same_abs = np.array_equal(np.asarray(q.absmax).reshape(-1), st.absmax.numpy())
      same = "yes" if same_codes and same_abs else (
          f"codes {'=' if same_codes else '!='}, absmax {'=' if same_abs else '!='}")
      if dq:
        same += f", offset d={float(q.offset) - float(st.offset):.1e}"
      row += f" {t_bnb:>9.4f} {d * d / t_bnb / 1e6:>9.1f} {t_bnb / t_ours:>9.2f}x {same:>12}"
    print(row)
  print("measured on a shared, loaded machine; median of", args.reps, "runs after a warm-up")


if __name__ == "__main__":
  main()
