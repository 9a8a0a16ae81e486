"""GPTQ of a ~100M-parameter Llama, `qz.gptq` against llm-compressor's `oneshot`, on CPU.

The model: a `transformers.LlamaForCausalLM` built in code with random weights
(`torch.manual_seed(0)`, transformers' own initialisation: kernels and embeddings
N(0, 0.02^2), norm scales 1), hidden 768, 12 heads, intermediate 2048, vocab 32000,
saved with `save_pretrained` to a temporary directory together with a word-level
tokenizer (`PreTrainedTokenizerFast(tokenizer_object=...)`, which oneshot needs).
`--layers 12` is the ~100M model (134.1 M parameters, 84.9 M of them in the 84
projection kernels that are quantized); the default is 2 layers (63.3 M parameters,
14.2 M quantized), because on the shared 2-core machine one 12-layer GPTQ run of either
side was estimated at 15-25 minutes and the script runs four of them. `--small`:
hidden 256, 6 layers, 4 heads, intermediate 768, vocab 8000 (9.2 M), a quick check.

Both sides quantize the 7 projections of every layer (not `lm_head`, not the
embeddings) to asymmetric groups of 128 inputs (a zero point per group), 4 and 3 bits,
calibrated on the same ids: `--calib` sequences of `--seq` random token ids
(`numpy.random.RandomState(0)`), fed in batches of `--batch` sequences on both sides.

  ours    `config, params = llama.load_hf(dir)`, then
          `qz.gptq(params, lambda p, ids: llama.forward(p, config, ids), batches,
          qz.QuantConfig(f"int{bits}", 128, symmetric=False, targets=<the 7 kernels>))`
          (sequential: layer after layer on the partly quantized model; every stage
          runs the user's whole forward over the calibration batches).
          RTN: `qz.quantize(params, same config)`.
  theirs  `LlamaForCausalLM.from_pretrained(dir)` (float32, sdpa attention), then
          llm-compressor 0.14 `oneshot(model, dataset, GPTQModifier(config_groups=<int,
          bits, group 128, asymmetric>, ignore=["lm_head"]), batch_size=...,
          shuffle_calibration_samples=False)` (its sequential pipeline, one decoder layer
          at a time, quantization-aware propagation; block 128, dampening 0.01 as ours).
          RTN: `oneshot(model, recipe=QuantizationModifier(same scheme))` (data-free).

Each (side, method, bits) runs in its own subprocess, in the order ours, theirs for each
variant (interleaved, so machine load falls on both alike); last, ours once more at the
first bit width with calibration batches of half the size (`--no-noise-floor` skips
it): the same data and algorithm, only the order of the sums in H changed, which shows
how far the integer codes of two correct GPTQ runs drift apart anyway. Measured in each:

  time    wall time of the quantization call only (`qz.gptq` / `qz.quantize` to
          `block_until_ready`; `oneshot`); imports and model load are printed
          separately. Ours includes JIT compilation; the part of it JAX reports
          (`jax.monitoring` compile events) is printed beside it.
  memory  `resource.getrusage(RUSAGE_SELF).ru_maxrss` right after the quantization
          call (total peak RSS of the process), and that minus the RSS after imports
          and model load (what the quantization added at its peak). The peak after
          load is printed as well: if it exceeds the final one, the load, not the
          quantization, set the total.
  quality logits on `--heldout` held-out sequences (`RandomState(1)`) of each quantized
          model against the float model (`llama.forward` on the float params, float32):
          mean squared error, the same relative to the float logits' mean square, and
          top-1 agreement (fraction of positions whose argmax token is the float
          model's). Theirs: the torch model after oneshot. The torch float model
          against ours float is printed as the floor of a cross-framework comparison.
  codes   the fraction of equal integer codes, ours against theirs, over all quantized
          weights, per method and bit width (theirs: compressed-tensors' `quantize` of
          the module's weight with its `weight_scale` / `weight_zero_point`).

Random weights make a weak yardstick of quality (no outliers, no structure for GPTQ to
exploit); the comparison between ours and theirs on the same model is the point.

    .venv/bin/python benchmarks/gptq.py                # 2 layers of the ~100M shape
    .venv/bin/python benchmarks/gptq.py --layers 12    # the ~100M model (long: see above)
    .venv/bin/python benchmarks/gptq.py --small        # ~10M model
    (options: --calib 32 --seq 256 --batch 8 --heldout 4 --bits 4,3 --reps 1
     --no-noise-floor --keep DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

GROUP = 128
TARGETS = r"layers/\d+/(self_attn|mlp)/\w+_proj/kernel"

DEFAULT_LAYERS = 2
FULL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=2048, vocab_size=32000)
SMALL = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
             intermediate_size=768, vocab_size=8000)


def rss_mib() -> float:
  """Current resident set size of this process (MiB)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


