"""`lora_jax.checkpoint`: the safetensors reader and writer against the `safetensors`
library, the name table against transformers' state-dict names, atomic directories,
paths inside a directory, and PEFT adapters saved with `save_embedding_layers="auto"`
(PEFT's default) against PEFT's own load, all computed at test time."""

from __future__ import annotations

import ast
import os
import pathlib
import warnings

import hypothesis.extra.numpy as hnp
import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.models import llama

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# safetensors: ours == the library's

_NP_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, ml_dtypes.bfloat16]


@st.composite
def _tensor_dicts(draw):
  n = draw(st.integers(0, 5))
  names = draw(st.lists(st.text("abcxyz._0123", min_size=1, max_size=12), min_size=n,
                        max_size=n, unique=True))
  out = {}
  for name in names:
    dt = np.dtype(draw(st.sampled_from(_NP_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dt.itemsize,
                         max_size=int(np.prod(shape)) * dt.itemsize))
    arr = np.frombuffer(raw, np.uint8).view(dt).reshape(shape) if raw else np.zeros(shape, dt)
    out[name] = arr
  return out


def _bits(a):
  return np.ascontiguousarray(a).view(np.uint8).tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=_tensor_dicts())
def test_reader_and_writer_agree_with_safetensors(tmp_path, tensors):
  from safetensors.numpy import load_file, save_file
  f = tmp_path / "lib.safetensors"
  save_file(tensors, str(f), metadata={"format": "pt"})
  ours = checkpoint.read_safetensors(f)
  assert sorted(ours) == sorted(tensors)
  for k, v in tensors.items():
    assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
    assert _bits(ours[k]) == _bits(v), k
  g = tmp_path / "ours.safetensors"
  checkpoint.write_safetensors(g, tensors, {"format": "pt"})
  theirs = load_file(str(g))
  assert sorted(theirs) == sorted(tensors)
  for k, v in tensors.items():
    assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape
    assert _bits(theirs[k]) == _bits(v), k
  assert checkpoint.read_metadata(g) == {"format": "pt"}


@pytest.mark.interop
def test_fp8_and_bf16_written_by_torch():
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    f = os.path.join(d, "t.safetensors")
    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4).to(torch.float8_e4m3fn),
         "c": torch.randn(2, 2).to(torch.float8_e5m2)}
    save_file(t, f)
    ours = checkpoint.read_safetensors(f)
    for k, v in t.items():
      want = v.view(torch.uint8).numpy().tobytes()
      assert _bits(ours[k]) == want, k
    assert {k: i.dtype for k, i in checkpoint.read_header(f).items()} == {
        "a": "BF16", "b": "F8_E4M3", "c": "F8_E5M2"}


def test_shard_writer_streams_in_any_order(tmp_path):
  from safetensors.numpy import load_file
  specs = [("x", "F32", (2, 3)), ("y", "I8", (5,)), ("z", "F16", (0, 4))]
  w = checkpoint.ShardWriter(tmp_path / "s.safetensors", specs)
  w.write("y", np.arange(5, dtype=np.int8))
  w.write("x", np.ones((2, 3), np.float32))
  w.write("z", np.zeros((0, 4), np.float16))
  with pytest.raises(ValueError, match=r"s\.safetensors: tensor 'x': writing float64 \(2, 3\), "
                     r"planned F32 \(2, 3\)"):
    w.write("x", np.ones((2, 3)))
  w.close()
  got = load_file(str(tmp_path / "s.safetensors"))
  np.testing.assert_array_equal(got["x"], np.ones((2, 3), np.float32))
  np.testing.assert_array_equal(got["y"], np.arange(5, dtype=np.int8))
  assert got["z"].shape == (0, 4)


def test_write_safetensors_refuses_unknown_dtypes(tmp_path):
  with pytest.raises(TypeError, match="complex64 has no safetensors code"):
    checkpoint.write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------
# the name table

@pytest.mark.interop
@pytest.mark.parametrize("bias", [False, True])
def test_llama_table_covers_transformers_names(bias):
  """Every tensor of a transformers Llama maps to a parameter of ours with the same shape
  (transposed for kernels) and back to the same name."""
  transformers = pytest.importorskip("transformers")
  kw = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, attention_bias=bias, mlp_bias=bias)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  ours = dict(lj.leaves_with_paths(llama.init_params(jax.random.key(0), llama.LlamaConfig(**kw))))
  seen = set()
  for name, t in m.state_dict().items():
    path, transpose = checkpoint.LLAMA.tensor_to_path(name)
    assert path in ours, name
    want = tuple(t.shape)[::-1] if transpose else tuple(t.shape)
    assert tuple(ours[path].shape) == want, name
    assert checkpoint.LLAMA.path_to_tensor(path) == (name, transpose)
    seen.add(path)
  assert seen == set(ours)
  assert checkpoint.LLAMA.ignored("model.layers.3.self_attn.rotary_emb.inv_freq")
  assert checkpoint.LLAMA.tensor_to_path("model.layers.0.self_attn.q_proj.lora_A") is None


