"""Adapters in Hugging Face PEFT's layout: `save_adapter` / `load_adapter`.

A PEFT LoRA adapter directory holds

    adapter_config.json          r, lora_alpha, target_modules, use_rslora, use_dora,
                                 rank_pattern, alpha_pattern, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)
                                 base_model.model.<module>.lora_A.weight   (r, in/L)  QA-LoRA
                                 base_model.model.<module>.lora_B.weight   (out, r)
                                 base_model.model.<module>.lora_magnitude_vector (out,)  DoRA
                                 base_model.model.<module>.lora_embedding_A (r, vocab)   embeddings
                                 base_model.model.<module>.lora_embedding_B (dim, r)

PEFT module names (`model.layers.0.self_attn.q_proj`) are mapped to our
parameter paths (`layers/0/self_attn/q_proj/kernel`) by a name map: a sequence of
`(peft_template, path_template)` pairs whose `{placeholders}` match one name
component. `{layer}` matches a layer number; when the parameters are stacked
for `scan` (`layers/self_attn/q_proj/kernel` with a leading layer axis), the
`{layer}/` component is absent from the path and the number indexes that axis.
`LLAMA_NAME_MAP` (the pairs of `lora_jax.checkpoint.LLAMA`) is the default (the
reference model's names, which are Hugging Face's); another model passes its own
`checkpoint.NameTable` or pairs, e.g.
`LLAMA_NAME_MAP + (("transformer.h.{layer}.attn.{proj}", "h/{layer}/attn/{proj}/kernel"),)`.

Files: the directory is read as data. Regular expressions from `adapter_config.json`
(`rank_pattern` / `alpha_pattern` keys, a string `target_modules` / `exclude_modules`,
`layers_pattern`) must compile, and matching them against module names has a time
budget (`PATTERN_BUDGET_S`): a pattern that backtracks catastrophically is an error
naming the key and the file, not a hang. With PEFT's default
`save_embedding_layers="auto"`, an adapter on an embedding carries the base embedding
(`<module>.base_layer.weight`): when it equals the base's it changes nothing; when it
differs, it replaces the base weight with a warning, which is what PEFT's
`load_state_dict(..., strict=False)` does on load. `save_adapter` writes the whole
directory atomically (`checkpoint.atomic_directory`): an interrupted save leaves the
old adapter or the new one, never one's factors with the other's `lora_alpha`.

Scale is PEFT's: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`,
per module through `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import _paths
from lora_jax._dora import DoraWeight
from lora_jax import checkpoint
from lora_jax.checkpoint import NameTable, inside, read_json, read_safetensors
from lora_jax._implicit import ImplicitArray, is_implicit
from lora_jax._lora_weight import LoraWeight, LowRankWeight
from lora_jax._qalora import QALoraWeight
from lora_jax._iec import IecLoraWeight, check_iec_shape
from lora_jax._trainable import Trainable
from lora_jax import _peft_experts as pex

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

NameMap = NameTable | Sequence[tuple[str, str]]

LLAMA_NAME_MAP: tuple[tuple[str, str], ...] = checkpoint.LLAMA.modules

# seconds all regular expressions of one adapter_config.json may spend matching
PATTERN_BUDGET_S = 2.0

# adapter_config.json options whose adapters we cannot reproduce: name -> why.
_UNSUPPORTED = {
    "trainable_token_indices": "trainable token indices are not supported",
    "layer_replication": "layer replication is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "megatron_config": "Megatron parallel layers are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
}

_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m",
    ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
    ".base_layer.weight": "W",    # PEFT's save_embedding_layers: the base weight, saved
    # IR-QLoRA's elastic connection: the reference implementation's parameter names
    # (what PEFT's save_pretrained writes for its IRQLoraLinear4bit modules)
    ".lora_default_A_scale": "IA", ".lora_default_B_scale": "IB",
}


# ----------------------------------------------------------------------------
# regular expressions from adapter_config.json

class _Patterns:
  """PEFT's `get_pattern_key` over one `rank_pattern` / `alpha_pattern`: the first key p
  with `re.match(rf"(.*\\.)?({p})$", module)`, compiled with the `regex` package and
  matched within what is left of a shared time budget."""

  def __init__(self, patterns: Mapping[str, Any], key: str, where, deadline: list[float]):
    self.key, self.where, self.deadline = key, where, deadline
    self.compiled = [(p, _compile(rf"(.*\.)?({p})$", p, key, where)) for p in patterns]

  def first(self, module: str) -> str | None:
    for p, rx in self.compiled:
      left = self.deadline[0] - time.monotonic()
      try:
        if left <= 0:
          raise TimeoutError
        if rx.match(module, timeout=left):
          return p
      except TimeoutError:
        raise ValueError(f"{self.where}: {self.key} pattern {p!r}: matching the module names "
                         f"(here {module!r}) took more than {PATTERN_BUDGET_S}s; the pattern "
                         "backtracks catastrophically, simplify it") from None
    return None


def _compile(rx: str, pattern: Any, key: str, where):
  import regex
  if not isinstance(pattern, str):
    raise ValueError(f"{where}: {key} pattern {pattern!r} must be a string")
  try:
    return regex.compile(rx)
  except (regex.error, OverflowError, RecursionError) as e:
    raise ValueError(f"{where}: {key} pattern {pattern!r} is not a valid regular "
                     f"expression: {e}") from None


def _check_patterns(d: dict, where) -> None:
  """The regular expressions of a config we do not run must still compile."""
  for k in ("target_modules", "exclude_modules"):
    if isinstance(d.get(k), str):
      _compile(d[k], d[k], k, where)
  lp = d.get("layers_pattern")
  for p in ([lp] if isinstance(lp, str) else lp or []):
    _compile(p, p, "layers_pattern", where)


# ----------------------------------------------------------------------------
# load

def _read_config(root: pathlib.Path) -> dict:
  where = inside(root, CONFIG_NAME, str(root))
  d = read_json(where, "PEFT adapter config (adapter_config.json)")
  pt = d.get("peft_type", "LORA")
  if str(pt).upper() != "LORA":
    raise ValueError(f"{where}: peft_type {pt!r} is not supported; expected 'LORA'")
  for k in ("r", "lora_alpha"):
    if k not in d:
      raise ValueError(f"{where}: missing {k!r}")
    if not isinstance(d[k], (int, float)) or isinstance(d[k], bool) or d[k] <= 0:
      raise ValueError(f"{where}: {k} must be a positive number, got {d[k]!r}")
  for k, why in _UNSUPPORTED.items():
    if d.get(k):
      raise ValueError(f"{where}: {k}={d[k]!r}: {why} by lora_jax.load_adapter")
  if d.get("bias", "none") not in ("none", None):
    raise ValueError(f"{where}: bias={d['bias']!r}: trained biases are not supported by "
                     "lora_jax.load_adapter (expected 'none')")
  if d.get("use_qalora"):
    L = d.get("qalora_group_size", 16)
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
      raise ValueError(f"{where}: use_qalora=True with qalora_group_size={L!r}; expected a "
                       "positive int")
    if d.get("use_dora"):
      raise ValueError(f"{where}: use_qalora and use_dora are both set; DoRA with QA-LoRA "
                       "is not supported (PEFT does not support it either)")
  init = str(d.get("init_lora_weights", True)).lower()
  if init.startswith(("pissa", "olora", "corda", "lora_ga")):
    warnings.warn(f"{where}: init_lora_weights={d['init_lora_weights']!r}: this adapter was "
                  "trained on a residual base (its initialisation moved part of W into the "
                  "factors); load it onto that residual base, or onto the original base only "
                  "after converting it (PEFT's path_initial_model_for_weight_conversion, or "
                  "lj.to_standard_lora)", stacklevel=3)
  for k in ("rank_pattern", "alpha_pattern"):
    if d.get(k) is not None and not isinstance(d[k], dict):
      raise ValueError(f"{where}: {k} must be an object, got {type(d[k]).__name__}")
    for p, v in (d.get(k) or {}).items():
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{where}: {k}[{p!r}] must be a positive number, got {v!r}")
  tp = d.get("target_parameters")
  if tp is not None and (not isinstance(tp, list) or not all(isinstance(t, str) for t in tp)):
    raise ValueError(f"{where}: target_parameters must be a list of parameter names, got {tp!r}")
  if tp:
    for k in ("use_dora", "use_qalora", "use_iec"):
      if d.get(k):
        raise ValueError(f"{where}: {k} with target_parameters: PEFT's parameter wrappers "
                         "take plain LoRA only")
  _check_patterns(d, where)
  return d


def _saved_module(module: str, to_save: Sequence[str]) -> bool:
  """PEFT's rule: a module is in modules_to_save when its name ends with an entry
  (a plain suffix: "norm" selects every "*layernorm" too, as in PEFT)."""
  return any(module.endswith(t) for t in to_save)


def _group_tensors(tensors: Mapping[str, np.ndarray], where: pathlib.Path,
                   to_save: Sequence[str] = ()) -> tuple[dict, dict]:
  """LoRA factors by module, and fully trained tensors (modules_to_save) by module."""
  modules: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  full: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  for key, arr in tensors.items():
    name = key.removeprefix(PREFIX)
    for suf, kind in _SUFFIXES.items():
      if name.endswith(suf):
        modules[name[:-len(suf)]][kind] = arr
        break
    else:
      module, _, param = name.rpartition(".")
      if param in ("weight", "bias") and _saved_module(module, to_save):
        full[module][param] = arr
        continue
      raise ValueError(
          f"{where}: tensor {key!r} {tuple(arr.shape)} is neither a LoRA factor (a name "
          f"ending in {sorted(_SUFFIXES)}) nor a weight of a module in modules_to_save "
          f"{list(to_save)}; biases and other PEFT tuners are not supported")
  return dict(modules), dict(full)


def _read_adapter(root: pathlib.Path) -> tuple[dict, pathlib.Path, dict, dict]:
  """(config, weights file, LoRA tensors by module, modules_to_save tensors by module)."""
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such adapter directory")
  cfg = _read_config(root)
  wfile = inside(root, WEIGHTS_NAME, str(root))
  tensors = read_safetensors(wfile)
  if not tensors:
    raise ValueError(f"{wfile}: holds no tensors")
  to_save = cfg.get("modules_to_save") or []
  to_save = [to_save] if isinstance(to_save, str) else to_save
  modules, full = _group_tensors(tensors, wfile, to_save)
  return cfg, wfile, modules, full


def _lora_updates(cfg: dict, modules: dict, wfile, experts=None,
                  num_experts: int = 0) -> dict[str, "WeightUpdate"]:
  """Each module's LoRA factors and scale from the grouped tensors and the config, with
  the checks that need no parameter tree: both factors present and 2-D, a DoRA
  magnitude exactly when `use_dora`, the rank `rank_pattern` / `r` says.

  Modules that adapt a raw parameter (`target_parameters`) are resolved through
  `_peft_experts.resolve` (`experts`: the family's `Experts` spec, whose 3-D expert
  parameters pack `num_experts` adapters); their `WeightUpdate.target` says which."""
  use_dora = bool(cfg.get("use_dora", False))
  group = _qalora_group(cfg)
  rslora = bool(cfg.get("use_rslora", False))
  rank_pattern = cfg.get("rank_pattern") or {}
  alpha_pattern = cfg.get("alpha_pattern") or {}
  where = wfile.with_name(CONFIG_NAME)
  deadline = [time.monotonic() + PATTERN_BUDGET_S]
  ranks = _Patterns(rank_pattern, "rank_pattern", where, deadline)
  alphas = _Patterns(alpha_pattern, "alpha_pattern", where, deadline)
  out = {}
  targets = cfg.get("target_parameters") or []
  for module in sorted(modules):
    parts = modules[module]
    key = PREFIX + module
    pt = pex.resolve(module, targets, experts, where)
    # PEFT matches patterns against a parameter target's full name
    pkey = pt.key if pt is not None else module
    E = num_experts if pt is not None and pt.param != "weight" else 0
    emb = "EA" in parts or "EB" in parts
    ka, kb = ("EA", "EB") if emb else ("A", "B")
    if set(parts) == {"W"}:
      raise ValueError(f"{wfile}: {key}.base_layer.weight {tuple(parts['W'].shape)} is a saved "
                       "base weight of a module that has no LoRA factors in this file")
    if ka not in parts or kb not in parts or (emb and ("A" in parts or "B" in parts)):
      raise ValueError(f"{wfile}: module {key!r} needs both lora_A and lora_B (or "
                       f"lora_embedding_A and _B); found {sorted(parts)}")
    A, B = parts[ka], parts[kb]
    if pt is not None and (set(parts) - {"A", "B"}):
      raise ValueError(f"{wfile}: {key}: a parameter target (target_parameters "
                       f"{pt.key!r}) holds only lora_A / lora_B, found {sorted(parts)}")
    if A.ndim != 2 or B.ndim != 2:
      raise ValueError(f"{wfile}: {key}: lora_A {A.shape} / lora_B {B.shape} are not 2-D; "
                       "only Linear and Embedding targets are supported (not Conv)")
    if ("m" in parts) != use_dora:
      raise ValueError(f"{wfile}: {key}: use_dora={use_dora} in {CONFIG_NAME} but the "
                       f"magnitude vector is {'present' if 'm' in parts else 'missing'}")
    if use_dora and emb:
      raise ValueError(f"{wfile}: {key}: DoRA on embeddings is not supported")
    if group and emb:
      raise ValueError(f"{wfile}: {key}: QA-LoRA (use_qalora) on embeddings is not "
                       "supported (PEFT's QA-LoRA adapts Linear layers only)")
    if E and (A.shape[0] % E or B.shape[1] != A.shape[0]):
      raise ValueError(f"{wfile}: {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                       f"do not pack {E} experts of {pt.key} (expected lora_A (r * {E}, in) "
                       f"and lora_B (out, r * {E})); is this adapter for another base model?")
    r = A.shape[0] // E if E else A.shape[0]
    rk = ranks.first(pkey)
    want_r = int(rank_pattern[rk]) if rk is not None else int(cfg["r"])
    if r != want_r:
      raise ValueError(f"{wfile}: {key}: lora_A has rank {r} but {CONFIG_NAME} gives r="
                       f"{want_r}" + (f" (rank_pattern {rk!r})" if rk is not None else "")
                       + f" ({where}); are the weights and the config from different saves?")
    if B.shape[1] != (r * E if E else r):
      raise ValueError(f"{wfile}: {key}: lora_A {tuple(A.shape)} has rank {r} but lora_B "
                       f"{tuple(B.shape)} has rank {B.shape[1]}")
    ak = alphas.first(pkey)
    alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg["lora_alpha"])
    betas = _iec_betas(parts, key, wfile, cfg, emb, group, use_dora)
    if betas is not None and not cfg.get("use_iec"):
      # the reference implementation's files: raw factors beside the betas
      A, B = iec_effective_torch(A, B, *betas)
    out[module] = WeightUpdate("embedding" if emb else "lora", a=A, b=B, m=parts.get("m"),
                               scale=alpha / math.sqrt(r) if rslora else alpha / r,
                               base=parts.get("W"), group_size=group, iec=betas,
                               target=pt, experts=E)
  return out


def _iec_betas(parts: dict, key: str, wfile, cfg: dict, emb: bool, group: int,
               use_dora: bool) -> tuple[float, float] | None:
  """IEC's `(beta_a, beta_b)` of one module, or None. `use_iec` in the config (ours)
  needs both in every module; a file without it holding them is the reference
  implementation's (PEFT's save of IR-QLoRA modules)."""
  have = [k for k in ("IA", "IB") if k in parts]
  if not have:
    if cfg.get("use_iec"):
      raise ValueError(f"{wfile}: {key}: use_iec=True in {CONFIG_NAME} but the module has no "
                       "lora_default_A_scale / lora_default_B_scale")
    return None
  if len(have) != 2:
    raise ValueError(f"{wfile}: {key}: IEC needs both lora_default_A_scale and "
                     f"lora_default_B_scale; found only {'A' if have == ['IA'] else 'B'}")
  if emb or group or use_dora:
    raise ValueError(f"{wfile}: {key}: IEC scales on a "
                     f"{'embedding' if emb else 'QA-LoRA' if group else 'DoRA'} module are "
                     "not supported (the elastic connection is defined on Linear LoRA)")
  vals = []
  for k in ("IA", "IB"):
    v = np.asarray(parts[k])
    if v.size != 1 or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
      raise ValueError(f"{wfile}: {key}.lora_default_{k[1]}_scale has shape {v.shape} dtype "
                       f"{v.dtype}; expected one finite float")
    vals.append(float(v.reshape(())))
  return vals[0], vals[1]


def iec_effective_torch(A: np.ndarray, B: np.ndarray, beta_a: float, beta_b: float):
  """IEC's effective LoRA factors in PyTorch layout, float32: lora_A `(r, in)` plus
  `beta_a` times the group-mean matrix, lora_B `(out, r)` plus `beta_b` times the
  repeat matrix (see `lj.IecLoraWeight`)."""
  r, k = A.shape
  n = B.shape[0]
  if k % r or n % r:
    raise ValueError(f"IEC: rank {r} does not divide in={k} and out={n} (lora_A "
                     f"{tuple(A.shape)}, lora_B {tuple(B.shape)})")
  eye = np.eye(r, dtype=np.float32)
  mean = np.repeat(eye, k // r, axis=1) / np.float32(k // r)       # (r, in)
  rep = np.repeat(eye, n // r, axis=0)                              # (out, r)
  return (np.asarray(A, np.float32) + np.float32(beta_a) * mean,
          np.asarray(B, np.float32) + np.float32(beta_b) * rep)


def _qalora_group(cfg: dict) -> int:
  """QA-LoRA's group size `L` from a PEFT config (PEFT's default 16), or 0 without
  `use_qalora`."""
  return int(cfg.get("qalora_group_size", 16)) if cfg.get("use_qalora") else 0


@dataclasses.dataclass
class _Entry:
  a: np.ndarray          # (in, r)
  b: np.ndarray          # (r, out)
  m: np.ndarray | None   # (out,)
  scale: float
  rank: int
  w: np.ndarray | None = None   # a saved base weight that differs from the base's (ours)
  iec: tuple[float, float] | None = None   # IEC (beta_a, beta_b); a, b are effective


def _experts_spec(config: Any):
  """The family's `Experts` spec (routed experts and PEFT's names for them), or None."""
  if config is None or not getattr(config, "num_experts", 0):
    return None
  from lora_jax.models.families import family
  return family(str(getattr(config, "model_type", "llama")), "config").experts


def _legacy_experts(updates: dict, spec, num_experts: int, wfile) -> dict:
  """Adapters trained on transformers 4 name each expert's Linear
  (`...experts.3.w1`); fuse them onto our stacked expert kernels, in PEFT's packed
  form, so the loader treats them as a `target_parameters` adapter."""
  per_expert, out = {}, {}
  for module, up in updates.items():
    hit = pex.legacy_expert(module, spec) if up.target is None else None
    if hit is None:
      out[module] = up
      continue
    if up.m is not None or up.group_size or up.iec is not None or up.kind != "lora":
      raise ValueError(f"{wfile}: {PREFIX}{module}: only plain LoRA on per-expert modules "
                       "is read (no DoRA, QA-LoRA or IEC)")
    per_expert[hit] = (up.a, up.b, up.scale)
  for (layer, param), (a, b, scale) in pex.fuse_legacy(per_expert, num_experts, spec,
                                                       wfile).items():
    A, B = pex.pack_experts(a, b)
    module = pex.peft_module(spec, layer) + f".{param}"
    out[module] = WeightUpdate("lora", a=A, b=B, scale=scale, experts=num_experts,
                               target=pex.ParamTarget(pex.peft_module(spec, layer), param,
                                                      layer))
  return out


def _family_table(config: Any, name_map: NameMap | None) -> NameTable:
  """The name table: `name_map` if given, else the family of a model config
  (`lora_jax.models.DecoderConfig`), else Llama's."""
  if name_map is None and config is not None:
    from lora_jax.models.families import family    # models build on this module
    fam = family(str(getattr(config, "model_type", "llama")), "config")
    if fam.experts is None:
      return fam.names
    # PEFT names the router as transformers 5 holds it (Mixtral's checkpoints say
    # block_sparse_moe.gate): that name first, so save_adapter writes it; both read
    router = (fam.experts.peft_router, "layers/{layer}/mlp/gate/kernel")
    return NameTable(modules=(router,) + fam.names.modules, ignore=fam.names.ignore)
  return checkpoint.as_table(name_map, checkpoint.LLAMA)


