"""mergekit users' commands: mergekit-yaml's flags, mergekit-multi's multi-document
configs, and `--mergekit-arithmetic` on bf16 checkpoints, each against mergekit run
at test time on tiny random Llama checkpoints."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from merging import cli
from test_merge_helpers import run_cli, write_yaml

pytestmark = [pytest.mark.interop, pytest.mark.slow]

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mergekit")

from test_merging_cli import load_dir, load_dir_f32, make_llama  # noqa: E402

MK_BIN = os.path.dirname(sys.executable)


def mergekit_yaml(cfg_path, out, *extra, subprocess_run=False):
  """mergekit-yaml on a config: its click command in this process (the same entry point
  and option parsing as the executable, without a ~12 CPU-s torch + mergekit import per
  call), or with `subprocess_run` the installed `mergekit-yaml` executable itself."""
  args = [str(cfg_path), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
          *extra]
  if subprocess_run:
    subprocess.run([os.path.join(MK_BIN, "mergekit-yaml"), *args], check=True,
                   capture_output=True)
  else:
    from mergekit.scripts.run_yaml import main
    main.main(args, prog_name="mergekit-yaml", standalone_mode=False)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
  root = tmp_path_factory.mktemp("bf16")
  return {f"b{i}": make_llama(root / f"b{i}", 30 + i, dtype=torch.bfloat16) for i in range(3)}


def bf16_configs(p):
  b0, b1, b2 = p["b0"], p["b1"], p["b2"]
  two = [{"model": b1, "parameters": {"weight": 0.6, "density": 0.5}},
         {"model": b2, "parameters": {"weight": 0.4, "density": 0.7}}]
  return {
      "linear": {"merge_method": "linear", "dtype": "bfloat16",
                 "models": [{"model": b1, "parameters": {"weight": 0.3}},
                            {"model": b2, "parameters": {"weight": 0.7}}]},
      "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b0,
                          "dtype": "bfloat16", "parameters": {"lambda": 0.8},
                          "models": [{"model": b1, "parameters": {"weight": 0.6}},
                                     {"model": b2, "parameters": {"weight": 0.3}}]},
      "ties": {"merge_method": "ties", "base_model": b0, "dtype": "bfloat16", "models": two},
      "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b0,
                           "dtype": "bfloat16", "parameters": {"gamma": 0.05},
                           "models": two},
      "slerp": {"merge_method": "slerp", "base_model": b0, "dtype": "bfloat16",
                "parameters": {"t": [0.2, 0.7]}, "models": [{"model": b0}, {"model": b1}]},
  }


def _ambiguous(cfg, p, name):
  """Positions where torch's top-k order among equal magnitudes decides the result:
  some model's bf16 |delta| equals a value at its keep/drop boundary."""
  import ml_dtypes
  base = load_dir_f32(cfg["base_model"])[name]
  amb = np.zeros(base.shape, bool)
  for mdef in cfg["models"]:
    x = load_dir_f32(mdef["model"])[name]
    d = np.abs((x - base).astype(ml_dtypes.bfloat16).astype(np.float32))
    n, dens = d.size, mdef["parameters"]["density"]
    asc = np.sort(d.reshape(-1))
    if cfg["merge_method"] == "ties":
      cuts = [n - max(1, int(dens * n))]
    else:
      target, top = int(dens * n), int(cfg["parameters"]["gamma"] * n)
      bot = max(0, n - target - top)
      cuts = [bot, bot + target]
    for c in cuts:
      for j in (c - 1, c):
        if 0 <= j < n:
          amb |= d == asc[j]
  return amb


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties",
                                  "slerp"])
def test_mergekit_arithmetic_bf16_equals_mergekit(bf16, tmp_path, name):
  cfg = bf16_configs(bf16)[name]
  path = write_yaml(tmp_path / "c.yml", cfg)
  mergekit_yaml(path, tmp_path / "mk")
  assert cli.main(["merge", path, str(tmp_path / "ours"), "--quiet",
                   "--mergekit-arithmetic"]) == 0
  # the config key is the same switch
  assert cli.main(["merge", write_yaml(tmp_path / "c2.yml", {**cfg, "arithmetic": "mergekit"}),
                   str(tmp_path / "ours2"), "--quiet"]) == 0
  assert cli.main(["merge", path, str(tmp_path / "f32"), "--quiet"]) == 0
  mk, ours, ours2, f32 = (load_dir_f32(tmp_path / d) for d in ("mk", "ours", "ours2", "f32"))
  assert sorted(mk) == sorted(ours)
  n_f32 = n_ours = 0
  for k in mk:
    np.testing.assert_array_equal(ours[k], ours2[k])
    bad = mk[k] != ours[k]
    n_ours += int(bad.sum())
    n_f32 += int((mk[k] != f32[k]).sum())
    if name in ("linear", "task_arithmetic"):
      assert not bad.any(), (k, int(bad.sum()))           # equal bits
    elif name in ("ties", "breadcrumbs_ties"):
      # equal bits except where torch picks among equal magnitudes at the cut
      amb = _ambiguous(cfg, bf16, k)
      assert not (bad & ~amb).any(), (k, int((bad & ~amb).sum()))
    else:   # slerp: mergekit computes in float32 too; only its reduction order differs
      ulp = np.abs(mk[k]) * 2.0 ** -7
      assert np.all(np.abs(mk[k] - ours[k]) <= ulp + 1e-30), k
      assert bad.mean() < 1e-3, (k, bad.mean())
  if name != "slerp":
    assert n_ours < n_f32    # float32 arithmetic really differs from mergekit's
  print(f"{name}: {n_ours} differing values with --mergekit-arithmetic, {n_f32} without")