# ----------------------------------------------------------------------------
# subprocess workers

def _time_calls(module, name: str) -> list[float]:
  """Wrap `module.name` so that its calls' wall time adds up in the returned cell."""
  total = [0.0]
  fn = getattr(module, name)

  def timed(*a, **k):
    t0 = time.perf_counter()
    try:
      return fn(*a, **k)
    finally:
      total[0] += time.perf_counter() - t0
  setattr(module, name, timed)
  return total


def build(d: pathlib.Path, arch: dict, calib: int, seq: int, heldout: int) -> dict:
  """The random torch Llama + tokenizer in d/model, the ids, torch float logits."""
  import torch
  import transformers
  from tokenizers import Tokenizer
  from tokenizers import models as tm
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**arch, num_key_value_heads=arch["num_attention_heads"],
                                 max_position_embeddings=max(seq, 256),
                                 tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(str(d / "model"), safe_serialization=True)
  vocab = {f"t{i}": i for i in range(arch["vocab_size"])}
  tok = Tokenizer(tm.WordLevel(vocab, unk_token="t0"))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(d / "model"))
  V = arch["vocab_size"]
  np.save(d / "calib.npy", np.random.RandomState(0).randint(0, V, (calib, seq)))
  held = np.random.RandomState(1).randint(0, V, (heldout, seq))
  np.save(d / "heldout.npy", held)
  with torch.no_grad():
    logits = np.concatenate([model(torch.tensor(held[i:i + 1])).logits.numpy()
                             for i in range(len(held))])
  np.save(d / "logits_torch_float.npy", logits)
  n_all = sum(p.numel() for p in model.parameters())
  n_q = sum(m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "layers." in n)
  n_lin = sum(1 for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "layers." in n)
  return {"params": n_all, "quantized_params": n_q, "kernels": n_lin,
          "threads": torch.get_num_threads()}


