"""`lora-jax merge CONFIG.yml OUT_DIR`: mergekit-style YAML merges of safetensors checkpoints.

Reads mergekit's YAML (`models` or `slices`, `merge_method`, `base_model`,
`parameters` at top level, per slice and per model, `dtype`, `out_dtype`;
`tokenizer_source`/`tokenizer` are ignored with a warning) and Hugging Face
checkpoints (`model.safetensors`, or shards with `model.safetensors.index.json`),
validates everything up front, then merges tensor by tensor: at most one tensor of
each input model is in memory at a time. Output: sharded safetensors with an index
(a single `model.safetensors` when it fits one shard), the base's `config.json`
(with `num_hidden_layers` updated) and its tokenizer files, written into a
temporary directory that is renamed to OUT_DIR.

Everything about a method comes from the registry (`merging._registry`): its
parameters (names, defaults, ranges, per-model or shared), base policy and number
of models; `run_task` calls the registered per-tensor function. Unknown keys at any
level of the config and unknown parameters are errors listing the accepted ones.
The YAML is read with a bounded loader (`merging._yaml`: alias bombs, deep
nesting and huge files are refused). Several YAML documents are run as
mergekit-multi runs them: named documents go to `--intermediate-dir/NAME`, later
documents refer to them by name, the unnamed one goes to OUT_DIR.

mergekit-yaml's options are accepted (`--out-shard-size`, `--random-seed`,
`--copy-tokenizer/--no-copy-tokenizer`, ...; those that change nothing here say so
in `--help`; `--trust-remote-code` never executes code). `--mergekit-arithmetic`
(or `arithmetic: mergekit`) computes in the config's dtype as mergekit does,
instead of float32 with one rounding.

Layer tensors are those named `...layers.{i}.rest`; other tensors whose name
contains "embed" come from the first slice's models, the rest (final norm, head)
from the last slice's, as in mergekit. Gradients over layers use mergekit's `t`:
`i / (n - 1)` within each output slice, 0 for non-layer tensors.

Exit status: 0, or 2 with one line on stderr for bad input, an output path that
cannot be written (naming it), a full disk or exhausted memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings

import numpy as np

from lora_jax import checkpoint
from lora_jax import checkpoint as _st   # the file-format names plan / run_task use
from merging._params import from_yaml, resolve
from merging._registry import short

LAYER_RX = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")

DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32", "float16": "F16", "fp16": "F16",
    "half": "F16", "bfloat16": "BF16", "bf16": "BF16", "float64": "F64",
}
HF_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

_REQ = object()


def method_spec(name):
  """The registry entry (`merging._registry.Method`) of a YAML `merge_method`."""
  from merging._registry import METHODS, short
  if not isinstance(name, str) or name not in METHODS:
    raise ValueError(f"unknown merge_method {short(name)}; known methods: "
                     f"{', '.join(sorted(METHODS))}")
  return METHODS[name]


# ----------------------------------------------------------------------------
# models

@dataclasses.dataclass
class Model:
  ref: str
  path: str
  config: dict
  tensors: dict          # name -> checkpoint.TensorInfo | checkpoint.AdaptedTensor
  num_layers: int
  layer_names: dict      # layer index -> {suffix: name}
  prefix: str | None


# A base tensor seen through a PEFT adapter (mergekit's `model+lora` reference).
AdaptedTensor = checkpoint.AdaptedTensor


def read(info) -> np.ndarray:
  """A tensor's data, through its adapter when it has one."""
  return checkpoint.read_any(info)


def open_model(ref: str) -> Model:
  """A checkpoint (`checkpoint.open_checkpoint`: headers validated, files inside the
  directory only) with its layer structure read from the tensor names."""
  ck = checkpoint.open_checkpoint(ref)
  layer_names: dict[int, dict[str, str]] = {}
  prefix = None
  for name in ck.tensors:
    m = LAYER_RX.match(name)
    if m:
      prefix = prefix or m.group(1)
      layer_names.setdefault(int(m.group(2)), {})[m.group(3)] = name
  n = ck.config.get("num_hidden_layers")
  if n is None:
    n = (max(layer_names) + 1) if layer_names else 0
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"{os.path.join(ck.path, 'config.json')}: num_hidden_layers must be a "
                     f"non-negative integer, got {n!r}")
  return Model(ck.ref, ck.path, ck.config, ck.tensors, n, layer_names, prefix)


