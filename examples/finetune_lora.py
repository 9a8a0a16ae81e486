"""Fine-tune a small Flax linen transformer with LoRA: adamw on the adapter only.

The base model is "pretrained" for a few steps on one synthetic language (a random
bigram chain), then LoRA adapts it to a second chain. Only the LoRA factors get
gradients and optimizer state; `lj.implicit` runs the unchanged `model.apply` on
the factored weights.

    python examples/finetune_lora.py
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

VOCAB, D, HEADS, LAYERS, SEQ = 64, 128, 4, 4, 64


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    hd = D // HEADS
    h = nn.RMSNorm(name="attn_norm")(x)
    q, k, v = (nn.DenseGeneral((HEADS, hd), use_bias=False, name=f"{n}_proj")(h)
               for n in "qkv")
    t = x.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd))
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o_proj")(o)
    h = nn.RMSNorm(name="mlp_norm")(x)
    return x + nn.Dense(D, name="down_proj")(jax.nn.silu(nn.Dense(4 * D, name="up_proj")(h))), None


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(VOCAB, D, name="embed_tokens")
    layers = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)
    x, _ = layers(name="layers")(embed(ids), None)
    return nn.Dense(VOCAB, name="lm_head")(nn.RMSNorm(name="norm")(x))


def bigram_batches(seed: int, batch: int):
  """Endless batches from a random sparse bigram chain (each token has 4 successors)."""
  rng = np.random.default_rng(seed)
  succ = rng.integers(0, VOCAB, (VOCAB, 4))
  while True:
    ids = np.empty((batch, SEQ), np.int32)
    ids[:, 0] = rng.integers(0, VOCAB, batch)
    for t in range(1, SEQ):
      ids[:, t] = succ[ids[:, t - 1], rng.integers(0, 4, batch)]
    yield jnp.asarray(ids)


def xent(logits, ids):
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))


def pretrain(model, params, steps: int, batches):
  opt = optax.adamw(3e-3)

  @jax.jit
  def step(p, o, ids):
    loss, g = jax.value_and_grad(lambda q: xent(model.apply(q, ids), ids))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  o = opt.init(params)
  for _ in range(steps):
    params, o, _ = step(params, o, next(batches))
  return params


def main(steps: int = 150, pretrain_steps: int = 60, batch: int = 16, rank: int = 8,
         log_every: int = 10, verbose: bool = True) -> dict:
  """Run the fine-tune; returns {"steps", "loss", "summary", "seconds"}."""
  model = Transformer()
  key = jax.random.key(0)
  base = model.init(key, jnp.zeros((1, SEQ), jnp.int32))
  base = pretrain(model, base, pretrain_steps, bigram_batches(0, batch))

  cfg = lj.LoraConfig(rank=rank, alpha=2 * rank,
                      targets=r".*layers/(q|k|v|o|up|down)_proj/kernel")
  # 3-D DenseGeneral kernels under nn.scan: read their axes from the function.
  params = lj.init(key, base, cfg, fn=model.apply, args=(jnp.zeros((1, SEQ), jnp.int32),))
  adapter, frozen = lj.split(params)
  summary = lj.summary(params)
  if verbose:
    print(summary)

  opt = optax.adamw(3e-3)
  forward = lj.implicit(model.apply)

  @jax.jit
  def step(adapter, opt_state, ids):
    loss, g = jax.value_and_grad(
        lambda ad: xent(forward(lj.combine(ad, frozen), ids), ids))(adapter)
    updates, opt_state = opt.update(g, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  opt_state = opt.init(adapter)
  batches = bigram_batches(1, batch)  # the new task
  history, t0 = [], time.perf_counter()
  for i in range(steps):
    adapter, opt_state, loss = step(adapter, opt_state, next(batches))
    history.append(float(loss))
    if verbose and (i % log_every == 0 or i == steps - 1):
      print(f"step {i:4d}  loss {history[-1]:.4f}")
  seconds = time.perf_counter() - t0
  if verbose:
    print(f"{steps} LoRA steps in {seconds:.1f}s; loss {history[0]:.3f} -> {history[-1]:.3f} "
          f"(uniform would be {np.log(VOCAB):.3f}, the chain's entropy {np.log(4):.3f})")
  return {"steps": list(range(steps)), "loss": history, "summary": summary,
          "seconds": seconds, "params": lj.combine(adapter, frozen), "model": model}


if __name__ == "__main__":
  main()
