"""quantization vs bitsandbytes, run at test time on CPU: bytes, absmax, double quant,
dequantized values, state dicts of `Linear4bit`, and the 4-bit forward."""

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

CASES = [  # (out, in, block)
    (48, 64, 64), (40, 256, 32), (24, 512, 128), (17, 1024, 1024), (8, 4096, 4096),
    (96, 192, 64),
]


def _weight(out, inn, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((out, inn)) * 0.02).astype(dtype)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_bytes_absmax_nested_equal_quantize_4bit(fmt, dq, case):
  out, inn, block = case
  wt = _weight(out, inn, hash(case) % 1000)
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=block,
                                   compress_statistics=dq, quant_type=fmt)
  q = qz.quantize_array(jnp.asarray(wt.T), fmt, block, dq)   # our kernel is W.T (in, out)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  if dq:
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
    assert np.float32(q.offset) == state.offset.numpy()
  if block >= 2048:   # bnb's CPU dequantizer then falls back to a torch.compile'd path (slow)
    return
  ref = BF.dequantize_4bit(packed, state).numpy()
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), ref)
  np.testing.assert_array_equal(np.asarray(q.materialize()), ref.T)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bf16_weight_equal_bitsandbytes(fmt):
  wt = torch.from_numpy(_weight(32, 128, 5)).to(torch.bfloat16)
  packed, state = BF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type=fmt)
  q = qz.quantize_array(jnp.asarray(wt.float().numpy().T).astype(jnp.bfloat16), fmt, 64, True)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  ref = BF.dequantize_4bit(packed, state).float().numpy()
  assert q.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(q.materialize().astype(jnp.float32)), ref.T,
                             rtol=2 ** -8, atol=0)


def _linear4bit(wt, fmt, dq, bias=False):
  out, inn = wt.shape
  lin = bnb.nn.Linear4bit(inn, out, bias=bias, quant_type=fmt, compress_statistics=dq,
                          compute_dtype=torch.float32)
  lin.weight = bnb.nn.Params4bit(torch.from_numpy(wt.copy()), requires_grad=False,
                                 quant_type=fmt, compress_statistics=dq)
  return lin.to("cpu")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_state_dict_roundtrip_equals_linear4bit(fmt, dq):
  wt = _weight(48, 128, 7)
  lin = _linear4bit(wt, fmt, dq, bias=True)
  sd = {f"model.proj.{k}": v for k, v in lin.state_dict().items()}
  expected_keys = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{fmt}",
                   "bias"} | ({"weight.nested_absmax", "weight.nested_quant_map"} if dq else set())
  assert {k[len("model.proj."):] for k in sd} == expected_keys
  tree = qz.from_bnb_state_dict(sd)
  assert set(tree) == {"model.proj.weight", "model.proj.bias"}
  q = tree["model.proj.weight"]
  assert isinstance(q, qz.QuantizedArray) and q.shape == (128, 48) and q.double_quant == dq
  # our own quantization of the same matrix writes the same state dict, byte for byte
  ours = qz.to_bnb_state_dict({"model.proj.weight": qz.quantize_array(jnp.asarray(wt.T), fmt, 64, dq),
                               "model.proj.bias": tree["model.proj.bias"]})
  assert set(ours) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(ours[k], v.detach().numpy(), err_msg=k)
  # and the loaded array reproduces bnb's forward
  x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
  with torch.no_grad():
    y_ref = lin(torch.from_numpy(x)).numpy()
  bias = jnp.asarray(tree["model.proj.bias"].detach().numpy())
  y = lj.implicit(lambda w, x: x @ w + bias[None])(q, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)


def test_state_dict_loads_back_into_bitsandbytes():
  wt = _weight(32, 64, 9)
  q = qz.quantize_array(jnp.asarray(wt.T), "nf4", 64, True)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in qz.to_bnb_state_dict({"weight": q}).items()}
  # what transformers does for a pre-quantized bnb checkpoint
  lin = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
  stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
  lin.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats,
                                                   requires_grad=False, device="cpu", module=lin)
  x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
  with torch.no_grad():
    y_ref = lin(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(qz.matmul(jnp.asarray(x), q, "xla")), y_ref,
                             rtol=1e-5, atol=1e-6)


def test_missing_key_is_named():
  lin = _linear4bit(_weight(16, 64, 3), "nf4", True)
  sd = dict(lin.state_dict())
  del sd["weight.nested_absmax"]
  with pytest.raises(ValueError, match=r"weight: bitsandbytes state dict is missing key "
                                       r"'weight.nested_absmax'"):
    qz.from_bnb_state_dict(sd)
  sd = dict(lin.state_dict())
  del sd["weight.absmax"]
  with pytest.raises(ValueError, match=r"missing key 'weight.absmax'"):
    qz.from_bnb_state_dict(sd)


def test_to_bnb_rejects_formats_without_bnb_layout():
  q = qz.quantize_array(jnp.ones((64, 8)), "int4", 64)
  with pytest.raises(ValueError, match=r"w: format 'int4' has no bitsandbytes 4-bit layout"):
    qz.to_bnb_state_dict({"w": q})