# ----------------------------------------------------------------------------
# plan

@dataclasses.dataclass
class Source:
  model: str
  layer_range: tuple | None
  params: dict | None


@dataclasses.dataclass
class OutSlice:
  sources: list
  base_model: str | None
  params: dict | None


@dataclasses.dataclass
class Task:
  name: str                 # output tensor name
  inputs: list              # [(model ref, TensorInfo)]
  base_index: int | None
  shared: dict
  per_model: list           # one dict per input (empty dict for the base)
  out_code: str
  in_code: str | None       # `dtype` of the config: inputs are cast to it first
  index: int = 0
  arithmetic: str = "float32"   # or "mergekit": computed in the config's dtype


@dataclasses.dataclass
class Plan:
  method: str
  tasks: list
  models: dict
  config_from: str
  num_layers: int
  out_code: str | None


def _params_of(d, where, method=None):
  """A YAML `parameters` mapping as our settings; unknown names are errors."""
  if d is None:
    return None
  if not isinstance(d, dict):
    raise ValueError(f"{where}: parameters must be a mapping, got {short(d)}")
  if method is not None:
    method.unknown(d, where, ValueError)
  out = {}
  for k, v in d.items():
    try:
      out[k] = from_yaml(v)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}.{k}: {e}") from None
  return out


def _resolve_param(name, scopes, tensor_name, t, default, where):
  for scope in scopes:
    if scope and name in scope:
      try:
        v = resolve(scope[name], tensor_name, t, name, None)
      except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
      if v is not None:
        return v
  if default is _REQ:
    raise ValueError(f"{where}: missing required parameter {name!r} for tensor {tensor_name}")
  return default


def _check_value(p, v, where):
  """A resolved YAML value checked by the registry's `Param.check` (one place for the
  ranges of the Python API and the command line). Numbers written as strings
  (`"1e-5"`, as mergekit's pydantic reads them) are numbers."""
  if isinstance(v, str) and p.kind in (float, int) and not p.choices:
    try:
      v = float(v)
    except ValueError:
      raise ValueError(f"{where}: parameter {p.yaml!r} must be a number, got {short(v)}") from None
  try:
    return p.check(v, where)
  except TypeError as e:
    raise ValueError(str(e)) from None


def _keys(d, where, allowed, required=()):
  if not isinstance(d, dict):
    raise ValueError(f"{where} must be a mapping with {sorted(required) or sorted(allowed)}, "
                     f"got {short(d)}")
  bad = sorted(str(k) for k in d if k not in allowed)
  if bad:
    raise ValueError(f"{where}: unknown key(s) {short(bad)}; accepted keys: {sorted(allowed)}")
  missing = [k for k in required if k not in d]
  if missing:
    raise ValueError(f"{where}: missing key(s) {missing}")


