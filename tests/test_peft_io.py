"""`save_adapter` / `load_adapter` against Hugging Face PEFT, computed at test time on a
tiny random Llama: PEFT's adapters load into ours with PEFT's logits, ours load into
PEFT with the same logits, and bad inputs fail with errors naming the key."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._dora import DoraWeight
from lora_jax._peft_io import LLAMA_NAME_MAP, load_adapter, save_adapter
from lora_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_testing import (IDS, hf_base as _hf_base, load_base as _load_base,  # noqa: E402
                        logits as _logits)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "rank_pattern": dict(r=4, lora_alpha=8,
                         rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                         alpha_pattern={"q_proj": 3}),
    # only layer 1 adapted: stacked params get identity (zero / ||W||) layer-0 slices
    "dora_layer1": dict(r=4, lora_alpha=8, use_dora=True, layers_to_transform=[1]),
}

_ifwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
_fwd = jax.jit(llama.forward, static_argnums=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return _hf_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def peft_adapters(base_dir, tmp_path_factory):
  """variant -> (adapter dir, PEFT logits)."""
  out = {}
  for name, kw in VARIANTS.items():
    pm = peft.get_peft_model(_load_base(base_dir), peft.LoraConfig(
        target_modules=ALL, init_lora_weights=False, **kw)).eval()
    if "dora" in name:   # a trained magnitude, not the initial column norms
      with torch.no_grad():
        for n, p in pm.named_parameters():
          if "lora_magnitude_vector" in n:
            p.mul_(torch.rand_like(p) + 0.5)
    d = tmp_path_factory.mktemp(name)
    pm.save_pretrained(str(d))
    out[name] = (d, _logits(pm))
  return out


# ----------------------------------------------------------------------------
# PEFT -> ours

@pytest.mark.interop
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_peft_adapter_gives_peft_logits(base_dir, peft_adapters, variant, stacked):
  adir, ref = peft_adapters[variant]
  config, params = llama.load_hf(base_dir, stacked=stacked)
  lp = load_adapter(adir, params)
  out = np.asarray(_ifwd(lp, config, jnp.asarray(IDS)))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  base = np.asarray(_fwd(params, config, jnp.asarray(IDS)))
  assert np.abs(base - ref).max() > 0.05   # the adapter matters
  leaves = dict(lj.leaves_with_paths(lp, is_leaf=lj.is_implicit))
  pre = "layers/" if stacked else "layers/1/"
  q = leaves[pre + "self_attn/q_proj/kernel"]
  assert isinstance(q, DoraWeight) == ("dora" in variant)
  if variant == "dora_layer1" and not stacked:
    assert not lj.is_implicit(leaves["layers/0/self_attn/q_proj/kernel"])
  assert isinstance(q, lj.LowRankWeight)   # DoRA is a low-rank weight, not a LoraWeight subclass
  if variant == "rslora":
    assert q.scale == pytest.approx(4 / np.sqrt(8))
  if variant == "rank_pattern":
    assert leaves[pre + "self_attn/v_proj/kernel"].rank == 2
    assert q.scale == pytest.approx(3 / 4)
    if not stacked:
      assert leaves["layers/1/mlp/down_proj/kernel"].rank == 6
      assert leaves["layers/1/self_attn/q_proj/kernel"].scale == pytest.approx(3 / 4)
      assert leaves["layers/0/mlp/down_proj/kernel"].rank == 4
  # merged weights give the same logits
  merged = np.asarray(_fwd(lj.merge(lp), config, jnp.asarray(IDS)))
  np.testing.assert_allclose(merged, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# ours -> PEFT

@pytest.mark.interop
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_adapter_loads_in_peft(base_dir, peft_adapters, variant, tmp_path):
  adir, ref = peft_adapters[variant]
  stacked = variant in ("rslora", "rank_pattern", "dora_layer1")  # both layouts are written
  config, params = llama.load_hf(base_dir, stacked=stacked)
  lp = load_adapter(adir, params)
  cfg = lj.LoraConfig(rank=8, alpha=4, rslora=True) if variant == "rslora" else None
  save_adapter(tmp_path, lp, cfg)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved["use_dora"] == ("dora" in variant)
  assert saved["use_rslora"] == (variant == "rslora")
  if variant != "dora_layer1":
    assert sorted(saved["target_modules"]) == sorted(ALL)
  pm = peft.PeftModel.from_pretrained(_load_base(base_dir), str(tmp_path)).eval()
  np.testing.assert_allclose(_logits(pm), ref, atol=1e-5, rtol=0)
  # and back into ours
  lp2 = load_adapter(tmp_path, params)
  np.testing.assert_allclose(np.asarray(_ifwd(lp2, config, jnp.asarray(IDS))), ref,
                             atol=1e-4, rtol=0)


@pytest.mark.interop
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_save_hf_loads_in_transformers(base_dir, peft_adapters, variant, tmp_path):
  adir, ref = peft_adapters[variant]
  config, params = llama.load_hf(base_dir, stacked=True)
  merged = lj.merge(load_adapter(adir, params))
  llama.save_hf(tmp_path, config, merged)
  np.testing.assert_allclose(_logits(_load_base(tmp_path)), ref, atol=1e-4, rtol=0)


@pytest.mark.interop
def test_our_lora_on_embeddings_and_lm_head_in_peft(base_dir, tmp_path):
  config, params = llama.load_hf(base_dir)
  cfg = lj.LoraConfig(rank=3, alpha=6, targets=[r"embed_tokens/embedding", r"lm_head/kernel",
                                                 r"layers/1/self_attn/q_proj/kernel"])
  lp = lj.init(jax.random.key(0), params, cfg)
  keys = iter(jax.random.split(jax.random.key(1), 8))
  lp = jax.tree.map(
      lambda x: dataclasses.replace(x, b=0.3 * jax.random.normal(next(keys), x.b.shape))
      if isinstance(x, lj.LowRankWeight) else x, lp, is_leaf=lambda x: isinstance(x, lj.LowRankWeight))
  ours = np.asarray(_ifwd(lp, config, jnp.asarray(IDS)))
  save_adapter(tmp_path, lp, cfg)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  # only layer 1's q_proj is adapted, so target_modules lists full module names
  assert sorted(saved["target_modules"]) == ["lm_head", "model.embed_tokens",
                                             "model.layers.1.self_attn.q_proj"]
  pm = peft.PeftModel.from_pretrained(_load_base(base_dir), str(tmp_path)).eval()
  np.testing.assert_allclose(_logits(pm), ours, atol=1e-4, rtol=0)
  base = np.asarray(_fwd(params, config, jnp.asarray(IDS)))
  assert np.abs(base - ours).max() > 0.05


# ----------------------------------------------------------------------------
# name maps (no peer needed)

def test_custom_name_map_roundtrip(tmp_path):
  k = iter(jax.random.split(jax.random.key(0), 8))
  params = {"h": [{"attn": {"c_attn": {"kernel": jax.random.normal(next(k), (6, 10))}}}
                  for _ in range(2)],
            "head": {"kernel": jax.random.normal(next(k), (6, 5))}}
  # our entries first: the first matching entry wins
  name_map = (("transformer.h.{layer}.attn.{proj}", "h/{layer}/attn/{proj}/kernel"),
              ("lm_head", "head/kernel")) + LLAMA_NAME_MAP
  cfg = lj.LoraConfig(rank=2, alpha=3, targets=r".*kernel")
  lp = lj.init(jax.random.key(1), params, cfg)
  lp = jax.tree.map(lambda x: dataclasses.replace(x, b=jnp.ones_like(x.b))
                    if isinstance(x, lj.LowRankWeight) else x, lp,
                    is_leaf=lambda x: isinstance(x, lj.LowRankWeight))
  save_adapter(tmp_path, lp, cfg, name_map=name_map)
  from lora_jax.checkpoint import read_safetensors
  keys = sorted(read_safetensors(tmp_path / "adapter_model.safetensors"))
  assert "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight" in keys
  assert "base_model.model.lm_head.lora_A.weight" in keys
  back = load_adapter(tmp_path, params, name_map=name_map)
  chex.assert_trees_all_close(lj.merge(back), lj.merge(lp))
  with pytest.raises(ValueError, match="lm_head.*maps to parameter 'lm_head/kernel'"):
    load_adapter(tmp_path, params)          # the Llama map does not know these names
  with pytest.raises(ValueError, match="name map"):
    save_adapter(tmp_path / "x", lp, cfg)   # nor can it name our paths


# ----------------------------------------------------------------------------
# bad input

def _copy_adapter(src, dst):
  dst.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _edit_config(d, **kw):
  p = d / "adapter_config.json"
  cfg = json.loads(p.read_text())
  cfg.update(kw)
  p.write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
  from safetensors.numpy import save_file

  from lora_jax.checkpoint import read_safetensors
  t = read_safetensors(d / "adapter_model.safetensors")
  save_file(fn(t), str(d / "adapter_model.safetensors"))


def test_bad_adapters(base_dir, peft_adapters, tmp_path):
  adir, _ = peft_adapters["lora"]
  _, params = llama.load_hf(base_dir)
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

  d = _copy_adapter(adir, tmp_path / "noconf")
  (d / "adapter_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "corrupt")
  (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
  with pytest.raises(ValueError, match="adapter_config.json.*not valid JSON"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "trunc")
  raw = (d / "adapter_model.safetensors").read_bytes()
  (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) - 100])
  with pytest.raises(ValueError, match="adapter_model.safetensors.*truncated or corrupt"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "nomodel")
  _edit_tensors(d, lambda t: {k.replace("self_attn.q_proj", "self_attn.qq_proj"): v
                              for k, v in t.items()})
  with pytest.raises(ValueError, match=r"qq_proj.*layers/0/self_attn/qq_proj/kernel.*closest"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "unmapped")
  _edit_tensors(d, lambda t: {k.replace("model.layers.", "encoder.block."): v
                              for k, v in t.items()})
  with pytest.raises(ValueError, match=r"encoder\.block\.0.*maps to no parameter"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "stray")
  _edit_tensors(d, lambda t: {**t, "base_model.model.model.norm.weight": np.ones(64, np.float32)})
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*neither a LoRA factor"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "conv")
  _edit_tensors(d, lambda t: {**t, key: t[key][:, :, None, None]})
  with pytest.raises(ValueError, match=r"q_proj.*not 2-D.*Conv"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "onlyA")
  _edit_tensors(d, lambda t: {k: v for k, v in t.items()
                              if k != key.replace("lora_A", "lora_B")})
  with pytest.raises(ValueError, match="q_proj.*needs both lora_A and lora_B"):
    load_adapter(d, params)

  d = _copy_adapter(adir, tmp_path / "rank")
  _edit_config(d, r=5)
  with pytest.raises(ValueError, match="rank 4 but adapter_config.json gives r=5"):
    load_adapter(d, params)

  for opt, val, msg in [("trainable_token_indices", [1, 2], "trainable token indices"),
                        ("bias", "all", "bias='all'"),
                        ("fan_in_fan_out", True, "fan_in_fan_out"),
                        ("peft_type", "IA3", "peft_type 'IA3'"),
                        ("use_dora", True, "magnitude vector is missing")]:
    d = _copy_adapter(adir, tmp_path / f"opt_{opt}")
    _edit_config(d, **{opt: val})
    with pytest.raises(ValueError, match=msg):
      load_adapter(d, params)

  # a tensor that is neither a factor nor in modules_to_save
  d = _copy_adapter(adir, tmp_path / "stray")
  from safetensors.numpy import load_file, save_file
  t = load_file(d / "adapter_model.safetensors")
  t["base_model.model.lm_head.weight"] = np.zeros((128, 64), np.float32)
  save_file(t, d / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=r"lm_head.weight.*neither a LoRA factor.*modules_to_save"):
    load_adapter(d, params)
  _edit_config(d, modules_to_save=["lm_head"])     # listed: a fully trained lm_head
  assert isinstance(load_adapter(d, params)["lm_head"]["kernel"], lj.Trainable)
  t["base_model.model.lm_head.weight"] = np.zeros((128, 32), np.float32)
  save_file(t, d / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=r"lm_head.weight has shape \(128, 32\); the base weight "
                     r"lm_head/kernel expects \(64, 128\)"):
    load_adapter(d, params)

  # an adapter made for another base (intermediate_size 96): shapes do not fit
  other = _hf_base(tmp_path / "other_base", intermediate_size=96)
  pm = peft.get_peft_model(_load_base(other), peft.LoraConfig(r=4, target_modules=ALL))
  pm.save_pretrained(str(tmp_path / "other_adapter"))
  with pytest.raises(ValueError, match=r"mlp\.down_proj.*do not fit the base weight.*another base"):
    load_adapter(tmp_path / "other_adapter", params)

  # loading onto a tree that already has LoRA leaves
  lp = load_adapter(adir, params)
  with pytest.raises(ValueError, match="already a LoraWeight"):
    load_adapter(adir, lp)
  # nothing to save
  with pytest.raises(ValueError, match="no LoraWeight"):
    save_adapter(tmp_path / "empty", params)
  assert not (tmp_path / "empty" / "adapter_config.json").exists()


def test_save_is_atomic_and_keeps_no_temp_files(base_dir, peft_adapters, tmp_path):
  adir, _ = peft_adapters["dora"]
  config, params = llama.load_hf(base_dir)
  save_adapter(tmp_path, load_adapter(adir, params))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
  del config
