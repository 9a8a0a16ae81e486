"""The merge-method registry: every method is one per-tensor function whose typed
keyword signature declares its parameters, registered once by name.

A method is declared with `@method(...)` on a function

    def fn(base, models, *, <param>: <type> = P(<default>, lo=..., hi=...), ...)

`base` is one array (or None when the method takes no base), `models` a tuple of
N arrays of its shape (the non-base models), and each keyword parameter is
resolved on the host for that tensor: a shared parameter arrives as a Python
`float`/`int`/`bool`/`str`, a per-model one (`P(..., per_model=True)`) as an
`(N,)` float32 numpy array. Random methods also receive `key`: `(N,)` PRNG keys.
The function returns one array of `base`'s (or `models[0]`'s) shape and dtype.

From that one declaration the registry derives, for every consumer:

- the Python tree function (`mg.ties`, `mg.slerp`, ...) with its signature,
  docstring and argument checks, and `mg.merge(name, models, base, **params)`;
- the YAML validator and planner of `lora-jax merge` (parameter names, defaults,
  ranges, per-model vs shared scope, base policy and the number of models);
- the README table of methods (`method_table()`).

Ranges are checked in one place (`Param.check`), before tracing, for every value a
setting can take (each leaf's resolved value), so `density=1.5` or `t=-0.2` are
errors naming the parameter, the tensor path and the accepted range.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import typing
from typing import Any, Callable, Mapping

import numpy as np

from merging._params import Conditions, PerModel, resolve

REQUIRED = inspect.Parameter.empty     # "no default": the parameter must be given
_ABSENT = object()                     # a parameter not given at all


def short(v, n: int = 80) -> str:
  """`repr(v)` cut to `n` characters, so no error message grows with user input."""
  try:
    r = repr(v)
  except Exception:  # noqa: BLE001  (a hostile __repr__)
    r = f"<{type(v).__name__}>"
  return r if len(r) <= n else r[:n - 20] + f"...<{len(r) - n + 20} more chars>"


@dataclasses.dataclass(frozen=True)
class P:
  """Declaration of one parameter, used as the default in a method's signature.

  Args:
    default: the value when a setting is absent (`REQUIRED`: none).
    lo, hi: inclusive bounds for numbers (None: unbounded).
    per_model: one setting per (non-base) model instead of one shared value.
    yaml: the YAML / mergekit name when it differs from the Python keyword.
    api: the Python tree function's keyword when it differs (`weights`).
    choices: the accepted values of a non-numeric parameter.
    yaml_required: required in YAML (mergekit) although Python has a default.
    positional: the tree function takes it positionally after the models.
    doc: one line for docstrings and `--help`.
  """
  default: Any = REQUIRED
  lo: float | None = None
  hi: float | None = None
  per_model: bool = False
  yaml: str | None = None
  api: str | None = None
  choices: tuple = ()
  yaml_required: bool = False
  positional: bool = False
  none_ok: bool = False
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class Param:
  """A method's parameter as the registry knows it (built from a `P` and a type)."""
  name: str          # the per-tensor function's keyword
  kind: type         # float | int | bool | str | object (choices)
  default: Any
  lo: float | None
  hi: float | None
  per_model: bool
  yaml: str
  api: str
  choices: tuple
  yaml_required: bool
  positional: bool
  none_ok: bool
  doc: str

  @property
  def required(self) -> bool:
    return self.default is REQUIRED

  def describe(self) -> str:
    """`density: float in [0, 1], per model, default 1.0`."""
    if self.choices:
      t = "one of " + ", ".join(repr(c) for c in self.choices)
    else:
      t = self.kind.__name__
    if self.lo is not None and self.hi is not None:
      t += f" in [{self.lo:g}, {self.hi:g}]"
    elif self.lo is not None:
      t += f" >= {self.lo:g}"
    elif self.hi is not None:
      t += f" <= {self.hi:g}"
    scope = ", per model" if self.per_model else ""
    d = "required" if self.required else f"default {self.default!r}"
    return f"{self.yaml}: {t}{scope}, {d}"

  def check(self, v, where: str):
    """`v` as this parameter's type, or a TypeError / ValueError naming `where`,
    the parameter, the value (cut short) and what was expected."""
    name = f"parameter {self.yaml!r}"
    if v is None and (self.none_ok or self.default is None):
      return None
    if self.choices:
      for c in self.choices:
        if v == c and type(v) is type(c):
          return v
      raise ValueError(f"{where}: {name} must be one of {list(self.choices)}, got {short(v)}")
    if self.kind is bool:
      if isinstance(v, (bool, np.bool_)):
        return bool(v)
      raise TypeError(f"{where}: {name} must be true or false, got {short(v)}")
    if self.kind is str:
      if isinstance(v, str):
        return v
      raise TypeError(f"{where}: {name} must be a string, got {short(v)}")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
      if isinstance(v, np.ndarray) and v.ndim == 0 and np.issubdtype(v.dtype, np.number):
        v = v.item()
      else:
        raise TypeError(f"{where}: {name} must be a finite number, got "
                        f"{type(v).__name__} {short(v)}")
    try:
      v = float(v)
    except OverflowError:
      raise ValueError(f"{where}: {name} must be a finite number, got {short(v, 40)}") from None
    if not math.isfinite(v):
      raise ValueError(f"{where}: {name} must be a finite number, got {v}")
    if self.kind is int:
      if v != int(v):
        raise ValueError(f"{where}: {name} must be an integer, got {v}")
      v = int(v)
    lo, hi = self.lo, self.hi
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      rng = (f"[{lo:g}, {hi:g}]" if lo is not None and hi is not None
             else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
      raise ValueError(f"{where}: {name} must be {'in ' if '[' in rng else ''}{rng}, got {v:g}")
    return v


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: one per-tensor function, its parameters and input contract.

  `fn` is the Python tree function (`mg.<name>`), `tensor` the per-tensor function
  the command line calls; `params` maps each parameter's name to its `Param`.
  """
  name: str
  tensor: Callable
  params: dict
  reference: str
  base: str                 # "required" | "optional" | "none"
  min_models: int           # non-base models
  max_models: int | None
  inputs: tuple             # the tree function's positional inputs
  random: bool = False
  notes: str = ""
  summary: str = ""
  check: Callable | None = None    # check(values: dict, n_models, where) on resolved values
  fn: Callable | None = None
  # mergekit's arithmetic in the inputs' dtype (`arithmetic="mergekit"`): "float32" when
  # mergekit computes this method in float32 too (our default path is its arithmetic),
  # a numpy per-tensor function (same keywords as `tensor`) that rounds to the dtype
  # after each operation as torch does, or None (not reproduced: an error)
  mergekit: Any = None

  def __contains__(self, name):
    return name in self.params

  @property
  def shared(self) -> dict:
    return {k: p for k, p in self.params.items() if not p.per_model}

  @property
  def per_model(self) -> dict:
    return {k: p for k, p in self.params.items() if p.per_model}

  def by_yaml(self) -> dict:
    return {p.yaml: p for p in self.params.values()}

  def accepted(self) -> str:
    return "; ".join(p.describe() for p in self.params.values()) or "(none)"

  def unknown(self, names, where: str, exc=ValueError):
    """Raise `exc` for parameter names this method does not take, listing its own."""
    known = set(self.by_yaml()) | {p.api for p in self.params.values()} | set(self.params)
    bad = sorted(str(n) for n in names if n not in known)
    if bad:
      import difflib
      hint = ""
      for b in bad[:3]:
        close = difflib.get_close_matches(b, sorted(self.by_yaml()), 1)
        if close:
          hint += f" (did you mean {close[0]!r} for {short(b, 30)}?)"
      raise exc(f"{where}: unknown parameter(s) {short(bad)} for merge method {self.name!r}"
                f"{hint}; its parameters: {self.accepted()}")

  def count_models(self, n: int, where: str):
    lo, hi = self.min_models, self.max_models
    if n < lo or (hi is not None and n > hi):
      want = (f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None
              else f"{lo} to {hi}")
      extra = " besides the base" if self.base != "none" else ""
      raise ValueError(f"{where}: {self.name} takes {want} models{extra}, got {n}")

  def check_arithmetic(self, arithmetic: str, where: str = ""):
    if arithmetic not in ARITHMETIC:
      raise ValueError(f"{where}: arithmetic must be one of {list(ARITHMETIC)}, got "
                       f"{short(arithmetic)}")
    if arithmetic == "mergekit" and self.mergekit is None:
      ok = sorted(k for k, m in METHODS.items() if m.mergekit is not None)
      raise ValueError(f"{where}: arithmetic 'mergekit' is not reproduced for {self.name!r} "
                       f"(it is for: {', '.join(ok)})")

  def run(self, base, models, values: dict, key=None, where: str = "",
          arithmetic: str = "float32"):
    """Check resolved values (`check`) and merge one tensor (`arithmetic`: "float32",
    or "mergekit": numpy on the host, rounding as mergekit does in the dtype)."""
    if self.check is not None:
      self.check(values, len(models), where)
    kw = dict(values)
    if self.random:
      kw["key"] = key
    fn = self.tensor
    if arithmetic != "float32":
      self.check_arithmetic(arithmetic, where)
      if callable(self.mergekit):
        fn = self.mergekit
        base = None if base is None else _host(base, where)
        models = [_host(x, where) for x in models]
    try:
      return fn(base, tuple(models), **kw)
    except ValueError as e:
      raise ValueError(f"{where}: {e}" if where else str(e)) from None


METHODS: dict[str, Method] = {}
ARITHMETIC = ("float32", "mergekit")


def _host(x, where):
  import jax
  if isinstance(x, jax.core.Tracer):
    raise TypeError(f"{where}: arithmetic='mergekit' runs in numpy on the host; call it "
                    "outside jax.jit")
  return np.asarray(x)


def register(m: Method) -> Method:
  """Add a method to `METHODS` (an error when the name is taken)."""
  if not isinstance(m, Method):
    raise TypeError(f"register takes a Method, got {type(m).__name__}")
  if m.name in METHODS:
    raise ValueError(f"merge method {m.name!r} is already registered")
  if m.fn is None:
    m = dataclasses.replace(m, fn=tree_function(m))
  METHODS[m.name] = m
  return m


def params_of(fn: Callable) -> dict:
  """The `Param`s declared by `fn`'s keyword-only arguments."""
  sig = inspect.signature(fn)
  hints = typing.get_type_hints(fn)
  out = {}
  for name, prm in sig.parameters.items():
    if prm.kind is not inspect.Parameter.KEYWORD_ONLY or name == "key":
      continue
    d = prm.default
    if not isinstance(d, P):
      d = P(d)
    kind = hints.get(name, float)
    if typing.get_origin(kind) is typing.Union:      # `float | None` -> float
      kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind not in (float, int, bool, str):
      kind = object
    out[name] = Param(name, kind, d.default, d.lo, d.hi, d.per_model, d.yaml or name,
                      d.api or name, tuple(d.choices), d.yaml_required, d.positional,
                      d.none_ok, d.doc)
  return out


def method(name: str, *, reference: str, base: str, models=(1, None), inputs=None,
           random: bool = False, notes: str = "", check: Callable | None = None,
           params: dict | None = None, mergekit=None):
  """Register the decorated per-tensor function as merge method `name`.

  Args:
    reference: a URL (paper or implementation).
    base: "required", "optional" or "none" (the method takes no base model).
    models: `(min, max)` number of non-base models (`max` None: unbounded), or one int.
    inputs: the tree function's positional inputs, e.g. `("models", "base")` or
      `("a", "b")` (a pair: base first); default from `base`.
    random: the function takes `key` (one PRNG key per model).
    check: `check(values, n_models, where)`, a host check across parameters.
    mergekit: how `arithmetic="mergekit"` runs (see `Method.mergekit`).
  Returns:
    The registered `Method`.
  """
  if isinstance(models, int):
    models = (models, models)
  if inputs is None:
    inputs = {"required": ("models", "base"), "optional": ("models", "base=None"),
              "none": ("models",)}[base]

  def deco(fn):
    doc = inspect.getdoc(fn) or ""
    m = Method(name, fn, params if params is not None else params_of(fn), reference, base,
               models[0], models[1], tuple(inputs), random, notes,
               doc.split("\n\n")[0].replace("\n", " "), check, mergekit=mergekit)
    return register(m)

  return deco


# ----------------------------------------------------------------------------
# the tree functions

def _check_models(models, what: str):
  if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, (list, tuple)):
    raise TypeError(f"{what}: models must be a list of pytrees, got {type(models).__name__}")