_TOP_KEYS = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "modules", "name", "arithmetic"}
_MODEL_KEYS = {"model", "parameters"}
_SLICE_KEYS = {"sources", "base_model", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
from merging._registry import ARITHMETIC  # noqa: E402  ("float32", "mergekit")


def _parse_config(cfg):
  """Check the config's shape: every key known, every value of the expected kind."""
  if not isinstance(cfg, dict):
    raise ValueError(f"the config must be a YAML mapping, got {type(cfg).__name__}")
  _keys(cfg, "config", _TOP_KEYS, ("merge_method",))
  method_spec(cfg["merge_method"])
  for k in ("base_model", "dtype", "out_dtype", "chat_template"):
    if cfg.get(k) is not None and not isinstance(cfg[k], str):
      raise ValueError(f"{k} must be a string, got {short(cfg[k])}")
  if cfg.get("arithmetic") is not None and cfg["arithmetic"] not in ARITHMETIC:
    raise ValueError(f"arithmetic must be one of {list(ARITHMETIC)}, got "
                     f"{short(cfg['arithmetic'])}")
  for k in ("tokenizer_source", "tokenizer", "chat_template"):
    if cfg.get(k) is not None:
      warnings.warn(f"lora-jax merge: {k!r} is ignored (the base model's tokenizer files are "
                    "copied as they are)", stacklevel=2)
  if cfg.get("modules"):
    raise ValueError("'modules' configs are not supported; use 'models' or 'slices'")
  if bool(cfg.get("models")) == bool(cfg.get("slices")):
    raise ValueError("the config needs exactly one of 'models' or 'slices'")
  for k in ("models", "slices"):
    if cfg.get(k) is not None and not isinstance(cfg[k], list):
      raise ValueError(f"{k} must be a list, got {short(cfg[k])}")
  for i, m in enumerate(cfg.get("models") or []):
    _keys(m, f"models[{i}]", _MODEL_KEYS, ("model",))
  for i, sl in enumerate(cfg.get("slices") or []):
    if isinstance(sl, dict) and "residual_weight" in sl:
      raise ValueError(f"slices[{i}]: residual_weight is not supported")
    _keys(sl, f"slices[{i}]", _SLICE_KEYS, ("sources",))
    if not isinstance(sl["sources"], list) or not sl["sources"]:
      raise ValueError(f"slices[{i}].sources must be a non-empty list, got {short(sl['sources'])}")
    for j, src in enumerate(sl["sources"]):
      _keys(src, f"slices[{i}].sources[{j}]", _SOURCE_KEYS, ("model", "layer_range"))


def _count_error(m, n, nb, refs, base_index):
  """The model-count error in mergekit's terms (inputs with the base, when required)."""
  if m.base == "required":
    lo, hi = m.min_models + 1, (None if m.max_models is None else m.max_models + 1)
    want = f"{lo}" + ("" if hi == lo else (f" to {hi}" if hi else " or more"))
    return f"{m.name} takes {want} input models (base included), got {n}: {short(refs, 300)}"
  lo, hi = m.min_models, m.max_models
  want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
  extra = " besides the base" if base_index is not None or m.base == "optional" else ""
  return f"{m.name} takes {want} models{extra}, got {nb}: {short(refs, 300)}"


def plan(cfg: dict, models: dict | None = None) -> Plan:
  """Validate a parsed YAML config against the checkpoints; build the tensor plan."""
  _parse_config(cfg)
  method = cfg["merge_method"]
  m = method_spec(method)
  shared_spec = {p.yaml: p for p in m.shared.values()}
  per_spec = {p.yaml: p for p in m.per_model.values()}
  top = _params_of(cfg.get("parameters"), "parameters", m)
  base_ref = cfg.get("base_model")
  models = {} if models is None else models

  def get(ref, where):
    if not isinstance(ref, str) or not ref:
      raise ValueError(f"{where}: a model reference must be a path string, got {short(ref)}")
    if ref not in models:
      models[ref] = open_model(ref)
    return models[ref]

  slices: list[OutSlice] = []
  if cfg.get("models"):
    srcs = []
    for i, md in enumerate(cfg["models"]):
      mod = get(md["model"], f"models[{i}].model")
      srcs.append(Source(md["model"], (0, mod.num_layers),
                         _params_of(md.get("parameters"), f"models[{i}].parameters", m)))
    if base_ref and base_ref not in [s.model for s in srcs]:
      srcs.append(Source(base_ref, (0, get(base_ref, "base_model").num_layers), None))
    slices.append(OutSlice(srcs, None, None))
  else:
    for i, s in enumerate(cfg["slices"]):
      srcs = []
      for j, src in enumerate(s["sources"]):
        where = f"slices[{i}].sources[{j}]"
        lr = src["layer_range"]
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
          raise ValueError(f"{where}: layer_range must be [start, end], got {short(lr)}")
        mod = get(src["model"], f"{where}.model")
        if not 0 <= lr[0] < lr[1] <= mod.num_layers:
          raise ValueError(f"{where}: layer_range {list(lr)} is outside the {mod.num_layers} "
                           f"layers of {src['model']}")
        srcs.append(Source(src["model"], tuple(lr),
                           _params_of(src.get("parameters"), f"{where}.parameters", m)))
      lens = {s2.layer_range[1] - s2.layer_range[0] for s2 in srcs}
      if len(lens) != 1:
        raise ValueError(f"slices[{i}]: all sources must span the same number of layers, got "
                         f"{[list(s2.layer_range) for s2 in srcs]}")
      if s.get("base_model") is not None:
        get(s["base_model"], f"slices[{i}].base_model")
      slices.append(OutSlice(srcs, s.get("base_model"),
                             _params_of(s.get("parameters"), f"slices[{i}].parameters", m)))
  if base_ref:
    get(base_ref, "base_model")

  dtype_name = cfg.get("dtype")
  out_name = cfg.get("out_dtype")
  for k, v in (("dtype", dtype_name), ("out_dtype", out_name)):
    if v is not None and v not in DTYPE_NAMES:
      raise ValueError(f"{k}: unknown dtype {short(v)}; expected one of {sorted(DTYPE_NAMES)}")
  in_code = DTYPE_NAMES.get(dtype_name) if dtype_name else None
  out_code = DTYPE_NAMES.get(out_name) if out_name else in_code

  tasks: list[Task] = []
  seen: set[str] = set()

  def add(out_tensor, sl: OutSlice, names, t):
    if out_tensor in seen:
      raise ValueError(f"output tensor {out_tensor} is produced twice")
    seen.add(out_tensor)
    refs = [s.model for s in sl.sources]
    base = sl.base_model or base_ref
    base_index = refs.index(base) if (base and base in refs and m.base != "none") else None
    if m.base == "required" and base_index is None:
      raise ValueError(f"{method} needs a base_model among the inputs of {out_tensor}; "
                       f"inputs: {short(refs, 300)}")
    n = len(refs)
    nb = n - (base_index is not None)
    if nb < m.min_models or (m.max_models is not None and nb > m.max_models):
      raise ValueError(_count_error(m, n, nb, refs, base_index))
    inputs = []
    for ref, name in zip(refs, names):
      mod = models[ref]
      if name not in mod.tensors:
        have = [r for r, nm in zip(refs, names) if nm in models[r].tensors]
        raise ValueError(f"tensor {name} is missing in model {ref} (present in {have})")
      inputs.append((ref, mod.tensors[name]))
    shapes = {ref: info.shape for ref, info in inputs}
    if len(set(shapes.values())) != 1:
      desc = ", ".join(f"{r}: {list(s)}" for r, s in shapes.items())
      raise ValueError(f"tensor {out_tensor}: shapes differ between models ({desc})")
    where = f"tensor {out_tensor}"
    shared = {}
    for y, p in shared_spec.items():
      d = _REQ if p.required or p.yaml_required else p.default
      shared[y] = _check_value(p, _resolve_param(y, [sl.params, top], out_tensor, t, d, where),
                               where)
    per = []
    for k, (src, (ref, info)) in enumerate(zip(sl.sources, inputs)):
      if k == base_index:
        per.append({})
        continue
      w2 = f"{where} (model {ref})"
      per.append({y: _check_value(p, _resolve_param(y, [src.params, sl.params, top], info.name,
                                                    t, _REQ if p.required or p.yaml_required
                                                    else p.default, w2), w2)
                  for y, p in per_spec.items()})
    if m.check is not None:
      m.check(_values(m, shared, [d for k, d in enumerate(per) if k != base_index]), nb, where)
    first = inputs[base_index if base_index is not None else 0][1]
    # integer tensors are copied unchanged; float ones go to out_dtype / dtype
    oc = (out_code or first.dtype) if first.dtype in HF_DTYPE else first.dtype
    tasks.append(Task(out_tensor, inputs, base_index, shared, per, oc, in_code, len(tasks)))

  def non_layer(sl):   # ordered union over the slice's sources, so gaps are errors
    names = {}
    for s in sl.sources:
      names.update((n, None) for n in models[s.model].tensors if not LAYER_RX.match(n))
    return list(names)

  first_src = slices[0].sources[0].model
  pre = [n for n in non_layer(slices[0]) if "embed" in n]
  post = [n for n in non_layer(slices[-1]) if "embed" not in n]
  for name in pre:
    add(name, slices[0], [name] * len(slices[0].sources), 0.0)
  out_layer = 0
  for i, sl in enumerate(slices):
    n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    for idx in range(n):
      t = idx / (n - 1) if n > 1 else 1.0
      s0 = sl.sources[0]
      m0 = models[s0.model]
      suffixes = {}
      for s in sl.sources:
        suffixes.update((k, None) for k in
                        models[s.model].layer_names.get(s.layer_range[0] + idx, {}))
      if not suffixes:
        raise ValueError(f"model {s0.model} has no tensors for layer {s0.layer_range[0] + idx}")
      for suffix in suffixes:
        names = []
        for s in sl.sources:
          mm = models[s.model]
          names.append(f"{mm.prefix or m0.prefix}{s.layer_range[0] + idx}.{suffix}")
        add(f"{m0.prefix}{out_layer}.{suffix}", sl, names, t)
      out_layer += 1
  for name in post:
    add(name, slices[-1], [name] * len(slices[-1].sources), 0.0)
  config_from = base_ref or first_src
  return Plan(method, tasks, models, config_from, out_layer, out_code)


def _values(m, shared: dict, per: list) -> dict:
  """The registry function's keyword values from a task's YAML-named parameters:
  shared ones as scalars, per-model ones as `(N,)` float32 arrays (None if unset)."""
  out = {}
  for p in m.params.values():
    if p.per_model:
      vals = [d[p.yaml] for d in per]
      if p.kind in (float, int):
        out[p.name] = None if any(v is None for v in vals) else np.asarray(vals, np.float32)
      else:
        out[p.name] = vals
    else:
      out[p.name] = shared[p.yaml]
  return out


# ----------------------------------------------------------------------------
# execution

def _to_np(info: _st.TensorInfo, in_code):
  x = read(info)
  if in_code and info.dtype in HF_DTYPE and info.dtype != in_code:
    x = x.astype(_st.DTYPES[in_code])
  return x


def run_task(task: Task, method: str, key=None) -> np.ndarray:
  """Merge one tensor with the registered method; a numpy array in the task's output
  dtype. The registry's per-tensor function is called with the task's parameters."""
  import jax.numpy as jnp
  from merging._methods import _leaf_keys

  m = method_spec(method)
  out_dt = _st.DTYPES[task.out_code]
  if task.inputs[0][1].dtype not in HF_DTYPE:
    return _to_np(task.inputs[task.base_index or 0][1], None)
  arrs = []
  for _, info in task.inputs:
    x = _to_np(info, task.in_code)
    arrs.append(jnp.asarray(x))
    del x
  bi = task.base_index
  others = [a for k, a in enumerate(arrs) if k != bi]
  oper = [d for k, d in enumerate(task.per_model) if k != bi]
  keys = _leaf_keys(key, task.index, len(others)) if m.random else None
  r = m.run(None if bi is None else arrs[bi], others, _values(m, task.shared, oper), keys,
            f"tensor {task.name}", task.arithmetic)
  del arrs, others
  out = np.asarray(r)
  if out.dtype != out_dt:
    out = out.astype(out_dt)
  return out


def _parse_size(s) -> int:
  if isinstance(s, int):
    return s
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(s).upper())
  if not m:
    raise ValueError(f"--max-shard-size {s!r}: expected a size like 5GB, 500MB or 1000000")
  mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
  return int(float(m.group(1)) * mult)


