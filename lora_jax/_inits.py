"""Initialisations that move part of `W` into the adapter (PiSSA, OLoRA), and the
conversion of such an adapter back to a plain LoRA on the original base.

Both follow PEFT (`init_lora_weights="pissa"` / `"olora"`), written in our layout
(`W` is `(*in, *out)`, used as `x @ W`; PEFT's weight is its transpose):

- PiSSA: `W = U S Vh`; `a = U_r sqrt(S_r / s)`, `b = sqrt(S_r / s) Vh_r`, where `s` is
  the LoRA scale, so that `s * a @ b` is the top-`r` singular part of `W`.
  "pissa_niter_<n>" finds that part by randomized subspace iteration (n power steps)
  with the key given to `lj.init`, as PEFT does with `torch.svd_lowrank`; the residual
  is exact either way, so the function is unchanged at init.
- OLoRA: `W^T = Q R` (PEFT's QR of its `(out, in)` weight); `a = R_r^T`, `b = Q_r^T`.

The base becomes the residual `W - s * a @ b` (computed in float32), so the model's
function is unchanged at init. Because the base changed, a trained adapter only fits
the residual base; `to_standard_lora(trained, initial)` gives the adapter for the
original base, `[a | a0] @ [b ; -b0]` at twice the rank, as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _paths
from lora_jax._implicit import ImplicitArray, is_implicit
from lora_jax._iec import to_lora
from lora_jax._lora_weight import LoraWeight, LowRankWeight

MUTATING_INITS = ("pissa", "olora")   # and "pissa_niter_<n>" (randomized SVD)


def is_mutating(init: str) -> bool:
  return init in MUTATING_INITS or re.fullmatch(r"pissa_niter_\d+", init) is not None


def _randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array):
  """Top-`rank` SVD of `m (*batch, I, O)` by randomized subspace iteration (Halko et
  al. 2009, as `torch.svd_lowrank(q=rank, niter)` that PEFT's "pissa_niter_n" uses)."""
  g = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], rank), jnp.float32)
  q, _ = jnp.linalg.qr(m @ g)
  mt = jnp.swapaxes(m, -1, -2)
  for _ in range(niter):
    q, _ = jnp.linalg.qr(mt @ q)
    q, _ = jnp.linalg.qr(m @ q)
  u, sv, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ m, full_matrices=False)
  return q @ u, sv, vh


def _matrix(w: jax.Array, axes: str) -> tuple[jax.Array, tuple, tuple]:
  """`w (*batch, *kernel)` as float32 `(*batch, I, O)`, with the in and out dims."""
  nb = w.ndim - len(axes)
  ins = [nb + k for k, a in enumerate(axes) if a == "i"]
  outs = [nb + k for k, a in enumerate(axes) if a == "o"]
  m = jnp.transpose(w.astype(jnp.float32), (*range(nb), *ins, *outs))
  in_dims = tuple(w.shape[k] for k in ins)
  out_dims = tuple(w.shape[k] for k in outs)
  return m.reshape(*w.shape[:nb], int(np.prod(in_dims)), int(np.prod(out_dims))), in_dims, out_dims


def mutating_factors(path: str, w: Any, axes: str, rank: int, scale: float,
                     kind: str, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """float32 `a (*batch, *in, r)`, `b (*batch, r, *out)` for `kind` in MUTATING_INITS
  or "pissa_niter_<n>" (which needs `key`)."""
  if isinstance(w, ImplicitArray):
    raise TypeError(
        f"{path}: init={kind!r} decomposes the base weight, which is a "
        f"{type(w).__name__}; initialise on the float base and quantize afterwards "
        "(qz.quantize then quantizes the residual, as PEFT recommends for PiSSA/OLoRA)")
  m, in_dims, out_dims = _matrix(w, axes)
  batch = m.shape[:-2]
  if kind == "pissa" or kind.startswith("pissa_niter_"):
    if kind == "pissa":
      u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
    else:
      u, sv, vh = _randomized_svd(m, rank, int(kind.rsplit("_", 1)[1]), key)
    root = jnp.sqrt(sv[..., :rank] / scale)
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
  elif kind == "olora":
    q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))         # PEFT: QR of (out, in)
    a = jnp.swapaxes(r[..., :rank, :], -1, -2)
    b = jnp.swapaxes(q[..., :, :rank], -1, -2)
  else:
    raise ValueError(f"{path}: unknown mutating init {kind!r}; known: {MUTATING_INITS}")
  return a.reshape(*batch, *in_dims, rank), b.reshape(*batch, rank, *out_dims)


