"""The `lora-jax train` config file: YAML in, a validated `TrainConfig` out.

The smallest config:

    base_model: path/to/hf-checkpoint
    data: train.jsonl
    eval_data: eval.jsonl        # optional
    output_dir: out/
    lora: {r: 16, alpha: 32, targets: all-linear}
    max_steps: 200
    batch_size: 8
    seq_len: 512
    learning_rate: 2.0e-4
    save_every: 50

Every key, its type and default is a field of `TrainConfig` (and `LoraSection`,
`QuantizeSection`, `MeshSection` for the nested ones). An unknown key is an error that
lists the accepted ones; so is a value of the wrong type. Relative paths are relative
to the config file's directory. The file is parsed with `yaml.safe_load`: data only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import typing
from collections.abc import Mapping
from typing import Any

import yaml

# config files are small; a bigger one is a mistake (or hostile)
MAX_CONFIG_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class LoraSection:
  """The adapter (`lj.LoraConfig`'s options under PEFT's names where PEFT has them)."""
  r: int = 16
  alpha: float = 16.0
  targets: Any = "all-linear"          # "all-linear", a list of module names, or a regex
  dropout: float = 0.0
  rslora: bool = False
  init: str = "default"                # default | gaussian | pissa | olora | loftq
  use_dora: bool = False
  use_qalora: bool = False
  qalora_group_size: int = 16
  use_iec: bool = False
  modules_to_save: Any = None          # a regex or list of parameter-path regexes
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  loftq_iters: int = 1


@dataclasses.dataclass(frozen=True)
class QuantizeSection:
  """Quantize the base's linear kernels before training (QLoRA, ModuLoRA, QA-LoRA):
  `qz.QuantConfig` of the same names. A checkpoint that is already quantized (bnb-4bit,
  compressed-tensors) needs none of this."""
  format: str = "nf4"                  # nf4 | fp4 | int4 | int8 | int2 | int3
  block_size: int | None = None        # default: 64 (absmax formats), 128 (group-wise)
  double_quant: bool | None = None     # default: true for nf4 / fp4 / int4 / int8 absmax
  symmetric: bool | None = None        # group-wise integers: True / False (zero points)
  icq: bool = False                    # IR-QLoRA's information calibration (nf4 / fp4)
  method: str = "rtn"                  # rtn (round to nearest) | gptq (group-wise formats)
  calibration_rows: int = 32           # gptq: packed training rows it calibrates on


@dataclasses.dataclass(frozen=True)
class MeshSection:
  """Device mesh axes. Their product is the number of devices; -1 (at most one axis)
  takes what the others leave. `data` and `fsdp` split the batch; `fsdp` also splits
  the base weights, `model` the projections (tensor parallel)."""
  data: int = -1
  fsdp: int = 1
  model: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  base_model: str
  data: str
  output_dir: str
  max_steps: int
  eval_data: str | None = None
  lora: LoraSection = LoraSection()
  quantize: QuantizeSection | None = None
  batch_size: int = 8                  # rows per micro-batch
  grad_accum: int = 1                  # micro-batches per optimizer step
  seq_len: int = 512
  learning_rate: float = 2.0e-4
  lr_schedule: str = "cosine"          # constant | cosine | linear
  warmup_steps: int = 0
  optimizer: str = "adamw"             # adamw | adam | sgd
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  loraplus_lr_ratio: float | None = None
  remat: str = "none"                  # none | full | dots | dots_no_batch
  compute_dtype: str | None = None     # float32 | bfloat16; default the checkpoint's
  loss_chunk: int = 1024               # tokens per chunk of the cross-entropy
  stacked: bool = True                 # layers under lax.scan
  mesh: MeshSection = MeshSection()
  seed: int = 0
  eval_every: int = 0                  # 0: at the end only
  eval_batches: int | None = None      # None: the whole eval set
  save_every: int = 0                  # 0: at the end only
  keep_checkpoints: int = 3
  log_every: int = 1
  save_merged: bool = False            # also write the merged Hugging Face checkpoint
  fold_qalora: bool = False            # QA-LoRA: also write the folded int4 checkpoint
  resume: bool = True                  # continue from output_dir's last checkpoint
  progress: bool = True                # a tqdm progress bar

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.grad_accum * self.seq_len


_SECTIONS = {"lora": LoraSection, "quantize": QuantizeSection, "mesh": MeshSection}
_CHOICES = {
    ("lora", "init"): ("default", "gaussian", "zeros", "pissa", "olora", "loftq"),
    ("quantize", "format"): ("nf4", "fp4", "int4", "int8", "int2", "int3"),
    ("quantize", "method"): ("rtn", "gptq"),
    ("", "lr_schedule"): ("constant", "cosine", "linear"),
    ("", "optimizer"): ("adamw", "adam", "sgd"),
    ("", "remat"): ("none", "full", "dots", "dots_no_batch"),
    ("", "compute_dtype"): ("float32", "bfloat16", "float16"),
}
_PATHS = ("base_model", "data", "eval_data", "output_dir")


def _check_type(value: Any, hint: Any, where: str) -> Any:
  """`value` checked against a field's annotation (the simple forms used here)."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if hint is Any:
    return value
  if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _check_type(value, a, where)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
  if hint is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{where}: expected an integer, got {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise ValueError(f"{where}: expected a string, got {value!r}")
    return value
  if origin in (Mapping, dict) or hint is Mapping:
    if not isinstance(value, dict):
      raise ValueError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)
  return value


