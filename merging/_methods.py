"""Merge methods: pure per-leaf functions, each registered once with its parameters.

Every method is one per-tensor function declared with `@method(...)` (see
`merging._registry`): its keyword signature gives the parameters with their
defaults, ranges and scope (shared or per model), the decorator its base policy,
number of models and reference. The registry generates the public tree function
(`mg.ties`, `mg.slerp`, ...: it resolves each parameter per leaf on the host (value,
`{path regex: value}` or a gradient over the layer index, see `merging._params`),
checks it, and maps the function over trees that share one structure), the
entries of `mg.METHODS`, `mg.merge`, and what `lora-jax merge` accepts. The leaf
kernels (`*_leaf`) take arrays, compute in float32 inside and cast back to the
input dtype; they are jit-able.

The task-vector methods (task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear) are settings of one general
core, `task_vector_leaf`, as in mergekit's `GeneralizedTaskArithmeticMerge`:

    delta_i  = sparsify(model_i - base)             (optional, per model)
    delta_i *= weight_i
    mask     = sign consensus over the delta_i       (optional, TIES "sum" election)
    merged   = sum_i mask * delta_i
    merged  /= sum_i mask * weight_i                 (if normalize)
    out      = base + lambda * merged

Defaults follow mergekit 0.1.5. Where that differs from the paper (also in each
registry entry's `notes`):

- ties (Yadav et al. 2023): the paper elects the sign from the sum of the trimmed
  task vectors and divides by the *number* of agreeing models; mergekit elects it
  from the *weighted* deltas and divides by the agreeing models' summed weights,
  and keeps at least one entry (`max(1, int(density * n))`). With unit weights the
  two coincide: `weights=[1] * N, lambda_=λ` is the paper's TIES.
- dare_linear / dare_ties (Yu et al. 2024): the paper divides kept entries by
  `density`; mergekit 0.1.5 rescales the dropped delta to its original L1 norm
  (`rescale=True`). `rescale="inverse"` gives the paper's (unbiased) rescale.
- della (Deep et al. 2024): the paper divides each kept entry by its keep
  probability; mergekit rescales to the L1 norm. `rescale="inverse"` gives the paper's.
- breadcrumbs: mergekit's parameters (`density` kept, `gamma` largest dropped) rather
  than the paper's two percentages; the mask is the same family.
- slerp / model_stock / nuslerp: each tensor is flattened to one vector (mergekit),
  `model_stock(filter_wise=True)` and `nuslerp(flatten=False)` work per row.

Random methods take an explicit `key`; leaf `j` (flattening order; output tensor
index in the command line) uses `split(fold_in(key, j), N)`, one key per model.

`arithmetic="mergekit"` (every tree function, `mg.merge`, `lora-jax merge
--mergekit-arithmetic`) reproduces mergekit 0.1.5's arithmetic in the inputs' dtype
for `linear` (float32 fused multiply-adds), `slerp`/`passthrough` (float32 in
mergekit too) and the deterministic task-vector settings (numpy, rounding to
bf16/fp16 after every operation as torch does). The one residual difference: where
several task-vector entries have equal magnitude at the top-k cut, torch's argsort
keeps an unspecified subset, we keep the lowest flat indices.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.extend import check_same_structure, is_implicit, leaves_with_paths, materialize, path_str
from merging import _sparsify as sp
from merging._params import layer_t
from merging._registry import METHODS, Method, P, merge, method, params_of, register, short

F32 = jnp.float32


# ----------------------------------------------------------------------------
# leaf functions

def _f32(x):
  return jnp.asarray(x).astype(F32)


def task_vector_leaf(base, models, weights, lam, sparse_args=None, keys=None, *,
                     sparsify=None, consensus=None, normalize=False, rescale=None):
  """The general task-vector merge of one leaf.

  Args:
    base: `(*shape)` any float dtype; the output has this dtype.
    models: tuple of N arrays `(*shape)`.
    weights: `(N,)` float32 per-model weights.
    lam: scalar float32, the final scale (`lambda`).
    sparse_args: per-model sparsifier arguments, each `(N,)`: `{"k"}` for
      "magnitude"; `{"keep_top", "drop_top"}` for "magnitude_outliers";
      `{"density"}` for "random"; `{"lo", "span"}` for "della_magprune".
    keys: `(N,)` PRNG keys for the random sparsifiers.
    sparsify: None | "magnitude" | "magnitude_outliers" | "random" | "della_magprune".
    consensus: None | "sum" (TIES sign election by the summed weighted deltas)
      | "count" (by the number of signs).
    normalize: divide by the summed weights (of the models agreeing with the
      elected sign when `consensus` is set).
    rescale: None | "l1" (mergekit) | "inverse" (DARE/DELLA papers: 1 / keep prob).
  Returns:
    `(*shape)` in `base.dtype`.
  """
  if sparsify == "della_magprune" or (sparsify is not None and sparsify not in _ELEMENTWISE):
    return task_vector_leaf_dense(base, models, weights, lam, sparse_args, keys,
                                  sparsify=sparsify, consensus=consensus, normalize=normalize,
                                  rescale=rescale)
  # Two phases, each its own executable when called eagerly: per-model scalar
  # statistics (thresholds, rescale factors), then one elementwise combine. XLA on
  # CPU materializes every reduction operand, so this bounds the temporaries to
  # about one model's delta at a time instead of all of them.
  stats = None
  if sparsify is not None:
    per = [_sparse_stats(base, m, {k: v[i] for k, v in sparse_args.items()},
                         None if keys is None else keys[i], sparsify=sparsify, rescale=rescale)
           for i, m in enumerate(models)]
    stats = {k: jnp.stack([p[k] for p in per]) for k in per[0]}
  return _combine(base, tuple(models), weights, lam, stats, keys, sparsify=sparsify,
                  consensus=consensus, normalize=normalize)


_ELEMENTWISE = ("magnitude", "magnitude_outliers", "random")


def _keep(d, sparsify, st, key, i):
  """The kept-entry mask of model `i`'s delta `d` from its statistics (elementwise)."""
  if sparsify == "magnitude":
    bits = sp._bits(jnp.abs(d))
    return sp.select(bits, st["thr"][i], st["cut"][i]).reshape(d.shape)
  if sparsify == "magnitude_outliers":
    bits = sp._bits(jnp.abs(d))
    return (sp.select(bits, st["thr"][i], st["cut"][i])
            & ~sp.select(bits, st["thr2"][i], st["cut2"][i])).reshape(d.shape)
  if sparsify == "random":
    return jax.random.bernoulli(key, st["p"][i], d.shape)
  raise ValueError(f"unknown sparsification {sparsify!r}")


