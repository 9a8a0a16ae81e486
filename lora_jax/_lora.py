"""LoRA as a pytree transformation: config, init, split/combine, masks, merge, summary."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _paths
from lora_jax._dora import dora_from_lora
from lora_jax._implicit import ImplicitArray, is_implicit, materialize
from lora_jax._inits import is_mutating, mutating_factors, residual
from lora_jax._lora_weight import LoraWeight, check_factors
from lora_jax._qalora import QALoraWeight
from lora_jax._iec import IecLoraWeight, check_iec_shape
from lora_jax._trainable import Trainable

INITS = ("default", "gaussian", "zeros", "pissa", "olora")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how, with PEFT's meaning for each field.

  Attributes:
    rank: LoRA rank `r` (PEFT `r`).
    alpha: scaling numerator (PEFT `lora_alpha`); scale is `alpha / rank`, or
      `alpha / sqrt(rank)` with `rslora`. (Flax NNX's `LoRA` applies no scale.)
    targets: regex fullmatched against "/"-joined leaf paths; `"all-linear"` (PEFT's:
      every `.../kernel` but `lm_head`); or a list of regexes and module names (a
      plain name such as `"q_proj"` selects the modules of that name, PEFT's
      `target_modules=[...]` rule).
    rslora: rank-stabilized scaling `alpha / sqrt(rank)` (PEFT `use_rslora`).
    init: "default" (a Kaiming-uniform as PEFT, b zeros), "gaussian" (a ~ N(0, 1/r),
      b zeros, PEFT's `init_lora_weights="gaussian"`), "zeros" (both zero), or
      "pissa" / "olora" (PEFT's: the top singular / QR part of `W` moves into the
      factors and the base becomes the residual, function unchanged; see
      `lj.to_standard_lora` to save such an adapter for the original base).
    rank_pattern: {path regex: rank} overrides (first match wins).
    alpha_pattern: {path regex: alpha} overrides.
    dtype: dtype of the factors; `None` uses the base weight's dtype.
    dropout: dropout rate on the low-rank branch input; active only when an rng
      is attached with `with_dropout_rng` (training), off otherwise.
    layouts: {path regex: layout} with one letter per kernel axis: "l" stacked
      layer axis (leading), "i" contracting (input) axis, "o" output axis.
      2-D kernels default to "io".
    use_dora: weight-decomposed LoRA (PEFT `use_dora`): targets become
      `DoraWeight`s whose magnitude starts at the column norms of `W`.
    modules_to_save: regex (or list) of leaves trained in full beside the adapter
      (PEFT `modules_to_save`, e.g. a classification head): they become
      `lj.Trainable` leaves, which `split` puts on the adapter side.
    use_qalora: QA-LoRA (PEFT `use_qalora`): targets become `lj.QALoraWeight`s whose
      low-rank branch sees the input pooled over groups of `qalora_group_size`
      inputs, `a: (in / L, r)`; with a group-wise quantized base of group size `L`
      the trained update folds into its zero points (`qz.fold_qalora`). Needs "io"
      kernels (stacked "lio" too) whose input size `L` divides; `init` "default",
      "gaussian" or "zeros"; not with `use_dora`.
    qalora_group_size: `L`, inputs pooled per row of `a` (PEFT `qalora_group_size`,
      default 16 as PEFT's).
    use_iec: IR-QLoRA's information elastic connection: targets become
      `lj.IecLoraWeight`s with two trained scalars per layer, `beta_a` on the mean of
      each of `r` input groups and `beta_b` on `h` repeated over `r` output groups
      (both 0 at init, so a fresh adapter is plain LoRA). Needs "io" kernels (stacked
      "lio" too) whose input and output sizes the rank divides; not with `use_dora`
      or `use_qalora`; any `init`. Pair it with an ICQ base
      (`qz.QuantConfig(format="nf4", icq=True)`) for IR-QLoRA.
  """

  rank: int = 8
  alpha: float = 8.0
  targets: str | Sequence[str] = r".*kernel"
  rslora: bool = False
  init: str = "default"
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  dtype: Any = None
  dropout: float = 0.0
  layouts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  use_dora: bool = False
  modules_to_save: str | Sequence[str] | None = None
  use_qalora: bool = False
  qalora_group_size: int = 16
  use_iec: bool = False

  def __post_init__(self):
    if self.use_iec and (self.use_dora or self.use_qalora):
      raise ValueError("LoraConfig: use_iec=True with "
                       f"{'use_dora' if self.use_dora else 'use_qalora'}=True is not "
                       "supported: the elastic connection is defined on plain LoRA "
                       "factors (IR-QLoRA)")
    L = self.qalora_group_size
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
      raise ValueError(f"LoraConfig.qalora_group_size must be a positive int, got {L!r}")
    if self.use_qalora and self.use_dora:
      raise ValueError("LoraConfig: use_qalora=True with use_dora=True is not supported "
                       "(PEFT does not support DoRA and QA-LoRA together either)")
    if self.use_qalora and self.init not in ("default", "gaussian", "zeros"):
      raise ValueError(f"LoraConfig: use_qalora=True needs init 'default', 'gaussian' or "
                       f"'zeros', got {self.init!r}: the {self.init} initialisation builds "
                       "full-resolution factors from W, which a pooled a (in / L, r) "
                       "cannot hold")
    for name, v in [("rank", self.rank), *(("rank_pattern[" + k + "]", r)
                                           for k, r in self.rank_pattern.items())]:
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LoraConfig.{name} must be a positive int, got {v!r}")
    for name, v in [("alpha", self.alpha), *(("alpha_pattern[" + k + "]", a)
                                             for k, a in self.alpha_pattern.items())]:
      if not isinstance(v, (int, float, np.number)) or isinstance(v, bool) or not v > 0 \
          or not math.isfinite(v):
        raise ValueError(f"LoraConfig.{name} must be a positive number (and finite), got {v!r}")
    if self.init not in INITS and not is_mutating(self.init):
      raise ValueError(f"LoraConfig.init must be one of {INITS} or 'pissa_niter_<n>', got "
                       f"{self.init!r}")
    for name in ("targets", "modules_to_save"):
      v = getattr(self, name)
      if v is not None and not isinstance(v, str) and not list(v):
        raise ValueError(f"LoraConfig.{name}: {name} patterns are empty: give at least one "
                         "regular expression" + (" or None" if name == "modules_to_save" else ""))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    for k, lay in self.layouts.items():
      if not re.fullmatch(r"l*[io]+", lay or ""):
        raise ValueError(f"LoraConfig.layouts[{k!r}] = {lay!r}: expected leading 'l's "
                         "then one 'i' or 'o' per kernel axis, e.g. 'io', 'lio', 'iio'")

  def rank_for(self, path: str) -> int:
    return int(_paths.first_match(path, self.rank_pattern, self.rank))

  def alpha_for(self, path: str) -> float:
    return float(_paths.first_match(path, self.alpha_pattern, self.alpha))

  def scale_for(self, path: str) -> float:
    r, alpha = self.rank_for(path), self.alpha_for(path)
    return alpha / math.sqrt(r) if self.rslora else alpha / r


