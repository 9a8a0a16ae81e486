"""Merging LoRA adapters on one base: `merge_adapters`.

Each adapter is a pytree whose adapted leaves are `lj.LoraWeight(w, a, b, scale)`
on the same base `w`; the result is one such tree whose LoRA leaves have the
merged factors and `scale = 1` (PEFT gives the new adapter `lora_alpha = r`).

A LoRA leaf is seen as a matrix: `a: (*batch, *in, r)` reshaped to `(batch, I, r)`
and `b: (*batch, r, *out)` to `(batch, r, O)`; its update is `scale * A @ B`.

Methods (semantics of PEFT's `LoraModel.add_weighted_adapter`):

| method | what it computes | exact? |
|---|---|---|
| "cat" | ranks concatenated: `A = [w_i s_i A_i]`, `B = [B_i]` | yes: `sum_i w_i dW_i` |
| "svd" | `sum_i w_i dW_i`, truncated SVD to `rank` | exact up to the rank cut |
| "ties", "dare_ties", "dare_linear", "magnitude_prune" | PEFT's merge_utils on the full deltas `dW_i`, then truncated SVD (PEFT's `*_svd` variants) | exact up to the rank cut |
| "linear" | PEFT's `linear`: `A = sum sign_i sqrt(|w_i s_i|) A_i`, `B = sum sqrt(|w_i s_i|) B_i` | no |

PEFT's "linear", "ties", "dare_*" and "magnitude_prune" *without* `_svd` combine
the A factors and the B factors separately, so the update `(sum B_i)(sum A_i)`
contains cross terms `B_i A_j` (i != j) that neither adapter learned; only its
`cat` and `*svd` types compute the weighted sum of the updates. Here only
"linear" keeps PEFT's factor-wise form (for parity); every other method works on
the full updates, and "cat" is the exact weighted sum at rank `sum r_i`.

TIES/DARE here follow PEFT's `merge_utils` (used by `add_weighted_adapter`):
magnitude pruning keeps `int(density * n)` entries (no minimum of one), DARE
divides kept entries by `density`, the sign is elected from the *unweighted*
pruned deltas ("total" = by their sum, "frequency" = by sign count), and the
disjoint merge divides by the *number* of agreeing adapters. mergekit's model
merges (`mg.ties`, ...) differ on each point; see `merging._methods`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import extend
from lora_jax.extend import leaves_with_paths
from merging import _sparsify as sp

F32 = jnp.float32
METHODS = ("cat", "linear", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_SVD_METHODS = ("svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")


LoraWeight = lj.LoraWeight


def _is_lora(x):
  return type(x) is lj.LoraWeight


def _mats(lw: LoraWeight):
  """(A (B, I, r), B (B, r, O), batch shape, in shape, out shape) in float32."""
  nb = lw.nbatch
  batch = tuple(lw.a.shape[:nb])
  ins = tuple(lw.a.shape[nb:-1])
  outs = tuple(lw.b.shape[nb + 1:])
  bsz = int(np.prod(batch, dtype=np.int64))
  a = jnp.reshape(lw.a.astype(F32), (bsz, int(np.prod(ins, dtype=np.int64)), lw.rank))
  b = jnp.reshape(lw.b.astype(F32), (bsz, lw.rank, int(np.prod(outs, dtype=np.int64))))
  return a, b, batch, ins, outs


def lora_delta_matrix(lw: LoraWeight) -> jax.Array:
  """`scale * A @ B` as `(batch, I, O)` float32."""
  a, b, *_ = _mats(lw)
  return lw.scale * jnp.matmul(a, b)


def _peft_prune(x, density, method, key=None):
  """PEFT's `prune`: "magnitude" keeps int(density * n); "random" keeps w.p. density, / density."""
  if density >= 1:
    return x
  if method == "magnitude":
    k = int(density * x.size)
    return jnp.where(sp.topk_mask(jnp.abs(x), k), x, jnp.zeros((), x.dtype))
  keep = jax.random.bernoulli(key, density, x.shape)
  return jnp.where(keep, x / density, jnp.zeros((), x.dtype))


