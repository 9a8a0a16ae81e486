"""benchmarks/quantized_lora_quality.py runs end to end in its --quick mode, one seed, and
its table says what a working run must say: every row has a finite loss, accuracy in
[0, 1] and a positive byte count; float LoRA fine-tuning lowers the loss below that of
the base before fine-tuning; 3-bit deployments are smaller than the 4-bit ones."""

import importlib.util
import math
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quantized_lora_quality.py")


def _module():
  name = "quantized_lora_quality"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up by name
    spec.loader.exec_module(mod)
  return sys.modules[name]


@pytest.fixture(scope="module")
def quick_run():
  import jax
  with jax.numpy_dtype_promotion("standard"):
    return _module().main(["--quick", "--seeds", "0"])


def test_every_row_is_finite(quick_run):
  rows = quick_run["rows"]
  measured = [e for e in rows if e["loss"]]
  assert len(measured) >= 13, [e["method"] for e in measured]
  for e in measured:
    where = f"{e['bits']}-bit {e['method']} ({e['form']})"
    assert all(math.isfinite(x) for x in e["loss"] + e["start"]), where
    assert all(0.0 <= a <= 1.0 for a in e["acc"]), where
    assert all(b > 0 for b in e["bytes"]), where
    assert e["step_ms"] is not None and e["step_ms"] > 0, where
  for e in rows:
    if not e["loss"]:
      assert e["reason"], f"{e['method']}: an unmeasured row must say why"


def test_float_lora_learns_the_task(quick_run):
  (row,) = [e for e in quick_run["rows"] if e["method"] == "float LoRA"]
  assert row["loss"][0] < row["start"][0] == pytest.approx(quick_run["context"]["base_b"])


def test_three_bit_deployments_are_smaller(quick_run):
  rows = [e for e in quick_run["rows"] if e["loss"]]
  by = {(e["bits"], e["method"], e["form"].replace("int3", "int4")): e for e in rows}
  pairs = [(by[k], by[("4", *k[1:])]) for k in by if k[0] == "3" and ("4", *k[1:]) in by]
  assert len(pairs) >= 4, sorted(by)
  for three, four in pairs:
    assert three["bytes"][0] < four["bytes"][0], (three["method"], three["form"])
  (flt,) = [e for e in rows if e["method"] == "float LoRA"]
  assert all(e["bytes"][0] < flt["bytes"][0] for e in rows if e["bits"] != "32")


def test_claims_are_stated(quick_run):
  text = _module().claims(quick_run)
  assert "QA-LoRA beats QLoRA + post-training quantization at 4 bits" in text
  assert "IR-QLoRA beats QLoRA at 4 bits" in text
