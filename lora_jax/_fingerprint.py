"""A cheap fingerprint of a base weight, to tell two bases of the same shape apart.

Adapters served in one bank, or merged into one adapter, must have been made on the
same base weights; comparing shapes misses a base with other values (another
checkpoint of the same architecture). Four float32 statistics per stacked layer,
position-weighted so that permuted rows or columns differ too.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._implicit import materialize


@jax.jit
def _stats(w: jax.Array, weights: jax.Array) -> jax.Array:
  """w: (B, n) float32 -> (B, 4): sum, sum of squares, position-weighted sum, max |w|."""
  return jnp.stack([jnp.sum(w, -1), jnp.sum(w * w, -1), jnp.sum(w * weights[None, :], -1),
                    jnp.max(jnp.abs(w), -1)], axis=-1)


def base_fingerprint(w: Any, nbatch: int = 0) -> jax.Array:
  """`(*batch, 4)` float32 statistics of `w` (plain or implicit, e.g. quantized) over its
  trailing (kernel) axes, one row per leading stacked-layer index."""
  dense = jnp.asarray(materialize(w)).astype(jnp.float32)
  batch = dense.shape[:nbatch]
  flat = dense.reshape((math.prod(batch), -1))
  pos = (jnp.arange(flat.shape[-1], dtype=jnp.float32) % 97.0) / 97.0 + 0.5
  return _stats(flat, pos).reshape((*batch, 4))


__all__ = ["base_fingerprint"]
