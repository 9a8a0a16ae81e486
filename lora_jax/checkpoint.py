"""Checkpoint and adapter files: every file lora_jax reads or writes goes through here.

Reading treats files as data, never code, and trusts nothing in them:

- safetensors headers are validated as the `safetensors` library validates them (header
  length inside the file, UTF-8 JSON object, known dtype, shape of non-negative
  integers, offsets contiguous and non-overlapping from 0 to the end of the file, byte
  size = prod(shape) * itemsize) before any tensor buffer is allocated;
  `read_tensor` then reads one tensor's bytes (no memory map), so a caller holds only
  the tensors it is working on;
- a checkpoint directory (`model.safetensors`, or shards listed by
  `model.safetensors.index.json`) is read only inside the directory the caller named:
  absolute names, `..` and symlinks that lead out of it are refused, naming the index
  and the entry; missing shards, tensors listed twice or in the wrong shard are errors;
- JSON (`config.json`, `adapter_config.json`, indices) errors name the file, line and
  column.

Writing is atomic per directory: `atomic_directory(out)` gives a temporary sibling
directory (`.lora-jax-tmp-<pid>-<hex>-<name>`), and on success swaps it into place
with one rename (Linux `renameat2(RENAME_EXCHANGE)` when the old directory exists), so
an interrupted write leaves the old contents or the new, never a mix. The next write
next to it removes the temporary directories an interrupted run left (only names with
that prefix whose process is gone).

Tensor names: a `NameTable` maps Hugging Face module names to parameter paths
(`model.layers.{layer}.self_attn.{proj}` <-> `layers/{layer}/self_attn/{proj}/kernel`);
it is data, so a model family supplies its own. `LLAMA` is the reference model's.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import math
import os
import pathlib
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

# ----------------------------------------------------------------------------
# dtypes

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000     # the safetensors library's limit
MAX_JSON_BYTES = 100_000_000
TMP_PREFIX = ".lora-jax-tmp-"
_TMP_RX = re.compile(r"\.lora-jax-tmp-(\d+)-([0-9a-f]{32})-(.+)")


def code_of(dtype: Any) -> str:
  """The safetensors dtype code (`"BF16"`, ...) of a numpy / JAX dtype."""
  dt = np.dtype(dtype)
  if dt not in CODES:
    raise TypeError(f"dtype {dt} has no safetensors code; supported: {sorted(CODES, key=str)}")
  return CODES[dt]


# ----------------------------------------------------------------------------
# paths inside a directory

def inside(root: str | os.PathLike, name: Any, where: str) -> pathlib.Path:
  """`root / name`, refused unless it stays inside `root` (after symlinks).

  Args:
    root: the directory the user named.
    name: a relative file name from a file (an index entry, ...) or our own constant.
    where: what to name in the error (the index file and entry, ...).

  Raises:
    ValueError: `name` is not a non-empty string, is absolute, has a `..` component, or
      resolves (through symlinks) outside `root`.
  """
  root = pathlib.Path(root)
  if not isinstance(name, str) or not name or "\0" in name:
    raise ValueError(f"{where}: file name {name!r} must be a non-empty string")
  pure = pathlib.PurePosixPath(name.replace("\\", "/"))
  if pure.is_absolute() or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
    raise ValueError(f"{where}: file name {name!r} is absolute; only names inside {root} "
                     "are read")
  if ".." in pure.parts:
    raise ValueError(f"{where}: file name {name!r} leaves {root} ('..'); only names inside "
                     "it are read")
  path = root / pure
  real_root = root.resolve()
  real = path.resolve()
  if real != real_root and real_root not in real.parents:
    raise ValueError(f"{where}: {path} resolves to {real}, outside {real_root} (a symlink "
                     "out of the directory); only files inside it are read")
  return path


def _check_file(path: pathlib.Path, what: str) -> None:
  if not path.exists():
    raise FileNotFoundError(f"{path}: {what} not found")
  if not path.is_file():
    raise ValueError(f"{path}: {what} is not a regular file"
                     + (" (a directory)" if path.is_dir() else ""))


# ----------------------------------------------------------------------------
# JSON

def _no_duplicates(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"key {k!r} appears twice")
    out[k] = v
  return out


def _no_constant(name):
  raise ValueError(f"{name} is not JSON")


def loads_json(text: str, *, allow_nan: bool = True) -> Any:
  """`json.loads` that refuses a key given twice in one object (Python keeps the last
  one silently) and, with `allow_nan=False`, the non-standard NaN / Infinity / -Infinity
  constants. The one JSON parser of the data readers (checkpoint headers and configs,
  JSONL training data, request bodies).

  Raises:
    json.JSONDecodeError: not JSON (with `msg`, `lineno`, `colno`).
    ValueError: a duplicate key or a refused constant, naming it.
    RecursionError: nesting deeper than Python's recursion limit.
  """
  return json.loads(text, object_pairs_hook=_no_duplicates,
                    **({} if allow_nan else {"parse_constant": _no_constant}))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
  """A JSON object from `path`; every error names the file (and line and column).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a regular file, larger than 100 MB, not UTF-8, not JSON, a key
      given twice, or not an object.
  """
  path = pathlib.Path(path)
  _check_file(path, what)
  size = path.stat().st_size
  if size > MAX_JSON_BYTES:
    raise ValueError(f"{path}: {what} is {size} bytes; more than {MAX_JSON_BYTES} is refused")
  return _json_object(path, path.read_bytes(), what)


def _json_object(path: pathlib.Path, raw: bytes, what: str, offset: int = 0) -> dict:
  """`raw` (UTF-8 JSON, found at byte `offset` of `path`) parsed as one object without
  duplicate keys; errors name the file, the byte offset or line and column."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: {what} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                     f"{offset + e.start})") from None
  try:
    d = loads_json(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno} column "
                     f"{e.colno}") from None
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{path}: {what} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: {what} must hold a JSON object, got {type(d).__name__}")
  return d


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write `obj` as JSON (sorted keys, indent 2) through a temporary file and a rename."""
  path = pathlib.Path(path)
  data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
  _write_bytes(path, [data])


def _write_bytes(path: pathlib.Path, chunks) -> None:
  tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{path.name}")
  try:
    with open(tmp, "wb") as f:
      for c in chunks:
        f.write(c)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise _named(e, path) from None
  finally:
    if os.path.lexists(tmp):
      tmp.unlink()


def _named(e: OSError, path) -> OSError:
  """The OS error again, with the path we were writing in its message."""
  cls = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
  return cls(e.errno, f"{path}: cannot write: {e.strerror or e}")


# ----------------------------------------------------------------------------
# safetensors: one file

@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor of a safetensors file lives: `file`, dtype code, shape, and its
  byte range `[start, end)` from the beginning of the file."""
  name: str
  file: str
  dtype: str
  shape: tuple
  start: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.start