@functools.partial(jax.jit, static_argnames=("sparsify", "rescale"))
def _sparse_stats(base, m, a, key, *, sparsify, rescale):
  """Scalars that define one model's sparsified delta: thresholds and the rescale."""
  d = _f32(m) - _f32(base)
  st = {}
  if sparsify == "magnitude":
    st["thr"], st["cut"] = sp.kth_largest(sp._bits(jnp.abs(d)), a["k"])
  elif sparsify == "magnitude_outliers":
    bits = sp._bits(jnp.abs(d))
    st["thr"], st["cut"] = sp.kth_largest(bits, a["keep_top"])
    st["thr2"], st["cut2"] = sp.kth_largest(bits, a["drop_top"])
  elif sparsify == "random":
    st["p"] = jnp.asarray(a["density"], F32)
  st1 = {k: v[None] for k, v in st.items()}
  if rescale == "l1":
    keep = _keep(d, sparsify, st1, key, 0)
    before = jnp.sum(jnp.abs(d))
    after = jnp.sum(jnp.where(keep, jnp.abs(d), 0.0))
    small = (before < sp.RESCALE_EPS) | (after < sp.RESCALE_EPS)
    st["scale"] = jnp.where(small, 1.0, before / jnp.where(small, 1.0, after)).astype(F32)
  elif rescale == "inverse":
    p = st["p"]
    st["scale"] = jnp.where(p > 0, 1.0 / jnp.where(p > 0, p, 1.0), 1.0).astype(F32)
  else:
    st["scale"] = jnp.ones((), F32)
  return st


def _mix(b, deltas, weights, lam, consensus, normalize):
  """`b + lam * sum_i mask_i * delta_i [/ sum_i mask_i * w_i]`, elementwise over the list
  of weighted deltas (no stacked copy, so XLA fuses it into a few passes); `mask` is the
  TIES sign election (`consensus` "sum" / "count") or all ones. float32."""
  zero = jnp.zeros((), F32)
  if consensus is not None:
    if consensus == "sum":
      score = functools.reduce(jnp.add, deltas)
    elif consensus == "count":
      score = functools.reduce(jnp.add, [jnp.sign(d) for d in deltas])
    else:
      raise ValueError(f"unknown consensus {consensus!r}; expected 'sum' or 'count'")
    elected = jnp.where(score >= 0, 1.0, -1.0).astype(F32)
    agree = [jnp.sign(d) == elected for d in deltas]
    mixed = functools.reduce(jnp.add, [jnp.where(g, d, zero) for g, d in zip(agree, deltas)])
    div = functools.reduce(jnp.add, [jnp.where(g, weights[i], zero) for i, g in enumerate(agree)])
    div = jnp.where(div == 0, 1.0, div)
  else:
    mixed = functools.reduce(jnp.add, deltas)
    div = jnp.sum(weights)
    div = jnp.where(jnp.abs(div) < 1e-8, 1.0, div)
  if normalize:
    mixed = mixed / div
  return b + mixed * _f32(lam)


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus", "normalize"))
def _combine(base, models, weights, lam, stats, keys, *, sparsify, consensus, normalize):
  b = _f32(base)
  weights = _f32(weights)
  zero = jnp.zeros((), F32)
  deltas = []
  for i, m in enumerate(models):
    d = _f32(m) - b
    if sparsify is not None:
      keep = _keep(d, sparsify, stats, None if keys is None else keys[i], i)
      d = jnp.where(keep, d * stats["scale"][i], zero)
    deltas.append(d * weights[i])
  return _mix(b, deltas, weights, lam, consensus, normalize).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus", "normalize", "rescale"))
