"""One LoRA training step, lora_jax vs Hugging Face PEFT + torch, on CPU, in one run.

Step = forward, backward and an AdamW update of the adapter only, on a Llama with
hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000, sequence 256,
batch 8, LoRA rank 16 (alpha 32) on q, k, v, o, gate, up, down; float32.

Ours: `jax.jit` of `lj.implicit(llama.forward)` + `optax.adamw` on `lj.split`'s
adapter. Theirs: `peft.get_peft_model(LlamaForCausalLM)` + `torch.optim.AdamW`
(transformers' default attention, sdpa). Each side runs in its own subprocess
(so peak memory is per side: the peak resident set over the warm-up and timed
steps minus the resident set before them), and the parent interleaves their
steps one by one, so both see the same load on a shared machine. The script
also measures the best f32 matmul rate of both frameworks and prints the
least possible step time it implies.

    .venv/bin/python benchmarks/vs_peft.py [--steps 5] [--stacked] [--family qwen2]

`--family` runs the same step on another model family at the same sizes (its
transformers config from `AutoConfig.for_model`, our `models.DecoderConfig.from_hf` of
it, LoRA on "all-linear" on both sides: PEFT's selection and ours are the same modules,
experts included for the MoE families); the matmul floor is printed for Llama only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CFG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=8000)
BATCH, SEQ, RANK, ALPHA = 8, 256, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# per family: what its config needs beyond CFG at these sizes (head_dim 64 as Llama's)
FAMILY_EXTRA = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 64},
    "gemma": {"head_dim": 64}, "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64,
                                          "sliding_window": 128},
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 688,
                  "head_dim": 64},
}


MOE = ("mixtral", "qwen3_moe")
# MoE: attention and the experts (PEFT's target_parameters); the router (4 outputs) is
# left out on both sides, as rank 16 exceeds it
MOE_OURS = [r".*self_attn/(q|k|v|o)_proj/kernel", r".*mlp/experts/(gate_up_proj|down_proj)"]
MOE_PEFT = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def _hf_config(family: str):
  import transformers
  return transformers.AutoConfig.for_model(family, **CFG, **FAMILY_EXTRA[family])


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _serve(step, matmul) -> None:
  """Child loop: one command per stdin line, one JSON line per answer on stdout.

  Memory: the resident set is read before the first step (model, adapter and
  optimizer built, ours compiled); the peak over all steps (warm-up included)
  is `VmHWM` after resetting it through /proc/self/clear_refs.
  """
  base_rss = _rss_kib("VmRSS")
  ok = _reset_peak()
  print(json.dumps({"ready": True}), flush=True)
  loss = None
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "step":
      t = time.perf_counter()
      loss = step()
      print(json.dumps({"t": time.perf_counter() - t}), flush=True)
    elif cmd == "matmul":
      print(json.dumps({"gflops": matmul()}), flush=True)
    elif cmd == "done":
      peak = _rss_kib("VmHWM")
      print(json.dumps({"loss": loss, "peak_step_mib": (peak - base_rss) / 1024 if ok else None,
                        "peak_rss_mib": peak / 1024}), flush=True)
      return


def _best_rate(run, flops: float, n: int = 5) -> float:
  run()
  best = float("inf")
  for _ in range(n):
    t = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t)
  return flops / best / 1e9


def serve_ours(stacked: bool, family: str | None) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import lora_jax as lj
  from lora_jax import models
  from lora_jax.models import decoder, llama

  if family is None:
    config = llama.LlamaConfig(**CFG)
    targets = r"layers/.*/(q|k|v|o|gate|up|down)_proj/kernel"
  else:
    config = models.DecoderConfig.from_hf(_hf_config(family).to_dict())
    targets = MOE_OURS if family in MOE else "all-linear"
  params = llama.init_params(jax.random.key(0), config, stacked=stacked)
  cfg = lj.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets,
                      layouts=llama.STACKED_LAYOUTS if stacked else decoder.EXPERT_LAYOUTS)
  params = lj.init(jax.random.key(1), params, cfg)
  adapter, frozen = lj.split(params)
  opt = optax.adamw(1e-4)
  opt_state = opt.init(adapter)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG["vocab_size"], (BATCH, SEQ)),
                    jnp.int32)

  def loss_fn(adapter, frozen, ids):
    logits = lj.implicit(models.forward)(lj.combine(adapter, frozen), config, ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
    return jnp.mean(nll)

  @jax.jit
  def train_step(adapter, opt_state, frozen, ids):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, frozen, ids)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  compiled = train_step.lower(adapter, opt_state, frozen, ids).compile()
  state = [adapter, opt_state]

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], frozen, ids)
    return float(jax.block_until_ready(loss))

  x = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  _serve(step, lambda: _best_rate(lambda: mm(x).block_until_ready(), 2 * 2048 ** 3))


def serve_peft(family: str | None) -> None:
  import numpy as np
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  if family is None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).float()
    targets = TARGETS
  else:
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family)).float()
    targets = "all-linear"
  kw = MOE_PEFT if family in MOE else dict(target_modules=targets)
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, **kw))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  ids = torch.tensor(np.random.RandomState(0).randint(0, CFG["vocab_size"], (BATCH, SEQ)))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss)

  x = torch.ones(2048, 2048)
  _serve(step, lambda: _best_rate(lambda: x @ x, 2 * 2048 ** 3))


class _Child:
  def __init__(self, side: str, stacked: bool, family: str | None):
    cmd = ([sys.executable, __file__, "--side", side] + (["--stacked"] if stacked else [])
           + (["--family", family] if family else []))
    self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    self.read()

  def read(self) -> dict:
    while True:
      line = self.p.stdout.readline()
      if not line:
        raise RuntimeError(f"benchmark child {self.p.args} exited early")
      if line.startswith("{"):
        return json.loads(line)

  def ask(self, cmd: str) -> dict:
    self.p.stdin.write(cmd + "\n")
    self.p.stdin.flush()
    return self.read()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--stacked", action="store_true", help="ours: layers stacked under scan")
  ap.add_argument("--family", choices=sorted(FAMILY_EXTRA),
                  help="another model family at the same sizes (default: the Llama above)")
  ap.add_argument("--side", choices=["ours", "peft"], help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.side == "ours":
    return serve_ours(args.stacked, args.family)
  if args.side == "peft":
    return serve_peft(args.family)

  tokens = BATCH * SEQ
  h, f, L, V = (CFG["hidden_size"], CFG["intermediate_size"], CFG["num_hidden_layers"],
                CFG["vocab_size"])
  lin = L * (4 * h * h + 3 * h * f) + h * V     # frozen linear weights (lm_head included)
  attn = L * 2 * SEQ * h                        # QK^T and PV per token, as weights
  lora = L * RANK * (4 * (h + h) + 2 * (h + f) + (f + h))
  fwd = 2 * tokens * (lin + attn + lora)
  # least work for the step: forward; backward needs input gradients of every frozen
  # linear (1x), both attention matmuls' gradients (2x), LoRA input+factor grads (2x)
  need = fwd + 2 * tokens * (lin + 2 * attn + 2 * lora)
  print(f"LoRA training step on CPU ({os.cpu_count()} cores): {args.family or 'Llama'} hidden {h}, {L} layers, "
        f"{CFG['num_attention_heads']} heads, intermediate {f}, vocab {V}, seq {SEQ}, "
        f"batch {BATCH}, rank {RANK} (alpha {ALPHA}) on "
        f"{','.join(t[:-5] for t in TARGETS)}; float32")
  if args.family:
    print(f"family {args.family} at these sizes ({FAMILY_EXTRA[args.family] or 'no extra keys'}); "
          + ("LoRA on attention and the experts on both sides" if args.family in MOE
             else "LoRA on all-linear on both sides"))
  ours, theirs = _Child("ours", args.stacked, args.family), _Child("peft", False, args.family)
  rate = {"ours": [], "peft": []}
  times = {"ours": [], "peft": []}
  for _ in range(2):
    rate["ours"].append(ours.ask("matmul")["gflops"])
    rate["peft"].append(theirs.ask("matmul")["gflops"])
  for i in range(args.steps + 1):      # interleaved, so both see the same machine load
    t_o, t_p = ours.ask("step")["t"], theirs.ask("step")["t"]
    if i:                              # step 0 is the warm-up
      times["ours"].append(t_o)
      times["peft"].append(t_p)
  end = {"ours": ours.ask("done"), "peft": theirs.ask("done")}
  med = {k: statistics.median(v) for k, v in times.items()}
  llama_flops = args.family in (None, "llama")
  peak_rate = max(max(rate["ours"]), max(rate["peft"]))
  print(f"median of {args.steps} interleaved steps after one warm-up each; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a loaded machine slows torch's "
        "OpenMP barriers more than XLA's thread pool, so ratios move with load)")
  print(f"{'':30} {'median step s':>13} {'GFLOP/s':>8} {'peak over steps MiB':>20} "
        f"{'peak RSS MiB':>13} {'loss':>8}")
  names = {"ours": "lora_jax (jit, implicit" + (", scan)" if args.stacked else ")"),
           "peft": "PEFT 0.21 + torch (sdpa)"}
  for k in ("ours", "peft"):
    r = end[k]
    pk = "n/a" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.0f}"
    gf = f"{need / med[k] / 1e9:8.1f}" if llama_flops else f"{'n/a':>8}"
    print(f"{names[k]:30} {med[k]:13.3f} {gf} {pk:>20} "
          f"{r['peak_rss_mib']:13.0f} {r['loss']:8.4f}")
  ratio = med["ours"] / med["peft"]
  print(f"time ratio ours/PEFT: {ratio:.2f}x (target <= 0.50x)")
  if end["ours"]["peak_step_mib"] is not None and end["peft"]["peak_step_mib"]:
    print(f"peak-memory-over-steps ratio ours/PEFT: "
          f"{end['ours']['peak_step_mib'] / end['peft']['peak_step_mib']:.2f}x")
  print(f"peak RSS ratio ours/PEFT (includes each framework's runtime): "
        f"{end['ours']['peak_rss_mib'] / end['peft']['peak_rss_mib']:.2f}x")
  floor = need / (peak_rate * 1e9)
  if not llama_flops:
    print("physical limit: not computed for this family (the FLOP count is Llama's)")
  else:
    print(f"physical limit: the step needs >= {need / 1e9:.0f} GFLOP of matmul; the best "
          f"2048^3 f32 matmul rate measured here is {peak_rate:.0f} GFLOP/s (jax "
          f"{max(rate['ours']):.0f}, torch {max(rate['peft']):.0f}), so no step can take "
          f"less than {floor:.2f} s; the 0.5x target is {0.5 * med['peft']:.2f} s"
          + (" (below that limit: unreachable here)" if 0.5 * med["peft"] < floor else ""))
  print(f"per-step s ours {[round(t, 3) for t in times['ours']]}, "
        f"PEFT {[round(t, 3) for t in times['peft']]}")


if __name__ == "__main__":
  main()
