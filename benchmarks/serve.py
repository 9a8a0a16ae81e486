"""`lora-jax serve` under load, on localhost, beside PEFT + transformers, in one run.

Model: a random Llama (hidden 256, 4 layers, 8 heads, intermediate 688, float32) with the
demo's character tokenizer, written as a Hugging Face directory; 64 PEFT adapters of
rank 16 (alpha 32) on every projection, each with a random non-zero `b`.

1. The server (`lora-jax serve --max-adapters 8 --max-batch 16`) in a subprocess; a load
   generator sends `--requests` completions (prompts of 8-24 characters, `--max-tokens`
   new tokens each, greedy, `ignore_eos`) from `--concurrency` client threads, for:
   the base alone (a server with no bank, `--max-adapters 0`); the base's rows through
   the bank (adapter id -1); one adapter; 8 and 64 adapters with uniform popularity; 8 and 64
   with skewed popularity (Zipf, exponent 1, as S-LoRA and Punica report). It prints
   completion tokens/s and p50/p99 request latency, and the ratio to the base alone
   (target with 8 adapters: >= 0.8x). 64 adapters over 8 slots means evictions: each
   miss is a cold load from the host cache (or disk) into the bank.
2. PEFT + transformers on the same requests: a `PeftModel` holding the same 64 adapters,
   `generate(..., adapter_names=[...])` on batches of `--concurrency` requests in arrival
   order (its mixed-adapter batch), greedy, `--max-tokens` new tokens; torch on 2 threads.
3. Cold load: an adapter from disk to usable in the bank (`AdapterBank.parse` + `acquire`,
   i.e. read safetensors, pad, copy into a slot) against loading the merged full model
   (`models.load_hf` of its saved merged checkpoint), medians of 5; for the served model
   and for a larger one (`--cold-hidden 1024 --cold-layers 8`, ~100M parameters), since
   the switching argument is about models whose weights take long to read.
4. The engine's decode step (16 rows, 8 adapters) in process, against its limit on this
   machine: max(FLOPs / the measured f32 matmul rate, bytes / the measured memory
   bandwidth), bytes being the weights, the bank's gathered factors and the KV cache.

    .venv/bin/python benchmarks/serve.py [--requests 64] [--concurrency 16] [--max-tokens 32]
                                         [--no-peft] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import models  # noqa: E402

TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def build(root: pathlib.Path, n_adapters: int, hidden: int, layers: int):
  import story_data
  base_dir = root / "base"
  base_dir.mkdir(parents=True)
  story_data.write_tokenizer(base_dir)
  vocab = story_data.build_tokenizer().get_vocab_size()
  cfg = models.DecoderConfig(vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=128, model_type="llama")
  params = models.init_params(jax.random.key(0), cfg)
  models.save_hf(base_dir, cfg, params)
  config, base = models.load_hf(base_dir)
  lcfg = lj.LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
  trees = {}
  for i in range(n_adapters):
    p = lj.init(jax.random.key(1 + i), base, lcfg)
    p = jax.tree.map(lambda x: x.replace_children(b=0.05 * jax.random.normal(
        jax.random.key(1000 + i), x.b.shape)) if isinstance(x, lj.LoraWeight) else x, p,
        is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    lj.save_adapter(root / "adapters" / f"a{i}", p, lcfg)
    trees[f"a{i}"] = p
  models.save_hf(root / "merged", config, lj.merge(trees["a0"]))
  return base_dir, config, base, trees


def workload(n: int, models_: list[str], skew: bool, seed: int) -> list[tuple[str, str]]:
  rng = random.Random(seed)
  weights = [1.0 / (k + 1) for k in range(len(models_))] if skew else None
  chars = "abcdefghijklmnopqrstuvwxyz0123456789+= "
  return [(rng.choices(models_, weights)[0],
           "".join(rng.choice(chars) for _ in range(rng.randint(8, 24)))) for _ in range(n)]


def start_server(base_dir, adapters, slots, batch):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen(
      [sys.executable, "-c", "from merging.cli import main; raise SystemExit(main())", "serve",
       "--model", str(base_dir), "--adapters", str(adapters), "--max-adapters", str(slots),
       "--max-rank", "16", "--max-batch", str(batch), "--max-model-len", "128", "--port", "0"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if "http://" not in line:
    raise SystemExit(f"server did not start: {line} {proc.stderr.read()[-2000:]}")
  url = line.strip().rsplit(" ", 1)[-1]
  t0 = time.monotonic()
  while time.monotonic() - t0 < 300:        # bound, not listening until uvicorn runs
    if proc.poll() is not None:
      raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
    try:
      with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5):
        return proc, url
    except OSError:
      time.sleep(0.2)
  raise SystemExit("server never became healthy")


def post(url, body, timeout=600):
  req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return json.loads(r.read())


def run_load(url, jobs, concurrency, max_tokens):
  """(completion tokens / s, p50 s, p99 s) of `jobs` sent from `concurrency` threads."""
  lat = []

  def one(job):
    model, prompt = job
    t = time.perf_counter()
    r = post(url, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0.0, "ignore_eos": True})
    lat.append(time.perf_counter() - t)
    return r["usage"]["completion_tokens"]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
    toks = sum(ex.map(one, jobs))
  wall = time.perf_counter() - t0
  lat.sort()
  return toks / wall, statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def peft_run(root, config, jobs, concurrency, max_tokens):
  import torch
  import transformers
  from peft import PeftModel
  torch.set_num_threads(2)
  m = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"),
                                                        attn_implementation="sdpa").eval()
  names = sorted({n for n, _ in jobs if n != "base"}, key=lambda s: int(s[1:]))
  pm = None
  for n in names:
    if pm is None:
      pm = PeftModel.from_pretrained(m, str(root / "adapters" / n), adapter_name=n)
    else:
      pm.load_adapter(str(root / "adapters" / n), adapter_name=n)
  pm = (pm or m).eval()
  from training.data import prompt_ids, load_tokenizer
  tok = load_tokenizer(root / "base")
  t0 = time.perf_counter()
  toks, lat = 0, []
  for i in range(0, len(jobs), concurrency):
    batch = jobs[i:i + concurrency]
    ids = [prompt_ids(tok, p) for _, p in batch]
    P = max(map(len, ids))
    x = torch.tensor([[0] * (P - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in ids])
    kw = {}
    if names:
      kw["adapter_names"] = ["__base__" if n == "base" else n for n, _ in batch]
    with torch.inference_mode():
      out = pm.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens,
                        min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, **kw)
    toks += (out.shape[1] - P) * len(batch)
    lat += [time.perf_counter() - t0] * len(batch)     # static batches: all end together
  wall = time.perf_counter() - t0
  lat.sort()
  return toks / wall, statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def cold_load(root, config, base, n=5):
  from serving.bank import AdapterBank
  bank = AdapterBank(base, config, slots=2, max_rank=16)
  names = [f"a{i}" for i in range(1, 1 + n)]
  for nm in names:
    bank.register(nm, root / "adapters" / nm)
  bank.acquire("a0") if "a0" in bank.sources else None
  t_ad = []
  for nm in names:        # the first includes the bank update's compile: warm it first
    t = time.perf_counter()
    s = bank.acquire(nm)
    jax.block_until_ready(jax.tree.leaves(bank.served))
    t_ad.append(time.perf_counter() - t)
    bank.release(s)
  t_full = []
  for _ in range(n):
    t = time.perf_counter()
    _, p = models.load_hf(root / "merged")
    jax.block_until_ready(p)
    t_full.append(time.perf_counter() - t)
    del p
  return statistics.median(t_ad[1:]), statistics.median(t_full), t_ad[0]


def _mib(path: pathlib.Path) -> str:
  n = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
  return f"{n / 2**20:.1f}"


def matmul_rate():
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
  return 2 * 2048 ** 3 / best


def bandwidth():
  x = jnp.ones((64 << 20,), jnp.float32)              # 256 MiB
  f = jax.jit(lambda x: x * 2.0)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
  return 2 * x.size * 4 / best                       # read + write


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def decode_limit(config, base, root, rows=16, adapters=8, reps=20):
  """(median decode-step seconds, FLOP limit s, byte limit s) for the engine."""
  from serving.bank import AdapterBank
  from serving.engine import Engine
  bank = AdapterBank(base, config, slots=adapters, max_rank=16)
  for i in range(adapters):
    bank.register(f"a{i}", root / "adapters" / f"a{i}")
    bank.acquire(f"a{i}")
  eng = Engine(config, bank, max_batch=rows, max_len=128)
  tokens = jnp.ones((rows,), jnp.int32)
  positions = jnp.full((rows,), 40, jnp.int32)
  valid = np.zeros((rows, 128), bool)
  valid[:, :41] = True
  valid = jnp.asarray(valid)
  ids = jnp.asarray(np.arange(rows) % adapters, jnp.int32)
  samp = (jnp.zeros(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows),
          jnp.zeros(rows, jnp.uint32), jnp.zeros(rows, jnp.int32))
  times = []
  for k in range(reps + 2):
    t = time.perf_counter()
    out, eng.cache = eng._decode(bank.served, config, tokens, positions, valid, ids,
                                 eng.cache, samp)
    out.block_until_ready()
    times.append(time.perf_counter() - t)
  step = statistics.median(times[2:])
  c = config
  lin = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base["layers"]) if x.ndim == 2)
  head = c.vocab_size * c.hidden_size
  r = 16
  lora = sum(r * (x.shape[0] + x.shape[1]) for x in jax.tree.leaves(base["layers"])
             if x.ndim == 2)
  attn = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 128
  flops = 2 * rows * (lin + head + lora) + 2 * rows * attn
  kv = 2 * c.num_hidden_layers * rows * 128 * c.num_key_value_heads * c.head_dim * 4
  bytes_ = 4 * (lin + head) + 4 * rows * lora + kv
  return step, flops / matmul_rate(), bytes_ / bandwidth()


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--concurrency", type=int, default=16)
  ap.add_argument("--max-tokens", type=int, default=32)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--no-peft", action="store_true")
  ap.add_argument("--cold-hidden", type=int, default=1024, help="the cold-load model's width")
  ap.add_argument("--cold-layers", type=int, default=8)
  ap.add_argument("--quick", action="store_true", help="a tiny run (the test's)")
  a = ap.parse_args(argv)
  n_ad = 64
  if a.quick:
    a.requests, a.concurrency, a.max_tokens, a.hidden, a.layers, n_ad = 8, 4, 4, 32, 1, 8
    a.cold_hidden, a.cold_layers = 64, 1
  root = pathlib.Path(tempfile.mkdtemp(prefix="serve_bench_"))
  base_dir, config, base, trees = build(root, n_ad, a.hidden, a.layers)
  scen = [("base via the bank", ["base"], False), ("1 adapter", ["a0"], False),
          ("8 adapters, uniform", [f"a{i}" for i in range(8)], False),
          ("8 adapters, skewed", [f"a{i}" for i in range(8)], True),
          (f"{n_ad} adapters, uniform", [f"a{i}" for i in range(n_ad)], False),
          (f"{n_ad} adapters, skewed", [f"a{i}" for i in range(n_ad)], True)]
  rows = {}
  # the base alone: a server with no bank (--max-adapters 0), no LoRA work in its steps
  proc, url = start_server(base_dir, root / "adapters", slots=0, batch=a.concurrency)
  try:
    for w in ["x" * 8, "x" * 20, "x" * 30]:                                # compile
      post(url, {"model": "base", "prompt": w, "max_tokens": 2})
    rows["base alone"] = run_load(url, workload(a.requests, ["base"], False, seed=1),
                                  a.concurrency, a.max_tokens)
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  proc, url = start_server(base_dir, root / "adapters", slots=8, batch=a.concurrency)
  try:
    post(url, {"model": "a0", "prompt": "warm up", "max_tokens": 2})     # compile
    for i, w in enumerate(["x" * 8, "x" * 20, "x" * 30]):                  # prefill buckets
      post(url, {"model": "base", "prompt": w, "max_tokens": 2})
    for name, ms, skew in scen:
      jobs = workload(a.requests, ms, skew, seed=1)
      rows[name] = run_load(url, jobs, a.concurrency, a.max_tokens)
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
      health = json.loads(r.read())
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  print(f"\nserver: {a.requests} requests x {a.max_tokens} tokens, {a.concurrency} clients, "
        f"8 bank slots, Llama hidden {a.hidden} x {a.layers} layers, rank 16 adapters")
  print(f"{'workload':<24} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'vs base':>8}")
  b = rows["base alone"][0]
  for name, (tps, p50, p99) in rows.items():
    print(f"{name:<24} {tps:8.1f} {p50:7.2f} {p99:7.2f} {tps / b:8.2f}x")
  print(f"server counters: adapter loads {health['adapter_loads']}, compiles "
        f"{health['compiles']}")
  out = {"server": rows, "health": health}
  if not a.no_peft:
    peft = {}
    for name, ms, skew in scen:
      if name in ("base via the bank", "1 adapter", "8 adapters, uniform",
                  f"{n_ad} adapters, uniform"):
        peft[name] = peft_run(root, config, workload(a.requests, ms, skew, seed=1),
                              a.concurrency, a.max_tokens)
    print(f"\nPEFT + transformers, static batches of {a.concurrency}:")
    for name, (tps, p50, p99) in peft.items():
      ours = rows["base alone" if name == "base via the bank" else name][0]
      print(f"{'base alone' if name == 'base via the bank' else name:<24} {tps:8.1f} "
            f"{p50:7.2f} {p99:7.2f}   ours/PEFT {ours / tps:5.2f}x")
    out["peft"] = peft
  t_ad, t_full, t_first = cold_load(root, config, base)
  print(f"\ncold load, disk to usable (this {a.hidden}-wide model, "
        f"{_mib(root / 'merged')} MiB): adapter {t_ad * 1e3:.1f} ms (first, with the bank "
        f"update's compile: {t_first * 1e3:.0f} ms), merged full model {t_full * 1e3:.1f} ms: "
        f"merged / adapter {t_full / t_ad:.1f}x")
  big = root / "big"
  _, bconfig, bbase, _ = build(big, 6, a.cold_hidden, a.cold_layers)
  bt_ad, bt_full, _ = cold_load(big, bconfig, bbase)
  print(f"cold load, a {a.cold_hidden}-wide x {a.cold_layers}-layer model "
        f"({_mib(big / 'merged')} MiB; adapter {_mib(big / 'adapters' / 'a1')} MiB): adapter "
        f"{bt_ad * 1e3:.1f} ms, merged full model {bt_full * 1e3:.1f} ms: "
        f"merged / adapter {bt_full / bt_ad:.1f}x")
  del bbase
  step, flop_s, byte_s = decode_limit(config, base, root, rows=a.concurrency)
  lim = max(flop_s, byte_s)
  print(f"decode step, {a.concurrency} rows over 8 adapters: {step * 1e3:.2f} ms; limit "
        f"{lim * 1e3:.3f} ms (FLOPs {flop_s * 1e3:.3f} ms, bytes {byte_s * 1e3:.3f} ms): "
        f"{step / lim:.1f}x the limit")
  out.update(cold={"adapter_s": t_ad, "merged_s": t_full, "big_adapter_s": bt_ad,
                   "big_merged_s": bt_full}, decode={"step_s": step,
                                                                    "limit_s": lim})
  print("RESULT " + json.dumps(out, default=float))
  return out


if __name__ == "__main__":
  main()
