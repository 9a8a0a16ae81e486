"""benchmarks/train_memory.py runs end to end on a toy model (--tiny): both sides' children
measure one step, and the run prints both ratios as numbers, each with its target."""

import os
import re
import subprocess
import sys

import pytest

_ROOT = os.path.join(os.path.dirname(__file__), "..")
_PATH = os.path.join(_ROOT, "benchmarks", "train_memory.py")


@pytest.mark.slow
@pytest.mark.interop
def test_tiny_run_prints_both_ratios():
  pytest.importorskip("peft")
  pytest.importorskip("bitsandbytes")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.abspath(_ROOT), os.environ.get("PYTHONPATH", "")])}
  # --max-runs 1: the search adds one child per side to the fixed-size run
  p = subprocess.run([sys.executable, _PATH, "--tiny", "--seq", "256", "--loss-chunk", "128",
                      "--budget-gib", "0.75", "--search-resolution", "256", "--max-runs", "1",
                      "--variants", "full", "--child-timeout", "240"],
                     capture_output=True, text=True, env=env, timeout=900)
  out = p.stdout
  assert p.returncode == 0, (out[-2000:], p.stderr[-2000:])
  r1 = re.search(r"RATIO 1 .*: (\d+\.\d+)x  \(target <= 0\.60x: (met|NOT met)\)", out)
  r2 = re.search(r"RATIO 2 .*: (\d+\.\d+)x  \(target >= 2x: (met|NOT met);", out)
  assert r1 and r2, out
  assert float(r1.group(1)) > 0 and float(r2.group(1)) > 0
  # both sides measured the same toy model: the loss of the first step agrees (B = 0 at
  # init, so both compute the NF4 base's loss)
  losses = re.findall(r"^  (PEFT \+ bnb, grad ckpt|ours, remat full) .* (\d+\.\d{4})$", out,
                      re.MULTILINE)
  assert len(losses) == 2, out
  assert abs(float(losses[0][1]) - float(losses[1][1])) < 5e-3, losses