def shard_layout(tasks, max_bytes):
  shards, cur, size = [], [], 0
  for t in tasks:
    n = int(np.prod(t.inputs[0][1].shape, dtype=np.int64)) * _st.DTYPES[t.out_code].itemsize
    if cur and size + n > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += n
  if cur:
    shards.append(cur)
  return shards


def describe(p: Plan, shards) -> str:
  lines = [f"merge_method: {p.method}",
           f"inputs: {', '.join(p.models)}",
           f"config.json from: {p.config_from} (num_hidden_layers -> {p.num_layers})",
           f"output tensors: {len(p.tasks)} in {len(shards)} shard(s)",
           f"arithmetic: {p.tasks[0].arithmetic if p.tasks else 'float32'}"]
  for t in p.tasks:
    src = ", ".join(f"{ref}:{info.name}" for ref, info in t.inputs)
    params = {k: v for k, v in t.shared.items()}
    per = [d for d in t.per_model if d]
    lines.append(f"  {t.name} {list(t.inputs[0][1].shape)} {t.out_code} <- {src}"
                 f"  {params} {per if per else ''}".rstrip())
  return "\n".join(lines)


def run(config_path, out_dir: str, *, dry_run=False, seed=0, max_shard_size="5GB",
        overwrite=False, quiet=False, stream=None, copy_tokenizer=True, intermediate_dir=None,
        lazy=True, arithmetic=None) -> Plan:
  """Plan, validate and (unless `dry_run`) execute a merge. Raises ValueError /
  FileNotFoundError before anything is written when the inputs are wrong.

  `config_path`: a YAML file (one document, or several as mergekit-multi: named
  documents are written to `intermediate_dir/NAME` in dependency order, the unnamed
  one to `out_dir`) or an already parsed config mapping. `arithmetic`: "float32"
  (default: compute in float32, round once) or "mergekit" (mergekit's arithmetic
  in the config's `dtype`); overrides the config's `arithmetic:` key.
  `copy_tokenizer`: copy the tokenizer files of the config's base model.
  """
  stream = stream or sys.stdout
  if arithmetic is not None and arithmetic not in ARITHMETIC:
    raise ValueError(f"arithmetic must be one of {list(ARITHMETIC)}, got {short(arithmetic)}")
  if isinstance(config_path, dict):
    cfg = config_path
  else:
    from merging import _yaml
    docs = _yaml.load(config_path)
    if not docs:
      raise ValueError(f"{config_path}: the config file has no YAML document")
    if len(docs) > 1 or (isinstance(docs[0], dict) and "name" in docs[0]):
      steps = _yaml.order(docs, out_dir, intermediate_dir)
      kw = dict(dry_run=dry_run, seed=seed, max_shard_size=max_shard_size, quiet=quiet,
                stream=stream, copy_tokenizer=copy_tokenizer, arithmetic=arithmetic)
      last = None
      for name, cfg, dest in steps:
        if dest != out_dir and lazy and _complete(dest):
          if not quiet:
            print(f"{name}: {dest} exists, skipped (--no-lazy to redo it)", file=stream)
          continue
        if dest != out_dir and not dry_run:
          os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        try:
          last = run(cfg, dest, overwrite=overwrite or dest != out_dir, **kw)
        except (ValueError, TypeError, FileNotFoundError) as e:
          raise type(e)(f"merge {name or 'final'!r}: {e}") from None
        if dry_run and dest != out_dir:
          print(f"(dry run: later merges that read {dest} cannot be planned)", file=stream)
          break
      return last
    cfg = docs[0]
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"output path {out_dir!r} exists and is not a directory")
  p = plan(cfg)
  mode = arithmetic or cfg.get("arithmetic") or "float32"
  method_spec(p.method).check_arithmetic(mode, "arithmetic")
  for t in p.tasks:
    t.arithmetic = mode
  shards = shard_layout(p.tasks, _parse_size(max_shard_size))
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite and not dry_run:
    raise ValueError(f"output directory {out_dir!r} exists and is not empty; pass --overwrite")
  if dry_run:
    print(describe(p, shards), file=stream)
    return p

  import jax
  from tqdm import tqdm
  key = jax.random.key(seed)
  # one directory swap (checkpoint.atomic_directory): a failed or killed run leaves the
  # old OUT_DIR (or none); the next run removes what a killed one left next to it
  with checkpoint.atomic_directory(out_dir) as tmp:
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map, total = {}, 0
    bar = tqdm(total=len(p.tasks), desc=f"merging ({p.method})", unit="tensor", disable=quiet)
    for fname, tasks in zip(names, shards):
      w = checkpoint.ShardWriter(tmp / fname,
                                 [(t.name, t.out_code, t.inputs[0][1].shape) for t in tasks],
                                 {"format": "pt"})
      try:
        for t in tasks:
          w.write(t.name, run_task(t, p.method, key))
          weight_map[t.name] = fname
          bar.update(1)
      finally:
        w.close()
      total += w.size
    bar.close()
    if n > 1:
      checkpoint.write_json(tmp / checkpoint.INDEX,
                            {"metadata": {"total_size": total}, "weight_map": weight_map})
    src = p.models[p.config_from]
    config = dict(src.config)
    if "num_hidden_layers" in config or p.num_layers:
      config["num_hidden_layers"] = p.num_layers
    if p.out_code:
      config["torch_dtype"] = HF_DTYPE[p.out_code]
    checkpoint.write_json(tmp / "config.json", config)
    for fn in (TOKENIZER_FILES if copy_tokenizer else ()):
      try:
        checkpoint.copy_inside(src.path, fn, tmp)
      except ValueError as e:   # a symlink out of the model directory: not followed
        warnings.warn(f"lora-jax merge: tokenizer file not copied: {e}", stacklevel=2)
  if not quiet:
    print(f"wrote {len(p.tasks)} tensors in {len(shards)} shard(s) to {out_dir}", file=stream)
  return p