def _build(cls, d: Any, where: str):
  if not isinstance(d, dict):
    raise ValueError(f"{where}: expected a mapping of keys, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                     f"{', '.join(fields)}")
  missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING and n not in d]
  if missing:
    raise ValueError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in d.items():
    key = f"{where}.{name}" if where else name
    if name in _SECTIONS and cls is TrainConfig:
      out[name] = None if value is None and name == "quantize" else _build(
          _SECTIONS[name], value, key)
      continue
    out[name] = _check_type(value, hints[name], key)
  return cls(**out)


def _validate(c: TrainConfig) -> None:
  for (section, name), choices in _CHOICES.items():
    obj = getattr(c, section) if section else c
    if obj is None:
      continue
    v = getattr(obj, name)
    if v is not None and v not in choices:
      key = f"{section}.{name}" if section else name
      raise ValueError(f"{key}: {v!r} is not one of {', '.join(choices)}")
  positive = {"max_steps": c.max_steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
              "seq_len": c.seq_len, "loss_chunk": c.loss_chunk, "lora.r": c.lora.r,
              "keep_checkpoints": c.keep_checkpoints, "log_every": c.log_every}
  for k, v in positive.items():
    if v < 1:
      raise ValueError(f"{k}: must be >= 1, got {v}")
  for k in ("warmup_steps", "eval_every", "save_every"):
    if getattr(c, k) < 0:
      raise ValueError(f"{k}: must be >= 0, got {getattr(c, k)}")
  if c.seq_len < 2:
    raise ValueError(f"seq_len: must be >= 2 (a token and its target), got {c.seq_len}")
  if not c.learning_rate > 0:
    raise ValueError(f"learning_rate: must be > 0, got {c.learning_rate}")
  if not 0 <= c.lora.dropout < 1:
    raise ValueError(f"lora.dropout: must be in [0, 1), got {c.lora.dropout}")
  q = c.quantize
  if q is not None and q.method == "gptq":
    if q.symmetric is None or q.format in ("nf4", "fp4"):
      raise ValueError(f"quantize.method: gptq quantizes to the group-wise integer formats: "
                       f"set quantize.format to int2 | int3 | int4 | int8 and "
                       f"quantize.symmetric to true or false (got format {q.format!r}, "
                       f"symmetric {q.symmetric!r})")
    if q.calibration_rows < 1:
      raise ValueError(f"quantize.calibration_rows: must be >= 1, got {q.calibration_rows}")
    if q.icq:
      raise ValueError("quantize.icq: ICQ calibrates NF4 / FP4 codes; not with gptq")
  if c.fold_qalora and not c.lora.use_qalora:
    raise ValueError("fold_qalora: true needs lora.use_qalora: true")
  axes = [c.mesh.data, c.mesh.fsdp, c.mesh.model]
  if sum(a == -1 for a in axes) > 1 or any(a == 0 or a < -1 for a in axes):
    raise ValueError(f"mesh: {dataclasses.asdict(c.mesh)}: each axis is a positive size, "
                     "at most one is -1 (the devices left)")


def from_dict(d: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> TrainConfig:
  """A `TrainConfig` from a mapping (a parsed YAML file); relative paths are taken
  relative to `base_dir` when given."""
  c = _build(TrainConfig, dict(d), "")
  _validate(c)
  if base_dir is not None:
    root = pathlib.Path(base_dir)
    fix = {k: str(root / getattr(c, k)) for k in _PATHS
           if getattr(c, k) is not None and not os.path.isabs(getattr(c, k))}
    c = dataclasses.replace(c, **fix)
  return c


def load_config(path: str | os.PathLike) -> TrainConfig:
  """Read and validate a YAML config file (`yaml.safe_load`: data, never code)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p}: config file not found")
  if p.stat().st_size > MAX_CONFIG_BYTES:
    raise ValueError(f"{p}: {p.stat().st_size} bytes; a config file is at most "
                     f"{MAX_CONFIG_BYTES}")
  try:
    d = yaml.safe_load(p.read_text(encoding="utf-8"))
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ValueError(f"{p}: not a YAML file: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{p}: expected a mapping of keys at the top, got {type(d).__name__}")
  try:
    return from_dict(d, p.parent)
  except ValueError as e:
    raise ValueError(f"{p}: {e}") from None


def accepted_keys() -> dict[str, list[str]]:
  """Every accepted key, by section ("" for the top level): for docs and errors."""
  out = {"": [f.name for f in dataclasses.fields(TrainConfig)]}
  for name, cls in _SECTIONS.items():
    out[name] = [f.name for f in dataclasses.fields(cls)]
  return out


__all__ = ["TrainConfig", "LoraSection", "QuantizeSection", "MeshSection", "load_config",
           "from_dict", "accepted_keys"]
