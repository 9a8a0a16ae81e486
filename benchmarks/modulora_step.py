"""One LoRA training step over quantized bases: NF4 QLoRA vs group-wise ModuLoRA, on CPU.

Step = forward + backward + `optax.adamw` update of the LoRA adapter only (jitted,
adapter and optimizer state donated), through `lj.implicit(llama.forward)` (the
reference Llama): hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000,
batch 4 x sequence 256, float32 compute (`benchmarks/qlora_memory.py`'s model). The
seven projection kernels of every layer (q, k, v, o, gate, up, down) are

  (a) NF4 QLoRA        `qz.QuantConfig("nf4", 64)` (double quantization: bitsandbytes'
                       `bnb_4bit_use_double_quant`), a `QuantizedArray`;
  (b) int4 g128        `qz.QuantConfig("int4", 128, symmetric=False)`: ModuLoRA over a
                       `GroupQuantizedArray` (GPTQ's storage: a dense bit stream, a
                       float32 scale and an int8 zero point per 128 inputs);
  (c) int3 g128        `qz.QuantConfig("int3", 128, symmetric=False)` (codes straddle
                       int32 words);
  (d) int2 g64         `qz.QuantConfig("int2", 64, symmetric=False)`;
  (e) float32          the dense base, plain LoRA;

each with rank-16 LoRA (alpha 32) from `lj.init`; all start from the same float32
weights (`llama.init_params(PRNGKey(0), config)`), embeddings, norms and lm_head stay
float32 and frozen. 1376 is not a multiple of 128 (or 64): down_proj's last group is
partial (ours pads it; `--intermediate 1408` makes every group whole).

Measured: the median step time over `--reps` rounds, the variants' steps interleaved
within each round (so machine load falls on all alike), and the median over rounds of
each variant's time over (a)'s in the same round; XLA's compiled memory analysis of the
jitted step (argument + output + temp - alias bytes); the bytes of the persistent state
(quantized base + dense leaves + adapter + adamw state). Ratios are against (a).

Where the time goes (printed below the table): a quantized step dequantizes each kernel
twice (the forward `x @ W`, and `dy @ W^T` for the activation gradient; the codes get no
gradient) and otherwise does what the float32 step (e) does. So, per variant: the time
of one jitted pass that dequantizes all 28 kernels (`dequantize_t`, the storage-layout
values `qz.matmul` computes before its dot), and of the integer unpacking alone for the
group-wise ones (`quantization._group.unpack_codes`), each interleaved like the steps;
twice the dequantization pass is the step's dequantization work, and step - (e) is what
the quantized base costs in the step.

    .venv/bin/python benchmarks/modulora_step.py
    (options: --reps 7 --batch 4 --seq 256 --intermediate 1376 --only a,b,...)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import numpy as np
import optax

import lora_jax as lj
import quantization as qz
from lora_jax.models import llama
from quantization import _group as G

RANK, ALPHA = 16, 32
TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"
VARIANTS = {
    "a": ("(a) NF4 QLoRA, block 64", qz.QuantConfig("nf4", 64, targets=TARGETS)),
    "b": ("(b) int4 g128 asym", qz.QuantConfig("int4", 128, symmetric=False, targets=TARGETS)),
    "c": ("(c) int3 g128 asym", qz.QuantConfig("int3", 128, symmetric=False, targets=TARGETS)),
    "d": ("(d) int2 g64 asym", qz.QuantConfig("int2", 64, symmetric=False, targets=TARGETS)),
    "e": ("(e) float32 base", None),
}
QKINDS = (qz.QuantizedArray, qz.GroupQuantizedArray)


def is_q(x) -> bool:
  return isinstance(x, QKINDS)


def nbytes(tree: Any) -> int:
  """Bytes of the array leaves (a quantized leaf: its packed codes, scales, zeros)."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=is_q):
    if is_q(x):
      total += x.nbytes()
    elif hasattr(x, "dtype"):
      total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(fwd, opt):
  def step(state, frozen, ids):
    adapter, opt_state = state

    def loss_fn(a):
      return xent(fwd(lj.combine(a, frozen), ids[:, :-1]), ids[:, 1:])

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
    self.peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
    self.state, self.frozen, self.ids, self.times = state, frozen, ids, []
    self.first_loss = float(self.run(record=False))
    self.run(record=False)  # warm-up

  def run(self, record=True):
    t0 = time.perf_counter()
    self.state, loss = self.compiled(self.state, self.frozen, self.ids)
    jax.block_until_ready((self.state, loss))
    dt = time.perf_counter() - t0
    self.last_loss = float(loss)
    if record:
      self.times.append(dt)
    return loss

  @property
  def median(self):
    return statistics.median(self.times)


