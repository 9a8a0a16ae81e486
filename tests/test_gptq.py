"""GPTQ (`qz.gptq`, `qz.gptq_kernel`) against llm-compressor's GPTQ, run at test time.

Given the same weight and input second moment H, our integer codes equal
llm-compressor's `quantize_weight` exactly (symmetric and asymmetric, 3/4/8 bits,
group-wise and per channel, with and without activation order). On a whole tiny
Llama, both quantize from their own sequential calibration passes (H accumulated in
different precision and normalization, see quantization/_gptq.py): the codes agree
(all of them, as seen here), the per-layer reconstruction error on the float model's
calibration inputs is within 2% of theirs and clearly below round-to-nearest's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz


def _problem(seed, out=48, k=256, rows=1500):
  r = np.random.default_rng(seed)
  w = (r.standard_normal((out, k)) * 0.05).astype(np.float32)          # torch (out, in)
  x = (r.standard_normal((rows, k)) * (1 + 3 * r.random(k))).astype(np.float32)
  h = (2 * x.T.astype(np.float64) @ x / rows).astype(np.float32)
  return w, x, h


def _theirs(w, h, bits, group, symmetric, actorder):
  """llm-compressor's quantize_weight with compressed-tensors' min-max qparams:
  (codes int8 (out, in), dequantized (out, in), loss)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("llmcompressor")
  from compressed_tensors.quantization import QuantizationArgs
  from compressed_tensors.quantization.lifecycle.forward import quantize
  from compressed_tensors.quantization.utils import calculate_qparams
  from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
  out, k = w.shape
  wt = torch.tensor(w)
  if group == -1:
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel", actorder=actorder)
    s, z = calculate_qparams(wt.amin(-1, keepdim=True), wt.amax(-1, keepdim=True), args)
  else:
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group, actorder=actorder)
    g = wt.reshape(out, k // group, group)
    s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
  q, loss, _ = quantize_weight(wt[None].clone(), torch.tensor(h)[None].clone(), s[None], z[None],
                               None, args, blocksize=128, percdamp=0.01)
  return quantize(q[0], s, z, args, dtype=torch.int8).numpy(), q[0].numpy(), float(loss[0])


@pytest.mark.interop
@pytest.mark.parametrize("bits,group,symmetric,actorder", [
    (4, 64, True, None), (4, 64, False, None), (4, 64, True, "weight"),
    (4, 64, False, "weight"), (3, 128, False, None), (8, -1, True, None),
    (3, 32, True, "weight")])
def test_gptq_kernel_equals_llmcompressor(bits, group, symmetric, actorder):
  w, x, h = _problem(bits + group)
  q_ct, d_ct, loss_ct = _theirs(w, h, bits, group, symmetric, actorder)
  cfg = qz.QuantConfig(f"int{bits}", group, symmetric=symmetric,
                       act_order="weight" if actorder else False)
  q, loss = qz.gptq_kernel(jnp.asarray(w.T), jnp.asarray(h), cfg)
  np.testing.assert_array_equal(np.asarray(q.codes()), q_ct)
  np.testing.assert_allclose(np.asarray(q.dequantize_t()), d_ct, rtol=0, atol=0)
  np.testing.assert_allclose(loss, loss_ct, rtol=1e-5)
  # and GPTQ beats round-to-nearest on these inputs
  rtn = np.asarray(qz.quantize_kernel(jnp.asarray(w.T), qz.QuantConfig(
      f"int{bits}", group, symmetric=symmetric)).dequantize_t())
  err = lambda d: float((((d - w) @ x.T) ** 2).sum())  # noqa: E731
  assert err(np.asarray(q.dequantize_t())) < 0.97 * err(rtn)


def test_group_act_order_stores_g_idx_in_activation_order():
  """act_order="group": groups are formed in order of decreasing diag(H), the g_idx says
  so, and the leaf dequantizes through it (and the result is still better than RTN)."""
  w, x, h = _problem(3, k=128)
  q, _ = qz.gptq_kernel(jnp.asarray(w.T), jnp.asarray(h),
                        qz.QuantConfig("int4", 32, symmetric=False, act_order="group"))
  perm = np.argsort(-np.diag(h), kind="stable")
  want = np.empty(128, np.int32)
  want[perm] = np.arange(128) // 32
  np.testing.assert_array_equal(np.asarray(q.g_idx), want)
  codes = np.asarray(q.codes()).astype(np.float32)
  deq = (codes - np.asarray(q.zeros, np.float32)[:, want]) * np.asarray(q.scales)[:, want]
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), deq)
  rtn = np.asarray(qz.quantize_kernel(jnp.asarray(w.T), qz.QuantConfig(
      "int4", 32, symmetric=False)).dequantize_t())
  err = lambda d: float((((d - w) @ x.T) ** 2).sum())  # noqa: E731
  assert err(deq) < err(rtn)


