"""The reference Llama (`lora_jax.models.llama`) against transformers' LlamaForCausalLM,
computed at test time on tiny random models saved to tmp_path."""

from __future__ import annotations

import dataclasses
import json
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._dora import DoraWeight, to_dora
from lora_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _hf_model(seed=0, **over):
  """A random float32 LlamaForCausalLM with weights large enough to give O(1) logits."""
  kw = {**TINY, **over}
  cfg = transformers.LlamaConfig(**kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  m = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in m.parameters():
      if p.ndim == 2:
        p.normal_(0.0, 0.1)
      else:
        p.uniform_(0.5, 1.5)
  return m


def _save(m, path, **kw):
  m.save_pretrained(str(path), safe_serialization=True, **kw)
  return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (hf model, checkpoint dir)."""
  out = {}
  for name, over in {"default": {}, "llama3": {"rope_parameters": LLAMA3_ROPE},
                     "tied": {"tie_word_embeddings": True}}.items():
    m = _hf_model(seed=len(out), **over)
    out[name] = (m, _save(m, tmp_path_factory.mktemp(name)))
  return out


_fwd = jax.jit(llama.forward, static_argnums=1)


def _ids(shape, seed=0, vocab=128):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _hf_logits(m, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return m(torch.tensor(ids), **kw).logits.numpy()


# ----------------------------------------------------------------------------
# config

@pytest.mark.interop
def test_config_from_hf_and_back(models):
  m, path = models["llama3"]
  d = json.loads((path / "config.json").read_text())
  cfg = llama.LlamaConfig.from_hf(d)
  assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 16)
  assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 500000.0, 8.0)
  assert cfg.rope_original_max_position_embeddings == 16
  hash(cfg)  # static argument of jit
  back = transformers.LlamaConfig(**cfg.to_hf())
  assert back.rope_parameters["rope_type"] == "llama3"
  assert back.rope_parameters["factor"] == 8.0
  assert llama.LlamaConfig.from_hf(cfg.to_hf()) == cfg
  # old-style configs: top-level rope_theta, rope_scaling with "type"
  old = {**TINY, "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
  c2 = llama.LlamaConfig.from_hf(old)
  assert (c2.rope_theta, c2.rope_type, c2.rope_factor) == (1234.0, "linear", 2.0)


def test_config_errors():
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    llama.LlamaConfig.from_hf({**TINY, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    llama.LlamaConfig.from_hf({**TINY, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="lacks"):
    llama.LlamaConfig.from_hf({"hidden_size": 8})
  with pytest.raises(ValueError, match="num_key_value_heads"):
    llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


# ----------------------------------------------------------------------------
# load_hf / forward vs transformers

@pytest.mark.interop
@pytest.mark.parametrize("name", ["default", "llama3", "tied"])
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_logits_match_transformers(models, name, stacked):
  m, path = models[name]
  config, params = llama.load_hf(path, stacked=stacked)
  assert llama.is_stacked(params) == stacked
  assert ("lm_head" in params) == (name != "tied")
  ids = _ids((2, 24), seed=1)
  ref = _hf_logits(m, ids)
  out = _fwd(params, config, jnp.asarray(ids))
  assert out.shape == (2, 24, 128) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.5   # the comparison is not between near-zero logits


@pytest.mark.interop
def test_padded_forward_matches_transformers(models):
  m, path = models["default"]
  config, params = llama.load_hf(path)
  ids = _ids((2, 10), seed=2)
  mask = np.ones((2, 10), np.int64)
  mask[1, :4] = 0
  ref = _hf_logits(m, ids, mask)
  out = _fwd(params, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  keep = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out)[keep], ref[keep], atol=1e-4, rtol=0)


@pytest.mark.interop
def test_long_padded_forward_runs_in_causal_blocks_and_matches_transformers(models,
                                                                            monkeypatch):
  """At 128 tokens the causal attention runs in query blocks; logits still equal
  transformers' at every non-padding position, and the unblocked path's everywhere."""
  m, path = models["default"]
  config, params = llama.load_hf(path)
  T = llama.CAUSAL_BLOCK_MIN_TOKENS
  ids = _ids((2, T), seed=5)
  mask = np.ones((2, T), np.int64)
  mask[1, :37] = 0
  ref = _hf_logits(m, ids, mask)
  fwd = jax.jit(llama.forward, static_argnums=1)
  blocked = fwd(params, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  keep = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(blocked)[keep], ref[keep], atol=1e-4, rtol=0)
  # the CPU program (attention is chosen per platform when lowering)
  hlo = jax.jit(lambda p: llama.forward(p, config, jnp.asarray(ids))).lower(params).as_text()
  c = T // llama.CAUSAL_BLOCKS
  heads = config.num_attention_heads
  assert f"tensor<2x{heads}x{c}x{c}xf32>" in hlo       # scores of a (c, c) block
  assert f"tensor<2x{heads}x{T}x{T}xf32>" not in hlo   # never the full (T, T) scores
  from lora_jax.models import decoder
  monkeypatch.setattr(decoder, "CAUSAL_BLOCK_MIN_TOKENS", 10 ** 9)
  dense = jax.jit(llama.forward, static_argnums=1)(params, config, jnp.asarray(ids),
                                                    attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(blocked)[keep], np.asarray(dense)[keep], atol=1e-5,
                             rtol=0)


@pytest.mark.interop
def test_sharded_checkpoint(models, tmp_path):
  m, path = models["default"]
  _save(m, tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert not (tmp_path / "model.safetensors").exists()
  _, single = llama.load_hf(path)
  _, sharded = llama.load_hf(tmp_path)
  chex.assert_trees_all_equal(single, sharded)


@pytest.mark.interop
@pytest.mark.parametrize("tied", [False, True])
def test_save_hf_loads_in_transformers(tmp_path, tied):
  config = llama.LlamaConfig(**TINY, tie_word_embeddings=tied, rope_theta=500.0)
  params = llama.init_params(jax.random.key(3), config, std=0.1, stacked=True)
  llama.save_hf(tmp_path, config, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  m = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
  m.eval()
  assert m.config.tie_word_embeddings == tied
  ids = _ids((2, 12), seed=4)
  ref = _hf_logits(m, ids)
  out = _fwd(params, config, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
  # and back: load_hf of what we wrote gives the same tree (unrolled)
  c2, p2 = llama.load_hf(tmp_path)
  assert c2 == config
  chex.assert_trees_all_close(p2, llama.unstack_layers(params))


# ----------------------------------------------------------------------------
# generate

@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("name", ["default", "tied"])
def test_greedy_generate_matches_transformers(models, name):
  m, path = models[name]
  config, params = llama.load_hf(path, stacked=name == "tied")
  ids = _ids((2, 7), seed=5)
  mask = np.ones_like(ids)
  ids[0, :3] = 0       # left padding on the first row: prompts of length 4 and 7
  mask[0, :3] = 0
  n = 10
  with torch.no_grad():
    ref = m.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                     do_sample=False, pad_token_id=0, eos_token_id=None)[:, 7:].numpy()
  out = llama.generate(params, config, jnp.asarray(ids), n, attention_mask=jnp.asarray(mask))
  assert out.shape == (2, n) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), ref)
  # the padded prompt decodes as it would alone
  alone = llama.generate(params, config, jnp.asarray(ids[:1, 3:]), n)
  np.testing.assert_array_equal(np.asarray(alone)[0], ref[0])


def _random_lora(params, cfg, seed=0):
  lp = lj.init(jax.random.key(seed), params, cfg)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))

  def fill(x):
    if isinstance(x, lj.LowRankWeight):
      return dataclasses.replace(x, b=0.2 * jax.random.normal(next(keys), x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(fill, lp, is_leaf=lambda x: isinstance(x, lj.LowRankWeight))


def _lora_model(stacked):
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(0), config, std=0.1, stacked=stacked)
  cfg = lj.LoraConfig(rank=4, alpha=8, targets=r"layers/.*(q|v|down)_proj/kernel",
                      layouts=llama.STACKED_LAYOUTS if stacked else {})
  return config, params, _random_lora(params, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_lora_forward_equals_merged(stacked):
  config, params, lp = _lora_model(stacked)
  ids = jnp.asarray(_ids((2, 9), seed=6))
  with _no_warnings():   # every LoRA use is factored: no materialize warning
    out = jax.jit(lj.implicit(llama.forward), static_argnums=1)(lp, config, ids)
  ref = _fwd(lj.merge(lp), config, ids)
  base = _fwd(params, config, ids)
  chex.assert_trees_all_close(out, ref, atol=1e-5)
  assert float(jnp.abs(ref - base).max()) > 1e-2   # the adapter changes the output


@pytest.mark.slow
def test_lora_generate_equals_merged():
  config, params, lp = _lora_model(stacked=True)
  merged = lj.merge(lp)
  ids = jnp.asarray(_ids((2, 9), seed=6))
  mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]))
  g_lora = llama.generate(lp, config, ids, 6, attention_mask=mask)
  g_merged = llama.generate(merged, config, ids, 6, attention_mask=mask)
  g_base = llama.generate(params, config, ids, 6, attention_mask=mask)
  g_implicit = lj.implicit(llama.generate)(lp, config, ids, 6, attention_mask=mask)
  np.testing.assert_array_equal(np.asarray(g_lora), np.asarray(g_merged))
  np.testing.assert_array_equal(np.asarray(g_implicit), np.asarray(g_merged))
  assert not np.array_equal(np.asarray(g_base), np.asarray(g_merged))


class _no_warnings:
  def __enter__(self):
    self._cm = warnings.catch_warnings()
    self._cm.__enter__()
    warnings.simplefilter("error")

  def __exit__(self, *exc):
    return self._cm.__exit__(*exc)


@pytest.mark.slow
def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(1), config, std=0.1)
  ids = jnp.asarray(_ids((3, 5), seed=7))
  k1, k2 = jax.random.key(10), jax.random.key(11)
  gen = lambda **kw: np.asarray(llama.generate(params, config, ids, 8, **kw))
  a = gen(rng=k1, temperature=1.0)
  n = llama._generate_jit._cache_size()
  np.testing.assert_array_equal(a, gen(rng=k1, temperature=1.0))
  assert not np.array_equal(a, gen(rng=k2, temperature=1.0))
  assert a.min() >= 0 and a.max() < 128
  greedy = gen()
  np.testing.assert_array_equal(gen(rng=k2, temperature=0.7, top_k=1), greedy)
  # top-k: the first sampled token is among the k most likely after the prompt
  first = _fwd(params, config, ids)[:, -1]
  top3 = np.asarray(jax.lax.top_k(first, 3)[1])
  for key in (k1, k2):
    s = gen(rng=key, temperature=5.0, top_k=3)
    assert all(s[i, 0] in top3[i] for i in range(3))
  # temperature and top_k are traced: one program for sampling, one for greedy
  assert llama._generate_jit._cache_size() == n + 1


@pytest.mark.slow
def test_eos_then_pad():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(2), config, std=0.1)
  ids = jnp.asarray(_ids((1, 4), seed=8))
  greedy = np.asarray(llama.generate(params, config, ids, 6))[0]
  eos = int(greedy[2])
  first = int(np.argmax(greedy == eos))
  n = llama._generate_jit._cache_size()
  out = np.asarray(llama.generate(params, config, ids, 6, eos_id=eos, pad_id=127))[0]
  assert llama._generate_jit._cache_size() == n   # eos_id / pad_id are traced
  np.testing.assert_array_equal(out[:first + 1], greedy[:first + 1])
  assert (out[first + 1:] == 127).all()


def test_generate_compiles_once():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(4), config)
  ids = jnp.asarray(_ids((2, 5), seed=9))
  llama.generate(params, config, ids, 3)
  n = llama._generate_jit._cache_size()
  llama.generate(params, config, ids + 1, 3)
  assert llama._generate_jit._cache_size() == n


def test_generate_errors():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(5), config)
  ids = jnp.asarray(_ids((2, 5)))
  with pytest.raises(ValueError, match="rng"):
    llama.generate(params, config, ids, 3, temperature=1.0)
  with pytest.raises(ValueError, match="left-padded"):
    llama.generate(params, config, ids, 3, attention_mask=jnp.asarray([[1, 1, 1, 0, 0]] * 2))
  with pytest.raises(ValueError, match="max_new_tokens"):
    llama.generate(params, config, ids, 0)
  with pytest.raises(ValueError, match="top_k"):
    llama.generate(params, config, ids, 2, rng=jax.random.key(0), temperature=1.0, top_k=0)
  with pytest.raises(ValueError, match="prompt_ids"):
    llama.generate(params, config, ids[0], 2)


# ----------------------------------------------------------------------------
# load_hf errors

def test_load_hf_errors(tmp_path):
  from safetensors.numpy import save_file
  config = llama.LlamaConfig(**TINY)
  with pytest.raises(FileNotFoundError, match="config.json"):
    llama.load_hf(tmp_path)
  params = llama.init_params(jax.random.key(0), config)
  llama.save_hf(tmp_path, config, params)
  ok = llama.load_hf(tmp_path)[1]
  chex.assert_trees_all_close(ok, params)
  from lora_jax.checkpoint import read_safetensors
  sd = read_safetensors(tmp_path / "model.safetensors")

  def rejects(tensors, match):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
      llama.load_hf(tmp_path)

  # wrong shape
  rejects({**sd, "model.layers.1.mlp.up_proj.weight": np.zeros((100, 64), np.float32)},
          r"model\.layers\.1\.mlp\.up_proj\.weight.*\(100, 64\)")
  # unknown and missing tensors
  rejects({**sd, "model.layers.0.self_attn.rotary.foo": np.zeros((3,), np.float32)},
          "rotary.foo")
  rejects({k: v for k, v in sd.items() if k != "model.norm.weight"},
          r"lacks.*model\.norm\.weight")
  # a bitsandbytes 8-bit checkpoint: named as such
  rejects({**sd, "model.layers.0.mlp.up_proj.SCB": np.ones((128,), np.float32)},
          r"up_proj\.SCB.*8-bit")
  # truncated file
  save_file(sd, str(tmp_path / "model.safetensors"))
  raw = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="model.safetensors"):
    llama.load_hf(tmp_path)
  # corrupt config
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json"):
    llama.load_hf(tmp_path)


def test_stack_unstack_roundtrip():
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(6), config)
  st = llama.stack_layers(params)
  assert st["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
  assert st["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 32)
  chex.assert_trees_all_equal(llama.unstack_layers(st), params)
  ids = jnp.asarray(_ids((1, 6)))
  chex.assert_trees_all_close(_fwd(st, config, ids), _fwd(params, config, ids), atol=1e-5)


@pytest.mark.interop
def test_bfloat16_checkpoint(tmp_path):
  m16 = _hf_model(seed=0).to(torch.bfloat16)
  _save(m16, tmp_path)
  _, p32 = llama.load_hf(tmp_path, dtype=jnp.float32)
  _, p16 = llama.load_hf(tmp_path)                 # the file's dtype by default
  assert p32["norm"]["scale"].dtype == jnp.float32
  assert p16["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.astype(jnp.float32), p16), p32)
  w = m16.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(p32["layers"][0]["mlp"]["up_proj"]["kernel"]), w)
  out = tmp_path / "again"
  llama.save_hf(out, llama.LlamaConfig.from_hf(m16.config.to_dict()), p16)
  back = transformers.LlamaForCausalLM.from_pretrained(str(out))
  assert back.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(back.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T, w)


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_grads_under_scan_equal_unrolled(dora):
  config = llama.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
  ids = jnp.asarray(_ids((2, 7), vocab=50))
  params = llama.init_params(jax.random.key(0), config, std=0.1)
  lp = _random_lora(params, lj.LoraConfig(rank=2, alpha=4, targets=r"layers/.*_proj/kernel"))
  if dora:
    lp = to_dora(lp)

  @jax.jit
  @jax.grad
  def grad(adapter, frozen):
    logits = lj.implicit(llama.forward)(lj.combine(adapter, frozen), config, ids)
    return jnp.mean(logits ** 2)

  g_unrolled = grad(*lj.split(lp))
  g_scan = grad(*lj.split(llama.stack_layers(lp)))
  chex.assert_trees_all_close(llama.stack_layers(g_unrolled)["layers"], g_scan["layers"],
                              atol=1e-5)
  q = g_scan["layers"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(q.b).max()) > 0
  assert isinstance(q, DoraWeight) == dora
  if dora:
    assert float(jnp.abs(q.m).max()) > 0
