"""bitsandbytes' layout for any shape (blocks over the flattened weight, crossing rows),
and FP4's signed zero, against bitsandbytes 0.50 at test time on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import lora_jax as lj
import quantization as qz
from quantization import _formats as F

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

CASES = [  # (out, in, block): in not a multiple of the block, or smaller than it
    (300, 400, 64), (1024, 1024, 4096), (96, 40, 64),
]


def _weight(out, inn, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((out, inn)) * 0.02).astype(dtype)


def _bits(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32)


def _bnb_cpu_is_avx512() -> bool:
  try:
    from bitsandbytes.backends.cpu import ops
    return bool(getattr(ops, "_has_avx512", False))
  except Exception:  # noqa: BLE001
    return False


def _dq_bits(x) -> np.ndarray:
  """Bits of a dequantized weight, to compare with bitsandbytes on this CPU. FP4's code 8
  dequantizes to -0.0 in bnb's CUDA kernel (`0.0f * sign`) and its CPU C kernel on other
  CPUs, which is what we give (asserted in the zeros test); on AVX512 CPUs every bnb CPU
  path gives +0.0, so there the two zeros are compared by value, every other bit still
  by bits."""
  b = _bits(x)
  return np.where(b == 0x80000000, np.uint32(0), b) if _bnb_cpu_is_avx512() else b


def _bnb_dequant_is_kernel(block: int, inn: int) -> bool:
  """bitsandbytes' CPU `dequantize_4bit` runs its C kernel (or, on AVX512 CPUs, its
  eager reference code: see conftest), except for odd in_features, where it runs a
  torch.compile'd fallback (slow to compile, and its FP4 code 8 is +0.0 where the
  kernel gives -0.0)."""
  return inn % 2 == 0


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_flat_bytes_and_dequantize_equal_bitsandbytes(fmt, dq, case):
  out, inn, block = case
  wt = _weight(out, inn, out + inn)
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=block,
                                   compress_statistics=dq, quant_type=fmt)
  q = qz.quantize_array(jnp.asarray(wt.T), fmt, block, dq, layout="flat")
  assert q.layout == "flat" and q.shape == (inn, out) and q.pad == 0 and q.nbatch == 0
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
  if dq:
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
    assert _bits(q.offset) == _bits(state.offset.numpy())
  if _bnb_dequant_is_kernel(block, inn):
    ref = BF.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(_dq_bits(q.dequantize_t()), _dq_bits(ref))
    np.testing.assert_array_equal(_dq_bits(q.materialize()), _dq_bits(ref.T))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(3, 5), (7, 9), (1, 33)])
def test_flat_odd_sizes_equal_quantize_4bit(fmt, shape):
  """An odd number of values (the last byte's low nibble is the code of 0.0) and a
  trailing partial block (bnb divides by its absmax, clamped at 1e-38, and stores it)."""
  out, inn = shape
  wt = _weight(out, inn, 3)
  wt[-1, -1] = 0.0
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=32, quant_type=fmt)
  q = qz.quantize_array(jnp.asarray(wt.T), fmt, 32, layout="flat")
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
  # bnb's dequantizer for odd in_features compiles a torch fallback (seconds); its
  # arithmetic is the table times the block's absmax, computed here from bnb's state
  nib = np.stack([packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15], -1)
  vals = state.code.numpy()[nib.reshape(-1)[:out * inn]]
  ref = (vals * np.repeat(state.absmax.numpy(), 32)[:out * inn]).reshape(out, inn)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), ref)


def test_flat_zero_tail_block_stores_clamped_absmax():
  wt = np.concatenate([_weight(1, 64, 1), np.zeros((1, 64), np.float32)], 1)[:, :80]
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=64, quant_type="nf4")
  q = qz.quantize_array(jnp.asarray(wt.T), "nf4", 64, layout="flat")
  np.testing.assert_array_equal(_bits(q.absmax), _bits(state.absmax.numpy()))
  np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.materialize())[64:], 0.0)


# ----------------------------------------------------------------------------
# FP4's zero: the table (quant_map) is +0.0 at code 8, bnb's kernels dequantize it to -0.0

def test_fp4_table_and_zeros_bitwise_equal_bitsandbytes():
  np.testing.assert_array_equal(_bits(F.FP4), _bits(BF.get_4bit_type("fp4", device="cpu")))
  np.testing.assert_array_equal(_bits(F.NF4), _bits(BF.get_4bit_type("nf4", device="cpu")))
  # a weight whose blocks hold +0, -0, tiny values of both signs (codes 0 and 8)
  wt = np.tile(np.array([1.0, 0.001, -0.001, 0.0, -0.0, 1e-6, -1e-6, 0.5], np.float32),
               (4, 16))
  packed, state = BF.quantize_4bit(torch.from_numpy(wt), blocksize=64, quant_type="fp4")
  np.testing.assert_array_equal(_bits(F.FP4), _bits(state.code))
  q = qz.quantize_array(jnp.asarray(wt.T), "fp4", 64)
  nibbles = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1)
  assert {0, 8} <= set(np.unique(nibbles).tolist())
  ref = BF.dequantize_4bit(packed, state).numpy()
  np.testing.assert_array_equal(_dq_bits(q.dequantize_t()), _dq_bits(ref))
  np.testing.assert_array_equal(_dq_bits(q.materialize()), _dq_bits(ref.T))
  # code 8 is -0.0 (bnb's CUDA kernel: `0.0f * sign`), code 0 is +0.0
  codes = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1).reshape(-1)
  deq = _bits(q.dequantize_t()).reshape(-1)
  assert set(deq[codes == 8].tolist()) == {0x80000000}
  assert set(deq[codes == 0].tolist()) == {0}
  # the state dict's quant_map is bnb's, bit for bit
  lin = bnb.nn.Linear4bit(128, 4, bias=False, quant_type="fp4", compute_dtype=torch.float32)
  lin.weight = bnb.nn.Params4bit(torch.from_numpy(wt.copy()), requires_grad=False,
                                 quant_type="fp4")
  lin = lin.to("cpu")
  ours = qz.to_bnb_state_dict({"weight": q})
  np.testing.assert_array_equal(_bits(ours["weight.quant_map"]),
                                _bits(lin.state_dict()["weight.quant_map"].numpy()))


# ----------------------------------------------------------------------------
# state dicts

def _linear4bit(wt, fmt, dq):
  out, inn = wt.shape
  lin = bnb.nn.Linear4bit(inn, out, bias=False, quant_type=fmt, compress_statistics=dq,
                          compute_dtype=torch.float32)
  lin.weight = bnb.nn.Params4bit(torch.from_numpy(wt.copy()), requires_grad=False,
                                 quant_type=fmt, compress_statistics=dq)
  return lin.to("cpu")


def _same_state_dicts(ours, theirs):
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    v = v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)
    assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
    np.testing.assert_array_equal(np.ascontiguousarray(ours[k]).view(np.uint8),
                                  np.ascontiguousarray(v).view(np.uint8), err_msg=k)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_flat_state_dict_roundtrip_equals_linear4bit(fmt, dq):
  wt = _weight(96, 40, 7)
  lin = _linear4bit(wt, fmt, dq)
  sd = dict(lin.state_dict())
  q = qz.from_bnb_state_dict(sd)["weight"]
  assert isinstance(q, qz.QuantizedArray) and q.layout == "flat" and q.shape == (40, 96)
  _same_state_dicts(qz.to_bnb_state_dict({"weight": q}), sd)
  # our flat quantization of the same matrix writes the same state dict, byte for byte
  ours = qz.quantize_array(jnp.asarray(wt.T), fmt, 64, dq, layout="flat")
  _same_state_dicts(qz.to_bnb_state_dict({"weight": ours}), sd)
  # and the loaded leaf reproduces bnb's forward
  x = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
  with torch.no_grad():
    y_ref = lin(torch.from_numpy(x)).numpy()
  y = lj.implicit(lambda w, x: x @ w)(q, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)


def test_flat_state_dict_loads_back_into_bitsandbytes():
  wt = _weight(30, 50, 9)
  q = qz.quantize_array(jnp.asarray(wt.T), "nf4", 64, True, layout="flat")
  sd = {k: torch.from_numpy(np.array(v)) for k, v in qz.to_bnb_state_dict({"weight": q}).items()}
  lin = bnb.nn.Linear4bit(50, 30, bias=False, quant_type="nf4", compute_dtype=torch.float32)
  stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
  lin.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats,
                                                   requires_grad=False, device="cpu", module=lin)
  x = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
  with torch.no_grad():
    y_ref = lin(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(qz.matmul(jnp.asarray(x), q)), y_ref,
                             rtol=1e-5, atol=1e-6)


def test_bad_flat_state_dicts_are_named():
  sd = qz.to_bnb_state_dict({"p.weight": qz.quantize_array(
      jnp.asarray(_weight(40, 6, 2)), "nf4", 64, True, layout="flat")})
  with pytest.raises(ValueError, match=r"p.weight: absmax has 3 values; expected 4 "
                                       r"\(shape \(6, 40\), blocksize 64\)"):
    qz.from_bnb_state_dict(dict(sd, **{"p.weight.absmax": sd["p.weight.absmax"][:3]}))
  with pytest.raises(ValueError, match=r"p.weight: 119 code bytes for shape \(6, 40\); "
                                       r"expected 120"):
    qz.from_bnb_state_dict(dict(sd, **{"p.weight": sd["p.weight"][:119]}))
  with pytest.raises(ValueError, match=r"p.weight: nested_absmax has 2 values; expected 1"):
    qz.from_bnb_state_dict(dict(sd, **{"p.weight.nested_absmax": np.ones(2, np.float32)}))


# ----------------------------------------------------------------------------
# the flat leaf in use: matmul (tiled), implicit rules, batch axes, specs, summary

@pytest.fixture(scope="module")
def flat_q():
  wt = _weight(96, 40, 11)           # kernel (40, 96); blocks of 64 cross rows
  return wt, qz.quantize_array(jnp.asarray(wt.T), "nf4", 64, True, layout="flat")


def test_flat_matmul_tiles_align_with_blocks(flat_q):
  _, q = flat_q
  w = np.asarray(q.materialize())
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 40))
  y = jax.random.normal(jax.random.PRNGKey(1), (3, 96))
  ref, ref_t = np.asarray(x) @ w, np.asarray(y) @ w.T
  # tiles must hold whole blocks: 8 rows of 40 are 5 blocks of 64. 16-row tiles divide
  # the 96 rows; 40-row tiles (asked: 41) leave a remainder of 16 rows.
  for tile in (16 * 40, 41 * 40):
    fwd = jax.jit(lambda x, q: qz.matmul_xla(x, q, tile_elements=tile))
    bwd = jax.jit(lambda y, q: qz.matmul_t_xla(y, q, tile_elements=tile))
    np.testing.assert_allclose(fwd(x, q), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bwd(y, q), ref_t, rtol=1e-5, atol=1e-6)
  from quantization import _matmul
  assert _matmul._aligned_tile_rows(q, 41 * 40) == 40
  assert _matmul._aligned_tile_rows(q, 20 * 40) == 16
  np.testing.assert_allclose(qz.matmul_xla(x[:1], q), ref[:1], rtol=1e-5, atol=1e-6)  # GEMV


def test_flat_refused_by_pallas_and_auto_uses_xla(flat_q):
  _, q = flat_q
  x = jnp.ones((2, 40))
  with pytest.raises(ValueError, match=r"backend 'pallas' reads the rows layout .*; this "
                                       r"weight \(40, 96\) \(nf4, block 64\) has the 'flat'"):
    qz.matmul(x, q, "pallas")
  np.testing.assert_allclose(qz.matmul(x, q, "auto"), qz.matmul(x, q, "xla"))


def test_flat_implicit_rules(flat_q):
  _, q = flat_q
  w = q.materialize()
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 40))
  np.testing.assert_allclose(lj.implicit(lambda w, x: x @ w)(q, x), x @ w, rtol=1e-5,
                             atol=1e-6)
  f = lambda w, x: jnp.einsum("bo,io->bi", x @ w, w)  # noqa: E731  (W and W^T)
  np.testing.assert_allclose(jax.jit(lj.implicit(f))(q, x), f(w, x), rtol=1e-5, atol=1e-5)
  # an embedding lookup dequantizes only the rows asked for, exactly
  ids = jnp.array([[0, 39, 17], [5, 5, 22]])
  np.testing.assert_array_equal(lj.implicit(lambda e, i: e[i])(q, ids), w[ids])
  # a cast keeps the leaf quantized, and the bf16 matmul equals the dense one
  cast = lj.implicit(lambda w: w.astype(jnp.bfloat16), materialize_outputs=False)(q)
  assert isinstance(cast, qz.QuantizedArray) and cast.dtype == jnp.bfloat16
  assert cast.layout == "flat"
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  np.testing.assert_allclose(
      np.asarray(lj.implicit(lambda w, x: x @ w.astype(jnp.bfloat16))(q, x16), np.float32),
      np.asarray(x16 @ w16, np.float32), rtol=2e-2, atol=2e-2)
  # gradients reach x, never the codes
  g = jax.jit(jax.grad(lambda x: jnp.sum(lj.implicit(lambda w, x: x @ w)(q, x) ** 2)))(x)
  np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum((x @ w) ** 2))(x), rtol=1e-5,
                             atol=1e-5)


def test_flat_stacked_layers():
  ws = jax.random.normal(jax.random.PRNGKey(3), (3, 40, 96)) * 0.02
  q = qz.quantize_array(ws, "fp4", 64, layout="flat")
  assert q.nbatch == 1 and q.shape == (3, 40, 96) and q.codes.shape == (3, 40 * 96 // 2)
  for i in range(3):
    one = qz.quantize_array(ws[i], "fp4", 64, layout="flat")
    np.testing.assert_array_equal(q.codes[i], one.codes)
    np.testing.assert_array_equal(q.absmax[i], one.absmax)
    np.testing.assert_array_equal(_bits(q.materialize()[i]), _bits(one.materialize()))
  w = q.materialize()
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 40))

  def layers(ws, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w)[:, :40], None), x, ws)[0]

  np.testing.assert_allclose(lj.implicit(layers)(q, x), layers(w, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"stacked QuantizedArray \(3, 40, 96\)"):
    qz.to_bnb_state_dict({"w": q})


def test_flat_specs_summary_and_checks(flat_q):
  _, q = flat_q
  specs = q.partition_specs(PS("data", "model"))
  assert specs.codes == PS(None) and specs.absmax == PS(None)
  assert specs.nested_absmax == PS(None) and specs.offset == PS()
  stacked = qz.quantize_array(jnp.ones((2, 40, 96)), "nf4", 64, layout="flat")
  assert stacked.partition_specs(PS("layers", None, "model")).codes == PS("layers", None)
  # 4 bits per value, one 8-bit absmax per 64 values, the nested scale and offset
  n_blocks = -(-40 * 96 // 64)
  want = 8 * (40 * 96 // 2 + n_blocks + 4 * (-(-n_blocks // 256)) + 4) / (40 * 96)
  assert qz.bits_per_param(q) == pytest.approx(want)
  assert "40x96" in qz.summary({"w": q})
  assert q.count().params == 40 * 96
  with pytest.raises(ValueError, match=r"QuantizedArray: codes \(1919,\) do not fit kernel "
                                       r"\(40, 96\) \(format nf4, flat layout\); expected "
                                       r"trailing \(1920,\)"):
    qz.QuantizedArray(codes=q.codes[:-1], absmax=q.absmax, nested_absmax=q.nested_absmax,
                      offset=q.offset, kernel_shape=(40, 96), layout="flat")
  with pytest.raises(ValueError, match=r"QuantizedArray: absmax \(59,\) does not fit codes "
                                       r"\(1920,\) \(flat layout\); expected \(60,\)"):
    qz.QuantizedArray(codes=q.codes, absmax=q.absmax[:-1], nested_absmax=q.nested_absmax,
                      offset=q.offset, kernel_shape=(40, 96), layout="flat")
  with pytest.raises(ValueError, match=r"QuantizedArray: unknown layout 'cols'"):
    qz.QuantizedArray(codes=q.codes, absmax=q.absmax, kernel_shape=(40, 96), layout="cols")
  with pytest.raises(ValueError, match=r"w: unknown layout 'cols'; known layouts: rows, flat"):
    qz.quantize_array(jnp.ones((40, 96)), layout="cols", path="w")


# ----------------------------------------------------------------------------
# a transformers bnb-4bit checkpoint with a layer whose in_features straddle blocks

@pytest.fixture(scope="module")
def bnb_llama_flat(tmp_path_factory):
  """A tiny Llama whose MLP width 96 is not a multiple of bnb's block 64 (so down_proj's
  blocks cross rows), saved by transformers in float32 and as bnb-4bit NF4 + double quant."""
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("bnb_llama_flat")
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
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
def test_transformers_bnb4bit_checkpoint_with_straddling_blocks(bnb_llama_flat):
  from lora_jax.models import llama
  root, m4, ids = bnb_llama_flat
  m4.train()     # eval mode on AVX512-BF16 CPUs would run bnb's bf16 kernel
  with torch.no_grad():
    ref = m4(ids).logits.numpy()
  _, dense = llama.load_hf(root / "fp")
  config, params = llama.load_hf(root / "q4")
  for i, layer in enumerate(params["layers"]):
    for group in ("self_attn", "mlp"):
      for proj, slot in layer[group].items():
        q = slot["kernel"]
        assert isinstance(q, qz.QuantizedArray), (i, proj)
        assert q.layout == ("flat" if proj == "down_proj" else "rows"), (i, proj, q.layout)
        ours = qz.quantize_array(dense["layers"][i][group][proj]["kernel"], "nf4", 64, True,
                                 layout=q.layout)
        np.testing.assert_array_equal(ours.codes, q.codes, err_msg=proj)
        np.testing.assert_array_equal(ours.absmax, q.absmax, err_msg=proj)
        np.testing.assert_array_equal(ours.nested_absmax, q.nested_absmax, err_msg=proj)
  y = lj.implicit(llama.forward)(params, config, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  _, sparams = llama.load_hf(root / "q4", stacked=True)
  assert sparams["layers"]["mlp"]["down_proj"]["kernel"].nbatch == 1
  ys = lj.implicit(llama.forward)(sparams, config, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-5, atol=1e-5)
  # and the state dict goes back out bit for bit
  from safetensors.numpy import load_file
  saved = load_file(root / "q4" / "model.safetensors")
  name = "model.layers.1.mlp.down_proj.weight"
  back = qz.to_bnb_state_dict({name: params["layers"][1]["mlp"]["down_proj"]["kernel"]})
  for k, v in back.items():
    np.testing.assert_array_equal(np.ascontiguousarray(v).view(np.uint8),
                                  np.ascontiguousarray(saved[k]).view(np.uint8), err_msg=k)
