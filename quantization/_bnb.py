"""Read and write bitsandbytes 4-bit state dicts (the keys of a saved bnb-4bit HF checkpoint).

A `Linear4bit` named `P` saves, for its weight (PyTorch layout `(out, in)`):

    P.weight                                uint8 (out * in / 2, 1): packed codes
    P.weight.absmax                         float32 (out * in / block,)  or uint8 with double quant
    P.weight.quant_map                      float32 (16,): the NF4 / FP4 table
    P.weight.nested_absmax                  float32 (ceil(n_blocks / 256),)   double quant only
    P.weight.nested_quant_map               float32 (256,): the dynamic 8-bit map   double quant only
    P.weight.quant_state.bitsandbytes__nf4  uint8: JSON {quant_type, blocksize, dtype, shape,
                                            nested_blocksize, nested_dtype, nested_offset}

bitsandbytes' blocks run over the flattened weight (`out * in` values), so when `in`
is not a multiple of the block they cross rows and the last one may be partial.
A layer whose `in` is a multiple of the block is read into a `QuantizedArray` with
the "rows" layout, any other into the "flat" layout; both hold the same bytes in the
same order, so conversion is a reshape both ways. Its logical shape is the kernel
`(in, out)` (the transposed PyTorch weight), as every kernel in lora_jax.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from quantization import _formats as F
from quantization._array import QuantizedArray

_QS = ".quant_state.bitsandbytes__"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):                 # a torch tensor (CPU), without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.view(__import__("torch").int16)
      return np.asarray(x.numpy()).view(jnp.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _need(sd: Mapping[str, Any], key: str, base: str):
  if key not in sd:
    have = sorted(k for k in sd if k.startswith(base))
    raise ValueError(f"{base}: bitsandbytes state dict is missing key {key!r}; keys present "
                     f"for this weight: {have}")
  return sd[key]


def _quant_state(sd: Mapping[str, Any], base: str, fmt: str) -> dict:
  raw = _np(_need(sd, f"{base}{_QS}{fmt}", base)).astype(np.uint8)
  try:
    return json.loads(bytes(raw.reshape(-1)).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{base}: {base}{_QS}{fmt} is not a packed JSON quant state: {e}") from e


def _one(sd: Mapping[str, Any], base: str, fmt: str) -> QuantizedArray:
  qs = _quant_state(sd, base, fmt)
  for key in ("quant_type", "blocksize", "dtype", "shape"):
    if key not in qs:
      raise ValueError(f"{base}: quant state has no {key!r} (got {sorted(qs)})")
  if qs["quant_type"] != fmt:
    raise ValueError(f"{base}: quant state says {qs['quant_type']!r} but its key says {fmt!r}")
  block = F.check_block_size(int(qs["blocksize"]), base)
  shape = tuple(int(d) for d in qs["shape"])
  if len(shape) != 2:
    raise ValueError(f"{base}: only 2-D (out, in) weights are supported, got shape {shape}")
  out, inn = shape
  if out < 1 or inn < 1:
    raise ValueError(f"{base}: empty weight shape {shape}")
  # bitsandbytes' blocks straddle rows unless in_features is a multiple of the block
  layout = "rows" if inn % block == 0 else "flat"
  if qs["dtype"] not in _DTYPES:
    raise ValueError(f"{base}: unsupported dtype {qs['dtype']!r}; known: {sorted(_DTYPES)}")
  qmap = _np(_need(sd, f"{base}.quant_map", base)).astype(np.float32).reshape(-1)
  if not np.array_equal(qmap, F.TABLES[fmt]):
    raise ValueError(f"{base}: quant_map differs from bitsandbytes' {fmt} table; custom "
                     "maps are not supported")
  codes = _np(_need(sd, base, base))
  codes = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)
  numel = out * inn
  if codes.size != -(-numel // 2):
    raise ValueError(f"{base}: {codes.size} code bytes for shape {shape}; expected "
                     f"{-(-numel // 2)}")
  nblk = -(-numel // block)
  absmax = _np(_need(sd, f"{base}.absmax", base)).reshape(-1)
  if absmax.size != nblk:
    raise ValueError(f"{base}: absmax has {absmax.size} values; expected {nblk} "
                     f"(shape {shape}, blocksize {block})")
  nested = offset = None
  if "nested_offset" in qs or f"{base}.nested_absmax" in sd:
    nested = _np(_need(sd, f"{base}.nested_absmax", base)).astype(np.float32).reshape(-1)
    nmap = _np(_need(sd, f"{base}.nested_quant_map", base)).astype(np.float32).reshape(-1)
    if int(qs.get("nested_blocksize", F.NESTED_BLOCK)) != F.NESTED_BLOCK:
      raise ValueError(f"{base}: nested_blocksize {qs.get('nested_blocksize')} != 256")
    if "nested_offset" not in qs:
      raise ValueError(f"{base}: quant state has nested_absmax but no 'nested_offset'")
    if not np.array_equal(nmap, F.DYNAMIC8):
      raise ValueError(f"{base}: nested_quant_map differs from bitsandbytes' dynamic map")
    if nested.size != -(-nblk // F.NESTED_BLOCK):
      raise ValueError(f"{base}: nested_absmax has {nested.size} values; expected "
                       f"{-(-nblk // F.NESTED_BLOCK)} for {nblk} blocks")
    absmax = absmax.astype(np.uint8)
    offset = jnp.asarray(np.float32(qs["nested_offset"]))
    nested = jnp.asarray(nested)
  else:
    absmax = absmax.astype(np.float32)
  if layout == "rows":
    codes, absmax = codes.reshape(out, inn // 2), absmax.reshape(out, inn // block)
  return QuantizedArray(
      codes=jnp.asarray(codes), absmax=jnp.asarray(absmax), nested_absmax=nested,
      offset=offset, format=fmt, block_size=block, kernel_shape=(inn, out),
      dtype=_DTYPES[qs["dtype"]], layout=layout)


def from_bnb_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Turn the bnb-4bit weights of a (flat) state dict into `QuantizedArray`s.

  Args:
    sd: {name: array} as read from a bnb-4bit Hugging Face checkpoint
      (safetensors) or `Linear4bit.state_dict()`; numpy arrays, jax arrays or CPU
      torch tensors. May hold one layer (`weight`, `weight.absmax`, ...) or a
      whole model (`model.layers.0.mlp.up_proj.weight`, ...).

  Returns:
    A flat dict: each quantized weight `P.weight` maps to a `QuantizedArray` of
    logical shape `(in, out)` (the kernel, transposed from PyTorch's `(out, in)`)
    and the weight's dtype, in the "rows" layout when `in` is a multiple of the
    block and in the "flat" layout (bitsandbytes' blocks across rows) otherwise;
    its companion keys (`.absmax`, `.quant_map`,
    `.nested_*`, `.quant_state.*`) are consumed; every other entry is returned
    unchanged (still in PyTorch layout).

  Raises:
    ValueError naming the weight: a missing companion key, a custom quant map,
    a block size out of range, code or absmax sizes that do not fit the shape.
  """
  bases = {}
  for key in sd:
    if _QS in key:
      base, fmt = key.split(_QS, 1)
      if fmt not in ("nf4", "fp4"):
        raise ValueError(f"{base}: unknown bitsandbytes quant type {fmt!r} in {key!r}; "
                         "known: nf4, fp4")
      bases[base] = fmt
  out: dict[str, Any] = {}
  consumed = set()
  for base, fmt in bases.items():
    out[base] = _one(sd, base, fmt)
    consumed |= {base, f"{base}.absmax", f"{base}.quant_map", f"{base}.nested_absmax",
                 f"{base}.nested_quant_map", f"{base}{_QS}{fmt}"}
  for key, val in sd.items():
    if key not in consumed:
      for suffix in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        if key.endswith(suffix) and key[:-len(suffix)] in sd:
          base = key[:-len(suffix)]
          raise ValueError(
              f"{base}: has bitsandbytes companion {key!r} but no '{base}{_QS}nf4' / "
              f"'...fp4' quant-state key, so its format, block size and shape are unknown; "
              "the state dict is incomplete (a quantized weight would be read as raw bytes)")
      out[key] = val
  return out


