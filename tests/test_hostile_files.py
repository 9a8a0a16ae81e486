"""Broken and hostile files against every public reader: `llama.load_hf`,
`lj.load_adapter`, the merge command line's model loading (`cli.open_model`, `cli.run`)
and extract-lora's (`extract_cli.extract`), plus `checkpoint.read_header` itself.

Each case asserts the error type and that the message names the offending file and
the key / shape / dtype involved. Where the `safetensors` library defines the answer
(is this file valid?), it is asked at test time: every file we refuse, it refuses too.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.models import llama
from merging import cli, extract_cli

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# fixtures: a tiny checkpoint and adapter written by our own writer

@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """{"model": dir, "model2": dir, "adapter": dir, "params": base params}."""
  root = tmp_path_factory.mktemp("good")
  config = llama.LlamaConfig(**TINY)
  params = llama.init_params(jax.random.key(0), config)
  llama.save_hf(root / "model", config, params)
  llama.save_hf(root / "model2", config, llama.init_params(jax.random.key(1), config))
  cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/(q|v)_proj/kernel")
  lj.save_adapter(root / "adapter", lj.init(jax.random.key(2), params, cfg), cfg)
  return {"model": root / "model", "model2": root / "model2", "adapter": root / "adapter",
          "params": params}


def _copy(src, dst):
  dst.mkdir(parents=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _split(raw: bytes) -> tuple[dict, bytes]:
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | bytes, data: bytes, n: int | None = None) -> bytes:
  h = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(h) if n is None else n) + h + data


def _first(header: dict) -> str:
  """The tensor whose data comes first (so edits of it reach every check)."""
  return min((k for k in header if k != "__metadata__"),
             key=lambda k: header[k]["data_offsets"][0])


def _edit(fn):
  """A corruption that edits the first tensor's header entry."""
  def go(raw):
    h, data = _split(raw)
    fn(h, _first(h))
    return _join(h, data)
  return go


def _twice(raw):
  h, data = _split(raw)
  text = json.dumps(h)
  k = _first(h)
  dup = f'"{k}": {json.dumps(h[k])}, '
  return _join(text.replace("{", "{" + dup, 1).encode(), data)


def _overlap(raw):
  h, data = _split(raw)
  names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
  a, b = names[0], names[1]
  h[b]["data_offsets"] = list(h[a]["data_offsets"])
  h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
  return _join(h, data)


def _huge(h, k):   # a tiny file claiming a 4 TiB tensor
  h[k].update(dtype="F32", shape=[2 ** 20, 2 ** 20], data_offsets=[0, 4 * 2 ** 40])


# name -> (corruption of the file's bytes, regex the message must match after the path
#          (`{key}` = the edited tensor), whether safetensors also refuses it)
CASES = {
    "zero_length": (lambda raw: b"", r"shorter than the 8-byte header length", True),
    "five_bytes": (lambda raw: raw[:5], r"shorter than the 8-byte", True),
    "header_length_huge": (lambda raw: struct.pack("<Q", 2 ** 62) + raw[8:],
                           r"header length \d+ > 100000000", True),
    "header_length_past_end": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
                               r"header length \d+ but the file has \d+ bytes", True),
    "header_not_json": (lambda raw: _join(b"{not json" + b" " * 7, b""), r"not valid JSON", True),
    "header_is_array": (lambda raw: _join(b"[1, 2, 3]", b""), r"must be a JSON object", True),
    "header_not_utf8": (lambda raw: _join(b'{"\xff\xfe": 1}', b""), r"not UTF-8", True),
    "truncated_data": (lambda raw: raw[:-10], r"truncated or corrupt", True),
    "no_dtype": (_edit(lambda h, k: h[k].pop("dtype")), r"tensor '{key}'.*no 'dtype'", True),
    "unknown_dtype": (_edit(lambda h, k: h[k].update(dtype="F99")),
                      r"tensor '{key}' has unknown dtype 'F99'", True),
    "dtype_not_string": (_edit(lambda h, k: h[k].update(dtype=7)), r"'{key}'.*dtype 7", True),
    "shape_too_big": (_edit(lambda h, k: h[k].update(shape=[s * 2 for s in h[k]["shape"]])),
                      r"tensor '{key}' F32 \(\d+, \d+\) needs \d+ bytes but its data_offsets",
                      True),
    "shape_negative": (_edit(lambda h, k: h[k].update(shape=[-1] + h[k]["shape"][1:])),
                       r"'{key}': shape \[-1.*non-negative integers", True),
    "shape_not_list": (_edit(lambda h, k: h[k].update(shape="16x16")), r"'{key}': shape", True),
    "offsets_reversed": (_edit(lambda h, k: h[k].update(
        data_offsets=h[k]["data_offsets"][::-1])), r"'{key}': data_offsets", True),
    "offsets_three": (_edit(lambda h, k: h[k].update(data_offsets=[0, 1, 2])),
                      r"'{key}': data_offsets \[0, 1, 2\]", True),
    "claims_4_TiB": (_edit(_huge), r"tensor '{key}' F32 \(1048576, 1048576\) ends at byte "
                     r"\d+, beyond the end of the file \(\d+ bytes\)", True),
    "gap_before_first": (_edit(lambda h, k: h[k].update(
        data_offsets=[o + 4 for o in h[k]["data_offsets"]])), r"gap|overlaps", True),
    "overlapping": (_overlap, r"overlaps the previous tensor", True),
    "entry_not_object": (_edit(lambda h, k: h.__setitem__(k, [1, 2])),
                         r"tensor '{key}': header entry must be an object", True),
    "metadata_not_strings": (_edit(lambda h, k: h.__setitem__("__metadata__", {"a": 1})),
                             r"__metadata__ must be an object of strings", True),
    "duplicate_name": (_twice, r"appears twice", None),   # serde keeps the last one
}


