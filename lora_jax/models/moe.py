"""Routed experts (Mixtral, Qwen3-MoE) as pure functions, and the checkpoint layout.

Parameters of one sparse MLP block (kernels in the `x @ W` layout, experts stacked on
a leading axis, as transformers 5 holds them in memory):

    mlp/gate/kernel                 (hidden, experts)              the router
    mlp/experts/gate_up_proj        (experts, hidden, 2 * inter)   gate | up, per expert
    mlp/experts/down_proj           (experts, inter, hidden)

The routed computation does not loop over experts: the `tokens * k` (token, expert)
pairs are sorted by expert and each projection is one `jax.lax.ragged_dot` over the
groups (`implicit` has a LoRA rule for it, so LoRA on the expert weights, one adapter
per expert with the leading axis as the stacked "l" axis, stays factored).

Checkpoints store each expert's projections as separate 2-D tensors
(`...experts.{e}.w1.weight` for Mixtral, `...experts.{e}.gate_proj.weight` for
Qwen3-MoE); `split_experts` / `stack_experts` convert between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """Top-`k` experts of each row of router `logits (T, E)`: softmax in float32, the `k`
  largest probabilities (ties to the lower expert, as `torch.topk`), renormalized to sum
  to 1 when `normalize`. Returns `(weights (T, k) float32, experts (T, k) int32)`."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  w, idx = jax.lax.top_k(probs, k)
  if normalize:
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w, idx.astype(jnp.int32)


def experts_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array,
                params: Mapping[str, Any], act: Callable, num_experts: int) -> jax.Array:
  """`sum_j weights[t, j] * expert_{experts[t, j]}(x[t])` for `x (T, H)`.

  The (token, expert) pairs are sorted by expert (stable, so each expert sees its tokens
  in order), gathered, run through `ragged_dot` with the per-expert group sizes, scaled
  by their routing weight and added back per token."""
  T, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = order // k
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = jnp.take(x, token, axis=0)                                    # (T*k, H)
  gu = jax.lax.ragged_dot(xs, params["gate_up_proj"].astype(x.dtype), sizes)
  inter = gu.shape[-1] // 2
  h = act(gu[:, :inter]) * gu[:, inter:]
  y = jax.lax.ragged_dot(h, params["down_proj"].astype(x.dtype), sizes)
  w = jnp.take(weights.reshape(-1), order).astype(jnp.float32)
  y = (y.astype(jnp.float32) * w[:, None]).astype(x.dtype)
  return jnp.zeros_like(x).at[token].add(y)


# ----------------------------------------------------------------------------
# checkpoint layout: one 2-D tensor per expert and projection

def expert_tensor_regex(prefix: str, names: tuple[str, str, str]) -> re.Pattern:
  """Matches `<prefix with {layer}>.experts.<e>.<gate|up|down name>.weight`."""
  p = re.escape(prefix).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
  alt = "|".join(re.escape(n) for n in names)
  return re.compile(rf"{p}\.experts\.(?P<expert>\d+)\.(?P<proj>{alt})\.weight")


def stack_experts(tensors: Mapping[str, np.ndarray], prefix: str, names: tuple[str, str, str],
                  num_layers: int, num_experts: int, where: str) -> tuple[dict, set]:
  """Per-expert PyTorch weights -> `{(layer, "gate_up_proj"|"down_proj"): (E, in, out)}`
  and the set of tensor names consumed. `names` are the (gate, up, down) projection
  names of the family (Mixtral: w1, w3, w2)."""
  rx = expert_tensor_regex(prefix, names)
  found: dict[tuple[int, int, str], np.ndarray] = {}
  used = set()
  for name, arr in tensors.items():
    m = rx.fullmatch(name)
    if m is None:
      continue
    layer, e = int(m["layer"]), int(m["expert"])
    if layer >= num_layers or e >= num_experts:
      raise ValueError(f"{where}: tensor {name!r} is expert {e} of layer {layer}; config.json "
                       f"has {num_experts} experts and {num_layers} layers")
    found[(layer, e, m["proj"])] = arr
    used.add(name)
  out = {}
  gate, up, down = names
  for layer in sorted({k[0] for k in found}):
    missing = [prefix.format(layer=layer) + f".experts.{e}.{n}.weight"
               for e in range(num_experts) for n in names if (layer, e, n) not in found]
    if missing:
      raise ValueError(f"{where}: checkpoint lacks expert tensors {missing[:4]}"
                       + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    gu = [np.concatenate([np.asarray(found[(layer, e, gate)]).T,
                          np.asarray(found[(layer, e, up)]).T], axis=1)
          for e in range(num_experts)]
    out[(layer, "gate_up_proj")] = np.stack(gu)
    out[(layer, "down_proj")] = np.stack([np.asarray(found[(layer, e, down)]).T
                                          for e in range(num_experts)])
  return out, used


def split_experts(layer: int, gate_up: np.ndarray, down: np.ndarray, prefix: str,
                  names: tuple[str, str, str]) -> dict[str, np.ndarray]:
  """The inverse of `stack_experts` for one layer: PyTorch `(out, in)` tensors by name."""
  gate, up, down_name = names
  inter = gate_up.shape[-1] // 2
  base = prefix.format(layer=layer)
  out = {}
  for e in range(gate_up.shape[0]):
    out[f"{base}.experts.{e}.{gate}.weight"] = np.ascontiguousarray(gate_up[e, :, :inter].T)
    out[f"{base}.experts.{e}.{up}.weight"] = np.ascontiguousarray(gate_up[e, :, inter:].T)
    out[f"{base}.experts.{e}.{down_name}.weight"] = np.ascontiguousarray(down[e].T)
  return out


__all__ = ["experts_mlp", "route", "split_experts", "stack_experts"]
