"""Means on the hypersphere: Karcher mean and multi-SLERP (mergekit's `karcher`,
`multislerp`). Each tensor is one flattened vector, as in mergekit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from merging._methods import _f32
from merging._registry import METHODS, P, method


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def karcher_leaf(models, *, max_iter: int = 10, tol: float = 1e-5):
  """Karcher (Riemannian) mean of N flattened tensors on the unit sphere, times their
  mean norm, as mergekit's `karcher` (equal weights 1/N; tensors with norm <= `tol`
  leave the direction out but count in the norm; all-zero inputs give zeros).

  Args:
    models: tuple of N arrays of one shape; the output has `models[0]`'s dtype.
  """
  shape, dtype = models[0].shape, models[0].dtype
  x = jnp.stack([_f32(m).reshape(-1) for m in models])              # (N, D)
  n = x.shape[0]
  if n == 1:
    return models[0]
  norms = jnp.linalg.norm(x, axis=1)
  units = jnp.where(norms[:, None] > 0, x / jnp.where(norms > 0, norms, 1.0)[:, None], 0.0)
  valid = norms > tol
  alphas = jnp.where(valid, 1.0, 0.0)
  alphas = alphas / jnp.maximum(jnp.sum(alphas), 1.0)               # normalised over valid
  mean0 = jnp.sum(alphas[:, None] * units, axis=0)
  m0n = jnp.linalg.norm(mean0)
  first = units[jnp.argmax(valid)]
  mean0 = jnp.where(m0n < tol, first, mean0 / jnp.where(m0n < tol, 1.0, m0n))

  def step(_, carry):
    mean, done = carry
    dot = jnp.clip(units @ mean, -1.0, 1.0)                           # (N,)
    theta = jnp.arccos(dot)
    far = valid & (theta >= tol)                                      # mergekit's `continue`
    coef = jnp.where(far, alphas * theta / jnp.where(far, jnp.sin(theta), 1.0), 0.0)
    tangent = jnp.sum(coef[:, None] * (units - dot[:, None] * mean[None]), axis=0)
    tn = jnp.linalg.norm(tangent)
    stop = done | (tn < tol)                                          # mergekit's `break`
    new = jnp.cos(tn) * mean + jnp.sin(tn) * (tangent / jnp.where(tn > 0, tn, 1.0))
    un = jnp.linalg.norm(new)
    new = jnp.where(un > tol, new / jnp.where(un > tol, un, 1.0), new)
    return jnp.where(stop, mean, new), stop

  mean, _ = lax.fori_loop(0, max_iter, step, (mean0, jnp.asarray(False)))
  scale = jnp.sum(norms) / n
  out = jnp.where(jnp.any(valid), scale * mean, 0.0)
  return out.reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("normalize", "eps"))
def multislerp_leaf(models, weights, base=None, *, normalize: bool = True, eps: float = 1e-8):
  """mergekit's `multislerp` on one leaf: barycentric interpolation on the sphere.

  The (task) vectors are projected to the unit sphere, interpolated in the tangent
  space at their weighted mean direction, mapped back with the exponential map and
  scaled by the weighted mean norm; with a `base`, on the deltas from it. Two
  vectors whose weighted directions cancel are averaged linearly (mergekit's
  fallback); for more, the result is NaN (mergekit raises; `multislerp` raises too).

  Args:
    models: tuple of N arrays; weights: `(N,)` float32; base: optional array.
  """
  shape, dtype = models[0].shape, models[0].dtype
  x = jnp.stack([_f32(m).reshape(-1) for m in models])
  if len(models) == 1:
    return models[0]
  b = None if base is None else _f32(base).reshape(-1)
  if b is not None:
    x = x - b[None]
  w = _f32(weights)
  if normalize:
    w = w / jnp.sum(w)
  norms = jnp.linalg.norm(x, axis=1, keepdims=True)
  unit = x / (norms + eps)
  mean = jnp.sum(unit * w[:, None], axis=0)
  mn = jnp.linalg.norm(mean)
  mean = mean / jnp.where(mn < eps, 1.0, mn)
  dots = jnp.sum(unit * mean[None], axis=1, keepdims=True)
  tangent = jnp.sum((unit - dots * mean[None]) * w[:, None], axis=0)
  tn = jnp.linalg.norm(tangent) + eps
  res = (mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)) * jnp.sum(norms[:, 0] * w)
  if len(models) == 2:
    res = jnp.where(mn < eps, x[0] * w[0] + x[1] * w[1], res)
  else:
    res = jnp.where(mn < eps, jnp.nan, res)
  if b is not None:
    res = res + b
  return res.reshape(shape).astype(dtype)


@method("karcher", reference="https://arxiv.org/abs/2603.04972", base="none")
def _karcher(base, models, *,
             max_iter: int = P(10, lo=1, hi=10_000, doc="iterations of the mean"),
             tol: float = P(1e-5, lo=0, doc="convergence tolerance")):
  """Karcher mean on the hypersphere: the direction minimising the summed squared
  geodesic distance, times the mean norm (equal weights, as mergekit)."""
  return karcher_leaf(tuple(models), max_iter=int(max_iter), tol=float(tol))


@method("multislerp", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        base="optional")
def _multislerp(base, models, *,
                weight: float = P(1.0, per_model=True, api="weights", yaml_required=True),
                normalize_weights: bool = P(True, doc="divide the weights by their sum"),
                eps: float = P(1e-8, lo=0, doc="norm floor")):
  """Multi-SLERP: barycentric interpolation on the sphere of N models (or of their
  task vectors from a base)."""
  r = multislerp_leaf(tuple(models), weight, base, normalize=normalize_weights, eps=float(eps))
  check_multislerp(r, "", len(models))
  return r


karcher = METHODS["karcher"].fn
multislerp = METHODS["multislerp"].fn


def check_multislerp(r, where: str, n: int) -> None:
  """Raise where `multislerp_leaf` flagged cancelling directions (NaN), outside `jit`."""
  if n > 2 and not isinstance(r, jax.core.Tracer) and bool(jnp.isnan(r.reshape(-1)[0])):
    pre = f"{where}: " if where else ""
    raise ValueError(f"{pre}multislerp: the weighted sum of the {n} unit vectors is zero "
                     "(antipodal inputs whose weights cancel); use other weights")