def _header_bytes(path: pathlib.Path) -> tuple[bytes, int, int]:
  """(header JSON bytes, header length n, file size), checked against the file size."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the "
                       "8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
      raise ValueError(f"{path}: not a safetensors file (header length {n} > "
                       f"{MAX_HEADER_BYTES})")
    if 8 + n > size:
      raise ValueError(f"{path}: truncated or corrupt: header length {n} but the "
                       f"file has {size} bytes")
    raw = f.read(n)
  if len(raw) != n:
    raise ValueError(f"{path}: truncated while reading the {n}-byte header")
  return raw, n, size


def _parse_header(path: pathlib.Path, raw: bytes) -> dict:
  if not raw.startswith(b"{"):
    raise ValueError(f"{path}: safetensors header must be a JSON object, starts with "
                     f"{raw[:16]!r}")
  header = _json_object(path, raw, "safetensors header", offset=8)
  meta = header.get("__metadata__")
  if meta is not None and (not isinstance(meta, dict)
                           or not all(isinstance(v, str) for v in meta.values())):
    raise ValueError(f"{path}: safetensors __metadata__ must be an object of strings, got "
                     f"{meta!r:.200}")
  return header


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: pathlib.Path, name: str, meta: Any, base: int) -> TensorInfo:
  """One header entry, checked: dtype known, shape and offsets non-negative integers,
  byte size = prod(shape) * itemsize."""
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: tensor {name!r}: header entry must be an object, got {meta!r:.100}")
  for k in ("dtype", "shape", "data_offsets"):
    if k not in meta:
      raise ValueError(f"{path}: tensor {name!r}: header entry has no {k!r} ({meta!r:.200})")
  code, shape, offs = meta["dtype"], meta["shape"], meta["data_offsets"]
  if not isinstance(code, str) or code not in DTYPES:
    raise ValueError(f"{path}: tensor {name!r} has unknown dtype {code!r}; supported: "
                     f"{sorted(DTYPES)}")
  if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
    raise ValueError(f"{path}: tensor {name!r}: shape {shape!r:.100} must be a list of "
                     "non-negative integers")
  if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
      or offs[0] > offs[1]):
    raise ValueError(f"{path}: tensor {name!r}: data_offsets {offs!r:.100} must be "
                     "[start, end] with 0 <= start <= end")
  want = math.prod(shape) * DTYPES[code].itemsize
  if offs[1] - offs[0] != want:
    raise ValueError(f"{path}: tensor {name!r} {code} {tuple(shape)} needs {want} bytes but "
                     f"its data_offsets {offs} span {offs[1] - offs[0]}")
  return TensorInfo(name, str(path), code, tuple(shape), base + offs[0], base + offs[1])


def _check_layout(path: pathlib.Path, infos: list[TensorInfo], base: int, size: int) -> None:
  """Tensors contiguous from the end of the header to the end of the file, no overlap."""
  for t in infos:
    if t.end > size:
      raise ValueError(f"{path}: tensor {t.name!r} {t.dtype} {t.shape} ends at byte {t.end}, "
                       f"beyond the end of the file ({size} bytes): truncated or corrupt")
  pos = base
  for t in sorted(infos, key=lambda t: (t.start, t.end)):
    if t.start != pos:
      what = "overlaps the previous tensor" if t.start < pos else "leaves a gap before it"
      raise ValueError(f"{path}: tensor {t.name!r} data_offsets [{t.start - base}, "
                       f"{t.end - base}] {what} (expected start {pos - base})")
    pos = t.end
  if pos != size:
    raise ValueError(f"{path}: truncated or corrupt: the header's tensors end at byte {pos} "
                     f"but the file has {size} bytes")


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """`{name: TensorInfo}` of one safetensors file, validated before anything is read.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file (and the tensor): too short, header length beyond the
      file or above 100 MB, header not a UTF-8 JSON object, a key twice, unknown dtype,
      bad shape, offsets that overlap, leave gaps, disagree with shape x itemsize or do
      not end at the end of the file.
  """
  path = pathlib.Path(path)
  _check_file(path, "safetensors file")
  raw, n, size = _header_bytes(path)
  header = _parse_header(path, raw)
  base = 8 + n
  infos = [_entry(path, k, v, base) for k, v in header.items() if k != "__metadata__"]
  _check_layout(path, infos, base, size)
  return {t.name: t for t in infos}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The `__metadata__` strings of a (valid) safetensors file."""
  read_header(path)
  raw, _, _ = _header_bytes(pathlib.Path(path))
  return dict(_parse_header(pathlib.Path(path), raw).get("__metadata__") or {})