def worker_ours(d: pathlib.Path, method: str, bits: int, batch: int, tag: str) -> dict:
  import jax
  import jax.numpy as jnp
  from jax import monitoring

  import lora_jax as lj
  import quantization as qz
  from lora_jax.models import llama
  from quantization import _gptq
  out = {"rss_imports": rss_mib()}
  kernel_s = _time_calls(_gptq, "gptq_kernel")
  compile_s = [0.0]

  def on_event(event, duration, **kw):
    if event.startswith("/jax/core/compile/") or event.startswith("/jax/compilation"):
      compile_s[0] += duration
  monitoring.register_event_duration_secs_listener(on_event)
  t0 = time.perf_counter()
  config, params = llama.load_hf(d / "model")
  jax.block_until_ready(params)
  calib = np.load(d / "calib.npy")
  held = np.load(d / "heldout.npy")
  out.update(load_s=time.perf_counter() - t0, rss_loaded=rss_mib(), maxrss_loaded=maxrss_mib())
  fwd = lambda p, ids: llama.forward(p, config, ids)  # noqa: E731
  cfg = qz.QuantConfig(f"int{bits or 4}", GROUP, symmetric=False, targets=TARGETS)
  batches = [jnp.asarray(calib[i:i + batch]) for i in range(0, len(calib), batch)]
  compile_s[0] = 0.0
  t0 = time.perf_counter()
  if method == "gptq":
    q = qz.gptq(params, fwd, batches, cfg, progress=False)
  elif method == "rtn":
    q = qz.quantize(params, cfg)
  else:
    q = params
  jax.block_until_ready(q)
  out.update(quant_s=time.perf_counter() - t0, compile_s=compile_s[0], kernel_s=kernel_s[0],
             maxrss=maxrss_mib(), rss_after=rss_mib())
  run = jax.jit(lj.implicit(fwd))
  logits = np.concatenate([np.asarray(run(q, jnp.asarray(held[i:i + 1])))
                           for i in range(len(held))])
  np.save(d / f"logits_{tag}_{method}{bits}.npy", logits)
  if method != "float":
    codes = {}
    for i, lp in enumerate(q["layers"]):
      for kind, mods in (("self_attn", lp["self_attn"]), ("mlp", lp["mlp"])):
        for name, m in mods.items():
          codes[f"model.layers.{i}.{kind}.{name}"] = np.asarray(m["kernel"].codes())
    np.savez(d / f"codes_{tag}_{method}{bits}.npz", **codes)
  return out


def worker_theirs(d: pathlib.Path, method: str, bits: int, batch: int, tag: str) -> dict:
  import torch
  import transformers
  from compressed_tensors.quantization.lifecycle.forward import quantize
  from datasets import Dataset
  from llmcompressor import oneshot
  from llmcompressor.modifiers.gptq import GPTQModifier
  from llmcompressor.modifiers.gptq import base as gptq_base
  from llmcompressor.modifiers.quantization import QuantizationModifier
  out = {"rss_imports": rss_mib()}
  kernel_s = _time_calls(gptq_base, "quantize_weight")
  t0 = time.perf_counter()
  model = transformers.LlamaForCausalLM.from_pretrained(str(d / "model"),
                                                        dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(d / "model"))
  calib = np.load(d / "calib.npy")
  held = np.load(d / "heldout.npy")
  data = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": np.ones_like(calib).tolist()})
  out.update(load_s=time.perf_counter() - t0, rss_loaded=rss_mib(), maxrss_loaded=maxrss_mib())
  scheme = {"g": {"targets": ["Linear"], "weights": {
      "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
      "group_size": GROUP}}}
  torch.manual_seed(0)
  t0 = time.perf_counter()
  if method == "gptq":
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], actorder=None,
                          block_size=128, dampening_frac=0.01, config_groups=scheme)
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], batch_size=batch,
            shuffle_calibration_samples=False, processor=tok)
  else:
    recipe = QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=scheme)
    oneshot(model=model, recipe=recipe, processor=tok)
  out.update(quant_s=time.perf_counter() - t0, compile_s=0.0, kernel_s=kernel_s[0],
             maxrss=maxrss_mib(), rss_after=rss_mib())
  with torch.no_grad():
    logits = np.concatenate([model(torch.tensor(held[i:i + 1])).logits.numpy()
                             for i in range(len(held))])
  np.save(d / f"logits_{tag}_{method}{bits}.npy", logits)
  codes = {}
  for name, mod in model.named_modules():
    if hasattr(mod, "weight_scale"):
      codes[name] = quantize(mod.weight.detach(), mod.weight_scale, mod.weight_zero_point,
                             mod.quantization_scheme.weights, dtype=torch.int8).numpy()
  np.savez(d / f"codes_{tag}_{method}{bits}.npz", **codes)
  return out


# ----------------------------------------------------------------------------
# the driver

