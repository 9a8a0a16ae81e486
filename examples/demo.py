"""`make demo`: the main job, one pass over every feature on models built in code.

1. LoRA: fine-tune a Flax linen transformer through `lj.implicit` (adamw on the
   adapter only); the factored forward equals the merged one.
2. QLoRA: quantize the reference Llama's kernels to NF4 + double quant, train a
   LoRA adapter on top (`examples/qlora.py`).
3. PEFT format: save that adapter as a PEFT adapter directory, load it back onto
   the quantized base; greedy `llama.generate` with and without it, scored by the
   log-likelihood of the continuation under the task's true bigram table.
4. Merging: write base, the QLoRA fine-tune and a second fine-tune as Hugging Face
   checkpoints, merge them with the `lora-jax merge` command line (TIES, from a
   mergekit YAML) and check the result against `mg.ties` in memory.
5. Multi-LoRA serving: the trained adapter and a fresh one in one batch, rows
   routed by adapter id, each row equal to its own single-adapter forward.

Writes demo_out/loss.png (both loss curves) and demo_out/* checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import finetune_lora  # noqa: E402
import qlora  # noqa: E402

import lora_jax as lj  # noqa: E402
import merging as mg  # noqa: E402
import quantization as qz  # noqa: E402
from lora_jax.models import llama  # noqa: E402
from merging import cli  # noqa: E402

OUT = "demo_out"


def check(ok: bool, what: str) -> None:
  print(f"  [{'ok' if ok else 'FAILED'}] {what}")
  if not ok:
    raise SystemExit(f"demo: {what} failed")


def part_lora() -> dict:
  print("== 1. LoRA fine-tune (lj.init, lj.split, lj.implicit, optax.adamw on the adapter) ==")
  run = finetune_lora.main()
  ids = jax.random.randint(jax.random.key(1), (2, finetune_lora.SEQ), 0, finetune_lora.VOCAB)
  factored = jax.jit(lj.implicit(run["model"].apply))(run["params"], ids)
  merged = run["model"].apply(lj.merge(run["params"]), ids)
  err = float(jnp.max(jnp.abs(factored - merged)))
  check(err < 1e-3, f"factored vs merged forward: max |diff| = {err:.2e}")
  check(run["loss"][-1] < 0.5 * run["loss"][0],
        f"loss fell from {run['loss'][0]:.3f} to {run['loss'][-1]:.3f}")
  return run


def part_qlora() -> dict:
  print("\n== 2. QLoRA: NF4 + double quant base, LoRA adapter (examples/qlora.py) ==")
  with jax.numpy_dtype_promotion("standard"):
    run = qlora.main()
  check(run["loss"][-1] < run["loss"][0] - 0.5,
        f"QLoRA loss fell from {run['loss'][0]:.3f} to {run['loss'][-1]:.3f}")
  return run


def continuation_loglik(table, prompt, tokens) -> float:
  """Mean log-probability of each generated token given the previous one, under the
  task's bigram table: higher means the model follows the task's language."""
  seq = jnp.concatenate([prompt[:, -1:], tokens], axis=1)
  logp = jax.nn.log_softmax(table, axis=-1)
  return float(jnp.mean(logp[seq[:, :-1], seq[:, 1:]]))


def part_peft_io(q: dict) -> None:
  print("\n== 3. PEFT adapter format: lj.save_adapter / lj.load_adapter, llama.generate ==")
  path = os.path.join(OUT, "qlora_adapter")
  lj.save_adapter(path, q["params"])
  print(f"  wrote {path}/: {sorted(os.listdir(path))}")
  loaded = lj.load_adapter(path, q["qbase"])
  config = q["config"]
  ids = q["bigram_batch"](jax.random.PRNGKey(7), q["table"], 4, 16)
  fwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
  err = float(jnp.max(jnp.abs(fwd(loaded, config, ids) - fwd(q["params"], config, ids))))
  check(err < 1e-5, f"reloaded adapter gives the same logits (max |diff| {err:.1e})")
  prompt = ids[:, :4]
  tuned = llama.generate(loaded, config, prompt, 24)
  base = llama.generate(q["qbase"], config, prompt, 24)
  lt, lb = (continuation_loglik(q["table"], prompt, t) for t in (tuned, base))
  print(f"  greedy continuation, adapter: {np.asarray(tuned[0, :12]).tolist()} ...")
  check(lt > lb, f"log-likelihood under the task's bigrams: adapter {lt:.3f} > base {lb:.3f}")


def part_merge(q: dict) -> None:
  print("\n== 4. Merging: `lora-jax merge` (TIES, mergekit YAML) vs mg.ties in memory ==")
  config = q["config"]
  base = qz.dequantize(q["qbase"])
  ft1 = lj.merge(qz.dequantize(q["params"]))
  noise = jax.random.split(jax.random.key(3), len(jax.tree.leaves(base)))
  ft2 = jax.tree.unflatten(jax.tree.structure(base), [
      x + 0.01 * jax.random.normal(k, x.shape, x.dtype) if x.ndim == 2 else x
      for x, k in zip(jax.tree.leaves(base), noise)])
  root = os.path.join(OUT, "merge")
  shutil.rmtree(root, ignore_errors=True)
  for name, p in (("base", base), ("ft1", ft1), ("ft2", ft2)):
    llama.save_hf(os.path.join(root, name), config, p)
  yml = os.path.join(root, "ties.yml")
  with open(yml, "w") as f:
    f.write(f"""merge_method: ties