def read_tensor(info: TensorInfo) -> np.ndarray:
  """The tensor's data as a numpy array (a fresh buffer; bf16 / fp8 via ml_dtypes)."""
  buf = bytearray(info.nbytes)
  view = memoryview(buf)
  with open(info.file, "rb", buffering=0) as f:
    f.seek(info.start)
    got = 0
    while got < info.nbytes:
      r = f.readinto(view[got:])
      if not r:
        raise ValueError(f"{info.file}: truncated data for tensor {info.name!r} "
                         f"({info.dtype} {info.shape}: {got} of {info.nbytes} bytes)")
      got += r
  return np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one safetensors file as numpy arrays, after `read_header`'s checks."""
  return {k: read_tensor(t) for k, t in read_header(path).items()}


def _header_json(specs: Sequence[tuple[str, str, tuple]],
                 metadata: Mapping[str, str] | None) -> tuple[bytes, dict]:
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  off, offsets = 0, {}
  for name, code, shape in specs:
    if name in offsets or name == "__metadata__":
      raise ValueError(f"safetensors: tensor name {name!r} given twice (or reserved)")
    n = math.prod(shape) * DTYPES[code].itemsize
    header[name] = {"dtype": code, "shape": [int(d) for d in shape],
                    "data_offsets": [off, off + n]}
    offsets[name] = (off, n, code, tuple(int(d) for d in shape))
    off += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw, offsets


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write `tensors` (numpy or JAX arrays) to `path` through a temporary file and a rename.

  The layout is the `safetensors` library's: an 8-byte aligned header, then the tensors'
  C-order bytes ordered by itemsize (largest first) and name, so each is aligned.
  """
  path = pathlib.Path(path)
  arrs = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  arrs = dict(sorted(arrs.items(), key=lambda kv: (-kv[1].dtype.itemsize, kv[0])))
  specs = [(k, code_of(a.dtype), a.shape) for k, a in arrs.items()]
  head, _ = _header_json(specs, metadata)
  _write_bytes(path, [head] + [memoryview(a.reshape(-1).view(np.uint8)) for a in arrs.values()])


class ShardWriter:
  """Writes one safetensors file whose tensors are known in advance, in any order.

  Args:
    path: the file to write (inside an `atomic_directory`: not renamed itself).
    specs: `(name, dtype code, shape)` per tensor, in file order.
    metadata: `__metadata__` strings (default `{"format": "pt"}`).
  """

  def __init__(self, path: str | os.PathLike, specs: Sequence[tuple[str, str, tuple]],
               metadata: Mapping[str, str] | None = None):
    for name, code, _ in specs:
      if code not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r}: unknown dtype code {code!r}")
    head, self.offsets = _header_json(specs, metadata or {"format": "pt"})
    self.path = str(path)
    self.base = len(head)
    self.size = sum(n for _, n, _, _ in self.offsets.values())
    try:
      self.f = open(path, "wb")
      self.f.write(head)
    except OSError as e:
      raise _named(e, path) from None

  def write(self, name: str, arr: np.ndarray) -> None:
    """Write one planned tensor (its dtype and shape must be the planned ones)."""
    off, n, code, shape = self.offsets[name]
    arr = np.asarray(arr, order="C")
    if arr.dtype != DTYPES[code] or tuple(arr.shape) != shape:
      raise ValueError(f"{self.path}: tensor {name!r}: writing {arr.dtype} {arr.shape}, "
                       f"planned {code} {shape}")
    try:
      self.f.seek(self.base + off)
      self.f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    except OSError as e:
      raise _named(e, self.path) from None

  def close(self) -> None:
    try:
      self.f.truncate(self.base + self.size)   # tensors never written read as zeros
      self.f.flush()
      os.fsync(self.f.fileno())
    except OSError as e:
      raise _named(e, self.path) from None
    finally:
      self.f.close()


# ----------------------------------------------------------------------------
# safetensors: a checkpoint directory

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_files(root: str | os.PathLike, *, any_safetensors: bool = False
                     ) -> tuple[list[pathlib.Path], dict[str, str] | None]:
  """The safetensors files of a checkpoint directory, and the index's weight map.

  `model.safetensors` if present, else the shards of `model.safetensors.index.json`
  (each checked to stay inside `root`); with `any_safetensors`, else every
  `*.safetensors` in `root`.

  Raises:
    FileNotFoundError: no such directory, no checkpoint file, a missing shard.
    ValueError: an index that is not JSON, has no `weight_map` object of strings, or
      names a shard outside `root` (absolute, `..`, a symlink out).
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such checkpoint directory")
  single, index = root / SINGLE, root / INDEX
  if os.path.lexists(single):
    return [inside(root, SINGLE, str(root))], None
  if os.path.lexists(index):
    idx = read_json(inside(root, INDEX, str(root)), "safetensors index")
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
      raise ValueError(f"{index}: needs a non-empty 'weight_map' object, got {wm!r:.100}")
    bad = [k for k, v in wm.items() if not isinstance(v, str)]
    if bad:
      raise ValueError(f"{index}: weight_map entry {bad[0]!r} must name a file, got "
                       f"{wm[bad[0]]!r:.100}")
    files = []
    for shard in sorted(set(wm.values())):
      key = next(k for k, v in wm.items() if v == shard)
      p = inside(root, shard, f"{index}: weight_map[{key!r}]")
      if not p.exists():
        raise FileNotFoundError(f"{index}: shard {shard!r} (weight_map[{key!r}]) is missing: {p}")
      files.append(p)
    return files, wm
  if any_safetensors:
    files = sorted(p for p in root.iterdir() if p.name.endswith(".safetensors"))
    if files:
      return [inside(root, p.name, str(root)) for p in files], None
  raise FileNotFoundError(f"{root}: no {SINGLE}, no {INDEX}"
                          + (" and no *.safetensors" if any_safetensors else "") + " found")


