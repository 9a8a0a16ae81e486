"""Next-token cross-entropy computed in chunks of tokens, never the full logits.

A `(tokens, vocab)` float32 logits array is the largest activation of a LoRA step
(8 x 2048 tokens x 128k vocabulary = 8 GiB); here the vocabulary projection and the
log-softmax run on `chunk` tokens at a time under `jax.checkpoint`, so the forward keeps
only each chunk's loss and the backward recomputes one chunk's logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax import models


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`-log softmax(logits)[target]` in float32: `(..., V)`, `(...)` -> `(...)`."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked


def chunked_loss(params, config, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
  """Sum of weighted token losses and the sum of weights.

  Args:
    params, config: the model's (the head: `models.logits_from_hidden`).
    hidden: `(B, T, H)` final hidden states (`models.hidden_states`).
    targets: `(B, T)` int, the token each position predicts.
    weights: `(B, T)` float or bool, 0 where a position is not a target.
    chunk: tokens per chunk (the last chunk is padded with zero weight).

  Returns:
    `(sum_t w_t * loss_t, sum_t w_t)`, float32 scalars.
  """
  H = hidden.shape[-1]
  h = hidden.reshape(-1, H)
  t = targets.reshape(-1).astype(jnp.int32)
  w = weights.reshape(-1).astype(jnp.float32)
  n = h.shape[0]
  c = max(1, min(int(chunk), n))
  pad = (-n) % c
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    t = jnp.pad(t, (0, pad))
    w = jnp.pad(w, (0, pad))

  @jax.checkpoint
  def one(xs):
    hc, tc, wc = xs
    return jnp.sum(token_losses(models.logits_from_hidden(params, config, hc), tc) * wc)

  k = h.shape[0] // c
  if k == 1:
    total = one((h, t, w))
  else:
    total = jnp.sum(lax.map(one, (h.reshape(k, c, H), t.reshape(k, c), w.reshape(k, c))))
  return total, jnp.sum(w)


__all__ = ["chunked_loss", "token_losses"]