# ----------------------------------------------------------------------------
# qz.gptq over a model function

L, D = 2, 64


def _mlp_params(seed=0, stacked=True):
  k = jax.random.split(jax.random.key(seed), 3)
  up = jax.random.normal(k[0], (L, D, 2 * D)) * 0.1
  down = jax.random.normal(k[1], (L, 2 * D, D)) * 0.1
  head = jax.random.normal(k[2], (D, 16)) * 0.1
  if stacked:
    return {"layers": {"up": up, "down": down}, "head": head}
  return {"layers": [{"up": up[i], "down": down[i]} for i in range(L)], "head": head}


def _block(h, lp):
  return h + jnp.tanh(h @ lp["up"]) @ lp["down"]


def _stacked_fwd(p, x):
  return jax.lax.scan(lambda h, lp: (_block(h, lp), None), x, p["layers"])[0] @ p["head"]


def _unrolled_fwd(p, x):
  h = x
  for lp in p["layers"]:
    h = _block(h, lp)
  return h @ p["head"]


BATCHES = [jax.random.normal(jax.random.key(10 + i), (4, 16, D)) for i in range(3)]
CFG = qz.QuantConfig("int4", 32, symmetric=False)


@pytest.fixture(scope="module")
def stacked_result():
  return qz.gptq(_mlp_params(), _stacked_fwd, BATCHES, CFG, return_losses=True)


def test_scan_stacked_equals_unrolled_layers(stacked_result):
  """The same model, layers stacked under `scan` or unrolled: the same stages, the same
  codes, slice for slice."""
  q_s, losses_s = stacked_result
  q_u, losses_u = qz.gptq(_mlp_params(stacked=False), _unrolled_fwd, BATCHES, CFG,
                          return_losses=True)
  assert isinstance(q_s["layers"]["up"], qz.GroupQuantizedArray)
  assert q_s["layers"]["up"].shape == (L, D, 2 * D)
  for i in range(L):
    for name in ("up", "down"):
      np.testing.assert_array_equal(np.asarray(q_s["layers"][name].codes()[i]),
                                    np.asarray(q_u["layers"][i][name].codes()))
  assert sorted(losses_s) == sorted(["layers/up[0]", "layers/down[0]", "layers/up[1]",
                                     "layers/down[1]", "head"])
  np.testing.assert_allclose(losses_s["head"], losses_u["head"], rtol=1e-5)


