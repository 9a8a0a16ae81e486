"""compressed-tensors "pack-quantized" checkpoints in and out: `qz.from_compressed_tensors`
/ `qz.to_compressed_tensors` and `llama.load_hf` / `llama.save_hf`.

The oracles run at test time on CPU: llm-compressor's `oneshot` (RTN through
`QuantizationModifier`, GPTQ with `actorder="weight"`) writes the checkpoints, and its
quantized model in memory (fake-quantized Linear forwards) gives the reference logits;
transformers reloads symmetric checkpoints (5.23 cannot reload asymmetric ones: it fails
on the packed zero point's shape), compressed-tensors' own `PackedQuantizationCompressor`
decompresses what we write, and PEFT applies adapters. The config and g_idx tests need
none of them (a numpy bit-stream packer is the oracle there)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import quantization as qz
from lora_jax import checkpoint
from lora_jax.models import llama
from quantization import _compressed_tensors as CT

# name: (llm-compressor modifier, weight QuantizationArgs)
CONFIGS = {
    "sym4g": ("rtn", dict(num_bits=4, symmetric=True, strategy="group", group_size=32)),
    "asym4g": ("rtn", dict(num_bits=4, symmetric=False, strategy="group", group_size=32)),
    "sym8c": ("rtn", dict(num_bits=8, symmetric=True, strategy="channel")),
    "asym8c": ("rtn", dict(num_bits=8, symmetric=False, strategy="channel")),
    "sym3g": ("rtn", dict(num_bits=3, symmetric=True, strategy="group", group_size=32)),
    "asym3g": ("rtn", dict(num_bits=3, symmetric=False, strategy="group", group_size=32)),
    "asym2g": ("rtn", dict(num_bits=2, symmetric=False, strategy="group", group_size=64)),
    "gptq4w": ("gptq", dict(num_bits=4, symmetric=False, strategy="group", group_size=32,
                            actorder="weight")),
}
SYMMETRIC = [k for k, (_, w) in CONFIGS.items() if w["symmetric"]]
PROJ = (("self_attn", llama.ATTN_PROJ), ("mlp", llama.MLP_PROJ))


def _ids():
  return np.random.RandomState(0).randint(0, 128, (2, 12))


# ----------------------------------------------------------------------------
# a numpy oracle of the dense bit stream (element i at bit i * bits, LSB first)

def np_pack(u: np.ndarray, bits: int) -> np.ndarray:
  rows, n = u.shape
  words = np.zeros((rows, -(-n * bits // 32)), np.uint64)
  for i in range(n):
    w, off = divmod(i * bits, 32)
    v = u[:, i].astype(np.uint64)
    words[:, w] |= (v << np.uint64(off)) & np.uint64(0xFFFFFFFF)
    if off + bits > 32:
      words[:, w + 1] |= v >> np.uint64(32 - off)
  return words.astype(np.uint32).view(np.int32)


def np_unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
  w = words.view(np.uint32).astype(np.uint64)
  out = np.zeros((w.shape[0], n), np.int64)
  for i in range(n):
    j, off = divmod(i * bits, 32)
    v = w[:, j] >> np.uint64(off)
    if off + bits > 32:
      v |= w[:, j + 1] << np.uint64(32 - off)
    out[:, i] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
  return out


def file_weight(sd: dict, module: str, bits: int, group: int | None) -> np.ndarray:
  """The dequantized (out, in) float32 weight of a pack-quantized module, from the file's
  tensors by the format's math alone: (q - z[g(i)]) * s[g(i)]."""
  out, inn = (int(d) for d in sd[f"{module}.weight_shape"])
  lo = -(1 << (bits - 1))
  q = np_unpack(sd[f"{module}.weight_packed"], bits, inn) + lo
  s = sd[f"{module}.weight_scale"].astype(np.float32)
  g = (np.arange(inn) // (group or inn) if f"{module}.weight_g_idx" not in sd
       else sd[f"{module}.weight_g_idx"].astype(np.int64))
  z = 0
  if f"{module}.weight_zero_point" in sd:
    z = (np_unpack(np.ascontiguousarray(sd[f"{module}.weight_zero_point"].T), bits, out)
         + lo).T[:, g]
  return ((q - z) * s[:, g]).astype(np.float32)


# ----------------------------------------------------------------------------
# llm-compressor checkpoints, one oneshot run per configuration

class Case:
  def __init__(self, name, path, model, ref):
    self.name, self.path, self.model, self.ref = name, path, model, ref
    self.modifier, self.weights = CONFIGS[name]

  @property
  def bits(self):
    return self.weights["num_bits"]

  @property
  def group(self):
    return self.weights.get("group_size")


