"""Peak memory of one QLoRA training step, lora_jax vs PEFT + bitsandbytes, on CPU.

Two figures, each side in its own subprocess, measured the same way:

1. the peak memory of one step at a fixed size (batch x sequence), ours / PEFT;
2. the longest sequence whose step fits in a memory budget (the process's peak
   resident set, runtime, model and compile included), ours / PEFT.

The model: a Llama (vocabulary 32000, hidden 512, 4 layers, 8 heads of 64,
intermediate 1408 = 2.75x) with random weights, written once as a Hugging Face
checkpoint (`models.init_params` + `models.save_hf`) that both sides load. The
vocabulary is realistic, so at long sequences the `(tokens, vocab)` logits are, as in
real models, the largest activation of an unchunked loss. float32 compute on both sides.

Ours: `training.trainer.load_base` of that checkpoint with `quantize: {format: nf4,
block_size: 64, double_quant: true}`, LoRA r 16 / alpha 32 on all-linear
(`trainer.add_adapter`), `lj.split`, `trainer.make_optimizer` (adamw),
`trainer.make_train_step` jitted with the adapter and optimizer state donated, layers
stacked under `lax.scan`, `remat` per layer ("full" is the headline; "dots_no_batch" and
"none" are reported beside it), the cross-entropy in chunks of `--loss-chunk` tokens.
A row holds seq + 1 tokens, so the model runs on seq tokens as PEFT's does.

PEFT: `transformers.LlamaForCausalLM.from_pretrained` of the same checkpoint with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)` on
`device_map="cpu"`, `peft.prepare_model_for_kbit_training(model,
use_gradient_checkpointing=True)`, `get_peft_model(LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear"))`, `gradient_checkpointing_enable(use_reentrant=False)`;
a step is `model(input_ids, labels=input_ids).loss.backward()` and `torch.optim.AdamW`.

Memory, per child process (Linux):
  pre-step RSS   VmRSS once the model, adapter, optimizer and batch exist (ours: the
                 step compiled too), after `gc.collect()`;
  step increment VmHWM over the step(s) (the peak reset through /proc/self/clear_refs
                 just before) minus the pre-step RSS: what the step itself adds;
  peak RSS       `getrusage(RUSAGE_SELF).ru_maxrss` at the end: the largest resident
                 set the process ever had (imports, loading, compile and step), what a
                 memory limit sees. The budget search compares this one.
Ours also prints XLA's compiled memory analysis of the step (argument + output + temp
- alias), a static cross-check of what the jitted step allocates.

Beside each figure, the limits it can be held against: the persistent state (quantized
base, dense frozen weights, adapter, AdamW moments; counted from the arrays) and an
activations floor: the per-layer checkpoints any checkpointed step keeps
((layers + 1) x tokens x hidden float32) plus the logits the loss cannot avoid (ours:
one chunk of `loss_chunk x vocab` float32; PEFT: all of `tokens x vocab` float32, once,
though its loss holds several such arrays).

The budget search (PEFT, and ours with the headline variant): it starts from the
fixed-size run; while every length has fit, the next one is where the line through the
last two fitting (length, peak RSS) points, or through (0, pre-step RSS) and the one point,
meets the budget (at least `--search-resolution` tokens further, at most twice the longest
that fit: a step that grows faster than linearly would overshoot); once one does not fit,
the bracket is bisected down to that resolution. A child is killed as soon as its
resident set passes the budget (the parent polls /proc/PID/status every 20 ms), so an
over-budget run costs only the time to reach the budget; every child has a time limit,
the search `--max-runs` children per side and the whole run `--time-limit` seconds.

    .venv/bin/python benchmarks/train_memory.py
    (options: --batch 1 --seq 2048 --budget-gib 3 --loss-chunk 1024 --steps 1
              --search-resolution 512 --max-runs 5 --variants full,dots_no_batch,none
              --skip-search; --tiny: a toy model, for the test)

On the 2-core machine this project has, shared with other jobs, a run took 551 s at a
load average of 4-6 (about 15 minutes at 6-7); the load averages at start and end are
printed (they move the step times, not the memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

CFG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=8)
# --tiny (tests/test_train_memory_benchmark.py): the same run on a toy model, in seconds
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4)
RANK, ALPHA, BLOCK = 16, 32, 64
MIB, GIB = 2 ** 20, 2 ** 30


# ----------------------------------------------------------------------------
# memory of this process

def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak() -> None:
  """VmHWM := VmRSS (Linux >= 4.0); the step's peak is then VmHWM after it."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _measure(run_step, steps: int) -> dict:
  gc.collect()
  before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  pre = _status_kib("VmRSS")
  _reset_peak()
  t = time.perf_counter()
  losses = [run_step() for _ in range(steps)]
  seconds = (time.perf_counter() - t) / steps
  hwm = _status_kib("VmHWM")
  return {"pre_step_rss": pre * 1024, "step_increment": (hwm - pre) * 1024,
          "step_hwm": hwm * 1024, "peak_before_step": before_peak * 1024,
          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "loss": losses[-1], "step_s": seconds}