def test_later_layers_see_the_quantized_earlier_ones(stacked_result):
  """Layer 1's H comes from inputs computed with layer 0 already quantized: redo it by
  hand with gptq_kernel and compare."""
  q_s, _ = stacked_result
  p = _mlp_params()
  lay0 = {"up": q_s["layers"]["up"].materialize()[0], "down": q_s["layers"]["down"].materialize()[0]}
  xs = jnp.concatenate([b.reshape(-1, D) for b in BATCHES])
  h1 = _block(xs, lay0)                                   # layer 1's input, layer 0 quantized
  hess = 2 * np.asarray(h1, np.float64).T @ np.asarray(h1, np.float64) / h1.shape[0]
  q1, _ = qz.gptq_kernel(p["layers"]["up"][1], jnp.asarray(hess, jnp.float32), CFG)
  np.testing.assert_array_equal(np.asarray(q1.codes()), np.asarray(q_s["layers"]["up"].codes()[1]))
  # the float model's inputs would give another H (so the test can fail)
  f1 = _block(xs, {"up": p["layers"]["up"][0], "down": p["layers"]["down"][0]})
  assert float(jnp.max(jnp.abs(f1 - h1))) > 1e-3


def test_gptq_beats_rtn_on_the_model_output(stacked_result):
  q_s, _ = stacked_result
  p = _mlp_params()
  x = jax.random.normal(jax.random.key(99), (4, 16, D))
  ref = _stacked_fwd(p, x)
  err = lambda q: float(jnp.mean((lj.implicit(_stacked_fwd)(q, x) - ref) ** 2))  # noqa: E731
  assert err(q_s) < 0.8 * err(qz.quantize(p, CFG))


def test_gptq_bad_input():
  p = {"emb": jnp.ones((16, 8)), "w": jax.random.normal(jax.random.key(0), (8, 4))}
  fwd = lambda p, ids: p["emb"][ids] @ p["w"]  # noqa: E731
  ids = [jnp.arange(6)[None]]
  with pytest.raises(ValueError, match="GPTQ quantizes to the group-wise integer formats"):
    qz.gptq(p, fwd, ids, qz.QuantConfig("nf4", 64))
  with pytest.raises(ValueError, match="target emb is never used by forward as the weight"):
    qz.gptq(p, fwd, ids, qz.QuantConfig("int4", 32, symmetric=True))
  with pytest.raises(ValueError, match="calibration_batches is empty"):
    qz.gptq(p, fwd, [], qz.QuantConfig("int4", 32, symmetric=True, targets="w"))
  with pytest.raises(ValueError, match=r"calibration batch 0 .* does not fit forward"):
    qz.gptq(p, lambda p, x: x @ p["w"], [jnp.ones((2, 5))],
            qz.QuantConfig("int4", 32, symmetric=True, targets="w"))
  with pytest.raises(ValueError, match=r"target w is a LoraWeight"):
    qz.gptq(lj.init(jax.random.key(0), p, lj.LoraConfig(rank=2, targets="w")), fwd, ids,
            qz.QuantConfig("int4", 32, symmetric=True, targets="w"))
  with pytest.raises(ValueError, match=r"hessian \(4, 4\) does not fit kernel \(8, 4\)"):
    qz.gptq_kernel(p["w"], jnp.eye(4), qz.QuantConfig("int4", 32, symmetric=True))


# ----------------------------------------------------------------------------
# a whole tiny Llama against llm-compressor's GPTQModifier