def _dtype_name(dtype) -> str:
  name = np.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"dtype {name} has no bitsandbytes name; known: {sorted(_DTYPES)}")
  return name


def _to_one(base: str, q: QuantizedArray) -> dict[str, np.ndarray]:
  if q.format not in ("nf4", "fp4"):
    raise ValueError(f"{base}: format {q.format!r} has no bitsandbytes 4-bit layout "
                     "(only nf4 and fp4)")
  if q.nbatch:
    raise ValueError(f"{base}: stacked QuantizedArray {q.shape}; write one layer at a time")
  if q.icq:
    raise ValueError(f"{base}: this {q.format} weight {q.shape} has ICQ taus "
                     "(QuantConfig(icq=True)); bitsandbytes' Linear4bit has no tau, so its "
                     "state dict cannot hold it: quantize without icq to write a "
                     "bitsandbytes checkpoint")
  if q.pad:
    raise ValueError(f"{base}: in_features {q.kernel_shape[0]} is padded by {q.pad} to the "
                     f"block {q.block_size} (rows layout); bitsandbytes' blocks run across "
                     "rows instead: quantize the weight with qz.quantize_array(..., "
                     "layout='flat') to write it")
  inn, out = q.kernel_shape
  sd = {base: np.asarray(q.codes).reshape(-1, 1),
        f"{base}.absmax": np.asarray(q.absmax).reshape(-1),
        f"{base}.quant_map": F.TABLES[q.format].copy()}
  meta = {"quant_type": q.format, "blocksize": q.block_size, "dtype": _dtype_name(q.dtype),
          "shape": [out, inn]}
  if q.double_quant:
    sd[f"{base}.nested_absmax"] = np.asarray(q.nested_absmax).astype(np.float32)
    sd[f"{base}.nested_quant_map"] = F.DYNAMIC8.copy()
    meta.update({"nested_blocksize": F.NESTED_BLOCK, "nested_dtype": "float32",
                 "nested_offset": float(np.float32(q.offset))})
  sd[f"{base}{_QS}{q.format}"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8).copy()
  return sd


def to_bnb_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `from_bnb_state_dict`: a flat dict with `QuantizedArray` values -> bnb keys.

  Args:
    tree: {"P.weight": QuantizedArray (nf4/fp4, unbatched, without ICQ taus; the
      rows layout without padding, or the flat layout), ...}; other values are
      passed through as numpy arrays.

  Returns:
    {name: numpy array} with the keys and byte layout `Linear4bit.state_dict()`
    produces (loadable by `bitsandbytes`/`transformers`).
  """
  out: dict[str, np.ndarray] = {}
  for key, val in tree.items():
    if isinstance(val, QuantizedArray):
      out.update(_to_one(key, val))
    else:
      out[key] = np.asarray(val)
  return out


__all__ = ["from_bnb_state_dict", "to_bnb_state_dict"]
