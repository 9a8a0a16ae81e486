"""Test-wide settings: 8 host devices for sharding tests, strict dtype promotion and
rank-promotion errors (as equinox does) so silent upcasts fail loudly, and a cheap XLA
CPU compile.

The suite's time is mostly XLA compiling small programs. With LLVM at -O0 and the
classic (non-MLIR) fusion emitters a compile costs ~3-8x less CPU, for programs that run
a little slower: about half the suite's time. The HLO passes (fusion, SPMD partitioning,
collectives) are the same. `LORA_JAX_TEST_FULL_OPT=1` runs with XLA's defaults instead.
Set before jax is imported, in os.environ, so the CLI / example / multiprocess
subprocesses the tests start inherit it too."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("LORA_JAX_TEST_FULL_OPT") != "1":
  _flags = os.environ["XLA_FLAGS"].split()
  os.environ["XLA_FLAGS"] = " ".join(
      _flags + [f for f in FAST_COMPILE if f.split("=")[0] not in
                {g.split("=")[0] for g in _flags}])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
  # lora_jax.implicit warns once per (primitive, class); tests that check the
  # warning need a clean slate.
  from lora_jax import _implicit
  _implicit._WARNED.clear()
  yield


@pytest.fixture
def standard_promotion():
  """optax mixes Python floats with int32 step counts, which strict promotion rejects."""
  with jax.numpy_dtype_promotion("standard"):
    yield
