"""`make demo`: the story lora-jax is for, end to end, on data it makes itself.

1. Three small tasks (addition, reversing a word, sorting digits) as JSONL, a
   character-level `tokenizer.json`, and a small Llama pretrained here on a mixture
   that teaches the tasks' format but mostly wrong answers: a "base model" that does
   the tasks poorly (`examples/story_data.py`).
2. One LoRA adapter per task with `lora-jax train` (the command a user runs, through its
   `main`), and one on the union of the tasks; every adapter evaluated on every task
   (exact match of greedy generations on held-out problems).
3. Merges: the task adapters into one (`cat`, `linear`, `svd`, `ties`, `dare_ties`) and
   the merged full fine-tunes with `lora-jax merge` (task arithmetic, TIES), each
   evaluated on every task beside the union adapter.
4. The same fine-tune on quantized bases: NF4 QLoRA, and QA-LoRA folded into its int4
   base: accuracy and the bytes of the deployed model.
5. Serving: one batch whose rows name different adapters (and the base), each row equal
   to its adapter alone; tokens/s against the base alone and one adapter at a time;
   switching customers by loading one adapter against loading a merged model; the
   memory of N adapters against N merged copies.
6. A summary table, and PNGs in demo_out/: loss curves, an accuracy heatmap, memory bars.

`python examples/demo.py [--size toy]`: "full" is `make demo` (about 6-8 minutes on 2
CPU cores), "toy" the same pipeline in a minute for the test. Fixed seeds: the
accuracies move by a few points with the seed (see the summary's note); timings move
with the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import story_data as story  # noqa: E402

import lora_jax as lj  # noqa: E402
import merging as mg  # noqa: E402
import quantization as qz  # noqa: E402
from lora_jax import models  # noqa: E402
from merging import cli  # noqa: E402
from training import data as tdata  # noqa: E402

OUT = pathlib.Path("demo_out")
TASKS = tuple(story.TASKS)


@dataclasses.dataclass(frozen=True)
class Size:
  n_train: int
  n_eval: int
  pretrain_steps: int
  train_steps: int
  batch_size: int
  seq_len: int
  rank: int


# full: the base needs ~1500 pretraining steps to know the tasks' format (and their
# systematic mistakes); an adapter ~800 steps of 8 packed rows (~35 problems) to fix one
# task (examples/story_data.py has the measurements)
SIZES = {
    "full": Size(n_train=3000, n_eval=100, pretrain_steps=1500, train_steps=800,
                 batch_size=8, seq_len=64, rank=16),
    "toy": Size(n_train=200, n_eval=16, pretrain_steps=20, train_steps=6, batch_size=4,
                seq_len=32, rank=4),
}


def banner(text: str) -> None:
  print(f"\n== {text} ==", flush=True)


def nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# 1. data and base

def stage_base(size: Size, seed: int) -> tuple[dict, pathlib.Path]:
  banner("1. three tasks, a tokenizer, and a base model that does them poorly")
  files = story.write_task_files(OUT / "data", size.n_train, size.n_eval, seed)
  print(f"tasks {', '.join(TASKS)}: {size.n_train} train / {size.n_eval} held-out "
        f"eval problems each, in {OUT / 'data'}")
  run = story.pretrain_base(OUT / "base", steps=size.pretrain_steps, seed=seed)
  print(f"pretrained the base in {run['seconds']:.0f} s (loss {run['loss'][0]:.2f} -> "
        f"{np.mean(run['loss'][-10:]):.2f}); a Hugging Face checkpoint in {OUT / 'base'}")
  return files, OUT / "base"


# ----------------------------------------------------------------------------
# 2. one adapter per task, with lora-jax train

def train_config(name: str, base: pathlib.Path, train_file, eval_file, size: Size,
                 seed: int, **extra) -> pathlib.Path:
  cfg = {"base_model": str(base.resolve()), "data": str(pathlib.Path(train_file).resolve()),
         "eval_data": str(pathlib.Path(eval_file).resolve()),
         "output_dir": str((OUT / "runs" / name).resolve()),
         "lora": {"r": size.rank, "alpha": 2 * size.rank, "targets": "all-linear"},
         "max_steps": size.train_steps, "batch_size": size.batch_size,
         "seq_len": size.seq_len, "learning_rate": 3e-3,
         "warmup_steps": min(20, size.train_steps // 4),
         "save_every": size.train_steps, "eval_every": max(1, size.train_steps // 3),
         "eval_batches": 4, "seed": seed, "progress": False, "mesh": {"data": 1},
         "save_merged": True, **extra}
  path = OUT / "configs" / f"{name}.yml"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(yaml.safe_dump(cfg, sort_keys=False))
  return path


def lora_jax_train(config_path: pathlib.Path) -> dict:
  """`lora-jax train CONFIG` (the command line's own `main`)."""
  t0 = time.perf_counter()
  rc = cli.main(["train", str(config_path)])
  if rc != 0:
    raise SystemExit(f"demo: lora-jax train {config_path} failed ({rc})")
  out = pathlib.Path(yaml.safe_load(config_path.read_text())["output_dir"])
  recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  return {"dir": out, "seconds": time.perf_counter() - t0, "metrics": recs}


def stage_adapters(files: dict, base: pathlib.Path, size: Size, seed: int) -> dict:
  banner("2. one LoRA adapter per task with `lora-jax train`, and one on their union")
  runs = {}
  for task in TASKS + ("all",):
    train, ev = files[task] if task != "all" else (OUT / "data" / "all_train.jsonl",
                                                   OUT / "data" / "all_eval.jsonl")
    runs[task] = lora_jax_train(train_config(task, base, train, ev, size, seed))
    m = runs[task]["metrics"]
    print(f"  {task:5s} adapter: loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f} in "
          f"{runs[task]['seconds']:.0f} s ({m[-1]['tokens_per_s']:.0f} tokens/s)")
  return runs


# ----------------------------------------------------------------------------
# evaluation

class Evaluator:
  """Exact match of every model on every task's held-out problems."""

  def __init__(self, files, tok, config, size: Size):
    self.tok, self.config = tok, config
    self.examples = {t: tdata.read_jsonl(files[t][1]) for t in TASKS}
    self.batch = min(64, size.n_eval)
    self.acc: dict[str, dict[str, float]] = {}

  def __call__(self, name: str, params, config=None) -> dict[str, float]:
    cfg = config or self.config
    row = {t: story.exact_match(params, cfg, self.tok, ex, batch_size=self.batch)
           for t, ex in self.examples.items()}
    self.acc[name] = row
    print(f"  {name:26s} " + "  ".join(f"{t} {a:5.1%}" for t, a in row.items()), flush=True)
    return row


# ----------------------------------------------------------------------------
# 3. merges

def merge_yaml(method: str, base: pathlib.Path, tuned: list[pathlib.Path]) -> dict:
  params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
  return {"merge_method": method, "base_model": str(base.resolve()),
          "models": [{"model": str(p.resolve()), "parameters": params} for p in tuned],
          "parameters": {"normalize": False} if method == "ties" else {},
          "dtype": "float32"}


def stage_merges(runs, base_params, config, ev: Evaluator, seed: int) -> None:
  banner("3. merging the task adapters, and the task fine-tunes with `lora-jax merge`")
  adapters = [lj.load_adapter(runs[t]["dir"] / "adapter", base_params, config=config)
              for t in TASKS]
  rank = max(x.rank for x in jax.tree.leaves(adapters[0], is_leaf=lj.is_implicit)
             if isinstance(x, lj.LoraWeight))
  for method, kw in (("cat", {}), ("linear", {}), ("svd", {"rank": 3 * rank}),
                     ("ties", {"density": 0.5, "rank": 3 * rank}),
                     ("dare_ties", {"density": 0.5, "rank": 3 * rank,
                                    "key": jax.random.key(seed)})):
    merged = mg.merge_adapters(adapters, method, weights=[1.0] * len(adapters), **kw)
    ev(f"adapters merged: {method}", merged)
  tuned = [runs[t]["dir"] / "merged" for t in TASKS]
  for method in ("task_arithmetic", "ties"):
    path = OUT / "configs" / f"merge_{method}.yml"
    path.write_text(yaml.safe_dump(merge_yaml(method, OUT / "base", tuned), sort_keys=False))
    dest = OUT / "merged" / method
    rc = cli.main(["merge", str(path), str(dest), "--quiet", "--overwrite"])
    if rc != 0:
      raise SystemExit(f"demo: lora-jax merge {path} failed ({rc})")
    mcfg, mparams = models.load_hf(dest)
    ev(f"lora-jax merge: {method}", mparams, mcfg)


# ----------------------------------------------------------------------------
# 4. quantized bases

def stage_quantized(files, base: pathlib.Path, size: Size, seed: int, ev: Evaluator,
                    runs: dict) -> dict:
  banner("4. the same fine-tune on quantized bases: NF4 QLoRA, QA-LoRA folded to int4")
  task = TASKS[0]
  train, evf = files[task]
  out = {}
  q = lora_jax_train(train_config(f"{task}_qlora", base, train, evf, size, seed,
                                  quantize={"format": "nf4", "block_size": 32},
                                  save_merged=False))
  config, dense = models.load_hf(base, stacked=True)
  qbase = qz.quantize(dense, qz.QuantConfig("nf4", 32, targets=_targets()))
  qparams = lj.load_adapter(q["dir"] / "adapter", qbase, config=config)
  out["NF4 QLoRA"] = (ev(f"{task} QLoRA (NF4 base)", qparams, config), nbytes(qparams))
  qa = train_qalora(files, base, size, seed)
  fcfg, folded = models.load_hf(qa["dir"] / "folded_int4")
  out["QA-LoRA -> int4"] = (ev(f"{task} QA-LoRA folded int4", folded, fcfg), nbytes(folded))
  mcfg, merged = models.load_hf(runs[task]["dir"] / "merged")
  out["LoRA merged (f32)"] = (ev.acc.get(f"{task} adapter"), nbytes(merged))
  for name, (acc, b) in out.items():
    print(f"  {name:20s} deployed model {b / 2**20:6.2f} MiB")
  return out


def _targets() -> str:
  from training import trainer
  return trainer._quant_targets(True)


def train_qalora(files, base, size, seed):
  task = TASKS[0]
  train, evf = files[task]
  return lora_jax_train(train_config(
      f"{task}_qalora", base, train, evf, size, seed, save_merged=False, fold_qalora=True,
      quantize={"format": "int4", "block_size": 32, "symmetric": False},
      # QA-LoRA's a is (in / L, r): with L = 32 (the smallest int4 group) and hidden 128,
      # rank 4 is all the pooled inputs allow
      lora={"r": min(size.rank, 4), "alpha": 2 * min(size.rank, 4), "targets": "all-linear",
            "use_qalora": True, "qalora_group_size": 32}))


# ----------------------------------------------------------------------------
# 5. serving

def stage_serving(runs, base_params, config, tok, ev: Evaluator) -> dict:
  banner("5. serving: many adapters over one base in one batch")
  t0 = time.perf_counter()
  adapters = [lj.load_adapter(runs[t]["dir"] / "adapter", base_params, config=config)
              for t in TASKS]
  load_adapter_s = (time.perf_counter() - t0) / len(adapters)
  t0 = time.perf_counter()
  for t in TASKS:
    models.load_hf(runs[t]["dir"] / "merged")
  load_model_s = (time.perf_counter() - t0) / len(TASKS)
  served = lj.stack_adapters(adapters)
  # one batch: rows of each task routed to its adapter, and rows for the base
  per = max(2, ev.batch // 4)
  rows, route = [], []
  for i, t in enumerate(TASKS):
    rows += ev.examples[t][:per]
    route += [i] * per
  rows += ev.examples[TASKS[0]][:per]
  route += [-1] * per
  ids = jnp.asarray(route, jnp.int32)
  mixed = story.predict(lj.with_adapter_ids(served, ids), config, tok, rows,
                        batch_size=len(rows))
  # exactness: the served batch's logits equal each row's adapter (or the base) alone;
  # greedy answers may still differ where two tokens nearly tie (an untrained toy model),
  # so those are counted, not required
  ids_np, mask_np, _ = next(story._prompt_batches(tok, [r["prompt"] for r in rows], len(rows)))
  x, m = jnp.asarray(ids_np), jnp.asarray(mask_np)
  fwd = lj.implicit(models.forward)
  got = np.asarray(fwd(lj.with_adapter_ids(served, ids), config, x, attention_mask=m))
  worst, same = 0.0, 0
  for i in sorted(set(route)):
    sel = np.asarray([k for k, j in enumerate(route) if j == i])
    own = np.asarray(fwd(base_params if i < 0 else adapters[i], config, x[sel],
                         attention_mask=m[sel]))
    valid = mask_np[sel].astype(bool)
    worst = max(worst, float(np.abs(got[sel] - own)[valid].max()))
    ans = story.predict(base_params if i < 0 else adapters[i], config, tok,
                        [rows[k] for k in sel], batch_size=len(rows))
    same += sum(mixed[k] == ans[n] for n, k in enumerate(sel))
  ok = worst < 1e-4
  correct = {t: np.mean([mixed[k] == rows[k]["completion"] for k in range(len(rows))
                         if route[k] == i]) for i, t in enumerate(TASKS)}
  print(f"  one batch of {len(rows)} rows over {len(adapters)} adapters + the base: logits "
        f"equal each row's adapter alone (max |diff| {worst:.1e}): {ok}; greedy answers "
        f"equal on {same}/{len(rows)} rows; exact match per task "
        + ", ".join(f"{t} {a:.0%}" for t, a in correct.items()))
  timing = serve_timing(served, adapters, base_params, config, tok, rows, route)
  adapter_bytes = sum(nbytes(lj.split(a)[0]) for a in adapters)
  merged_bytes = len(adapters) * nbytes(base_params)
  print(f"  switching customers: load one adapter {load_adapter_s * 1e3:.0f} ms, load a "
        f"merged model {load_model_s * 1e3:.0f} ms ({load_model_s / load_adapter_s:.1f}x)")
  print(f"  memory: base + {len(adapters)} adapters "
        f"{(nbytes(base_params) + adapter_bytes) / 2**20:.2f} MiB, {len(adapters)} merged "
        f"copies {merged_bytes / 2**20:.2f} MiB")
  return {"rows_equal_alone": bool(ok), "max_logit_diff": worst,
          "answers_equal_alone": int(same), "rows": len(rows), "correct": correct, **timing,
          "load_adapter_s": load_adapter_s, "load_model_s": load_model_s,
          "adapter_bytes": adapter_bytes, "base_bytes": nbytes(base_params),
          "merged_bytes": merged_bytes}


def serve_timing(served, adapters, base_params, config, tok, rows, route) -> dict:
  """Tokens/s of one generate call: the mixed batch, the base alone on the same batch,
  and the adapters one at a time (a batch per adapter)."""
  new = 4
  prompts = [tok.encode(r["prompt"], True) for r in rows]
  T = max(map(len, prompts))
  ids = np.zeros((len(rows), T), np.int32)
  mask = np.zeros((len(rows), T), np.int32)
  for k, p in enumerate(prompts):
    ids[k, T - len(p):], mask[k, T - len(p):] = p, 1
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  def timed(params, x, m, reps=3):
    models.generate(params, config, x, new, attention_mask=m).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
      models.generate(params, config, x, new, attention_mask=m).block_until_ready()
    return (time.perf_counter() - t0) / reps

  route = jnp.asarray(route, jnp.int32)
  t_mixed = timed(lj.with_adapter_ids(served, route), ids, mask)
  t_base = timed(base_params, ids, mask)
  t_each = sum(timed(a, ids[route == i], mask[route == i]) for i, a in enumerate(adapters))
  n = len(rows) * new
  out = {"tok_s_mixed": n / t_mixed, "tok_s_base": n / t_base,
         "tok_s_one_at_a_time": int((route >= 0).sum()) * new / t_each}
  print(f"  decode tokens/s: mixed batch {out['tok_s_mixed']:.0f}, base alone "
        f"{out['tok_s_base']:.0f} ({out['tok_s_mixed'] / out['tok_s_base']:.2f}x), one "
        f"adapter at a time {out['tok_s_one_at_a_time']:.0f}")
  return out


# ----------------------------------------------------------------------------
# 6. summary and plots

def plots(runs, ev: Evaluator, quant: dict, serving: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in runs.items():
    ax.plot([m["step"] for m in r["metrics"]], [m["loss"] for m in r["metrics"]], label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats / target token)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(OUT / "loss.png", dpi=100)
  plt.close(fig)
  names = list(ev.acc)
  grid = np.array([[ev.acc[n][t] for t in TASKS] for n in names])
  fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(TASKS)), TASKS)
  ax.set_yticks(range(len(names)), names)
  for i in range(len(names)):
    for j in range(len(TASKS)):
      ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center",
              color="w" if grid[i, j] < 0.6 else "k", fontsize=8)
  fig.colorbar(im, ax=ax, label="exact match")
  fig.tight_layout()
  fig.savefig(OUT / "accuracy.png", dpi=100)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bars = {f"{k} model": v[1] / 2**20 for k, v in quant.items()}
  bars["base + 3 adapters"] = (serving["base_bytes"] + serving["adapter_bytes"]) / 2**20
  bars["3 merged copies"] = serving["merged_bytes"] / 2**20
  ax.barh(list(bars), list(bars.values()))
  ax.set_xlabel("MiB")
  fig.tight_layout()
  fig.savefig(OUT / "memory.png", dpi=100)
  plt.close(fig)


