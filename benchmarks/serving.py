"""Multi-LoRA serving on CPU: 4 adapters over one base in one batch, five ways, in one run.

Llama hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000, float32, random
weights; 4 LoRA adapters of rank 16 (alpha 32) on q, k, v, o, gate, up, down, each with
a random (non-zero) `b`. Workload: a batch of 16 sequences of 128 tokens whose rows are
routed to adapters [0, 1, 2, 3, -1, 0, 1, ...] (-1: the base alone); one forward
(prefill logits), and greedy generation of `--gen-tokens` new tokens from the same batch.

  (a) ours, mixed batch: `lj.implicit(llama.forward)` on `lj.with_adapter_ids(
      lj.stack_adapters(adapters), ids)`: one program for the whole batch;
  (b) ours, grouped: one `lj.implicit(llama.forward)` call per adapter on its rows (and a
      plain forward on the base rows): serving several adapters without multi-LoRA;
  (c) merged: `lj.merge` of each adapter once (not timed; one full copy of the adapted
      kernels per adapter), one plain forward per sub-batch;
  (d) floor: the base model alone on the whole batch, no LoRA work at all: every
      implementation of this workload does at least this work;
  (e) peer: Hugging Face PEFT's mixed-batch inference (`model(ids, adapter_names=[...])`,
      "__base__" for base rows) on `transformers.LlamaForCausalLM` (sdpa attention) with
      the same weights, in torch on CPU (2 threads, `torch.inference_mode()`).

Every variant is jitted (ours) and warmed up; repetitions are interleaved across the
variants so that load from other processes falls on all alike; the median is printed,
and each ratio both as a ratio of medians and as the median of the ratios within a round.
Layers are stacked under `scan` by default (`--unrolled`: a Python loop); the two
measured within 2% of each other for (a): stacked ahead on the forward, unrolled on
generation.
The logits of (b), (c) and (e) are checked against (a) before timing. The script also
times a 2048^3 f32 matmul (best of 10, before and after the forward rounds) and prints
the least time the FLOPs of (a) allow at that rate.

    .venv/bin/python benchmarks/serving.py [--reps 7] [--gen-tokens 32] [--unrolled] [--no-peft]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.models import llama

CFG = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
       "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8000}
BATCH, SEQ, RANK, ALPHA, N_ADAPTERS = 16, 128, 16, 32, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rows cycle over the adapters and the base: 4 rows for adapter 0, 3 for each other one
IDS = [k % 5 if k % 5 < N_ADAPTERS else -1 for k in range(BATCH)]
B_STD = 0.02   # the scale of `b`: big enough that every adapter changes the logits


def _is_lora(x):
  return isinstance(x, lj.LoraWeight)


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# The model, the adapters and the batch

def make_adapter(base, stacked: bool, seed: int):
  """`lj.init` (b = 0), then a random b, so each adapter computes something different."""
  cfg = lj.LoraConfig(rank=RANK, alpha=ALPHA,
                      targets=r"layers/.*/(q|k|v|o|gate|up|down)_proj/kernel",
                      layouts=llama.STACKED_LAYOUTS if stacked else {})
  params = lj.init(jax.random.key(100 + seed), base, cfg)
  keys = iter(jax.random.split(jax.random.key(200 + seed), 64))

  def fill(x):
    if not _is_lora(x):
      return x
    b = B_STD * jax.random.normal(next(keys), x.b.shape, x.b.dtype)
    return lj.LoraWeight(w=x.w, a=x.a, b=b, scale=x.scale, axes=x.axes)
  return jax.tree.map(fill, params, is_leaf=_is_lora)


def groups():
  """{adapter id (-1: base): row indices}, in order of first appearance."""
  out: dict[int, list[int]] = {}
  for row, i in enumerate(IDS):
    out.setdefault(i, []).append(row)
  return {i: np.asarray(rows) for i, rows in out.items()}


# ----------------------------------------------------------------------------
# Our four variants. Each is a callable returning its outputs (for the checks); the
# timing loop blocks on them.

def ours_forward(config, base, adapters, input_ids):
  served = lj.stack_adapters(adapters)
  ids = jnp.asarray(IDS, jnp.int32)
  mixed = jax.jit(lambda s, ids, x: lj.implicit(llama.forward)(lj.with_adapter_ids(s, ids),
                                                                config, x))
  one = jax.jit(lambda p, x: lj.implicit(llama.forward)(p, config, x))
  plain = jax.jit(lambda p, x: llama.forward(p, config, x))
  merged = [lj.merge(a) for a in adapters]
  sub = {i: input_ids[rows] for i, rows in groups().items()}   # split before timing

  def grouped(models, fn):
    # the base rows run the plain base model in both (b) and (c)
    return lambda: [plain(base, x) if i < 0 else fn(models[i], x) for i, x in sub.items()]

  return {"a": lambda: mixed(served, ids, input_ids),
          "b": grouped(adapters, one),
          "c": grouped(merged, plain),
          "d": lambda: plain(base, input_ids)}, served, merged


def ours_generate(config, base, adapters, served, merged, input_ids, n):
  ids = jnp.asarray(IDS, jnp.int32)
  mixed = lj.with_adapter_ids(served, ids)
  sub = {i: input_ids[rows] for i, rows in groups().items()}

  def grouped(models):
    return lambda: [llama.generate(base if i < 0 else models[i], config, x, n)
                    for i, x in sub.items()]

  return {"a": lambda: llama.generate(mixed, config, input_ids, n),
          "b": grouped(adapters),
          "c": grouped(merged),
          "d": lambda: llama.generate(base, config, input_ids, n)}


def ungroup(outs):
  """Per-group outputs of (b)/(c) back into batch order."""
  parts = list(zip(groups().values(), outs))
  full = np.zeros((BATCH,) + np.shape(parts[0][1])[1:], np.asarray(parts[0][1]).dtype)
  for rows, y in parts:
    full[rows] = np.asarray(y)
  return full


# ----------------------------------------------------------------------------
# The peer: PEFT on transformers' Llama, with our weights

def _hf_name(path: str) -> str:
  """Our unrolled path -> transformers' parameter name (without the `.weight`)."""
  special = {"embed_tokens/embedding": "model.embed_tokens", "norm/scale": "model.norm",
             "lm_head/kernel": "lm_head"}
  if path in special:
    return special[path]
  return "model." + path.rsplit("/", 1)[0].replace("/", ".")