@pytest.fixture(scope="module")
def oneshot(tmp_path_factory):
  """`oneshot(name)`: llm-compressor's checkpoint of the tiny Llama (hidden 64, 2 layers,
  vocab 128) for configuration `name` (lm_head ignored), with its quantized model in
  memory and that model's logits on `_ids()`, computed once per module."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("compressed_tensors")
  pytest.importorskip("llmcompressor")
  datasets = pytest.importorskip("datasets")
  from tokenizers import Tokenizer
  from tokenizers import models as tm

  import hf_testing
  root = tmp_path_factory.mktemp("ct")
  base = hf_testing.hf_base(root / "base")
  tok = Tokenizer(tm.WordLevel({f"t{i}": i for i in range(128)} | {"[UNK]": 0},
                               unk_token="[UNK]"))
  proc = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
  proc.save_pretrained(base)
  n, t = 4, 16
  calib = np.random.RandomState(1).randint(0, 128, (n, t))
  data = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * t] * n})
  cache = {}

  def get(name):
    if name in cache:
      return cache[name]
    from llmcompressor import oneshot as run
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    kind, w = CONFIGS[name]
    w = {k: v for k, v in w.items() if kind == "gptq" or k != "actorder"}
    groups = {"g": {"targets": ["Linear"], "weights": {"type": "int", **w}}}
    model = transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="eager")
    if kind == "gptq":
      recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups=groups)
    else:
      recipe = QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=groups)
    run(model=model, processor=proc, dataset=data, recipe=recipe, num_calibration_samples=n,
        max_seq_length=t)
    model.eval()
    with torch.no_grad():
      ref = model(torch.tensor(_ids())).logits.numpy()
    model.save_pretrained(root / name, save_compressed=True)
    cache[name] = Case(name, root / name, model, ref)
    return cache[name]

  return get


_FORWARD = jax.jit(lj.implicit(llama.forward), static_argnums=1)   # one compile, not ~150


def _forward(params, config):
  return np.asarray(_FORWARD(params, config, jnp.asarray(_ids())))


_codes = jax.jit(lambda q: q.codes())


def _kernels(params):
  for i, layer in enumerate(params["layers"]):
    for grp, names in PROJ:
      for proj in names:
        yield f"model.layers.{i}.{grp}.{proj}", layer[grp][proj]["kernel"]


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_hf_equals_llm_compressor(oneshot, name):
  """`llama.load_hf` of llm-compressor's checkpoint: every projection a
  GroupQuantizedArray whose codes, scales and zero points are the file's (unpacked by
  compressed-tensors' `unpack_from_int32`), lm_head (ignored) dense, and the logits of
  llm-compressor's quantized model, unrolled (and, in two cases, stacked for scan)."""
  torch = pytest.importorskip("torch")
  from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
  c = oneshot(name)
  sd = checkpoint.read_checkpoint(c.path)
  config, params = llama.load_hf(c.path)
  n = 0
  for module, q in _kernels(params):
    assert isinstance(q, qz.GroupQuantizedArray), (module, type(q))
    out, inn = (int(d) for d in sd[f"{module}.weight_shape"])
    assert q.shape == (inn, out) and q.bits == c.bits and q.dtype == jnp.float32
    assert q.group_size == (c.group or inn) and q.symmetric == c.weights["symmetric"]
    assert q.g_idx is None
    np.testing.assert_array_equal(np.asarray(q.packed), sd[f"{module}.weight_packed"])
    codes = unpack_from_int32(torch.from_numpy(sd[f"{module}.weight_packed"]), c.bits,
                              torch.Size((out, inn))).numpy()
    np.testing.assert_array_equal(np.asarray(_codes(q)), codes, err_msg=module)
    np.testing.assert_array_equal(np.asarray(q.scales), sd[f"{module}.weight_scale"])
    if not q.symmetric:
      zp = unpack_from_int32(torch.from_numpy(sd[f"{module}.weight_zero_point"]), c.bits,
                             torch.Size((out, q.groups)), packed_dim=0).numpy()
      np.testing.assert_array_equal(np.asarray(q.zeros), zp, err_msg=module)
    np.testing.assert_array_equal(np.asarray(q.dequantize_t()),
                                  file_weight(sd, module, c.bits, c.group), err_msg=module)
    n += 1
  assert n == 2 * 7
  assert isinstance(params["lm_head"]["kernel"], jax.Array)
  assert isinstance(params["embed_tokens"]["embedding"], jax.Array)
  np.testing.assert_allclose(_forward(params, config), c.ref, rtol=1e-5, atol=1e-5)
  if name not in ("asym3g", "sym8c"):       # stacked for scan: two cases are enough
    return
  _, stacked = llama.load_hf(c.path, stacked=True)
  assert isinstance(stacked["layers"]["mlp"]["up_proj"]["kernel"], qz.GroupQuantizedArray)
  np.testing.assert_allclose(_forward(stacked, config), c.ref, rtol=1e-5, atol=1e-5)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", SYMMETRIC)