def _per_model(p: Param, setting, n: int, where: str):
  """Split a per-model setting into `n` settings."""
  if isinstance(setting, PerModel):
    if not isinstance(setting.values, (list, tuple)):
      raise TypeError(f"{where}: parameter {p.yaml!r}: PerModel takes a list with one setting "
                      f"per model, got {short(setting.values)}")
    vals = list(setting.values)
    if len(vals) != n:
      raise ValueError(f"{where}: parameter {p.yaml!r}: PerModel has {len(vals)} values for "
                       f"{n} models")
    return vals
  if p.api == "weights" and setting is not None and setting is not _ABSENT:   # one per model
    if not isinstance(setting, (list, tuple)):
      raise TypeError(f"{where}: weights must be a sequence with one setting per model, got "
                      f"{short(setting)}")
    if len(setting) != n:
      raise ValueError(f"{where}: weights: {len(setting)} values for {n} models")
    return list(setting)
  return [setting] * n


def _eager_check(p: Param, setting, where: str, depth: int = 0):
  """Check every plain value inside a setting (lists, mappings, conditions) now, on
  the host; which value a tensor gets is checked again per tensor, named by path."""
  if setting is None or setting is _ABSENT:
    return
  if depth > 8:
    raise ValueError(f"{where}: parameter {p.yaml!r} nests deeper than 8 levels")
  if isinstance(setting, PerModel):
    if not isinstance(setting.values, (list, tuple)):
      raise TypeError(f"{where}: parameter {p.yaml!r}: PerModel takes a list with one setting "
                      f"per model, got {short(setting.values)}")
    vals = setting.values
  elif isinstance(setting, Conditions):
    vals = [v for _, v in setting.items]
  elif isinstance(setting, Mapping):
    for k in setting:
      if not isinstance(k, str):
        raise TypeError(f"{where}: parameter {p.yaml!r}: mapping keys must be path regexes "
                        f"(strings), got {short(k)}")
    for k, v in setting.items():
      _eager_check(p, v, f"{where}: {p.yaml}[{short(k, 40)}]", depth + 1)
    return
  elif isinstance(setting, (list, tuple)):
    vals = setting
  else:
    p.check(_concrete(setting), where)
    return
  for v in vals:
    _eager_check(p, v, where, depth + 1)


