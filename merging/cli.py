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

Layer tensors are those named `...layers.{i}.rest`; other tensors whose name
contains "embed" come from the first slice's models, the rest (final norm, head)
from the last slice's, as in mergekit. Gradients over layers use mergekit's `t`:
`i / (n - 1)` within each output slice, 0 for non-layer tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import warnings

import numpy as np

from lora_jax import checkpoint
from lora_jax import checkpoint as _st   # the file-format names plan / run_task use
from merging._params import from_yaml, resolve

LAYER_RX = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")

DTYPE_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32", "float16": "F16", "fp16": "F16",
    "half": "F16", "bfloat16": "BF16", "bf16": "BF16", "float64": "F64",
}
HF_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

# method -> (base policy, shared params with defaults, per-model params with defaults,
#            (min inputs, max inputs), (min non-base, max non-base))
_REQ = object()
_TV_SHARED = {"int8_mask": False, "lambda": 1.0}
_SPEC = {
    "linear": ("ignored", {"normalize": True}, {"weight": _REQ}, (1, None), None),
    "slerp": ("required", {"t": _REQ}, {}, (2, 2), None),
    "nuslerp": ("optional", {"nuslerp_row_wise": False, "nuslerp_flatten": True},
                {"weight": _REQ}, (1, None), (2, 2)),
    "model_stock": ("required", {"filter_wise": False}, {}, (3, None), None),
    "passthrough": ("ignored", {}, {"scale": None}, (1, 1), None),
    "karcher": ("ignored", {"max_iter": 10, "tol": 1e-5}, {}, (1, None), None),
    "multislerp": ("optional", {"normalize_weights": True, "eps": 1e-8}, {"weight": _REQ},
                   (1, None), (1, 10 ** 9)),
    "nearswap": ("required", {"t": _REQ}, {}, (2, 2), None),
    "sce": ("required", {"select_topk": 1.0, "int8_mask": False}, {}, (1, None), None),
    "arcee_fusion": ("required", {}, {}, (2, 2), None),
    "ram": ("required", {"epsilon": 1e-5}, {}, (1, None), None),
    "ramplus_tl": ("required", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, (1, None), None),
}


def _tv_spec(name):
  from merging._methods import METHODS
  m = METHODS[name].fn
  shared = dict(_TV_SHARED, normalize=m.normalize, rescale=m.rescale)
  per = {"weight": _REQ, "density": 1.0}
  if m.sparsify == "magnitude_outliers":
    per["gamma"] = 0.01
  if m.sparsify == "della_magprune":
    per["epsilon"] = 0.15
  return ("required", shared, per, (1, None), None)


def method_spec(name):
  from merging._methods import METHODS
  if name not in METHODS:
    raise ValueError(f"unknown merge_method {name!r}; known methods: {', '.join(sorted(METHODS))}")
  if name in _SPEC:
    return _SPEC[name]
  return _tv_spec(name)


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


@dataclasses.dataclass
class Plan:
  method: str
  tasks: list
  models: dict
  config_from: str
  num_layers: int
  out_code: str | None


def _params_of(d, where):
  if d is None:
    return None
  if not isinstance(d, dict):
    raise ValueError(f"{where}: parameters must be a mapping, got {d!r}")
  return {k: from_yaml(v) for k, v in d.items()}


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


def _check_value(name, v, where, method=None):
  bools = ("normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten",
           "filter_wise", "normalize_weights")
  if name in bools:
    if not isinstance(v, bool):
      raise ValueError(f"{where}: parameter {name!r} must be true or false, got {v!r}")
    return v
  if v is None and name == "scale":
    return v
  if isinstance(v, str):
    try:
      v = float(v)
    except ValueError:
      raise ValueError(f"{where}: parameter {name!r} must be a number, got {v!r}") from None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"{where}: parameter {name!r} must be a finite number, got {v!r}")
  if (name in ("density", "gamma", "select_topk") or (name == "t" and method != "nearswap")) \
      and not 0 <= v <= 1:
    raise ValueError(f"{where}: parameter {name!r} must be in [0, 1], got {v}")
  if name in ("epsilon", "tol", "eps", "t", "r", "alpha") and v < 0:
    raise ValueError(f"{where}: parameter {name!r} must be >= 0, got {v}")
  if name == "max_iter":
    if v != int(v) or v < 1:
      raise ValueError(f"{where}: parameter 'max_iter' must be an integer >= 1, got {v}")
    return int(v)
  return float(v)


