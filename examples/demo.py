"""`make demo`: the main job. Fine-tunes a small transformer with LoRA through
`lj.implicit`, prints the parameter summary and the falling loss, checks that the
factored forward equals the merged one, and plots the loss curve to
demo_out/loss.png."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import finetune_lora  # noqa: E402

import lora_jax as lj  # noqa: E402

OUT = "demo_out"


def main():
  os.makedirs(OUT, exist_ok=True)
  print("== LoRA fine-tune (lj.init, lj.split, lj.implicit, optax.adamw on the adapter) ==")
  run = finetune_lora.main()
  ids = jax.random.randint(jax.random.key(1), (2, finetune_lora.SEQ), 0, finetune_lora.VOCAB)
  factored = jax.jit(lj.implicit(run["model"].apply))(run["params"], ids)
  merged = run["model"].apply(lj.merge(run["params"]), ids)
  err = float(jnp.max(jnp.abs(factored - merged)))
  print(f"factored vs merged forward: max |diff| = {err:.2e}")

  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(run["steps"], run["loss"], label="LoRA (adapter only)")
  ax.axhline(float(jnp.log(4.0)), ls="--", c="gray", label="entropy of the task")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy")
  ax.set_title("lora-jax: LoRA fine-tune of a Flax transformer")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(OUT, "loss.png")
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  print(f"wrote {path}")
  if not run["loss"][-1] < 0.5 * run["loss"][0]:
    raise SystemExit("demo: the loss did not fall by half")


if __name__ == "__main__":
  main()