def task_vector_leaf_dense(base, models, weights, lam, sparse_args=None, keys=None, *,
                     sparsify=None, consensus=None, normalize=False, rescale=None):
  """`task_vector_leaf` in one pass with every sparsified delta materialized (the
  reference, and the path for DELLA, whose per-row ranks do not reduce to scalars)."""
  b = _f32(base)
  weights = _f32(weights)
  deltas = []
  for i, m in enumerate(models):
    d = _f32(m) - b
    a = {k: v[i] for k, v in (sparse_args or {}).items()}
    if sparsify == "magnitude":
      d = sp.magnitude(d, a["k"], rescale)
    elif sparsify == "magnitude_outliers":
      d = sp.magnitude_outliers(d, a["keep_top"], a["drop_top"], rescale)
    elif sparsify == "random":
      d = sp.bernoulli(d, a["density"], keys[i], rescale)
    elif sparsify == "della_magprune":
      d = sp.della_magprune(d, a["lo"], a["span"], keys[i], rescale)
    elif sparsify is not None:
      raise ValueError(f"unknown sparsification {sparsify!r}")
    deltas.append(d * weights[i])
  if not deltas:
    return base
  return _mix(b, deltas, weights, lam, consensus, normalize).astype(base.dtype)


@functools.partial(jax.jit, static_argnames=("normalize",))
def linear_leaf(models, weights, *, normalize=True):
  """Weighted average `sum_i w_i x_i / sum_i w_i` (or the plain sum without normalize)."""
  weights = _f32(weights)
  acc = jnp.zeros(models[0].shape, F32)
  for i, m in enumerate(models):
    acc = acc + _f32(m) * weights[i]
  if normalize:
    acc = acc / jnp.sum(weights)
  return acc.astype(models[0].dtype)


@functools.partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def slerp_leaf(a, b, t, *, dot_threshold=0.9995, eps=1e-8):
  """Spherical interpolation of two flattened tensors (mergekit 0.1.5 `slerp`).

  `t = 0` gives `a`, `t = 1` gives `b`; when `|cos| > dot_threshold` (nearly
  parallel or antiparallel) it interpolates linearly. Norms below `eps` count as 1.
  """
  x, y = _f32(a).reshape(-1), _f32(b).reshape(-1)
  t = _f32(t)
  na, nb = jnp.linalg.norm(x), jnp.linalg.norm(y)
  na = jnp.where(na > eps, na, 1.0)
  nb = jnp.where(nb > eps, nb, 1.0)
  dot = jnp.clip(jnp.sum((x / na) * (y / nb)), -1.0, 1.0)
  lin = jnp.abs(dot) > dot_threshold
  theta = jnp.arccos(jnp.where(lin, 0.0, dot))
  s = jnp.where(lin, 1.0, jnp.sin(theta))
  ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / s)
  cb = jnp.where(lin, t, jnp.sin(t * theta) / s)
  return (ca * x + cb * y).reshape(a.shape).astype(a.dtype)


def _nuslerp_core(v0, v1, t, eps):
  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
  cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1.0, 1.0)
  colinear = (1 - cos * cos) <= eps ** 2
  theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
  s = jnp.where(colinear, 1.0, jnp.sin(theta))
  res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / s
  return jnp.where(colinear, (1 - t) * v0 + t * v1, res)


@functools.partial(jax.jit, static_argnames=("row_wise", "flatten", "eps"))
def nuslerp_leaf(x0, x1, t, base=None, *, row_wise=False, flatten=True, eps=1e-8):
  """mergekit's `nuslerp` on one leaf: slerp of `x0`, `x1` (or of their deltas from
  `base`) at `t`, over the flattened tensor (`flatten`), or per vector along the
  last axis, or along axis 0 (`row_wise`). Colinear vectors interpolate linearly."""
  t = _f32(t)
  b = None if base is None else _f32(base)
  v0, v1 = _f32(x0), _f32(x1)
  if b is not None:
    v0, v1 = v0 - b, v1 - b
  shape = v0.shape
  if flatten:
    v0, v1 = v0.reshape(-1), v1.reshape(-1)
  elif row_wise:
    v0, v1 = jnp.moveaxis(v0, 0, -1), jnp.moveaxis(v1, 0, -1)
  r = _nuslerp_core(v0, v1, t, eps)
  if row_wise and not flatten:
    r = jnp.moveaxis(r, -1, 0)
  r = r.reshape(shape)
  if b is not None:
    r = b + r
  return r.astype(x0.dtype)