def _parse_config(cfg):
  if not isinstance(cfg, dict):
    raise ValueError("the config must be a YAML mapping")
  known = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
           "tokenizer_source", "tokenizer", "chat_template", "modules"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
  if "merge_method" not in cfg:
    raise ValueError("the config has no merge_method")
  for k in ("tokenizer_source", "tokenizer", "chat_template"):
    if cfg.get(k) is not None:
      warnings.warn(f"lora-jax merge: {k!r} is ignored (the base model's tokenizer files are "
                    "copied as they are)", stacklevel=2)
  if cfg.get("modules"):
    raise ValueError("'modules' configs are not supported; use 'models' or 'slices'")
  if bool(cfg.get("models")) == bool(cfg.get("slices")):
    raise ValueError("the config needs exactly one of 'models' or 'slices'")


def plan(cfg: dict, models: dict | None = None) -> Plan:
  """Validate a parsed YAML config against the checkpoints; build the tensor plan."""
  _parse_config(cfg)
  method = cfg["merge_method"]
  base_policy, shared_spec, per_spec, (min_in, max_in), non_base = method_spec(method)
  top = _params_of(cfg.get("parameters"), "parameters")
  base_ref = cfg.get("base_model")
  models = {} if models is None else models

  def get(ref):
    if ref not in models:
      models[ref] = open_model(ref)
    return models[ref]

  slices: list[OutSlice] = []
  if cfg.get("models"):
    srcs = []
    for i, m in enumerate(cfg["models"]):
      if not isinstance(m, dict) or "model" not in m:
        raise ValueError(f"models[{i}] must be a mapping with 'model', got {m!r}")
      mod = get(m["model"])
      srcs.append(Source(m["model"], (0, mod.num_layers),
                         _params_of(m.get("parameters"), f"models[{i}].parameters")))
    if base_ref and base_ref not in [s.model for s in srcs]:
      srcs.append(Source(base_ref, (0, get(base_ref).num_layers), None))
    slices.append(OutSlice(srcs, None, None))
  else:
    for i, s in enumerate(cfg["slices"]):
      if not isinstance(s, dict) or not s.get("sources"):
        raise ValueError(f"slices[{i}] must be a mapping with 'sources'")
      srcs = []
      for j, src in enumerate(s["sources"]):
        where = f"slices[{i}].sources[{j}]"
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
          raise ValueError(f"{where} needs 'model' and 'layer_range'")
        lr = src["layer_range"]
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2
            or not all(isinstance(x, int) for x in lr)):
          raise ValueError(f"{where}: layer_range must be [start, end], got {lr!r}")
        mod = get(src["model"])
        if not 0 <= lr[0] < lr[1] <= mod.num_layers:
          raise ValueError(f"{where}: layer_range {list(lr)} is outside the {mod.num_layers} "
                           f"layers of {src['model']}")
        srcs.append(Source(src["model"], tuple(lr),
                           _params_of(src.get("parameters"), f"{where}.parameters")))
      lens = {s2.layer_range[1] - s2.layer_range[0] for s2 in srcs}
      if len(lens) != 1:
        raise ValueError(f"slices[{i}]: all sources must span the same number of layers, got "
                         f"{[list(s2.layer_range) for s2 in srcs]}")
      slices.append(OutSlice(srcs, s.get("base_model"),
                             _params_of(s.get("parameters"), f"slices[{i}].parameters")))
  if base_ref:
    get(base_ref)

  dtype_name = cfg.get("dtype")
  out_name = cfg.get("out_dtype")
  for k, v in (("dtype", dtype_name), ("out_dtype", out_name)):
    if v is not None and v not in DTYPE_NAMES:
      raise ValueError(f"{k}: unknown dtype {v!r}; expected one of {sorted(DTYPE_NAMES)}")
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
    base_index = refs.index(base) if (base and base in refs and base_policy != "ignored") else None
    if base_policy == "required" and base_index is None:
      raise ValueError(f"{method} needs a base_model among the inputs of {out_tensor}; "
                       f"inputs: {refs}")
    n = len(refs)
    if n < min_in or (max_in is not None and n > max_in):
      want = f"{min_in}" + ("" if max_in == min_in else
                            (f" to {max_in}" if max_in else " or more"))
      raise ValueError(f"{method} takes {want} input models (base included), got {n}: {refs}")
    if non_base is not None:
      nb = n - (base_index is not None)
      if not non_base[0] <= nb <= non_base[1]:
        want = (f"exactly {non_base[0]}" if non_base[0] == non_base[1]
                else f"at least {non_base[0]}")
        raise ValueError(f"{method} takes {want} models besides the base, got {nb}")
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
    for p, d in shared_spec.items():
      shared[p] = _check_value(p, _resolve_param(p, [sl.params, top], out_tensor, t, d, where),
                               where, method)
    per = []
    for k, (src, (ref, info)) in enumerate(zip(sl.sources, inputs)):
      if k == base_index:
        per.append({})
        continue
      w2 = f"{where} (model {ref})"
      per.append({p: _check_value(p, _resolve_param(p, [src.params, sl.params, top], info.name,
                                                    t, d, w2), w2, method)
                  for p, d in per_spec.items()})
    if method in ("della", "della_linear"):
      from merging._sparsify import della_bounds
      for d in per:
        if d:
          della_bounds(d["density"], d["epsilon"], f"{where}: ")
    if method == "linear" and shared["normalize"]:
      if abs(sum(d["weight"] for d in per)) < 1e-12:
        raise ValueError(f"{where}: linear weights sum to 0; cannot normalize")
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
          m = models[s.model]
          names.append(f"{m.prefix or m0.prefix}{s.layer_range[0] + idx}.{suffix}")
        add(f"{m0.prefix}{out_layer}.{suffix}", sl, names, t)
      out_layer += 1
  for name in post:
    add(name, slices[-1], [name] * len(slices[-1].sources), 0.0)
  config_from = base_ref or first_src
  return Plan(method, tasks, models, config_from, out_layer, out_code)


