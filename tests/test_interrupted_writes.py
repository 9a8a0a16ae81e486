"""Interrupted writes: a child process is killed with SIGKILL in the middle of
`lj.save_adapter`, `llama.save_hf`, `lora-jax merge` and `lora-jax extract-lora`
(its write slowed at a chosen point), and a disk that fills up (a 1 MB tmpfs, when
this machine lets us mount one).

After each kill the previous contents are intact byte for byte (or nothing exists),
only a temporary directory with our prefix is left, and the next successful run
removes it, and nothing else.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import yaml

import lora_jax as lj
from lora_jax import checkpoint
from lora_jax.models import llama
from merging import cli, extract_cli

pytestmark = pytest.mark.slow

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = llama.LlamaConfig(**TINY)

# The child: builds what it saves from a seed, slows the write at STAGE, runs ACTION.
CHILD = textwrap.dedent("""
    import os, sys, time
    import jax, lora_jax as lj
    from lora_jax import checkpoint
    from lora_jax.models import llama

    stage, action, out = sys.argv[1], sys.argv[2], sys.argv[3]

    def pause():
      print("PAUSED", flush=True)
      time.sleep(600)

    if stage == "weights":          # half of the first file's bytes are on disk
      def slow(path, chunks):
        with open(path, "wb") as f:
          f.write(bytes(chunks[0])[: max(1, len(chunks[0]) // 2)])
          f.flush()
          pause()
      checkpoint._write_bytes = slow
    elif stage == "config":         # the weights are written, the config is not
      checkpoint.write_json = lambda path, obj: pause()
    elif stage == "swap":           # everything written, not yet renamed into place
      checkpoint._swap_in = lambda tmp, out: pause()
    elif stage == "after_swap":     # swapped in; the old contents not yet deleted
      orig = checkpoint._exchange
      def exchange(a, b):
        ok = orig(a, b)
        pause()
        return ok
      checkpoint._exchange = exchange
    elif stage == "shard":          # the merge's shard writer, after one tensor
      orig_write = checkpoint.ShardWriter.write
      def write(self, name, arr):
        orig_write(self, name, arr)
        pause()
      checkpoint.ShardWriter.write = write

    config = llama.LlamaConfig(**{tiny!r})
    if action == "adapter":
      params = llama.init_params(jax.random.key(0), config)
      cfg = lj.LoraConfig(rank=4, alpha=32, targets=r".*/(q|k|v)_proj/kernel")
      lj.save_adapter(out, lj.init(jax.random.key(7), params, cfg), cfg)
    elif action == "hf":
      llama.save_hf(out, config, llama.init_params(jax.random.key(7), config))
    elif action == "merge":
      from merging import cli
      sys.exit(cli.main(["merge", sys.argv[4], out, "--quiet", "--overwrite"]))
    elif action == "extract":
      from merging import cli
      sys.exit(cli.main(["extract-lora", "--model", sys.argv[4], "--base-model", sys.argv[5],
                         "--out-path", out, "--max-rank", "2", "--overwrite", "--quiet"]))
    print("DONE", flush=True)
""").replace("{tiny!r}", repr(TINY))


def _kill_mid_write(stage, action, out, *extra, wait_s=180):
  """Run the child until it reports PAUSED, then SIGKILL it; returns its exit status."""
  p = subprocess.Popen([sys.executable, "-c", CHILD, stage, action, str(out), *map(str, extra)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  try:
    ready, _, _ = select.select([p.stdout], [], [], wait_s)
    line = p.stdout.readline() if ready else ""
    assert line.strip() == "PAUSED", (line, p.poll(), p.stderr.read() if p.poll() else "")
    p.send_signal(signal.SIGKILL)
    return p.wait(timeout=30)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait(timeout=30)


def _snapshot(d: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def _temps(parent: pathlib.Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX))


@pytest.fixture(scope="module")
def base_params():
  return llama.init_params(jax.random.key(0), CONFIG)


def _old_adapter(path, base_params):
  cfg = lj.LoraConfig(rank=2, alpha=4, targets=r".*/(q|v)_proj/kernel")
  lj.save_adapter(path, lj.init(jax.random.key(1), base_params, cfg), cfg)


# ----------------------------------------------------------------------------
# lj.save_adapter

@pytest.mark.parametrize("stage", ["weights", "config", "swap", "after_swap"])
def test_killed_save_adapter_leaves_old_or_new_adapter(tmp_path, base_params, stage):
  out = tmp_path / "adapter"
  _old_adapter(out, base_params)
  old = _snapshot(out)
  assert _kill_mid_write(stage, "adapter", out) == -signal.SIGKILL
  now = _snapshot(out)
  if stage == "after_swap":     # the new adapter is in place, complete
    loaded = lj.load_adapter(out, base_params)
    assert loaded["layers"][0]["self_attn"]["k_proj"]["kernel"].rank == 4
    assert json.loads(now["adapter_config.json"])["lora_alpha"] == 32
  else:
    assert now == old           # the old adapter, byte for byte: never a mix
    lj.load_adapter(out, base_params)
  left = _temps(tmp_path)
  assert len(left) == 1 and left[0].endswith("-adapter"), left
  # the next save removes what the killed one left, and only that
  (tmp_path / ".lora-jax-tmp-notours").mkdir()
  (tmp_path / f"{checkpoint.TMP_PREFIX}{os.getpid()}-{'0' * 32}-adapter").mkdir()  # alive: us
  (tmp_path / "other").mkdir()
  _old_adapter(out, base_params)
  assert _temps(tmp_path) == sorted([".lora-jax-tmp-notours",
                                     f"{checkpoint.TMP_PREFIX}{os.getpid()}-{'0' * 32}-adapter"])
  assert (tmp_path / "other").is_dir()
  assert _snapshot(out) == old


def test_killed_first_save_adapter_leaves_nothing(tmp_path):
  out = tmp_path / "adapter"
  assert _kill_mid_write("swap", "adapter", out) == -signal.SIGKILL
  assert not out.exists()
  assert len(_temps(tmp_path)) == 1
  checkpoint.clean_stale(out)
  assert _temps(tmp_path) == []


def test_mixed_save_is_an_error_naming_module_ranks_and_file(tmp_path, base_params):
  """What an interrupted save used to leave (new factors, old config): refused."""
  a, b = tmp_path / "a", tmp_path / "b"
  _old_adapter(a, base_params)
  cfg = lj.LoraConfig(rank=4, alpha=32, targets=r".*/(q|v)_proj/kernel")
  lj.save_adapter(b, lj.init(jax.random.key(7), base_params, cfg), cfg)
  (b / "adapter_config.json").write_bytes((a / "adapter_config.json").read_bytes())
  with pytest.raises(ValueError, match=str(b / "adapter_model.safetensors")
                     + r": base_model\.model\.model\.layers\.0\.self_attn\.q_proj: lora_A has "
                     r"rank 4 but adapter_config.json gives r=2 \(.*adapter_config.json\)"):
    lj.load_adapter(b, base_params)


def test_save_adapter_keeps_other_files(tmp_path, base_params):
  out = tmp_path / "adapter"
  _old_adapter(out, base_params)
  (out / "README.md").write_text("notes")
  (out / "sub").mkdir()
  (out / "sub" / "x.txt").write_text("y")
  cfg = lj.LoraConfig(rank=4, alpha=32, targets=r".*/(q|v)_proj/kernel")
  lj.save_adapter(out, lj.init(jax.random.key(7), base_params, cfg), cfg)
  assert (out / "README.md").read_text() == "notes"
  assert (out / "sub" / "x.txt").read_text() == "y"
  assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


# ----------------------------------------------------------------------------
# llama.save_hf

@pytest.mark.parametrize("stage", ["weights", "swap"])
def test_killed_save_hf_leaves_old_checkpoint(tmp_path, base_params, stage):
  out = tmp_path / "model"
  llama.save_hf(out, CONFIG, base_params)
  old = _snapshot(out)
  assert _kill_mid_write(stage, "hf", out) == -signal.SIGKILL
  assert _snapshot(out) == old
  assert len(_temps(tmp_path)) == 1
  llama.save_hf(out, CONFIG, base_params)
  assert _temps(tmp_path) == []
  _, back = llama.load_hf(out)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(base_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_hf_replaces_an_old_sharded_checkpoint(tmp_path, base_params):
  out = tmp_path / "model"
  llama.save_hf(out, CONFIG, base_params)
  (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
  (out / "model.safetensors.index.json").write_text("{}")
  (out / "tokenizer.json").write_text("{}")
  llama.save_hf(out, CONFIG, base_params)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                   "tokenizer.json"]


# ----------------------------------------------------------------------------
# lora-jax merge and extract-lora

@pytest.fixture(scope="module")
def models(tmp_path_factory, base_params):
  root = tmp_path_factory.mktemp("models")
  llama.save_hf(root / "m0", CONFIG, base_params)
  llama.save_hf(root / "m1", CONFIG, llama.init_params(jax.random.key(3), CONFIG))
  cfgp = root / "merge.yml"
  cfgp.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
      {"model": str(root / "m0"), "parameters": {"weight": 0.5}},
      {"model": str(root / "m1"), "parameters": {"weight": 0.5}}]}))
  return root, cfgp


def test_killed_merge_leaves_old_output_and_next_run_cleans(tmp_path, models):
  root, cfgp = models
  out = tmp_path / "merged"
  cli.run(str(cfgp), str(out), quiet=True, max_shard_size="2KB")
  old = _snapshot(out)
  assert len([n for n in old if n.endswith(".safetensors")]) > 1
  assert _kill_mid_write("shard", "merge", out, cfgp) == -signal.SIGKILL
  assert _snapshot(out) == old
  left = _temps(tmp_path)
  assert len(left) == 1 and any((tmp_path / left[0]).iterdir())
  cli.run(str(cfgp), str(out), quiet=True, overwrite=True)
  assert _temps(tmp_path) == []
  assert sorted(_snapshot(out)) == ["config.json", "model.safetensors"]


def test_killed_first_merge_leaves_no_output(tmp_path, models):
  _, cfgp = models
  out = tmp_path / "merged"
  assert _kill_mid_write("shard", "merge", out, cfgp) == -signal.SIGKILL
  assert not out.exists()
  assert cli.main(["merge", str(cfgp), str(out), "--quiet"]) == 0
  assert _temps(tmp_path) == []


def test_failed_merge_leaves_old_output_and_no_temp(tmp_path, models, monkeypatch):
  _, cfgp = models
  out = tmp_path / "merged"
  cli.run(str(cfgp), str(out), quiet=True)
  old = _snapshot(out)

  def boom(self, name, arr):
    raise OSError(errno.EIO, "simulated I/O error")
  monkeypatch.setattr(checkpoint.ShardWriter, "write", boom)
  with pytest.raises(OSError, match=re.escape(str(out)) + ": cannot write: simulated I/O error"):
    cli.run(str(cfgp), str(out), quiet=True, overwrite=True)
  assert _snapshot(out) == old
  assert _temps(tmp_path) == []


def test_killed_extract_leaves_old_adapter(tmp_path, models):
  root, _ = models
  out = tmp_path / "lora"
  extract_cli.extract(str(root / "m1"), str(root / "m0"), str(out), max_rank=1, quiet=True)
  old = _snapshot(out)
  assert _kill_mid_write("config", "extract", out, root / "m1", root / "m0") == -signal.SIGKILL
  assert _snapshot(out) == old
  assert len(_temps(tmp_path)) == 1
  extract_cli.extract(str(root / "m1"), str(root / "m0"), str(out), max_rank=2, quiet=True,
                      overwrite=True)
  assert _temps(tmp_path) == []
  assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


# ----------------------------------------------------------------------------
# disk full

@pytest.fixture
def small_disk(tmp_path):
  """A 1 MB tmpfs mounted at tmp_path / "small" (skipped where mounting is not allowed)."""
  d = tmp_path / "small"
  d.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root; disk-full case not run")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                     capture_output=True, text=True, timeout=30)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); disk-full case not run")
  try:
    yield d
  finally:
    subprocess.run(["umount", str(d)], capture_output=True, timeout=30)


BIG = llama.LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 256,
                           "num_hidden_layers": 4, "num_attention_heads": 4,
                           "num_key_value_heads": 2})


def test_disk_full_save_adapter_names_path_and_keeps_old(small_disk):
  out = small_disk / "adapter"
  base = llama.init_params(jax.random.key(0), BIG)
  _old_adapter(out, base)
  old = _snapshot(out)
  cfg = lj.LoraConfig(rank=64, alpha=64, targets=r".*_proj/kernel")   # ~2 MB of factors
  params = lj.init(jax.random.key(5), base, cfg)
  with pytest.raises(OSError) as e:
    lj.save_adapter(out, params, cfg)
  assert e.value.errno == errno.ENOSPC
  assert str(out) in str(e.value) and "No space left" in str(e.value), str(e.value)
  assert _snapshot(out) == old
  assert _temps(small_disk) == []


def test_disk_full_merge_names_path_and_keeps_old(small_disk, tmp_path, base_params):
  big = BIG
  for i in range(2):
    llama.save_hf(tmp_path / f"b{i}", big, llama.init_params(jax.random.key(i), big))
  cfgp = tmp_path / "big.yml"
  cfgp.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
      {"model": str(tmp_path / f"b{i}"), "parameters": {"weight": 0.5}} for i in range(2)]}))
  out = small_disk / "merged"
  out.mkdir()
  (out / "config.json").write_text('{"old": true}')
  with pytest.raises(OSError) as e:
    cli.run(str(cfgp), str(out), quiet=True, overwrite=True)
  assert e.value.errno == errno.ENOSPC and str(out) in str(e.value), str(e.value)
  assert _snapshot(out) == {"config.json": b'{"old": true}'}
  assert _temps(small_disk) == []