def _has_trainable(x) -> bool:
  """An implicit leaf with trainable parts (LoRA factors, a fully trained weight)."""
  return isinstance(x, ImplicitArray) and bool(x.trainable_fields)


def _layout_for(path: str, leaf, cfg: LoraConfig, traced: Mapping[str, str]) -> str:
  lay = _paths.first_match(path, cfg.layouts)
  if lay is None:
    lay = traced.get(path)
  if lay is None:
    if leaf.ndim == 2:
      lay = "io"
    else:
      raise ValueError(
          f"{path}: kernel of shape {tuple(leaf.shape)} is not 2-D, so lora_jax cannot "
          "tell its input and output axes. Pass LoraConfig(layouts={"
          f"{re.escape(path)!r}: 'lio' or 'iio' ...}}) with one letter per axis "
          "('l' stacked layer, 'i' contracting, 'o' output), or lj.init(..., fn=apply_fn, "
          "args=example_args) to read them from the function's dot_generals.")
  if len(lay) != leaf.ndim:
    raise ValueError(f"{path}: layout {lay!r} has {len(lay)} letters but the kernel "
                     f"has shape {tuple(leaf.shape)} ({leaf.ndim} axes)")
  return lay


def init(key: jax.Array, params: Any, cfg: LoraConfig, *, fn: Callable | None = None,
         args: Sequence[Any] = ()) -> Any:
  """Replace the leaves matched by `cfg.targets` with `LoraWeight`s.

  Args:
    key: PRNG key for the `a` factors.
    params: the base parameter pytree.
    cfg: `LoraConfig`.
    fn, args: optional; `fn(params, *args)` is traced once and each target's
      input/output/stacked axes are read from its `dot_general`s.

  Returns:
    `params` with each target `W` of shape `(*L, *kernel)` replaced by
    `LoraWeight(w=W, a: (*L, *in, r), b: (*L, r, *out))`, `b` zero, so a fresh
    adapter leaves the function unchanged (`DoraWeight` with `use_dora`;
    `QALoraWeight(a: (*L, in / qalora_group_size, r))` with `use_qalora`).

  Raises:
    ValueError / TypeError naming the path: pattern matching nothing, a target
    that is not a floating array with ndim >= 2, a rank larger than the kernel
    allows, an unknown layout.
  """
  leaves = _paths.leaves_with_paths(params, is_leaf=is_implicit)
  paths = [p for p, _ in leaves]
  targets = _paths.select_paths(paths, cfg.targets)
  for pattern in list(cfg.rank_pattern) + list(cfg.alpha_pattern):
    _paths.select_paths(paths, pattern, what="rank_pattern/alpha_pattern")
  to_save = (_paths.select_paths(paths, cfg.modules_to_save, what="modules_to_save")
             if cfg.modules_to_save else set())
  both = sorted(set(targets) & set(to_save))
  if both:
    raise ValueError(f"{both[0]}: matched by both targets and modules_to_save; a leaf is "
                     "either adapted with LoRA or trained in full")
  traced = {}
  if fn is not None:
    from lora_jax._layouts import trace_layouts
    traced = trace_layouts(fn, params, args, targets)
  keys = iter(jax.random.split(key, max(len(targets), 1)))

  def make(path, leaf):
    if path in to_save:
      if isinstance(leaf, ImplicitArray) or not hasattr(leaf, "dtype") or \
          not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(f"{path}: modules_to_save needs a plain floating array, got "
                        f"{type(leaf).__name__} {getattr(leaf, 'dtype', '')}")
      return Trainable(leaf)
    if path not in targets:
      return leaf
    if _has_trainable(leaf):
      raise ValueError(f"{path}: already a {type(leaf).__name__} with trainable parts; "
                       "merge it first (lj.merge)")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(f"{path}: target is a {type(leaf).__name__}, not an array")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"{path}: target has dtype {np.dtype(leaf.dtype).name} and shape "
                      f"{tuple(leaf.shape)}; LoRA needs a floating kernel")
    if leaf.ndim < 2:
      raise ValueError(f"{path}: target has shape {tuple(leaf.shape)}; LoRA needs a "
                       "kernel with at least 2 axes (is the pattern matching a bias "
                       "or a norm scale?)")
    lay = _layout_for(path, leaf, cfg, traced)
    nl = len(lay) - len(lay.lstrip("l"))
    axes = lay[nl:]
    if "l" in axes or "i" not in axes or "o" not in axes:
      raise ValueError(f"{path}: layout {lay!r} must be leading 'l's then at least one "
                       "'i' and one 'o'")
    shape = tuple(leaf.shape)
    batch, kernel = shape[:nl], shape[nl:]
    ins = tuple(d for d, ax in zip(kernel, axes) if ax == "i")
    outs = tuple(d for d, ax in zip(kernel, axes) if ax == "o")
    r = cfg.rank_for(path)
    rmax = min(int(np.prod(ins)), int(np.prod(outs)))
    if r > rmax:
      raise ValueError(f"{path}: rank {r} exceeds min(in={int(np.prod(ins))}, "
                       f"out={int(np.prod(outs))}) = {rmax} for kernel {shape} "
                       f"(layout {lay!r})")
    dtype = cfg.dtype or leaf.dtype
    fan_in = int(np.prod(ins))
    if cfg.use_iec:
      check_iec_shape(shape, axes, r, f"{path} (layout {lay!r})")
    if cfg.use_qalora:
      L = int(cfg.qalora_group_size)
      if axes != "io":
        raise ValueError(f"{path}: use_qalora pools one input axis: kernel {shape} has "
                         f"layout {lay!r}; QA-LoRA needs 'io' (or stacked 'lio') kernels")
      if ins[0] % L:
        raise ValueError(f"{path}: qalora_group_size {L} does not divide the input size "
                         f"{ins[0]} of kernel {shape} (layout {lay!r})")
      if r > ins[0] // L:
        raise ValueError(f"{path}: rank {r} exceeds the {ins[0] // L} pooled inputs "
                         f"(in={ins[0]} / qalora_group_size={L}) of kernel {shape}")
      ins = (ins[0] // L,)
      fan_in = ins[0]     # PEFT: a fresh nn.Linear(in / L, r), kaiming-uniform
    k = next(keys)
    if is_mutating(cfg.init):
      a, b = mutating_factors(path, leaf, axes, r, cfg.scale_for(path), cfg.init, k)
      w = residual(leaf, a, b, cfg.scale_for(path), axes)
      lw = LoraWeight(w=w, a=a.astype(dtype), b=b.astype(dtype), scale=cfg.scale_for(path),
                      axes=axes, dropout=float(cfg.dropout))
      return _finish(lw)
    if cfg.init == "default":
      # PEFT: kaiming_uniform_(A, a=sqrt(5)) on A (r, in) -> U(-1/sqrt(in), 1/sqrt(in)).
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(k, (*batch, *ins, r), jnp.float32, -bound, bound)
    elif cfg.init == "gaussian":
      a = jax.random.normal(k, (*batch, *ins, r), jnp.float32) / r
    else:
      a = jnp.zeros((*batch, *ins, r), jnp.float32)
    b = jnp.zeros((*batch, r, *outs), dtype)
    if cfg.use_qalora:
      return QALoraWeight(w=leaf, a=a.astype(dtype), b=b, scale=cfg.scale_for(path),
                          axes="io", dropout=float(cfg.dropout),
                          group_size=int(cfg.qalora_group_size))
    lw = LoraWeight(w=leaf, a=a.astype(dtype), b=b, scale=cfg.scale_for(path),
                    axes=axes, dropout=float(cfg.dropout))
    return _finish(lw)

  def _finish(lw: LoraWeight):
    if cfg.use_dora:
      return dora_from_lora(lw)
    if cfg.use_iec:
      zero = jnp.zeros(lw.w.shape[:lw.nbatch], lw.a.dtype)
      return IecLoraWeight(w=lw.w, a=lw.a, b=lw.b, scale=lw.scale, axes=lw.axes,
                           dropout=lw.dropout, beta_a=zero, beta_b=zero)
    return lw

  return _paths.map_with_path(make, params, is_leaf=is_implicit)


def trainable_mask(params: Any) -> Any:
  """Bool pytree with `params`' structure: True on LoRA factors, False elsewhere.

  Use with `optax.masked` / `optax.multi_transform`, or `split`.
  """
  def mark(x):
    if _has_trainable(x):
      return x.replace_children(**{
          name: jax.tree.map(lambda _: name in x.trainable_fields, getattr(x, name))
          for name in x.data_fields})
    return jax.tree.map(lambda _: False, x)
  return jax.tree.map(mark, params, is_leaf=_has_trainable)


def split(params: Any) -> tuple[Any, Any]:
  """`(adapter, frozen)`: the trainable LoRA factors, and everything else.

  Both keep `params`' structure with `None` in place of the other part's leaves
  (equinox's `partition`), so `grad` can be taken with respect to `adapter` alone.
  """
  mask = trainable_mask(params)
  adapter = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return adapter, frozen


def combine(adapter: Any, frozen: Any) -> Any:
  """Inverse of `split`: leaves of `adapter` where not `None`, else of `frozen`.

  Raises:
    ValueError naming the path: the trees differ in structure (a path in one only, a
    leaf of another kind, rank or scale), a leaf is set in both, or a rebuilt leaf's
    parts do not fit (factors of another rank or shape than its base).
  """
  is_none = lambda x: x is None  # noqa: E731
  _paths.check_same_structure([adapter, frozen], ["adapter", "frozen"], is_leaf=is_none,
                              what="combine")

  def pick(path, a, f):
    if a is not None and f is not None:
      raise ValueError(f"combine: {path} is set in both adapter and frozen")
    return a if a is not None else f

  out = jax.tree_util.tree_map_with_path(
      lambda kp, a, f: pick(_paths.path_str(kp), a, f), adapter, frozen, is_leaf=is_none)
  for path, x in _paths.leaves_with_paths(out, is_leaf=is_implicit):
    if isinstance(x, ImplicitArray):
      try:
        x.validate()
      except (ValueError, TypeError) as e:
        raise type(e)(f"combine: {path}: {e} (are adapter and frozen from the same "
                      "lj.split?)") from None
  return out


def merge(params: Any) -> Any:
  """Plain arrays again: every implicit leaf (LoRA `W + scale * A @ B`) materialized."""
  return jax.tree.map(materialize, params, is_leaf=is_implicit)


def with_dropout_rng(params: Any, key: jax.Array) -> Any:
  """Attach a distinct dropout key to every implicit leaf that takes one (`with_rng`:
  LoRA and DoRA leaves with `dropout > 0`).

  Keys of stacked (scanned) weights get the stacked batch shape, so each layer
  draws its own mask. Pass the result to the training forward; inference uses
  `params` without keys (no dropout).
  """
  leaves = _paths.leaves_with_paths(params, is_leaf=is_implicit)
  n = sum(is_implicit(x) for _, x in leaves)
  keys = iter(jax.random.split(key, max(n, 1)))
  return jax.tree.map(lambda x: x.with_rng(next(keys)) if is_implicit(x) else x, params,
                      is_leaf=is_implicit)


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def summary(params: Any) -> str:
  """A table of trainable vs total parameters and bytes (PEFT's `print_trainable_parameters`).

  Returns the table as a string: one row per LoRA leaf (path, kernel shape, rank,
  trainable parameters), then totals.
  """
  rows = []
  total_n = total_b = train_n = train_b = 0
  for path, x in _paths.leaves_with_paths(params, is_leaf=is_implicit):
    if isinstance(x, ImplicitArray):
      c = x.count()
      if c.trainable_params:
        rows.append((path, "x".join(map(str, x.shape)), x.summary_label(),
                     f"{c.trainable_params:,}"))
      total_n += c.params
      total_b += c.bytes
      train_n += c.trainable_params
      train_b += c.trainable_bytes
    elif hasattr(x, "shape") and hasattr(x, "dtype"):
      total_n += int(np.prod(x.shape))
      total_b += _nbytes(x)
  head = ("path", "shape", "rank", "trainable")
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(head)]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*r) for r in rows]
  pct = 100.0 * train_n / total_n if total_n else 0.0
  lines.append("")
  lines.append(f"trainable params: {train_n:,} || all params: {total_n:,} || "
               f"trainable%: {pct:.4f}")
  lines.append(f"trainable bytes: {train_b:,} || all bytes: {total_b:,}")
  return "\n".join(lines)


__all__ = ["LoraConfig", "init", "split", "combine", "trainable_mask", "merge",
           "summary", "with_dropout_rng", "check_factors"]
