"""QLoRA on the reference Llama model: NF4 + double-quantized base, LoRA adapter, optax.

1. Build a small random Llama (the "pretrained" base; nothing is downloaded).
2. Quantize its linear kernels to NF4 with double quantization, block 64 (QLoRA's
   recipe; the bytes are those bitsandbytes would write for the same weights).
3. Add LoRA to the same kernels and train only the adapter with adamw on a synthetic
   language (a random bigram chain). `lj.implicit(llama.forward)` runs the unchanged
   model: every quantized matmul is `qz.matmul(x, Wq) + s * (x @ A) @ B`, so the
   dense base weight is never stored, and the codes get no gradient and no optimizer
   state.
4. Print memory per component (quantized base, dense leaves, adapter, optimizer
   state, against the float32 base it replaces) and the loss.

    python examples/qlora.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama

VOCAB, SEQ, BATCH, STEPS = 128, 32, 16, 60
TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"


def bigram_batch(key, table, batch, seq):
  """Token sequences from a fixed random bigram chain (a tiny synthetic language)."""
  k0, k1 = jax.random.split(key)
  first = jax.random.randint(k0, (batch,), 0, VOCAB)
  keys = jax.random.split(k1, seq - 1)

  def step(tok, k):
    nxt = jax.random.categorical(k, table[tok])
    return nxt, nxt

  _, rest = jax.lax.scan(step, first, keys)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def main(steps: int = STEPS) -> dict:
  """Run the QLoRA fine-tune; returns {"loss", "config", "qbase", "params", "table"}."""
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                             num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=SEQ)
  key = jax.random.PRNGKey(0)
  base = llama.init_params(key, config)

  # 2. quantize: NF4, double quant, block 64, only the linear kernels of the layers
  qbase = qz.quantize(base, qz.QuantConfig(format="nf4", block_size=64, double_quant=True,
                                           targets=TARGETS))
  print(qz.summary(qbase).splitlines()[-1])

  # 3. LoRA on the quantized kernels
  params = lj.init(jax.random.PRNGKey(1), qbase,
                   lj.LoraConfig(rank=8, alpha=16, targets=TARGETS))
  adapter, frozen = lj.split(params)
  opt = optax.adamw(3e-3)
  opt_state = opt.init(adapter)

  kernels = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qz.QuantizedArray))
             if isinstance(x, qz.QuantizedArray)]
  q_bytes = sum(q.nbytes() for q in kernels)
  q_dense = sum(int(np.prod(q.shape)) * 4 for q in kernels)
  other = nbytes(jax.tree.map(lambda x: None if isinstance(x, qz.QuantizedArray) else x, frozen,
                              is_leaf=lambda x: isinstance(x, qz.QuantizedArray)))
  print("\nmemory per component")
  print(f"  quantized kernels (codes + scales): {q_bytes / 1e6:8.3f} MB "
        f"(float32 would be {q_dense / 1e6:.3f} MB, {q_dense / q_bytes:.1f}x more)")
  print(f"  dense leaves (embeddings, norms, lm_head): {other / 1e6:8.3f} MB")
  print(f"  adapter (LoRA A, B):                {nbytes(adapter) / 1e6:8.3f} MB")
  print(f"  optimizer state (adamw):            {nbytes(opt_state) / 1e6:8.3f} MB "
        f"({len([x for x in jax.tree.leaves(opt_state) if x.ndim])} arrays, none for the codes)")

  table = jax.random.normal(jax.random.PRNGKey(2), (VOCAB, VOCAB)) * 3.0
  fwd = lj.implicit(llama.forward)

  def loss_fn(adapter, ids):
    logits = fwd(lj.combine(adapter, frozen), config, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def train_step(adapter, opt_state, key):
    ids = bigram_batch(key, table, BATCH, SEQ)
    loss, grads = jax.value_and_grad(loss_fn)(adapter, ids)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  print("\ntraining the adapter")
  t0 = time.perf_counter()
  history = []
  for step in range(steps):
    adapter, opt_state, loss = train_step(adapter, opt_state, jax.random.PRNGKey(100 + step))
    history.append(float(loss))
    if step % 10 == 0 or step == steps - 1:
      print(f"  step {step:3d}  loss {history[-1]:.4f}")
  print(f"  {steps} steps in {time.perf_counter() - t0:.1f} s (first step compiles)")

  # The codes are untouched; the trained adapter can be merged onto the dequantized base.
  trained = lj.combine(adapter, frozen)
  same = all(np.array_equal(a, b) for a, b in zip(
      [x for x in jax.tree.leaves(trained) if x.dtype == jnp.uint8],
      [x for x in jax.tree.leaves(params) if x.dtype == jnp.uint8]))
  print(f"\nquantized codes unchanged by training: {same}")
  ids = bigram_batch(jax.random.PRNGKey(999), table, 4, SEQ)
  merged = lj.merge(qz.dequantize(trained))
  diff = jnp.max(jnp.abs(fwd(trained, config, ids) - llama.forward(merged, config, ids)))
  print(f"implicit QLoRA forward vs merged dense forward: max |diff| = {float(diff):.2e}")
  return {"loss": history, "config": config, "qbase": qbase, "params": trained,
          "table": table, "bigram_batch": bigram_batch}


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
