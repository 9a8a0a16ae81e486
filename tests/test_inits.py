"""PiSSA and OLoRA initialisation and their conversion to a plain LoRA, against PEFT
computed at test time on a tiny random Llama, plus the properties that must hold
(function unchanged at init, conversion keeps the merged weights)."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from hf_testing import IDS, TINY, hf_base, logits  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = r"layers/\d+/(self_attn|mlp)/.*_proj/kernel"
_ifwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
is_lw = lambda x: isinstance(x, lj.LoraWeight)  # noqa: E731


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return hf_base(tmp_path_factory.mktemp("base"))


def _peft_model(base_dir, kind):
  m = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
  return peft.get_peft_model(m.eval(), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=kind)).eval()


def _peft_module(pm, layer, proj):
  group = "self_attn" if proj in ALL[:4] else "mlp"
  return getattr(getattr(pm.base_model.model.model.layers[layer], group), proj)


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_init_matches_peft(base_dir, kind):
  pm = _peft_model(base_dir, kind)
  config, base = llama.load_hf(base_dir)
  params = lj.init(jax.random.key(0), base, lj.LoraConfig(rank=4, alpha=8, targets=TARGETS,
                                                          init=kind))
  for layer in range(TINY["num_hidden_layers"]):
    for proj in ALL:
      group = "self_attn" if proj in ALL[:4] else "mlp"
      ours = params["layers"][layer][group][proj]["kernel"]
      mod = _peft_module(pm, layer, proj)
      w = mod.base_layer.weight.detach().numpy().T                  # residual, (in, out)
      a = mod.lora_A["default"].weight.detach().numpy().T            # (in, r)
      b = mod.lora_B["default"].weight.detach().numpy().T            # (r, out)
      np.testing.assert_allclose(ours.w, w, atol=1e-5,  # float32 SVD in LAPACK vs torch
                                 err_msg=f"{layer} {proj} residual")
      # singular/QR vectors are defined up to a sign per component
      sign = np.sign(np.sum(np.asarray(ours.a) * a, axis=0))
      assert np.all(sign != 0)
      np.testing.assert_allclose(np.asarray(ours.a) * sign, a, atol=1e-4, err_msg=f"{layer} {proj} a")
      np.testing.assert_allclose(np.asarray(ours.b) * sign[:, None], b, atol=1e-4, err_msg=f"{layer} {proj} b")
  # the function is unchanged, and equal to PEFT's
  want = logits(pm)
  np.testing.assert_allclose(_ifwd(params, config, IDS), want, atol=1e-4)
  np.testing.assert_allclose(llama.forward(base, config, IDS), want, atol=1e-4)


@pytest.mark.parametrize("kind", ["pissa", "olora"])
@pytest.mark.parametrize("layout", ["io", "lio", "iio"])
def test_init_keeps_function_and_takes_the_principal_part(kind, layout):
  shape = {"io": (24, 40), "lio": (3, 24, 40), "iio": (4, 6, 40)}[layout]
  w = jax.random.normal(jax.random.key(1), shape)
  p = lj.init(jax.random.key(0), {"k": w}, lj.LoraConfig(
      rank=5, alpha=10, targets="k", init=kind, layouts={"k": layout}))["k"]
  np.testing.assert_allclose(lj.merge({"k": p})["k"], w, atol=1e-5)
  mat = np.asarray(w).reshape(*shape[:-len(layout.lstrip("l"))], -1, 40)
  delta = np.asarray(p.delta()).reshape(mat.shape)
  if kind == "pissa":   # s * a @ b is the best rank-5 approximation (Eckart-Young)
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    best = (u[..., :5] * s[..., None, :5]) @ vh[..., :5, :]
    np.testing.assert_allclose(delta, best, atol=1e-4)
  else:                 # b's rows are orthonormal (OLoRA's Q)
    b = np.asarray(p.b).reshape(*p.b.shape[:-1], -1)
    eye = np.broadcast_to(np.eye(5), b.shape[:-2] + (5, 5))
    np.testing.assert_allclose(b @ np.swapaxes(b, -1, -2), eye, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_conversion_to_plain_lora_matches_peft(base_dir, tmp_path, kind):
  """PEFT trains on the residual and saves with path_initial_model_for_weight_conversion;
  our to_standard_lora + save_adapter of the same adapter gives the same tensors, and
  each loads on the original base with the trained model's logits."""
  pm = _peft_model(base_dir, kind)
  pm.peft_config["default"].init_lora_weights = True       # PEFT's documented recipe
  pm.save_pretrained(str(tmp_path / "init"))
  pm.peft_config["default"].init_lora_weights = kind
  with torch.no_grad():                                       # "training"
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.add_(0.05 * torch.randn_like(p))
  trained_logits = logits(pm)
  pm.save_pretrained(str(tmp_path / "trained"))
  pm.save_pretrained(str(tmp_path / "peft_conv"),
                     path_initial_model_for_weight_conversion=str(tmp_path / "init"))

  config, original = llama.load_hf(base_dir)
  initial = lj.init(jax.random.key(0), original, lj.LoraConfig(
      rank=4, alpha=8, targets=TARGETS, init=kind))
  residual = jax.tree.map(lambda x: x.w if is_lw(x) else x, initial, is_leaf=is_lw)
  # our copies of PEFT's initial and trained factors, on our residual base
  init_peft = lj.load_adapter(tmp_path / "init", residual)
  with pytest.warns(UserWarning, match=f"init_lora_weights='{kind}': .*residual base"):
    trained = lj.load_adapter(tmp_path / "trained", residual)
  np.testing.assert_allclose(_ifwd(trained, config, IDS), trained_logits, atol=1e-4)

  converted = lj.to_standard_lora(trained, init_peft)
  chex.assert_trees_all_close(lj.merge(converted), lj.merge(trained), atol=1e-5)
  lj.save_adapter(tmp_path / "ours_conv", converted)
  ours_cfg = json.loads((tmp_path / "ours_conv" / "adapter_config.json").read_text())
  peft_cfg = json.loads((tmp_path / "peft_conv" / "adapter_config.json").read_text())
  assert (ours_cfg["r"], ours_cfg["lora_alpha"]) == (peft_cfg["r"], peft_cfg["lora_alpha"]) \
      == (8, 16)
  from safetensors.numpy import load_file
  ours_t = load_file(tmp_path / "ours_conv" / "adapter_model.safetensors")
  peft_t = load_file(tmp_path / "peft_conv" / "adapter_model.safetensors")
  assert ours_t.keys() == peft_t.keys()
  for k in ours_t:
    np.testing.assert_allclose(ours_t[k], peft_t[k], atol=1e-6, err_msg=k)
  # the converted adapter on the ORIGINAL base is the trained model, in ours and PEFT
  m = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
  pc = peft.PeftModel.from_pretrained(m.eval(), str(tmp_path / "ours_conv")).eval()
  np.testing.assert_allclose(logits(pc), trained_logits, atol=1e-4)
  np.testing.assert_allclose(_ifwd(lj.load_adapter(tmp_path / "peft_conv", original), config,
                                   IDS), trained_logits, atol=1e-4)


