"""`LoraWeight`: a kernel `W` with a low-rank update, `W + scale * A @ B`.

Axis layout. `axes` gives one letter per trailing axis of `w`: "i" a contracting
(input) axis, "o" an output axis; any further leading axes of `w` are batch axes
(stacked layers under `scan`) shared by `w`, `a` and `b`:

    w: (*batch, *kernel)      kernel axes described by `axes`, e.g. "io", "iio"
    a: (*batch, *in, r)       the "i" axes of `w`, in order
    b: (*batch, r, *out)      the "o" axes of `w`, in order

Keeping the layout relative to the trailing axes is what lets `scan`/`vmap`
slice a stacked `LoraWeight` into per-layer ones without touching metadata.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import primitives as P

from lora_jax._implicit import (ImplicitArray, base, bind, data, register_dot_rule,
                                register_rule, static, trainable)


def _has_shape(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, bool)


def _delta_einsum(axes: str, nbatch: int) -> str:
  """einsum spec "...I r, ... r O -> ... W" for a trailing layout like "io"."""
  letters = "abcdefghjklmnpqstuvwxyz"
  ins, outs, kernel = [], [], []
  for k, ax in enumerate(axes):
    c = letters[k]
    kernel.append(c)
    (ins if ax == "i" else outs).append(c)
  return f"...{''.join(ins)}R,...R{''.join(outs)}->...{''.join(kernel)}"


class LowRankWeight(ImplicitArray):
  """What LoRA and DoRA leaves share: a kernel `w` and low-rank factors `a`, `b`.

  Attributes:
    w: base kernel, `(*batch, *kernel)`; a plain array or an `ImplicitArray`
      (a quantized base makes this QLoRA).
    a: `(*batch, *in, r)`.
    b: `(*batch, r, *out)`.
    rng: optional PRNG key array of shape `batch` for dropout on the low-rank
      branch (set by `lj.with_dropout_rng`; `None` at inference).
    scale: `alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Static.
    axes: one letter ("i"/"o") per trailing kernel axis of `w`. Static.
    dropout: dropout rate on the input of the low-rank branch. Static.

  Code that is about LoRA factors themselves (PEFT files, serving banks, adapter
  merges) asks `isinstance(x, LowRankWeight)`; rules are registered per kind, so a
  rule of `LoraWeight` never applies to `DoraWeight`.
  """

  w: Any = base()
  a: Any = trainable()
  b: Any = trainable()
  rng: Any = data(None)
  scale: float = static(1.0)
  axes: str = static("io")
  dropout: float = static(0.0)

  def __check_init__(self):
    if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.number)) \
        or not np.isfinite(self.scale):
      raise ValueError(f"{type(self).__name__}: scale must be a finite number, got "
                       f"{self.scale!r}")
    for name in ("w", "a", "b"):
      if not _has_shape(getattr(self, name)):
        raise TypeError(f"{type(self).__name__}: {name} must be an array, got "
                        f"{type(getattr(self, name)).__name__}")
    for name in ("a", "b"):
      dt = getattr(self, name).dtype
      if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{type(self).__name__}: factor {name} {tuple(getattr(self, name).shape)} "
                        f"has dtype {np.dtype(dt).name}; LoRA factors must be floating")
    check_factors(self.w.shape, self.a.shape, self.b.shape, self.axes,
                  where=type(self).__name__, group_size=self.input_group())

  def input_group(self) -> int:
    """Inputs per row of `a` (1: `a` has one row per input; QA-LoRA pools groups)."""
    return 1

  # --- logical array (shape and dtype: the base's, from the protocol)
  @property
  def nbatch(self) -> int:
    return len(self.w.shape) - len(self.axes)

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  def delta(self) -> jax.Array:
    """`scale * A @ B` in `w`'s layout, computed in float32, cast to `w`'s dtype."""
    d = jnp.einsum(_delta_einsum(self.axes, self.nbatch),
                   self.a.astype(jnp.float32), self.b.astype(jnp.float32))
    return (self.scale * d).astype(self.dtype)

  def _in_axes(self) -> tuple[int, ...]:
    nb = self.nbatch
    return tuple(nb + k for k, ax in enumerate(self.axes) if ax == "i")

  def column_norm(self) -> jax.Array:
    """`||W + s * A @ B||` per output column, float32, `(*batch, *out)`, gradient stopped.

    Uses the expansion over factors, so `A @ B` is not built. (In float32 the
    expansion loses digits only when a column of `s * A @ B` nearly cancels the
    same column of `W`; `materialize()` computes the norm densely.)
    """
    w = self.w.materialize() if isinstance(self.w, ImplicitArray) else self.w
    w = lax.stop_gradient(w).astype(jnp.float32)
    a = lax.stop_gradient(self.a).astype(jnp.float32)
    b = lax.stop_gradient(self.b).astype(jnp.float32)
    nb = self.nbatch
    s = jnp.float32(self.scale)
    letters = "abcdefghjklmnpqstuvwxyz"
    ins = "".join(letters[k] for k, ax in enumerate(self.axes) if ax == "i")
    outs = "".join(letters[k] for k, ax in enumerate(self.axes) if ax == "o")
    kern = "".join(letters[k] for k in range(len(self.axes)))
    w2 = jnp.sum(w * w, axis=self._in_axes())                                   # (*B, *out)
    aw = jnp.einsum(f"...{kern},...{ins}R->...R{outs}", w, a)                   # (*B, r, *out)
    cross = jnp.sum(aw * b, axis=nb)                                            # (*B, *out)
    g = jnp.einsum(f"...{ins}R,...{ins}Q->...RQ", a, a)                         # (*B, r, r)
    gb = jnp.einsum(f"...RQ,...Q{outs}->...R{outs}", g, b)
    quad = jnp.sum(b * gb, axis=nb)
    n2 = w2 + 2.0 * s * cross + s * s * quad
    return lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0.0)))

  def summary_label(self) -> str:
    return str(self.rank)

  def with_rng(self, key):
    """A dropout key of the stacked batch shape (one mask per layer) when dropout > 0."""
    if self.dropout <= 0:
      return self
    batch = tuple(self.w.shape[:self.nbatch])
    return dataclasses.replace(self, rng=jax.random.split(key, batch) if batch else key)

  def partition_specs(self, spec):
    """Children split like the kernel along shared axes; the rank axis replicated."""
    from jax.sharding import PartitionSpec as PS
    from lora_jax._sharding import child_spec, implicit_spec_parts
    batch, ins, outs = implicit_spec_parts(spec, self.nbatch, self.axes)
    return self.replace_children(
        w=child_spec(self.w, spec), a=PS(*batch, *ins, None),
        b=PS(*batch, None, *outs), rng=None if self.rng is None else PS(*batch))


class LoraWeight(LowRankWeight):
  """A kernel with a LoRA update. `materialize()` is `w + scale * A @ B` (in `w`'s layout).

  Fields as `LowRankWeight`: `w` (base), `a: (*batch, *in, r)`, `b: (*batch, r, *out)`
  (trainable), `rng` (dropout key), static `scale`, `axes`, `dropout`.
  """

  def materialize(self) -> jax.Array:
    w = self.w.materialize() if isinstance(self.w, ImplicitArray) else self.w
    d = jnp.einsum(_delta_einsum(self.axes, self.nbatch),
                   self.a.astype(jnp.float32), self.b.astype(jnp.float32))
    return (w.astype(jnp.float32) + self.scale * d).astype(w.dtype)


def check_factors(w_shape, a_shape, b_shape, axes: str, where: str = "LoraWeight",
                  path: str | None = None, group_size: int = 1) -> None:
  """Raise `ValueError` unless `a`, `b` fit `w` under layout `axes` (with
  `group_size > 1`, QA-LoRA: `a` has one row per group of inputs of an "io" kernel)."""
  at = f"{path}: " if path else ""
  w_shape, a_shape, b_shape = tuple(w_shape), tuple(a_shape), tuple(b_shape)
  if not axes or set(axes) - {"i", "o"} or "i" not in axes or "o" not in axes:
    raise ValueError(f"{at}{where} axes {axes!r} must use the letters 'i' and 'o' "
                     "(each at least once), one per trailing kernel axis")
  nb = len(w_shape) - len(axes)
  if nb < 0:
    raise ValueError(f"{at}{where} axes {axes!r} has more letters than w {w_shape} has axes")
  batch, kernel = w_shape[:nb], w_shape[nb:]
  ins = tuple(d for d, ax in zip(kernel, axes) if ax == "i")
  outs = tuple(d for d, ax in zip(kernel, axes) if ax == "o")
  if len(a_shape) < 1 or len(b_shape) < 1:
    raise ValueError(f"{at}{where} factors must have a rank axis; got a {a_shape}, b {b_shape}")
  if group_size != 1:
    if axes != "io":
      raise ValueError(f"{at}{where}: QA-LoRA pools one input axis; layout {axes!r} of w "
                       f"{w_shape} is not 'io' (stacked axes in front are fine)")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
        or group_size < 1 or ins[0] % group_size:
      raise ValueError(f"{at}{where}: QA-LoRA group size {group_size!r} does not divide the "
                       f"input size {ins[0]} of w {w_shape}")
    ins = (ins[0] // group_size,)
  r = a_shape[-1]
  if r < 1:
    raise ValueError(f"{at}{where} has rank {r} (a {a_shape}, b {b_shape}); a LoRA factor "
                     "pair needs rank >= 1")
  want_a, want_b = (*batch, *ins, r), (*batch, r, *outs)
  if a_shape != want_a or b_shape != want_b:
    raise ValueError(
        f"{at}{where} factors do not fit w {w_shape} (axes {axes!r}, batch {batch}): "
        f"expected a {want_a} and b {want_b}, got a {a_shape} and b {b_shape}")


# ----------------------------------------------------------------------------
# implicit rules

_FUSE = [True]  # one GEMM for x @ [w | a]; a list so benchmarks can switch it off


def _other_dense(x):
  return x.materialize() if isinstance(x, ImplicitArray) else x


def _lora_dropout(lw: LoraWeight, x, x_batch_dims):
  """Dropout on the branch input `x`; one mask per use, key from `lw.rng`."""
  if lw.rng is None or lw.dropout <= 0.0:
    return x
  keep = 1.0 - lw.dropout
  key = lw.rng
  # A stacked key (under vmap over layers) arrives as batch dims; a single key
  # per logical leaf is the common case.
  if getattr(key, "shape", ()) != ():
    key = jnp.reshape(key, (-1,))[0]
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_lora_matmul(x, w, a, b, scale):
  """`x @ w + scale * (x @ a) @ b` for a 2-D `w`, with one GEMM for `x @ [w | a]`.

  Forward: one GEMM over the concatenated `[w | a]` (the skinny `x @ a` rides along
  with the big one). Backward: `dx = [dy | dt] @ [w | a]^T`, again one GEMM; `da`
  and `db` are skinny; `dw` and `dx` are computed only for inputs that are being
  differentiated (`symbolic_zeros`), so a frozen base never costs a weight gradient.
  """
  return _fused_forward(x, w, a, b, scale)[0]


def _fused_forward(x, w, a, b, scale):
  out = w.shape[-1]
  wa = jnp.concatenate([w, a.astype(w.dtype)], axis=-1)
  ya = jnp.matmul(x, wa, preferred_element_type=jnp.float32)
  t = (ya[..., out:] * scale).astype(x.dtype)
  y = ya[..., :out] + jnp.matmul(t, b.astype(x.dtype), preferred_element_type=jnp.float32)
  return y.astype(x.dtype), t


def _fused_fwd(x, w, a, b, scale):
  need = tuple(p.perturbed for p in (x, w, a, b))
  x, w, a, b = (p.value for p in (x, w, a, b))
  y, t = _fused_forward(x, w, a, b, scale)
  # Which cotangents to build is static: encode it in the residuals' structure.
  return y, ((x, w, a, b, t), need)


def _low_rank_grads(x, a, b, t, dy, scale, need_a, need_b):
  """`dt = s dy @ b^T` and the skinny factor gradients `da = x^T dt`, `db = t^T dy`
  (None where not needed), on 2-D views of the activations."""
  dt = jnp.matmul(dy, b.astype(dy.dtype).T, preferred_element_type=jnp.float32)
  dt = (dt * scale).astype(dy.dtype)
  da = db = None
  if need_a:
    da = (x.reshape(-1, x.shape[-1]).T @ dt.reshape(-1, dt.shape[-1])).astype(a.dtype)
  if need_b:
    db = (t.reshape(-1, t.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])).astype(b.dtype)
  return dt, da, db


def _fused_bwd(scale, res, dy):
  if isinstance(dy, SymbolicZero):
    return None, None, None, None
  (x, w, a, b, t), (need_x, need_w, need_a, need_b) = res
  dt, da, db = _low_rank_grads(x, a, b, t, dy, scale, need_a, need_b)
  dx = dw = None
  if need_x:
    wa = jnp.concatenate([w, a.astype(w.dtype)], axis=-1)
    dx = jnp.matmul(jnp.concatenate([dy, dt], axis=-1), wa.T,
                    preferred_element_type=jnp.float32).astype(x.dtype)
  if need_w:
    dw = (x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, w.shape[-1])).astype(w.dtype)
  return dx, dw, da, db


_fused_lora_matmul.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _base_matmul(x, w):
  """`x @ w` (x (..., in), w (in, out)) through w's own rules when w is implicit."""
  return bind(P.dot_general_p, x, w, dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())),
              precision=None, preferred_element_type=jnp.float32)


def _base_matmul_t(dy, w):
  """`dy @ w^T` (dy (..., out)) through w's own rules when w is implicit."""
  return bind(P.dot_general_p, dy, w, dimension_numbers=(((dy.ndim - 1,), (1,)), ((), ())),
              precision=None, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_matmul_implicit_base(x, w, a, b, scale):
  """`x @ w + scale * (x @ a) @ b` for a 2-D implicit `w` (a quantized base: QLoRA).

  `x @ w` and, backward, `dy @ w^T` go to w's own `dot_general` rules (the
  dequant-matmul kernels); the low-rank terms are skinny GEMMs on 2-D views. The
  residuals are x, t = s x @ a and w's children. Measured on CPU, a QLoRA step
  of a 512-wide Llama: 1.49 -> 1.22 s against the generic rule under autodiff,
  same loss and gradients.
  """
  return _implicit_base_forward(x, w, a, b, scale)[0]


def _implicit_base_forward(x, w, a, b, scale):
  t = (jnp.matmul(x, a.astype(x.dtype), preferred_element_type=jnp.float32) * scale
       ).astype(x.dtype)
  y = _base_matmul(x, w) + jnp.matmul(t, b.astype(x.dtype), preferred_element_type=jnp.float32)
  return y.astype(x.dtype), t


def _implicit_base_fwd(x, w, a, b, scale):
  need = (x.perturbed, any(p.perturbed for p in jax.tree.leaves(w)), a.perturbed, b.perturbed)
  x, a, b = x.value, a.value, b.value
  w = jax.tree.map(lambda p: p.value, w)
  y, t = _implicit_base_forward(x, w, a, b, scale)
  return y, ((x, w, a, b, t), need)


def _implicit_base_bwd(scale, res, dy):
  (x, w, a, b, t), (need_x, need_w, need_a, need_b) = res
  if isinstance(dy, SymbolicZero):
    return None, None, None, None
  dt, da, db = _low_rank_grads(x, a, b, t, dy, scale, need_a, need_b)
  dx = dw = None
  if need_x:
    dx = (_base_matmul_t(dy, w) + jnp.matmul(dt, a.astype(dy.dtype).T,
                                             preferred_element_type=jnp.float32)
          ).astype(x.dtype)
  if need_w:   # rare (a trained implicit base): its own rules give the cotangent
    _, vjp = jax.vjp(lambda w: _base_matmul(x, w).astype(dy.dtype), w)
    (dw,) = vjp(dy)
  return dx, dw, da, db


_lora_matmul_implicit_base.defvjp(_implicit_base_fwd, _implicit_base_bwd, symbolic_zeros=True)


def _fusable(lw, x, dimension_numbers, params) -> bool:
  """The common case `x @ W`: x's trailing axes contract, in order, with the kernel's
  leading in axes (a 2-D kernel, or an N-D one such as a `DenseGeneral` kernel
  `(d, heads, head_dim)` "ioo" or `(heads, head_dim, d)` "iio", seen as 2-D)."""
  (lc, rc), (lb, rb) = dimension_numbers
  n_in = lw.axes.count("i")
  if not (lw.nbatch == 0 and not lb and not rb and lw.rng is None
          and x.dtype == lw.w.dtype and params.get("out_sharding") is None
          and lw.axes == "i" * n_in + "o" * (len(lw.axes) - n_in)
          and tuple(rc) == tuple(range(n_in))
          and tuple(lc) == tuple(range(x.ndim - n_in, x.ndim))):
    return False
  # an implicit base (quantized) is fused only as the 2-D kernel it is
  return not isinstance(lw.w, ImplicitArray) or lw.axes == "io"


def _fused_call(lw, x):
  """`x @ W` through the fused custom_vjps, N-D kernels viewed as 2-D (free reshapes)."""
  n_in = lw.axes.count("i")
  ins, outs = lw.w.shape[:n_in], lw.w.shape[n_in:]
  k, n = int(np.prod(ins)), int(np.prod(outs))
  lead = x.shape[:x.ndim - n_in]
  if isinstance(lw.w, ImplicitArray):
    y = _lora_matmul_implicit_base(x, lw.w, lw.a, lw.b, float(lw.scale))
  else:
    y = _fused_lora_matmul(x.reshape(*lead, k), lw.w.reshape(k, n), lw.a.reshape(k, -1),
                           lw.b.reshape(-1, n), float(lw.scale))
  return y.reshape(*lead, *outs)


@register_dot_rule(LoraWeight)
def _dot_general_rule(prim, x, lw, *, dimension_numbers, precision=None,
                      preferred_element_type=None, **params):
  """`x @ W` as `x @ w + scale * (x @ A) @ B`, never forming `A @ B`.

  The leaf is on the right (`register_dot_rule` derives the other side). Handles
  contraction over its in axes (`(x @ A) @ B`) or over its out axes (tied
  embeddings: `(x @ B^T) @ A^T`), and dot batch dims that cover its stacked axes.
  """
  (xc, wc), (xb, wb) = dimension_numbers
  x = _other_dense(x)
  if _FUSE[0] and _fusable(lw, x, dimension_numbers, params):
    y = _fused_call(lw, x)
    want = preferred_element_type or x.dtype
    return y.astype(want)
  nb = lw.nbatch
  if tuple(wb) != tuple(range(nb)):   # stacked axes must be dot batch dims, in order
    return NotImplemented
  in_pos = [k for k, ax in enumerate(lw.axes) if ax == "i"]
  out_pos = [k for k, ax in enumerate(lw.axes) if ax == "o"]
  kernel_c = sorted(c - nb for c in wc)
  if kernel_c == in_pos:       # contract the in axes: (x @ A) @ B
    first, second, group, first_off, r_second = lw.a, lw.b, in_pos, nb, nb
  elif kernel_c == out_pos:    # contract the out axes: (x @ B^T) @ A^T
    first, second, group, first_off, r_second = lw.b, lw.a, out_pos, nb + 1, lw.a.ndim - 1
  else:
    return NotImplemented
  pos_in_first = {k: first_off + j for j, k in enumerate(group)}
  first_c = tuple(pos_in_first[c - nb] for c in wc)
  batch = tuple(range(nb))
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  base_y = bind(prim, x, lw.w, dimension_numbers=dimension_numbers, **kw, **params)
  dt = x.dtype
  xd = _lora_dropout(lw, x, xb)
  first, second = first.astype(dt), second.astype(dt)
  # t: (batch, x_free, r); y: (batch, x_free, second_free)
  t = lax.dot_general(xd, first, ((tuple(xc), first_c), (tuple(xb), batch)), **kw)
  t = (t * jnp.asarray(lw.scale, t.dtype)).astype(dt)
  y = lax.dot_general(t, second, (((t.ndim - 1,), (r_second,)), (batch, batch)), **kw)
  return base_y + y.astype(base_y.dtype)


@register_rule(P.convert_element_type_p, LoraWeight)
def _convert_rule(prim, lw, *, new_dtype, **params):
  w = bind(prim, lw.w, new_dtype=new_dtype, **params)
  a = lax.convert_element_type(lw.a, new_dtype)
  b = lax.convert_element_type(lw.b, new_dtype)
  return dataclasses.replace(lw, w=w, a=a, b=b)


@register_rule(P.transpose_p, LoraWeight)
def _transpose_rule(prim, lw, *, permutation):
  nb = lw.nbatch
  perm = tuple(permutation)
  if perm[:nb] != tuple(range(nb)):
    return NotImplemented
  kperm = [p - nb for p in perm[nb:]]        # new kernel axis j <- old kernel axis kperm[j]
  new_axes = "".join(lw.axes[k] for k in kperm)
  old_in = [k for k, ax in enumerate(lw.axes) if ax == "i"]
  old_out = [k for k, ax in enumerate(lw.axes) if ax == "o"]
  in_order = [old_in.index(k) for k in kperm if lw.axes[k] == "i"]
  out_order = [old_out.index(k) for k in kperm if lw.axes[k] == "o"]
  a = jnp.transpose(lw.a, (*range(nb), *(nb + j for j in in_order), lw.a.ndim - 1))
  b = jnp.transpose(lw.b, (*range(nb + 1), *(nb + 1 + j for j in out_order)))
  w = bind(prim, lw.w, permutation=permutation)
  return dataclasses.replace(lw, w=w, a=a, b=b, axes=new_axes)


@register_rule(P.reshape_p, LoraWeight)
def _reshape_rule(prim, lw, *, new_sizes, dimensions=None, **params):
  """Reshape that splits/merges axes within the in group and within the out group."""
  if dimensions is not None:
    return NotImplemented
  nb = lw.nbatch
  shape, new = tuple(lw.shape), tuple(new_sizes)
  if new[:nb] != shape[:nb]:
    return NotImplemented
  axes = lw.axes
  # Only layouts with contiguous groups ("ii..oo" or "oo..ii") can be regrouped.
  first = axes[0]
  nfirst = len(axes) - len(axes.lstrip(first))
  if axes[nfirst:].count(first):
    return NotImplemented
  kernel, knew = shape[nb:], new[nb:]
  n_first = int(np.prod(kernel[:nfirst]))
  acc, split = 1, None
  for j, d in enumerate(knew):
    if acc == n_first:
      split = j
      break
    acc *= d
  if split is None and acc == n_first:
    split = len(knew)
  if split is None or split == 0 or split == len(knew):
    return NotImplemented
  other = "o" if first == "i" else "i"
  new_axes = first * split + other * (len(knew) - split)
  in_shape = knew[:split] if first == "i" else knew[split:]
  out_shape = knew[split:] if first == "i" else knew[:split]
  r = lw.rank
  batch = shape[:nb]
  a = jnp.reshape(lw.a, (*batch, *in_shape, r))
  b = jnp.reshape(lw.b, (*batch, r, *out_shape))
  w = bind(prim, lw.w, new_sizes=new_sizes, dimensions=dimensions, **params)
  return dataclasses.replace(lw, w=w, a=a, b=b, axes=new_axes)


@register_rule(P.gather_p, LoraWeight)
def _gather_rule(prim, lw, indices, *, dimension_numbers, slice_sizes, **params):
  """Embedding lookup `W[ids] + scale * A[ids] @ B` for a 2-D "io" table."""
  dn = dimension_numbers
  if lw.nbatch or lw.axes != "io":
    return NotImplemented
  vocab, dim = lw.shape
  if (tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
      or tuple(slice_sizes) != (1, dim) or len(dn.offset_dims) != 1
      or getattr(dn, "operand_batching_dims", ()) != ()):
    return NotImplemented
  out_nd = indices.ndim - 1 + 1  # indices' batch dims + the offset dim
  if tuple(dn.offset_dims) != (out_nd - 1,):
    return NotImplemented
  base = bind(prim, lw.w, indices, dimension_numbers=dn, slice_sizes=slice_sizes, **params)
  rows = prim.bind(lw.a, indices, dimension_numbers=dn,
                   slice_sizes=(1, lw.rank), **params)          # (..., r)
  rows = rows.astype(base.dtype) * jnp.asarray(lw.scale, base.dtype)
  return base + jnp.matmul(rows, lw.b.astype(base.dtype))


@register_rule(P.copy_p, LoraWeight)
def _copy_rule(prim, lw, **params):
  return lw


__all__ = ["LowRankWeight", "LoraWeight", "check_factors"]