# ----------------------------------------------------------------------------
# execution

def _to_np(info: _st.TensorInfo, in_code):
  x = read(info)
  if in_code and info.dtype in HF_DTYPE and info.dtype != in_code:
    x = x.astype(_st.DTYPES[in_code])
  return x


def run_task(task: Task, method: str, key=None) -> np.ndarray:
  """Merge one tensor; returns a numpy array in the task's output dtype."""
  import jax.numpy as jnp
  from merging import _methods as M
  from merging import _selective as E
  from merging import _sphere as S

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
  sh = task.shared
  if method == "linear":
    w = np.array([d["weight"] for d in task.per_model], np.float32)
    r = M.linear_leaf(tuple(arrs), w, normalize=sh["normalize"])
  elif method == "slerp":
    r = M.slerp_leaf(arrs[bi], others[0], np.float32(sh["t"]))
  elif method == "nuslerp":
    w0, w1 = oper[0]["weight"], oper[1]["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    r = M.nuslerp_leaf(others[0], others[1], np.float32(t), None if bi is None else arrs[bi],
                       row_wise=sh["nuslerp_row_wise"], flatten=sh["nuslerp_flatten"])
  elif method == "model_stock":
    r = M.model_stock_leaf(arrs[bi], tuple(others), filter_wise=sh["filter_wise"])
  elif method == "karcher":
    r = S.karcher_leaf(tuple(arrs), max_iter=sh["max_iter"], tol=sh["tol"])
  elif method == "multislerp":
    w = np.array([d["weight"] for d in oper], np.float32)
    r = S.multislerp_leaf(tuple(others), w, None if bi is None else arrs[bi],
                          normalize=sh["normalize_weights"], eps=sh["eps"])
    S.check_multislerp(r, f"tensor {task.name}", len(others))
  elif method == "nearswap":
    r = E.nearswap_leaf(arrs[bi], others[0], np.float32(sh["t"]))
  elif method == "sce":
    k = sh["select_topk"]
    r = arrs[bi] if k <= 0 else E.sce_leaf(arrs[bi], tuple(others), np.float32(k),
                                           select=bool(k < 1))
  elif method == "arcee_fusion":
    r = E.arcee_fusion_leaf(arrs[bi], others[0])
  elif method in ("ram", "ramplus_tl"):
    r = (arrs[bi] if not others else
         E.ram_leaf(arrs[bi], tuple(others), np.float32(sh["epsilon"]),
                    np.float32(sh.get("r", 0.1)), np.float32(sh.get("alpha", 0.2)),
                    plus=method == "ramplus_tl"))
  elif method == "passthrough":
    s = task.per_model[0].get("scale")
    r = arrs[0] if s is None else (arrs[0].astype(jnp.float32) * np.float32(s)).astype(arrs[0].dtype)
  else:
    tv = M.METHODS[method].fn
    numel = int(np.prod(task.inputs[0][1].shape, dtype=np.int64))
    args = M.sparse_args_for(tv.sparsify, numel, [d["density"] for d in oper],
                             [d.get("gamma", 0.01) for d in oper],
                             [d.get("epsilon", 0.15) for d in oper], where=f"{task.name}: ")
    keys = M._leaf_keys(key, task.index, len(others)) if tv.random else None
    rescale = "l1" if sh["rescale"] else None
    w = np.array([d["weight"] for d in oper], np.float32)
    r = M.task_vector_leaf(arrs[bi], tuple(others), w, np.float32(sh["lambda"]), args, keys,
                           sparsify=tv.sparsify, consensus=tv.consensus,
                           normalize=sh["normalize"], rescale=rescale)
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
           f"output tensors: {len(p.tasks)} in {len(shards)} shard(s)"]
  for t in p.tasks:
    src = ", ".join(f"{ref}:{info.name}" for ref, info in t.inputs)
    params = {k: v for k, v in t.shared.items()}
    per = [d for d in t.per_model if d]
    lines.append(f"  {t.name} {list(t.inputs[0][1].shape)} {t.out_code} <- {src}"
                 f"  {params} {per if per else ''}".rstrip())
  return "\n".join(lines)