@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
  """(float params, config, calibration ids, llm-compressor's quantized torch model,
  its quant args) for a tiny Llama; one oneshot run per module."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("llmcompressor")
  import hf_testing
  from datasets import Dataset
  from llmcompressor import oneshot
  from llmcompressor.modifiers.gptq import GPTQModifier
  from tokenizers import Tokenizer
  from tokenizers import models as tm

  from lora_jax.models import llama
  d = tmp_path_factory.mktemp("gptq_llama")
  hf_testing.hf_base(d / "base", seed=3)
  tok = Tokenizer(tm.WordLevel({f"t{i}": i for i in range(128)} | {"[UNK]": 0},
                               unk_token="[UNK]"))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(d / "base"))
  ids = np.random.RandomState(7).randint(0, 128, (8, 32))
  data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 32] * 8})
  model = hf_testing.load_base(d / "base")
  recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], actorder=None, config_groups={
      "g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                               "symmetric": False, "strategy": "group",
                                               "group_size": 32}}})
  # each projection's input second moment in the float model: the yardstick
  float_model = hf_testing.load_base(d / "base")
  hess, hooks = {}, []
  for name, mod in float_model.named_modules():
    if isinstance(mod, torch.nn.Linear) and "layers" in name:
      def hook(m, args, out, name=name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        hess[name] = hess.get(name, 0) + (x.T @ x).numpy()
      hooks.append(mod.register_forward_hook(hook))
  with torch.no_grad():
    float_model(torch.tensor(ids))
  for h in hooks:
    h.remove()
  torch.manual_seed(0)
  oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=8,
          max_seq_length=32, processor=transformers.AutoTokenizer.from_pretrained(
              str(d / "base")))
  config, params = llama.load_hf(d / "base")
  return params, config, ids, model, hess


@pytest.mark.interop
@pytest.mark.slow
def test_llama_gptq_matches_llmcompressor(llama_pair):
  torch = pytest.importorskip("torch")
  from compressed_tensors.quantization.lifecycle.forward import quantize
  from lora_jax.models import llama
  params, config, ids, model, hess = llama_pair
  cfg = qz.QuantConfig("int4", 32, symmetric=False, targets=r"layers/\d+/.*_proj/kernel")
  ours = qz.gptq(params, lambda p, x: llama.forward(p, config, x),
                 [jnp.asarray(ids[i:i + 1]) for i in range(8)], cfg)
  rtn = qz.quantize(params, cfg)
  # a common yardstick: each layer's input second moment in the float model
  hs = {}
  for name, mod in model.named_modules():
    if hasattr(mod, "weight_scale"):
      hs[name] = mod
  assert len(hs) == 14                                   # 7 projections x 2 layers
  agree, ratios = [], []
  import re
  for name, mod in hs.items():
    i, kind, proj = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", name).groups()
    q = ours["layers"][int(i)][kind][proj]["kernel"]
    their_codes = quantize(mod.weight.detach(), mod.weight_scale, mod.weight_zero_point,
                           mod.quantization_scheme.weights, dtype=torch.int8).numpy()
    agree.append(float(np.mean(np.asarray(q.codes()) == their_codes)))
    w = np.asarray(params["layers"][int(i)][kind][proj]["kernel"]).T
    d_ours = np.asarray(q.dequantize_t()) - w
    d_theirs = mod.weight.detach().numpy() - w
    d_rtn = np.asarray(rtn["layers"][int(i)][kind][proj]["kernel"].dequantize_t()) - w
    # reconstruction error on the float model's calibration inputs: tr(D H D^T)
    e = lambda dd: float(np.einsum("oi,ij,oj->", dd, hess[name], dd))  # noqa: E731
    ratios.append((e(d_ours) / e(d_theirs), e(d_ours) / e(d_rtn)))
  # Seen here: every code of all 14 projections equal. A borderline value may round the
  # other way where H was summed in another order, so allow one in a thousand.
  assert min(agree) >= 0.999, agree
  ratios = np.asarray(ratios)
  assert np.all(np.abs(ratios[:, 0] - 1) < 0.02), ratios[:, 0]     # within 2% of theirs
  assert np.all(ratios[:, 1] < 0.9), ratios[:, 1]                  # clearly below RTN
  # logits of the two quantized models against the float model
  x = jnp.asarray(ids[:2])
  ref = np.asarray(llama.forward(params, config, x))
  with torch.no_grad():
    theirs = model(torch.tensor(ids[:2])).logits.numpy()
  e_ours = float(np.mean((np.asarray(lj.implicit(llama.forward)(ours, config, x)) - ref) ** 2))
  e_theirs = float(np.mean((theirs - ref) ** 2))
  e_rtn = float(np.mean((np.asarray(lj.implicit(llama.forward)(rtn, config, x)) - ref) ** 2))
  assert e_ours < 1.1 * e_theirs and e_ours < 0.9 * e_rtn, (e_ours, e_theirs, e_rtn)