@functools.partial(jax.jit, static_argnames=("filter_wise",))
def model_stock_leaf(base, models, *, filter_wise=False):
  """Model Stock (Jang et al. 2024) as in mergekit 0.1.5: interpolate the average of
  the models toward `base` with `t = N cos / (1 + (N - 1) cos)`, `cos` the mean
  pairwise cosine of the deltas (per row of axis 0 when `filter_wise`)."""
  w0 = _f32(base)
  shape = w0.shape
  if filter_wise:
    w0 = w0[None] if w0.ndim == 1 else w0
    ws = [(_f32(m)[None] if m.ndim == 1 else _f32(m)) for m in models]
    w0r, wsr = w0.reshape(w0.shape[0], -1), [w.reshape(w.shape[0], -1) for w in ws]
  else:
    w0r, wsr = w0.reshape(-1), [_f32(m).reshape(-1) for m in models]
  offs = [w - w0r for w in wsr]
  cos = []
  for i, oa in enumerate(offs):
    for ob in offs[i + 1:]:
      prod = jnp.linalg.norm(oa, axis=-1) * jnp.linalg.norm(ob, axis=-1)
      cos.append(jnp.clip(jnp.sum(oa * ob, axis=-1) / jnp.maximum(prod, 1e-6), -1, 1))
  c = jnp.mean(jnp.stack(cos), axis=0)[..., None]
  n = len(models)
  den = 1 + (n - 1) * c
  sing = jnp.abs(den) < 1e-6
  t = jnp.where(sing, 0.0, (n * c) / jnp.where(sing, 1.0, den))
  avg = sum(wsr) / n
  out = t * avg + (1 - t) * w0r
  return out.reshape(shape).astype(base.dtype)


# ----------------------------------------------------------------------------
# lifting over trees

_is_leaf = is_implicit
_dense = materialize


def _dtype_of(x):
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _flatten_all(trees: Sequence[Any], names: Sequence[str]):
  """Leaves with paths of every tree; checks one structure and matching shapes."""
  check_same_structure(trees, names, is_leaf=_is_leaf, what="merge")
  flat0, treedef = jax.tree_util.tree_flatten(trees[0], is_leaf=_is_leaf)
  paths = [p for p, _ in leaves_with_paths(trees[0], is_leaf=_is_leaf)]
  cols = [[_dense(x) for x in flat0]]
  for tree in trees[1:]:
    cols.append([_dense(x) for x in jax.tree_util.tree_flatten(tree, is_leaf=_is_leaf)[0]])
  for j, path in enumerate(paths):
    for c, name in zip(cols, names):
      if not (hasattr(c[j], "dtype") and hasattr(c[j], "shape")) and not (
          isinstance(c[j], numbers.Number)):
        raise TypeError(f"{path}: leaf of {name} is {type(c[j]).__name__} {short(c[j])}; "
                        "expected an array")
    s0, d0 = tuple(np.shape(cols[0][j])), _dtype_of(cols[0][j])
    for c, name in zip(cols[1:], names[1:]):
      s, d = tuple(np.shape(c[j])), _dtype_of(c[j])
      if s != s0:
        raise ValueError(f"{path}: shape {s} in {name} does not match {s0} in {names[0]}")
      if d != d0:
        raise ValueError(f"{path}: dtype {d} in {name} does not match {d0} in {names[0]}; "
                         "cast the trees to one dtype first")
  return treedef, paths, cols


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                        jnp.floating)


def _leaf_keys(key, j, n):
  """`n` keys for leaf `j`: `split(fold_in(key, j), n)`."""
  return jax.random.split(jax.random.fold_in(key, j), n)


def _map(trees, names, fn):
  """Apply `fn(j, path, t, leaves)` per leaf and rebuild the first tree's structure."""
  treedef, paths, cols = _flatten_all(trees, names)
  ts = layer_t(paths)
  out = []
  for j, path in enumerate(paths):
    leaves = [c[j] for c in cols]
    if not all(_is_float(x) for x in leaves):
      out.append(leaves[0])        # integer/bool leaves are copied from the first tree
      continue
    out.append(fn(j, path, ts[path], leaves))
  return jax.tree_util.tree_unflatten(treedef, out)


