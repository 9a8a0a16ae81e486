"""The model families read as data (`lora_jax.models.FAMILIES`), against transformers.

For each family a tiny random checkpoint is built with transformers at test time
(non-trivial norm weights and biases, sliding windows shorter than the sequence, and
more than one layer type where the family has them), saved, and read with
`models.load_hf`; logits (eager attention), greedy generation, `save_hf` and PEFT
adapters on all linear layers are compared with transformers / PEFT.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)

# model_type -> (config class, model class, extra config): windows of 5 tokens against
# sequences of 12, and for Qwen the layers from max_window_layers on sliding
FAMILY_CASES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5, "head_dim": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True,
                                                  "sliding_window": 5, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": True,
                                                  "sliding_window": 5, "max_window_layers": 2,
                                                  "head_dim": 16, "tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 5,
                                                     "query_pre_attn_scalar": 24,
                                                     "attn_logit_softcapping": 2.0,
                                                     "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 5, "pad_token_id": 0}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4,
                                                        "num_experts_per_tok": 2,
                                                        "sliding_window": 5}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
        "norm_topk_prob": True, "head_dim": 16}),
    # layers 0, 1 local (window 5, rope theta 1e4), layer 2 global (linear rope x8)
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 24,
        "sliding_window_pattern": 3,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                               "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
}
MOE = ("mixtral", "qwen3_moe")
SLIDING = ("mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "gemma3_text")


def _hf_model(model_type, seed=0):
  cls_cfg, cls_model, extra = FAMILY_CASES[model_type]
  cfg = getattr(transformers, cls_cfg)(**{**TINY, **extra})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  m = getattr(transformers, cls_model)(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 0.1)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.2)
      else:
        p.uniform_(0.5, 1.5)
  return m


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for k, mt in enumerate(FAMILY_CASES):
    m = _hf_model(mt, seed=k)
    path = tmp_path_factory.mktemp(mt)
    m.save_pretrained(str(path), safe_serialization=True)
    out[mt] = (m, path)
  return out


def _ids(shape, seed=0, vocab=96):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _hf_logits(m, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return m(torch.tensor(ids), **kw).logits.numpy()


_fwd = jax.jit(models.forward, static_argnums=1)


@pytest.mark.interop
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_config_reads_the_family(checkpoints, model_type):
  m, path = checkpoints[model_type]
  config, params = models.load_hf(path)
  assert config.model_type == model_type
  hf = m.config
  if model_type not in SLIDING:
    assert config.sliding_window is None and config.layer_types is None
  elif model_type in ("mistral", "phi3", "mixtral"):
    assert config.layer_types is None and config.window(0) == 5
  else:
    assert config.sliding_window == 5 and config.layer_types == tuple(hf.layer_types)
    assert "full_attention" in config.layer_types and "sliding_attention" in config.layer_types
  at = params["layers"][0]["self_attn"]
  assert ("bias" in at.get("q_proj", {})) == (model_type == "qwen2")
  assert "bias" not in at["o_proj"]
  assert ("q_norm" in at) == (model_type in ("qwen3", "qwen3_moe", "gemma3_text"))
  mlp = params["layers"][0]["mlp"]
  if model_type in MOE:
    E = m.config.num_local_experts if model_type == "mixtral" else m.config.num_experts
    assert mlp["experts"]["gate_up_proj"].shape[0] == E and mlp["gate"]["kernel"].shape[1] == E
  assert ("qkv_proj" in at) == (model_type == "phi3")
  # the config written back reads in transformers as the same architecture
  back = getattr(transformers, FAMILY_CASES[model_type][0])(**config.to_hf())
  assert getattr(back, "sliding_window", None) == getattr(hf, "sliding_window", None)
  sliding = lambda c: [i for i, t in enumerate(getattr(c, "layer_types", None) or [])  # noqa: E731
                       if t == "sliding_attention"]
  assert sliding(back) == sliding(hf)
  if getattr(hf, "rope_parameters", None) is not None and model_type == "gemma3_text":
    assert back.rope_parameters == hf.rope_parameters


@pytest.mark.interop
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_logits_match_transformers(checkpoints, model_type, stacked):
  m, path = checkpoints[model_type]
  config, params = models.load_hf(path, stacked=stacked)
  ids = _ids((2, 12), seed=1)
  mask = np.ones_like(ids)
  mask[1, :4] = 0              # left padding
  got = np.asarray(_fwd(params, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  want = _hf_logits(m, ids, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[1, 4:], want[1, 4:], rtol=1e-4, atol=1e-4)
  if model_type in SLIDING:   # the window matters here: full attention gives other logits
    import dataclasses
    full = dataclasses.replace(config, sliding_window=None, layer_types=None)
    other = np.asarray(_fwd(params, full, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(other[0, 6:] - want[0, 6:]).max() > 1e-2
  if config.local_rope is not None:   # Gemma 3: the local layers' own rope matters too
    import dataclasses
    one = dataclasses.replace(config, local_rope=None)
    other = np.asarray(_fwd(params, one, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs(other[0] - want[0]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_greedy_generate_matches_transformers(checkpoints, model_type):
  m, path = checkpoints[model_type]
  config, params = models.load_hf(path, stacked=model_type == "qwen2")
  ids = _ids((2, 6), seed=2)
  mask = np.ones_like(ids)
  ids[0, :2] = 0
  mask[0, :2] = 0
  n = 8                       # 6 + 8 tokens: past the window of 5
  with torch.no_grad():
    ref = m.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                     do_sample=False, pad_token_id=0, eos_token_id=None)[:, 6:].numpy()
  out = models.generate(params, config, jnp.asarray(ids), n, attention_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.interop
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_save_hf_loads_in_transformers(checkpoints, model_type, tmp_path):
  m, path = checkpoints[model_type]
  config, params = models.load_hf(path)
  models.save_hf(tmp_path, config, params)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["model_type"] == model_type
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                           attn_implementation="eager").eval()
  assert type(back).__name__ == FAMILY_CASES[model_type][1]
  ids = _ids((1, 12), seed=3)
  np.testing.assert_allclose(_hf_logits(back, ids), _hf_logits(m, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_peft_adapter_on_all_linear_layers(checkpoints, model_type, tmp_path):
  """PEFT's adapter (every projection) loads here with PEFT's logits; ours loads in PEFT.
  For MoE, PEFT's all-linear adds the routed experts and the router as
  target_parameters (one adapter per expert, rank 2r on the fused gate_up_proj)."""
  peft = pytest.importorskip("peft")
  m, path = checkpoints[model_type]
  pm = peft.get_peft_model(_hf_model(model_type, seed=list(FAMILY_CASES).index(model_type)),
                           peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
  if model_type in MOE:
    assert pm.peft_config["default"].target_parameters
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.1)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  config, base = models.load_hf(path)
  params = lj.load_adapter(tmp_path / "peft", base, config=config)
  ids = _ids((2, 12), seed=4)
  got = np.asarray(jax.jit(lj.implicit(models.forward), static_argnums=1)(params, config,
                                                                           jnp.asarray(ids)))
  np.testing.assert_allclose(got, _hf_logits(pm, ids), rtol=1e-4, atol=1e-4)
  lj.save_adapter(tmp_path / "ours", params, config=config)
  again = peft.PeftModel.from_pretrained(_hf_model(model_type, list(FAMILY_CASES).index(
      model_type)), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported model "
                                       r"types: gemma, gemma2, gemma3_text, llama, mistral, mixtral, "
                                       r"phi3, qwen2, qwen3, qwen3_moe"):
    models.load_hf(tmp_path)


@pytest.mark.interop
def test_missing_bias_names_the_tensor_and_family(checkpoints, tmp_path):
  import safetensors.numpy as stnp
  m, path = checkpoints["qwen2"]
  for f in path.iterdir():
    if f.name != "model.safetensors":
      (tmp_path / f.name).write_bytes(f.read_bytes())
  t = stnp.load_file(str(path / "model.safetensors"))
  del t["model.layers.1.self_attn.k_proj.bias"]
  stnp.save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lacks tensors \['model\.layers\.1\.self_attn\.k_proj\.bias'\]"):
    models.load_hf(tmp_path)


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "phi3", "gemma3_text", "mixtral", "qwen3_moe"])
def test_bnb_4bit_checkpoint_of_the_family(checkpoints, model_type, tmp_path):
  """transformers' `load_in_4bit` save of the family reads as QuantizedArray kernels and
  gives transformers' 4-bit logits."""
  pytest.importorskip("bitsandbytes")
  import quantization as qz
  m, path = checkpoints[model_type]
  bq = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)
  m4 = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), quantization_config=bq, device_map="cpu", dtype=torch.float32,
      attn_implementation="eager")
  m4.save_pretrained(str(tmp_path))
  m4.train()     # eval mode on AVX512-BF16 CPUs would run bnb's bf16 kernel
  ids = _ids((2, 10), seed=6)
  with torch.no_grad():
    ref = m4(torch.tensor(ids)).logits.numpy()
  config, params = models.load_hf(tmp_path)
  kernels = [x for x in jax.tree.leaves(params["layers"], is_leaf=lj.is_implicit)
             if lj.is_implicit(x)]
  assert kernels and all(isinstance(k, qz.QuantizedArray) for k in kernels)
  got = lj.implicit(models.forward)(params, config, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("model_type", list(FAMILY_CASES))
def test_lora_jax_merge_equals_mergekit(model_type, tmp_path):
  """TIES over three checkpoints of the family: `lora-jax merge` and mergekit (its Python
  API, run here) write the same tensors; `models.load_hf` reads the result."""
  pytest.importorskip("mergekit")
  import yaml
  from mergekit.config import MergeConfiguration
  from mergekit.merge import MergeOptions, run_merge
  from safetensors.numpy import load_file
  from merging import cli
  paths = []
  for k in range(3):
    m = _hf_model(model_type, seed=10 + k)
    m.save_pretrained(str(tmp_path / f"m{k}"), safe_serialization=True)
    paths.append(str(tmp_path / f"m{k}"))
  cfg = {"merge_method": "ties", "base_model": paths[0], "dtype": "float32",
         "models": [{"model": paths[1], "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": paths[2], "parameters": {"weight": 0.4, "density": 0.7}}]}
  (tmp_path / "ties.yml").write_text(yaml.safe_dump(cfg))
  run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
            MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
  assert cli.main(["merge", str(tmp_path / "ties.yml"), str(tmp_path / "ours"), "--quiet"]) == 0
  a = load_file(str(tmp_path / "mk" / "model.safetensors"))
  b = load_file(str(tmp_path / "ours" / "model.safetensors"))
  if model_type in MOE:
    # Experts differ by design: mergekit 0.1.5 merges each layer's experts as one stacked
    # tensor (transformers 5's `mlp.experts.down_proj`), so TIES trims over all experts at
    # once (and writes Mixtral's under those names); `lora-jax merge`
    # works tensor by tensor on the file, one expert at a time. Ours are checked against
    # mg.ties on the same tensors; everything else against mergekit.
    import merging as mg
    moe = sorted(k for k in b if ".experts." in k)
    assert moe
    ins = [load_file(str(tmp_path / f"m{k}" / "model.safetensors")) for k in range(3)]
    for k in moe:
      want = mg.ties([{"w": jnp.asarray(ins[1][k])}, {"w": jnp.asarray(ins[2][k])}],
                     base={"w": jnp.asarray(ins[0][k])}, weights=[0.6, 0.4],
                     density=mg.PerModel([0.5, 0.7]))["w"]
      np.testing.assert_allclose(b[k], np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=k)
    # mergekit writes Mixtral's router under transformers 5's name (mlp.gate)
    a = {k.replace(".mlp.gate.", ".block_sparse_moe.gate.") if model_type == "mixtral" else k: v
         for k, v in a.items() if ".experts." not in k}
    b = {k: v for k, v in b.items() if k not in moe}
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
  config, _ = models.load_hf(tmp_path / "ours")
  assert config.model_type == model_type


@pytest.mark.interop
@pytest.mark.parametrize("model_type", ["qwen3", "phi3"])
def test_peft_target_forms_select_what_peft_selects(checkpoints, model_type):
  """`LoraConfig(targets="all-linear")` and a list of module names adapt the modules PEFT
  adapts for the same `target_modules` (mapped through the family's name table)."""
  peft = pytest.importorskip("peft")
  m, path = checkpoints[model_type]
  config, base = models.load_hf(path)
  table = models.names(config)
  names = ["qkv_proj", "down_proj"] if model_type == "phi3" else ["q_proj", "v_proj"]
  for target in ("all-linear", names):
    params = lj.init(jax.random.key(0), base, lj.LoraConfig(rank=2, targets=target))
    ours = sorted(table.path_to_module(p.removesuffix("/kernel") + "/kernel")
                  for p, x in lj.leaves_with_paths(params, is_leaf=lj.is_implicit)
                  if isinstance(x, lj.LoraWeight))
    pm = peft.get_peft_model(_hf_model(model_type), peft.LoraConfig(r=2, target_modules=target))
    theirs = sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                    if hasattr(mod, "lora_A") and n.count(".") > 2)
    assert ours == theirs, (target, ours[:4], theirs[:4])
  with pytest.raises(ValueError, match=r"module name 'qq_proj' matches no parameter path"):
    lj.init(jax.random.key(0), base, lj.LoraConfig(rank=2, targets=["qq_proj"]))