def test_transformers_reloads_both_checkpoints(oneshot, tmp_path, name):
  """Symmetric checkpoints, llm-compressor's and ours (`save_hf` of what `load_hf`
  read), reloaded with `AutoModelForCausalLM.from_pretrained`: the same logits as ours."""
  torch = pytest.importorskip("torch")
  import transformers
  c = oneshot(name)
  config, params = llama.load_hf(c.path)
  ours = _forward(params, config)
  llama.save_hf(tmp_path / "ours", config, params)
  for path in (c.path, tmp_path / "ours"):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
      ref = m.eval()(torch.tensor(_ids())).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=str(path))


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_hf_writes_llm_compressors_tensors(oneshot, tmp_path, name):
  """`save_hf` of the leaves `load_hf` read writes llm-compressor's tensors exactly (same
  names, dtypes, values; zero points packed along `out`) and an equivalent
  quantization_config that compressed-tensors validates; its
  `PackedQuantizationCompressor.decompress` of our tensors gives our dequantized
  weights; ours -> file -> ours is the identity, from unrolled or stacked layers."""
  pytest.importorskip("torch")
  from compressed_tensors.compressors import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationConfig
  c = oneshot(name)
  config, params = llama.load_hf(c.path)
  llama.save_hf(tmp_path / "ours", config, params)
  theirs, ours = checkpoint.read_checkpoint(c.path), checkpoint.read_checkpoint(tmp_path / "ours")
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    assert ours[k].dtype == v.dtype, k
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  qc = checkpoint.read_config(tmp_path / "ours")["quantization_config"]
  tq = checkpoint.read_config(c.path)["quantization_config"]
  assert qc["ignore"] == tq["ignore"] == ["lm_head"]
  (g,), (tg,) = qc["config_groups"].values(), tq["config_groups"].values()
  assert g["targets"] == tg["targets"] == ["Linear"]
  for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
    assert g["weights"][k] == tg["weights"][k], k
  ct = QuantizationConfig.model_validate(qc)
  scheme = next(iter(ct.config_groups.values()))
  import torch
  for module, q in _kernels(params):
    local = {k[len(module) + 1:]: torch.from_numpy(v) for k, v in ours.items()
             if k.startswith(module + ".")}
    w = PackedQuantizationCompressor.decompress(local, scheme)["weight"].numpy()
    np.testing.assert_array_equal(w, np.asarray(q.dequantize_t()), err_msg=module)
  _, back = llama.load_hf(tmp_path / "ours")
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, stacked = llama.load_hf(c.path, stacked=True)
  llama.save_hf(tmp_path / "stacked", config, stacked)
  again = checkpoint.read_checkpoint(tmp_path / "stacked")
  for k, v in theirs.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", [k for k, (kind, _) in CONFIGS.items() if kind == "rtn"])
def test_our_rtn_writes_llm_compressors_checkpoint(oneshot, tmp_path, name):
  """`qz.quantize` (round to nearest) of the float model, then `save_hf`: llm-compressor's
  RTN checkpoint (`QuantizationModifier`) tensor for tensor."""
  c = oneshot(name)
  config, dense = llama.load_hf(c.path.parent / "base")
  w = c.weights
  cfg = qz.QuantConfig(f"int{c.bits}", w.get("group_size", -1), symmetric=w["symmetric"],
                       targets=r"layers/.*/kernel")
  llama.save_hf(tmp_path / "ours", config, qz.quantize(dense, cfg))
  ours, theirs = checkpoint.read_checkpoint(tmp_path / "ours"), checkpoint.read_checkpoint(c.path)
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)


