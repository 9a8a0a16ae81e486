"""NF4 quantization and dequantization on CPU: ours (jitted, bit-exact) vs bitsandbytes,
side by side in one run.

Quantizes one float32 matrix (PyTorch layout (out, in) for bitsandbytes; our kernel is
its transpose) with block 64, with and without double quantization, and prints the
median wall time, throughput (M params/s, GB/s of float32 input) and the ratio
bnb time / our time (target >= 2). Also checks that the bytes are equal.

Double quantization's offset is torch's float32 `mean` of the absmax values; above
32768 blocks torch sums on several threads, so for this 4096 x 4096 matrix the
offset (and so the absmax codes) may differ from bitsandbytes' in the last bit;
the 4-bit codes and block absmax are always equal. The "bytes equal" column reports
what was seen.

Dequantization: `qz.dequantize(q)` (the kernel `(in, out)`, what a model computes with)
and `q.dequantize_t()` (PyTorch's `(out, in)`, the layout bitsandbytes returns) against
bitsandbytes' CPU `dequantize_4bit` of the same weight (its output is `(out, in)`), with
and without double quantization; the ratio is bnb time / our time (target >= 1). Calls
alternate between the contenders so a loaded machine slows them alike, each after a 20
ms pause (OpenMP threads spin after bitsandbytes' call and would slow the next one). The
"bits equal" column compares every float32 bit pattern with bnb's result. "previous" is
the implementation before the byte-pair table and the kernel-layout decode (unpack
nibbles, look up, multiply, transpose), rebuilt here for comparison. "floor" writes a
constant into a fresh float32 array of the same size: the allocation and first-touch
page faults every contender pays for its fresh 64 MiB output, which dominate at 4096 x
4096; "mapped" is the same fill in place into an already mapped (donated) buffer, which
it also reads. The last row is a flat-layout weight (bitsandbytes' blocks crossing rows:
`in` = dim - 96 is not a multiple of the block), with double quantization; "previous"
had no such layout.

    python benchmarks/quantize.py               # 4096 x 4096
    python benchmarks/quantize.py --dim 1024    # smaller
    python benchmarks/quantize.py --only dequantize
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import quantization as qz
from quantization import _formats as F


def _time(fn, reps):
  fn()  # warm-up (compile)
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _time_alternating(fns, reps, pause=0.02):
  """Median wall time of each function, calls interleaved (a, b, c, a, b, c, ...), with
  a short pause before each call: OpenMP worker threads (bitsandbytes', torch's) spin
  for a while after their work and would otherwise slow whichever call comes next."""
  for fn in fns:
    fn()
    fn()                                         # compile, then warm caches
  ts = [[] for _ in fns]
  for _ in range(reps):
    for i, fn in enumerate(fns):
      time.sleep(pause)
      t = time.perf_counter()
      fn()
      ts[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in ts]


@jax.jit
def _previous_materialize(codes, scales):
  """The dequantization before this change: unpack the nibbles, look each up in the
  16-entry table, multiply by the block scale (storage layout), transpose."""
  vals = jnp.asarray(F.VALUES["nf4"])[F.unpack_nibbles(codes).astype(jnp.int32)]
  n, kp = vals.shape
  w = (vals.reshape(n, kp // 64, 64) * scales[..., None]).reshape(n, kp)
  return w.T


@functools.partial(jax.jit, static_argnums=1)
def _fill(v, shape):
  """A fresh float32 array of `shape`, every element written once."""
  return jnp.broadcast_to(v, shape) + v


@functools.partial(jax.jit, donate_argnums=0)
def _fill_into(buf, v):
  """The same fill into `buf`'s (donated, already mapped) memory; `buf` is read (times
  zero) so that XLA writes the result in place rather than into a fresh buffer."""
  return jnp.broadcast_to(v, buf.shape) + jnp.float32(0.0) * buf


def quantize_section(args, wt, w, bf, torch_w):
  d = args.dim
  print(f"NF4 quantization of a {d}x{d} float32 matrix, block 64")
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
    if bf is not None:
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


def dequantize_section(args, wt, bf, torch_w):
  d = args.dim
  flat_in = d - 96                  # not a multiple of the block: bnb's blocks cross rows
  print(f"NF4 dequantization to float32, block 64 (ms, median of {args.reps}; ratio = bnb / "
        f"ours): a {d}x{d} weight (rows layout), and a flat-layout {d}x{flat_in} one")
  head = (f"{'weight, dq':<13} {'bnb':>8} {'qz.dequantize':>14} {'ratio':>7} "
          f"{'dequantize_t':>13} {'ratio':>7} {'previous':>9} {'ratio':>7} {'bits equal':>11} "
          f"{'floor':>6} {'mapped':>7}")
  print(head)
  print("-" * len(head))
  import torch
  rows = [(f"rows, {dq}", torch_w, dq) for dq in ("no", "yes")]
  rows.append(("flat, yes", torch.from_numpy(np.ascontiguousarray(wt[:, :flat_in])), "yes"))
  for label, tw, dq in rows:
    packed, st = bf.quantize_4bit(tw, blocksize=64, compress_statistics=dq == "yes",
                                  quant_type="nf4")
    # the state bnb made, read as a QuantizedArray (the bytes are the same as ours)
    sd = {"w": packed, **{f"w.{k}": v for k, v in st.as_dict(packed=True).items()}}
    q = qz.from_bnb_state_dict(sd)["w"]
    ref = bf.dequantize_4bit(packed, st).numpy()
    same = (np.array_equal(np.asarray(qz.dequantize(q)).view(np.uint32), ref.T.view(np.uint32))
            and np.array_equal(np.asarray(q.dequantize_t()).view(np.uint32),
                               ref.view(np.uint32)))
    one = jnp.ones((), jnp.float32)
    n_out, n_in = tw.shape
    buf = [jnp.zeros((n_in, n_out), jnp.float32)]

    def mapped():                   # the same fill into an already mapped (donated) buffer
      buf[0] = _fill_into(buf[0], one)
      jax.block_until_ready(buf[0])

    fns = [lambda: bf.dequantize_4bit(packed, st),
           lambda: jax.block_until_ready(qz.dequantize(q)),
           lambda: jax.block_until_ready(q.dequantize_t()),
           lambda: jax.block_until_ready(_fill(one, (n_in, n_out))), mapped]
    if q.layout == "rows":
      fns.append(lambda: jax.block_until_ready(_previous_materialize(q.codes, q.scales())))
    ts = _time_alternating(fns, args.reps)
    t_bnb, t_mat, t_t, t_floor, t_mapped = ts[:5]
    ms = lambda t: f"{t * 1e3:.1f}"  # noqa: E731
    prev = (f"{ms(ts[5]):>9} {t_bnb / ts[5]:>6.2f}x" if len(ts) > 5 else f"{'-':>9} {'-':>7}")
    print(f"{label:<13} {ms(t_bnb):>8} {ms(t_mat):>14} {t_bnb / t_mat:>6.2f}x {ms(t_t):>13} "
          f"{t_bnb / t_t:>6.2f}x {prev} {'yes' if same else 'NO':>11} {ms(t_floor):>6} "
          f"{ms(t_mapped):>7}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dim", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--only", choices=("quantize", "dequantize"), default=None)
  args = ap.parse_args()
  d = args.dim
  rng = np.random.default_rng(0)
  wt = (rng.standard_normal((d, d)) * 0.02).astype(np.float32)        # (out, in)
  w = jnp.asarray(wt.T)                                              # our kernel (in, out)
  print(f"CPU ({os.cpu_count()} cores, jax {jax.__version__})")
  try:
    import bitsandbytes.functional as bf
    import torch
    torch_w = torch.from_numpy(wt)
    print(f"bitsandbytes {__import__('bitsandbytes').__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
  except Exception as e:  # noqa: BLE001
    print(f"bitsandbytes unavailable: {e}")
    bf = torch_w = None
  if args.only != "dequantize":
    quantize_section(args, wt, w, bf, torch_w)
    print()
  if args.only != "quantize":
    if bf is None:
      print("dequantization: needs bitsandbytes for the comparison")
    else:
      dequantize_section(args, wt, bf, torch_w)
  print("measured on a shared, loaded machine; median of", args.reps, "runs after a warm-up")


if __name__ == "__main__":
  main()
