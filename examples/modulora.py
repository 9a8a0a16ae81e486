"""ModuLoRA: LoRA over a 3-bit and a 2-bit GPTQ base, on the reference Llama model.

1. Build a small random Llama (the "pretrained" base; nothing is downloaded) and a
   synthetic language (a random bigram chain).
2. Quantize its linear kernels with GPTQ (`qz.gptq`), calibrated on a few batches of
   that language through the model's own forward: 3-bit groups of 64 with zero
   points, and 2-bit groups of 32. Print bits per parameter and how far each
   quantized model's logits are from the float model's, against round-to-nearest.
3. Put LoRA on the quantized kernels and train only the adapter with adamw. The
   forward and backward dequantize the packed integer codes tile by tile (the same
   `implicit` rule as QLoRA's): no dense copy of a kernel is kept, and the codes get
   no gradient and no optimizer state.

    python examples/modulora.py
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
from qlora import bigram_batch  # the same synthetic language as examples/qlora.py

VOCAB, SEQ, BATCH, STEPS = 128, 32, 16, 40   # VOCAB: qlora.bigram_batch's
TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"
FORMATS = {3: qz.QuantConfig("int3", 64, symmetric=False, targets=TARGETS),
           2: qz.QuantConfig("int2", 32, symmetric=False, targets=TARGETS)}


def finetune(qbase, config, table, steps: int) -> list[float]:
  params = lj.init(jax.random.PRNGKey(1), qbase, lj.LoraConfig(rank=8, alpha=16,
                                                               targets=TARGETS))
  adapter, frozen = lj.split(params)
  opt = optax.adamw(3e-3)
  opt_state = opt.init(adapter)
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

  history = []
  for step in range(steps):
    adapter, opt_state, loss = train_step(adapter, opt_state, jax.random.PRNGKey(100 + step))
    history.append(float(loss))
    if step % 10 == 0 or step == steps - 1:
      print(f"  step {step:3d}  loss {history[-1]:.4f}")
  return history


def main(steps: int = STEPS, bits=(3, 2)) -> dict:
  """Quantize with GPTQ at each bit width and fine-tune; returns
  {bits: {"loss": [...], "gptq_mse", "rtn_mse", "bits_per_param"}}."""
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=SEQ)
  base = llama.init_params(jax.random.PRNGKey(0), config)
  table = jax.random.normal(jax.random.PRNGKey(2), (VOCAB, VOCAB)) * 3.0
  calib = [bigram_batch(jax.random.PRNGKey(50 + i), table, 8, SEQ) for i in range(4)]
  held_out = bigram_batch(jax.random.PRNGKey(999), table, 8, SEQ)
  ref = llama.forward(base, config, held_out)
  fwd = lj.implicit(llama.forward)
  out = {}
  for b in bits:
    cfg = FORMATS[b]
    t0 = time.perf_counter()
    qbase = qz.gptq(base, lambda p, ids: llama.forward(p, config, ids), calib, cfg)
    took = time.perf_counter() - t0
    rtn = qz.quantize(base, cfg)
    mse = lambda q: float(jnp.mean((fwd(q, config, held_out) - ref) ** 2))  # noqa: E731
    g_mse, r_mse = mse(qbase), mse(rtn)
    bpp = qz.summary(qbase).splitlines()[-1]
    print(f"\n{b}-bit base ({cfg.format}, groups of {cfg.block_size}, zero points): GPTQ in "
          f"{took:.1f} s\n  {bpp}\n  logit MSE vs float: GPTQ {g_mse:.4f}, "
          f"round-to-nearest {r_mse:.4f}")
    print(f"training the adapter over the {b}-bit base")
    history = finetune(qbase, config, table, steps)
    out[b] = {"loss": history, "gptq_mse": g_mse, "rtn_mse": r_mse,
              "bits_per_param": bpp}
  return out


if __name__ == "__main__":
  main()