def sparse_args_for(sparsify, numel, densities, gammas=None, epsilons=None, where=""):
  """Host-side per-model sparsifier arguments (see `task_vector_leaf`)."""
  for d in densities:
    if not isinstance(d, (int, float)) or isinstance(d, bool) or not np.isfinite(d):
      raise ValueError(f"{where}density must be a finite number, got {d!r}")
  if sparsify == "magnitude":
    return {"k": np.array([sp.magnitude_k(numel, d) for d in densities], np.int32)}
  if sparsify == "magnitude_outliers":
    for g in gammas:
      if not 0 <= g <= 1:
        raise ValueError(f"{where}gamma must be in [0, 1], got {g}")
    c = [sp.outlier_counts(numel, d, g) for d, g in zip(densities, gammas)]
    return {"keep_top": np.array([a for a, _ in c], np.int32),
            "drop_top": np.array([b for _, b in c], np.int32)}
  if sparsify == "random":
    return {"density": np.clip(np.array(densities, np.float32), 0, 1)}
  if sparsify == "della_magprune":
    c = [sp.della_bounds(d, e, where) for d, e in zip(densities, epsilons)]
    return {"lo": np.array([a for a, _ in c], np.float32),
            "span": np.array([b for _, b in c], np.float32)}
  return None



# ----------------------------------------------------------------------------
# the methods: one per-tensor function each, registered with its parameters

def _check_linear(v, n, where):
  if v["normalize"] and abs(float(np.sum(v["weight"]))) < 1e-12:
    raise ValueError(f"{where}: linear weights {v['weight'].tolist()} sum to 0; cannot normalize")


def _linear_mergekit(base, models, *, weight, normalize):
  """mergekit 0.1.5's `linear` (numpy): float32 accumulation by fused multiply-adds
  (`addcmul_`, emulated exactly in float64), one division, one rounding to the dtype."""
  acc = np.zeros(models[0].shape, np.float32)
  w = np.asarray(weight, np.float32)
  for i, x in enumerate(models):
    acc = (acc.astype(np.float64) + x.astype(np.float64) * np.float64(w[i])).astype(np.float32)
  if normalize:
    acc = acc / np.float32(_mk_sum([w[i:i + 1] for i in range(len(models))], np.float32)[0])
  return acc.astype(models[0].dtype)


@method("linear", reference="https://arxiv.org/abs/2203.05482", base="none", check=_check_linear,
        mergekit=_linear_mergekit)
def _linear(base, models, *,
            weight: float = P(1.0, per_model=True, api="weights", yaml_required=True,
                              doc="the model's weight"),
            normalize: bool = P(True, doc="divide by the summed weights")):
  """Weighted average of models (model soups, Wortsman et al. 2022)."""
  return linear_leaf(models, weight, normalize=normalize)


@method("slerp", reference="https://en.wikipedia.org/wiki/Slerp", base="required", models=1,
        inputs=("a", "b"), mergekit="float32")
def _slerp(base, models, *,
           t: float = P(lo=0, hi=1, positional=True, doc="0 gives the base (a), 1 the model (b)"),
           dot_threshold: float = P(0.9995, lo=0, hi=1,
                                    doc="|cos| above which it interpolates linearly")):
  """Spherical linear interpolation of the base and one model, each tensor one vector."""
  return slerp_leaf(base, models[0], np.float32(t), dot_threshold=dot_threshold)


def nuslerp_t(w) -> float:
  """mergekit's NuSLERP fraction `w1 / (w0 + w1)` (0.5 when the weights sum to ~0)."""
  w0, w1 = float(w[0]), float(w[1])
  return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


@method("nuslerp", reference="https://github.com/arcee-ai/mergekit", base="optional", models=2)
def _nuslerp(base, models, *,
             weight: float = P(1.0, per_model=True, api="weights", yaml_required=True),
             row_wise: bool = P(False, yaml="nuslerp_row_wise", doc="vectors along axis 0"),
             flatten: bool = P(True, yaml="nuslerp_flatten", doc="each tensor one vector")):
  """NuSLERP: slerp of two models (or of their task vectors from a base) at
  `t = w1 / (w0 + w1)`."""
  return nuslerp_leaf(models[0], models[1], np.float32(nuslerp_t(weight)), base,
                      row_wise=row_wise, flatten=flatten)


@method("model_stock", reference="https://arxiv.org/abs/2403.19522", base="required",
        models=(2, None))
def _model_stock(base, models, *, filter_wise: bool = P(False, doc="per row of axis 0")):
  """Model Stock (Jang et al. 2024): the models' average moved toward the base by the
  angle between their task vectors."""
  return model_stock_leaf(base, models, filter_wise=filter_wise)


@method("passthrough", reference="https://arxiv.org/abs/2312.15166", base="none", models=1,
        inputs=("model",), mergekit="float32")
def _passthrough(base, models, *,
                 scale: float = P(None, per_model=True, positional=True, none_ok=True,
                                  doc="multiply the tensor (none: copy)")):
  """The model unchanged, or each tensor times `scale`."""
  x = models[0]
  if scale is None:
    return x
  return (_f32(x) * np.float32(scale[0])).astype(x.dtype)