def residual(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, axes: str) -> jax.Array:
  """`w - scale * a @ b` in float32, in `w`'s layout and dtype."""
  delta = LoraWeight(w=jnp.zeros(w.shape, jnp.float32), a=a, b=b, scale=scale, axes=axes)
  return (w.astype(jnp.float32) - delta.delta()).astype(w.dtype)


def to_standard_lora(trained: Any, initial: Any = None) -> Any:
  """A PiSSA/OLoRA adapter as a plain LoRA adapter on the original base; an IEC
  adapter as a plain LoRA adapter.

  Args:
    trained: the params after training, whose `LoraWeight`s sit on the residual base.
    initial: the params right after `lj.init(..., LoraConfig(init="pissa" | "olora"))`
      (same structure; the residual base and the initial factors `a0`, `b0`). None:
      only convert `IecLoraWeight` leaves to their exact `LoraWeight` form
      (`as_lora()`: effective factors, same rank), which PEFT, vLLM, the serving
      bank and the adapter merges hold; other leaves are returned unchanged.

  Returns:
    `params` whose `LoraWeight`s have `w = residual + scale * a0 @ b0` (the original
    base, up to float32 rounding), `a = [a | a0]` and `b = [b ; -b0]` (rank 2r, same
    scale), so `lj.merge` of it equals `lj.merge(trained)`; `lj.save_adapter` then
    writes what PEFT writes with `path_initial_model_for_weight_conversion`
    (r and lora_alpha doubled).
  """
  trained = to_lora(trained)
  if initial is None:
    return trained
  initial = to_lora(initial)
  is_lw = lambda x: isinstance(x, LowRankWeight)  # noqa: E731
  init_leaves = dict(_paths.leaves_with_paths(initial, is_leaf=is_lw))

  def convert(path, x):
    if not is_lw(x):
      return x
    x0 = init_leaves.get(path)
    if not is_lw(x0) or x0.a.shape != x.a.shape or x0.b.shape != x.b.shape:
      raise ValueError(
          f"{path}: `initial` has no LoraWeight with the trained factors' shapes "
          f"(a {tuple(x.a.shape)}, b {tuple(x.b.shape)}); got "
          f"{type(x0).__name__ if x0 is not None else 'nothing'}"
          + (f" with a {tuple(x0.a.shape)}, b {tuple(x0.b.shape)}" if is_lw(x0) else ""))
    if type(x) is not LoraWeight:
      raise TypeError(f"{path}: to_standard_lora converts LoraWeight leaves, got "
                      f"{type(x).__name__}")
    if is_implicit(x.w):
      raise TypeError(f"{path}: the base is a {type(x.w).__name__}; the original base can "
                      "only be restored from a float residual")
    w = (x.w.astype(jnp.float32) + x0.delta().astype(jnp.float32)).astype(x.w.dtype)
    nb = x.nbatch
    a = jnp.concatenate([x.a, x0.a.astype(x.a.dtype)], axis=-1)
    b = jnp.concatenate([x.b, -x0.b.astype(x.b.dtype)], axis=nb)
    return dataclasses.replace(x, w=w, a=a, b=b)

  return _paths.map_with_path(convert, trained, is_leaf=is_lw)