def load_adapter(path: str | os.PathLike, base_params: Any, name_map: NameMap | None = None,
                 *, dtype=None, config: Any = None) -> Any:
  """Read a PEFT LoRA / rsLoRA / DoRA adapter onto `base_params`.

  Args:
    path: adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
      as written by PEFT's `save_pretrained` or `lj.save_adapter`.
    base_params: the base model's parameters (plain arrays or quantized kernels,
      unrolled or stacked layers), e.g. from `llama.load_hf`. A quantized kernel
      becomes the `w` of its `LoraWeight`: QLoRA.
    name_map: a `checkpoint.NameTable` or `(peft_template, path_template)` pairs;
      default: the family table of `config`, or `LLAMA_NAME_MAP`.
    dtype: dtype of the factors; default each base weight's dtype.
    config: the base model's config (`models.load_hf`'s), whose family's name table
      maps PEFT module names to parameter paths.

  Returns:
    `base_params` with each adapted kernel replaced by a `LoraWeight` (or a
    `DoraWeight` when `use_dora`): `a = lora_A.T` `(in, r)`, `b = lora_B.T` `(r, out)`,
    scale `alpha / r` (rsLoRA: `alpha / sqrt(r)`), `m = lora_magnitude_vector`.
    IR-QLoRA's elastic connection (`lora_default_A_scale` / `lora_default_B_scale`
    tensors) gives `IecLoraWeight`s: from our files (`use_iec` in the config, lora_A /
    lora_B holding the effective factors) and from the reference implementation's
    (raw factors).
    Stacked parameters get stacked factors: a layer PEFT did not adapt gets zero
    factors (DoRA magnitude `||W||`), which leaves it unchanged; layers of
    different rank are zero-padded to the largest, and a layer whose scale differs
    from the first adapted layer's has the ratio folded into its `b`.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: naming the key and what was expected: corrupt or truncated files,
      unsupported PEFT options, keys that map to no parameter, shape mismatches
      (an adapter for another base). Nothing is returned half-loaded.
  """
  name_map = _family_table(config, name_map)
  spec = _experts_spec(config)
  root = pathlib.Path(path)
  cfg, wfile, modules, full = _read_adapter(root)
  use_dora = bool(cfg.get("use_dora", False))
  group = _qalora_group(cfg)

  leaves = dict(_paths.leaves_with_paths(base_params, is_leaf=is_implicit))
  # path -> {layer or -1: _Entry}
  entries: dict[str, dict[int, _Entry]] = collections.defaultdict(dict)
  num_experts = int(getattr(config, "num_experts", 0) or 0)
  updates = _legacy_experts(_lora_updates(cfg, modules, wfile, spec, num_experts), spec,
                            num_experts, wfile)
  for module, up in updates.items():
    key = PREFIX + module
    A, B = up.a, up.b
    if up.experts:     # one adapter per expert of a 3-D parameter
      pt = up.target
      hit = (f"layers/{pt.layer}/mlp/experts/{pt.param}", f"layers/mlp/experts/{pt.param}",
             pt.layer)
    else:
      hit = name_map.module_to_path(up.target.module if up.target is not None else module)
    if hit is None:
      raise ValueError(f"{wfile}: tensor {key}.* (module {module!r}) maps to no parameter "
                       f"through the name map {[p for p, _ in name_map.modules]}; pass "
                       "load_adapter(..., name_map=...) for another model")
    path, spath, layer = hit
    if path in leaves:
      target, lidx = path, -1
    elif spath and spath in leaves:
      target, lidx = spath, layer
    else:
      near = ", ".join(_paths.closest_paths(path, leaves))
      raise ValueError(f"{wfile}: module {module!r} maps to parameter {path!r}"
                       + (f" (stacked: {spath!r})" if spath else "")
                       + f", which base_params does not have; closest paths: {near}")
    base = leaves[target]
    if is_implicit(base) and base.trainable_fields:
      raise ValueError(f"{target}: base parameter is already a {type(base).__name__}; "
                       "load the adapter onto base weights (lj.merge first)")
    shape = tuple(base.shape)
    E = up.experts
    nd = 3 if E else 2      # the kernel's dims: (E, in, out) for experts
    what = f"(layers > {lidx}, experts, in, out)" if E else f"(layers > {lidx}, in, out)"
    if lidx >= 0:
      if len(shape) != nd + 1 or lidx >= shape[0]:
        raise ValueError(f"{wfile}: {key}: stacked parameter {target} has shape {shape}; "
                         f"expected {what}")
      kernel = shape[1:]
    else:
      if len(shape) != nd:
        raise ValueError(f"{wfile}: {key}: parameter {target} has shape {shape}; expected a "
                         + ("3-D expert kernel (experts, in, out)" if E
                            else "2-D kernel (in, out)"))
      kernel = shape
    if E:
      if kernel[0] != E:
        raise ValueError(f"{wfile}: {key}: {target} {shape} holds {kernel[0]} experts; the "
                         f"config has num_experts={E}")
      kernel = kernel[1:]
    r = A.shape[0] // E if E else A.shape[0]
    # lora_A (r, in), lora_B (out, r); for embeddings lora_embedding_A (r, vocab),
    # lora_embedding_B (dim, r): the same shapes, as the table is (vocab, dim).
    want_a, want_b = (r * (E or 1), kernel[0]), (kernel[1], r * (E or 1))
    if group:    # QA-LoRA: lora_A (r, in / L)
      if kernel[0] % group:
        raise ValueError(f"{wfile}: {key}: qalora_group_size {group} does not divide the "
                         f"input size {kernel[0]} of the base weight {target} {kernel} "
                         "(in, out)")
      want_a = (r, kernel[0] // group)
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
      raise ValueError(
          f"{wfile}: {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
          f"the base weight {target} {kernel} (in, out) [torch (out, in) = "
          f"{kernel[::-1]}]" + (f" with qalora_group_size {group}" if group else "")
          + (f" per expert, {E} experts packed" if E else "")
          + f": expected lora_A {want_a} and lora_B {want_b}. "
          "Is this adapter for another base model?")
    scale = up.scale
    m = up.m
    if m is not None:
      if tuple(m.shape) != (kernel[1],):
        raise ValueError(f"{wfile}: {key}.lora_magnitude_vector has shape {tuple(m.shape)}; "
                         f"expected ({kernel[1]},) for {target} {kernel}")
    if lidx in entries[target]:
      raise ValueError(f"{wfile}: two PEFT modules map to {target}"
                       + (f" layer {lidx}" if lidx >= 0 else ""))
    w = _saved_base(up.base, base, target, lidx, key, wfile)
    if E:
      a, b, _ = pex.split_experts(A, B, E, key, wfile)
    else:
      a, b = np.asarray(A).T, np.asarray(B).T
    entries[target][lidx] = _Entry(a=a, b=b, m=m, scale=scale, rank=r, w=w, iec=up.iec)

  built: dict[str, LoraWeight] = {}
  for target, per in entries.items():
    base = leaves[target]
    dt = dtype or base.dtype
    use_iec = any(e.iec is not None for e in per.values())
    if use_iec and not all(e.iec is not None for e in per.values()):
      raise ValueError(f"{wfile}: {target}: some layers have IEC scales and some not")
    if -1 in per:
      e = per[-1]
      w = base if e.w is None else jnp.asarray(e.w)
      built[target] = _make(w, e.a, e.b, e.m, e.scale, dt, group,
                            None if e.iec is None else (np.float32(e.iec[0]), np.float32(e.iec[1])),
                            target)
      continue
    for li, e in per.items():
      if e.w is not None:
        base = base.at[li].set(jnp.asarray(e.w))
    L = base.shape[0]
    # One rank and one (static) scale for the stack: pad smaller ranks with zero
    # factors and fold each layer's scale into its b, which keeps s_l * A_l @ B_l.
    r = max(e.rank for e in per.values())
    scale = per[min(per)].scale
    *lead, din, dout = base.shape[1:]     # lead: (experts,) for expert kernels
    a = np.zeros((L, *lead, din // group if group else din, r), np.float32)
    b = np.zeros((L, *lead, r, dout), np.float32)
    m = np.zeros((L, dout), np.float32) if use_dora else None
    betas = (np.zeros(L, np.float32), np.zeros(L, np.float32)) if use_iec else None
    dense = base.materialize() if isinstance(base, ImplicitArray) else base
    wnorm = (np.sqrt(np.sum(np.square(np.asarray(dense, np.float32)), axis=1))
             if use_dora else None)
    for li in range(L):
      e = per.get(li)
      if e is not None:
        a[li, ..., :e.rank] = e.a
        b[li, ..., :e.rank, :] = e.b if e.scale == scale else e.b * np.float32(e.scale / scale)
        if use_dora:
          m[li] = e.m
        if use_iec:
          betas[0][li], betas[1][li] = e.iec
      elif use_dora:
        m[li] = wnorm[li]
    built[target] = _make(base, a, b, m, scale, dt, group, betas, target)

  for target, value in _full_weights(full, leaves, name_map, wfile).items():
    if target in built:
      raise ValueError(f"{wfile}: {target} is both LoRA-adapted and in modules_to_save")
    built[target] = Trainable(value)

  def swap(path, leaf):
    return built.get(path, leaf)

  return _paths.map_with_path(swap, base_params, is_leaf=is_implicit)


def _fit_base(arr: np.ndarray, base: Any, target: str, lidx: int, key: str, wfile) -> np.ndarray:
  """A saved full weight (PyTorch layout) in our layout, checked against the base weight
  `target` it stands for (layer `lidx` of a stacked one when `lidx >= 0`)."""
  value = _to_ours(arr, target)
  want = tuple(base.shape[1:]) if lidx >= 0 else tuple(base.shape)
  if tuple(value.shape) != want:
    raise ValueError(f"{wfile}: {key} has shape {tuple(np.shape(arr))}; the base weight "
                     f"{target} expects {want} (ours; PyTorch layout transposed for "
                     "kernels). Is this adapter for another base model?")
  return value


def _saved_base(saved: np.ndarray | None, base: Any, target: str, lidx: int, key: str,
                wfile) -> np.ndarray | None:
  """A saved `base_layer.weight` (PEFT's `save_embedding_layers`) against the base's:
  None when equal (in the base's dtype); the saved weight in our layout and the base's
  dtype, with a warning, when it differs (PEFT's load replaces the base weight too)."""
  if saved is None:
    return None
  ours = _fit_base(saved, base, target, lidx, f"{key}.base_layer.weight", wfile)
  dense = base.materialize() if isinstance(base, ImplicitArray) else base
  dense = np.asarray(dense[lidx] if lidx >= 0 else dense)
  ours = ours.astype(dense.dtype)
  if np.array_equal(ours, dense):
    return None
  if isinstance(base, ImplicitArray):
    raise ValueError(f"{wfile}: {key}.base_layer.weight differs from the base weight "
                     f"{target}, a {type(base).__name__}; a quantized base cannot be replaced")
  diff = float(np.max(np.abs(ours.astype(np.float32) - dense.astype(np.float32))))
  warnings.warn(f"{wfile}: {key}.base_layer.weight {tuple(saved.shape)} differs from the base "
                f"weight {target} (max |diff| {diff:.3g}); it replaces the base weight, as "
                "PEFT does when it loads this adapter", stacklevel=3)
  return ours


@dataclasses.dataclass
class WeightUpdate:
  """What a PEFT adapter does to one PyTorch weight `(out, in)` (or embedding
  `(vocab, dim)`), independent of any parameter tree. See `read_adapter_updates`."""
  kind: str                    # "lora" | "embedding" | "full"
  a: np.ndarray | None = None  # lora_A (r, in) / lora_embedding_A (r, vocab)
  b: np.ndarray | None = None  # lora_B (out, r) / lora_embedding_B (dim, r)
  scale: float = 1.0
  m: np.ndarray | None = None  # DoRA magnitude (out,)
  value: np.ndarray | None = None   # "full": the saved tensor
  base: np.ndarray | None = None    # a saved base weight (PEFT's save_embedding_layers)
  group_size: int = 0          # QA-LoRA's L: lora_A is (r, in / L), pooled inputs
  iec: tuple[float, float] | None = None   # IEC (beta_a, beta_b); a, b are then effective
  target: "pex.ParamTarget | None" = None  # the raw parameter a target_parameters entry adapts
  experts: int = 0             # > 0: a, b pack one adapter per expert (lora_A (r*E, in))

  def apply(self, w: np.ndarray) -> np.ndarray:
    """The updated weight, computed in float32 and cast to `w`'s dtype (PyTorch layout).
    A saved `base` that differs from `w` replaces it (with a warning), as in PEFT."""
    if self.base is not None:
      if tuple(self.base.shape) != tuple(w.shape):
        raise ValueError(f"saved base_layer.weight {tuple(self.base.shape)} does not match "
                         f"the base weight {tuple(w.shape)}")
      saved = np.asarray(self.base).astype(w.dtype)
      if not np.array_equal(saved, w):
        warnings.warn("the adapter's saved base_layer.weight differs from the base weight; "
                      "it replaces it, as PEFT does on load", stacklevel=2)
        w = saved
    if self.kind == "full":
      if tuple(self.value.shape) != tuple(w.shape):
        raise ValueError(f"modules_to_save tensor {tuple(self.value.shape)} does not match "
                         f"the base weight {tuple(w.shape)}")
      return np.asarray(self.value).astype(w.dtype)
    a, b = np.asarray(self.a, np.float32), np.asarray(self.b, np.float32)
    if self.group_size:   # QA-LoRA's dense form: (in/L)/L * repeat(A, L) along in
      a = np.repeat(a, self.group_size, axis=1) * np.float32(a.shape[1] / self.group_size)
    delta = self.scale * (b @ a)
    if self.kind == "embedding":
      delta = delta.T
    if tuple(delta.shape) != tuple(w.shape):
      raise ValueError(f"LoRA factors give a {tuple(delta.shape)} update for a base weight "
                       f"{tuple(w.shape)}; is the adapter for another base model?")
    out = np.asarray(w, np.float32) + delta
    if self.m is not None:     # DoRA: m * (W + sBA) / ||W + sBA|| per output row
      out = np.asarray(self.m, np.float32)[:, None] * out / np.linalg.norm(
          out, axis=1, keepdims=True)
    return out.astype(w.dtype)


def read_adapter_updates(path: str | os.PathLike) -> dict[str, dict[str, WeightUpdate]]:
  """A PEFT adapter as `{module: {"weight" | "bias": WeightUpdate}}` in PyTorch names
  (`model.layers.0.self_attn.q_proj`), for tools that work tensor by tensor (the merge
  command line's `base+adapter` references). Same checks as `load_adapter`."""
  cfg, wfile, modules, full = _read_adapter(pathlib.Path(path))
  out: dict[str, dict[str, WeightUpdate]] = collections.defaultdict(dict)
  for module, up in _lora_updates(cfg, modules, wfile).items():
    if up.target is not None:
      module = up.target.module
    out[module]["weight"] = up
  for module, params in full.items():
    for param, arr in params.items():
      out[module][param] = WeightUpdate("full", value=arr)
  return dict(out)


def _to_ours(arr: np.ndarray, path: str) -> np.ndarray:
  """PyTorch layout -> ours: Linear weights `(out, in)` become kernels `(in, out)`."""
  return np.asarray(arr).T if path.endswith("/kernel") and np.ndim(arr) == 2 else np.asarray(arr)


def _full_weights(full: dict, leaves: dict, name_map: NameTable, wfile) -> dict:
  """modules_to_save tensors -> {path: value in our layout}; stacked paths are the base
  stack with the saved layers written in."""
  out: dict[str, np.ndarray] = {}
  for module in sorted(full):
    hit = name_map.module_to_path(module)
    if hit is None:
      raise ValueError(f"{wfile}: modules_to_save module {module!r} maps to no parameter "
                       f"through the name map {[p for p, _ in name_map.modules]}")
    kpath, kspath, layer = hit
    for param, arr in full[module].items():
      key = f"{PREFIX}{module}.{param}"
      path = checkpoint.param_path(kpath, param)
      spath = checkpoint.param_path(kspath, param) if kspath else None
      if path in leaves:
        target, lidx = path, -1
      elif spath and spath in leaves:
        target, lidx = spath, layer
      else:
        near = ", ".join(_paths.closest_paths(str(path), leaves))
        raise ValueError(f"{wfile}: {key} maps to parameter {path!r}, which base_params does "
                         f"not have; closest paths: {near}")
      base = leaves[target]
      if isinstance(base, ImplicitArray):
        raise ValueError(f"{wfile}: {key}: base parameter {target} is a {type(base).__name__}; "
                         "modules_to_save needs a plain array")
      value = _fit_base(arr, base, target, lidx, key, wfile)
      if lidx >= 0:
        stack = out.get(target)
        if stack is None:
          stack = np.array(base, copy=True)
        stack[lidx] = value
        out[target] = stack
      else:
        out[target] = value
  return {t: jnp.asarray(v).astype(leaves[t].dtype) for t, v in out.items()}


def _make(base, a, b, m, scale, dt, group: int = 0, iec=None, target: str = "") -> LowRankWeight:
  """The leaf for loaded factors; with `iec = (beta_a, beta_b)` (scalars, or `(L,)`
  per stacked layer), `a` and `b` are IEC's effective factors and the raw ones are
  recovered as `a_eff - beta_a * P`, `b_eff - beta_b * R`."""
  if iec is not None:
    r = np.shape(a)[-1]
    check_iec_shape(np.shape(base), "io", r, f"{target}: loaded IEC adapter")
    lead = np.shape(base)[:-2]
    ba, bb = (np.asarray(v, np.float32).reshape(lead) for v in iec)
    k, n = np.shape(base)[-2:]
    eye = np.eye(r, dtype=np.float32)
    mean = np.repeat(eye, k // r, axis=0) / np.float32(k // r)     # (in, r)
    rep = np.repeat(eye, n // r, axis=1)                            # (r, out)
    a = np.asarray(a, np.float32) - ba[..., None, None] * mean
    b = np.asarray(b, np.float32) - bb[..., None, None] * rep
  a = jnp.asarray(np.asarray(a, np.float32)).astype(dt)
  b = jnp.asarray(np.asarray(b, np.float32)).astype(dt)
  if iec is not None:
    return IecLoraWeight(w=base, a=a, b=b, scale=float(scale), axes="io",
                         beta_a=jnp.asarray(ba).astype(dt), beta_b=jnp.asarray(bb).astype(dt))
  if group:
    return QALoraWeight(w=base, a=a, b=b, scale=float(scale), axes="io", group_size=group)
  if m is None:
    return LoraWeight(w=base, a=a, b=b, scale=float(scale), axes="io")
  m = jnp.asarray(np.asarray(m, np.float32)).astype(dt)
  return DoraWeight(w=base, a=a, b=b, scale=float(scale), axes="io", m=m)


# ----------------------------------------------------------------------------
# save

def _num(x: float):
  return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else float(x)


def save_adapter(path: str | os.PathLike, params: Any, cfg: Any = None, *,
                 name_map: NameMap | None = None, base_model_name_or_path: str | None = None,
                 task_type: str | None = "CAUSAL_LM", config: Any = None) -> None:
  """Write the LoRA / DoRA leaves of `params` as a PEFT adapter directory.

  Args:
    path: output directory (created if missing), written atomically: the new files go
      to a temporary sibling directory that replaces `path` in one rename (other files
      already in `path` are kept); an interrupted save leaves the old adapter intact.
    params: parameters holding `LoraWeight` / `DoraWeight` / `QALoraWeight` /
      `IecLoraWeight` leaves (unrolled or stacked). An IEC adapter is written as the
      LoRA PEFT computes exactly (its effective factors as lora_A / lora_B) plus the
      betas under the reference implementation's names and `"use_iec": true`, which
      PEFT ignores (with a warning) and `lj.load_adapter` reads back.
    cfg: optional `lj.LoraConfig`: its `rank`, `alpha` and `rslora` become PEFT's
      `r`, `lora_alpha` and `use_rslora`; modules whose rank or alpha differ go
      to `rank_pattern` / `alpha_pattern`. Without it, the most common rank and
      alpha are the defaults and `use_rslora` is false (alpha = scale * r), which
      gives PEFT the same scales.
    name_map: a `checkpoint.NameTable` or `(peft_template, path_template)` pairs;
      default `LLAMA_NAME_MAP`.
    base_model_name_or_path: recorded in `adapter_config.json`.
    task_type: PEFT task type recorded in `adapter_config.json`.
    config: the base model's config; its family's name table is the default `name_map`.

  Raises:
    ValueError: no LoRA leaves, a LoRA leaf whose path maps to no PEFT module, a
      kernel that is not 2-D `(in, out)` (or `(L, in, out)` stacked), a mix of
      DoRA and plain LoRA leaves.
  """
  name_map = _family_table(config, name_map)
  spec = _experts_spec(config)
  rslora = bool(getattr(cfg, "rslora", False)) if cfg is not None else False
  tensors: dict[str, np.ndarray] = {}
  mods: dict[str, tuple[int, float]] = {}
  # parameter targets (PEFT's target_parameters): full name -> (rank, alpha)
  pmods: dict[str, tuple[int, float]] = {}
  experts: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
  kinds = set()
  dropout = 0.0
  all_paths = _paths.leaves_with_paths(params, is_leaf=is_implicit)
  saved_modules: list[str] = []
  for lpath, leaf in all_paths:
    if isinstance(leaf, Trainable):
      saved_modules += _write_full(tensors, lpath, leaf, name_map)
      continue
    if not isinstance(leaf, LowRankWeight):
      if is_implicit(leaf) and leaf.trainable_fields:
        raise ValueError(f"{lpath}: save_adapter writes LoRA / DoRA factors and fully "
                         f"trained modules; a {type(leaf).__name__} (trainable "
                         f"{leaf.trainable_fields}) has no PEFT layout")
      continue
    if isinstance(leaf, QALoraWeight) and lpath.split("/")[-1] == "embedding":
      raise ValueError(f"{lpath}: a QALoraWeight on an embedding has no PEFT layout "
                       "(PEFT's QA-LoRA adapts Linear layers only)")
    iec = isinstance(leaf, IecLoraWeight)
    if iec and lpath.split("/")[-1] == "embedding":
      raise ValueError(f"{lpath}: an IecLoraWeight on an embedding has no PEFT layout "
                       "(IR-QLoRA's elastic connection adapts Linear layers)")
    kinds.add((isinstance(leaf, DoraWeight),
               int(leaf.group_size) if isinstance(leaf, QALoraWeight) else 0, iec))
    dropout = max(dropout, float(leaf.dropout))
    nb = leaf.nbatch
    ep = pex.expert_path(lpath, spec)
    if ep is not None:     # one adapter per expert: PEFT's packed target_parameters layout
      _plain_for_param_target(lpath, leaf)
      layer, param = ep
      if leaf.axes != "io" or nb != (1 if layer is not None else 2):
        raise ValueError(f"{lpath}: expert LoRA kernel {leaf.shape} (axes {leaf.axes!r}) is "
                         "not (experts, in, out), or a stack of them over layers")
      r = leaf.rank
      alpha = leaf.scale * (math.sqrt(r) if rslora else r)
      a = np.asarray(jnp.asarray(leaf.a))
      b = np.asarray(jnp.asarray(leaf.b))
      for li in ([layer] if layer is not None else range(leaf.shape[0])):
        sa, sb = (a, b) if layer is not None else (a[li], b[li])
        experts[(li, param)] = pex.pack_experts(sa, sb)
        pmods[f"{pex.peft_module(spec, li)}.{param}"] = (r, alpha)
      continue
    if leaf.axes != "io" or nb > 1:
      raise ValueError(f"{lpath}: LoRA kernel {leaf.shape} (axes {leaf.axes!r}) is not a 2-D "
                       "(in, out) kernel or a stack of them; PEFT's layout cannot hold it")
    tmpl = name_map.path_to_module(lpath, stacked=nb == 1)
    if tmpl is None:
      raise ValueError(f"{lpath}: no entry of the name map {[t for _, t in name_map.modules]} matches "
                       "this LoRA leaf" + (" (stacked)" if nb else "")
                       + "; pass save_adapter(..., name_map=...)")
    r = leaf.rank
    alpha = leaf.scale * (math.sqrt(r) if rslora else r)
    if iec:   # PEFT gets the exact function: IEC's effective factors, betas beside them
      ea, eb = leaf.effective_factors()
      a = np.asarray(ea.astype(leaf.a.dtype))
      b = np.asarray(eb.astype(leaf.b.dtype))
      betas = [np.asarray(jnp.asarray(v)) for v in (leaf.beta_a, leaf.beta_b)]
    else:
      a = np.asarray(jnp.asarray(leaf.a))
      b = np.asarray(jnp.asarray(leaf.b))
    m = np.asarray(jnp.asarray(leaf.m)) if isinstance(leaf, DoraWeight) else None
    emb = lpath.split("/")[-1] == "embedding"
    layers = range(leaf.shape[0]) if nb else [None]
    for li in layers:
      module = tmpl.format(layer=li) if nb else tmpl
      sa = a[li] if nb else a
      sb = b[li] if nb else b
      key = PREFIX + module
      if emb:
        tensors[key + ".lora_embedding_A"] = np.ascontiguousarray(sa.T)
        tensors[key + ".lora_embedding_B"] = np.ascontiguousarray(sb.T)
      else:
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(sa.T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(sb.T)
      if m is not None:
        tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(m[li] if nb else m)
      if iec:
        for name, v in zip(("A", "B"), betas):
          tensors[f"{key}.lora_default_{name}_scale"] = np.reshape(v[li] if nb else v, (1,))
      if pex.is_router(module, spec):   # not a Linear in transformers: a parameter target
        _plain_for_param_target(lpath, leaf)
        pmods[f"{module}.weight"] = (r, alpha)
      else:
        mods[module] = (r, alpha)
  for (li, param), (A, B) in experts.items():
    chosen = [p for p in spec.peft_params if (li, p) in experts]
    key = PREFIX + pex.wrapper_prefix(spec, li, param, chosen)
    tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = A, B
  if not mods and not pmods:
    raise ValueError("save_adapter: params hold no LoraWeight leaves")
  if len(kinds) > 1:
    names = sorted(("DoRA" if d else f"QA-LoRA (group {g})" if g else "IEC" if i
                    else "plain LoRA") for d, g, i in kinds)
    raise ValueError(f"save_adapter: params mix {', '.join(names)} leaves; PEFT's use_dora / "
                     "use_qalora / qalora_group_size (and use_iec) apply to the whole adapter")
  use_dora, qalora_group, use_iec = kinds.pop()

  every_mod = {**mods, **pmods}
  if cfg is not None:
    r0, alpha0 = int(cfg.rank), float(cfg.alpha)
  else:
    r0 = collections.Counter(r for r, _ in every_mod.values()).most_common(1)[0][0]
    alpha0 = collections.Counter(round(al, 9) for _, al in every_mod.values()).most_common(
        1)[0][0]
  rank_pattern = {mod: r for mod, (r, _) in sorted(every_mod.items()) if r != r0}
  alpha_pattern = {mod: _num(al) for mod, (_, al) in sorted(every_mod.items())
                   if not math.isclose(al, alpha0, rel_tol=1e-6)}
  if pmods and dropout:
    warnings.warn(f"save_adapter: lora_dropout {dropout} is written as 0: PEFT's parameter "
                  "wrappers (the experts / router, target_parameters) refuse dropout; the "
                  "adapter computes the same function", stacklevel=2)
    dropout = 0.0

  # target_modules: short names when they select exactly the adapted modules.
  every = collections.defaultdict(set)
  for lpath, leaf in all_paths:
    nb_leaf = 1 if (getattr(leaf, "ndim", 0) == 3) else 0
    for stacked in ((False, True) if nb_leaf else (False,)):
      t = name_map.path_to_module(lpath, stacked=stacked)
      if t is None:
        continue
      names = [t.format(layer=i) for i in range(leaf.shape[0])] if stacked else [t]
      for n in names:
        every[n.rsplit(".", 1)[-1]].add(n)
  adapted_by_short = collections.defaultdict(set)
  for mod in mods:
    adapted_by_short[mod.rsplit(".", 1)[-1]].add(mod)
  if not mods:
    target_modules = []
  elif all(every[s] == adapted_by_short[s] for s in adapted_by_short):
    target_modules: Any = sorted(adapted_by_short)
  else:
    target_modules = sorted(mods)

  config = {
      "peft_type": "LORA", "task_type": task_type, "r": int(r0), "lora_alpha": _num(alpha0),
      "target_modules": target_modules, "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern, "use_rslora": rslora, "use_dora": use_dora,
      "use_qalora": bool(qalora_group), "qalora_group_size": qalora_group or 16,
      "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
      # full module names: PEFT matches entries as name suffixes, so these select
      # exactly the modules written
      "modules_to_save": sorted(set(saved_modules)) or None, "init_lora_weights": True,
      "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "layers_to_transform": None,
      "layers_pattern": None, "revision": None,
  }
  if pmods:
    config["target_parameters"] = sorted(pmods)
  if use_iec:
    # not a PEFT key (PEFT ignores it with a warning, and the betas' tensors too, and
    # computes the same function from the effective lora_A / lora_B); our loader
    # takes the raw factors back as effective - beta * (mean | repeat)
    config["use_iec"] = True
  # one directory swap: the factors and the config they need are replaced together
  with checkpoint.atomic_directory(path, keep_other_files=True) as tmp:
    checkpoint.write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
    checkpoint.write_json(tmp / CONFIG_NAME, config)


def _plain_for_param_target(lpath: str, leaf) -> None:
  """PEFT's parameter wrappers hold plain LoRA only (no DoRA, QA-LoRA, IEC)."""
  if isinstance(leaf, (DoraWeight, QALoraWeight, IecLoraWeight)):
    raise ValueError(f"{lpath}: a {type(leaf).__name__} on a routed-expert or router weight "
                     "has no PEFT layout: PEFT adapts these as target_parameters, which take "
                     "plain LoRA only")


def _write_full(tensors: dict, lpath: str, leaf: Trainable, name_map: NameTable) -> list[str]:
  """A fully trained leaf as PEFT writes modules_to_save: `<module>.weight` (or `.bias`)
  in PyTorch layout. Returns the PEFT module names written."""
  param = "bias" if lpath.endswith("/bias") else "weight"
  kpath = lpath[:-len("bias")] + "kernel" if param == "bias" else lpath
  value = np.asarray(jnp.asarray(leaf.value))
  for stacked in (False, True):
    tmpl = name_map.path_to_module(kpath, stacked=stacked)
    if tmpl is not None:
      break
  if tmpl is None:
    raise ValueError(f"{lpath}: no entry of the name map {[t for _, t in name_map.modules]} matches "
                     "this modules_to_save leaf; pass save_adapter(..., name_map=...)")
  names = []
  for li in (range(value.shape[0]) if stacked else [None]):
    module = tmpl.format(layer=li) if stacked else tmpl
    v = value[li] if stacked else value
    v = v.T if kpath.endswith("/kernel") and param == "weight" and v.ndim == 2 else v
    tensors[f"{PREFIX}{module}.{param}"] = np.ascontiguousarray(v)
    names.append(module)
  return names


__all__ = ["LLAMA_NAME_MAP", "load_adapter", "save_adapter", "read_adapter_updates",
           "WeightUpdate"]