def _safetensors_refuses(path) -> bool:
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      for k in f.keys():  # noqa: SIM118
        f.get_tensor(k)
  except Exception:  # noqa: BLE001  (any refusal)
    return True
  return False


def _corrupt(path, case):
  fn, _, _ = CASES[case]
  raw = path.read_bytes()
  key = _first(_split(raw)[0])
  path.write_bytes(fn(raw))
  return key


def _expect(exc_info, path, pattern, key):
  msg = str(exc_info.value)
  assert str(path) in msg, msg
  assert re.search(pattern.replace("{key}", re.escape(key)), msg), msg


@pytest.mark.parametrize("case", list(CASES))
def test_read_header_refuses_what_safetensors_refuses(good, tmp_path, case):
  d = _copy(good["model"], tmp_path / "m")
  f = d / "model.safetensors"
  key = _corrupt(f, case)
  _, pattern, peer = CASES[case]
  if peer:
    assert _safetensors_refuses(f), f"safetensors accepts {case}"
  with pytest.raises(ValueError) as e:
    checkpoint.read_header(f)
  _expect(e, f, pattern, key)


READERS = {
    "load_hf": lambda d, good: llama.load_hf(d),
    "open_model": lambda d, good: cli.open_model(str(d)),
    "extract": lambda d, good: extract_cli.extract(str(d), str(good["model"]),
                                                   str(d.parent / "out"), quiet=True),
    "merge": lambda d, good: _merge(d, good),
}


def _merge(d, good):
  cfgp = d.parent / "merge.yml"
  cfgp.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
      {"model": str(good["model"]), "parameters": {"weight": 0.5}},
      {"model": str(d), "parameters": {"weight": 0.5}}]}))
  cli.run(str(cfgp), str(d.parent / "out"), quiet=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reader", list(READERS))
def test_checkpoint_readers_refuse_broken_safetensors(good, tmp_path, reader, case):
  d = _copy(good["model"], tmp_path / "m")
  f = d / "model.safetensors"
  key = _corrupt(f, case)
  with pytest.raises(ValueError) as e:
    READERS[reader](d, good)
  _expect(e, f, CASES[case][1], key)
  assert not (tmp_path / "out").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]


@pytest.mark.parametrize("case", list(CASES))
def test_load_adapter_refuses_broken_safetensors(good, tmp_path, case):
  d = _copy(good["adapter"], tmp_path / "a")
  f = d / "adapter_model.safetensors"
  key = _corrupt(f, case)
  with pytest.raises(ValueError) as e:
    lj.load_adapter(d, good["params"])
  _expect(e, f, CASES[case][1], key)


def test_huge_claim_allocates_nothing(good, tmp_path):
  """A 4 TiB claim fails in the header check, before any buffer or output file exists."""
  import tracemalloc
  d = _copy(good["model"], tmp_path / "m")
  _corrupt(d / "model.safetensors", "claims_4_TiB")
  tracemalloc.start()
  with pytest.raises(ValueError, match="model.safetensors"):
    _merge(d, good)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 64 * 2 ** 20, peak
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# directories and missing files