def checkpoint_headers(root: str | os.PathLike, *, any_safetensors: bool = False
                       ) -> dict[str, TensorInfo]:
  """`{tensor name: TensorInfo}` over all files of a checkpoint directory (headers
  only, validated). With an index, every listed tensor must be in the shard it names
  and no tensor may be in two shards.

  Raises: as `checkpoint_files` and `read_header`, and ValueError for a tensor in two
  files, a listed tensor missing from its shard, or a tensor in a shard the index
  gives to another file.
  """
  files, wm = checkpoint_files(root, any_safetensors=any_safetensors)
  out: dict[str, TensorInfo] = {}
  for f in files:
    for name, info in read_header(f).items():
      if name in out:
        raise ValueError(f"{root}: tensor {name!r} is in two files: {out[name].file} and {f}")
      out[name] = info
  if wm is not None:
    index = pathlib.Path(root) / INDEX
    for name, info in out.items():
      want = wm.get(name)
      if want is not None and inside(root, want, str(index)).resolve() != pathlib.Path(
          info.file).resolve():
        raise ValueError(f"{index}: weight_map says tensor {name!r} is in {want!r}, but it is "
                         f"in {info.file}")
    missing = sorted(set(wm) - set(out))
    if missing:
      raise ValueError(f"{index}: tensors listed in weight_map are not in their shards: "
                       f"{missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5
                                           else ""))
  return out