def timed_fn(fn, *args, reps_inner=3):
  """A zero-argument callable: the mean time of `reps_inner` calls of the compiled
  `fn(*args)`, each blocked on."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))

  def go():
    t0 = time.perf_counter()
    for _ in range(reps_inner):
      jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - t0) / reps_inner
  return go


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--intermediate", type=int, default=1376)
  ap.add_argument("--only", default="a,b,c,d,e", help="variants to run, e.g. a,b,e")
  args = ap.parse_args()
  keys = args.only.split(",")
  if "a" not in keys:
    raise SystemExit("--only must include a (the ratios are against NF4 QLoRA)")

  config = llama.LlamaConfig(vocab_size=8000, hidden_size=512,
                             intermediate_size=args.intermediate, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=max(args.seq, 256))
  print(f"LoRA step over quantized bases: Llama hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, intermediate "
        f"{config.intermediate_size}, vocab {config.vocab_size}, batch {args.batch} x seq "
        f"{args.seq}; LoRA rank {RANK} alpha {ALPHA} on q,k,v,o,gate,up,down; float32; adamw")
  print(f"jax {jax.__version__}, CPU ({jax.devices()[0].device_kind}, {jax.device_count()} "
        f"device)")
  base = llama.init_params(jax.random.PRNGKey(0), config)
  ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1), 0,
                           config.vocab_size)
  opt = optax.adamw(1e-4)
  fwd = lj.implicit(lambda p, i: llama.forward(p, config, i))
  lcfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
  runners, qtrees = {}, {}
  for k in keys:
    name, qcfg = VARIANTS[k]
    q = base if qcfg is None else qz.quantize(base, qcfg)
    params = lj.init(jax.random.PRNGKey(2), q, lcfg)
    adapter, frozen = lj.split(params)
    if qcfg is None:
      kernels = [x.w for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
          x, lj.LoraWeight)) if isinstance(x, lj.LoraWeight)]
    else:
      kernels = [x for x in jax.tree.leaves(q, is_leaf=is_q) if is_q(x)]
      qtrees[k] = kernels
    assert len(kernels) == 7 * config.num_hidden_layers, (k, len(kernels))
    runners[k] = Runner(make_step(fwd, opt), adapter, frozen, opt, ids, nbytes(kernels))
    print(f"  compiled {name}: {runners[k].compile_s:.1f} s", flush=True)

  # interleaved rounds: every variant's step once per round
  per_round = {k: [] for k in keys}
  for _ in range(args.reps):
    for k in keys:
      runners[k].run()
      per_round[k].append(runners[k].times[-1])
  rel = {k: statistics.median(t / a for t, a in zip(per_round[k], per_round["a"])) for k in keys}

  MB = 2 ** 20
  a = runners["a"]
  print(f"\npersistent state (MiB){'':<12}{'base':>9}{'dense':>9}{'adapter':>9}{'adamw':>9}"
        f"{'total':>9}{'vs (a)':>8}{'base bits/param':>17}")
  n_base = sum(int(np.prod(x.shape)) for x in qtrees.get("a", []))
  for k in keys:
    b = runners[k].state_bytes
    print(f"  {VARIANTS[k][0]:<32}{b['base'] / MB:>9.3f}{b['dense'] / MB:>9.3f}"
          f"{b['adapter'] / MB:>9.3f}{b['opt'] / MB:>9.3f}{b['total'] / MB:>9.3f}"
          f"{b['total'] / a.state_bytes['total']:>8.3f}{8 * b['base'] / n_base:>17.3f}")
  print(f"\njitted step (MiB){'':<17}{'args':>8}{'out':>8}{'temp':>9}{'alias':>8}{'peak':>9}"
        f"{'vs (a)':>8}{'step s':>9}{'vs (a)':>8}{'loss@0':>9}{'@last':>9}")
  for k in keys:
    r = runners[k]
    m = r.mem
    print(f"  {VARIANTS[k][0]:<32}{m['arg'] / MB:>8.2f}{m['out'] / MB:>8.2f}"
          f"{m['temp'] / MB:>9.2f}{m['alias'] / MB:>8.2f}{r.peak / MB:>9.2f}"
          f"{r.peak / a.peak:>8.3f}{r.median:>9.3f}{rel[k]:>8.3f}{r.first_loss:>9.4f}"
          f"{r.last_loss:>9.4f}")
  print(f"  (peak = args + out + temp - alias; step s = median of {args.reps} interleaved "
        f"rounds; its 'vs (a)' = median over rounds of the time over (a)'s in the same round; "
        f"loss@0 / @last: first / last of {args.reps + 2} steps on the same batch)")

  # where the time goes: dequantizing all kernels, and the unpacking alone
  parts = {}
  for k, kernels in qtrees.items():
    parts[(k, "deq")] = timed_fn(lambda ks: [x.dequantize_t() for x in ks], kernels)
    if isinstance(kernels[0], qz.GroupQuantizedArray):
      parts[(k, "unpack")] = timed_fn(
          lambda ks: [G.unpack_codes(x.packed, x.bits, x.kernel_shape[0]) for x in ks], kernels)
  times = {p: [] for p in parts}
  for _ in range(args.reps):
    for p, go in parts.items():
      times[p].append(go())
  e = runners.get("e")
  print(f"\nwhere the time goes (ms; medians of {args.reps} interleaved rounds, each pass "
        "timed as the mean of 3 calls)")
  print(f"  {'variant':<32}{'step':>9}{'step-(e)':>10}{'2 x deq':>10}{'2 x unpack':>12}")
  for k in qtrees:
    deq = statistics.median(times[(k, "deq")]) * 1e3
    unp = statistics.median(times[(k, "unpack")]) * 1e3 if (k, "unpack") in times else None
    over = (runners[k].median - e.median) * 1e3 if e else float("nan")
    print(f"  {VARIANTS[k][0]:<32}{runners[k].median * 1e3:>9.1f}{over:>10.1f}{2 * deq:>10.1f}"
          + (f"{2 * unp:>12.1f}" if unp is not None else f"{'-':>12}"))
  print("  (2 x deq: twice one jitted pass dequantizing all 28 kernels to float32 in storage "
        "layout, what a step dequantizes; 2 x unpack: the same for the bit-stream unpacking "
        "alone; step-(e): the step's median minus the float32-base step's)")
  cmd = "command: .venv/bin/python benchmarks/modulora_step.py"
  for key, dflt in (("batch", 4), ("seq", 256), ("reps", 7), ("intermediate", 1376),
                    ("only", "a,b,c,d,e")):
    if getattr(args, key) != dflt:
      cmd += f" --{key} {getattr(args, key)}"
  print(cmd)


if __name__ == "__main__":
  main()
