"""Per-row sampling for a batch whose rows belong to different requests.

Each row has its own temperature (0: greedy), top-k (0: off), top-p (1: off) and seed;
the key of a row's n-th token is `fold_in(key(seed), n)`, so a request's tokens depend
on its seed and its own history only, never on which other requests share the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array, seeds: jax.Array, steps: jax.Array) -> jax.Array:
  """Next token per row.

  Args:
    logits: `(B, V)` float.
    temperature: `(B,)` float32; 0 picks the argmax.
    top_k: `(B,)` int32; keep the k most likely tokens (0 or >= V: all).
    top_p: `(B,)` float32 in (0, 1]; keep the smallest set of most likely tokens whose
      probability (after temperature and top-k) reaches p (OpenAI / transformers'
      nucleus sampling; the most likely token is always kept).
    seeds: `(B,)` uint32 per-request seeds; steps: `(B,)` int32 tokens made so far.

  Returns:
    `(B,)` int32 token ids.
  """
  logits = logits.astype(jnp.float32)
  V = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
  z = logits / t[:, None]
  desc = -jnp.sort(-z, axis=-1)                                      # (B, V) descending
  k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
  kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=1)           # (B, 1)
  desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                          # mass of better tokens
  n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
  pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=1)
  z = jnp.where(z >= jnp.maximum(kth, pth), z, -jnp.inf)
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
  drawn = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


__all__ = ["sample_rows"]
