"""QLoRA under a device mesh: the base's layout carried to the adapter with `lj.shard`.

1. A small random Llama, its projections quantized to NF4 (double quant) and given
   LoRA, as in `examples/qlora.py`.
2. A `(data, model)` mesh over the available devices (on a CPU, run with
   `XLA_FLAGS=--xla_force_host_platform_device_count=8`, as `make test` does) and
   Megatron rules for the *dense* kernels: q/k/v/gate/up split on their outputs,
   o/down on their inputs, embeddings and `lm_head` on the hidden / vocab axis.
   `lj.shard` places every leaf: NF4 codes and scales, LoRA `a` / `b`, the
   optimizer state that `optax` builds from them.
3. A jitted adamw step on the adapter, batch split over `data`. Its first loss is
   checked against the same step on one device; the script prints the bytes each
   device holds against the whole model, and the loss.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_qlora.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama

VOCAB, SEQ, BATCH, STEPS = 128, 32, 16, 30
TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"
RULES = [   # layout of the dense weights; layers are stacked, so axis 0 is the layer
    (r"layers/self_attn/(q|k|v)_proj/kernel", P(None, None, "model")),
    (r"layers/self_attn/o_proj/kernel", P(None, "model", None)),
    (r"layers/mlp/(gate|up)_proj/kernel", P(None, None, "model")),
    (r"layers/mlp/down_proj/kernel", P(None, "model", None)),
    (r"embed_tokens/embedding", P(None, "model")),
    (r"lm_head/kernel", P(None, "model")),
]


def device_bytes(tree) -> tuple[int, int]:
  """(bytes on device 0, bytes of the whole tree)."""
  dev0 = jax.devices()[0]
  on0 = total = 0
  for x in jax.tree.leaves(tree):
    total += x.nbytes
    on0 += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)
  return on0, total


def mesh_shape(n: int) -> tuple[int, int]:
  """(data, model) for n devices: model parallelism up to 4 ways, the rest data."""
  model = max(m for m in (1, 2, 4) if n % m == 0)
  return n // model, model


def main(steps: int = STEPS, verbose: bool = True) -> dict:
  """Train; returns {"loss", "first_loss_1dev", "mesh", "bytes"}."""
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                             num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=SEQ)
  key = jax.random.key(0)
  base = llama.init_params(key, config, stacked=True)
  # block 32: the row-parallel kernels (o, down) split their blocks 4 ways
  qbase = qz.quantize(base, qz.QuantConfig("nf4", 32, double_quant=True, targets=TARGETS))
  params = lj.init(jax.random.key(1), qbase, lj.LoraConfig(
      rank=8, alpha=16, targets=TARGETS, layouts=llama.STACKED_LAYOUTS))
  table = 3.0 * jax.random.normal(jax.random.key(2), (VOCAB, VOCAB))   # bigram logits

  def batch_at(i):
    k0, k1 = jax.random.split(jax.random.fold_in(jax.random.key(3), i))
    first = jax.random.randint(k0, (BATCH,), 0, VOCAB)
    _, rest = jax.lax.scan(lambda t, k: (jax.random.categorical(k, table[t]),) * 2,
                           first, jax.random.split(k1, SEQ - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  def loss_fn(adapter, frozen, ids):
    logits = lj.implicit(llama.forward)(lj.combine(adapter, frozen), config, ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  opt = optax.adamw(3e-3)

  def step(adapter, frozen, state, ids):
    loss, g = jax.value_and_grad(loss_fn)(adapter, frozen, ids)
    upd, state = opt.update(g, state, adapter)
    return optax.apply_updates(adapter, upd), state, loss

  # the same first step on one device: the reference for the sharded one
  adapter, frozen = lj.split(params)
  _, _, first_1dev = jax.jit(step)(adapter, frozen, opt.init(adapter), batch_at(0))

  n = len(jax.devices())
  mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape(n)), ("data", "model"))
  sharded = lj.shard(params, mesh, RULES)
  adapter, frozen = lj.split(sharded)
  state = opt.init(adapter)            # adam's moments take the factors' layout
  ad_sh = jax.tree.map(lambda x: x.sharding, adapter)
  # scalars optax creates (the step count) are replicated over the mesh
  st_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
                       else NamedSharding(mesh, P()), state)
  state = jax.device_put(state, st_sh)
  batch_sh = NamedSharding(mesh, P("data", None))
  train = jax.jit(step, out_shardings=(ad_sh, st_sh, None), donate_argnums=(0, 2))
  losses = []
  for i in range(steps):
    adapter, state, loss = train(adapter, frozen, state, jax.device_put(batch_at(i), batch_sh))
    losses.append(float(loss))

  sizes = {"base (NF4 codes + scales, dense leaves)": device_bytes(frozen),
           "adapter": device_bytes(adapter), "optimizer state": device_bytes(state)}
  if verbose:
    print(f"mesh {dict(mesh.shape)} over {n} {jax.devices()[0].platform} devices")
    print(f"{'component':42s} {'device 0 KiB':>13s} {'whole KiB':>10s}")
    for name, (d0, tot) in sizes.items():
      print(f"{name:42s} {d0 / 1024:13.1f} {tot / 1024:10.1f}")
    print(f"first loss {losses[0]:.4f} (one device: {float(first_1dev):.4f}); "
          f"loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-3:]):.3f} over {steps} steps")
  return {"loss": losses, "first_loss_1dev": float(first_1dev), "mesh": dict(mesh.shape),
          "bytes": sizes}


if __name__ == "__main__":
  main()