def combine_deltas(deltas, weights, method, density=None, majority_sign="total", key=None):
  """PEFT's merge_utils on full updates: task_arithmetic ("svd"), ties, dare_linear,
  dare_ties, magnitude_prune. `deltas`: list of same-shape float32 arrays."""
  w = [float(x) for x in weights]
  if method == "svd":
    return sum(wi * d for wi, d in zip(w, deltas))
  if density is None:
    raise ValueError(f"merge_adapters: method {method!r} needs density=")
  if density < 0:
    raise ValueError(f"merge_adapters: density must be >= 0, got {density}")
  if method in ("dare_ties", "dare_linear"):
    if key is None:
      raise ValueError(f"merge_adapters: method {method!r} drops at random; pass key=")
    keys = jax.random.split(key, len(deltas))
    pruned = [_peft_prune(d, density, "random", k) for d, k in zip(deltas, keys)]
  else:
    pruned = [_peft_prune(d, density, "magnitude") for d in deltas]
  if method in ("magnitude_prune", "dare_linear"):
    return sum(wi * d for wi, d in zip(w, pruned))
  T = jnp.stack(pruned)
  sign = jnp.sign(T)
  if majority_sign == "total":
    mag = jnp.sum(T, axis=0)
  elif majority_sign == "frequency":
    mag = jnp.sum(sign, axis=0)
  else:
    raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
  elected = jnp.where(mag >= 0, 1.0, -1.0).astype(F32)
  mask = (sign == elected[None]).astype(F32)
  W = jnp.asarray(w, F32).reshape((-1,) + (1,) * (T.ndim - 1))
  mixed = jnp.sum(T * W * mask, axis=0)
  return mixed / jnp.maximum(jnp.sum(mask, axis=0), 1.0)


def truncated_svd(d, rank):
  """`d (B, I, O)` -> `a (B, I, r)`, `b (B, r, O)` with `a @ b` the best rank-r fit.

  The singular values go to `b` (PEFT puts them on `lora_B`, the output side)."""
  u, s, vh = jnp.linalg.svd(d, full_matrices=False)
  r = min(rank, s.shape[-1])
  return u[..., :r], s[..., :r, None] * vh[..., :r, :]


def _unmat(lw, a, b, batch, ins, outs, scale=1.0):
  r = a.shape[-1]
  a = jnp.reshape(a, (*batch, *ins, r)).astype(lw.a.dtype)
  b = jnp.reshape(b, (*batch, r, *outs)).astype(lw.b.dtype)
  return dataclasses.replace(lw, a=a, b=b, scale=float(scale), rng=None)