def read_checkpoint(root: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (`checkpoint_headers`' checks) as numpy arrays."""
  return {k: read_tensor(t) for k, t in checkpoint_headers(root).items()}


def read_config(root: str | os.PathLike, *, required: bool = True) -> dict:
  """`config.json` of a checkpoint directory (inside it); `{}` when absent and not required."""
  root = pathlib.Path(root)
  if not required and not os.path.lexists(root / "config.json"):
    return {}
  return read_json(inside(root, "config.json", str(root)), "config.json")


# ----------------------------------------------------------------------------
# atomic directories

def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_stale(out: str | os.PathLike) -> list[pathlib.Path]:
  """Remove the temporary siblings an interrupted write of `out` left behind.

  Only names `.lora-jax-tmp-<pid>-<32 hex>-<out's name>` next to `out` whose process
  `<pid>` no longer runs are removed; returns them.
  """
  out = pathlib.Path(os.path.abspath(out))
  parent = out.parent
  removed = []
  if not parent.is_dir():
    return removed
  for p in parent.iterdir():
    m = _TMP_RX.fullmatch(p.name)
    if m is None or m.group(3) != out.name or _alive(int(m.group(1))):
      continue
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p, ignore_errors=True)
    else:
      p.unlink(missing_ok=True)
    removed.append(p)
  return removed


def _renameat2():
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    f = libc.renameat2
  except (OSError, AttributeError):
    return None
  f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  f.restype = ctypes.c_int
  return f


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  f = _renameat2()
  if f is None:
    return False
  if f(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  e = ctypes.get_errno()
  if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(e, f"{b}: cannot swap in the new contents from {a}: {os.strerror(e)}", str(b))


def _fsync_tree(d: pathlib.Path) -> None:
  for sub, _, files in os.walk(d):
    for fn in files:
      fd = os.open(os.path.join(sub, fn), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
  fd = os.open(d, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _carry_over(old: pathlib.Path, new: pathlib.Path, replaced: Sequence[str]) -> None:
  """Hard-link (else copy) the entries of `old` that `new` does not write and that match
  no pattern of `replaced`, so a save into a directory keeps the user's other files."""
  for p in old.iterdir():
    if (new / p.name).exists() or any(re.fullmatch(r, p.name) for r in replaced):
      continue
    if p.is_dir() and not p.is_symlink():
      shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(p, new / p.name)


def _link_or_copy(src, dst) -> None:
  if os.path.islink(src):
    os.symlink(os.readlink(src), dst)
    return
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def _swap_in(tmp: pathlib.Path, out: pathlib.Path) -> None:
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  if _exchange(tmp, out):                        # tmp now holds the old contents
    shutil.rmtree(tmp, ignore_errors=True)
    return
  trash = out.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{out.name}")
  os.rename(out, trash)                          # no RENAME_EXCHANGE: two renames
  os.rename(tmp, out)
  shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, keep_other_files: bool = False,
                     replaced: Sequence[str] = ()) -> Iterator[pathlib.Path]:
  """Write a whole directory at once: yields an empty temporary sibling directory; when
  the block ends without an exception it replaces `path` in one rename (the old
  contents, if any, are deleted after). On an exception, or a kill, `path` keeps its old
  contents (or stays absent); the next `atomic_directory` of the same `path` removes
  the temporary directory an earlier killed run left (`clean_stale`).

  Args:
    path: the directory to (re)write; its parent is created if missing.
    keep_other_files: carry over (hard links) the old directory's entries that the new
      one does not write, except names matching a regex of `replaced`.
    replaced: regexes (fullmatch) of old file names not to carry over.

  Raises:
    ValueError: `path` exists and is not a directory.
    OSError: naming `path`, when writing fails (disk full, ...); nothing is left behind.
  """
  out = pathlib.Path(os.path.abspath(path))
  if os.path.lexists(out) and not out.is_dir():
    raise ValueError(f"{out}: exists and is not a directory; refusing to replace it")
  cwd = pathlib.Path.cwd()
  if out == out.parent or out == cwd or out in cwd.parents:
    raise ValueError(f"{out}: is the working directory or one of its parents; a directory "
                     "written atomically replaces its path, so name a subdirectory")
  parent = out.parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _named(e, parent) from None
  clean_stale(out)
  tmp = parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{out.name}"
  try:
    tmp.mkdir()
  except OSError as e:
    raise _named(e, out) from None
  try:
    yield tmp
    if keep_other_files and out.is_dir():
      _carry_over(out, tmp, replaced)
    _fsync_tree(tmp)
    _swap_in(tmp, out)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if str(out) in str(e):
      raise
    raise _named(e, out) from e
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_inside(src_root: str | os.PathLike, name: str, dst_dir: str | os.PathLike) -> bool:
  """Copy `src_root/name` to `dst_dir/name` if it exists as a regular file inside
  `src_root` (a symlink out of `src_root` raises); returns whether it was copied."""
  src_root = pathlib.Path(src_root)
  if not os.path.lexists(src_root / name):
    return False
  src = inside(src_root, name, str(src_root))
  if not src.is_file():
    raise ValueError(f"{src}: expected a regular file")
  try:
    shutil.copyfile(src, pathlib.Path(dst_dir) / name)
  except OSError as e:
    raise _named(e, pathlib.Path(dst_dir) / name) from None
  return True


# ----------------------------------------------------------------------------
# Hugging Face names <-> parameter paths

@functools.lru_cache(maxsize=None)
def _template_regex(template: str, sep: str) -> re.Pattern:
  out, pos = [], 0
  for mt in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:mt.start()]))
    name = mt.group(1)
    out.append(rf"(?P<{name}>\d+)" if name == "layer" else rf"(?P<{name}>[^{re.escape(sep)}]+)")
    pos = mt.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out))