# ----------------------------------------------------------------------------
# the base checkpoint

def build_checkpoint(path: pathlib.Path, max_pos: int) -> None:
  import jax

  from lora_jax import models
  config = models.DecoderConfig(**CFG, max_position_embeddings=max_pos)
  models.save_hf(path, config, models.init_params(jax.random.key(0), config))


def _batch_ids(batch: int, n: int):
  import numpy as np
  return np.random.RandomState(0).randint(0, CFG["vocab_size"], (batch, n)).astype(np.int32)


# ----------------------------------------------------------------------------
# children

def child_ours(ckpt: str, batch: int, seq: int, remat: str, chunk: int, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import lora_jax as lj
  import quantization as qz
  from training import config as tconfig
  from training import trainer

  c = tconfig.from_dict({
      "base_model": ckpt, "data": "unused.jsonl", "output_dir": "unused", "max_steps": steps,
      "batch_size": batch, "seq_len": seq + 1, "remat": remat, "loss_chunk": chunk,
      "stacked": True, "max_grad_norm": None,
      "quantize": {"format": "nf4", "block_size": BLOCK, "double_quant": True},
      "lora": {"r": RANK, "alpha": ALPHA, "targets": "all-linear"}})
  config, base = trainer.load_base(c)
  params = trainer.add_adapter(c, jax.random.key(1), base)
  adapter, frozen = lj.split(params)
  del params, base
  opt, _ = trainer.make_optimizer(c)
  opt_state = opt.init(adapter)
  is_q = lambda x: isinstance(x, qz.QuantizedArray)  # noqa: E731
  qleaves = [x for x in jax.tree.leaves(frozen, is_leaf=is_q) if is_q(x)]
  state = {"quantized base": sum(x.nbytes() for x in qleaves),
           "dense frozen": sum(x.nbytes for x in jax.tree.leaves(frozen, is_leaf=is_q)
                               if not is_q(x)),
           "adapter": sum(x.nbytes for x in jax.tree.leaves(adapter)),
           "adam moments": sum(x.nbytes for x in jax.tree.leaves(opt_state))}
  ids = _batch_ids(batch, seq + 1)
  batches = {"input_ids": ids[None],
             "segment_ids": np.ones_like(ids)[None],
             "positions": np.broadcast_to(np.arange(seq + 1, dtype=np.int32), ids.shape)[None],
             "loss_mask": np.ones_like(ids)[None]}
  batches = jax.device_put({k: np.ascontiguousarray(v) for k, v in batches.items()})
  # the frozen base is a jit argument (trainer.train passes it so): a captured
  # constant would be embedded in the compiled program
  step = jax.jit(trainer.make_train_step(c, config, opt, dropout=False),
                 donate_argnums=(0, 1))
  t = time.perf_counter()
  compiled = step.lower(adapter, opt_state, frozen, batches, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t
  m = compiled.memory_analysis()
  xla = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
  xla["total"] = xla["argument"] + xla["output"] + xla["temp"] - xla["alias"]
  box = [adapter, opt_state]
  del adapter, opt_state

  def run_step():
    box[0], box[1], loss, _ = compiled(box[0], box[1], frozen, batches, jnp.int32(0))
    return float(jax.block_until_ready(loss))

  out = _measure(run_step, steps)
  out.update(state=state, xla=xla, compile_s=compile_s, jax=jax.__version__)
  return out


def child_peft(ckpt: str, batch: int, seq: int, steps: int) -> dict:
  import bitsandbytes
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  bnb = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.LlamaForCausalLM.from_pretrained(
      ckpt, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
  n4 = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
  model = peft.prepare_model_for_kbit_training(
      model, use_gradient_checkpointing=True,
      gradient_checkpointing_kwargs={"use_reentrant": False})
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                     target_modules="all-linear"))
  model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=2e-4)
  ids = torch.from_numpy(_batch_ids(batch, seq)).long()

  def nb(t):
    return t.numel() * t.element_size()

  qbytes = dense = 0
  for p in model.parameters():
    if isinstance(p, bitsandbytes.nn.Params4bit):
      qs = p.quant_state
      qbytes += nb(p) + nb(qs.absmax) + (nb(qs.state2.absmax) + nb(qs.offset)
                                         if qs.nested else 0) + nb(qs.code)
    elif not p.requires_grad:
      dense += nb(p)
  lora = sum(nb(p) for p in trainable)
  state = {"quantized base": qbytes, "dense frozen": dense, "adapter": lora,
           "adam moments": 2 * lora}      # exp_avg, exp_avg_sq (made at the first step)

  def run_step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss)

  out = _measure(run_step, steps)
  out.update(state=state, linear4bit=n4, attn=model.config._attn_implementation,
             versions={"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__})
  return out


# ----------------------------------------------------------------------------
# the parent

def _rss_of(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def run_child(args, side: str, seq: int, remat: str = "full", kill_above: float | None = None,
              timeout: float = 300.0) -> dict:
  """One step in a fresh process; `{"ok": False, "why": ...}` if it passed `kill_above`
  bytes of resident memory (killed at once), timed out or failed."""
  cmd = [sys.executable, __file__, "--child", side, "--ckpt", args.ckpt, "--batch",
         str(args.batch), "--seq", str(seq), "--remat", remat, "--loss-chunk",
         str(args.loss_chunk), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "3"}
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
    t0, seen = time.perf_counter(), 0
    why = None
    while p.poll() is None:
      rss = _rss_of(p.pid)
      seen = max(seen, rss)
      if kill_above is not None and rss > kill_above:
        why = f"resident set passed {kill_above / GIB:.2f} GiB (killed at {rss / GIB:.2f})"
      elif time.perf_counter() - t0 > timeout:
        why = f"no answer in {timeout:.0f} s"
      if why:
        p.kill()
        p.wait()
        break
      time.sleep(0.02)
    wall = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    lines = [x for x in out.read().splitlines() if x.startswith("{")]
    if why is None and (p.returncode != 0 or not lines):
      tail = err.read().strip().splitlines()[-3:]
      why = f"exit {p.returncode}: {' | '.join(tail)}"
  if why:
    return {"ok": False, "why": why, "seq": seq, "seen_rss": seen, "wall_s": wall}
  r = json.loads(lines[-1])
  r.update(ok=True, seq=seq, wall_s=wall)
  return r


def act_floor(side: str, batch: int, seq: int, chunk: int) -> int:
  """Bytes any checkpointed step of this side holds at once, beyond its persistent
  state: the layer-boundary checkpoints and the logits its loss cannot avoid."""
  V, H, L = CFG["vocab_size"], CFG["hidden_size"], CFG["num_hidden_layers"]
  tokens = batch * seq
  boundary = (L + 1) * tokens * H * 4
  logits = min(chunk, tokens) * V * 4 if side == "ours" else tokens * V * 4
  return boundary + logits


def search(args, side: str, remat: str, budget: float, known: dict, deadline: float,
           log) -> tuple[int | None, int | None, list]:
  """`(longest fitting, shortest not fitting, runs)`: sequence lengths (multiples of
  `--search-resolution`) whose peak RSS is <= `budget`.

  `known` is a finished run (the fixed-size one) to start from. While nothing has failed
  to fit, the next length is where the line through the last two fitting points (or
  through the runtime's pre-step RSS at length 0 and the one point) meets the budget, at
  least one resolution step further and at most twice the longest that fit; once a length
  fails, the bracket is bisected. A
  child is killed as soon as it passes the budget. At most `--max-runs` children."""
  res = args.search_resolution
  fits: dict[int, int] = {}
  good = bad = None
  runs = []

  def record(seq, r):
    nonlocal good, bad
    ok = r["ok"] and r["peak_rss"] <= budget
    runs.append((seq, ok, r))
    if ok:
      fits[seq] = r["peak_rss"]
      good = seq if good is None else max(good, seq)
    else:
      bad = seq if bad is None else min(bad, seq)
    log(f"  {side:<5} seq {seq:>6}: " + (f"peak RSS {r['peak_rss'] / GIB:.2f} GiB (step "
        f"+{r['step_increment'] / GIB:.2f})" if r["ok"] else r["why"])
        + f" -> {'fits' if ok else 'does not fit'}"
        + (" (the fixed-size run)" if r.get("known") else f" ({r['wall_s']:.0f} s)"))
    return ok

  pre0 = known.get("pre_step_rss", 0) if known.get("ok") else 0
  if known.get("ok") or "resident" in known.get("why", ""):
    record(known["seq"], {**known, "known": True})
  while len(runs) < args.max_runs + 1 and time.perf_counter() < deadline:
    if bad is not None and (good or 0) + res >= bad:
      break
    if bad is None and good is not None:
      pts = sorted(fits.items())[-2:]
      (t0, m0), (t1, m1) = pts if len(pts) == 2 else ((0, pre0), pts[0])
      slope = max((m1 - m0) / max(t1 - t0, 1), 1.0)
      seq = int(t1 + (budget - m1) / slope) // res * res
      seq = min(max(seq, good + res), max(2 * good // res * res, good + res))
    elif bad is not None:
      seq = max(((good or 0) + bad) // 2 // res * res, (good or 0) + res)
      if seq >= bad:
        break
    else:
      seq = args.search_start
    r = run_child(args, side, seq, remat=remat, kill_above=budget, timeout=args.child_timeout)
    ok = record(seq, r)
    if not ok and not r["ok"] and "resident" not in r["why"]:
      break                 # a failure that is not memory: stop rather than guess
  return good, bad, runs


def _fmt_state(s: dict) -> str:
  return ", ".join(f"{k} {v / MIB:.1f}" for k, v in s.items())


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=2048, help="the fixed-size comparison")
  ap.add_argument("--loss-chunk", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=1, help="steps per child (peak over them)")
  ap.add_argument("--budget-gib", type=float, default=3.0, help="the search's peak RSS budget")
  ap.add_argument("--search-start", type=int, default=1024)
  ap.add_argument("--search-resolution", type=int, default=512)
  ap.add_argument("--max-runs", type=int, default=5, help="children per side in the search")
  ap.add_argument("--child-timeout", type=float, default=300.0)
  ap.add_argument("--time-limit", type=float, default=1200.0,
                  help="no search child starts after this many seconds of the run")
  ap.add_argument("--variants", default="full,dots_no_batch,none",
                  help="our remat policies at the fixed size (the first is the headline)")
  ap.add_argument("--skip-search", action="store_true")
  ap.add_argument("--ckpt", help=argparse.SUPPRESS)
  ap.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
  ap.add_argument("--remat", default="full", help=argparse.SUPPRESS)
  ap.add_argument("--tiny", action="store_true", help="a toy model (for the test)")
  args = ap.parse_args(argv)
  if args.tiny:
    CFG.update(TINY)
  if args.child == "ours":
    print(json.dumps(child_ours(args.ckpt, args.batch, args.seq, args.remat, args.loss_chunk,
                                args.steps)), flush=True)
    return
  if args.child == "peft":
    print(json.dumps(child_peft(args.ckpt, args.batch, args.seq, args.steps)), flush=True)
    return

  t_start = time.perf_counter()
  deadline = t_start + args.time_limit

  def log(s):
    print(s, flush=True)

  V, H, L, I = (CFG[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                 "intermediate_size"))
  log(f"QLoRA step memory on CPU: Llama vocab {V}, hidden {H}, {L} layers, "
      f"{CFG['num_attention_heads']} heads, intermediate {I}; NF4 block {BLOCK} double quant; "
      f"LoRA r {RANK} alpha {ALPHA} all-linear; adamw; float32; {args.steps} step(s) per "
      f"child")
  log(f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} on "
      f"{os.cpu_count()} cores (times move with load; memory does not)")
  with tempfile.TemporaryDirectory() as tmp:
    args.ckpt = str(pathlib.Path(tmp) / "base")
    build_checkpoint(pathlib.Path(args.ckpt), max_pos=1 << 17)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    safety = 16 * GIB           # never let one child take the machine
    fixed = {}
    log(f"\n[1] fixed size: batch {args.batch} x seq {args.seq}")
    fixed["peft"] = run_child(args, "peft", args.seq, kill_above=safety,
                              timeout=args.child_timeout)
    for v in variants:
      fixed[v] = run_child(args, "ours", args.seq, remat=v, kill_above=safety,
                           timeout=args.child_timeout)
    _fixed_table(args, fixed, variants, log)

    if not args.skip_search:
      budget = args.budget_gib * GIB
      log(f"\n[2] longest sequence whose step fits in {args.budget_gib:g} GiB of peak RSS "
          f"(batch {args.batch}; from the fixed-size run, a secant on the peak RSS until one "
          f"does not fit, then bisection to {args.search_resolution} tokens; at most "
          f"{args.max_runs} more children per side)")
      longest = {}
      for side, key in (("peft", "peft"), ("ours", variants[0])):
        good, bad, _ = search(args, side, key, budget, fixed[key], deadline, log)
        longest[side] = (good, bad)
      _search_summary(args, longest, log)
  log(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; whole run "
      f"{time.perf_counter() - t_start:.0f} s")


VARIANT_NAMES = {"full": "ours, remat full",
                 "dots_no_batch": "ours, remat dots_no_batch", "none": "ours, remat none",
                 "dots": "ours, remat dots"}


def _fixed_table(args, fixed, variants, log):
  B, T, chunk = args.batch, args.seq, args.loss_chunk
  log(f"{'(MiB)':34}{'pre-step':>9}{'step +':>8}{'act floor':>10}{'peak RSS':>9}"
      f"{'state':>7}{'XLA':>7}{'step s':>8}{'loss':>9}")
  rows = [("peft", "PEFT + bnb, grad ckpt")] + [(v, VARIANT_NAMES.get(v, f"ours, {v}"))
                                                 for v in variants]
  for key, name in rows:
    r = fixed[key]
    side = "peft" if key == "peft" else "ours"
    if not r["ok"]:
      log(f"  {name:<32}failed: {r['why']}")
      continue
    xla = f"{r['xla']['total'] / MIB:>7.0f}" if "xla" in r else f"{'':>7}"
    log(f"  {name:<32}{r['pre_step_rss'] / MIB:>9.0f}{r['step_increment'] / MIB:>8.0f}"
        f"{act_floor(side, B, T, chunk) / MIB:>10.0f}{r['peak_rss'] / MIB:>9.0f}"
        f"{sum(r['state'].values()) / MIB:>7.0f}{xla}{r['step_s']:>8.1f}{r['loss']:>9.4f}")
  log("  step + = peak over the step minus the pre-step RSS; act floor = what any "
      "checkpointed step must add: (layers + 1) x tokens x hidden f32 (layer checkpoints)\n"
      "  + the logits its loss cannot avoid (ours: one chunk x vocab f32; PEFT: tokens x "
      "vocab f32, once); peak RSS = the process's lifetime peak; state = quantized base +\n"
      "  dense frozen + adapter + AdamW moments (a floor under pre-step, which adds the "
      "runtime); XLA = argument + output + temp - alias of the compiled step")
  for key, name in rows:
    r = fixed[key]
    if r["ok"]:
      log(f"  state, {name} (MiB): {_fmt_state(r['state'])}")
  for key in variants:
    r = fixed[key]
    if r["ok"]:
      x = r["xla"]
      log(f"  XLA memory analysis, {VARIANT_NAMES.get(key, key)} (MiB): argument "
          f"{x['argument'] / MIB:.0f} + output {x['output'] / MIB:.0f} + temp "
          f"{x['temp'] / MIB:.0f} - alias {x['alias'] / MIB:.0f} = {x['total'] / MIB:.0f}; "
          f"compile {r['compile_s']:.0f} s")
  p = fixed["peft"]
  if p["ok"]:
    log(f"  PEFT: {p['linear4bit']} bnb Linear4bit layers on CPU, attention "
        f"{p['attn']}, {p['versions']}")
  nh = CFG["num_attention_heads"]
  from lora_jax.models import decoder
  if T >= decoder.ATTN_FLASH_MIN_TOKENS:
    blk = decoder.ATTN_BLOCK
    tile = B * nh * blk * blk * 4
    log(f"  attention: flash attention from {decoder.ATTN_FLASH_MIN_TOKENS} tokens on; its "
        f"score tile, one float32 (batch, heads, {blk}, {blk}) array, is {tile / MIB:.0f} "
        f"MiB whatever T (online softmax over key blocks, custom VJP: linear in T)")
  else:
    probs = B * nh * T * T * 4
    log(f"  attention: not flash below {decoder.ATTN_FLASH_MIN_TOKENS} tokens; its scores, "
        f"at most one float32 (batch, heads, T, T) array, are {probs / MIB:.0f} MiB at T = {T}")
  head = fixed[variants[0]] if variants else None
  if p["ok"] and head and head["ok"]:
    ratio = head["step_increment"] / p["step_increment"]
    ratio_rss = head["peak_rss"] / p["peak_rss"]
    name = VARIANT_NAMES.get(variants[0], f"ours, {variants[0]}")
    log(f"\nRATIO 1  step peak (increment over pre-step RSS), {name} "
        f"/ PEFT at {B} x {T}: {ratio:.2f}x  (target <= 0.60x: "
        f"{'met' if ratio <= 0.6 else 'NOT met'})")
    log(f"         lifetime peak RSS, the same two: {ratio_rss:.2f}x")
    for v in variants[1:]:
      if fixed[v]["ok"]:
        step_r = fixed[v]["step_increment"] / p["step_increment"]
        log(f"         {VARIANT_NAMES.get(v, v)}: step {step_r:.2f}x, "
            f"peak RSS {fixed[v]['peak_rss'] / p['peak_rss']:.2f}x")
  else:
    log("\nRATIO 1  not measured: a side failed (see above)")


def _search_summary(args, longest, log):
  for side in ("peft", "ours"):
    good, bad = longest[side]
    log(f"  longest fitting, {side}: " + (f"{good} tokens" if good else "none of those tried")
        + (f" ({bad} does not fit)" if bad else " (no longer length was found not to fit: "
           "the search ran out of runs or time)"))
  (o, ob), (p, pb) = longest["ours"], longest["peft"]
  if o and p:
    r = o / p
    lo = o / pb if pb else None
    hi = ob / p if ob else None
    log(f"\nRATIO 2  longest sequence in {args.budget_gib:g} GiB, ours / PEFT: {r:.2f}x  "
        f"(target >= 2x: {'met' if r >= 2 else 'NOT met'}; the true ratio lies in "
        f"[{'?' if lo is None else f'{lo:.2f}'}, {'?' if hi is None else f'{hi:.2f}'}), "
        f"lengths found to {args.search_resolution} tokens)")
  else:
    log("\nRATIO 2  not measured: a side fit no length searched")


if __name__ == "__main__":
  main()
