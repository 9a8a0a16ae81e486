"""Fully trained leaves beside LoRA (PEFT's `modules_to_save`): the tree says what
trains, gradients equal the plain model's, and adapters with such modules move between
PEFT and us with equal logits (PEFT run at test time)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.models import llama

KEY = jax.random.key(0)


def _mlp():
  k1, k2, k3 = jax.random.split(KEY, 3)
  return {"up": {"kernel": jax.random.normal(k1, (8, 16)) / 3},
          "head": {"kernel": jax.random.normal(k2, (16, 4)) / 4, "bias": jnp.zeros(4)},
          "norm": {"scale": 1 + 0.1 * jax.random.normal(k3, (8,))},
          "step": jnp.asarray(0, jnp.int32)}


def _f(p, x):
  h = jnp.tanh((x * p["norm"]["scale"][None]) @ p["up"]["kernel"])
  return h @ p["head"]["kernel"] + p["head"]["bias"][None]


def test_split_mask_grad_and_merge():
  cfg = lj.LoraConfig(rank=2, targets="up/kernel", modules_to_save=["head/.*", "norm/scale"])
  params = lj.init(KEY, _mlp(), cfg)
  assert isinstance(params["head"]["kernel"], lj.Trainable)
  assert isinstance(params["norm"]["scale"], lj.Trainable)
  adapter, frozen = lj.split(params)
  # the fully trained leaves are on the adapter side, the base kernel is not
  assert adapter["head"]["kernel"].value is params["head"]["kernel"].value
  assert frozen["head"]["kernel"].value is None and adapter["up"]["kernel"].w is None
  mask = lj.trainable_mask(params)
  assert mask["norm"]["scale"].value and not mask["up"]["kernel"].w
  x = jax.random.normal(KEY, (5, 8))
  loss = lambda ad: jnp.sum(lj.implicit(_f)(lj.combine(ad, frozen), x) ** 2)  # noqa: E731
  g = jax.grad(loss)(adapter)
  plain = lj.merge(params)
  g_plain = jax.grad(lambda p: jnp.sum(_f(p, x) ** 2), allow_int=True)(plain)
  np.testing.assert_allclose(g["head"]["kernel"].value, g_plain["head"]["kernel"], rtol=1e-5)
  np.testing.assert_allclose(g["norm"]["scale"].value, g_plain["norm"]["scale"], rtol=1e-5,
                             atol=1e-6)
  chex.assert_trees_all_equal(plain["head"], _mlp()["head"])
  # an optax step moves the saved modules and the factors, nothing else
  opt = optax.sgd(1e-2)
  state = opt.init(adapter)
  upd, _ = opt.update(g, state, adapter)
  new = lj.combine(optax.apply_updates(adapter, upd), frozen)
  assert not np.allclose(new["head"]["kernel"].value, params["head"]["kernel"].value)
  np.testing.assert_array_equal(new["up"]["kernel"].w, params["up"]["kernel"].w)
  table = lj.summary(params)
  assert "head/kernel" in table and "full" in table
  want = 16 * 4 + 4 + 8 + 2 * (8 + 16)
  assert f"trainable params: {want:,}" in table


def test_modules_to_save_errors():
  with pytest.raises(ValueError, match=r"up/kernel: matched by both targets and modules_to_save"):
    lj.init(KEY, _mlp(), lj.LoraConfig(rank=2, targets="up/kernel", modules_to_save="up/.*"))
  with pytest.raises(ValueError, match=r"modules_to_save pattern 'haed/kernel' matches no"
                     r".*head/kernel"):
    lj.init(KEY, _mlp(), lj.LoraConfig(rank=2, targets="up/kernel", modules_to_save="haed/kernel"))
  with pytest.raises(TypeError, match=r"step: modules_to_save needs a plain floating array"):
    lj.init(KEY, _mlp(), lj.LoraConfig(rank=2, targets="up/kernel", modules_to_save="step"))


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_testing import IDS, hf_base, load_base, logits  # noqa: E402
_ifwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)


@pytest.mark.interop
@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_peft_modules_to_save_roundtrip(tmp_path, stacked):
  base = load_base(hf_base(tmp_path / "base"))
  pm = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
      modules_to_save=["lm_head", "norm"])).eval()
  with torch.no_grad():        # "trained": the saved copies differ from the base
    for n, p in pm.named_parameters():
      if "modules_to_save" in n:
        p.add_(0.1 * torch.randn_like(p))
  want = logits(pm)
  pm.save_pretrained(str(tmp_path / "peft"))

  config, params = llama.load_hf(tmp_path / "base")
  if stacked:
    params = llama.stack_layers(params)
  ours = lj.load_adapter(tmp_path / "peft", params)
  assert isinstance(ours["lm_head"]["kernel"], lj.Trainable)
  layer_norm = (ours["layers"]["input_layernorm"]["scale"] if stacked
                else ours["layers"][1]["input_layernorm"]["scale"])
  assert isinstance(layer_norm, lj.Trainable)
  np.testing.assert_allclose(_ifwd(ours, config, IDS), want, atol=1e-4)

  lj.save_adapter(tmp_path / "ours", ours)
  from safetensors.numpy import load_file
  a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
  b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
  fresh = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
  back = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(logits(back), want, atol=1e-4)