def _drop_layer(template: str) -> str | None:
  return template.replace("{layer}/", "") if "{layer}/" in template else None


@dataclasses.dataclass(frozen=True)
class NameTable:
  """How one model family names its tensors, as data.

  `modules` is a sequence of `(hf_module_template, weight_path_template)` pairs:
  `("model.layers.{layer}.self_attn.{proj}", "layers/{layer}/self_attn/{proj}/kernel")`.
  A `{placeholder}` matches one name component; `{layer}` matches a layer number, and
  when parameters are stacked for `scan` the `{layer}/` component is absent from the
  path and the number indexes the leading axis. The first matching pair wins.

  A module's HF tensors are `<module>.weight` (-> the template's path: a `kernel` is
  the PyTorch `(out, in)` weight transposed, `embedding` / `scale` are as stored) and
  `<module>.bias` (-> the kernel path with `kernel` replaced by `bias`). `ignore`
  holds regexes (fullmatch) of HF tensors that are buffers, not parameters.
  """
  modules: tuple[tuple[str, str], ...]
  ignore: tuple[str, ...] = ()

  def __post_init__(self):
    pairs = tuple((str(a), str(b)) for a, b in self.modules)
    object.__setattr__(self, "modules", pairs)
    object.__setattr__(self, "ignore", tuple(self.ignore))

  def module_to_path(self, module: str) -> tuple[str, str, int] | None:
    """HF module name -> (unrolled weight path, stacked path or "", layer or -1)."""
    for hf_t, path_t in self.modules:
      mt = _template_regex(hf_t, ".").fullmatch(module)
      if mt is None:
        continue
      groups = mt.groupdict()
      path = path_t.format(**groups)
      stacked_t = _drop_layer(path_t)
      stacked = stacked_t.format(**{k: v for k, v in groups.items() if k != "layer"}) \
          if stacked_t is not None and "layer" in groups else ""
      return path, stacked, int(groups["layer"]) if "layer" in groups else -1
    return None

  def path_to_module(self, path: str, stacked: bool = False) -> str | None:
    """Weight path -> HF module name (a template with "{layer}" left in when stacked)."""
    for hf_t, path_t in self.modules:
      if stacked:
        st = _drop_layer(path_t)
        if st is None:
          continue
        mt = _template_regex(st, "/").fullmatch(path)
        if mt is not None:
          return hf_t.replace("{layer}", "\0").format(**mt.groupdict()).replace("\0", "{layer}")
      else:
        mt = _template_regex(path_t, "/").fullmatch(path)
        if mt is not None:
          return hf_t.format(**mt.groupdict())
    return None

  def ignored(self, tensor: str) -> bool:
    return any(re.fullmatch(r, tensor) for r in self.ignore)

  def tensor_to_path(self, tensor: str) -> tuple[str, bool] | None:
    """HF tensor name (`...q_proj.weight`) -> (parameter path, transpose?) or None."""
    module, _, param = tensor.rpartition(".")
    hit = self.module_to_path(module) if module else None
    if hit is None:
      return None
    path = param_path(hit[0], param)
    if path is None:
      return None
    return path, path.endswith("/kernel")

  def path_to_tensor(self, path: str) -> tuple[str, bool] | None:
    """Parameter path -> (HF tensor name, transpose?) or None."""
    if path.endswith("/bias"):
      module = self.path_to_module(path[:-len("bias")] + "kernel")
      return (f"{module}.bias", False) if module is not None else None
    module = self.path_to_module(path)
    return (f"{module}.weight", path.endswith("/kernel")) if module is not None else None