base_model: {root}/base
models:
  - model: {root}/ft1
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {root}/ft2
    parameters: {{weight: 0.3, density: 0.5}}
dtype: float32
""")
  rc = cli.main(["merge", yml, os.path.join(root, "out"), "--quiet"])
  check(rc == 0, "lora-jax merge ties.yml exited 0")
  _, merged = llama.load_hf(os.path.join(root, "out"))
  ref = mg.ties([ft1, ft2], base=base, weights=[0.7, 0.3], density=0.5)
  err = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(ref)))
  check(err < 1e-6, f"command line equals mg.ties in memory (max |diff| {err:.1e})")
  ids = q["bigram_batch"](jax.random.PRNGKey(8), q["table"], 16, 32)

  def loss(p):
    lp = jax.nn.log_softmax(llama.forward(p, config, ids[:, :-1]), axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)))

  lb, l1, lm = loss(base), loss(ft1), loss(merged)
  print(f"  task loss: base {lb:.3f}, QLoRA fine-tune {l1:.3f}, TIES merge {lm:.3f}")
  check(lm < lb, "the merge keeps part of the fine-tune's gain")


def part_serving(q: dict) -> None:
  print("\n== 5. Multi-LoRA serving: two adapters and the base in one batch ==")
  config = q["config"]
  trained = q["params"]
  fresh = lj.init(jax.random.PRNGKey(5), q["qbase"],
                  lj.LoraConfig(rank=4, alpha=8, targets=qlora.TARGETS, init="gaussian"))
  # give the fresh adapter a non-zero b so that it changes the function
  fresh = jax.tree.map(
      lambda x: (dataclasses.replace(x, b=0.05 * jnp.ones_like(x.b))
                 if isinstance(x, lj.LoraWeight) else x),
      fresh, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  served = lj.stack_adapters([trained, fresh])
  ids = q["bigram_batch"](jax.random.PRNGKey(9), q["table"], 3, 16)
  route = jnp.array([0, 1, -1])
  fwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
  y = fwd(lj.with_adapter_ids(served, route), config, ids)
  singles = [fwd(trained, config, ids[:1]), fwd(fresh, config, ids[1:2]),
             fwd(q["qbase"], config, ids[2:])]
  err = max(float(jnp.max(jnp.abs(y[i:i + 1] - s))) for i, s in enumerate(singles))
  check(err < 1e-4, f"rows [adapter 0, adapter 1, base] equal their own forwards "
        f"(max |diff| {err:.1e})")


def main():
  os.makedirs(OUT, exist_ok=True)
  run = part_lora()
  q = part_qlora()
  part_peft_io(q)
  part_merge(q)
  part_serving(q)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(run["steps"], run["loss"], label="LoRA (adapter only)")
  axes[0].axhline(float(np.log(4.0)), ls="--", c="gray", label="entropy of the task")
  axes[0].set_title("LoRA: Flax transformer")
  axes[1].plot(range(len(q["loss"])), q["loss"], c="C1", label="QLoRA (NF4 base)")
  axes[1].set_title("QLoRA: reference Llama, NF4 + double quant")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
  fig.tight_layout()
  path = os.path.join(OUT, "loss.png")
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
