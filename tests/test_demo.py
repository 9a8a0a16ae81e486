"""`make demo`'s pipeline at a toy size: every stage runs and produces its numbers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from train_testing import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.interop
def test_the_demo_story_runs_at_toy_size(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "XLA_FLAGS": xla_flags(1),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         # identical programs (one per task adapter) compile once
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  out = tmp_path / "demo"
  p = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--size", "toy",
                      "--out", str(out)], env=env, capture_output=True, text=True,
                     timeout=900, cwd=tmp_path)
  assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
  s = json.loads((out / "summary.json").read_text())
  tasks = ("add", "rev", "sort")
  want = {"base", "add adapter", "rev adapter", "sort adapter", "union adapter (all tasks)",
          "add QLoRA (NF4 base)", "add QA-LoRA folded int4"}
  want |= {f"adapters merged: {m}" for m in ("cat", "linear", "svd", "ties", "dare_ties")}
  want |= {f"lora-jax merge: {m}" for m in ("task_arithmetic", "ties")}
  assert want <= set(s["accuracy"]), sorted(s["accuracy"])
  for name, row in s["accuracy"].items():
    assert set(row) == set(tasks) and all(0.0 <= a <= 1.0 for a in row.values()), (name, row)
  sv = s["serving"]
  assert sv["rows_equal_alone"] is True
  for k in ("tok_s_mixed", "tok_s_base", "tok_s_one_at_a_time", "load_adapter_s",
            "load_model_s", "adapter_bytes", "merged_bytes"):
    assert sv[k] > 0, k
  assert sv["merged_bytes"] > sv["adapter_bytes"]
  for png in ("loss.png", "accuracy.png", "memory.png"):
    assert (out / png).stat().st_size > 1000, png
  # every adapter was trained by `lora-jax train` and left its PEFT directory
  for t in tasks + ("all",):
    assert (out / "runs" / t / "adapter" / "adapter_config.json").exists()
  assert "6. summary" in p.stdout