@pytest.mark.interop
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("model_type", MOE)
def test_lora_on_experts_stays_factored_and_equals_merged(checkpoints, model_type, stacked,
                                                         tmp_path):
  """One adapter per expert on the stacked expert weights (and the router): the routed
  forward goes through `ragged_dot`'s LoRA rule (no expert weight is materialized: any
  fallback would warn), equals the merged model, and its gradients equal the merged
  model's."""
  import warnings
  from lora_jax.models import decoder
  m, path = checkpoints[model_type]
  config, base = models.load_hf(path, stacked=stacked)
  layouts = decoder.STACKED_LAYOUTS if stacked else decoder.EXPERT_LAYOUTS
  cfg = lj.LoraConfig(rank=2, alpha=4, targets="all-linear", layouts=layouts)
  params = lj.init(jax.random.key(0), base, cfg)
  ex = params["layers"]["mlp"]["experts"] if stacked else params["layers"][0]["mlp"]["experts"]
  assert isinstance(ex["gate_up_proj"], lj.LoraWeight) and ex["gate_up_proj"].a.shape[-3] == (
      ex["gate_up_proj"].shape[-3])
  params = jax.tree.map(lambda x: x.replace_children(b=0.3 * jax.random.normal(
      jax.random.key(1), x.b.shape)) if isinstance(x, lj.LoraWeight) else x, params,
      is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  ids = jnp.asarray(_ids((2, 7), seed=8))
  fwd = jax.jit(lj.implicit(models.forward), static_argnums=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = fwd(params, config, ids)
  merged = lj.merge(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_fwd(merged, config, ids)),
                             rtol=1e-4, atol=1e-4)
  # the same adapter in PEFT (experts and router as target_parameters)
  peft = pytest.importorskip("peft")
  lj.save_adapter(tmp_path / "ours", params, cfg, config=config)
  pm = peft.PeftModel.from_pretrained(_hf_model(model_type, list(FAMILY_CASES).index(
      model_type)), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(_hf_logits(pm, np.asarray(ids)), np.asarray(got), rtol=1e-4,
                             atol=1e-4)
  adapter, frozen = lj.split(params)

  def loss(ad, f):
    return jnp.sum(jnp.sin(f(lj.combine(ad, frozen), config, ids)))

  g = jax.jit(jax.grad(lambda ad: loss(ad, lj.implicit(models.forward))))(adapter)
  gd = jax.jit(jax.grad(lambda ad: loss(ad, lambda p, c, i: models.forward(lj.merge(p), c, i))))(
      adapter)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gd)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)


