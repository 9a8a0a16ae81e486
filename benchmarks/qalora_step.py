"""A QA-LoRA training step against a LoRA step, and QA-LoRA's two ways to compute it.

QA-LoRA's branch is `s * pool_L(x) @ a @ b`. Computed as written (pool first), a step
cost 1.4-1.8x a LoRA step; `pool_L(x) @ a = x @ a_exp` with `a_exp = (in/L)/L *
repeat(a, L)`, so the rule now hands LoRA's rule the equal `LoraWeight(w, a_exp, b)` and
gets its fused `x @ [w | a_exp]` GEMM and backward. This script times, in one run and
interleaved, the jitted loss-and-gradient step of a 2-layer 128-wide Llama (the quality
benchmark's) with rank-4 adapters on all projections, batch 16 x 32:

    .venv/bin/python benchmarks/qalora_step.py [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
import lora_jax._qalora as qa
from lora_jax.models import llama


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=30)
  args = ap.parse_args()
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4)
  base = llama.init_params(jax.random.key(0), cfg)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (16, 32)))
  targets = r"layers/.*_proj/kernel"

  def step_fn(lora_cfg, delegate: bool):
    params = lj.init(jax.random.key(1), base, lora_cfg)
    adapter, frozen = lj.split(params)

    def loss(ad):
      logits = lj.implicit(llama.forward)(lj.combine(ad, frozen), cfg, ids)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    qa._DELEGATE[0] = delegate      # read at trace time: compile now
    f = jax.jit(jax.value_and_grad(loss)).lower(adapter).compile()
    jax.block_until_ready(f(adapter))
    return lambda: jax.block_until_ready(f(adapter))

  qcfg = lj.LoraConfig(rank=4, alpha=8, targets=targets, use_qalora=True, qalora_group_size=32)
  runs = {"LoRA": step_fn(lj.LoraConfig(rank=4, alpha=8, targets=targets), True),
          "QA-LoRA (as LoRA on a_exp)": step_fn(qcfg, True),
          "QA-LoRA (pool first)": step_fn(qcfg, False)}
  qa._DELEGATE[0] = True
  times = {k: [] for k in runs}
  for _ in range(args.reps):          # interleaved: every variant sees the same load
    for k, f in runs.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  ref = statistics.median(times["LoRA"])
  print(f"loss-and-gradient step, median of {args.reps} interleaved runs")
  for k, ts in times.items():
    m = statistics.median(ts)
    print(f"{k:30} {m * 1e3:8.2f} ms   {m / ref:5.2f}x LoRA")


if __name__ == "__main__":
  main()