def merge_adapters(adapters, method="svd", weights=None, *, rank=None, density=None,
                   majority_sign="total", key=None):
  """Merge LoRA adapters that share one base into one adapter.

  Args:
    adapters: list of pytrees of one structure, with `lj.LoraWeight` leaves on the
      same base weights (shapes must agree; `w` is taken from the first).
    method: one of "cat", "linear", "svd", "ties", "dare_ties", "dare_linear",
      "magnitude_prune" (see the module docstring for which are exact).
    weights: one float per adapter (default 1.0 each).
    rank: output rank for the SVD methods (default: the largest input rank).
    density: kept fraction for ties/dare_*/magnitude_prune.
    majority_sign: "total" or "frequency" (PEFT's `majority_sign_method`).
    key: `jax.random` key for dare_*; leaf `j` uses `fold_in(key, j)`.
  Returns:
    A pytree like `adapters[0]` whose LoRA leaves hold the merged factors with
    `scale = 1.0` (factors in the input factor dtype); other leaves are taken
    from `adapters[0]`.
  """
  if method not in METHODS:
    raise ValueError(f"merge_adapters: unknown method {method!r}; known: {', '.join(METHODS)}")
  if not isinstance(adapters, (list, tuple)) or not adapters:
    raise ValueError("merge_adapters: adapters must be a non-empty list of pytrees")
  n = len(adapters)
  weights = [1.0] * n if weights is None else list(weights)
  if len(weights) != n:
    raise ValueError(f"merge_adapters: {len(weights)} weights for {n} adapters")
  for w in weights:
    if not isinstance(w, (int, float, np.number)) or isinstance(w, bool) or not math.isfinite(w):
      raise ValueError(f"merge_adapters: weights must be finite numbers, got {weights}")
  if rank is not None and (not isinstance(rank, (int, np.integer)) or rank <= 0):
    raise ValueError(f"merge_adapters: rank must be a positive int, got {rank!r}")

  # an IEC adapter is a plain LoRA with its effective factors (exact, same rank)
  adapters = [lj.to_standard_lora(ad) for ad in adapters]
  for i, ad in enumerate(adapters):
    for path, x in leaves_with_paths(ad, is_leaf=lj.is_implicit):
      if not (lj.is_implicit(x) and x.trainable_fields) or _is_lora(x):
        continue
      if isinstance(x, lj.DoraWeight):
        raise ValueError(
            f"merge_adapters: {path} in adapters[{i}] is a DoRA weight; the adapter "
            "methods combine low-rank deltas, which a DoRA magnitude does not add to "
            "(PEFT's add_weighted_adapter has no DoRA either). Merge full models instead "
            "(lj.merge, then mg.linear / mg.ties ...)")
      if isinstance(x, lj.Trainable):
        raise ValueError(
            f"merge_adapters: {path} in adapters[{i}] is a fully trained module "
            "(modules_to_save); how copies trained in full should combine is not defined "
            "by the adapter methods. Merge those leaves yourself (e.g. mg.linear on their "
            "values) and pass trees without them")
      raise ValueError(
          f"merge_adapters: {path} in adapters[{i}] is a {type(x).__name__} (trainable "
          f"{x.trainable_fields}); the adapter methods combine LoRA factors only")
  extend.check_same_structure(adapters, [f"adapters[{i}]" for i in range(n)],
                              is_leaf=_is_lora, what="merge_adapters")
  flat0, treedef = jax.tree_util.tree_flatten(adapters[0], is_leaf=_is_lora)
  paths = [p for p, _ in leaves_with_paths(adapters[0], is_leaf=_is_lora)]
  cols = [flat0] + [jax.tree_util.tree_flatten(ad, is_leaf=_is_lora)[0] for ad in adapters[1:]]
  if not any(_is_lora(x) for x in flat0):
    raise ValueError("merge_adapters: adapters[0] has no LoraWeight leaves")

  out = []
  for j, path in enumerate(paths):
    leaves = [c[j] for c in cols]
    kinds = [_is_lora(x) for x in leaves]
    if not any(kinds):
      out.append(leaves[0])
      continue
    if not all(kinds):
      bad = [i for i, k in enumerate(kinds) if not k]
      raise ValueError(f"{path}: a LoraWeight in some adapters but not in adapters {bad}")
    lw0 = leaves[0]
    fp0 = None
    for i, lw in enumerate(leaves[1:], 1):
      if tuple(lw.shape) != tuple(lw0.shape) or lw.axes != lw0.axes:
        raise ValueError(f"{path}: adapters[{i}] adapts a weight of shape {tuple(lw.shape)} "
                         f"(axes {lw.axes!r}), adapters[0] one of {tuple(lw0.shape)} "
                         f"(axes {lw0.axes!r}): not the same base")
      if lw.w is not lw0.w:   # same shapes: compare the values cheaply
        fp0 = extend.base_fingerprint(lw0.w, lw0.nbatch) if fp0 is None else fp0
        fp = extend.base_fingerprint(lw.w, lw.nbatch)
        if not np.allclose(np.asarray(fp), np.asarray(fp0), rtol=1e-5,
                           atol=1e-6 * (1.0 + float(np.abs(np.asarray(fp0)).max()))):
          raise ValueError(f"merge_adapters: {path}: adapters[{i}] was made on another base "
                           f"weight than adapters[0] (same shape {tuple(lw.shape)}, other "
                           "values); merged factors would not fit either base")
    mats = [_mats(lw) for lw in leaves]
    batch, ins, outs = mats[0][2:]
    if method == "cat":
      a = jnp.concatenate([w * lw.scale * m[0] for w, lw, m in zip(weights, leaves, mats)], -1)
      b = jnp.concatenate([m[1] for m in mats], -2)
    elif method == "linear":
      ranks = {lw.rank for lw in leaves}
      if len(ranks) != 1:
        raise ValueError(f"{path}: method 'linear' combines factors and needs equal ranks, got "
                         f"{[lw.rank for lw in leaves]}; use 'cat' or 'svd'")
      ws = [w * lw.scale for w, lw in zip(weights, leaves)]
      a = sum((math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0) * m[0]
              for x, m in zip(ws, mats))
      b = sum(math.sqrt(abs(x)) * m[1] for x, m in zip(ws, mats))
    else:
      r = rank or max(lw.rank for lw in leaves)
      deltas = [lw.scale * jnp.matmul(m[0], m[1]) for lw, m in zip(leaves, mats)]
      k = None if key is None else jax.random.fold_in(key, j)
      if deltas[0].shape[0] == 1:
        d = combine_deltas(deltas, weights, method, density, majority_sign, k)
      else:   # stacked layers: prune and elect per layer, as per-layer adapters would
        d = jnp.stack([
            combine_deltas([x[i] for x in deltas], weights, method, density, majority_sign,
                           None if k is None else jax.random.fold_in(k, i))
            for i in range(deltas[0].shape[0])])
      a, b = truncated_svd(d, r)
    out.append(_unmat(lw0, a, b, batch, ins, outs))
  return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["merge_adapters", "combine_deltas", "truncated_svd", "lora_delta_matrix", "METHODS"]
