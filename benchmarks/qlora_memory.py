"""Peak memory of one QLoRA training step, lora_jax vs Google's qwix, in one run, on CPU.

Step = forward + backward + `optax.adamw` update of the LoRA adapter only (jitted,
adapter and optimizer state donated), on a Llama-like decoder: hidden 512, 4 layers,
8 heads, intermediate 1376, vocab 8000, sequence 256, batch 8, float32 compute. The
seven linear kernels of every layer (q, k, v, o, gate, up, down) are NF4 with block 64
and carry a rank-16 LoRA (alpha 32); embeddings, norms and lm_head stay float32 and
frozen. All variants start from the same float32 base weights
(`llama.init_params(PRNGKey(0), config)`).

The model on both sides. qwix works on Flax modules, so the script defines a small
Flax linen Llama (`nn.Dense` projections, RMSNorm, rotary embeddings, causal
attention, SwiGLU, untied lm_head) whose parameter tree is the reference Llama's
with `layers/{i}` spelled `layers_{i}`; it checks that its logits equal
`llama.forward`'s on the same weights. Variants:

  ours (Flax)   the linen model's `apply` through `lj.implicit`: kernels
                `qz.quantize(..., QuantConfig(format="nf4", block_size=64,
                double_quant=True))`, LoRA by `lj.init(..., LoraConfig(rank=16,
                alpha=32))`, `lj.split` / `lj.combine`. Same model as qwix: the
                headline ratio is this one over qwix.
  ours (llama)  the same, on the reference `lj.implicit(llama.forward)`
                (the library's own model; a cross-check).
  qwix          `qwix.apply_lora_to_model(linen_model, qwix.LoraProvider(
                module_path=<the 7 projections>, rank=16, alpha=32,
                weight_qtype="nf4", tile_size=64))` -- qwix's QLoRA: NF4 codes
                (uint4) with one float32 scale per 64 inputs per output, no double
                quantization (qwix has none), LoRA A/B as Flax params
                `kernel_lora_a` / `kernel_lora_b`. The base is quantized from the
                same float weights with `qwix.quantize_params`; the adapter is the
                `*_lora_a/_lora_b` leaves, the rest is frozen. qwix tiles only by
                an exact divisor and 1376 = 21.5 x 64, so qwix's down_proj
                (in = 1376) gets tile 32 (a second `LoraRule`); ours pads its last
                block. `--intermediate 1408` gives every kernel block 64 on both sides.

Measured: XLA's compiled memory analysis of the jitted step
(`jax.jit(step, donate_argnums=0).lower(...).compile().memory_analysis()`:
argument + output + temp bytes minus aliased bytes), and the bytes of the persistent
state (quantized base + dense leaves + adapter + adamw state; 4-bit dtypes count half
a byte, as XLA stores them on CPU). Secondary: median step time (steps of the variants
interleaved, so machine load falls on all alike), and the loss of the first step (B = 0
at init, so all variants compute the quantized base model's loss) and of the last one
(the adapter is being trained).

    .venv/bin/python benchmarks/qlora_memory.py
    (options: --reps 5 --batch 8 --seq 256 --intermediate 1376)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama

RANK, ALPHA, BLOCK = 16, 32, 64
PROJ = r"(self_attn|mlp)/\w+_proj"


# ----------------------------------------------------------------------------
# A Flax linen Llama with the reference model's numerics and parameter names

class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return llama.rms_norm(x, scale, self.eps)


class Attention(nn.Module):
  config: llama.LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    c = self.config
    B, T, _ = x.shape
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = nn.Dense(nh * hd, use_bias=False, name="q_proj")(x).reshape(B, T, nkv, nh // nkv, hd)
    k = nn.Dense(nkv * hd, use_bias=False, name="k_proj")(x).reshape(B, T, nkv, hd)
    v = nn.Dense(nkv * hd, use_bias=False, name="v_proj")(x).reshape(B, T, nkv, hd)
    q = q * cos[:, :, None, None] + _rotate_half(q) * sin[:, :, None, None]
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(hd ** -0.5, q.dtype)
    s = jnp.where(mask, s.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, nh * hd)
    return nn.Dense(c.hidden_size, use_bias=False, name="o_proj")(o)


class MLP(nn.Module):
  config: llama.LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = nn.Dense(c.intermediate_size, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(c.intermediate_size, use_bias=False, name="up_proj")(x)
    return nn.Dense(c.hidden_size, use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)


class Layer(nn.Module):
  config: llama.LlamaConfig

  @nn.compact
  def __call__(self, h, cos, sin, mask):
    eps = self.config.rms_norm_eps
    h = h + Attention(self.config, name="self_attn")(
        RMSNorm(eps, name="input_layernorm")(h), cos, sin, mask)
    return h + MLP(self.config, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(h))


class Embed(nn.Module):
  vocab: int
  hidden: int

  @nn.compact
  def __call__(self, ids):
    emb = self.param("embedding", nn.initializers.normal(0.02), (self.vocab, self.hidden))
    return jnp.take(emb, ids, axis=0)


class LinenLlama(nn.Module):
  config: llama.LlamaConfig

  @nn.compact
  def __call__(self, ids):
    c = self.config
    h = Embed(c.vocab_size, c.hidden_size, name="embed_tokens")(ids)
    T = ids.shape[1]
    freqs = jnp.arange(T, dtype=jnp.float32)[:, None] * jnp.asarray(llama.rope_inv_freq(c))
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None]               # (1, T, hd)
    cos, sin = jnp.cos(emb).astype(h.dtype), jnp.sin(emb).astype(h.dtype)
    mask = jnp.tril(jnp.ones((T, T), bool))
    for i in range(c.num_hidden_layers):
      h = Layer(c, name=f"layers_{i}")(h, cos, sin, mask)
    h = RMSNorm(c.rms_norm_eps, name="norm")(h)
    return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(h)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def to_linen(params: dict) -> dict:
  """Reference Llama params (`layers` a list) -> the linen model's tree (`layers_{i}`)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layers_{i}": lp for i, lp in enumerate(params["layers"])})
  return out