def _concrete(v):
  if hasattr(v, "shape") and getattr(v, "shape", None) == () and not isinstance(v, np.ndarray):
    try:
      return np.asarray(v).item()
    except Exception:  # noqa: BLE001  (a tracer: let resolve() report it)
      return v
  return v


def _value(p: Param, setting, path: str, t: float):
  if setting is _ABSENT or (setting is None and not p.none_ok):
    return p.default
  if setting is None:
    return None
  if p.required:
    return resolve(setting, path, t, p.yaml)     # "no value for this tensor" if unmatched
  return resolve(setting, path, t, p.yaml, p.default)


def _check_key(key, where):
  """One PRNG key: a typed `jax.random.key(seed)` or a raw `(2,)` uint32 key."""
  import jax
  dt, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", (None,)))
  if dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
    ok = shape == ()
  else:
    ok = dt is not None and np.dtype(dt) == np.uint32 and shape == (2,)
  if not ok:
    raise TypeError(f"{where}: key must be one PRNG key (jax.random.key(seed)), got "
                    f"{type(key).__name__} {short(key)}")


def resolve_values(m: Method, settings: dict, path: str, t: float, n: int, where: str):
  """Each parameter's value for one tensor: shared -> scalar, per model -> (N,) array."""
  out = {}
  for k, p in m.params.items():
    s = settings[k]
    if p.per_model:
      vals = []
      for i, si in enumerate(s):
        v = _value(p, si, path, t)
        vals.append(p.check(_concrete(v), where + (f" (models[{i}])" if n > 1 else "")))
      if p.kind in (float, int):
        out[k] = (None if any(v is None for v in vals) else np.asarray(vals, np.float32))
      else:
        out[k] = vals
    else:
      v = _value(p, s, path, t)
      out[k] = p.check(_concrete(v), where)
  return out