def peft_model(config, base, adapters):
  import peft
  import torch
  import transformers

  hf = dict(config.to_hf(), eos_token_id=None)      # our generate never stops early either
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf,
                                                                 attn_implementation="sdpa"))
  state = {}
  for path, x in lj.leaves_with_paths(llama.unstack_layers(base)):
    # kernels are (in, out) here, torch Linear weights (out, in)
    x = np.asarray(x).T if path.endswith("kernel") else np.asarray(x)
    state[_hf_name(path) + ".weight"] = torch.from_numpy(x.copy())
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
  cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
  model = peft.get_peft_model(model, cfg, adapter_name="a0")
  for k in range(1, N_ADAPTERS):
    model.add_adapter(f"a{k}", cfg)
  modules = dict(model.base_model.model.named_modules())
  with torch.no_grad():
    for k, ad in enumerate(adapters):
      for path, lw in lj.leaves_with_paths(llama.unstack_layers(ad), is_leaf=_is_lora):
        if not _is_lora(lw):
          continue
        m = modules[_hf_name(path)]
        assert m.scaling[f"a{k}"] == lw.scale
        m.lora_A[f"a{k}"].weight.copy_(torch.from_numpy(np.asarray(lw.a).T.copy()))
        m.lora_B[f"a{k}"].weight.copy_(torch.from_numpy(np.asarray(lw.b).T.copy()))
  return model.eval()


def peft_variants(model, input_ids, n):
  import torch

  x = torch.from_numpy(np.asarray(input_ids, np.int64))
  names = ["__base__" if i < 0 else f"a{i}" for i in IDS]
  mask = torch.ones_like(x)   # explicit: transformers would infer padding from pad_token_id

  def fwd():
    with torch.inference_mode():
      return model(input_ids=x, attention_mask=mask, adapter_names=names,
                   use_cache=False).logits

  def gen():
    with torch.inference_mode():
      out = model.generate(input_ids=x, attention_mask=mask, adapter_names=names,
                           max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, x.shape[1]:]
  return fwd, gen