# ----------------------------------------------------------------------------
# measurement

def nbytes(tree: Any) -> int:
  """Bytes of the array leaves; 4-bit dtypes count half a byte (XLA packs them on CPU)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "dtype"):
      continue
    name = np.dtype(x.dtype).name
    bits = 4 if name in ("int4", "uint4", "float4_e2m1fn") else 8 * np.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape)) * bits // 8
  return total


def qwix_tile(n: int) -> int:
  """The largest power-of-two tile <= BLOCK dividing n (qwix needs exact tiling)."""
  t = BLOCK
  while n % t:
    t //= 2
  return t


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(fwd, combine, opt):
  def step(state, frozen, ids):
    adapter, opt_state = state

    def loss_fn(a):
      return xent(fwd(combine(a, frozen), ids[:, :-1]), ids[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return (optax.apply_updates(adapter, updates), opt_state), loss
  return step


class Runner:
  """A compiled step with its donated state, memory figures and step times."""

  def __init__(self, step, adapter, frozen, opt, ids, base_bytes):
    state = (adapter, opt.init(adapter))
    self.state_bytes = {"base": base_bytes, "dense": nbytes(frozen) - base_bytes,
                        "adapter": nbytes(adapter), "opt": nbytes(state[1])}
    self.state_bytes["total"] = nbytes(frozen) + nbytes(state)
    t0 = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, ids).compile()
    self.compile_s = time.perf_counter() - t0
    m = self.compiled.memory_analysis()
    self.mem = {"arg": m.argument_size_in_bytes, "out": m.output_size_in_bytes,
                "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
    self.peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes
    self.state, self.frozen, self.ids, self.times = state, frozen, ids, []
    self.first_loss = float(self.run(record=False))
    self.run(record=False)  # warm-up

  def run(self, record=True):
    t0 = time.perf_counter()
    self.state, loss = self.compiled(self.state, self.frozen, self.ids)
    jax.block_until_ready((self.state, loss))
    self.last_loss = float(loss)
    if record:
      self.times.append(time.perf_counter() - t0)
    return loss

  @property
  def median(self):
    return statistics.median(self.times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--intermediate", type=int, default=1376,
                  help="MLP width; 1376 is not a multiple of 64 (see the qwix tile note)")
  args = ap.parse_args()
  import qwix

  config = llama.LlamaConfig(vocab_size=8000, hidden_size=512,
                             intermediate_size=args.intermediate,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=max(args.seq, 256))
  print(f"QLoRA step: Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, intermediate {config.intermediate_size}, vocab "
        f"{config.vocab_size}, batch {args.batch} x seq {args.seq}; NF4 block {BLOCK}, LoRA rank "
        f"{RANK} alpha {ALPHA} on q,k,v,o,gate,up,down; float32; adamw")
  print(f"jax {jax.__version__}, qwix {qwix.__version__}, CPU ({jax.devices()[0].device_kind}, "
        f"{jax.device_count()} device)")
  base = llama.init_params(jax.random.PRNGKey(0), config)
  ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1), 0, config.vocab_size)
  x_ids = ids[:, :-1]
  model = LinenLlama(config)
  lbase = to_linen(base)
  diff = jnp.max(jnp.abs(jax.jit(model.apply)({"params": lbase}, x_ids[:2])
                         - jax.jit(llama.forward, static_argnums=1)(base, config, x_ids[:2])))
  print(f"linen model vs llama.forward, float32 weights: max |logits diff| = {float(diff):.1e}")
  opt = optax.adamw(1e-4)
  is_q = lambda x: isinstance(x, qz.QuantizedArray)  # noqa: E731
  runners = {}

  # ours: quantize, add LoRA, split; the same for the linen tree and the reference tree
  def ours(tree, fwd, targets, quantize=True):
    q = qz.quantize(tree, qz.QuantConfig(format="nf4", block_size=BLOCK, double_quant=True,
                                         targets=targets)) if quantize else tree
    params = lj.init(jax.random.PRNGKey(2), q, lj.LoraConfig(rank=RANK, alpha=ALPHA,
                                                             targets=targets))
    adapter, frozen = lj.split(params)
    if quantize:
      qbytes = sum(x.nbytes() for x in jax.tree.leaves(frozen, is_leaf=is_q) if is_q(x))
    else:
      qbytes = sum(nbytes(x.w) for x in jax.tree.leaves(
          params, is_leaf=lambda x: isinstance(x, lj.LoraWeight)) if isinstance(x, lj.LoraWeight))
    return Runner(make_step(lj.implicit(fwd), lj.combine, opt), adapter, frozen, opt, ids, qbytes)

  runners["ours (Flax)"] = ours(lbase, lambda p, i: model.apply({"params": p}, i),
                                rf"layers_\d+/{PROJ}/kernel")
  runners["ours (llama)"] = ours(base, lambda p, i: llama.forward(p, config, i),
                                 rf"layers/\d+/{PROJ}/kernel")
  # the floor: plain LoRA on the float32 base, same model (no quantization at all)
  runners["LoRA, float32 base"] = ours(lbase, lambda p, i: model.apply({"params": p}, i),
                                       rf"layers_\d+/{PROJ}/kernel", quantize=False)

  # qwix: QLoRA provider on the same linen model, base quantized from the same weights
  # qwix tiles a contracting axis only by an exact divisor (ours pads the last block):
  # a kernel whose `in` is not a multiple of 64 gets the largest power-of-two tile that is.
  rules = []
  down_tile = qwix_tile(config.intermediate_size)
  if down_tile != BLOCK:
    rules.append(qwix.LoraRule(module_path=r"layers_\d+/mlp/down_proj", rank=RANK, alpha=ALPHA,
                               weight_qtype="nf4", tile_size=down_tile))
    print(f"qwix: down_proj in = {config.intermediate_size} is not a multiple of {BLOCK}; qwix "
          f"cannot tile it by {BLOCK} (ours pads), so its down_proj uses tile {down_tile}")
  rules.append(qwix.LoraRule(module_path=rf"layers_\d+/{PROJ}", rank=RANK, alpha=ALPHA,
                             weight_qtype="nf4", tile_size=BLOCK))
  provider = qwix.LoraProvider(rules)
  qmodel = qwix.apply_lora_to_model(model, provider)
  qinit = jax.jit(qmodel.init)(jax.random.PRNGKey(2), x_ids[:1])["params"]
  flat = traverse_util.flatten_dict(qinit)
  flat.update(traverse_util.flatten_dict(qwix.quantize_params(lbase, qinit)))
  is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
  q_adapter = traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_lora(k)})
  q_frozen = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_lora(k)})
  n_q = sum(1 for k in flat if k[-1] == "kernel" and type(flat[k]).__name__ == "WithAux")
  assert n_q == 7 * config.num_hidden_layers, n_q
  q_base_bytes = sum(nbytes(v) for k, v in flat.items() if type(v).__name__ == "WithAux")

  def q_combine(a, f):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(f),
                                         **traverse_util.flatten_dict(a)})

  runners["qwix"] = Runner(make_step(lambda p, i: qmodel.apply({"params": p}, i), q_combine, opt),
                           q_adapter, q_frozen, opt, ids, q_base_bytes)
  for k in ("ours (Flax)", "qwix"):
    assert nbytes(runners[k].state[0]) == nbytes(runners["ours (llama)"].state[0]), k

  for _ in range(args.reps):
    for r in runners.values():
      r.run()

  MB = 2 ** 20
  print(f"\npersistent state (MiB){'':<6}{'NF4 base':>10}{'dense':>9}{'adapter':>9}"
        f"{'adamw':>9}{'total':>9}")
  for name, r in runners.items():
    b = r.state_bytes
    print(f"  {name:<26}{b['base'] / MB:>10.3f}{b['dense'] / MB:>9.3f}{b['adapter'] / MB:>9.3f}"
          f"{b['opt'] / MB:>9.3f}{b['total'] / MB:>9.3f}")
  print(f"\njitted step, XLA memory analysis (MiB){'':<2}{'args':>8}{'out':>8}{'temp':>9}"
        f"{'alias':>8}{'peak':>9}{'step s':>9}{'loss@0':>9}{'@last':>9}")
  for name, r in runners.items():
    m = r.mem
    print(f"  {name:<38}{m['arg'] / MB:>8.2f}{m['out'] / MB:>8.2f}{m['temp'] / MB:>9.2f}"
          f"{m['alias'] / MB:>8.2f}{r.peak / MB:>9.2f}{r.median:>9.3f}{r.first_loss:>9.4f}"
          f"{r.last_loss:>9.4f}")
  print("  (peak = args + out + temp - alias; step s = median of "
        f"{args.reps}; loss@0 / @last = loss of the first / last of {args.reps + 2} steps on "
        "the same batch)")

  ours_f, ours_l, qw = runners["ours (Flax)"], runners["ours (llama)"], runners["qwix"]
  print("\nratios ours/qwix")
  print(f"  step peak memory, same Flax model   {ours_f.peak / qw.peak:.3f}   target <= 0.8")
  print(f"  step peak memory, ours on llama     {ours_l.peak / qw.peak:.3f}")
  print(f"  persistent state                    "
        f"{ours_f.state_bytes['total'] / qw.state_bytes['total']:.3f}")
  print(f"  quantized base                      "
        f"{ours_f.state_bytes['base'] / qw.state_bytes['base']:.3f}   (ours NF4 + double quant, "
        "qwix NF4 + float32 scales)")
  fl = runners["LoRA, float32 base"]
  # Any QLoRA step on this model holds what the float-base LoRA step holds, minus the
  # bytes quantization removes from the base; qwix's NF4 base is the smaller one it
  # could reach (its own), so this is the least peak either library could report.
  floor = fl.peak - (fl.state_bytes["base"] - min(ours_f.state_bytes["base"],
                                                   qw.state_bytes["base"]))
  print(f"  floor / qwix                        {floor / qw.peak:.3f}   (floor = the float32-base "
        f"LoRA step's peak {fl.peak / MB:.1f} MiB minus the bytes NF4 saves on the base: "
        f"{floor / MB:.1f} MiB; activations, not weights, fill the step"
        + ("; the 0.8 target lies below it)" if floor / qw.peak > 0.8 else ")"))
  print(f"  median step time (Flax / llama)     {ours_f.median / qw.median:.3f} / "
        f"{ours_l.median / qw.median:.3f}")
  print("\ncommand: .venv/bin/python benchmarks/qlora_memory.py"
        + (f" --batch {args.batch}" if args.batch != 8 else "")
        + (f" --seq {args.seq}" if args.seq != 256 else "")
        + (f" --reps {args.reps}" if args.reps != 5 else "")
        + (f" --intermediate {args.intermediate}" if args.intermediate != 1376 else ""))
  print("measured on a shared, loaded 2-core machine (times only; memory is XLA's static "
        "analysis)")


if __name__ == "__main__":
  main()