def param_path(weight_path: str, param: str) -> str | None:
  """The path of a module's `weight` / `bias` from the table's weight path."""
  if param == "weight":
    return weight_path
  if param == "bias" and weight_path.endswith("/kernel"):
    return weight_path[:-len("kernel")] + "bias"
  return None


def as_table(name_map: NameTable | Sequence[tuple[str, str]] | None,
             default: NameTable) -> NameTable:
  """A `NameTable` from a table, a sequence of `(hf, path)` pairs, or None (`default`)."""
  if name_map is None:
    return default
  if isinstance(name_map, NameTable):
    return name_map
  return NameTable(tuple(name_map))


LLAMA = NameTable(
    modules=(
        ("model.layers.{layer}.self_attn.{proj}", "layers/{layer}/self_attn/{proj}/kernel"),
        ("model.layers.{layer}.mlp.{proj}", "layers/{layer}/mlp/{proj}/kernel"),
        ("model.embed_tokens", "embed_tokens/embedding"),
        ("lm_head", "lm_head/kernel"),
        # norms: only ever trained in full (modules_to_save)
        ("model.layers.{layer}.{norm}", "layers/{layer}/{norm}/scale"),
        ("model.norm", "norm/scale"),
    ),
    ignore=(r".*\.rotary_emb\.inv_freq",),
)

# ----------------------------------------------------------------------------
# a checkpoint opened for streaming (the merge and extract-lora command lines)

class AdaptedTensor:
  """A base tensor seen through a PEFT adapter (mergekit's `model+lora` reference):
  read like a `TensorInfo` (`read_any`), it gives the updated weight (`W + s * B @ A`,
  DoRA, or a modules_to_save copy), computed when the tensor is read."""
  __slots__ = ("info", "update")

  def __init__(self, info: TensorInfo, update: Any):
    self.info, self.update = info, update

  name = property(lambda self: self.info.name)
  file = property(lambda self: self.info.file)
  dtype = property(lambda self: self.info.dtype)
  shape = property(lambda self: self.info.shape)
  nbytes = property(lambda self: self.info.nbytes)

  def read(self) -> np.ndarray:
    try:
      return self.update.apply(read_tensor(self.info))
    except ValueError as e:
      raise ValueError(f"{self.info.file}: tensor {self.info.name}: {e}") from None


