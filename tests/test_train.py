"""`lora-jax train`: config, loss, steps, checkpoints and resume (kill -9, another mesh),
outputs loading in PEFT."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax import models
from training import config as tconfig
from training import data as tdata
from training import trainer
from training.loss import chunked_loss

import train_testing as tt

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALLEST = """
base_model: path/to/hf-checkpoint
data: train.jsonl
eval_data: eval.jsonl        # optional
output_dir: out/
lora: {r: 16, alpha: 32, targets: all-linear}
max_steps: 200
batch_size: 8
seq_len: 512
learning_rate: 2.0e-4
save_every: 50
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  base = tt.make_base(root / "base")
  tt.write_data(root / "train.jsonl", 160)
  tt.write_data(root / "eval.jsonl", 24, seed=1)
  tt.write_data(root / "chat.jsonl", 64, kind="chat")
  return root


def _cfg(world, out, **kw):
  d = {"base_model": str(world / "base"), "data": str(world / "train.jsonl"),
       "output_dir": str(out), "max_steps": 6, "batch_size": 8, "seq_len": 32,
       "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}, "progress": False}
  for k, v in kw.items():
    if isinstance(v, dict) and isinstance(d.get(k), dict):
      d[k] = {**d[k], **v}
    else:
      d[k] = v
  return d


# ----------------------------------------------------------------------------
# config

def test_the_smallest_config_reads(tmp_path):
  p = tmp_path / "c.yml"
  p.write_text(SMALLEST)
  c = tconfig.load_config(p)
  assert (c.lora.r, c.lora.alpha, c.lora.targets) == (16, 32.0, "all-linear")
  assert (c.max_steps, c.batch_size, c.seq_len, c.save_every) == (200, 8, 512, 50)
  assert c.learning_rate == 2e-4 and c.grad_accum == 1 and c.quantize is None
  # relative paths are the config file's directory's
  assert c.data == str(tmp_path / "train.jsonl") and c.output_dir == str(tmp_path / "out")


@pytest.mark.parametrize("change, match", [
    ({"epochs": 3}, r"unknown key\(s\) 'epochs'; accepted: base_model, data, output_dir, "
                    r"max_steps, eval_data, lora, quantize"),
    ({"lora": {"rank": 8}}, r"lora: unknown key\(s\) 'rank'; accepted: r, alpha, targets"),
    ({"batch_size": "8"}, r"batch_size: expected an integer, got '8'"),
    ({"learning_rate": True}, r"learning_rate: expected a number, got True"),
    ({"remat": "some"}, r"remat: 'some' is not one of none, full, dots, dots_no_batch"),
    ({"quantize": {"format": "nf3"}}, r"quantize.format: 'nf3' is not one of nf4, fp4"),
    ({"mesh": {"data": -1, "model": -1}}, r"at most one is -1"),
    ({"seq_len": 1}, r"seq_len: must be >= 2"),
    ({"fold_qalora": True}, r"fold_qalora: true needs lora.use_qalora: true"),
])
def test_bad_config_keys_and_values_are_named(tmp_path, change, match):
  d = yaml.safe_load(SMALLEST)
  for k, v in change.items():
    d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
  p = tmp_path / "c.yml"
  p.write_text(yaml.safe_dump(d))
  with pytest.raises(ValueError, match=match):
    tconfig.load_config(p)


def test_config_file_errors(tmp_path):
  p = tmp_path / "c.yml"
  p.write_text("base_model: [unclosed")
  with pytest.raises(ValueError, match=r"c\.yml: not a YAML file"):
    tconfig.load_config(p)
  p.write_text("!!python/object/apply:os.system ['echo pwned']")
  with pytest.raises(ValueError, match="not a YAML file"):     # safe_load: data only
    tconfig.load_config(p)
  p.write_text("data: x.jsonl")
  with pytest.raises(ValueError, match=r"missing required key\(s\) 'base_model', "
                                       r"'output_dir', 'max_steps'"):
    tconfig.load_config(p)


# ----------------------------------------------------------------------------
# the loss

@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_the_full_logits_loss(chunk):
  """Values and gradients (hidden states and the head) against log_softmax over the
  whole (tokens, vocab) logits, for chunks that divide, do not divide and exceed N."""
  cfg = models.DecoderConfig(vocab_size=37, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             final_logit_softcapping=5.0)
  params = models.init_params(jax.random.key(0), cfg, std=0.5)
  h = jax.random.normal(jax.random.key(1), (3, 21, 16))
  t = jax.random.randint(jax.random.key(2), (3, 21), 0, 37)
  w = jax.random.bernoulli(jax.random.key(3), 0.6, (3, 21)).astype(jnp.float32)

  def ours(p, h):
    s, n = chunked_loss(p, cfg, h, t, w, chunk)
    return s / n

  def full(p, h):
    logp = jax.nn.log_softmax(models.logits_from_hidden(p, cfg, h).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * w) / jnp.sum(w)

  np.testing.assert_allclose(ours(params, h), full(params, h), rtol=1e-5)
  g1, g2 = jax.grad(ours, argnums=(0, 1))(params, h), jax.grad(full, argnums=(0, 1))(params, h)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_packed_rows_lose_what_their_examples_lose(world):
  """The loss of a packed row is the sum of its examples' losses computed alone (no
  attention across examples, no target across a boundary)."""
  tok = tdata.load_tokenizer(world / "base")
  config, base = models.load_hf(world / "base", stacked=True)
  params = lj.init(jax.random.key(0), base, lj.LoraConfig(
      rank=2, targets="all-linear", layouts=models.decoder.STACKED_LAYOUTS))
  params = jax.tree.map(lambda x: x.replace_children(b=0.2 * jnp.ones_like(x.b))
                        if isinstance(x, lj.LoraWeight) else x, params,
                        is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  exs = [tdata.tokenize_example({"prompt": p, "completion": c}, tok)
         for p, c in (("12+3=", "15"), ("7+40=", "47"), ("1+1=", "2"))]
  packed = tdata.pack(exs, 32, pad_id=0).rows
  assert len(packed["input_ids"]) == 1 and packed["segment_ids"].max() == 3
  s, n = jax.jit(lambda p, b: trainer.loss_terms(p, config, b, "none", 5))(params, packed)
  want_s = want_n = 0.0
  for ids, mask in exs:
    logits = lj.implicit(models.forward)(params, config, jnp.asarray(ids)[None, :-1])
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    nll = -logp[jnp.arange(len(ids) - 1), ids[1:]]
    want_s += float(jnp.sum(nll * mask[1:].astype(np.float32)))
    want_n += float(mask[1:].sum())
  assert float(n) == want_n
  np.testing.assert_allclose(float(s), want_s, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(world, standard_promotion):
  """Two micro-batches of 4 rows update the adapter as one batch of 8 does (the loss
  normalized by the target tokens of both)."""
  c = tconfig.from_dict(_cfg(world, world / "unused", grad_accum=2, batch_size=4))
  c1 = tconfig.from_dict(_cfg(world, world / "unused", grad_accum=1, batch_size=8))
  tok = tdata.load_tokenizer(world / "base")
  rows = trainer.load_rows(c.data, tok, c.seq_len, "training").rows
  config, base = trainer.load_base(c)
  params = trainer.add_adapter(c, jax.random.key(0), base)
  adapter, frozen = lj.split(params)
  outs = []
  for cc, shape in ((c, (2, 4)), (c1, (1, 8))):
    opt, _ = trainer.make_optimizer(cc)
    step = jax.jit(trainer.make_train_step(cc, config, opt, False))
    batch = {k: v[:8].reshape(shape + v.shape[1:]) for k, v in rows.items()}
    outs.append(step(adapter, opt.init(adapter), frozen, batch, jnp.int32(0)))
  np.testing.assert_allclose(outs[0][2], outs[1][2], rtol=1e-5)
  assert float(outs[0][3]) == float(outs[1][3])
  for x, y in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# runs

@pytest.mark.interop
def test_a_run_learns_writes_its_outputs_and_the_adapter_loads_in_peft(world, tmp_path,
                                                                       standard_promotion):
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = tmp_path / "out"
  res = trainer.train(_cfg(world, out, max_steps=40, eval_data=str(world / "eval.jsonl"),
                           eval_every=20, save_every=20, learning_rate=2e-2,
                           lora={"r": 8, "alpha": 16}))
  losses = [res["losses"][s] for s in sorted(res["losses"])]
  # a random tiny base learns the digits' distribution in 40 steps: 0.2 nats of the
  # ln(49) = 3.89 it starts from
  assert np.mean(losses[-5:]) < losses[0] - 0.2
  assert res["eval_losses"][40] < res["eval_losses"][20]
  recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(1, 41))
  assert all(r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in recs)
  assert (out / "loss.png").stat().st_size > 1000
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
      "20", "40"]
  # the adapter: PEFT's logits on transformers' model equal ours
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(world / "base")).eval()
  pm = peft.PeftModel.from_pretrained(hf, res["adapter_dir"]).eval()
  config, base = models.load_hf(world / "base")
  ours = lj.load_adapter(res["adapter_dir"], base, config=config)
  ids = np.asarray([tdata.load_tokenizer(world / "base").encode("12+7=19")])
  with torch.no_grad():
    want = pm(torch.tensor(ids)).logits.numpy()
  got = np.asarray(lj.implicit(models.forward)(ours, config, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(got - np.asarray(models.forward(base, config, jnp.asarray(ids)))).max() > 1e-2


@pytest.mark.slow
def test_qlora_on_chat_data_and_the_merged_checkpoint(world, tmp_path, standard_promotion):
  """NF4 base (the LoRA leaves keep QuantizedArray bases), chat JSONL with the
  tokenizer's template, the merged checkpoint written and equal to the merged tree."""
  import quantization as qz
  out = tmp_path / "q"
  res = trainer.train(_cfg(world, out, data=str(world / "chat.jsonl"), max_steps=3,
                           quantize={"format": "nf4", "block_size": 32}, save_merged=True,
                           remat="full", lora={"targets": ["q_proj", "v_proj"]}))
  assert len(res["losses"]) == 3
  cfg, base = models.load_hf(world / "base", stacked=True)
  qbase = qz.quantize(base, qz.QuantConfig("nf4", 32, targets=trainer._quant_targets(True)))
  params = lj.load_adapter(res["adapter_dir"], qbase, config=cfg)
  leaf = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(leaf, lj.LoraWeight) and isinstance(leaf.w, qz.QuantizedArray)
  mcfg, merged = models.load_hf(out / "merged", stacked=True)
  ids = jnp.asarray([[1, 9, 12, 20, 30, 11]])
  np.testing.assert_allclose(models.forward(merged, mcfg, ids),
                             models.forward(lj.merge(params), cfg, ids), rtol=1e-4, atol=1e-4)
  assert (out / "merged" / "tokenizer.json").exists()


def test_modulora_on_a_gptq_base_calibrated_on_the_training_rows(world, tmp_path,
                                                                  standard_promotion):
  """`quantize: {method: gptq}`: the base is `qz.gptq` of the dense base calibrated on the
  first training rows through the model's forward (the same codes as calling it
  directly), its error on those rows is below round-to-nearest's, and LoRA trains on it."""
  import quantization as qz
  q = {"format": "int4", "block_size": 32, "symmetric": False, "method": "gptq",
       "calibration_rows": 16}
  res = trainer.train(_cfg(world, tmp_path / "g", max_steps=3, quantize=q,
                           lora={"targets": ["q_proj", "v_proj", "down_proj"]}))
  assert len(res["losses"]) == 3
  c = tconfig.from_dict(_cfg(world, tmp_path / "x", quantize=q))
  tok = tdata.load_tokenizer(world / "base")
  rows = trainer.load_rows(c.data, tok, c.seq_len, "training").rows
  config, dense = models.load_hf(world / "base", stacked=c.stacked)
  got = trainer.quantize_base(c, config, dense, rows)
  qc = qz.QuantConfig("int4", 32, symmetric=False, targets=trainer._quant_targets(c.stacked))
  batches = [(jnp.asarray(rows["input_ids"][i:i + 8]), jnp.asarray(rows["segment_ids"][i:i + 8]))
             for i in (0, 8)]
  want = qz.gptq(dense, lambda p, b: models.forward(p, config, b[0], segment_ids=b[1]),
                 batches, qc, progress=False)
  leaves = lambda t: [x for x in jax.tree.leaves(t, is_leaf=lj.is_implicit)
                      if isinstance(x, qz.GroupQuantizedArray)]
  assert len(leaves(got)) == len(leaves(want)) > 0
  for a, b in zip(leaves(got), leaves(want)):
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
  rtn = qz.quantize(dense, qc)
  ids, seg = batches[0]
  ref = models.forward(dense, config, ids, segment_ids=seg)
  err = lambda p: float(jnp.mean((lj.implicit(models.forward)(p, config, ids,
                                                              segment_ids=seg) - ref) ** 2))
  assert err(got) < err(rtn)
  params = lj.load_adapter(res["adapter_dir"], got, config=config)
  leaf = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  assert any(isinstance(x, lj.LoraWeight) and isinstance(x.w, qz.GroupQuantizedArray)
             for x in leaf)
  with pytest.raises(ValueError, match="gptq quantizes to the group-wise integer formats"):
    tconfig.from_dict(_cfg(world, tmp_path / "y", quantize={"format": "nf4",
                                                            "method": "gptq"}))


def test_run_bad_input_is_named(world, tmp_path, standard_promotion):
  with pytest.raises(ValueError, match=r"packs into \d+ rows of seq_len 32, fewer than "
                                       r"batch_size 4096"):
    trainer.train(_cfg(world, tmp_path / "a", batch_size=4096))
  small = tt.make_base(tmp_path / "small", hidden=16, layers=1)
  cj = json.loads((small / "config.json").read_text())
  cj["vocab_size"] = 20
  (small / "config.json").write_text(json.dumps(cj))
  import safetensors.numpy as stnp
  t = stnp.load_file(str(small / "model.safetensors"))
  t = {k: (v[:20] if v.shape[0] == 49 else v) for k, v in t.items()}
  stnp.save_file(t, str(small / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"token id \d+ is outside the model's vocabulary "
                                       r"\(vocab_size=20\)"):
    trainer.train(_cfg(world, tmp_path / "b", base_model=str(small)))
  trainer.train(_cfg(world, tmp_path / "c", max_steps=2))
  with pytest.raises(ValueError, match=r"checkpoint was written with batch_size=8, the config "
                                       r"now says 4"):
    trainer.train(_cfg(world, tmp_path / "c", max_steps=4, batch_size=4))
  with pytest.raises(ValueError, match=r"holds checkpoints \(steps \[2\]\) and resume is false"):
    trainer.train(_cfg(world, tmp_path / "c", max_steps=4, resume=False))


def _run_cli(cfg_path, *extra, env=None, wait=True):
  cmd = [sys.executable, "-m", "merging.cli", "train", str(cfg_path), *extra]
  env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
  p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return p
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _losses(out):
  return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                             .splitlines())}


@pytest.mark.slow
def test_kill9_then_resume_gives_the_same_losses_step_for_step(world, tmp_path):
  """A run killed with SIGKILL while training (checkpoints every 5 steps) and started
  again ends with the losses of a run never interrupted, bit for bit."""
  steps = 80
  for name in ("ref", "killed"):
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(_cfg(
        world, tmp_path / name, max_steps=steps, save_every=5, lora={"dropout": 0.1},
        mesh={"data": 1}, stacked=False)))
  # one compilation cache for the three processes (the runs are the same program)
  env = {"XLA_FLAGS": tt.xla_flags(1),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  ref = _run_cli(tmp_path / "ref.yml", env=env)
  assert ref["steps"] == steps
  p = _run_cli(tmp_path / "killed.yml", env=env, wait=False)
  ck = tmp_path / "killed" / "checkpoints"
  deadline = time.monotonic() + 240
  killed_at = None
  while time.monotonic() < deadline and p.poll() is None:
    done = [int(d.name) for d in ck.iterdir() if d.name.isdigit()] if ck.exists() else []
    if done and max(done) >= 15:
      os.kill(p.pid, signal.SIGKILL)
      killed_at = max(done)
      break
    time.sleep(0.02)
  p.communicate(timeout=60)
  assert killed_at is not None, "the run ended before it could be killed"
  assert p.returncode == -signal.SIGKILL
  again = _run_cli(tmp_path / "killed.yml", env=env)
  assert 15 <= again["resumed_from"] < steps
  want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "killed")
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want


@pytest.mark.slow
def test_a_checkpoint_continues_on_another_mesh(world, tmp_path):
  """8 devices as (data 8, model 1) for 4 steps, then (data 2, model 4) for 4 more: the
  losses equal an uninterrupted (8, 1) run's."""
  env = {"XLA_FLAGS": tt.xla_flags(8),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  for name in ("ref", "moved"):
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(_cfg(
        world, tmp_path / name, max_steps=8, save_every=4, mesh={"data": 8, "model": 1})))
  _run_cli(tmp_path / "ref.yml", env=env)
  first = _run_cli(tmp_path / "moved.yml", "--stop-after", "4", env=env)
  assert first["steps"] == 4 and first["adapter_dir"] is None
  second = _run_cli(tmp_path / "moved.yml", "--set", "mesh.data=2", "--set", "mesh.model=4",
                    env=env)
  assert second["resumed_from"] == 4
  want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "moved")
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)