def merge_trees(m: Method, models, base, params: dict, key=None, *, where=None,
                arithmetic="float32"):
  """Merge pytrees with method `m`; `params` keyed by Python or YAML names."""
  from merging._methods import _leaf_keys, _map
  where = where or m.name
  m.check_arithmetic(arithmetic, where)
  _check_models(models, where)
  models = list(models)
  n = len(models)
  m.count_models(n, where)
  if m.base == "required" and base is None:
    raise ValueError(f"{where}: {m.name} needs a base model: pass base=")
  if m.base == "none" and base is not None:
    raise ValueError(f"{where}: {m.name} takes no base model; pass every model in `models`")
  if m.random and key is None:
    raise ValueError(f"{where}: {m.name} drops entries at random: pass "
                     "key=jax.random.key(seed)")
  if m.random:
    _check_key(key, where)
  names = {}
  for k, p in m.params.items():
    for alias in {k, p.yaml, p.api}:
      names[alias] = k
  m.unknown(params, where, TypeError)
  settings = {}
  for given, v in params.items():
    k = names[given]
    if k in settings:
      raise TypeError(f"{where}: parameter {m.params[k].yaml!r} given twice (as {given!r})")
    settings[k] = v
  for k, p in m.params.items():
    s = settings.get(k, _ABSENT)
    if (s is None or s is _ABSENT) and p.required:
      raise TypeError(f"{where}: missing required parameter {p.api!r}")
    _eager_check(p, s, where)
    settings[k] = _per_model(p, s, n, where) if p.per_model else s
  trees = ([base] if base is not None else []) + models
  tnames = (["base"] if base is not None else []) + [f"models[{i}]" for i in range(n)]
  nb = 1 if base is not None else 0

  def leaf(j, path, t, leaves):
    values = resolve_values(m, settings, path, t, n, path)
    keys = _leaf_keys(key, j, n) if m.random else None
    b = leaves[0] if nb else None
    return m.run(b, leaves[nb:], values, keys, path, arithmetic)

  return _map(trees, tnames, leaf)


