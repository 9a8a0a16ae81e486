"""Test-wide settings: 8 host devices for sharding tests, strict dtype promotion and
rank-promotion errors (as equinox does) so silent upcasts fail loudly."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