# The task-vector family: one general method; each name is a setting of it.

def _task_vector(base, models, *, sparsify, key=None, weight, density=None, gamma=None,
                 epsilon=None, lambda_, normalize, rescale, consensus, int8_mask=False):
  n = len(models)
  rescale = {True: "l1", False: None}.get(rescale, rescale)
  dens = [1.0] * n if density is None else [float(d) for d in density]
  args = sparse_args_for(sparsify, int(np.size(base)), dens,
                         None if gamma is None else [float(g) for g in gamma],
                         None if epsilon is None else [float(e) for e in epsilon])
  return task_vector_leaf(base, models, weight, np.float32(lambda_), args, key,
                          sparsify=sparsify, consensus=consensus, normalize=normalize,
                          rescale=rescale)


def _mk_sum(xs, dt):
  """torch's `stack(xs).sum(0)` in dtype `dt`: accumulated in float32, rounded once."""
  acc = np.zeros(np.shape(xs[0]), np.float32)
  for x in xs:
    acc = acc + np.asarray(x, np.float32)
  return acc.astype(dt)


def _mk_rescale(d, mask, rescale, dt):
  masked = (d * mask.astype(dt)).astype(dt)
  if not rescale:
    return masked
  before = np.float32(np.abs(d.astype(np.float32)).sum()).astype(dt)
  after = np.float32(np.abs(masked.astype(np.float32)).sum()).astype(dt)
  if float(before) < sp.RESCALE_EPS or float(after) < sp.RESCALE_EPS:
    return masked
  ratio = (np.float32(before) / np.float32(after)).astype(dt)
  return (masked.astype(np.float32) * np.float32(ratio)).astype(dt)


def _mk_magnitude(d, density, rescale, dt):
  """mergekit 0.1.5 `sparsify.magnitude` on a tensor of dtype `dt` (numpy). Ties at
  the k-th magnitude are kept lowest flat index first; torch's argsort picks among
  them in an unspecified order (the one residual difference)."""
  if density >= 1:
    return d
  if density <= 0 or d.size == 0:
    return np.zeros_like(d)
  k = max(1, int(density * d.size))
  w = np.abs(d.astype(np.float32)).reshape(-1)
  mask = np.zeros(d.size, bool)
  mask[np.argsort(-w, kind="stable")[:k]] = True
  return _mk_rescale(d, mask.reshape(d.shape), rescale, dt)


def _mk_outliers(d, density, gamma, rescale, dt):
  """mergekit 0.1.5 `sparsify.magnitude_outliers` (numpy, dtype `dt`; ties as above)."""
  if density >= 1:
    return d
  n = d.size
  target, n_top = int(density * n), int(gamma * n)
  n_bot = max(0, n - target - n_top)
  w = np.abs(d.astype(np.float32)).reshape(-1)
  mask = np.zeros(n, bool)
  mask[np.argsort(w, kind="stable")[n_bot:n_bot + target]] = True
  return _mk_rescale(d, mask.reshape(d.shape), rescale, dt)


def _task_vector_mergekit(base, models, *, sparsify, key=None, weight, density=None,
                          gamma=None, epsilon=None, lambda_, normalize, rescale, consensus,
                          int8_mask=False):
  """mergekit 0.1.5's `GeneralizedTaskArithmeticMerge.merge_group` in the inputs' dtype:
  numpy arrays in, each operation computed in float32 and rounded to the dtype as
  torch does on CPU (sums accumulate in float32 and round once). bf16/fp16/f32."""
  if sparsify not in (None, "magnitude", "magnitude_outliers"):
    raise ValueError(f"arithmetic='mergekit' is not reproduced for random drops ({sparsify}): "
                     "torch's random numbers are not ours")
  dt = base.dtype
  f32 = np.float32
  rescale = rescale in (True, "l1")
  b = base.astype(f32)
  deltas = []
  for i, m in enumerate(models):
    d = (m.astype(f32) - b).astype(dt)
    if sparsify == "magnitude":
      d = _mk_magnitude(d, float(density[i]), rescale, dt)
    elif sparsify == "magnitude_outliers":
      d = _mk_outliers(d, float(density[i]), float(gamma[i]), rescale, dt)
    deltas.append(d)
  w = np.asarray(weight, f32).astype(dt)
  deltas = [(d.astype(f32) * f32(w[i])).astype(dt) for i, d in enumerate(deltas)]
  zero = np.zeros((), dt)
  if consensus is not None:
    if consensus == "sum":
      score = _mk_sum(deltas, dt)
    else:
      score = _mk_sum([np.sign(d.astype(f32)).astype(dt) for d in deltas], dt)
    majority = np.where(score.astype(f32) >= 0, f32(1), f32(-1))
    masks = [np.sign(d.astype(f32)) == majority for d in deltas]
    mixed = _mk_sum([np.where(g, d, zero) for g, d in zip(masks, deltas)], dt)
    div = _mk_sum([np.where(g, w[i], zero) for i, g in enumerate(masks)], dt)
    div = np.where(div.astype(f32) == 0, np.ones((), dt), div)
  else:
    mixed = _mk_sum(deltas, dt)
    div = _mk_sum([w[i:i + 1] for i in range(len(deltas))], dt)[0]
    if abs(float(div)) < 1e-8:
      div = np.ones((), dt)
  if normalize:
    mixed = (mixed.astype(f32) / np.asarray(div, dt).astype(f32)).astype(dt)
  if float(lambda_) != 1:
    mixed = (mixed.astype(f32) * f32(lambda_)).astype(dt)
  return (b + mixed.astype(f32)).astype(dt)