def run(config_path: str, out_dir: str, *, dry_run=False, seed=0, max_shard_size="5GB",
        overwrite=False, quiet=False, stream=None) -> Plan:
  """Plan, validate and (unless `dry_run`) execute a merge. Raises ValueError /
  FileNotFoundError before anything is written when the inputs are wrong."""
  import yaml
  stream = stream or sys.stdout
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"config file {config_path!r} does not exist")
  with open(config_path) as f:
    try:
      cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ValueError(f"{config_path}: invalid YAML: {e}") from None
  p = plan(cfg)
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
    for fn in TOKENIZER_FILES:
      try:
        checkpoint.copy_inside(src.path, fn, tmp)
      except ValueError as e:   # a symlink out of the model directory: not followed
        warnings.warn(f"lora-jax merge: tokenizer file not copied: {e}", stacklevel=2)
  if not quiet:
    print(f"wrote {len(p.tasks)} tensors in {len(shards)} shard(s) to {out_dir}", file=stream)
  return p


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="lora-jax", description="lora-jax command line")
  sub = ap.add_subparsers(dest="command", required=True)
  m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config")
  m.add_argument("config", help="mergekit-style YAML file")
  m.add_argument("out_dir", help="output directory (written atomically)")
  m.add_argument("--dry-run", action="store_true", help="validate and list the plan only")
  m.add_argument("--seed", type=int, default=0, help="seed for DARE/DELLA random drops")
  m.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
  m.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
  m.add_argument("--quiet", action="store_true", help="no progress bar")
  from merging import extract_cli
  extract_cli.add_parser(sub)
  args = ap.parse_args(argv)
  try:
    if args.command == "extract-lora":
      extract_cli.run_args(args)
    else:
      run(args.config, args.out_dir, dry_run=args.dry_run, seed=args.seed,
          max_shard_size=args.max_shard_size, overwrite=args.overwrite, quiet=args.quiet)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"lora-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