def _complete(d) -> bool:
  """A finished checkpoint directory (mergekit-multi's `--lazy` test)."""
  return os.path.exists(os.path.join(d, "config.json")) and any(
      os.path.exists(os.path.join(d, f))
      for f in ("model.safetensors", "model.safetensors.index.json"))


def _size_arg(flag, kmb=False):
  """argparse type for a shard size: ours (`5GB`, `500MB`, bytes) or mergekit's
  `--out-shard-size` (`5B` = 5e9 bytes, `500M`, `1000k`; 0 = one shard)."""
  def parse(s):
    s0 = s
    if kmb:
      m = re.fullmatch(r"\s*(\d+)\s*([kKmMbB]?)\s*", s)
      if not m:
        raise argparse.ArgumentTypeError(
            f"{flag} {short(s0)}: expected an integer with an optional k/M/B suffix (mergekit)")
      n = int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
      return n if n > 0 else 2 ** 62
    try:
      n = _parse_size(s)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{flag} {short(s0)}: expected a size like 5GB, 500MB or 1000000") from None
    if n <= 0:
      raise argparse.ArgumentTypeError(f"{flag} {short(s0)}: must be at least 1 byte")
    return n
  return parse


def _int_arg(flag, lo, hi=None):
  def parse(s):
    try:
      v = int(s)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{flag} {short(s)}: expected an integer") from None
    if v < lo or (hi is not None and v > hi):
      rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
      raise argparse.ArgumentTypeError(f"{flag} {v}: must be {rng}")
    return v
  return parse