@pytest.mark.parametrize("reader", list(READERS))
def test_directory_where_a_file_is_expected(good, tmp_path, reader):
  d = _copy(good["model"], tmp_path / "m")
  (d / "model.safetensors").unlink()
  (d / "model.safetensors").mkdir()
  with pytest.raises(ValueError, match=re.escape(str(d / "model.safetensors"))
                     + ".*not a regular file"):
    READERS[reader](d, good)


def test_load_adapter_directory_and_missing_files(good, tmp_path):
  d = _copy(good["adapter"], tmp_path / "a")
  (d / "adapter_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(d / "adapter_model.safetensors"))):
    lj.load_adapter(d, good["params"])
  (d / "adapter_model.safetensors").mkdir()
  with pytest.raises(ValueError, match="adapter_model.safetensors.*not a regular file"):
    lj.load_adapter(d, good["params"])
  with pytest.raises(FileNotFoundError, match="no such adapter directory"):
    lj.load_adapter(tmp_path / "nope", good["params"])
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "file"))):
    lj.load_adapter(tmp_path / "file", good["params"])


# ----------------------------------------------------------------------------
# JSON: config.json, adapter_config.json, the index

JSON_CASES = {
    "truncated": (b'{"vocab_size": 32, ', r"not valid JSON: Expecting property name .* at line 1 "
                  r"column 20"),
    "second_line": (b'{\n  "a": 1,\n  oops\n}', r"at line 3 column 3"),
    "not_utf8": (b'{"a": "\xff\xfe"}', r"not UTF-8 text \(byte 0xff at offset 7\)"),
    "array": (b"[1, 2]", r"must hold a JSON object, got list"),
    "empty": (b"", r"not valid JSON: Expecting value at line 1 column 1"),
    "duplicate_key": (b'{"a": 1, "a": 2}', r"key 'a' appears twice"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
@pytest.mark.parametrize("reader", ["load_hf", "open_model", "extract", "merge"])
def test_broken_config_json_is_named(good, tmp_path, reader, case):
  d = _copy(good["model"], tmp_path / "m")
  raw, pattern = JSON_CASES[case]
  (d / "config.json").write_bytes(raw)
  with pytest.raises(ValueError, match=re.escape(str(d / "config.json")) + ".*" + pattern):
    READERS[reader](d, good)


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_broken_adapter_config_is_named(good, tmp_path, case):
  d = _copy(good["adapter"], tmp_path / "a")
  raw, pattern = JSON_CASES[case]
  (d / "adapter_config.json").write_bytes(raw)
  with pytest.raises(ValueError,
                     match=re.escape(str(d / "adapter_config.json")) + ".*" + pattern):
    lj.load_adapter(d, good["params"])


def test_config_values_of_the_wrong_type_name_the_file(good, tmp_path):
  d = _copy(good["model"], tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "sixteen"}))
  with pytest.raises(ValueError, match=re.escape(str(d / "config.json")) + ".*sixteen"):
    llama.load_hf(d)
  (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "2"}))
  with pytest.raises(ValueError, match=re.escape(str(d / "config.json"))
                     + ".*num_hidden_layers must be a non-negative integer, got '2'"):
    cli.open_model(str(d))
  a = _copy(good["adapter"], tmp_path / "a")
  acfg = json.loads((a / "adapter_config.json").read_text())
  (a / "adapter_config.json").write_text(json.dumps({**acfg, "rank_pattern": {"q_proj": "x"}}))
  with pytest.raises(ValueError, match=r"adapter_config.json: rank_pattern\['q_proj'\] must be "
                     "a positive number, got 'x'"):
    lj.load_adapter(a, good["params"])


# ----------------------------------------------------------------------------
# sharded checkpoints: the index

@pytest.fixture
def sharded(good, tmp_path):
  """A two-shard copy of the model: (dir, index dict, {shard name: tensor names})."""
  d = tmp_path / "sh"
  d.mkdir()
  (d / "config.json").write_bytes((good["model"] / "config.json").read_bytes())
  sd = checkpoint.read_safetensors(good["model"] / "model.safetensors")
  names = sorted(sd)
  half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
          "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  wm = {}
  for shard, ks in half.items():
    checkpoint.write_safetensors(d / shard, {k: sd[k] for k in ks})
    wm.update({k: shard for k in ks})
  idx = {"metadata": {}, "weight_map": wm}
  (d / "model.safetensors.index.json").write_text(json.dumps(idx))
  return d, idx, half


