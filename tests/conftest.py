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


# Every compiled XLA:CPU executable holds a few memory maps (about 3 for a small
# program) until its jit cache entry goes; a worker that runs half the suite compiles
# ~20000 programs and passed Linux's default vm.max_map_count (65530) near the end of
# the run, where LLVM's next mmap failed and the worker died with a segfault inside
# XLA's compiler (seen in CI at ~97%, in a different test each time). Clearing jax's
# caches when the count passes MAX_MAPS frees them (checked: 300 compiles take 964 maps,
# `jax.clear_caches()` gives back all but 81).
MAX_MAPS = 30000


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return f.read().count(b"\n")
  except OSError:              # not Linux
    return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  yield
  if _memory_maps() > MAX_MAPS:
    import gc
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def standard_promotion():
  """optax mixes Python floats with int32 step counts, which strict promotion rejects."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def _bnb_reference_dequantize_on_avx512() -> None:
  """bitsandbytes 0.50's CPU `dequantize_4bit` on AVX512 CPUs runs a C kernel that
  indexes absmax by row, so a block that straddles two rows (in_features not a multiple
  of the block) gets the wrong scale (errors ~5x the quantization error), and FP4's
  code 8 comes out +0.0 where bnb's table (and its CUDA kernel) has -0.0. On such CPUs
  the oracle is bitsandbytes' own reference implementation (`backends/default`, run
  eagerly, "matches C++ / CUDA behavior"), registered as the CPU kernel for the session,
  so transformers' bnb models compute what they compute on a GPU. Elsewhere the C
  kernel agrees with it and is used as is."""
  import sys
  if "bitsandbytes" not in sys.modules:
    return
  try:
    import torch
    from bitsandbytes.backends.cpu import ops as cpu_ops
    from bitsandbytes.backends.default import ops as ref_ops
    from bitsandbytes.backends.utils import _get_4bit_code
  except Exception:  # noqa: BLE001  (another bnb layout: leave it alone)
    return
  if not getattr(cpu_ops, "_has_avx512", False):
    return
  compute = getattr(ref_ops._dequantize_4bit_compute, "__wrapped__",
                    ref_ops._dequantize_4bit_compute)

  def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
    return compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                   blocksize, shape, dtype)

  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)


@pytest.fixture(autouse=True, scope="session")
def _bnb_oracle():
  _bnb_reference_dequantize_on_avx512()
  yield