def test_name_table_is_data_a_family_supplies():
  gpt2 = checkpoint.NameTable(modules=(
      ("transformer.h.{layer}.attn.{proj}", "h/{layer}/attn/{proj}/kernel"),
      ("transformer.wte", "wte/embedding")))
  assert gpt2.tensor_to_path("transformer.h.3.attn.c_attn.bias") == ("h/3/attn/c_attn/bias", False)
  assert gpt2.module_to_path("transformer.h.3.attn.c_attn") == (
      "h/3/attn/c_attn/kernel", "h/attn/c_attn/kernel", 3)
  assert gpt2.path_to_module("h/attn/c_attn/kernel", stacked=True) == \
      "transformer.h.{layer}.attn.c_attn"
  assert gpt2.path_to_tensor("wte/embedding") == ("transformer.wte.weight", False)
  assert checkpoint.as_table(gpt2.modules, checkpoint.LLAMA) == gpt2
  assert checkpoint.as_table(None, checkpoint.LLAMA) is checkpoint.LLAMA
  assert lj.LLAMA_NAME_MAP == checkpoint.LLAMA.modules


# ----------------------------------------------------------------------------
# paths inside a directory

@pytest.mark.parametrize("name,msg", [
    ("../x", r"leaves .*\('\.\.'\)"), ("a/../../x", r"\('\.\.'\)"), ("/etc/passwd", "absolute"),
    ("", "non-empty string"), (None, "non-empty string"), ("a\0b", "non-empty string"),
    ("C:/x", "absolute"), ("..\\x", r"\('\.\.'\)")])
def test_inside_refuses_names_out_of_the_directory(tmp_path, name, msg):
  with pytest.raises(ValueError, match="index.json: entry 'k'.*" + msg):
    checkpoint.inside(tmp_path, name, "index.json: entry 'k'")


def test_inside_follows_links_only_within(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "real").write_text("x")
  os.symlink("real", tmp_path / "d" / "ok")
  os.symlink(tmp_path, tmp_path / "d" / "up")
  assert checkpoint.inside(tmp_path / "d", "ok", "w") == tmp_path / "d" / "ok"
  assert checkpoint.inside(tmp_path / "d", "sub/x", "w") == tmp_path / "d" / "sub" / "x"
  with pytest.raises(ValueError, match="outside"):
    checkpoint.inside(tmp_path / "d", "up/x", "w")


# ----------------------------------------------------------------------------
# atomic directories

def test_atomic_directory_replaces_whole_or_nothing(tmp_path):
  out = tmp_path / "out"
  with checkpoint.atomic_directory(out) as d:
    (d / "a").write_text("1")
  assert sorted(p.name for p in out.iterdir()) == ["a"]
  with pytest.raises(KeyError):
    with checkpoint.atomic_directory(out) as d:
      (d / "b").write_text("2")
      raise KeyError("boom")
  assert sorted(p.name for p in out.iterdir()) == ["a"]
  with checkpoint.atomic_directory(out) as d:
    (d / "b").write_text("2")
  assert sorted(p.name for p in out.iterdir()) == ["b"]
  with checkpoint.atomic_directory(out, keep_other_files=True, replaced=("c",)) as d:
    (d / "c").write_text("3")
  assert sorted(p.name for p in out.iterdir()) == ["b", "c"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="file: exists and is not a directory"):
    with checkpoint.atomic_directory(tmp_path / "file"):
      pass


def test_atomic_directory_refuses_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / "w").mkdir()
  monkeypatch.chdir(tmp_path / "w")
  for p in (".", "..", "/"):
    with pytest.raises(ValueError, match="working directory or one of its parents"):
      with checkpoint.atomic_directory(p):
        pass
  assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_clean_stale_removes_only_dead_writers_of_the_same_target(tmp_path):
  import subprocess
  import sys
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, timeout=60).stdout.strip()
  hexs = "a" * 32
  names = {
      f".lora-jax-tmp-{dead}-{hexs}-out": True,            # killed writer of "out"
      f".lora-jax-tmp-{dead}-{hexs}-other": False,         # another target
      f".lora-jax-tmp-{os.getpid()}-{hexs}-out": False,    # a live writer
      f".lora-jax-tmp-{dead}-short-out": False,            # not our name pattern
      f".lora-jax-merge-{dead}": False, "out2": False,
  }
  for n in names:
    (tmp_path / n).mkdir()
    (tmp_path / n / "f").write_text("x")
  removed = checkpoint.clean_stale(tmp_path / "out")
  assert [p.name for p in removed] == [n for n, gone in names.items() if gone]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, g in names.items() if not g)