class _Parser(argparse.ArgumentParser):
  """argparse that raises (so `main` exits 2 with one line) instead of printing usage."""

  def error(self, message):
    raise _UsageError(message)


class _UsageError(Exception):
  pass


# mergekit-yaml's options that change nothing here, each with why (help text)
_NOOPS = {
    "--lazy-unpickle": "accepted (mergekit); nothing is unpickled: only safetensors are read",
    "--allow-crimes": "accepted (mergekit); tensors are checked by shape, not architecture",
    "--cuda": "accepted (mergekit); JAX runs on its default backend (set JAX_PLATFORMS)",
    "--low-cpu-memory": "accepted (mergekit); one tensor per model is in memory at a time",
    "--read-to-gpu": "accepted (mergekit); JAX places arrays on its default device",
    "--multi-gpu": "accepted (mergekit); no effect",
    "--gpu-rich": "accepted (mergekit); no effect",
    "--clone-tensors": "accepted (mergekit); every output tensor is written as its own copy",
    "--async-write": "accepted (mergekit); shards are written as tensors are merged",
    "--unsafe-truncate-embeddings": "accepted (mergekit); no effect: embeddings of different "
                                    "sizes are an error",
    "--trust-remote-code": "accepted (mergekit); never executes code: no model code is loaded",
}
_NOOP_VALUES = {
    "--device": ("DEVICE", "accepted (mergekit: cpu, cuda, auto, ...); JAX uses its default "
                           "backend (set JAX_PLATFORMS)"),
    "--lora-merge-cache": ("DIR", "accepted (mergekit); adapters are applied as tensors are "
                                  "read, nothing is cached"),
    "--transformers-cache": ("DIR", "accepted (mergekit); nothing is downloaded"),
}


