"""Files lora_jax reads and writes: safetensors and JSON, read with errors that name
the file, written to a temporary name and renamed into place (nothing half-written)."""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def read_json(path: pathlib.Path, what: str) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: {what} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{path}: {what} must hold a JSON object, got {type(d).__name__}")
  return d


def read_safetensors(path: pathlib.Path | str) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file as numpy arrays (bfloat16 via ml_dtypes).

  Raises `ValueError` naming the file when it is truncated or not safetensors.
  """
  from safetensors import SafetensorError, safe_open
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: safetensors file not found")
  out = {}
  try:
    with safe_open(str(path), framework="flax") as f:
      for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
        out[k] = np.asarray(f.get_tensor(k))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read safetensors (truncated or corrupt?): {e}") from e
  return out


def write_safetensors(path: pathlib.Path | str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write `tensors` to `path` through a temporary file and a rename."""
  from safetensors.flax import save_file
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json(path: pathlib.Path | str, obj: Any) -> None:
  """Write `obj` as JSON through a temporary file and a rename."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


__all__ = ["read_json", "read_safetensors", "write_json", "write_safetensors"]