def tree_function(m: Method) -> Callable:
  """The public tree function of `m`, with a real signature built from the registry."""
  Prm = inspect.Parameter
  sig_params = []
  for name in m.inputs:
    nm, _, dflt = name.partition("=")
    sig_params.append(Prm(nm, Prm.POSITIONAL_OR_KEYWORD,
                          default=None if dflt == "None" else Prm.empty))
  pos = [p for p in m.params.values() if p.positional or p.api == "weights"]
  pos.sort(key=lambda p: p.api != "weights")
  for p in pos:
    sig_params.append(Prm(p.api, Prm.POSITIONAL_OR_KEYWORD,
                          default=None if p.api == "weights" or not p.required else Prm.empty))
  for p in m.params.values():
    if p not in pos:
      sig_params.append(Prm(p.api, Prm.KEYWORD_ONLY, default=p.default))
  if m.random:
    sig_params.append(Prm("key", Prm.KEYWORD_ONLY, default=None))
  sig_params.append(Prm("arithmetic", Prm.KEYWORD_ONLY, default="float32"))
  sig = inspect.Signature(sig_params)
  pair = m.inputs[0] not in ("models", "model")
  single = m.inputs[0] == "model"
  api_names = {p.api for p in m.params.values()}

  def fn(*args, **kwargs):
    aliases = {p.yaml: p.api for p in m.params.values() if p.yaml != p.api}
    for y, a in aliases.items():    # YAML names as keywords: `**{"lambda": 0.5}`
      if y in kwargs and y not in api_names:
        if a in kwargs:
          raise TypeError(f"{m.name}: parameter {y!r} given twice (as {y!r} and {a!r})")
        kwargs[a] = kwargs.pop(y)
    inputs = {nm.partition("=")[0] for nm in m.inputs}
    extra = [k for k in kwargs if k not in api_names and k not in inputs
             and k not in ("key", "arithmetic")]
    if extra:
      m.unknown(extra, m.name, TypeError)
    try:
      ba = sig.bind(*args, **kwargs)
    except TypeError as e:
      raise TypeError(f"{m.name}{sig}: {e}") from None
    ba.apply_defaults()
    a = dict(ba.arguments)
    key = a.pop("key", None)
    arithmetic = a.pop("arithmetic")
    if pair:
      b0, m0 = (a.pop(nm.partition("=")[0]) for nm in m.inputs)
      models, base = [m0], b0
    elif single:
      models, base = [a.pop("model")], None
    else:
      models, base = a.pop("models"), a.pop("base", None)
    given = {k: v for k, v in a.items()}
    return merge_trees(m, models, base, given, key, arithmetic=arithmetic)

  fn.__name__ = fn.__qualname__ = m.name
  fn.__signature__ = sig
  fn.__doc__ = _docstring(m)
  fn.__module__ = "merging"
  return fn