def _merge_parser(sub):
  m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config",
                     description="Merge checkpoints from a mergekit-style YAML config. Accepts "
                     "mergekit-yaml's options (and mergekit-multi's --intermediate-dir/--lazy "
                     "for multi-document configs).")
  m.add_argument("config", help="mergekit-style YAML file (several documents: mergekit-multi)")
  m.add_argument("out_dir", help="output directory (written atomically)")
  m.add_argument("--dry-run", action="store_true", help="validate and list the plan only")
  m.add_argument("--seed", "--random-seed", dest="seed", type=_int_arg("--seed", 0, 2 ** 63 - 1),
                 default=0, help="seed for DARE/DELLA random drops (mergekit: --random-seed)")
  m.add_argument("--max-shard-size", type=_size_arg("--max-shard-size"), default=None,
                 help="bytes per output shard, e.g. 5GB, 500MB (default 5GB)")
  m.add_argument("--out-shard-size", type=_size_arg("--out-shard-size", kmb=True), default=None,
                 help="mergekit's spelling of --max-shard-size: bytes with k/M/B "
                      "(thousand/million/billion) suffixes, e.g. 5B; 0: one shard")
  m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
  m.add_argument("--quiet", action="store_true", help="no progress bar")
  m.add_argument("-v", "--verbose", action="count", default=0,
                 help="accepted (mergekit's verbosity); no effect")
  m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                 help="copy the base model's tokenizer files to OUT_DIR (default: yes)")
  m.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                 help="accepted (mergekit); no model card (README.md) is written")
  m.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                 help="output is always safetensors; --no-safe-serialization is an error")
  m.add_argument("-j", "--num-threads", type=_int_arg("--num-threads", 1), default=None,
                 help="accepted (mergekit); XLA chooses its threads")
  m.add_argument("--write-threads", type=_int_arg("--write-threads", 1), default=1,
                 help="accepted (mergekit); shards are written by one thread")
  m.add_argument("--intermediate-dir", "-I", default=None,
                 help="directory for the named merges of a multi-document config "
                      "(mergekit-multi)")
  m.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                 help="multi-document configs: skip named merges whose output exists "
                      "(mergekit-multi; default: yes)")
  m.add_argument("--mergekit-arithmetic", dest="arithmetic", action="store_const",
                 const="mergekit", default=None,
                 help="compute as mergekit does, in the config's dtype (bf16/fp16 give "
                      "mergekit's bits); default: float32, rounded once (config key "
                      "`arithmetic: mergekit` does the same)")
  for flag, hlp in _NOOPS.items():
    m.add_argument(flag, action="store_true", help=hlp)
  for flag, (metavar, hlp) in _NOOP_VALUES.items():
    m.add_argument(flag, metavar=metavar, default=None, help=hlp)
  m.add_argument("--lora-merge-dtype", choices=sorted(DTYPE_NAMES), default=None,
                 help="accepted (mergekit); adapters are applied in float32")
  return m