def run_worker(d, side, method, bits, batch, tag, env) -> dict:
  cmd = [sys.executable, __file__, "--worker", side, "--method", method, "--bits", str(bits),
         "--batch", str(batch), "--dir", str(d), "--tag", tag]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d)
  wall = time.perf_counter() - t0
  if p.returncode:
    sys.stderr.write(p.stderr[-6000:])
    raise SystemExit(f"worker {tag} {method} {bits} failed (exit {p.returncode})")
  res = json.loads(p.stdout.strip().splitlines()[-1])
  res["process_s"] = wall
  return res


def quality(ref, logits):
  err = logits.astype(np.float64) - ref
  mse = float(np.mean(err ** 2))
  centered = ref - ref.mean(-1, keepdims=True)
  top1 = float(np.mean(np.argmax(logits, -1) == np.argmax(ref, -1)))
  return mse, mse / float(np.mean(centered ** 2)), top1


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="a ~10M model for a quick check")
  ap.add_argument("--layers", type=int, default=None,
                  help="number of layers (default 2; 12 for the ~100M model; --small: 6)")
  ap.add_argument("--calib", type=int, default=32, help="calibration sequences")
  ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
  ap.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
  ap.add_argument("--heldout", type=int, default=4, help="held-out sequences for the logits")
  ap.add_argument("--bits", default="4,3")
  ap.add_argument("--reps", type=int, default=1, help="runs of every GPTQ variant")
  ap.add_argument("--keep", default=None, help="work in this directory and keep it")
  ap.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                  help="skip the extra run of ours with half the calibration batch")
  ap.add_argument("--worker", choices=["ours", "theirs", "build"], help=argparse.SUPPRESS)
  ap.add_argument("--method", default="gptq", help=argparse.SUPPRESS)
  ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--arch", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--tag", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args.worker:
    d = pathlib.Path(args.dir)
    if args.worker == "build":
      res = build(d, json.loads(args.arch), args.calib, args.seq, args.heldout)
    else:
      fn = {"ours": worker_ours, "theirs": worker_theirs}[args.worker]
      res = fn(d, args.method, int(args.bits), args.batch, args.tag)
    print(json.dumps(res))
    return

  arch = dict(SMALL if args.small else FULL)
  if not args.small and not args.layers:
    arch["num_hidden_layers"] = DEFAULT_LAYERS
  if args.layers:
    arch["num_hidden_layers"] = args.layers
  bits_list = [int(b) for b in args.bits.split(",")]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
  env.pop("XLA_FLAGS", None)                      # one CPU device
  root = pathlib.Path(os.path.dirname(os.path.abspath(__file__))).parent
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  d = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="gptq-bench-"))
  d.mkdir(parents=True, exist_ok=True)
  try:
    t0 = time.perf_counter()
    info = subprocess.run([sys.executable, __file__, "--worker", "build", "--dir", str(d),
                           "--arch", json.dumps(arch), "--calib", str(args.calib),
                           "--seq", str(args.seq), "--heldout", str(args.heldout)],
                          capture_output=True, text=True, env=env, cwd=d)
    if info.returncode:
      sys.stderr.write(info.stderr[-6000:])
      raise SystemExit("building the model failed")
    info = json.loads(info.stdout.strip().splitlines()[-1])
    from importlib.metadata import version
    print(f"GPTQ benchmark: Llama hidden {arch['hidden_size']}, {arch['num_hidden_layers']} "
          f"layers, {arch['num_attention_heads']} heads, intermediate "
          f"{arch['intermediate_size']}, vocab {arch['vocab_size']}: "
          f"{info['params'] / 1e6:.1f} M parameters, {info['quantized_params'] / 1e6:.1f} M in "
          f"the {info['kernels']} quantized projection kernels (lm_head and embeddings float)")
    print(f"calibration: {args.calib} sequences x {args.seq} tokens = "
          f"{args.calib * args.seq} tokens (random ids, RandomState(0)), batches of "
          f"{args.batch}; held-out: {args.heldout} x {args.seq} tokens (RandomState(1)); "
          f"int{'/'.join(map(str, bits_list))} asymmetric, group {GROUP}")
    print(f"jax {version('jax')}, torch {version('torch')} ({info['threads']} threads), "
          f"llm-compressor {version('llmcompressor')}, compressed-tensors "
          f"{version('compressed-tensors')}; CPU, {os.cpu_count()} cores; load average at "
          f"start {os.getloadavg()[0]:.1f}; model built in {time.perf_counter() - t0:.1f} s")

    half = max(args.batch // 2, 1)
    # (tag, side, method, bits, batch): "ours-b{half}" is ours again with half the batch,
    # i.e. only the order of the sums in H changed: the noise floor of the code agreement
    plan = [("ours", "ours", "float", 0, args.batch)]
    for bits in bits_list:
      plan += [("ours", "ours", "rtn", bits, args.batch), ("theirs", "theirs", "rtn", bits,
                                                           args.batch)]
    for _ in range(args.reps):
      for bits in bits_list:
        plan += [("ours", "ours", "gptq", bits, args.batch),
                 ("theirs", "theirs", "gptq", bits, args.batch)]
    if args.noise_floor and half != args.batch:
      plan.append((f"ours-b{half}", "ours", "gptq", bits_list[0], half))
    results: dict[tuple, list[dict]] = {}
    loads = []
    for tag, side, method, bits, batch in plan:
      r = run_worker(d, side, method, bits, batch, tag, env)
      r["load_avg"] = os.getloadavg()[0]
      loads.append(r["load_avg"])
      results.setdefault((tag, method, bits), []).append(r)
      print(f"  ran {tag:<8} {method:<5} {bits or '':>1}: quantization {r['quant_s']:8.2f} s, "
            f"peak RSS {r['maxrss']:7.0f} MiB, load avg {r['load_avg']:.1f}", flush=True)

    def med(tag, method, bits, key):
      return statistics.median(r[key] for r in results[(tag, method, bits)])

    print(f"\nwall time and peak memory (each run in its own process; median of {args.reps} "
          f"for GPTQ)")
    print(f"  {'variant':<22}{'quant s':>9}{'(compile)':>10}{'(kernels)':>10}{'other s':>9}"
          f"{'RSS load':>10}{'peak RSS':>10}{'peak-load':>11}{'peak@load':>11}")
    rows = [(t, m, b) for b in bits_list for m in ("rtn", "gptq") for t in ("ours", "theirs")]
    rows += [k for k in results if k[0].startswith("ours-b")]
    for t, m, b in rows:
      rs = results[(t, m, b)]
      other = statistics.median(r["process_s"] - r["quant_s"] for r in rs)
      print(f"  {t + ' ' + m.upper() + ' int' + str(b):<22}{med(t, m, b, 'quant_s'):>9.2f}"
            f"{med(t, m, b, 'compile_s'):>10.2f}{med(t, m, b, 'kernel_s'):>10.2f}{other:>9.1f}"
            f"{med(t, m, b, 'rss_loaded'):>10.0f}{med(t, m, b, 'maxrss'):>10.0f}"
            f"{med(t, m, b, 'maxrss') - med(t, m, b, 'rss_loaded'):>11.0f}"
            f"{med(t, m, b, 'maxrss_loaded'):>11.0f}")
    print("  (MiB. quant s: the quantization call only; (compile): JAX compile events within "
          "it; (kernels): within it, the per-kernel GPTQ calls (ours `gptq_kernel`, its "
          "compilation included; theirs `quantize_weight`), the rest being calibration "
          "passes; other s: the rest of the process: imports, model load, held-out logits, "
          "code export; RSS load: after imports and model load; peak-load: peak RSS minus "
          "RSS load; peak@load: peak RSS already reached after the load)")
    print("\nratios ours/theirs")
    for b in bits_list:
      for m in ("gptq", "rtn"):
        t = med("ours", m, b, "quant_s") / med("theirs", m, b, "quant_s")
        p = med("ours", m, b, "maxrss") / med("theirs", m, b, "maxrss")
        pd = ((med("ours", m, b, "maxrss") - med("ours", m, b, "rss_loaded"))
              / max(med("theirs", m, b, "maxrss") - med("theirs", m, b, "rss_loaded"), 1e-9))
        print(f"  {m.upper():<4} int{b}: time {t:.3f}   peak RSS {p:.3f}   peak above load "
              f"{pd:.3f}")

    ref = np.load(d / "logits_ours_float0.npy").astype(np.float64)
    print(f"\nquality on {args.heldout} x {args.seq} held-out tokens, against the float model "
          "(ours, float32)")
    print(f"  {'model':<24}{'logit MSE':>12}{'MSE / MS':>11}{'top-1 agree':>13}")
    mse, rel, top1 = quality(ref, np.load(d / "logits_torch_float.npy"))
    print(f"  {'torch float (floor)':<24}{mse:>12.3e}{rel:>11.2e}{top1:>13.4f}")
    qrows = [(t, m, b) for b in bits_list for m in ("rtn", "gptq") for t in ("ours", "theirs")]
    qrows += [k for k in results if k[0].startswith("ours-b")]
    for t, m, b in qrows:
      mse, rel, top1 = quality(ref, np.load(d / f"logits_{t}_{m}{b}.npy"))
      print(f"  {t + ' ' + m.upper() + ' int' + str(b):<24}{mse:>12.3e}{rel:>11.2e}"
            f"{top1:>13.4f}")
    print("  (MSE / MS: the MSE over the mean square of the float logits, each position "
          "centered; top-1 agree: argmax equal to the float model's)")

    def agreement(x_tag, y_tag, m, b):
      a = np.load(d / f"codes_{x_tag}_{m}{b}.npz")
      t = np.load(d / f"codes_{y_tag}_{m}{b}.npz")
      if sorted(a.files) != sorted(t.files):
        raise SystemExit(f"kernel names differ: {sorted(set(a.files) ^ set(t.files))[:4]}")
      eq = n = near = 0
      layers: dict[int, list[int]] = {}
      for k in a.files:
        x, y = a[k], t[k]
        e = int(np.sum(x == y))
        eq, n = eq + e, n + x.size
        near += int(np.sum(np.abs(x.astype(np.int16) - y) <= 1))
        cell = layers.setdefault(int(k.split(".")[2]), [0, 0])
        cell[0] += e
        cell[1] += x.size
      per_layer = " ".join(f"{e / m_:.4f}" for _, (e, m_) in sorted(layers.items()))
      return eq / n, near / n, n, per_layer

    print("\ninteger codes equal (fraction of all quantized weights; per layer 0, 1, ...)")
    pairs = [("ours", "theirs", m, b) for b in bits_list for m in ("rtn", "gptq")]
    pairs += [("ours", k[0], k[1], k[2]) for k in results if k[0].startswith("ours-b")]
    for x_tag, y_tag, m, b in pairs:
      eq, near, n, per_layer = agreement(x_tag, y_tag, m, b)
      print(f"  {m.upper():<4} int{b} {x_tag} vs {y_tag:<8} {eq:.6f} of {n:,} ({near:.6f} "
            f"within 1); per layer {per_layer}")
    print(f"\nload average during the runs: {min(loads):.1f}-{max(loads):.1f}")
    cmd = ".venv/bin/python benchmarks/gptq.py" + (" --small" if args.small else "")
    if not args.noise_floor:
      cmd += " --no-noise-floor"
    for k, dflt in (("layers", None), ("calib", 32), ("seq", 256), ("batch", 8),
                    ("heldout", 4), ("bits", "4,3"), ("reps", 1)):
      if getattr(args, k) != dflt:
        cmd += f" --{k} {getattr(args, k)}"
    print(f"command: {cmd}")
  finally:
    if not args.keep:
      shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
  main()