def _docstring(m: Method) -> str:
  doc = inspect.getdoc(m.tensor) or m.name
  lines = [doc, "", "Parameters (value, `{path regex: value}`, or a gradient list over layers;",
           "per-model ones one per model, `weights=[...]` or `mg.PerModel([...])`):"]
  for p in m.params.values():
    lines.append(f"  {p.describe()}" + (f": {p.doc}" if p.doc else ""))
  lines += ["", f"Base: {m.base}; models: {m.min_models}"
            + ("" if m.max_models == m.min_models else
               " or more" if m.max_models is None else f" to {m.max_models}"),
            f"Reference: {m.reference}"]
  if m.notes:
    lines.append(f"Notes: {m.notes}")
  return "\n".join(lines)


def merge(method_name: str, models, base=None, *, key=None, arithmetic="float32", **params):
  """Run a registered method by name: `merge("ties", [m1, m2], base, weights=...)`.

  `arithmetic="mergekit"` reproduces mergekit's rounding in the leaves' dtype
  (bf16/fp16) instead of computing in float32 and rounding once (host numpy; not
  under `jit`; for the methods whose `Method.mergekit` is set).

  `models` are the non-base models (a list of pytrees sharing `base`'s structure);
  parameters by their Python or YAML names. Raises ValueError for an unknown
  method, a wrong number of models or a missing base, TypeError for an unknown
  parameter (the message lists the method's parameters).
  """
  if not isinstance(method_name, str) or method_name not in METHODS:
    raise ValueError(f"unknown merge method {short(method_name)}; known methods: "
                     f"{', '.join(sorted(METHODS))}")
  m = METHODS[method_name]
  if key is not None and not m.random:
    raise TypeError(f"{method_name}: key= is only for random methods (it is deterministic)")
  return merge_trees(m, models, base, params, key, arithmetic=arithmetic)


def method_table() -> str:
  """The README's table of merge methods, generated from the registry."""
  rows = ["| method | what it does | parameters (YAML names) | base, models | reference |",
          "|---|---|---|---|---|"]
  for name in sorted(METHODS):
    m = METHODS[name]
    ps = ", ".join(f"`{p.yaml}`" for p in m.params.values()) or "-"
    n = (f"{m.min_models}" if m.max_models == m.min_models else
         f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
    rows.append(f"| `{name}` | {m.summary.rstrip('.')} | {ps} | {m.base}, {n} | "
                f"{m.reference} |")
  return "\n".join(rows)


__all__ = ["P", "Param", "Method", "METHODS", "REQUIRED", "register", "method", "merge",
           "merge_trees", "tree_function", "method_table", "params_of", "short", "ARITHMETIC"]
