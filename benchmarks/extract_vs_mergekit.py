"""`lora-jax extract-lora` vs `mergekit-extract-lora` on random Llama-shaped checkpoints:
wall time and peak RSS of each process, side by side, with ratios.

    .venv/bin/python benchmarks/extract_vs_mergekit.py                 # ~100M params per model
    .venv/bin/python benchmarks/extract_vs_mergekit.py --params 300e6 --max-rank 64

Two checkpoints (a base and a "finetune" = base + small noise, so the difference is a
full-rank task vector), bf16, one safetensors file each, are written once to a
temporary directory with `merge_vs_mergekit.py`'s helpers. Each extraction runs as its
own process under `/usr/bin/time -v` (wall clock, maximum resident set size),
interleaved ours, mergekit, ours, mergekit, ...; the better (smallest) time and RSS of
the `--reps` runs of each tool are reported, every run is printed too.

The outputs are compared: tensor names; for each LoRA pair the product `B @ A` (the
factors' singular vectors may differ in sign, their product may not); full-rank tensors
(`modules_to_save`: embeddings, head, norms) exactly; and each tool's products against
the exact rank-r truncation of the float32 task vector (float64 SVD, outside the timing).
No targets were set for this benchmark.

Floors printed beside the figures: the RSS and wall time of a process that only imports
each tool's runtime (JAX vs torch + mergekit's extract script), and the time to read the
input bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from merge_vs_mergekit import llama_shape, timed, write_models  # noqa: E402
from lora_jax import checkpoint as _st  # noqa: E402

PY = sys.executable
MK = os.path.join(os.path.dirname(PY), "mergekit-extract-lora")


def headers(d):
  out = {}
  for fn in os.listdir(d):
    if fn.endswith(".safetensors"):
      out.update(_st.read_header(os.path.join(d, fn)))
  return out


def truncated(d, r):
  """The best rank-`r` approximation of `d`, in float64: the exact target of both tools."""
  u, s, vh = np.linalg.svd(d.astype(np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vh[:r], (s[r - 1] / s[r] - 1 if r < len(s) else np.inf)


def compare(dir_o, dir_m, base, ft):
  """Lines describing how the two adapters agree, and how far each LoRA product is from
  the exact rank-r truncation of the float32 task vector."""
  ho, hm = headers(dir_o), headers(dir_m)
  hb, hf = headers(base), headers(ft)
  err_o, err_m, gap = 0.0, 0.0, np.inf
  if set(ho) != set(hm):
    only_o, only_m = sorted(set(ho) - set(hm)), sorted(set(hm) - set(ho))
    return [f"tensor names differ: only ours {only_o[:4]}, only mergekit {only_m[:4]}"]
  lines = [f"tensor names: same {len(ho)} in both"]
  worst_abs, worst_rel, worst_name, n_lora, n_rank = 0.0, 0.0, "", 0, set()
  n_full, n_full_equal, dtypes = 0, 0, set()
  for k in sorted(ho):
    dtypes.add((ho[k].dtype, hm[k].dtype))
    if ".lora_A." in k or ".lora_embedding_A" in k:
      kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
      po, pm = (_st.read_tensor(h[kb]).astype(np.float32) @ _st.read_tensor(h[k]).astype(np.float32)
                for h in (ho, hm))
      n_rank.add((ho[k].shape[0], hm[k].shape[0]))
      d = float(np.abs(po - pm).max())
      rel = d / max(float(np.abs(pm).max()), 1e-30)
      w = k.replace("base_model.model.", "").split(".lora_")[0] + ".weight"
      tv = _st.read_tensor(hf[w]).astype(np.float32) - _st.read_tensor(hb[w]).astype(np.float32)
      ref, g = truncated(tv.T if "lora_embedding" in k else tv, ho[k].shape[0])
      gap = min(gap, g)
      scale = float(np.abs(ref).max())
      err_o = max(err_o, float(np.abs(po - ref).max()) / scale)
      err_m = max(err_m, float(np.abs(pm - ref).max()) / scale)
      if d > worst_abs:
        worst_abs, worst_name = d, k.replace("base_model.model.", "").replace(".lora_A.weight", "")
      worst_rel = max(worst_rel, rel)
      n_lora += 1
    elif ".lora_B" in k or ".lora_embedding_B" in k:
      continue
    else:
      a, b = _st.read_tensor(ho[k]), _st.read_tensor(hm[k])
      n_full += 1
      n_full_equal += int(a.shape == b.shape and np.array_equal(a, b))
  lines.append(f"LoRA pairs: {n_lora}, ranks (ours, mergekit) {sorted(n_rank)}, dtypes "
               f"{sorted(dtypes)}; B@A max |diff| {worst_abs:.2e} ({worst_name}), "
               f"worst max |diff| / max |B@A| {worst_rel:.1e}")
  lines.append(f"B@A vs the exact rank-r truncation of the float32 task vector (float64 SVD), "
               f"worst max |err| / max |ref|: ours {err_o:.1e}, mergekit {err_m:.1e}; smallest "
               f"gap at the cut s_r / s_r+1 - 1: {gap:.1e}")
  lines.append(f"full-rank tensors (modules_to_save): {n_full_equal} of {n_full} bitwise equal")
  co, cm = (json.load(open(os.path.join(d, "adapter_config.json"))) for d in (dir_o, dir_m))
  same = [k for k in ("r", "lora_alpha", "rank_pattern", "peft_type", "task_type") if co[k] == cm[k]]
  sets = [k for k in ("target_modules", "modules_to_save") if set(co[k]) == set(cm[k])]
  lines.append(f"adapter_config: equal {same}; equal as sets {sets}")
  return lines


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--params", type=float, default=100e6,
                  help="parameters per model (default 100e6)")
  ap.add_argument("--max-rank", type=int, default=32)
  ap.add_argument("--reps", type=int, default=2, help="runs of each tool, interleaved")
  ap.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
  args = ap.parse_args()

  print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
  c = llama_shape(args.params)
  root = tempfile.mkdtemp(prefix="extract-bench-", dir=args.workdir)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
  try:
    t0 = time.perf_counter()
    (base, ft), n = write_models(root, c, n_models=2)
    print(f"checkpoints: 2 x {n / 1e6:.1f}M params bf16 ({c['num_hidden_layers']} layers, hidden "
          f"{c['hidden_size']}, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}), "
          f"written in {time.perf_counter() - t0:.1f}s to {root}")
    nbytes = sum(os.path.getsize(os.path.join(p, "model.safetensors")) for p in (base, ft))
    t0 = time.perf_counter()
    for p in (base, ft):
      with open(os.path.join(p, "model.safetensors"), "rb") as f:
        while f.read(1 << 24):
          pass
    read_s = time.perf_counter() - t0
    t_jax, rss_jax = timed([PY, "-c", "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"], env)
    t_torch, rss_torch = timed([PY, "-c", "import torch, mergekit.scripts.extract_lora"], env)
    print(f"floors: reading the {nbytes / 1e9:.2f} GB of inputs (page cache) {read_s:.2f}s; "
          f"import-only: JAX {t_jax:.2f}s {rss_jax / 2**20:.0f} MiB, torch+mergekit "
          f"{t_torch:.2f}s {rss_torch / 2**20:.0f} MiB")

    out_o, out_m = os.path.join(root, "ours"), os.path.join(root, "mk")
    cmd_o = [PY, "-m", "merging.cli", "extract-lora", "--model", ft, "--base-model", base,
             "--out-path", out_o, "--max-rank", str(args.max_rank), "--quiet"]
    cmd_m = [MK, "--model", ft, "--base-model", base, "--out-path", out_m,
             "--max-rank", str(args.max_rank), "--quiet", "--no-copy-tokenizer"]
    runs_o, runs_m, notes = [], [], None
    for rep in range(args.reps):
      for out, cmd, runs in ((out_o, cmd_o, runs_o), (out_m, cmd_m, runs_m)):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(timed(cmd, env))
      print(f"run {rep + 1}: ours {runs_o[-1][0]:.2f}s {runs_o[-1][1] / 2**20:.0f} MiB, "
            f"mergekit {runs_m[-1][0]:.2f}s {runs_m[-1][1] / 2**20:.0f} MiB "
            f"(load {os.getloadavg()[0]:.2f})")
      if notes is None:
        notes = compare(out_o, out_m, base, ft)
    shutil.rmtree(out_o, ignore_errors=True)
    shutil.rmtree(out_m, ignore_errors=True)

    t_o, t_m = min(r[0] for r in runs_o), min(r[0] for r in runs_m)
    r_o, r_m = min(r[1] for r in runs_o), min(r[1] for r in runs_m)
    print()
    print(f"best of {args.reps} (max rank {args.max_rank}):")
    print(f"{'':10} {'ours':>8} {'mergekit':>9} {'ours/mergekit':>14}")
    print(f"{'wall s':10} {t_o:8.2f} {t_m:9.2f} {t_o / t_m:14.2f}")
    print(f"{'peak MiB':10} {r_o / 2**20:8.0f} {r_m / 2**20:9.0f} {r_o / r_m:14.2f}")
    print(f"{'minus import floor':18}  time {t_o - t_jax:.2f}s vs {t_m - t_torch:.2f}s, "
          f"RSS {(r_o - rss_jax) / 2**20:.0f} vs {(r_m - rss_torch) / 2**20:.0f} MiB")
    print("\nours vs mergekit (outputs of run 1):")
    for line in notes:
      print("  " + line)
    print("\nWhy B@A differs: mergekit subtracts the checkpoints in bf16 (the task vector is\n"
          "rounded to bf16 before its float32 SVD), lora-jax in float32; both round the\n"
          "factors to bf16. A noise task vector's singular values are nearly equal at the\n"
          "cut (gap above), so such small changes turn the kept rank-r subspace visibly.\n"
          "Machine: shared 2-core CPU; load average printed above.")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
