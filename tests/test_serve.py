"""`lora-jax serve`: the engine against `models.generate` with each adapter alone, and
the real HTTP server in a subprocess on 127.0.0.1 driven by the `openai` client (raw
HTTP for the errors). Every wait is bounded in time."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import train_testing as tt
from lora_jax import models
from serving.bank import AdapterBank
from serving.engine import Engine, Request, Sampling
from training.data import prompt_ids, load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def _random_b(params, seed):
  def fill(x):
    if isinstance(x, lj.LoraWeight):   # DoRA / QA-LoRA too: b = 0 would serve the base
      return dataclasses.replace(x, b=0.4 * jax.random.normal(jax.random.key(seed), x.b.shape,
                                                              x.b.dtype))
    return x
  return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def _adapter(base, seed, rank, targets=TARGETS, **kw):
  from lora_jax.models import decoder
  if decoder.is_stacked(base):
    kw["layouts"] = decoder.STACKED_LAYOUTS
  cfg = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, **kw)
  return _random_b(lj.init(jax.random.key(seed), base, cfg), 100 + seed), cfg


def _greedy(params, config, prompt, n, eos=()):
  """`models.generate` alone, cut after the first eos (which the server does not send)."""
  out = np.asarray(models.generate(params, config, jnp.asarray([prompt]), n))[0].tolist()
  for i, t in enumerate(out):
    if t in eos:
      return out[:i]
  return out


def _run_engine(engine, jobs, timeout=240.0):
  """Submit (key, prompt, adapter, n) jobs greedily; step until done. -> {key: tokens}."""
  got, reasons = {}, {}
  for key, prompt, adapter, n in jobs:
    toks = got.setdefault(key, [])
    engine.submit(Request(prompt=prompt, sampling=Sampling(max_tokens=n, temperature=0.0),
                          adapter=adapter, on_token=lambda t, toks=toks: toks.append(t) or True,
                          on_done=lambda r, e, key=key: reasons.__setitem__(key, (r, e))))
  t0 = time.monotonic()
  while engine.busy():
    assert time.monotonic() - t0 < timeout, "engine did not finish in time"
    engine.step()
  assert all(r == "length" for r, _ in reasons.values()), reasons
  return got


# ------------------------------------------------------------------------------------
# the engine in process: every base kind and adapter kind the server takes

def _case(kind, tmp_path):
  import quantization as qz
  model_type = {"mistral_window": "mistral", "gemma2": "gemma2"}.get(kind, "llama")
  root = tt.make_base(tmp_path / "base", model_type=model_type,
                      hidden=64 if kind == "int4_qalora" else 32)
  if kind == "gemma2":      # Gemma 2's own options: sandwich norms, soft-capping, windows
    from lora_jax.models import decoder
    hf = json.loads((root / "config.json").read_text())
    hf.update(sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh")
    hf.pop("hidden_act", None)
    cfg = decoder.DecoderConfig.from_hf(hf)
    models.save_hf(root, cfg, models.init_params(jax.random.key(3), cfg))
  if kind == "mistral_window":      # a sliding window shorter than the sequences
    cfg = json.loads((root / "config.json").read_text())
    cfg["sliding_window"] = 6
    (root / "config.json").write_text(json.dumps(cfg))
  config, base = models.load_hf(root, stacked=(kind == "stacked"))
  if kind == "nf4":
    base = qz.quantize(base, qz.QuantConfig(format="nf4", block_size=32,
                                            targets=r"layers/.*_proj/kernel"))
  if kind == "int4_qalora":
    base = qz.quantize(base, qz.QuantConfig(format="int4", block_size=32, symmetric=False,
                                            targets=r"layers/.*_proj/kernel"))
    ads = [_adapter(base, s, 2, r".*(q|v|up)_proj/kernel", use_qalora=True,
                    qalora_group_size=32)[0] for s in (1, 2)]
  elif kind in ("nf4", "dense"):
    ads = [_adapter(base, 1, 2)[0], _adapter(base, 2, 8, r".*(q|v)_proj/kernel")[0],
           _adapter(base, 3, 4, r".*(up|down)_proj/kernel", use_dora=True)[0]]
  else:
    ads = [_adapter(base, 1, 2)[0], _adapter(base, 2, 4, r".*(q|v)_proj/kernel")[0]]
  return config, base, ads


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "stacked", "nf4", "int4_qalora", "gemma2"])
def test_engine_rows_equal_generate_with_each_adapter_alone(kind, tmp_path):
  """More requests than rows and more adapters than slots (eviction), prompts of mixed
  lengths: every request's greedy tokens equal `models.generate` with its adapter alone;
  decode compiles once, adapters load without compiling again."""
  config, base, ads = _case(kind, tmp_path)
  bank = AdapterBank(base, config, slots=len(ads) - 1, max_rank=8)
  names = [f"a{i}" for i in range(len(ads))]
  for n, t in zip(names, ads):
    bank.register_tree(n, t)
  engine = Engine(config, bank, max_batch=3, max_len=40)
  rng = np.random.default_rng(0)
  jobs = []
  lengths = [3, 13, 6, 10]          # mixed across the batch's rows
  for k in range(8):
    i = k % (len(names) + 1)
    # one prompt length and token count per adapter: the references `generate` then
    # compile once per adapter, not once per request
    prompt = [1] + rng.integers(7, 40, size=lengths[i]).tolist()
    jobs.append((k, prompt, ([None] + names)[i], 9 + i % 3))
  got = _run_engine(engine, jobs)
  for k, prompt, adapter, n in jobs:
    params = base if adapter is None else ads[names.index(adapter)]
    assert got[k] == _greedy(params, config, prompt, n), (kind, k, adapter)
  assert engine.traces["decode"] == 1, engine.traces
  assert bank.loads >= len(ads) > bank.slots    # more adapters than slots: evictions
  assert all(v == 1 for v in engine.traces.values()), engine.traces


def test_sampling_is_per_request_and_reproducible(tmp_path):
  """A seeded sampled request gives the same tokens alone or beside others; greedy rows
  beside it are unchanged; top_k=1 is greedy at any temperature."""
  config, base, ads = _case("dense", tmp_path)
  bank = AdapterBank(base, config, slots=2, max_rank=8)
  bank.register_tree("a0", ads[0])
  engine = Engine(config, bank, max_batch=4, max_len=40)

  def run(reqs):
    out = {}
    for key, prompt, adapter, s in reqs:
      toks = out.setdefault(key, [])
      engine.submit(Request(prompt=prompt, sampling=s, adapter=adapter,
                            on_token=lambda t, toks=toks: toks.append(t) or True,
                            on_done=lambda r, e: None))
    t0 = time.monotonic()
    while engine.busy():
      assert time.monotonic() - t0 < 120
      engine.step()
    return out

  p = [1, 10, 11, 12, 13]
  hot = Sampling(max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
  alone = run([("s", p, "a0", hot)])["s"]
  mixed = run([("g", p, None, Sampling(max_tokens=12, temperature=0.0)), ("s", p, "a0", hot),
               ("o", [1, 20, 21], "a0", Sampling(max_tokens=12, temperature=1.0, seed=1))])
  assert mixed["s"] == alone
  assert mixed["g"] == _greedy(base, config, p, 12)
  k1 = run([("k", p, "a0", Sampling(max_tokens=12, temperature=1.7, top_k=1, seed=3))])["k"]
  assert k1 == _greedy(ads[0], config, p, 12)
  other = run([("s", p, "a0", dataclasses.replace(hot, seed=8))])["s"]
  assert other != alone           # 12 tokens at temperature 1.5: a different seed differs


def test_sample_rows_top_k_top_p_keep_the_right_tokens():
  from serving.sampling import sample_rows
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4, jnp.float32))
  seen = [set(), set(), set(), set()]
  for n in range(200):
    t = sample_rows(logits, jnp.asarray([1.0, 1.0, 1.0, 0.0]), jnp.asarray([2, 0, 0, 0]),
                    jnp.asarray([1.0, 0.7, 0.85, 1.0]), jnp.asarray([1, 2, 3, 4], jnp.uint32),
                    jnp.full((4,), n, jnp.int32))
    for i, x in enumerate(np.asarray(t)):
      seen[i].add(int(x))
  assert seen[0] == {0, 1}            # top_k 2
  assert seen[1] == {0, 1}            # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 reaches it
  assert seen[2] == {0, 1, 2}         # top_p 0.85
  assert seen[3] == {0}               # temperature 0: argmax


def test_bank_refuses_what_it_cannot_serve(tmp_path):
  from serving.bank import AdapterError, BankFull
  config, base, ads = _case("dense", tmp_path)
  bank = AdapterBank(base, config, slots=1, max_rank=4)
  with pytest.raises(AdapterError, match=r"has rank 8; this server's bank holds rank <= 4"):
    bank.register_tree("big", ads[1])
  emb, _ = _adapter(base, 5, 2, r"embed_tokens/embedding")
  with pytest.raises(AdapterError, match=r"adapts \['embed_tokens/embedding'\], which this "
                                         r"server's bank does not hold"):
    bank.register_tree("emb", emb)
  bank.register_tree("a", ads[0])
  bank.register_tree("b", ads[0])
  slot = bank.acquire("a")
  with pytest.raises(BankFull):
    bank.acquire("b")
  bank.release(slot)
  assert bank.acquire("b") == slot and bank.resident() == {"b": slot}


def test_no_bank_serves_the_base_alone(tmp_path):
  """`--max-adapters 0`: the steps hold no LoRA work at all, and still equal generate."""
  from serving.bank import AdapterError
  config, base, ads = _case("dense", tmp_path)
  bank = AdapterBank(base, config, slots=0, max_rank=8)
  assert bank.served is base
  with pytest.raises(AdapterError, match="no adapter slots"):
    bank.register("x", tmp_path)
  engine = Engine(config, bank, max_batch=2, max_len=40)
  jobs = [(k, [1, 9 + k, 10], None, 6) for k in range(3)]
  got = _run_engine(engine, jobs)
  for k, prompt, _, n in jobs:
    assert got[k] == _greedy(base, config, prompt, n)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(tmp_path):
  config, base, ads = _case("dense", tmp_path)
  bank = AdapterBank(base, config, slots=1, max_rank=8)
  bank.register_tree("a0", ads[0])
  engine = Engine(config, bank, max_batch=2, max_len=40)
  ends = []
  boom = [True]
  real = engine._decode

  def flaky(*a):
    if boom[0]:
      boom[0] = False
      raise RuntimeError("device lost")
    return real(*a)
  engine._decode = flaky
  engine.submit(Request(prompt=[1, 9, 10], sampling=Sampling(max_tokens=5, temperature=0.0),
                        on_token=lambda t: True, on_done=lambda r, e: ends.append((r, e))))
  stop = threading.Event()
  t = threading.Thread(target=engine.run, args=(stop,), daemon=True)
  t.start()
  t0 = time.monotonic()
  while not ends and time.monotonic() - t0 < 60:
    time.sleep(0.05)
  assert ends == [("error", "RuntimeError: device lost")]
  got = []
  engine.submit(Request(prompt=[1, 9, 10], sampling=Sampling(max_tokens=5, temperature=0.0),
                        adapter="a0", on_token=lambda t: got.append(t) or True,
                        on_done=lambda r, e: ends.append((r, e))))
  while len(ends) < 2 and time.monotonic() - t0 < 120:
    time.sleep(0.05)
  stop.set()
  t.join(timeout=30)
  assert ends[1] == ("length", None) and got == _greedy(ads[0], config, [1, 9, 10], 5)
  assert bank._pins == [0]          # the failed request released nothing it did not hold


# ------------------------------------------------------------------------------------
# the HTTP server

N_ADAPTERS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A tiny base, 8 adapters (ranks 1-8, LoRA / rsLoRA / DoRA, different targets) and a
  server over them with 4 slots, started with `lora-jax serve` in a subprocess."""
  root = tmp_path_factory.mktemp("serve")
  base_dir = tt.make_base(root / "base")
  config, base = models.load_hf(base_dir)
  adapters = root / "adapters"
  trees = {}
  for i in range(N_ADAPTERS):
    targets = [TARGETS, r".*(q|v)_proj/kernel", r".*(up|down)_proj/kernel"][i % 3]
    kw = {"use_dora": True} if i % 4 == 3 else ({"rslora": True} if i % 4 == 1 else {})
    tree, cfg = _adapter(base, i, 1 + i, targets, **kw)
    lj.save_adapter(adapters / f"task{i}", tree, cfg)
    trees[f"task{i}"] = lj.load_adapter(adapters / f"task{i}", base)
  other = tt.make_base(root / "other", hidden=48)        # another base: other shapes
  _, obase = models.load_hf(other)
  tree, cfg = _adapter(obase, 0, 2)
  lj.save_adapter(adapters / "other_base" / "x", tree, cfg)   # not at the top: not listed
  env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": tt.xla_flags(1)}
  proc = subprocess.Popen(
      [sys.executable, "-c", "from merging.cli import main; raise SystemExit(main())",
       "serve", "--model", str(base_dir), "--adapters", str(adapters), "--max-adapters", "4",
       "--max-rank", "8", "--max-batch", "6", "--max-model-len", "64", "--port", "0"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  url = _wait_for_url(proc)
  tok = load_tokenizer(base_dir)
  yield {"url": url, "proc": proc, "config": config, "base": base, "trees": trees,
         "tok": tok, "root": root, "base_name": "base"}
  if proc.poll() is None:
    proc.kill()
    proc.wait(timeout=30)


def _wait_for_url(proc, timeout=120.0) -> str:
  box = {}

  def read():
    for line in proc.stdout:
      if "http://" in line:
        box["url"] = line.strip().rsplit(" ", 1)[-1]
        return
  t = threading.Thread(target=read, daemon=True)
  t.start()
  t.join(timeout)
  if "url" not in box:
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()[-3000:]}")
  url = box["url"]
  t0 = time.monotonic()
  while time.monotonic() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
    try:
      with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as r:
        if r.status == 200:
          return url
    except OSError:
      time.sleep(0.2)
  raise AssertionError("server never became healthy")


def _client(served):
  import openai
  return openai.OpenAI(base_url=served["url"], api_key="none", timeout=120.0, max_retries=0)


def _raw(served, path, body: bytes | dict | None = None, method="POST"):
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(served["url"].removesuffix("/v1") + path, data=data,
                               method=method, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _health(served):
  return _raw(served, "/health", method="GET")[1]


def _expected(served, model, prompt_ids, n):
  params = served["base"] if model == "base" else served["trees"][model]
  eos = () if served["tok"].eos_id is None else (served["tok"].eos_id,)
  return served["tok"].decode(_greedy(params, served["config"], prompt_ids, n, eos),
                              skip_special_tokens=True)


PROMPTS = ["12+7=", "abc ", "9+9=", "hello ", "3+41=", "zz", "x=", "7+7="]


@pytest.mark.slow
def test_models_lists_the_base_and_every_adapter(served):
  ids = [m.id for m in _client(served).models.list().data]
  assert ids == ["base"] + sorted(f"task{i}" for i in range(N_ADAPTERS))


@pytest.mark.slow
def test_greedy_completions_equal_generate_with_the_adapter_alone(served):
  c = _client(served)
  for model in ["base", "task0", "task3", "task5"]:
    prompt = PROMPTS[len(model) % len(PROMPTS)]
    r = c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0.0)
    want = _expected(served, model, prompt_ids(served["tok"], prompt), 10)
    assert r.choices[0].text == want, model
    assert r.usage.prompt_tokens == len(prompt_ids(served["tok"], prompt))


@pytest.mark.slow
def test_32_concurrent_requests_over_8_adapters_with_4_slots(served):
  c = _client(served)
  before = _health(served)
  jobs = [(f"task{k % N_ADAPTERS}", PROMPTS[k % len(PROMPTS)], 6 + k % 5) for k in range(32)]

  def one(job):
    model, prompt, n = job
    return c.completions.create(model=model, prompt=prompt, max_tokens=n,
                                temperature=0.0).choices[0]
  with concurrent.futures.ThreadPoolExecutor(32) as ex:
    results = list(ex.map(one, jobs, timeout=300))
  for (model, prompt, n), ch in zip(jobs, results):
    want = _expected(served, model, prompt_ids(served["tok"], prompt), n)
    assert ch.text == want, (model, prompt)
    assert ch.finish_reason in ("length", "stop")
  after = _health(served)
  assert after["adapter_loads"] - before["adapter_loads"] >= N_ADAPTERS - 4   # evictions
  assert len(after["resident"]) <= 4
  assert after["compiles"]["decode"] == 1, after["compiles"]   # loads never recompile
  assert after["running"] == 0 and after["waiting"] == 0


@pytest.mark.slow
def test_streaming_gives_the_same_text_completions_and_chat(served):
  c = _client(served)
  for model in ["base", "task1"]:
    full = c.completions.create(model=model, prompt="5+6=", max_tokens=12, temperature=0.0)
    parts = [ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="5+6=", max_tokens=12, temperature=0.0, stream=True)]
    assert "".join(parts) == full.choices[0].text and len(parts) > 2
  msgs = [{"role": "user", "content": "2+2?"}]
  full = c.chat.completions.create(model="task2", messages=msgs, max_tokens=10, temperature=0)
  tok = served["tok"]
  ids = tok.encode(tok.render_chat(msgs, add_generation_prompt=True), add_special_tokens=False)
  assert full.choices[0].message.content == _expected(served, "task2", ids, 10)
  chunks = list(c.chat.completions.create(model="task2", messages=msgs, max_tokens=10,
                                          temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
      full.choices[0].message.content


@pytest.mark.slow
def test_stop_strings_and_seeded_sampling(served):
  c = _client(served)
  for model, prompt in ((m, p) for m in ("task4", "task0", "base") for p in PROMPTS):
    text = c.completions.create(model=model, prompt=prompt, max_tokens=20,
                                temperature=0.0).choices[0].text
    if len(text) >= 4:      # a random tiny model: find a completion long enough to cut
      break
  assert len(text) >= 4, text
  stop = text[2:4]
  r = c.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0.0,
                           stop=["never there", stop])
  assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
  kw = dict(model="task4", prompt="ab", max_tokens=16, temperature=1.2, top_p=0.95, seed=11)
  a, b = (c.completions.create(**kw).choices[0].text for _ in range(2))
  assert a == b


@pytest.mark.slow
def test_a_cancelled_stream_frees_its_row_and_slot(served):
  import httpx2 as httpx
  body = {"model": "task6", "prompt": "1+1=", "max_tokens": 55, "stream": True,
          "temperature": 0.0, "ignore_eos": True}
  with httpx.Client(timeout=60) as h:
    with h.stream("POST", served["url"] + "/completions", json=body) as r:
      assert r.status_code == 200
      it = r.iter_lines()
      got = [next(it) for _ in range(3)]
      assert all(g.startswith("data: ") or g == "" for g in got)
      assert _health(served)["running"] >= 1
  t0 = time.monotonic()
  while _health(served)["running"]:
    assert time.monotonic() - t0 < 30, _health(served)
    time.sleep(0.2)
  r = _client(served).completions.create(model="task6", prompt="1+1=", max_tokens=3,
                                         temperature=0.0)
  assert r.choices[0].text == _expected(served, "task6", prompt_ids(served["tok"], "1+1="), 3)


@pytest.mark.slow
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(served):
  s, e = _raw(served, "/v1/completions", {"model": "nope", "prompt": "a"})
  assert s == 404 and "`nope` does not exist" in e["error"]["message"]
  s, e = _raw(served, "/v1/completions", b'{"model": "base", "prompt": "a",,}')
  assert s == 400 and "not valid JSON" in e["error"]["message"]
  s, e = _raw(served, "/v1/completions", b'{"model": "base", "model": "task0", "prompt": "a"}')
  assert s == 400 and "appears twice" in e["error"]["message"]
  s, e = _raw(served, "/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 100})
  assert s == 400 and "context is 64 tokens" in e["error"]["message"]
  s, e = _raw(served, "/v1/completions", {"model": "base", "prompt": "a" * 80})
  assert s == 400 and "the prompt has" in e["error"]["message"]
  s, e = _raw(served, "/v1/completions", {"model": "base", "prompt": "a", "temperature": "hot"})
  assert s == 400 and e["error"]["param"] == "temperature"
  s, e = _raw(served, "/v1/completions", {"model": "base", "prompt": "a", "n": 3})
  assert s == 400 and e["error"]["param"] == "n"
  s, e = _raw(served, "/v1/chat/completions", {"model": "base", "messages": [{"role": 1}]})
  assert s == 400
  # an adapter for another base: refused at load, with the shapes named
  s, e = _raw(served, "/v1/load_lora_adapter", {"lora_name": "bad",
                                                 "lora_path": "other_base/x"})
  assert s == 400 and "does not fit this server's base" in e["error"]["message"]
  s, e = _raw(served, "/v1/load_lora_adapter", {"lora_name": "esc", "lora_path": "../base"})
  assert s == 400 and "not inside" in e["error"]["message"]
  assert _raw(served, "/v1/completions", {"model": "bad", "prompt": "a"})[0] == 404
  # registered at run time, served, unloaded
  s, e = _raw(served, "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": "task2"})
  assert s == 200, e
  r = _client(served).completions.create(model="again", prompt="ab", max_tokens=5,
                                         temperature=0.0)
  assert r.choices[0].text == _expected(served, "task2", prompt_ids(served["tok"], "ab"), 5)
  assert _raw(served, "/v1/unload_lora_adapter", {"lora_name": "again"})[0] == 200
  assert _raw(served, "/v1/completions", {"model": "again", "prompt": "a"})[0] == 404
  r = _client(served).completions.create(model="base", prompt="ab", max_tokens=4,
                                         temperature=0.0)
  assert r.choices[0].text == _expected(served, "base", prompt_ids(served["tok"], "ab"), 4)


@pytest.mark.slow
def test_shutdown_is_clean(served):
  """Runs last in this module (pytest keeps file order): SIGTERM stops the server with
  exit code 0 and its goodbye line."""
  proc = served["proc"]
  proc.send_signal(signal.SIGTERM)
  try:
    rc = proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert rc == 0, proc.stderr.read()[-3000:]
  assert "lora-jax serve: stopped" in proc.stderr.read()
