"""Per-row gather (BGMV) against sort-by-adapter + `jax.lax.ragged_dot` (SGMV) for the
LoRA term of a multi-adapter batch, side by side in one run: where does SGMV win?

For rows x (B, d) with adapter ids (B,) over a bank a (N, d, r), b (N, r, d):
  BGMV: `einsum(x, a[ids])`, `einsum(t, b[ids])`: each row gathers its own factors
        (what `lj.MultiLoraWeight`'s rule does);
  SGMV: sort the rows by adapter, `ragged_dot(x_sorted, a, group_sizes)` and again with
        b, unsort: each adapter's factors read once per group (Punica / S-LoRA's SGMV).
Also the base matmul `x @ W` (d, d) alone, the work every variant adds to. Jitted, warm,
median of `--reps` interleaved runs; outputs checked equal first.

    .venv/bin/python benchmarks/lora_gather.py [--d 1024] [--rank 16] [--adapters 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def bgmv(x, a, b, ids):
  t = jnp.einsum("bd,bdr->br", x, jnp.take(a, ids, axis=0))
  return jnp.einsum("br,bro->bo", t, jnp.take(b, ids, axis=0))


def bank_dense(x, a, b, ids):
  """Every row against every adapter of the bank, then each row's own kept (one-hot):
  reads the bank once, 2 B N r (d + d) FLOPs: cheap while N is small."""
  t = jnp.einsum("bd,ndr->bnr", x, a)
  t = t * jax.nn.one_hot(ids, a.shape[0], dtype=t.dtype)[:, :, None]
  return jnp.einsum("bnr,nro->bo", t, b)


def sgmv(x, a, b, ids):
  order = jnp.argsort(ids)
  sizes = jnp.bincount(ids, length=a.shape[0]).astype(jnp.int32)
  xs = x[order]
  t = jax.lax.ragged_dot(xs, a, sizes)
  y = jax.lax.ragged_dot(t, b, sizes)
  return jnp.zeros_like(y).at[order].set(y)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--adapters", type=int, default=8)
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--rows", default="1,4,16,64,256,1024")
  args = ap.parse_args(argv)
  d, r, n = args.d, args.rank, args.adapters
  k = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(k[0], (n, d, r)) / d ** 0.5
  b = jax.random.normal(k[1], (n, r, d)) / r ** 0.5
  w = jax.random.normal(k[2], (d, d)) / d ** 0.5
  f_b, f_s, f_d = jax.jit(bgmv), jax.jit(sgmv), jax.jit(bank_dense)
  f_w = jax.jit(lambda x, w: x @ w)
  print(f"d {d}, rank {r}, {n} adapters, ids uniform; ms (median of {args.reps})")
  print(f"{'rows':>6} {'base x@W':>9} {'BGMV':>8} {'SGMV':>8} {'dense':>8} {'SGMV/BGMV':>10}"
        f" {'dense/BGMV':>11}")
  for rows in map(int, args.rows.split(",")):
    x = jax.random.normal(k[3], (rows, d))
    ids = jnp.asarray(np.random.default_rng(rows).integers(0, n, rows), jnp.int32)
    np.testing.assert_allclose(f_b(x, a, b, ids), f_s(x, a, b, ids), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(f_b(x, a, b, ids), f_d(x, a, b, ids), rtol=2e-4, atol=2e-4)
    t = {"w": [], "b": [], "s": [], "d": []}
    variants = ((f_w, "w", (x, w)), (f_b, "b", (x, a, b, ids)), (f_s, "s", (x, a, b, ids)),
                (f_d, "d", (x, a, b, ids)))
    for f, key, args_ in variants:
      f(*args_).block_until_ready()
    for _ in range(args.reps):
      for f, key, args_ in variants:
        s = time.perf_counter()
        f(*args_).block_until_ready()
        t[key].append(time.perf_counter() - s)
    m = {kk: statistics.median(v) * 1e3 for kk, v in t.items()}
    print(f"{rows:>6} {m['w']:9.3f} {m['b']:8.3f} {m['s']:8.3f} {m['d']:8.3f} "
          f"{m['s'] / m['b']:9.2f}x {m['d'] / m['b']:10.2f}x")


if __name__ == "__main__":
  main()