def summary(ev: Evaluator, serving: dict) -> dict:
  banner("6. summary: exact match on held-out problems")
  print(f"  {'model':28s}" + "".join(f"{t:>8s}" for t in TASKS) + f"{'tasks >= 80%':>14s}")
  for name, row in ev.acc.items():
    good = sum(a >= 0.8 for a in row.values())
    print(f"  {name:28s}" + "".join(f"{a:8.1%}" for a in row.values()) + f"{good:>14d}")
  base = ev.acc["base"]
  own = {t: ev.acc[f"{t} adapter"][t] for t in TASKS}
  merges = {n: r for n, r in ev.acc.items() if "merge" in n}
  best = max(merges, key=lambda n: np.mean(list(merges[n].values()))) if merges else None
  print(f"\n  each task adapter on its own task vs the base: "
        + ", ".join(f"{t} {base[t]:.0%} -> {own[t]:.0%}" for t in TASKS))
  if best:
    row = merges[best]
    keeps = [t for t in TASKS if row[t] >= 0.8 * own[t]]
    print(f"  best merge: {best}, mean {np.mean(list(row.values())):.0%}; it keeps at least "
          f"80% of the task adapter's accuracy on {len(keeps)} of {len(TASKS)} tasks"
          + (" (does every task)" if len(keeps) == len(TASKS) else
             f" (not on {', '.join(t for t in TASKS if t not in keeps)}: merging "
             "interferes there, the union adapter does better)"))
  print("  (accuracies move by a few points with the seed and the step count; timings with "
        "the machine's load; the served rows' equality to each adapter alone does not)")
  return {"accuracy": ev.acc, "best_merge": best, "serving": serving}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="full")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="demo_out")
  args = ap.parse_args(argv)
  global OUT
  OUT = pathlib.Path(args.out)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  size = SIZES[args.size]
  t0 = time.perf_counter()
  files, base = stage_base(size, args.seed)
  config, base_params = models.load_hf(base)
  tok = tdata.load_tokenizer(base)
  ev = Evaluator(files, tok, config, size)
  ev("base", base_params)
  runs = stage_adapters(files, base, size, args.seed)
  banner("2b. every adapter on every task")
  for t in TASKS + ("all",):
    ev(f"{t} adapter" if t != "all" else "union adapter (all tasks)",
       lj.load_adapter(runs[t]["dir"] / "adapter", base_params, config=config))
  stage_merges(runs, base_params, config, ev, args.seed)
  quant = stage_quantized(files, base, size, args.seed, ev, runs)
  serving = stage_serving(runs, base_params, config, tok, ev)
  result = summary(ev, serving)
  plots(runs, ev, quant, serving)
  result["seconds"] = time.perf_counter() - t0
  (OUT / "summary.json").write_text(json.dumps(result, indent=1, default=float))
  print(f"\ndemo: done in {result['seconds']:.0f} s; plots demo_out/loss.png, accuracy.png, "
        f"memory.png; numbers in {OUT / 'summary.json'}")
  if not serving["rows_equal_alone"]:
    raise SystemExit("demo: a served row differs from its adapter alone")
  return result


if __name__ == "__main__":
  main()