# ----------------------------------------------------------------------------
# Timing

def _block(out):
  if hasattr(out, "numpy"):          # a torch tensor: torch runs synchronously
    return out
  return jax.block_until_ready(out)


def measure(runs: dict, reps: int) -> tuple[dict, dict, dict]:
  """Two warm-up calls each, then `reps` interleaved rounds. Returns the median seconds
  per variant, the per-round seconds, and per variant the median over rounds of its time
  over (a)'s in the same round: the machine's load moves by up to 2x from one minute to
  the next, and a ratio within one round (a few seconds) sees the same load on both."""
  for fn in runs.values():
    for _ in range(2):
      _block(fn())
  times = {k: [] for k in runs}
  for _ in range(reps):
    for k, fn in runs.items():
      t = time.perf_counter()
      _block(fn())
      times[k].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  paired = {k: statistics.median(t / ta for t, ta in zip(v, times["a"]))
            for k, v in times.items()}
  return med, times, paired


def matmul_rate() -> float:
  """Best f32 rate of one 2048^3 `jnp.dot` over 10 calls, FLOP/s."""
  x = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: jnp.dot(x, x))
  mm(x).block_until_ready()
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    mm(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * 2048 ** 3 / best


def forward_flops() -> tuple[float, float]:
  """(FLOPs of (a)'s forward, of which LoRA): every matmul once, causal attention counted
  for the visible half of the scores only (the least any implementation must do)."""
  h, f, L, V = (CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"],
                CFG["vocab_size"])
  tokens = BATCH * SEQ
  lin = L * (4 * h * h + 3 * h * f) + h * V
  attn = L * 2 * ((SEQ + 1) / 2) * h                # QK^T and PV over the visible keys
  lora_rows = sum(i >= 0 for i in IDS)
  lora = L * RANK * (4 * (h + h) + 2 * (h + f) + (f + h))
  lora_flops = 2 * lora_rows * SEQ * lora
  return 2 * tokens * (lin + attn) + lora_flops, lora_flops


# ----------------------------------------------------------------------------

NAMES = {"a": "(a) ours, mixed batch", "b": "(b) ours, grouped per adapter",
         "c": "(c) merged per adapter", "d": "(d) floor: base only",
         "e": "(e) PEFT mixed batch (torch)"}


def table(title: str, med: dict, times: dict, paired: dict, tokens: int = 0):
  """Medians, then ratios: of the medians, and (in brackets) the median of the same ratio
  taken within each round."""
  print(f"\n{title}")
  print(f"{'variant':<32}{'median ms':>10}{'vs (a)':>8}{'[paired]':>10}"
        + (f"{'tokens/s':>10}" if tokens else ""))
  for k, t in med.items():
    print(f"{NAMES[k]:<32}{t * 1e3:>10.1f}{t / med['a']:>8.3f}{paired[k]:>10.3f}"
          + (f"{tokens / t:>10.0f}" if tokens else ""))
  notes = {"d": "overhead of 4 adapters over the no-LoRA floor",
           "b": "mixed batch vs one call per adapter",
           "c": "mixed batch vs merged copies per adapter", "e": "ours vs PEFT"}
  for k, what in notes.items():
    if k in med:
      print(f"  (a)/({k}) = {med['a'] / med[k]:.3f} [{1 / paired[k]:.3f}]  {what}")
  for k, v in times.items():
    print(f"  {k} per round ms: {[round(t * 1e3) for t in v]}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--gen-tokens", type=int, default=32, help="0 skips generation")
  ap.add_argument("--unrolled", action="store_true",
                  help="layers in a Python loop instead of stacked under scan")
  ap.add_argument("--no-peft", action="store_true")
  args = ap.parse_args()
  stacked = not args.unrolled
  import torch
  torch.set_num_threads(2)

  config = llama.LlamaConfig(**CFG)
  base = llama.init_params(jax.random.key(0), config, stacked=stacked)
  adapters = [make_adapter(base, stacked, k) for k in range(N_ADAPTERS)]
  input_ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG["vocab_size"], (BATCH, SEQ)),
                          jnp.int32)
  print(f"multi-LoRA serving on CPU ({os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.device_count()} device, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads): Llama hidden {CFG['hidden_size']}, "
        f"{CFG['num_hidden_layers']} layers ({'stacked, scan' if stacked else 'unrolled'}), "
        f"{CFG['num_attention_heads']} heads, intermediate {CFG['intermediate_size']}, vocab "
        f"{CFG['vocab_size']}, float32; {N_ADAPTERS} adapters rank {RANK} on "
        f"{','.join(t[:-5] for t in TARGETS)}; batch {BATCH} x {SEQ} tokens, ids {IDS}")

  runs, served, merged = ours_forward(config, base, adapters, input_ids)
  sizes = {"base": nbytes(base), "bank": nbytes(served) - nbytes(base),
           "merged": sum(nbytes(jax.tree.leaves(m["layers"])) for m in merged)}
  print(f"memory: base {sizes['base'] / 2**20:.1f} MiB; (a)/(b) add the adapter bank "
        f"{sizes['bank'] / 2**20:.1f} MiB; (c) holds {N_ADAPTERS} merged copies of the layers, "
        f"{sizes['merged'] / 2**20:.1f} MiB more")

  # same computation everywhere: every variant's logits against (a)'s
  ref = np.asarray(runs["a"]())
  for k in ("b", "c"):
    diff = np.abs(ungroup(runs[k]()) - ref).max()
    print(f"max |logits {k} - a| = {diff:.2e}")
    assert diff < 1e-3, k
  diff_base = np.abs(np.asarray(runs["d"]()) - ref)[np.asarray(IDS) >= 0].max()
  print(f"max |logits d - a| on adapter rows = {diff_base:.2e} (the adapters do change them)")
  if not args.no_peft:
    model = peft_model(config, base, adapters)
    pfwd, pgen = peft_variants(model, input_ids, args.gen_tokens)
    diff = np.abs(pfwd().numpy() - ref).max()
    print(f"max |logits PEFT - ours| = {diff:.2e}")
    assert diff < 1e-3
    runs["e"] = pfwd

  # the peak rate, before and after the rounds: the best of both is the least loaded
  rates = [matmul_rate()]
  med, times, paired = measure(runs, args.reps)
  rates.append(matmul_rate())
  table(f"prefill forward (logits), {BATCH} x {SEQ} tokens, median of {args.reps} interleaved "
        f"rounds (load average {os.getloadavg()[0]:.1f})", med, times, paired)

  need, lora = forward_flops()
  rate = max(rates)
  print(f"\nFLOP limit: (a) needs >= {need / 1e9:.1f} GFLOP of matmul (LoRA {lora / 1e9:.2f} "
        f"of them, {lora / need:.1%}); best 2048^3 f32 matmul here {rate / 1e9:.0f} GFLOP/s "
        f"(before / after the rounds: {rates[0] / 1e9:.0f} / {rates[1] / 1e9:.0f}) -> "
        f">= {need / rate * 1e3:.0f} ms; (a) takes {med['a'] * 1e3:.0f} ms "
        f"({need / rate / med['a']:.0%} of the limit), the floor (d) {med['d'] * 1e3:.0f} ms")

  if args.gen_tokens:
    n = args.gen_tokens
    gens = ours_generate(config, base, adapters, served, merged, input_ids, n)
    tok = np.asarray(gens["a"]())
    same = {k: np.mean(ungroup(gens[k]()) == tok) for k in ("b", "c")}
    if not args.no_peft:
      gens["e"] = pgen
      same["e"] = np.mean(pgen().numpy() == tok)
    print("\ngreedy tokens equal to (a)'s: "
          + ", ".join(f"{k} {v:.1%}" for k, v in same.items())
          + " (random weights give near-tied logits, where float rounding may flip a token)")
    gmed, gtimes, gpaired = measure(gens, args.reps)
    table(f"greedy generate of {n} new tokens after the {SEQ}-token prompts (prefill "
          f"included), median of {args.reps} interleaved rounds (load average "
          f"{os.getloadavg()[0]:.1f}); tokens/s = {BATCH} x {n} / time", gmed, gtimes, gpaired,
          BATCH * n)


if __name__ == "__main__":
  main()