@pytest.mark.interop
@pytest.mark.slow
def test_save_hf_dequantize_writes_a_dense_checkpoint(oneshot, tmp_path):
  c = oneshot("asym4g")
  config, params = llama.load_hf(c.path)
  llama.save_hf(tmp_path / "dense", config, params, dequantize=True)
  assert "quantization_config" not in checkpoint.read_config(tmp_path / "dense")
  sd = checkpoint.read_checkpoint(tmp_path / "dense")
  assert not any("weight_packed" in k for k in sd)
  _, dense = llama.load_hf(tmp_path / "dense")
  assert isinstance(dense["layers"][0]["mlp"]["up_proj"]["kernel"], jax.Array)
  np.testing.assert_allclose(_forward(dense, config), c.ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# PEFT adapters on GPTQ / RTN checkpoints

@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sym4g", "gptq4w"])
def test_peft_adapter_on_compressed_tensors_checkpoint(oneshot, tmp_path, name):
  """A PEFT LoRA adapter on the quantized model in transformers vs `lj.load_adapter`
  onto the leaves `load_hf` read: LoRA leaves whose base is the GroupQuantizedArray, and
  PEFT's logits.

  The transformers side: the symmetric checkpoint reloaded with
  `AutoModelForCausalLM.from_pretrained`; the asymmetric GPTQ one (which transformers
  5.23 cannot reload) is llm-compressor's model in memory after `oneshot` and
  `save_pretrained`, whose Linear layers hold the dequantized weights with their
  compressed-tensors scheme. PEFT cannot wrap a Linear that is still compressed (it has
  no `weight` until compressed-tensors decompresses it in the first forward, and
  `save_pretrained(save_compressed=True)` leaves the model in memory compressed too), so
  the model runs one forward before `get_peft_model`: PEFT then wraps the
  compressed-tensors Linear holding the dequantized weight."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers
  c = oneshot(name)
  x = torch.tensor(_ids())
  m = (transformers.AutoModelForCausalLM.from_pretrained(c.path, attn_implementation="eager")
       if name in SYMMETRIC else c.model)
  with torch.no_grad():
    m.eval()(x)          # compressed-tensors decompresses the Linear weights
  torch.manual_seed(2)
  pm = peft.get_peft_model(m, peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
      target_modules=["q_proj", "v_proj", "down_proj"]))
  with torch.no_grad():
    ref = pm.eval()(x).logits.numpy()
  pm.save_pretrained(tmp_path / "adapter")
  pm.unload()           # leave the shared model without LoRA layers
  config, params = llama.load_hf(c.path)
  lparams = lj.load_adapter(tmp_path / "adapter", params)
  k = lparams["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(k, lj.LoraWeight) and isinstance(k.w, qz.GroupQuantizedArray)
  assert isinstance(lparams["layers"][1]["mlp"]["up_proj"]["kernel"], qz.GroupQuantizedArray)
  np.testing.assert_allclose(_forward(lparams, config), ref, rtol=1e-4, atol=1e-4)
  assert np.abs(ref - c.ref).max() > 1e-2          # the adapter changes the logits


# ----------------------------------------------------------------------------
# g_idx (activation order as compressed-tensors wrote it before 0.20)

def _tiny():
  config = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  shapes = jax.eval_shape(lambda k: llama.init_params(k, config), jax.random.key(0))
  rng = np.random.default_rng(0)   # numpy: no compile per shape
  fill = lambda s: jnp.asarray(  # noqa: E731
      (0.1 * rng.standard_normal(s.shape) if len(s.shape) == 2
       else rng.uniform(0.5, 1.5, s.shape)).astype(np.float32))
  return config, jax.tree.map(fill, shapes)


def _perm_g_idx(k, group, seed):
  g = np.empty(k, np.int32)
  g[np.random.default_rng(seed).permutation(k)] = np.arange(k) // group
  return g


def test_g_idx_checkpoint_round_trip(tmp_path):
  """A kernel quantized with a g_idx (GPTQ's `desc_act`): `save_hf` writes
  `weight_g_idx` and `actorder: "group"` in its own config group (the other kernels,
  without g_idx, in another; groups then target modules by name); the file's tensors
  dequantize, by the format's math, to our weights; `load_hf` reads the same leaves."""
  config, dense = _tiny()
  params = qz.quantize(dense, qz.QuantConfig("int4", 32, symmetric=False,
                                             targets=r"layers/.*/kernel"))
  w = dense["layers"][1]["self_attn"]["q_proj"]["kernel"]
  g_idx = _perm_g_idx(64, 32, 0)
  params["layers"][1]["self_attn"]["q_proj"]["kernel"] = qz.quantize_group_array(
      w, 4, 32, symmetric=False, g_idx=g_idx)
  llama.save_hf(tmp_path / "ck", config, params)
  sd = checkpoint.read_checkpoint(tmp_path / "ck")
  qc = checkpoint.read_config(tmp_path / "ck")["quantization_config"]
  mod = "model.layers.1.self_attn.q_proj"
  np.testing.assert_array_equal(sd[f"{mod}.weight_g_idx"], g_idx)
  assert [k for k in sd if k.endswith("weight_g_idx")] == [f"{mod}.weight_g_idx"]
  by_act = {g["weights"].get("actorder"): g for g in qc["config_groups"].values()}
  assert set(by_act) == {None, "group"} and by_act["group"]["targets"] == [mod]
  assert len(by_act[None]["targets"]) == 13 and qc["ignore"] == ["lm_head"]
  for module, q in _kernels(params):
    np.testing.assert_array_equal(file_weight(sd, module, 4, 32), np.asarray(q.dequantize_t()),
                                  err_msg=module)
  _, back = llama.load_hf(tmp_path / "ck")
  q = back["layers"][1]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(q.g_idx), g_idx)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(_forward(back, config), _forward(params, config), rtol=1e-6)


def _hand_module(bits=3, out=8, inn=64, group=16, seed=0, g_idx=None, symmetric=False):
  """A pack-quantized module built by hand in numpy, and its (out, in) weight by the math."""
  rng = np.random.default_rng(seed)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  groups = inn // group
  q = rng.integers(lo, hi + 1, (out, inn))
  s = rng.uniform(0.01, 0.1, (out, groups)).astype(np.float32)
  z = np.zeros((out, groups), np.int64) if symmetric else rng.integers(lo, hi + 1, (out, groups))
  g = np.arange(inn) // group if g_idx is None else g_idx
  sd = {"m.weight_packed": np_pack(q - lo, bits), "m.weight_scale": s,
        "m.weight_shape": np.array([out, inn], np.int64), "m.bias": np.ones(out, np.float32)}
  if not symmetric:
    sd["m.weight_zero_point"] = np.ascontiguousarray(np_pack((z - lo).T, bits).T)
  if g_idx is not None:
    sd["m.weight_g_idx"] = np.asarray(g_idx, np.int32)
  w = ((q - z[:, g]) * s[:, g]).astype(np.float32)
  return sd, w


def _qc(**weights):
  w = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group",
       "group_size": 16, **weights}
  return {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "quantization_status": "compressed", "ignore": [],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}