def test_merge_and_extract_use_only_the_checkpoint_module():
  """extract_cli does not import cli; neither opens files itself or imports the old
  private file modules."""
  for f in ("merging/cli.py", "merging/extract_cli.py"):
    src = (ROOT / f).read_text()
    tree = ast.parse(src)
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not mods & {"lora_jax._files", "lora_jax._peft_io", "merging._st", "json",
                       "tempfile", "shutil"}, (f, mods)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)}
    assert f == "merging/cli.py" or "open" not in calls, f   # cli opens only its YAML
  ex = ast.parse((ROOT / "merging/extract_cli.py").read_text())
  assert not any(isinstance(n, ast.ImportFrom) and n.module in ("merging.cli", "merging")
                 and any(a.name == "cli" for a in n.names) or
                 isinstance(n, ast.ImportFrom) and n.module == "merging.cli"
                 for n in ast.walk(ex))
  assert not (ROOT / "lora_jax/_files.py").exists() and not (ROOT / "merging/_st.py").exists()


# ----------------------------------------------------------------------------
# PEFT adapters on embeddings saved with save_embedding_layers="auto"

@pytest.mark.interop
def test_peft_embedding_adapter_with_saved_base_layer(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import sys
  sys.path.insert(0, str(ROOT / "tests"))
  from hf_testing import hf_base, load_base, logits
  base = hf_base(tmp_path / "base")
  other = hf_base(tmp_path / "other", seed=1)     # another base: a different embedding
  pm = peft.get_peft_model(load_base(base), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    pm.save_pretrained(str(tmp_path / "ad"))          # PEFT's default: "auto"
  assert any("save_embedding_layers" in str(x.message) for x in w)
  keys = checkpoint.read_header(tmp_path / "ad" / "adapter_model.safetensors")
  assert "base_model.model.model.embed_tokens.base_layer.weight" in keys

  fwd = jax.jit(lj.implicit(llama.forward), static_argnums=1)
  from hf_testing import IDS
  config, params = llama.load_hf(base)
  with warnings.catch_warnings():
    warnings.simplefilter("error")                    # equal base embedding: no warning
    ours = lj.load_adapter(tmp_path / "ad", params)
  np.testing.assert_allclose(np.asarray(fwd(ours, config, IDS)), logits(pm.eval()), atol=2e-4)

  # onto another base: PEFT's load puts the saved embedding in place of the base's
  ref = peft.PeftModel.from_pretrained(load_base(other), str(tmp_path / "ad")).eval()
  _, oparams = llama.load_hf(other)
  with pytest.warns(UserWarning, match=r"adapter_model\.safetensors: base_model\.model\.model\."
                    r"embed_tokens\.base_layer\.weight \(128, 64\) differs from the base weight "
                    r"embed_tokens/embedding .*replaces the base weight, as PEFT does"):
    ours2 = lj.load_adapter(tmp_path / "ad", oparams)
  np.testing.assert_allclose(np.asarray(fwd(ours2, config, IDS)), logits(ref), atol=2e-4)
  del torch


@settings(max_examples=60, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                              allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                   inner, max_size=4),
    max_leaves=12))
def test_loads_json_equals_json_loads_on_valid_json(obj):
  import json
  text = json.dumps(obj)
  assert checkpoint.loads_json(text) == json.loads(text)
  assert checkpoint.loads_json(text, allow_nan=False) == json.loads(text)


def test_loads_json_refuses_duplicate_keys_and_optionally_nan():
  import json
  with pytest.raises(ValueError, match="key 'a' appears twice"):
    checkpoint.loads_json('{"x": {"a": 1, "a": 2}}')
  assert np.isnan(checkpoint.loads_json('{"a": NaN}')["a"])
  for c in ("NaN", "Infinity", "-Infinity"):
    with pytest.raises(ValueError, match=f"{c} is not JSON"):
      checkpoint.loads_json(f'[1, {c}]', allow_nan=False)
  with pytest.raises(json.JSONDecodeError):
    checkpoint.loads_json('{"a": 1,}')