def read_any(info: TensorInfo | AdaptedTensor) -> np.ndarray:
  """A tensor's data, through its adapter when it has one."""
  return info.read() if isinstance(info, AdaptedTensor) else read_tensor(info)


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint directory opened for streaming: `config` (config.json, `{}` when
  absent) and `tensors` `{name: TensorInfo | AdaptedTensor}` (headers only)."""
  ref: str
  path: str
  config: dict
  tensors: dict


def open_checkpoint(ref: str) -> Checkpoint:
  """Open a local checkpoint reference for tensor-by-tensor reading.

  `ref` is a directory (`~` expanded) with `model.safetensors`, or an index and its
  shards, or else `*.safetensors` files; or mergekit's `DIR+ADAPTER_DIR`: the base seen
  through a PEFT adapter. Nothing is downloaded; every file read is inside the
  directory named.

  Raises:
    FileNotFoundError: naming the reference, for a missing directory or file.
    ValueError: naming the file and entry, for anything `checkpoint_headers`,
      `read_json` or the adapter reader refuse, or an adapter tensor without a base
      tensor.
  """
  if not isinstance(ref, str):
    raise ValueError(f"model reference {ref!r} must be a path string")
  if "+" in ref and not os.path.exists(os.path.expanduser(ref)):
    base_ref, adapter_ref = ref.split("+", 1)   # mergekit's "model+lora"
    return dataclasses.replace(with_adapter(open_checkpoint(base_ref), adapter_ref), ref=ref)
  path = os.path.expanduser(ref)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model {ref!r}: no such directory (only local checkpoints are "
                            "read; nothing is downloaded)")
  config = read_config(path, required=False)
  tensors = checkpoint_headers(path, any_safetensors=True)
  return Checkpoint(ref, path, config, dict(tensors))


def with_adapter(ck: Checkpoint, adapter_ref: str) -> Checkpoint:
  """`ck` seen through the PEFT adapter directory `adapter_ref`: each tensor the adapter
  changes becomes an `AdaptedTensor` (read lazily; the adapter is checked as
  `lj.load_adapter` checks it)."""
  from lora_jax._peft_io import read_adapter_updates
  adir = os.path.expanduser(adapter_ref)
  if not os.path.isdir(adir):
    raise FileNotFoundError(f"model {ck.ref!r}: adapter {adapter_ref!r}: no such directory")
  tensors = dict(ck.tensors)
  for module, params in read_adapter_updates(adir).items():
    for param, up in params.items():
      name = f"{module}.{param}"
      if name not in tensors:
        raise ValueError(f"model {ck.ref!r}: adapter {adapter_ref!r} has a tensor for {name}, "
                         f"which {ck.path} does not have; is the adapter for another base model?")
      tensors[name] = AdaptedTensor(tensors[name], up)
  return dataclasses.replace(ck, tensors=tensors)


# PEFT adapter directories: lora_jax._peft_io (which builds on this module), named here.
_ADAPTER_NAMES = ("load_adapter", "save_adapter", "read_adapter_updates", "WeightUpdate",
                  "CONFIG_NAME", "WEIGHTS_NAME", "PATTERN_BUDGET_S")


def __getattr__(name: str):
  if name in _ADAPTER_NAMES:
    from lora_jax import _peft_io
    return getattr(_peft_io, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_ADAPTER_NAMES, "AdaptedTensor", "Checkpoint", "open_checkpoint", "read_any",
    "with_adapter",
    "CODES", "DTYPES", "INDEX", "LLAMA", "NameTable", "SINGLE", "ShardWriter", "TMP_PREFIX",
    "TensorInfo", "as_table", "atomic_directory", "checkpoint_files", "checkpoint_headers",
    "clean_stale", "code_of", "copy_inside", "inside", "param_path", "read_checkpoint",
    "loads_json", "read_config", "read_header", "read_json", "read_metadata",
    "read_safetensors",
    "read_tensor", "write_json", "write_safetensors",
]