def _tv_signature(*, weight: float = P(1.0, per_model=True, api="weights", yaml_required=True,
                                       doc="the task vector's weight"),
                  density: float = P(1.0, lo=0, hi=1, per_model=True,
                                     doc="fraction of the task vector kept"),
                  gamma: float = P(0.01, lo=0, hi=1, per_model=True,
                                   doc="fraction of the largest entries dropped"),
                  epsilon: float = P(0.15, lo=0, hi=1, per_model=True,
                                     doc="keep probabilities span density +/- epsilon"),
                  lambda_: float = P(1.0, yaml="lambda", doc="scale of the merged task vector"),
                  normalize: bool = P(False, doc="divide by the (agreeing) weights"),
                  rescale: object = P(False, choices=(True, False, "l1", "inverse"),
                                      doc="restore the L1 norm (true), or 1/p ('inverse')"),
                  consensus: object = P(None, choices=(None, "sum", "count"), none_ok=True,
                                        doc="sign election ('sum': TIES)"),
                  int8_mask: bool = P(False, doc="accepted for mergekit; no effect")):
  """The parameters of the task-vector family (mergekit 0.1.5's defaults)."""


def _check_tv(random):
  def check(v, n, where):
    if v.get("rescale") == "inverse" and not random:
      raise ValueError(f"{where}: rescale='inverse' applies only to random drops (DARE, DELLA)")
    if "epsilon" in v:
      for d, e in zip(v["density"], v["epsilon"]):
        sp.della_bounds(float(d), float(e), f"{where}: ")
  return check


def task_vector_method(name, sparsify, consensus, normalize, rescale, reference, random=False,
                       notes="", summary=""):
  """Register one setting of the general task-vector merge (mergekit's GTA): which
  sparsifier and sign consensus it uses and its defaults of `normalize`/`rescale`.
  Returns the tree function (`mg.<name>`)."""
  ps = params_of(_tv_signature)
  if sparsify != "magnitude_outliers":
    del ps["gamma"]
  if sparsify != "della_magprune":
    del ps["epsilon"]
  for k, d in (("normalize", normalize), ("rescale", rescale), ("consensus", consensus)):
    ps[k] = dataclasses.replace(ps[k], default=d)
  tensor = functools.partial(_task_vector, sparsify=sparsify)
  tensor.__doc__ = summary
  mk = (None if random else functools.partial(_task_vector_mergekit, sparsify=sparsify))
  m = register(Method(name, tensor, ps, reference, "required", 1, None, ("models", "base"),
                      random, notes, summary, _check_tv(random), mergekit=mk))
  return m.fn


task_arithmetic = task_vector_method(
    "task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089",
    summary="base + λ Σ wᵢ (mᵢ - base)",
    notes="as the paper (Ilharco et al. 2023): base + lambda * sum_i w_i (m_i - base)")
ties = task_vector_method(
    "ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708",
    summary="trim deltas to `density` by magnitude, elect signs, disjoint mean",
    notes="mergekit: sign elected from the weighted deltas, divided by the summed weights of "
          "agreeing models, k = max(1, int(density * n)); unit weights give the paper's TIES")
dare_linear = task_vector_method(
    "dare_linear", "random", None, False, True, "https://arxiv.org/abs/2311.03099", True,
    summary="random drop at `1 - density`, rescale",
    notes="mergekit 0.1.5 rescales to the delta's L1 norm; rescale='inverse' is the "
          "paper's 1/density")
dare_ties = task_vector_method(
    "dare_ties", "random", "sum", False, True, "https://arxiv.org/abs/2311.03099", True,
    summary="random drop at `1 - density`, rescale, TIES sign consensus",
    notes="mergekit 0.1.5 rescales to the delta's L1 norm; rescale='inverse' is the "
          "paper's 1/density")