def _write_index(d, idx):
  (d / "model.safetensors.index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("reader", list(READERS))
def test_sharded_checkpoint_reads(good, sharded, reader, tmp_path):
  d, _, _ = sharded
  if reader == "load_hf":
    _, params = llama.load_hf(d)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  else:
    READERS[reader](d, good)


def _outside_shard(d, idx, half, tmp_path, kind):
  """Point the second shard's entries at a valid shard outside `d`; returns the entry."""
  shard2 = "model-00002-of-00002.safetensors"
  outside = tmp_path / "other"
  outside.mkdir(exist_ok=True)
  (outside / "model.safetensors").write_bytes((d / shard2).read_bytes())
  (d / shard2).unlink()
  if kind == "dotdot":
    name = "../other/model.safetensors"
  elif kind == "absolute":
    name = str(outside / "model.safetensors")
  else:   # a symlink inside the directory that points out of it
    os.symlink(outside / "model.safetensors", d / shard2)
    name = shard2
  wm = {k: (name if v == shard2 else v) for k, v in idx["weight_map"].items()}
  _write_index(d, {**idx, "weight_map": wm})
  return name, half[shard2][0]


@pytest.mark.parametrize("kind,pattern", [("dotdot", r"leaves .*\('\.\.'\)"),
                                          ("absolute", "is absolute"),
                                          ("symlink", "outside .*a symlink out")])
@pytest.mark.parametrize("reader", list(READERS))
def test_index_entries_outside_the_directory_are_refused(good, sharded, tmp_path, reader, kind,
                                                         pattern):
  d, idx, half = sharded
  name, key = _outside_shard(d, idx, half, tmp_path, kind)
  with pytest.raises(ValueError) as e:
    READERS[reader](d, good)
  msg = str(e.value)
  assert str(d / "model.safetensors.index.json") in msg and re.search(pattern, msg), msg
  assert f"weight_map[{key!r}]" in msg, msg


@pytest.mark.parametrize("reader", list(READERS))
def test_model_safetensors_symlink_out_is_refused(good, tmp_path, reader):
  d = _copy(good["model"], tmp_path / "m")
  (d / "model.safetensors").unlink()
  os.symlink(good["model2"] / "model.safetensors", d / "model.safetensors")
  with pytest.raises(ValueError, match=re.escape(str(d / "model.safetensors"))
                     + ".*outside.*symlink"):
    READERS[reader](d, good)


def test_symlink_inside_the_directory_is_fine(good, tmp_path):
  d = _copy(good["model"], tmp_path / "m")
  (d / "model.safetensors").rename(d / "weights.bin.safetensors")
  os.symlink("weights.bin.safetensors", d / "model.safetensors")
  _, params = llama.load_hf(d)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


INDEX_CASES = {
    "missing_shard": (FileNotFoundError, lambda d, idx, half: (
        d / "model-00002-of-00002.safetensors").unlink(),
        r"shard 'model-00002-of-00002.safetensors' \(weight_map\['[^']+'\]\) is missing"),
    "duplicate_across_shards": (ValueError, lambda d, idx, half: checkpoint.write_safetensors(
        d / "model-00002-of-00002.safetensors",
        {**checkpoint.read_safetensors(d / "model-00002-of-00002.safetensors"),
         half["model-00001-of-00002.safetensors"][0]: np.zeros(3, np.float32)}),
        r"tensor '[^']+' is in two files"),
    "listed_in_wrong_shard": (ValueError, lambda d, idx, half: _write_index(d, {
        **idx, "weight_map": {**idx["weight_map"], half["model-00001-of-00002.safetensors"][0]:
                              "model-00002-of-00002.safetensors"}}),
        r"weight_map says tensor '[^']+' is in 'model-00002-of-00002.safetensors', but it is in"),
    "listed_but_absent": (ValueError, lambda d, idx, half: _write_index(d, {
        **idx, "weight_map": {**idx["weight_map"],
                              "model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}}),
        r"not in their shards: \['model\.layers\.9\.mlp\.up_proj\.weight'\]"),
    "weight_map_not_object": (ValueError, lambda d, idx, half: _write_index(
        d, {"weight_map": ["model-00001-of-00002.safetensors"]}), r"'weight_map' object"),
    "entry_not_string": (ValueError, lambda d, idx, half: _write_index(d, {
        "weight_map": {**idx["weight_map"], "x": 3}}), r"weight_map entry 'x' must name a file"),
    "index_not_json": (ValueError, lambda d, idx, half: (
        d / "model.safetensors.index.json").write_text('{"weight_map": {'),
        r"not valid JSON: .* at line 1 column 17"),
    "index_not_utf8": (ValueError, lambda d, idx, half: (
        d / "model.safetensors.index.json").write_bytes(b'{"\xff": 1}'), r"not UTF-8"),
    "index_is_directory": (ValueError, lambda d, idx, half: (
        (d / "model.safetensors.index.json").unlink(),
        (d / "model.safetensors.index.json").mkdir()), r"not a regular file"),
    "shard_is_directory": (ValueError, lambda d, idx, half: (
        (d / "model-00002-of-00002.safetensors").unlink(),
        (d / "model-00002-of-00002.safetensors").mkdir()), r"not a regular file"),
    "shard_truncated": (ValueError, lambda d, idx, half: (
        d / "model-00002-of-00002.safetensors").write_bytes(
            (d / "model-00002-of-00002.safetensors").read_bytes()[:-4]), r"truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
@pytest.mark.parametrize("reader", list(READERS))
def test_broken_index(good, sharded, reader, case):
  d, idx, half = sharded
  exc, fn, pattern = INDEX_CASES[case]
  fn(d, idx, half)
  with pytest.raises(exc) as e:
    READERS[reader](d, good)
  msg = str(e.value)
  assert str(d) in msg and re.search(pattern, msg), msg


# ----------------------------------------------------------------------------
# the merge command line: tokenizer files

def test_tokenizer_symlink_out_of_the_model_is_not_followed(good, tmp_path):
  d = _copy(good["model"], tmp_path / "m")
  secret = tmp_path / "secret.txt"
  secret.write_text("not yours")
  os.symlink(secret, d / "tokenizer.json")
  (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')
  cfgp = tmp_path / "merge.yml"
  cfgp.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(d), "models": [
      {"model": str(d), "parameters": {"weight": 0.5}},
      {"model": str(good["model2"]), "parameters": {"weight": 0.5}}]}))
  with pytest.warns(UserWarning, match=re.escape(str(d / "tokenizer.json")) + ".*outside"):
    cli.run(str(cfgp), str(tmp_path / "out"), quiet=True)
  out = tmp_path / "out"
  assert not (out / "tokenizer.json").exists()
  assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
  assert all("not yours" not in p.read_bytes().decode("latin-1") for p in out.iterdir())


# ----------------------------------------------------------------------------
# adapter_config.json: regular expressions

def _with_config(good, tmp_path, **kw):
  a = _copy(good["adapter"], tmp_path / "a")
  cfg = json.loads((a / "adapter_config.json").read_text())
  cfg.update(kw)
  (a / "adapter_config.json").write_text(json.dumps(cfg))
  return a


@pytest.mark.parametrize("key,value", [
    ("rank_pattern", {"q_proj(": 2}), ("alpha_pattern", {"[v_proj": 3}),
    ("target_modules", "model\\.(q_proj"), ("layers_pattern", ["layers", "h("]),
    ("exclude_modules", "*")])
def test_invalid_pattern_names_key_and_file(good, tmp_path, key, value):
  a = _with_config(good, tmp_path, **{key: value})
  with pytest.raises(ValueError, match=re.escape(str(a / "adapter_config.json")) + f": {key} "
                     r"pattern .* is not a valid regular expression"):
    lj.load_adapter(a, good["params"])


def test_backtracking_pattern_is_bounded(good, tmp_path, monkeypatch):
  """A pattern that backtracks catastrophically: an error naming the key and the file
  within the time budget, not a hang."""
  from lora_jax import _peft_io
  monkeypatch.setattr(_peft_io, "PATTERN_BUDGET_S", 0.5)
  a = _with_config(good, tmp_path, rank_pattern={"(.*){1,32000}[bc]": 2})
  import time
  t = time.monotonic()
  with pytest.raises(ValueError, match=re.escape(str(a / "adapter_config.json"))
                     + r": rank_pattern pattern '\(\.\*\)\{1,32000\}\[bc\]'.*took more than "
                     r"0\.5s.*backtracks"):
    lj.load_adapter(a, good["params"])
  assert time.monotonic() - t < 30


@pytest.mark.slow
def test_pattern_that_hangs_python_re_loads_in_bounded_time(good, tmp_path):
  """`(.*.*)*X` makes Python's `re` backtrack for minutes on a module name; loading
  runs in a child with a time limit and must finish (the pattern matches nothing)."""
  a = _with_config(good, tmp_path, rank_pattern={"(.*.*)*X": 7},
                   alpha_pattern={"(.*.*)*X": 9})
  code = textwrap.dedent(f"""
      import jax, lora_jax as lj
      from lora_jax.models import llama
      _, params = llama.load_hf({str(good['model'])!r})
      out = lj.load_adapter({str(a)!r}, params)
      print(out["layers"][0]["self_attn"]["q_proj"]["kernel"].rank)
  """)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                     env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "2"


# ----------------------------------------------------------------------------
# files are data

def test_pickle_files_are_never_read(good, tmp_path):
  """A checkpoint holding only PyTorch pickles is refused, and unpickling never runs."""
  d = tmp_path / "m"
  d.mkdir()
  (d / "config.json").write_bytes((good["model"] / "config.json").read_bytes())
  marker = tmp_path / "pwned"
  import pickle

  class Evil:
    def __reduce__(self):
      return (open, (str(marker), "w"))
  (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
  for reader in READERS:
    with pytest.raises(FileNotFoundError, match=re.escape(str(d))):
      READERS[reader](d, good)
  a = _copy(good["adapter"], tmp_path / "a")
  (a / "adapter_model.safetensors").unlink()
  (a / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    lj.load_adapter(a, good["params"])
  assert not marker.exists()


def test_adapter_config_symlink_out_is_refused(good, tmp_path):
  a = _copy(good["adapter"], tmp_path / "a")
  other = tmp_path / "elsewhere.json"
  other.write_bytes((a / "adapter_config.json").read_bytes())
  (a / "adapter_config.json").unlink()
  os.symlink(other, a / "adapter_config.json")
  with pytest.raises(ValueError, match=re.escape(str(a / "adapter_config.json"))
                     + ".*outside.*symlink"):
    lj.load_adapter(a, good["params"])


def test_merge_adapter_reference_with_broken_adapter(good, tmp_path):
  a = _copy(good["adapter"], tmp_path / "a")
  raw = (a / "adapter_model.safetensors").read_bytes()
  (a / "adapter_model.safetensors").write_bytes(raw[:-3])
  with pytest.raises(ValueError, match=re.escape(str(a / "adapter_model.safetensors"))
                     + ".*truncated or corrupt"):
    cli.open_model(f"{good['model']}+{a}")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    m = cli.open_model(f"{good['model']}+{good['adapter']}")
  assert isinstance(m.tensors["model.layers.0.self_attn.q_proj.weight"], cli.AdaptedTensor)


# ----------------------------------------------------------------------------
# writers: outputs that cannot be directories

WRITERS = {
    "save_adapter": lambda out, good: lj.save_adapter(out, lj.init(
        jax.random.key(0), good["params"], lj.LoraConfig(rank=2, alpha=2,
                                                          targets=r".*/q_proj/kernel"))),
    "save_hf": lambda out, good: llama.save_hf(out, llama.LlamaConfig(**TINY), good["params"]),
    "extract": lambda out, good: extract_cli.extract(str(good["model2"]), str(good["model"]),
                                                     str(out), overwrite=True, quiet=True),
    "merge": lambda out, good: _merge_to(out, good),
}


def _merge_to(out, good):
  cfgp = good["model"].parent / "merge_to.yml"
  cfgp.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
      {"model": str(good["model"]), "parameters": {"weight": 0.5}},
      {"model": str(good["model2"]), "parameters": {"weight": 0.5}}]}))
  cli.run(str(cfgp), str(out), quiet=True, overwrite=True)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_refuse_a_file_as_output_directory(good, tmp_path, writer):
  out = tmp_path / "out"
  out.write_text("precious")
  with pytest.raises((ValueError, OSError)) as e:
    WRITERS[writer](out, good)
  assert str(out) in str(e.value), str(e.value)
  assert out.read_text() == "precious"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_name_the_path_when_the_parent_is_a_file(good, tmp_path, writer):
  (tmp_path / "f").write_text("precious")
  out = tmp_path / "f" / "out"
  with pytest.raises(OSError) as e:
    WRITERS[writer](out, good)
  assert str(tmp_path / "f") in str(e.value), str(e.value)
  assert (tmp_path / "f").read_text() == "precious"