@pytest.mark.parametrize("bits,symmetric", [(3, False), (2, True), (8, False)])
def test_hand_built_g_idx_state_dict(bits, symmetric):
  """A state dict written by hand (as compressed-tensors < 0.20 stored dynamic activation
  order: `weight_g_idx` beside the packed tensors, `actorder: "group"`): input i uses
  group g_idx[i]; a g_idx holding -1 means column order, as compressed-tensors read it."""
  g_idx = _perm_g_idx(64, 16, 1)
  sd, w = _hand_module(bits, g_idx=g_idx, symmetric=symmetric)
  qc = _qc(num_bits=bits, symmetric=symmetric, actorder="group")
  tree = qz.from_compressed_tensors(sd, qc)
  assert sorted(tree) == ["m.bias", "m.weight"]
  q = tree["m.weight"]
  assert q.shape == (64, 8) and q.bits == bits and q.group_size == 16
  np.testing.assert_array_equal(np.asarray(q.g_idx), g_idx)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), w)
  np.testing.assert_allclose(np.asarray(q.materialize()), w.T, rtol=0, atol=0)
  x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(qz.matmul(jnp.asarray(x), q)), x @ w.T, rtol=1e-5,
                             atol=1e-5)
  # written back: the same tensors (and actorder "group")
  back, qc2 = qz.to_compressed_tensors(tree)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert qc2["config_groups"]["group_0"]["weights"]["actorder"] == "group"
  # a -1 in g_idx: column order
  sd_col, w_col = _hand_module(bits, symmetric=symmetric)
  sd_col["m.weight_g_idx"] = np.full(64, -1, np.int32)
  q = qz.from_compressed_tensors(sd_col, _qc(num_bits=bits, symmetric=symmetric))["m.weight"]
  assert q.g_idx is None
  np.testing.assert_array_equal(np.asarray(q.dequantize_t()), w_col)


