"""Scalar merge parameters: a value, a `{path regex: value}` mapping, or a gradient.

A parameter setting is resolved once per leaf (per tensor), on the host, from the
leaf's path and its relative position `t` in [0, 1] among the layers:

- a Python number or bool: used as is;
- a mapping `{regex: setting}`: the first pattern that `re.fullmatch`es the path
  wins (`"*"` matches everything); no match falls back to the method's default;
- a list or tuple of numbers: a gradient, linearly interpolated at `t` exactly as
  mergekit does (`t * (len - 1)` split into an index and a fraction);
- `Conditions`: mergekit's YAML `[{filter: ..., value: ...}, ...]` form, where a
  filter matches when it is a *substring* of the tensor name (mergekit semantics).

Per-model values (weights, and `density`/`gamma`/`epsilon` when they differ per
model) are given as a sequence with one setting per model: `weights=[0.6, 0.4]`
or `density=mg.PerModel([0.5, 0.7])`.

For pytrees, `t` of a leaf under `.../layers/{i}/...` is `i / (L - 1)` with `L` the
number of layers in the tree (`1` when there is a single layer), and `0` for every
other leaf: the same `t` mergekit gives embeddings, norms and heads.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Mapping, Sequence

import numpy as np

_MISSING = object()
LAYER_RE = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)")


@dataclasses.dataclass(frozen=True)
class PerModel:
  """One setting per model, e.g. `density=PerModel([0.5, 0.7])`."""
  values: Sequence[Any]


@dataclasses.dataclass(frozen=True)
class Conditions:
  """mergekit's conditional list: `(filter or None, setting)` pairs, filter = substring."""
  items: tuple

  @classmethod
  def from_yaml(cls, items) -> "Conditions":
    out = []
    for it in items:
      if not isinstance(it, Mapping) or "value" not in it:
        raise ValueError(f"conditional parameter entry {_short(it)} must be a mapping with "
                         "'value' (and optionally 'filter')")
      bad = sorted(str(k) for k in it if k not in ("filter", "value"))
      if bad:
        raise ValueError(f"conditional parameter entry {_short(it)}: unknown key(s) {bad}; "
                         "accepted keys: ['filter', 'value']")
      if it.get("filter") is not None and not isinstance(it["filter"], str):
        raise ValueError(f"conditional parameter entry {_short(it)}: filter must be a string")
      out.append((it.get("filter"), from_yaml(it["value"])))
    return cls(tuple(out))


def _short(v, n=80):
  r = repr(v)
  return r if len(r) <= n else r[:n - 20] + f"...<{len(r) - n + 20} more chars>"


def from_yaml(setting):
  """A mergekit YAML parameter setting as one of ours."""
  if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
    return Conditions.from_yaml(setting)
  if isinstance(setting, Mapping):
    return Conditions.from_yaml([setting])
  return setting


def _is_number(x) -> bool:
  return isinstance(x, numbers.Number) or (isinstance(x, np.ndarray) and x.ndim == 0)


def _scalar(x, name: str, path: str):
  if isinstance(x, (bool, str)):
    return x
  if _is_number(x):
    return x.item() if isinstance(x, np.ndarray) else x
  try:   # concrete 0-d jax arrays
    if getattr(x, "shape", None) == ():
      return np.asarray(x).item()
  except Exception:  # a tracer
    pass
  raise TypeError(f"{path}: parameter {name!r} must be a Python number, a mapping "
                  f"{{path regex: value}} or a list (gradient); got {type(x).__name__} {x!r}")


def resolve(setting, path: str, t: float, name: str = "parameter", default=_MISSING):
  """The value of `setting` for the leaf at `path` with layer position `t`."""
  if isinstance(setting, Conditions):
    for flt, value in setting.items:
      if flt is None or flt == "*" or (path and flt in path):
        v = resolve(value, path, t, name, _MISSING)
        if v is not _MISSING:
          return v
    return _need(default, name, path)
  if isinstance(setting, Mapping):
    for pattern, value in setting.items():
      if pattern == "*" or re.fullmatch(pattern, path):
        return resolve(value, path, t, name, default)
    return _need(default, name, path)
  if isinstance(setting, (list, tuple)):
    if not setting:
      return _need(default, name, path)
    values = [_scalar(v, name, path) for v in setting]
    if not all(_is_number(v) and not isinstance(v, bool) for v in values):
      return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]
  if setting is None:
    return _need(default, name, path)
  return _scalar(setting, name, path)


def resolve_num(setting, path: str, t: float, name: str = "parameter", default=_MISSING):
  """`resolve`, then check the value is a finite real number (not a bool or string)."""
  v = resolve(setting, path, t, name, default)
  if v is None and default is None:
    return v
  if isinstance(v, bool) or not _is_number(v) or not np.isfinite(v):
    raise TypeError(f"{path}: parameter {name!r} must be a finite number, got {v!r}")
  return v


def _need(default, name, path):
  if default is _MISSING:
    raise ValueError(f"{path}: parameter {name!r} has no value for this tensor "
                     "(no pattern matched and the method has no default)")
  return default


def per_model(setting, n: int, name: str):
  """Split a setting into `n` per-model settings (a `PerModel` or one shared setting)."""
  if isinstance(setting, PerModel):
    vals = list(setting.values)
    if len(vals) != n:
      raise ValueError(f"parameter {name!r}: PerModel has {len(vals)} values for {n} models")
    return vals
  return [setting] * n


def layer_t(paths: Sequence[str]):
  """`{path: t}` for tree paths: `i / (L - 1)` under `layers/{i}/`, else 0."""
  idx = {}
  for p in paths:
    m = LAYER_RE.search(p)
    if m:
      idx[p] = int(m.group(1))
  n = (max(idx.values()) + 1) if idx else 0
  out = {}
  for p in paths:
    if p in idx:
      out[p] = idx[p] / (n - 1) if n > 1 else 1.0
    else:
      out[p] = 0.0
  return out


__all__ = ["PerModel", "Conditions", "resolve", "resolve_num", "per_model", "layer_t", "from_yaml"]