@pytest.fixture(scope="module")
def bnb_llama(tmp_path_factory):
  """A tiny random Llama saved by transformers in float32 ("fp") and as bnb-4bit NF4 with
  double quant ("q4"), the 4-bit model itself, and a prompt."""
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("bnb_llama")
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(root / "fp")
  bq = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  m4 = transformers.LlamaForCausalLM.from_pretrained(
      root / "fp", quantization_config=bq, device_map="cpu", dtype=torch.float32)
  m4.save_pretrained(root / "q4")
  ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
  return root, m4, ids


@pytest.mark.slow
def test_transformers_bnb4bit_llama_checkpoint(bnb_llama):
  """A bnb-4bit Llama saved by transformers: `llama.load_hf` reads it as QuantizedArray
  kernels with the bytes our quantizer writes, and reproduces transformers' 4-bit logits."""
  from lora_jax.models import llama
  root, m4, ids = bnb_llama
  m4.train()     # eval mode on AVX512-BF16 CPUs would run bnb's bf16 kernel
  with torch.no_grad():
    ref = m4(ids).logits.numpy()

  _, dense = llama.load_hf(root / "fp")
  config, params = llama.load_hf(root / "q4")
  n = 0
  for i, layer in enumerate(params["layers"]):
    for group in ("self_attn", "mlp"):
      for proj, slot in layer[group].items():
        q = slot["kernel"]
        assert isinstance(q, qz.QuantizedArray), (i, proj, type(q))
        assert q.format == "nf4" and q.double_quant and q.dtype == jnp.float32
        ours = qz.quantize_array(dense["layers"][i][group][proj]["kernel"], "nf4", 64, True)
        np.testing.assert_array_equal(ours.codes, q.codes, err_msg=proj)
        np.testing.assert_array_equal(ours.absmax, q.absmax, err_msg=proj)
        np.testing.assert_array_equal(ours.nested_absmax, q.nested_absmax, err_msg=proj)
        assert np.float32(ours.offset) == np.float32(q.offset)
        n += 1
  assert n == 2 * 7
  assert not isinstance(params["embed_tokens"]["embedding"], qz.QuantizedArray)
  y = lj.implicit(llama.forward)(params, config, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  # stacked for scan: the same logits
  _, sparams = llama.load_hf(root / "q4", stacked=True)
  ys = lj.implicit(llama.forward)(sparams, config, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora,stacked", [(False, False), (True, False), (False, True)])
def test_peft_qlora_adapter_on_bnb_checkpoint(bnb_llama, tmp_path, use_dora, stacked):
  """PEFT's QLoRA (LoRA / DoRA on bnb Linear4bit) vs `lj.load_adapter` on the 4-bit
  checkpoint read by `llama.load_hf` (layers unrolled, or stacked for scan with the
  adapter on one layer only): same logits."""
  peft = pytest.importorskip("peft")
  from lora_jax.models import llama
  root, m4, ids = bnb_llama
  torch.manual_seed(2)
  pm = peft.get_peft_model(m4, peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, use_dora=use_dora,
      target_modules=["q_proj", "v_proj", "down_proj"],
      layers_to_transform=[1] if stacked else None))
  pm.train()
  with torch.no_grad():
    ref = pm(ids).logits.numpy()
  pm.save_pretrained(tmp_path / "adapter")
  pm.unload()          # leave the shared 4-bit model without LoRA layers

  config, params = llama.load_hf(root / "q4", stacked=stacked)
  lparams = lj.load_adapter(tmp_path / "adapter", params)
  layers = lparams["layers"] if stacked else lparams["layers"][0]
  kernel = layers["self_attn"]["q_proj"]["kernel"]
  assert isinstance(kernel, lj.DoraWeight if use_dora else lj.LoraWeight)
  assert isinstance(kernel.w, qz.QuantizedArray)
  y = lj.implicit(llama.forward)(lparams, config, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_custom_quant_map_rejected_and_padded_rows_not_written():
  sd = qz.to_bnb_state_dict({"w.weight": qz.quantize_array(jnp.ones((64, 8)), "nf4", 64, True)})
  bad = dict(sd, **{"w.weight.quant_map": sd["w.weight.quant_map"][::-1].copy()})
  with pytest.raises(ValueError, match=r"w.weight: quant_map differs from bitsandbytes' nf4"):
    qz.from_bnb_state_dict(bad)
  # blocks that straddle rows are read (flat layout, tests/test_quant_bnb_flat.py); our
  # padded rows layout has no bitsandbytes form and is refused with the fix named
  with pytest.raises(ValueError, match=r"p.weight: in_features 96 is padded by 32 .*"
                                       r"layout='flat'"):
    qz.to_bnb_state_dict({"p.weight": qz.quantize_array(jnp.ones((96, 6)), "nf4", 64)})


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("kind", ["zeros", "one_block", "zero_rows"])
def test_degenerate_weights_equal_bitsandbytes(fmt, kind):
  wt = {"zeros": np.zeros((4, 64), np.float32),
        "one_block": _weight(1, 64, 11),
        "zero_rows": np.concatenate([np.zeros((2, 128), np.float32), _weight(2, 128, 12)])}[kind]
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=64,
                                   compress_statistics=True, quant_type=fmt)
  q = qz.quantize_array(jnp.asarray(wt.T), fmt, 64, True)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()),
                                BF.dequantize_4bit(packed, state).numpy())