@pytest.mark.interop
def test_moe_checkpoint_errors(checkpoints, tmp_path):
  import safetensors.numpy as stnp
  m, path = checkpoints["mixtral"]
  t = stnp.load_file(str(path / "model.safetensors"))
  cfgj = json.loads((path / "config.json").read_text())

  def write(tensors, cfg=cfgj):
    for f in tmp_path.iterdir():
      f.unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    stnp.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

  extra = dict(t)
  extra["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = t[
      "model.layers.0.block_sparse_moe.experts.0.w1.weight"]
  write(extra)
  with pytest.raises(ValueError, match=r"experts\.4\.w1\.weight' is expert 4 of layer 0; "
                                       r"config.json has 4 experts"):
    models.load_hf(tmp_path)
  fewer = {k: v for k, v in t.items() if ".experts.3.w2." not in k}
  write(fewer)
  with pytest.raises(ValueError, match=r"lacks expert tensors \['model\.layers\.0\."
                                       r"block_sparse_moe\.experts\.3\.w2\.weight'"):
    models.load_hf(tmp_path)
  write(t, {**cfgj, "num_attention_heads": 3})
  with pytest.raises(ValueError, match="num_attention_heads=3 is not a multiple of "
                                       "num_key_value_heads=2"):
    models.load_hf(tmp_path)
  write(t, {**cfgj, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    models.load_hf(tmp_path)


GEMMA3_HUB = dict(TINY, model_type="gemma3_text", num_hidden_layers=8, head_dim=16,
                  rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=5,
                  rope_scaling={"rope_type": "linear", "factor": 8.0})


@pytest.mark.interop
@pytest.mark.parametrize("keys", [{}, {"sliding_window_pattern": 4}], ids=["default", "pattern4"])
def test_gemma3_config_keys_read_as_transformers(keys):
  """A Hub-style Gemma 3 config.json (old keys: rope_theta and rope_scaling for the global
  layers, rope_local_base_freq, sliding_window_pattern or its default 6) gives
  transformers' layer types and each layer type's rope frequencies."""
  d = {**GEMMA3_HUB, **keys}
  config = models.DecoderConfig.from_hf(d)
  hf = transformers.Gemma3TextConfig(**{k: v for k, v in d.items() if k != "model_type"})
  assert list(config.layer_types) == list(hf.layer_types)
  rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf)
  for t in models.decoder.LAYER_TYPES:
    np.testing.assert_allclose(models.decoder.rope_inv_freq(config, t),
                               getattr(rotary, f"{t}_inv_freq").numpy(), rtol=1e-7, err_msg=t)
  assert models.DecoderConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("bad, match", [
    ({"use_bidirectional_attention": True}, r"use_bidirectional_attention=True .*not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}},
     r"rope_parameters\['sliding_attention'\]: rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     r"rope_parameters must map layer types"),
    ({"sliding_window": None}, r"sliding_attention layers but sliding_window is null"),
], ids=["bidirectional", "rope_type", "flat_rope", "no_window"])
def test_gemma3_config_refusals_name_the_key(bad, match, tmp_path):
  d = {k: v for k, v in GEMMA3_HUB.items() if k not in ("rope_scaling",)}
  with pytest.raises(ValueError, match=match):
    models.DecoderConfig.from_hf({**d, **bad})
  (tmp_path / "config.json").write_text(json.dumps({**d, **bad}))
  with pytest.raises(ValueError, match=match):
    models.load_hf(tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "phi3", "gemma3_text"])
def test_lora_grads_under_scan_equal_unrolled(checkpoints, model_type):
  """Stacked layers under `scan` (mixed layer types: one scanned body) and unrolled ones
  give the same LoRA loss and adapter gradients."""
  m, path = checkpoints[model_type]
  config, flat = models.load_hf(path)
  is_lw = lambda x: isinstance(x, lj.LoraWeight)  # noqa: E731
  p_flat = lj.init(jax.random.key(0), flat, lj.LoraConfig(rank=2, alpha=4, targets="all-linear"))
  p_flat = jax.tree.map(lambda x: x.replace_children(b=0.2 * jax.random.normal(
      jax.random.key(x.a.size), x.b.shape)) if is_lw(x) else x, p_flat, is_leaf=is_lw)
  p_st = models.stack_layers(p_flat)       # the same factors, stacked on a leading axis
  ids = jnp.asarray(_ids((2, 9), seed=9))

  def loss(ad, frozen):
    return jnp.mean(jnp.sin(lj.implicit(models.forward)(lj.combine(ad, frozen), config, ids)))

  l1, g1 = jax.jit(jax.value_and_grad(loss))(*lj.split(p_flat))
  l2, g2 = jax.jit(jax.value_and_grad(loss))(*lj.split(p_st))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  g1 = models.stack_layers(g1)
  assert jax.tree.structure(g1) == jax.tree.structure(g2) and len(jax.tree.leaves(g2)) >= 8
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# PEFT target_parameters subsets: both expert weights, one of them in one layer only,
# the router alone
EXPERT_TARGETS = {
    "experts": ["experts.gate_up_proj", "experts.down_proj"],
    "down_in_layer1": ["model.layers.1.mlp.experts.down_proj", "gate.weight"],
    "gate_up_only": ["experts.gate_up_proj"],
}


@pytest.mark.interop
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("targets", list(EXPERT_TARGETS))
@pytest.mark.parametrize("model_type", MOE)
def test_peft_expert_adapters_both_ways(checkpoints, model_type, targets, stacked, tmp_path):
  """PEFT's `target_parameters` adapters on the routed experts (one LoRA per expert,
  nested parameter wrappers) load onto unrolled and scanned layers with PEFT's logits,
  stay factored, and what we save loads in PEFT with the same logits."""
  import warnings
  peft = pytest.importorskip("peft")
  m, path = checkpoints[model_type]
  seed = list(FAMILY_CASES).index(model_type)
  pm = peft.get_peft_model(_hf_model(model_type, seed), peft.LoraConfig(
      r=3, lora_alpha=5, target_modules=["v_proj"], target_parameters=EXPERT_TARGETS[targets],
      rank_pattern={"down_proj": 2}, use_rslora=True))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.1)
  pm.eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  config, base = models.load_hf(path, stacked=stacked)
  params = lj.load_adapter(tmp_path / "peft", base, config=config)
  ex = params["layers"]["mlp"]["experts"] if stacked else params["layers"][1]["mlp"]["experts"]
  assert isinstance(ex["down_proj" if "down" in targets or targets == "experts"
                       else "gate_up_proj"], lj.LoraWeight)
  ids = _ids((2, 9), seed=5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")    # a densifying fallback would warn
    got = np.asarray(jax.jit(lj.implicit(models.forward), static_argnums=1)(
        params, config, jnp.asarray(ids)))
  want = _hf_logits(pm, ids)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  lj.save_adapter(tmp_path / "ours", params, config=config)
  saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert saved["target_parameters"] and saved["use_rslora"] is False
  again = peft.PeftModel.from_pretrained(_hf_model(model_type, seed),
                                         str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(_hf_logits(again, ids), want, rtol=1e-5, atol=1e-5)
  back = lj.load_adapter(tmp_path / "ours", base, config=config)
  np.testing.assert_allclose(np.asarray(jax.jit(lj.implicit(models.forward), static_argnums=1)(
      back, config, jnp.asarray(ids))), got, rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_expert_adapter_refusals_name_the_key(checkpoints, tmp_path):
  import safetensors.numpy as stnp
  peft = pytest.importorskip("peft")
  m, path = checkpoints["mixtral"]
  pm = peft.get_peft_model(_hf_model("mixtral"), peft.LoraConfig(
      r=2, target_modules=["q_proj"], target_parameters=["experts.down_proj"]))
  pm.save_pretrained(str(tmp_path / "a"))
  config, base = models.load_hf(path)
  with pytest.raises(ValueError, match=r"target_parameters \['experts\.down_proj'\] name a "
                                       r"parameter of 'model\.layers\.0\.mlp\.experts'.*config=config"):
    lj.load_adapter(tmp_path / "a", base)
  # an adapter for 8 experts on a 4-expert base
  f = tmp_path / "a" / "adapter_model.safetensors"
  t = stnp.load_file(str(f))
  k = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
  t[k] = np.concatenate([t[k], t[k]])
  stnp.save_file(t, str(f), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts: lora_A \(16, 96\) and lora_B "
                                       r"\(64, 8\) do not pack 4 experts"):
    lj.load_adapter(tmp_path / "a", base, config=config)
  # DoRA on the experts has no PEFT layout
  from lora_jax.models import decoder
  params = lj.init(jax.random.key(0), base, lj.LoraConfig(
      rank=2, targets=r".*/experts/down_proj", use_dora=True, layouts=decoder.EXPERT_LAYOUTS))
  with pytest.raises(ValueError, match=r"layers/0/mlp/experts/down_proj: a DoraWeight on a "
                                       r"routed-expert or router weight has no PEFT layout"):
    lj.save_adapter(tmp_path / "b", params, config=config)


def _legacy_expert_adapter(model_type, root, full, r=2, seed=0):
  """A PEFT adapter as trained on transformers 4, whose experts were Linear modules
  (`...experts.{e}.w1`), written by hand: transformers 5 cannot build that model.
  Not `full`: the last expert and layer 1's up projection are left unadapted.
  Returns the tensors."""
  import safetensors.numpy as stnp
  cls_cfg, _, extra = FAMILY_CASES[model_type]
  cfg = getattr(transformers, cls_cfg)(**{**TINY, **extra})
  H = cfg.hidden_size
  inter = cfg.moe_intermediate_size if model_type == "qwen3_moe" else cfg.intermediate_size
  E = cfg.num_local_experts if model_type == "mixtral" else cfg.num_experts
  names, pre = (("w1", "w3", "w2"), "block_sparse_moe") if model_type == "mixtral" else (
      ("gate_proj", "up_proj", "down_proj"), "mlp")
  rng = np.random.RandomState(seed)
  t = {}
  for layer in range(cfg.num_hidden_layers):
    for e in range(E if full else E - 1):
      for n in names if full or layer != 1 else names[:1] + names[2:]:
        din, dout = (H, inter) if n != names[2] else (inter, H)
        k = f"base_model.model.model.layers.{layer}.{pre}.experts.{e}.{n}"
        t[k + ".lora_A.weight"] = rng.normal(0, 0.3, (r, din)).astype(np.float32)
        t[k + ".lora_B.weight"] = rng.normal(0, 0.3, (dout, r)).astype(np.float32)
    k = f"base_model.model.model.layers.{layer}.{pre}.gate"
    t[k + ".lora_A.weight"] = rng.normal(0, 0.3, (r, H)).astype(np.float32)
    t[k + ".lora_B.weight"] = rng.normal(0, 0.3, (E, r)).astype(np.float32)
  root.mkdir()
  stnp.save_file(t, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
  (root / "adapter_config.json").write_text(json.dumps({
      "peft_type": "LORA", "r": r, "lora_alpha": 3, "task_type": "CAUSAL_LM",
      "target_modules": list(names) + ["gate"],
      # PEFT 0.21's conversion keeps alpha_pattern keys under their transformers 4 names,
      # which then match nothing (w2's alpha is lost), so only the hand-made case has one
      "alpha_pattern": {} if full else {names[2]: 5}}))
  return t


@pytest.mark.interop
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("model_type", MOE)
def test_transformers4_expert_adapters_load_as_peft_converts_them(checkpoints, model_type,
                                                                  stacked, tmp_path):
  """Per-expert Linear adapters (transformers 4 layout) fuse onto the stacked experts
  (gate and up blocks at rank r_gate + r_up) with the logits PEFT gives after its own
  conversion of the same files; with experts or projections left out (which PEFT's
  conversion refuses), with the logits of the weights updated by hand."""
  peft = pytest.importorskip("peft")
  m, path = checkpoints[model_type]
  seed = list(FAMILY_CASES).index(model_type)
  ids = _ids((2, 9), seed=6)
  config, base = models.load_hf(path, stacked=stacked)
  fwd = jax.jit(lj.implicit(models.forward), static_argnums=1)
  for full in (True, False):
    root = tmp_path / f"v4-{full}"
    t = _legacy_expert_adapter(model_type, root, full)
    if full:
      want = _hf_logits(peft.PeftModel.from_pretrained(_hf_model(model_type, seed),
                                                       str(root)).eval(), ids)
    else:    # W <- W + s * B @ A on transformers 5's fused (E, out, in) expert weights
      hf = _hf_model(model_type, seed)
      sd = {k: v.clone() for k, v in hf.state_dict().items()}
      names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj",
                                                                   "down_proj")
      inter = sd["model.layers.0.mlp.experts.down_proj"].shape[-1]
      for k in t:
        if not k.endswith("lora_A.weight"):
          continue
        mod = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = torch.tensor(t[k.replace("lora_A", "lora_B")] @ t[k]) * (
            (5 if mod.endswith(names[2]) else 3) / 2)     # alpha / r
        layer = int(mod.split(".")[2])
        if mod.endswith(".gate"):
          sd[f"model.layers.{layer}.mlp.gate.weight"] += delta
          continue
        e, n = int(mod.split(".")[-2]), mod.split(".")[-1]
        if n == names[2]:
          sd[f"model.layers.{layer}.mlp.experts.down_proj"][e] += delta
        else:
          rows = slice(0, inter) if n == names[0] else slice(inter, 2 * inter)
          sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e, rows] += delta
      hf.load_state_dict(sd)
      want = _hf_logits(hf, ids)
    assert np.abs(want - _hf_logits(m, ids)).max() > 0.1     # the adapter does something
    params = lj.load_adapter(root, base, config=config)
    np.testing.assert_allclose(np.asarray(fwd(params, config, jnp.asarray(ids))), want,
                               rtol=1e-4, atol=1e-4)