def main(argv=None) -> int:
  """`lora-jax merge|extract-lora|train|serve ...`: 0 on success, 2 (one line on stderr) on bad
  input, an unwritable output path, a full disk or exhausted memory."""
  ap = _Parser(prog="lora-jax", description="lora-jax command line")
  sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
  _merge_parser(sub)
  from merging import extract_cli
  extract_cli.add_parser(sub)
  from training import cli as train_cli
  train_cli.add_parser(sub)
  from serving import cli as serve_cli
  serve_cli.add_parser(sub)
  try:
    args = ap.parse_args(argv)
  except _UsageError as e:
    print(f"lora-jax: error: {e} (see lora-jax --help)", file=sys.stderr)
    return 2
  out = getattr(args, "out_dir", None) or getattr(args, "out_path", None)
  try:
    if args.command == "extract-lora":
      extract_cli.run_args(args)
    elif args.command == "train":
      train_cli.run_args(args)
    elif args.command == "serve":
      serve_cli.run_args(args)
    else:
      if not args.safe_serialization:
        raise ValueError("--no-safe-serialization: lora-jax writes only safetensors (never "
                         "pickle)")
      if args.max_shard_size is not None and args.out_shard_size is not None:
        raise ValueError("give one of --max-shard-size and --out-shard-size")
      size = args.max_shard_size or args.out_shard_size or "5GB"
      run(args.config, args.out_dir, dry_run=args.dry_run, seed=args.seed,
          max_shard_size=size, overwrite=args.overwrite, quiet=args.quiet,
          copy_tokenizer=args.copy_tokenizer, intermediate_dir=args.intermediate_dir,
          lazy=args.lazy, arithmetic=args.arithmetic)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"lora-jax {args.command}: error: {short(str(e), 2000)}", file=sys.stderr)
    return 2
  except MemoryError:
    print(f"lora-jax {args.command}: error: out of memory while writing {out!r}",
          file=sys.stderr)
    return 2
  except RecursionError:
    print(f"lora-jax {args.command}: error: the config nests too deeply", file=sys.stderr)
    return 2
  except OSError as e:
    path = e.filename if e.filename is not None else out
    why = e.strerror or type(e).__name__
    print(f"lora-jax {args.command}: error: {why}: {short(str(path), 300)} "
          f"(output {short(str(out), 300)})", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
