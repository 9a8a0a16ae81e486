"""Minimal safetensors reading and streaming writing, one tensor at a time.

Reading parses the header and `pread`s exactly one tensor's bytes into a fresh
numpy buffer (no memory map), so the process holds only the tensors it is working
on. bf16 and fp8 use `ml_dtypes`. Writing lays out the header from the planned
names, dtypes and shapes first, then streams each tensor's bytes to its offset.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class TensorInfo:
  __slots__ = ("name", "file", "dtype", "shape", "start", "end")

  def __init__(self, name, file, dtype, shape, start, end):
    self.name, self.file, self.dtype, self.shape = name, file, dtype, tuple(shape)
    self.start, self.end = start, end

  @property
  def nbytes(self) -> int:
    return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
  """`{name: TensorInfo}` of one safetensors file."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 100_000_000:
      raise ValueError(f"{path}: not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
  base = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    code = meta["dtype"]
    if code not in DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {code}")
    s, e = meta["data_offsets"]
    out[name] = TensorInfo(name, path, code, meta["shape"], base + s, base + e)
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """The tensor's data as a numpy array (a fresh buffer)."""
  buf = bytearray(info.nbytes)
  with open(info.file, "rb", buffering=0) as f:
    f.seek(info.start)
    view = memoryview(buf)
    got = 0
    while got < info.nbytes:
      r = f.readinto(view[got:])
      if not r:
        raise ValueError(f"{info.file}: truncated data for tensor {info.name}")
      got += r
  return np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


class ShardWriter:
  """Writes one safetensors file whose tensors are known in advance, in any order."""

  def __init__(self, path: str, specs: list[tuple[str, str, tuple]], metadata=None):
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    self.offsets = {}
    for name, code, shape in specs:
      n = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
      header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
      self.offsets[name] = (off, n, code, tuple(shape))
      off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self.base = 8 + len(raw)
    self.f = open(path, "wb")
    self.f.write(struct.pack("<Q", len(raw)))
    self.f.write(raw)
    self.f.truncate(self.base + off)
    self.size = off

  def write(self, name: str, arr: np.ndarray) -> None:
    off, n, code, shape = self.offsets[name]
    arr = np.ascontiguousarray(arr)
    if arr.dtype != DTYPES[code] or tuple(arr.shape) != shape:
      raise ValueError(f"{name}: writing {arr.dtype} {arr.shape}, planned {code} {shape}")
    self.f.seek(self.base + off)
    self.f.write(memoryview(arr.reshape(-1).view(np.uint8)))

  def close(self):
    self.f.close()


__all__ = ["DTYPES", "CODES", "TensorInfo", "read_header", "read_tensor", "ShardWriter"]
