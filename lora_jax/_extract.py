"""`extract_lora`: LoRA factors from the difference of two checkpoints (truncated SVD).

As mergekit's `mergekit-extract-lora`: for each adapted weight, the task vector
`D = finetuned - base` (float32) is factored as `U S V^T`; the rank-r factors are
`a = U_r sqrt(S_r)` and `b = sqrt(S_r) V_r^T` (mergekit's default
`distribute_scale`: the singular values split evenly between the factors), with
`scale = 1` (mergekit writes `lora_alpha = r`). In our `x @ W` layout `a` is
`(in, r)` and `b` is `(r, out)`; mergekit's `lora_A = a.T`, `lora_B = b.T`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._implicit import ImplicitArray
from lora_jax._lora_weight import LoraWeight
from lora_jax._paths import check_same_structure, closest_paths, compile_patterns, leaves_with_paths

F32 = jnp.float32


def svd_factors(d, rank, distribute_scale, sv_epsilon=0.0):
  """(U_r sqrt(S_r), sqrt(S_r) Vh_r) of `d`, or (U_r, S_r Vh_r); with `sv_epsilon`, only
  singular values above it are kept (needs a concrete `d`)."""
  u, s, vh = jnp.linalg.svd(d, full_matrices=False)
  r = min(rank, s.shape[-1])
  if sv_epsilon > 0:
    r = min(int(jnp.sum(s > sv_epsilon)), r)
  u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
  if distribute_scale:
    rs = jnp.sqrt(s)
    return u * rs[..., None, :], rs[..., :, None] * vh
  return u, s[..., :, None] * vh


def extract_lora(base: Any, finetuned: Any, rank: int, *,
                 targets: str | Sequence[str] | None = None,
                 distribute_scale: bool = True) -> tuple[Any, dict[str, float]]:
  """LoRA adapters that approximate `finetuned` as `base + A @ B`, per weight.

  Args:
    base: pytree of arrays.
    finetuned: pytree of the same structure and shapes.
    rank: the LoRA rank (capped at `min(in, out)` per weight).
    targets: regex(es) `re.fullmatch`ed against "/"-joined paths; default: every
      floating leaf with `ndim >= 2` whose path does not contain "embed" (mergekit
      keeps embeddings at full rank by default). A 2-D leaf is `(in, out)`;
      leading axes of a higher-rank leaf are stacked layers (axes "io" trailing).
    distribute_scale: split the singular values as `sqrt(S)` between the factors
      (mergekit's default); `False` puts them all on `b`.
  Returns:
    `(params, errors)`: `params` is a pytree like `base` whose target leaves are
    `LoraWeight(w=base leaf, a, b, scale=1.0)` (factors in the leaf's dtype) and
    whose other leaves are taken from `finetuned` (kept at full rank, like
    mergekit's `modules_to_save`); `errors` maps each target path to the relative
    Frobenius error `||D - a @ b|| / ||D||` of the float32 factors (0 when `D == 0`).

  >>> import jax.numpy as jnp, lora_jax as lj
  >>> base = {"w": jnp.zeros((4, 3))}; ft = {"w": jnp.outer(jnp.arange(4.), jnp.ones(3))}
  >>> p, err = lj.extract_lora(base, ft, rank=1)
  >>> round(err["w"], 6)
  0.0
  """
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"extract_lora: rank must be a positive int, got {rank!r}")
  is_leaf = lambda x: isinstance(x, ImplicitArray)
  check_same_structure([base, finetuned], ["base", "finetuned"], is_leaf=is_leaf,
                       what="extract_lora")
  fb, treedef = jax.tree_util.tree_flatten(base, is_leaf=is_leaf)
  ff = jax.tree_util.tree_leaves(finetuned, is_leaf=is_leaf)
  paths = [p for p, _ in leaves_with_paths(base, is_leaf=is_leaf)]
  pats = None if targets is None else compile_patterns(targets)
  if pats is not None:
    for rx in pats:
      if not any(rx.fullmatch(p) for p in paths):
        raise ValueError(f"extract_lora: target pattern {rx.pattern!r} matches no path; closest: "
                         f"{', '.join(closest_paths(rx.pattern, paths))}")
  out, errors = [], {}
  for path, b, f in zip(paths, fb, ff):
    b = b.materialize() if isinstance(b, ImplicitArray) else b
    f = f.materialize() if isinstance(f, ImplicitArray) else f
    if np.shape(b) != np.shape(f):
      raise ValueError(f"{path}: shape {np.shape(f)} in finetuned does not match "
                       f"{np.shape(b)} in base")
    floating = jnp.issubdtype(jnp.result_type(b), jnp.floating)
    if pats is None:
      take = floating and np.ndim(b) >= 2 and "embed" not in path
    else:
      take = any(rx.fullmatch(path) for rx in pats)
      if take and (not floating or np.ndim(b) < 2):
        raise ValueError(f"{path}: extract_lora needs a floating leaf with ndim >= 2, got "
                         f"{jnp.result_type(b)} {np.shape(b)}")
    if not take:
      out.append(f)
      continue
    d = jnp.asarray(f).astype(F32) - jnp.asarray(b).astype(F32)
    a_f, b_f = svd_factors(d, int(rank), distribute_scale)
    approx = jnp.matmul(a_f, b_f)
    nd = float(jnp.linalg.norm(d))
    errors[path] = float(jnp.linalg.norm(d - approx)) / nd if nd > 0 else 0.0
    dt = jnp.result_type(b)
    out.append(LoraWeight(w=b, a=a_f.astype(dt), b=b_f.astype(dt), scale=1.0, axes="io"))
  return jax.tree_util.tree_unflatten(treedef, out), errors


__all__ = ["extract_lora"]