def test_bf16_scales_keep_their_dtype():
  """A bf16 checkpoint's scales stay bf16 (the leaf computes in bf16, or in the dtype
  `load_hf` asks for) and are written back bit for bit."""
  import ml_dtypes
  sd, w = _hand_module(bits=4, seed=3)
  sd["m.weight_scale"] = sd["m.weight_scale"].astype(ml_dtypes.bfloat16)
  q = qz.from_compressed_tensors(sd, _qc(num_bits=4))["m.weight"]
  assert q.scales.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
  s = sd["m.weight_scale"].astype(np.float32)
  z = np.asarray(q.zeros, np.float32)
  codes = np.asarray(q.codes(), np.float32)
  g = np.arange(64) // 16
  want = ((codes - z[:, g]) * s[:, g]).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(q.dequantize_t(jnp.bfloat16)), want)
  back, _ = qz.to_compressed_tensors({"m.weight": q})
  assert back["m.weight_scale"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(back["m.weight_scale"].view(np.uint16),
                                sd["m.weight_scale"].view(np.uint16))


@pytest.mark.interop
@pytest.mark.slow
def test_compressed_tensors_020_refuses_what_it_cannot_read():
  """What we write for a g_idx leaf (actorder "group") is refused by compressed-tensors
  0.20, which removed it, rather than misread; the config of other leaves validates."""
  pytest.importorskip("compressed_tensors")
  from compressed_tensors.quantization import QuantizationConfig
  sd, _ = _hand_module(g_idx=_perm_g_idx(64, 16, 1))
  _, qc = qz.to_compressed_tensors(qz.from_compressed_tensors(sd, _qc(actorder="group")))
  with pytest.raises(ValueError, match="actorder='group' has been removed"):
    QuantizationConfig.model_validate(qc)
  sd, _ = _hand_module()
  _, qc = qz.to_compressed_tensors(qz.from_compressed_tensors(sd, _qc()))
  QuantizationConfig.model_validate(qc)


def test_writer_chooses_channel_or_group():
  """One group spanning `in` is written as strategy "channel", unless another leaf of the
  same bits and symmetry uses that group size with several groups (then "group")."""
  w = jax.random.normal(jax.random.key(0), (64, 16)) * 0.1
  w2 = jax.random.normal(jax.random.key(1), (128, 16)) * 0.1
  _, qc = qz.to_compressed_tensors({"a.weight": qz.quantize_group_array(w, 8, -1),
                                    "b.weight": qz.quantize_group_array(w2, 8, -1)})
  (g,) = qc["config_groups"].values()
  assert g["weights"]["strategy"] == "channel" and g["weights"]["group_size"] is None
  _, qc = qz.to_compressed_tensors({"a.weight": qz.quantize_group_array(w, 4, 64),
                                    "b.weight": qz.quantize_group_array(w2, 4, 64)})
  (g,) = qc["config_groups"].values()
  assert g["weights"]["strategy"] == "group" and g["weights"]["group_size"] == 64


# ----------------------------------------------------------------------------
# what is refused, and how it is named

def _set(d, dotted, value):
  keys = dotted.split(".")
  for k in keys[:-1]:
    d = d[k]
  if value is KeyError:
    del d[keys[-1]]
  else:
    d[keys[-1]] = value


W = "config_groups.group_0.weights"
BAD_CONFIGS = [
    ("quant_method", "gptq", r"quantization_config\.quant_method: 'gptq' is not read"),
    ("format", "float-quantized", r"quantization_config\.format: 'float-quantized' is not "
                                  r"read; lora_jax reads 'pack-quantized'"),
    ("format", "naive-quantized", r"\.format: 'naive-quantized'"),
    (f"{W}.type", "float", rf"{W}\.type: 'float' is not read; lora_jax reads 'int'"),
    (f"{W}.strategy", "tensor", rf"{W}\.strategy: 'tensor' is not read; lora_jax reads "
                                r"'group', 'channel'"),
    (f"{W}.strategy", "tensor_group", rf"{W}\.strategy: 'tensor_group' is not read"),
    (f"{W}.strategy", "token", rf"{W}\.strategy: 'token' is not read"),
    (f"{W}.block_structure", [128, 128], rf"{W}\.block_structure: \[128, 128\]: block "
                                         r"quantization is not read"),
    (f"{W}.dynamic", True, rf"{W}\.dynamic: True: dynamic weight quantization is not read"),
    (f"{W}.num_bits", 5, rf"{W}\.num_bits: 5 is not read; lora_jax reads 2, 3, 4, 8"),
    (f"{W}.group_size", KeyError, rf"{W}\.group_size: strategy 'group' needs a positive "
                                  r"integer, got None"),
    ("config_groups.group_0.input_activations", {"num_bits": 8, "type": "float"},
     r"config_groups\.group_0\.input_activations: .*activation quantization is not read"),
    ("kv_cache_scheme", {"num_bits": 8}, r"quantization_config\.kv_cache_scheme: .*kv-cache "
                                         r"quantization is not read"),
    ("sparsity_config", {"format": "sparse-bitmask"}, r"sparsity_config: .*sparse compression"),
    (f"{W}.actorder", "sideways", rf"{W}\.actorder: 'sideways' is not read"),
]


@pytest.mark.parametrize("key,value,match", BAD_CONFIGS,
                         ids=[f"{k}={v}" for k, v, _ in BAD_CONFIGS])
def test_config_we_do_not_read_is_named(key, value, match):
  sd, _ = _hand_module()
  qc = json.loads(json.dumps(_qc()))
  _set(qc, key, value)
  with pytest.raises(ValueError, match=match):
    qz.from_compressed_tensors(sd, qc)


BAD_TENSORS = [
    ("m.weight_shape", np.array([8, 96], np.int64),
     r"state dict: tensor 'm\.weight_packed' int32 \(8, 6\) does not fit weight_shape \[8, 96\] "
     r"at 3 bits .*expected int32 \(8, 9\)"),
    ("m.weight_scale", np.ones((8, 3), np.float32),
     r"tensor 'm\.weight_scale' \(8, 3\) does not fit weight_shape \[8, 64\] with group_size "
     r"16 .*expected \(8, 4\)"),
    ("m.weight_zero_point", np.zeros((8, 4), np.int8),
     r"tensor 'm\.weight_zero_point' int8 \(8, 4\) does not fit 4 group\(s\) of 8 outputs at 3 "
     r"bits: expected the zero points packed along dim 0 \(out\), int32 \(1, 4\)"),
    ("m.weight_zero_point", KeyError, r"module m lacks tensor 'm\.weight_zero_point'"),
    ("m.weight_packed", np.zeros((8, 7), np.int32),
     r"\(8, 7\) does not fit .*expected int32 \(8, 6\); its 7 words hold 10 codes each, the "
     r"padded packing of compressed-tensors before 0\.20"),
    ("m.input_scale", np.ones(1, np.float32), r"tensor 'm\.input_scale' of quantized module m "
                                              r"is not read"),
    ("m.weight_g_idx", np.zeros(64, np.int32), r"tensor 'm\.weight_g_idx': g_idx is not a "
                                               r"permutation of the groups"),
    ("m.weight_shape", np.array([8, 60], np.int64), r"in_features 60 .* is not a multiple of "
                                                    r"group_size 16"),
]


@pytest.mark.parametrize("key,value,match", BAD_TENSORS,
                         ids=[f"{k}-{getattr(v, 'shape', v)}" for k, v, _ in BAD_TENSORS])
def test_tensors_that_do_not_fit_are_named(key, value, match):
  sd, _ = _hand_module()
  if value is KeyError:
    del sd[key]
  else:
    sd[key] = value
  with pytest.raises(ValueError, match=match):
    qz.from_compressed_tensors(sd, _qc())


def test_modules_the_config_and_file_disagree_on():
  sd, _ = _hand_module()
  with pytest.raises(ValueError, match=r"module m is quantized \(tensor 'm\.weight_packed'\) but "
                                       r"is in quantization_config\.ignore"):
    qz.from_compressed_tensors(sd, {**_qc(), "ignore": ["re:^m$"]})
  with pytest.raises(ValueError, match=r"module m is quantized .* but matches no target"):
    qz.from_compressed_tensors(sd, _qc() | {"config_groups": {"group_0": {
        "targets": ["re:.*proj"], "weights": _qc()["config_groups"]["group_0"]["weights"]}}})
  dense = dict(sd, **{"n.weight": np.ones((4, 4), np.float32)})
  with pytest.raises(ValueError, match=r"module n is dense \(tensor 'n\.weight' \(4, 4\)\) but "
                                       r"quantization_config\.config_groups\.group_0 targets it "
                                       r"\('Linear'\)"):
    qz.from_compressed_tensors(dense, _qc(), module_class=lambda m: ("Linear",))
  qz.from_compressed_tensors(dense, {**_qc(), "ignore": ["n"]},
                             module_class=lambda m: ("Linear",))
  with pytest.raises(ValueError, match=r"pattern 're:\(' is not a valid regular expression"):
    qz.from_compressed_tensors(sd, {**_qc(), "ignore": ["re:("]})
  with pytest.raises(ValueError, match=r"tensor 'k\.weight_scale' has no k\.weight_packed"):
    qz.from_compressed_tensors({"k.weight_scale": np.ones((2, 1), np.float32)}, _qc())


def test_exact_names_win_over_patterns_and_classes():
  """compressed-tensors' precedence: an exact module name, then a `re:` pattern, then a
  class name decides a module's scheme, whatever the order of the groups."""
  def w(b):
    return {"num_bits": b, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": 16}

  sd4, _ = _hand_module(bits=4)
  qc = _qc() | {"config_groups": {
      "a": {"targets": ["Linear"], "weights": w(8)},
      "b": {"targets": ["re:m"], "weights": w(2)},
      "c": {"targets": ["m"], "weights": w(4)}}}
  assert qz.from_compressed_tensors(sd4, qc)["m.weight"].bits == 4
  sd2, _ = _hand_module(bits=2)
  del qc["config_groups"]["c"]
  assert qz.from_compressed_tensors(sd2, qc)["m.weight"].bits == 2


def test_writer_refuses_what_the_format_cannot_store(tmp_path):
  w = jax.random.normal(jax.random.key(0), (96, 16)) * 0.1
  with pytest.raises(ValueError, match=r"a\.weight: in_features 96 is not a multiple of "
                                       r"group_size 64 \(a last group of 32\); compressed-tensors "
                                       r"requires"):
    qz.to_compressed_tensors({"a.weight": qz.quantize_group_array(w, 4, 64)})
  q = qz.quantize_group_array(w, 4, 32, symmetric=False)
  qf = q.replace_children(zeros=q.zeros.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"a\.weight: zero points \(16, 3\) are float32 \(float "
                                       r"zero points"):
    qz.to_compressed_tensors({"a.weight": qf})
  with pytest.raises(ValueError, match=r"stacked GroupQuantizedArray \(2, 96, 16\)"):
    qz.to_compressed_tensors({"a.weight": qz.quantize_group_array(jnp.stack([w, w]), 4, 32)})
  with pytest.raises(TypeError, match=r"a\.weight: QuantizedArray has no 'pack-quantized' "
                                      r"layout"):
    qz.to_compressed_tensors({"a.weight": qz.quantize_array(w, "nf4", 32)})
  # through save_hf, naming the parameter path; dequantize=True writes it dense
  config, dense = _tiny()
  params = qz.quantize(dense, qz.QuantConfig("int4", 32, symmetric=False,
                                             targets=r"layers/.*/kernel"))
  k = params["layers"][0]["mlp"]["down_proj"]["kernel"]
  params["layers"][0]["mlp"]["down_proj"]["kernel"] = k.replace_children(
      zeros=k.zeros.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"save_hf: layers/0/mlp/down_proj/kernel: zero points "
                                       r"\(64, 4\) are float32 .*pass dequantize=True"):
    llama.save_hf(tmp_path / "bad", config, params)
  assert not (tmp_path / "bad").exists()
  llama.save_hf(tmp_path / "dense", config, params, dequantize=True)
  assert "quantization_config" not in checkpoint.read_config(tmp_path / "dense")


def test_load_hf_names_config_json_and_file(tmp_path):
  """Through `load_hf`, a config error names config.json and the key; a tensor error the
  safetensors file; packed tensors without a compressed-tensors config are refused."""
  config, dense = _tiny()
  params = qz.quantize(dense, qz.QuantConfig("int4", 32, symmetric=True,
                                             targets=r"layers/.*/kernel"))
  llama.save_hf(tmp_path / "ck", config, params)
  cj = tmp_path / "ck" / "config.json"
  hf = json.loads(cj.read_text())
  hf["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "block"
  cj.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=rf"{cj}: quantization_config\.config_groups\.group_0\."
                                       r"weights\.strategy: 'block' is not read"):
    llama.load_hf(tmp_path / "ck")
  del hf["quantization_config"]
  cj.write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*\.weight_packed' is "
                                       r"compressed-tensors data but .*config\.json has no "
                                       r"quantization_config"):
    llama.load_hf(tmp_path / "ck")
  llama.save_hf(tmp_path / "ck2", config, params)
  f = tmp_path / "ck2" / "model.safetensors"
  sd = checkpoint.read_safetensors(f)
  sd["model.layers.1.mlp.up_proj.weight_scale"] = np.ones((128, 1), np.float32)
  checkpoint.write_safetensors(f, sd)
  with pytest.raises(ValueError, match=rf"{f}: tensor 'model\.layers\.1\.mlp\.up_proj\."
                                       r"weight_scale' \(128, 1\) does not fit weight_shape "
                                       r"\[128, 64\] with group_size 32"):
    llama.load_hf(tmp_path / "ck2")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_host_packing_equals_the_kernels(bits):
  """The zero points' numpy bit stream (`pack_np` / `unpack_np`) is the kernels' layout
  (`G.pack_codes` / `G.unpack_codes`) and the test's element-by-element oracle."""
  from quantization import _group as G
  for n in (1, 7, 31, 32, 33, 100):
    u = np.random.default_rng(n).integers(0, 1 << bits, (3, n)).astype(np.uint8)
    words = CT.pack_np(u, bits)
    np.testing.assert_array_equal(words, np_pack(u, bits))
    np.testing.assert_array_equal(words, np.asarray(G.pack_codes(jnp.asarray(u), bits)))
    np.testing.assert_array_equal(CT.unpack_np(words, bits, n), u)