breadcrumbs = task_vector_method(
    "breadcrumbs", "magnitude_outliers", None, False, False, "https://arxiv.org/abs/2312.06795",
    summary="drop the largest `gamma` and the smallest deltas",
    notes="mergekit's parameters: density kept, gamma largest dropped, the smallest dropped "
          "to reach density")
breadcrumbs_ties = task_vector_method(
    "breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
    "https://arxiv.org/abs/2312.06795",
    summary="breadcrumbs with TIES sign consensus",
    notes="breadcrumbs sparsification with TIES sign consensus (mergekit)")
della = task_vector_method(
    "della", "della_magprune", "sum", True, True, "https://arxiv.org/abs/2406.11617", True,
    summary="magnitude-ranked drop probabilities (`epsilon`), TIES sign consensus",
    notes="mergekit: keep probability density +/- epsilon by |delta| rank per row, L1 "
          "rescale; rescale='inverse' is the paper's 1/p")
della_linear = task_vector_method(
    "della_linear", "della_magprune", None, False, True, "https://arxiv.org/abs/2406.11617", True,
    summary="magnitude-ranked drop probabilities (`epsilon`)",
    notes="DELLA drop without sign consensus (mergekit)")

linear = METHODS["linear"].fn
slerp = METHODS["slerp"].fn
nuslerp = METHODS["nuslerp"].fn
model_stock = METHODS["model_stock"].fn
passthrough = METHODS["passthrough"].fn
MethodInfo = Method      # the registry entry type, under its earlier public name

def _find_layers(tree, key):
  """The path (tuple of keys) of the first container stored under `key`."""
  if isinstance(tree, dict):
    if key in tree and isinstance(tree[key], (list, tuple, dict)):
      return (key,)
    for k, v in tree.items():
      r = _find_layers(v, key)
      if r is not None:
        return (k,) + r
  return None


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out


def stack_layers(slices, *, layers_key="layers"):
  """Passthrough with layer stacking (depth up-scaling, SOLAR): concatenate layer
  ranges of several models into one deeper model.

  Args:
    slices: `[(model, (start, end)), ...]`; each model is a nested dict whose
      `layers_key` entry is a list of per-layer trees (or a dict keyed `"0"`, `"1"`,
      ... or `0`, `1`, ...). As in mergekit, leaves outside the layers whose path
      contains "embed" come from the first slice's model and the others (final
      norm, head) from the last slice's model.
  Returns:
    The first model's tree with `layers_key` holding the stacked layers, in the
    container type of the first model.
  """
  if not slices:
    raise ValueError("stack_layers: no slices")
  out_layers = []
  first_path = None
  for i, s in enumerate(slices):
    try:
      model, (start, end) = s
    except (TypeError, ValueError):
      raise TypeError(f"slices[{i}] must be (model, (start, end)), got {s!r}") from None
    path = _find_layers(model, layers_key)
    if path is None:
      raise ValueError(f"slices[{i}]: no {layers_key!r} list/dict in the model tree")
    first_path = first_path or path
    layers = _get(model, path)
    seq = (list(layers) if isinstance(layers, (list, tuple))
           else [layers[k] for k in sorted(layers, key=lambda k: int(k))])
    if not (0 <= start < end <= len(seq)):
      raise ValueError(f"slices[{i}]: layer_range ({start}, {end}) outside 0..{len(seq)}")
    out_layers.extend(seq[start:end])
  base_layers = _get(slices[0][0], first_path)
  if isinstance(base_layers, dict):
    str_keys = all(isinstance(k, str) for k in base_layers)
    new = {(str(i) if str_keys else i): l for i, l in enumerate(out_layers)}
  else:
    new = type(base_layers)(out_layers) if isinstance(base_layers, tuple) else out_layers
  out = _set(slices[0][0], first_path, new)
  last = slices[-1][0]
  if last is slices[0][0]:
    return out
  last_leaves = dict(leaves_with_paths(last, is_leaf=_is_leaf))
  prefix = "/".join(str(k) for k in first_path) + "/"

  def pick(kp, x):
    p = path_str(kp)
    if p.startswith(prefix) or "embed" in p or p not in last_leaves:
      return x
    y = last_leaves[p]
    if np.shape(y) != np.shape(x):
      raise ValueError(f"{p}: shape {np.shape(y)} in the last slice's model does not match "
                       f"{np.shape(x)} in the first's")
    return y

  return jax.tree_util.tree_map_with_path(pick, out, is_leaf=_is_leaf)



__all__ = [
    "METHODS", "Method", "MethodInfo", "merge", "linear", "task_arithmetic", "ties",
    "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "slerp", "nuslerp", "model_stock", "passthrough", "stack_layers", "task_vector_leaf",
    "task_vector_leaf_dense", "task_vector_method", "linear_leaf", "slerp_leaf",
    "nuslerp_leaf", "nuslerp_t", "model_stock_leaf", "register", "method", "P",
]
