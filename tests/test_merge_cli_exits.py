"""`lora-jax merge` exits 2 with one line naming the path for output paths it cannot
write (a file, a read-only directory, a full disk, an existing file under
`--overwrite`) and for exhausted memory, both as a real subprocess and in-process;
nothing is left behind."""

import os
import subprocess

import pytest

from merging import cli
from test_merge_helpers import run_cli, tiny_ckpt, write_yaml


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("exits")
  m0 = tiny_ckpt(root / "m0", 0, shape=(64, 128))      # ~200 KB of tensors
  m1 = tiny_ckpt(root / "m1", 1, shape=(64, 128))
  return write_yaml(root / "c.yml", {
      "merge_method": "linear", "dtype": "float32",
      "models": [{"model": m0, "parameters": {"weight": 0.5}},
                 {"model": m1, "parameters": {"weight": 0.5}}]})


@pytest.fixture
def mount(tmp_path):
  """`mount(options)` -> a fresh tmpfs directory (skips when mounting is not permitted)."""
  dirs = []

  def make(options):
    d = tmp_path / f"mnt{len(dirs)}"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
                       capture_output=True, text=True)
    if p.returncode != 0:
      pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}): needs root/CAP_SYS_ADMIN")
    dirs.append(d)
    return d

  yield make
  for d in dirs:
    subprocess.run(["umount", str(d)], capture_output=True)


def both(cfg, out, capsys, *flags):
  """Run in-process and as a subprocess; both exit 2 with one line; return the lines."""
  assert cli.main(["merge", cfg, str(out), "--quiet", *flags]) == 2
  err_in = capsys.readouterr().err
  rc, _, err_sub = run_cli("merge", cfg, out, "--quiet", *flags)
  assert rc == 2, err_sub
  for err in (err_in, err_sub):
    assert err.startswith("lora-jax merge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
  return err_in, err_sub


def test_output_path_is_a_file(cfg_path, tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("keep")
  for flags in ((), ("--overwrite",)):
    for err in both(cfg_path, f, capsys, *flags):
      assert f"output path {str(f)!r} exists and is not a directory" in err
    assert f.read_text() == "keep"


def test_parent_is_a_file(cfg_path, tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("keep")
  for err in both(cfg_path, f / "out", capsys):
    assert str(f) in err and ("Not a directory" in err or "File exists" in err)


def test_read_only_directory(cfg_path, mount, capsys):
  ro = mount("ro,size=64k")
  for err in both(cfg_path, ro / "out", capsys):
    assert "Read-only file system" in err and str(ro) in err
  assert os.listdir(ro) == []


def test_full_disk_leaves_nothing_behind(cfg_path, mount, capsys):
  small = mount("size=16k")
  for err in both(cfg_path, small / "out", capsys):
    assert "No space left on device" in err and str(small / "out") in err
  assert os.listdir(small) == []         # the temporary directory was removed


def test_dev_full_as_config_output_is_not_a_directory(cfg_path, capsys):
  for err in both(cfg_path, "/dev/full", capsys):
    assert "'/dev/full' exists and is not a directory" in err


def test_memory_error_exits_2(cfg_path, tmp_path, capsys, monkeypatch):
  def boom(*a, **k):
    raise MemoryError()
  monkeypatch.setattr(cli, "run_task", boom)
  out = tmp_path / "out"
  assert cli.main(["merge", cfg_path, str(out), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err == f"lora-jax merge: error: out of memory while writing {str(out)!r}\n"
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".lora")]


def test_other_os_errors_name_the_path(cfg_path, tmp_path, capsys, monkeypatch):
  def denied(*a, **k):
    raise PermissionError(13, "Permission denied", str(tmp_path / "x"))
  monkeypatch.setattr(cli.checkpoint, "ShardWriter", denied)   # an OSError while writing
  assert cli.main(["merge", cfg_path, str(tmp_path / "out"), "--quiet"]) == 2
  err = capsys.readouterr().err
  # the checkpoint writer names the output directory it could not write
  assert "Permission denied" in err and str(tmp_path / "out") in err and err.count("\n") == 1


def test_config_is_a_directory_or_unreadable(tmp_path, capsys):
  assert cli.main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
  assert "is a directory" in capsys.readouterr().err
  rc, _, err = run_cli("merge", tmp_path / "none.yml", tmp_path / "out")
  assert rc == 2 and "does not exist" in err and err.count("\n") == 1


def test_intermediate_dir_is_a_file(cfg_path, tmp_path, capsys):
  import yaml
  with open(cfg_path) as f:
    doc = yaml.safe_load(f)
  multi = write_yaml(tmp_path / "multi.yml", yaml.safe_dump({**doc, "name": "a"}) + "---\n"
                     + yaml.safe_dump({**doc, "models": [doc["models"][0], {
                         "model": "a", "parameters": {"weight": 0.5}}]}))
  f = tmp_path / "inter"
  f.write_text("keep")
  for err in both(multi, tmp_path / "out", capsys, "-I", str(f)):
    assert str(f) in err and ("exists" in err or "Not a directory" in err)
  assert f.read_text() == "keep"