def test_mutating_init_errors():
  import quantization as qz
  w = {"k": jax.random.normal(jax.random.key(0), (64, 32))}
  q = qz.quantize(w, qz.QuantConfig("nf4", 64, targets="k"))
  with pytest.raises(TypeError, match=r"k: init='pissa' .*QuantizedArray.*quantize afterwards"):
    lj.init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k", init="pissa"))
  p = lj.init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="k", init="olora"))
  other = lj.init(jax.random.key(0), w, lj.LoraConfig(rank=3, targets="k"))
  with pytest.raises(ValueError, match=r"k: `initial` has no LoraWeight .*a \(64, 2\).*a \(64, 3\)"):
    lj.to_standard_lora(p, other)
  with pytest.raises(ValueError, match="init must be one of"):
    lj.LoraConfig(init="loftq_typo")
  # DoRA on a mutated base still starts as the original function
  d = lj.init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="k", init="pissa",
                                                  use_dora=True))
  np.testing.assert_allclose(lj.merge(d)["k"], w["k"], atol=1e-5)


@pytest.mark.parametrize("layout", ["io", "lio"])
def test_pissa_niter_finds_the_principal_part(layout):
  """Randomized subspace iteration (PEFT's "pissa_niter_n"): with a decaying spectrum,
  s * a @ b is close to the exact top-r part; the residual keeps W exactly."""
  rng = np.random.default_rng(0)
  batch = (2,) if layout == "lio" else ()
  u, _ = np.linalg.qr(rng.normal(size=batch + (48, 48)))
  v, _ = np.linalg.qr(rng.normal(size=batch + (40, 40)))
  s = 0.3 ** np.arange(40)
  w = jnp.asarray((u[..., :, :40] * s) @ np.swapaxes(v, -1, -2), jnp.float32)
  cfg = lj.LoraConfig(rank=4, alpha=8, targets="k", init="pissa_niter_4",
                      layouts={"k": layout})
  p = lj.init(jax.random.key(3), {"k": w}, cfg)["k"]
  np.testing.assert_allclose(lj.merge({"k": p})["k"], w, atol=1e-5)
  exact = lj.init(jax.random.key(3), {"k": w}, dataclasses.replace(cfg, init="pissa"))["k"]
  # subspace iteration converges like (s_5 / s_4)^(2 niter + 1) = 0.3^9 of s_5
  np.testing.assert_allclose(p.delta(), exact.delta(), atol=1e-4)
  with pytest.raises(ValueError, match="pissa_niter_<n>"):
    lj.LoraConfig(init="pissa_niter_x")