def test_multi_document_config_equals_mergekit_multi(tmp_path):
  m = {f"m{i}": make_llama(tmp_path / f"m{i}", i, layers=2, hidden=16) for i in range(3)}
  docs = [
      {"name": "soup", "merge_method": "linear", "dtype": "float32",
       "models": [{"model": m["m1"], "parameters": {"weight": 0.3}},
                  {"model": m["m2"], "parameters": {"weight": 0.7}}]},
      {"name": "tv", "merge_method": "task_arithmetic", "base_model": m["m0"],
       "dtype": "float32",
       "models": [{"model": "soup", "parameters": {"weight": 0.5}},
                  {"model": m["m1"], "parameters": {"weight": 0.5}}]},
      {"merge_method": "slerp", "base_model": m["m0"], "dtype": "float32",
       "parameters": {"t": 0.4}, "models": [{"model": m["m0"]}, {"model": "tv"}]},
  ]
  text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
  path = write_yaml(tmp_path / "multi.yml", text)
  subprocess.run([os.path.join(MK_BIN, "mergekit-multi"), path, "--out-path",
                  str(tmp_path / "mk_final"), "-I", str(tmp_path / "mk_inter"),
                  "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                 check=True, capture_output=True)
  rc, out, err = run_cli("merge", path, tmp_path / "final", "-I", tmp_path / "inter",
                         "--quiet")
  assert rc == 0, err
  for a, b in (("mk_final", "final"), ("mk_inter/soup", "inter/soup"),
               ("mk_inter/tv", "inter/tv")):
    x, y = load_dir(tmp_path / a), load_dir(tmp_path / b)
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_allclose(y[k], x[k], atol=1e-5, rtol=1e-5, err_msg=f"{b}: {k}")
  # lazy (mergekit-multi's default): existing intermediates are kept, not redone
  mtime = os.path.getmtime(tmp_path / "inter" / "soup" / "model.safetensors")
  assert cli.main(["merge", path, str(tmp_path / "final2"), "-I", str(tmp_path / "inter"),
                   "--quiet"]) == 0
  assert os.path.getmtime(tmp_path / "inter" / "soup" / "model.safetensors") == mtime
  assert cli.main(["merge", path, str(tmp_path / "final3"), "-I", str(tmp_path / "inter"),
                   "--quiet", "--no-lazy"]) == 0
  assert os.path.getmtime(tmp_path / "inter" / "soup" / "model.safetensors") > mtime


def test_mergekit_flags_are_accepted_and_change_nothing(tmp_path):
  m0, m1 = (make_llama(tmp_path / f"m{i}", i, layers=2, hidden=16) for i in range(2))
  with open(os.path.join(m0, "tokenizer_config.json"), "w") as f:
    f.write('{"model_max_length": 64}')
  cfg = {"merge_method": "ties", "base_model": m0, "dtype": "float32",
         "models": [{"model": m1, "parameters": {"weight": 0.7, "density": 0.5}}]}
  path = write_yaml(tmp_path / "c.yml", cfg)
  mergekit_yaml(path, tmp_path / "mk", "--random-seed", "3", "--lazy-unpickle",
                "--allow-crimes", "--out-shard-size", "1B", subprocess_run=True)
  flags = ["--lazy-unpickle", "--allow-crimes", "--cuda", "--device", "cpu", "--random-seed",
           "3", "--write-model-card", "--trust-remote-code", "--lora-merge-cache",
           str(tmp_path / "cache"), "--transformers-cache", str(tmp_path / "tc"),
           "--low-cpu-memory", "--safe-serialization", "--out-shard-size", "1B",
           "--read-to-gpu", "--multi-gpu", "--gpu-rich", "--clone-tensors", "--async-write",
           "-j", "2", "--write-threads", "2", "-v", "-v", "--lora-merge-dtype", "bfloat16"]
  assert cli.main(["merge", path, str(tmp_path / "ours"), "--quiet", *flags]) == 0
  a, b = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
  assert not (tmp_path / "cache").exists() and not (tmp_path / "tc").exists()
  # --out-shard-size uses mergekit's k/M/B: 1k bytes -> several shards
  assert cli.main(["merge", path, str(tmp_path / "sh"), "--quiet", "--out-shard-size",
                   "1k"]) == 0
  assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
  # --no-copy-tokenizer: the base's tokenizer files are not copied
  assert (tmp_path / "ours" / "tokenizer_config.json").exists()
  assert cli.main(["merge", path, str(tmp_path / "notok"), "--quiet",
                   "--no-copy-tokenizer"]) == 0
  assert not (tmp_path / "notok" / "tokenizer_config.json").exists()
  assert (tmp_path / "notok" / "config.json").exists()
