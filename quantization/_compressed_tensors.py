"""compressed-tensors "pack-quantized" state dicts <-> `GroupQuantizedArray` kernels.

What llm-compressor (`oneshot` with GPTQ or RTN) saves and vLLM serves: a model's
`config.json` carries a `quantization_config` and each quantized Linear `P` stores,
in PyTorch's `(out, in)` layout,

    P.weight_packed      int32 (out, ceil(in * bits / 32))   codes `q + 2^(bits-1)` as one
                         dense bit stream per row (0.20's `pack_to_int32`)
    P.weight_scale       float (out, groups)                 the weight's dtype; groups = 1
                         for strategy "channel", in / group_size for "group"
    P.weight_shape       int (2,)                            [out, in]
    P.weight_zero_point  int32 (ceil(out * bits / 32), groups)   asymmetric only: the
                         signed zero points packed like the codes, along dim 0 (`out`)
    P.weight_g_idx       int (in,)                           optional: the group of each
                         input (dynamic activation order, written before 0.20; a `-1`
                         anywhere means column order, as compressed-tensors read it)

`GroupQuantizedArray` holds exactly these words and values, so both directions copy
tensors and unpack only the zero points. Refused, with a `ValueError` naming the
config key (or the tensor, file and shapes): another `quant_method` or `format`,
float weights, strategies other than "group" / "channel", dynamic weights, activation
or kv-cache quantization, sparsity or transform configs, bit widths other than 2, 3, 4
and 8, and tensors that do not fit their `weight_shape` and scheme.

Which modules a config group quantizes is decided as compressed-tensors decides it:
a group's `targets` are exact module names, `re:` regular expressions (`re.match`) or
module class names ("Linear"); exact names win over regexes, regexes over classes;
`ignore` (same syntax) removes modules.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

import lora_jax as lj
from quantization import _group as G
from quantization._group import GroupQuantizedArray

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
STRATEGIES = ("group", "channel")
# seconds all `re:` patterns of one quantization_config may spend matching module names
PATTERN_BUDGET_S = 2.0

_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
           "weight_g_idx")
_MODULE_KEYS = (*_PARAMS, "bias")
_EMPTY = (None, {}, [])
# `actorder` values: "weight" changes only how GPTQ ran; "group" (removed in 0.20) wrote a g_idx
_ACTORDER = {None: None, False: None, True: "group", "weight": "weight", "static": "weight",
             "group": "group", "dynamic": "group"}
# config keys of a QuantizationArgs that change what the tensors mean, and what we read
_READ_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic",
              "actorder", "block_structure", "scale_dtype", "zp_dtype", "observer",
              "observer_kwargs"}


def _np(x) -> np.ndarray:
  """A numpy array from numpy / jax arrays or CPU torch tensors (without importing torch)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      return x.view(__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


# the dense bit stream on the host (the zero points; `G.pack_codes` / `G.unpack_codes`
# are the same layout in jnp, for the kernels)

def pack_np(u: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes `(rows, n)` -> `(rows, ceil(n * bits / 32))` int32, element `i` at
  bit `i * bits`, least significant bit first (0.20's `pack_to_int32`)."""
  rows, n = u.shape
  n32 = -(-n // 32)
  v = np.zeros((rows, n32 * 32), np.uint64)
  v[:, :n] = u
  v = v.reshape(rows, n32, 32)
  out = np.zeros((rows, n32, bits), np.uint64)
  for i in range(32):
    w, off = divmod(i * bits, 32)
    out[..., w] |= (v[..., i] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
    if off + bits > 32:
      out[..., w + 1] |= v[..., i] >> np.uint64(32 - off)
  return out.reshape(rows, n32 * bits)[:, :G.packed_words(n, bits)].astype(np.uint32).view(np.int32)


def unpack_np(words: np.ndarray, bits: int, n: int) -> np.ndarray:
  """Inverse of `pack_np`: `(rows, words)` int32 -> the first `n` codes `(rows, n)` uint8."""
  rows, nw = words.shape
  n32 = -(-nw // bits)
  w = np.zeros((rows, n32 * bits), np.uint64)
  w[:, :nw] = words.view(np.uint32)
  w = w.reshape(rows, n32, bits)
  out = np.zeros((rows, n32, 32), np.uint64)
  for i in range(32):
    j, off = divmod(i * bits, 32)
    x = w[..., j] >> np.uint64(off)
    if off + bits > 32:
      x |= w[..., j + 1] << np.uint64(32 - off)
    out[..., i] = x & np.uint64((1 << bits) - 1)
  return out.reshape(rows, n32 * 32)[:, :n].astype(np.uint8)


# ----------------------------------------------------------------------------
# the config

@dataclasses.dataclass(frozen=True)
class Scheme:
  """One config group's weight quantization, as we read it."""
  name: str                 # the config group's key
  targets: tuple[str, ...]
  bits: int
  symmetric: bool
  group_size: int | None    # None: strategy "channel"
  actorder: str | None      # None, "weight" or "group"


def _kind(v) -> str:
  return "null" if v is None else repr(v)


def _scheme(name: str, s: Any, where: str) -> Scheme:
  key = f"{where}.config_groups.{name}"
  if isinstance(s, list):
    raise ValueError(f"{key}: {s!r:.80} names a preset scheme; lora_jax reads config groups "
                     "spelled out (targets + weights), as llm-compressor saves them")
  if not isinstance(s, Mapping):
    raise ValueError(f"{key}: must be an object, got {type(s).__name__}")
  targets = s.get("targets")
  if (not isinstance(targets, list) or not targets
      or not all(isinstance(t, str) and t for t in targets)):
    raise ValueError(f"{key}.targets: must be a non-empty list of module names, 're:' "
                     f"patterns or class names, got {targets!r:.120}")
  for act in ("input_activations", "output_activations"):
    if s.get(act) is not None:
      raise ValueError(f"{key}.{act}: {s[act]!r:.120}: activation quantization is not read "
                       "(lora_jax reads weight-only int quantization; "
                       f"{act} must be null)")
  fmt = s.get("format")
  if fmt is not None and fmt != FORMAT:
    raise ValueError(f"{key}.format: {fmt!r} is not read; lora_jax reads {FORMAT!r}")
  w = s.get("weights")
  if not isinstance(w, Mapping):
    raise ValueError(f"{key}.weights: {_kind(w)}; lora_jax reads config groups that "
                     "quantize weights (an object with num_bits, type, strategy, ...)")
  wk = f"{key}.weights"
  unknown = sorted(set(w) - _READ_ARGS)
  if unknown:
    raise ValueError(f"{wk}: unknown key(s) {unknown}; lora_jax reads {sorted(_READ_ARGS)}")
  typ = w.get("type", "int")
  if typ != "int":
    raise ValueError(f"{wk}.type: {typ!r} is not read; lora_jax reads 'int' weights "
                     f"(format {FORMAT!r})")
  bits = w.get("num_bits", 8)
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in G.GROUP_BITS:
    raise ValueError(f"{wk}.num_bits: {bits!r} is not read; lora_jax reads "
                     f"{', '.join(map(str, G.GROUP_BITS))}")
  sym = w.get("symmetric", True)
  if not isinstance(sym, bool):
    raise ValueError(f"{wk}.symmetric: must be true or false, got {sym!r}")
  dyn = w.get("dynamic", False)
  if dyn is not False:
    raise ValueError(f"{wk}.dynamic: {dyn!r}: dynamic weight quantization is not read; "
                     "lora_jax reads static (false)")
  if w.get("block_structure") is not None:
    raise ValueError(f"{wk}.block_structure: {w['block_structure']!r}: block quantization "
                     f"is not read; lora_jax reads strategies {', '.join(STRATEGIES)}")
  gs = w.get("group_size")
  strategy = w.get("strategy")
  if strategy is None:   # compressed-tensors infers it from group_size
    strategy = "tensor" if gs is None else ("channel" if gs == -1 else "group")
  if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
    raise ValueError(f"{wk}.strategy: {strategy!r} is not read; lora_jax reads "
                     f"{', '.join(map(repr, STRATEGIES))}")
  strategy = strategy.lower()
  if strategy == "group":
    if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
      raise ValueError(f"{wk}.group_size: strategy 'group' needs a positive integer, got "
                       f"{gs!r}")
  elif gs not in (None, -1):
    raise ValueError(f"{wk}.group_size: {gs!r} with strategy 'channel'; expected null or -1")
  raw = w.get("actorder")
  act = _ACTORDER.get(raw, "?") if isinstance(raw, (str, bool, type(None))) else "?"
  if act == "?":
    raise ValueError(f"{wk}.actorder: {w.get('actorder')!r} is not read; lora_jax reads "
                     "null, 'weight' / 'static' or 'group' / 'dynamic'")
  return Scheme(name, tuple(targets), int(bits), sym,
                int(gs) if strategy == "group" else None, act)


def read_config(qc: Any, where: str = "quantization_config") -> tuple[list[Scheme], list[str]]:
  """The config groups and the ignore list of a compressed-tensors `quantization_config`.

  Raises:
    ValueError naming the key (`quantization_config.config_groups.group_0.weights.strategy`)
    and what lora_jax reads, for anything but weight-only int pack-quantized groups.
  """
  if not isinstance(qc, Mapping):
    raise ValueError(f"{where}: must be an object, got {type(qc).__name__}")
  method = qc.get("quant_method")
  if method != QUANT_METHOD:
    raise ValueError(f"{where}.quant_method: {method!r} is not read here; expected "
                     f"{QUANT_METHOD!r}")
  groups = qc.get("config_groups")
  if not isinstance(groups, Mapping) or not groups:
    raise ValueError(f"{where}.config_groups: must be a non-empty object, got "
                     f"{groups!r:.120}")
  fmt = qc.get("format", "dense")
  schemes = [_scheme(str(k), v, where) for k, v in groups.items()]
  if fmt == "mixed-precision":
    bad = [s for s in groups.values() if s.get("format") != FORMAT]
    if bad:
      raise ValueError(f"{where}.format: 'mixed-precision' with a group in format "
                       f"{bad[0].get('format')!r}; lora_jax reads {FORMAT!r} groups only")
  elif fmt != FORMAT:
    raise ValueError(f"{where}.format: {fmt!r} is not read; lora_jax reads {FORMAT!r} "
                     "(int weights packed into int32)")
  for k, what in (("kv_cache_scheme", "kv-cache quantization"),
                  ("sparsity_config", "sparse compression"),
                  ("transform_config", "transforms (rotations)"),
                  ("moe_sparsity_config", "MoE expert sparsity")):
    if qc.get(k) not in _EMPTY:
      raise ValueError(f"{where}.{k}: {qc[k]!r:.120}: {what} is not read (expected null "
                       "or empty)")
  ignore = qc.get("ignore") or []
  if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
    raise ValueError(f"{where}.ignore: must be a list of strings, got {ignore!r:.120}")
  return schemes, list(ignore)


class _Matcher:
  """compressed-tensors' module matching (`apply_quantization_config`): the targets of
  all groups in one ordered table (a later group's equal target replaces an earlier
  one), a module's matching targets sorted exact names, then `re:` patterns, then class
  names; the first decides its scheme; `ignore` removes modules. Patterns are compiled
  with the `regex` package and matched within a shared time budget."""

  def __init__(self, schemes: list[Scheme], ignore: list[str], where: str):
    self.where = where
    self.table: dict[str, Scheme] = {}
    for s in schemes:
      for t in s.targets:
        self.table[t] = s
    self.targets = sorted(self.table, key=lambda x: ("re:" in x, x))
    self.ignore = ignore
    self.deadline = time.monotonic() + PATTERN_BUDGET_S
    self._rx = {}
    for key, pats in (("targets", self.targets), ("ignore", ignore)):
      for p in pats:
        if p.startswith("re:") and p not in self._rx:
          self._rx[p] = self._compile(p, key)

  def _compile(self, p: str, key: str):
    import regex
    try:
      return regex.compile(p[3:])
    except (regex.error, OverflowError, RecursionError) as e:
      raise ValueError(f"{self.where}: {key} pattern {p!r} is not a valid regular "
                       f"expression: {e}") from None

  def _name(self, name: str, target: str) -> bool:
    if not target.startswith("re:"):
      return target == name
    left = self.deadline - time.monotonic()
    try:
      if left <= 0:
        raise TimeoutError
      return self._rx[target].match(name, timeout=left) is not None
    except TimeoutError:
      raise ValueError(f"{self.where}: pattern {target!r}: matching the module names (here "
                       f"{name!r}) took more than {PATTERN_BUDGET_S}s; the pattern "
                       "backtracks catastrophically") from None

  def ignored(self, module: str, classes: tuple[str, ...]) -> bool:
    return any(self._name(module, t) or t in classes for t in self.ignore)

  def scheme(self, module: str, classes: tuple[str, ...]) -> tuple[Scheme, str] | None:
    """(scheme, deciding target) of a module, or None (not targeted or ignored)."""
    hit = [t for t in self.targets if self._name(module, t)]
    hit += [t for t in self.targets if t in classes and t not in hit]
    if not hit or self.ignored(module, classes):
      return None
    return self.table[hit[0]], hit[0]


# ----------------------------------------------------------------------------
# reading

def _int_vector(x: np.ndarray, n: int | None) -> bool:
  return (x.ndim == 1 and (n is None or x.shape[0] == n)
          and np.issubdtype(x.dtype, np.integer))


def _read_module(sd: Mapping[str, Any], module: str, scheme: Scheme, files, where: str
                 ) -> GroupQuantizedArray:
  f = lambda key: files.get(key, "state dict")  # noqa: E731
  bits = scheme.bits
  gkey = f"{where}.config_groups.{scheme.name}.weights"

  def need(param):
    key = f"{module}.{param}"
    if key not in sd:
      have = sorted(k for k in sd if k.startswith(module + "."))
      raise ValueError(f"{f(module + '.weight_packed')}: module {module} lacks tensor {key!r} "
                       f"({'asymmetric' if not scheme.symmetric else 'symmetric'} "
                       f"{bits}-bit {scheme.name}); its tensors: {have}")
    return key, _np(sd[key])

  skey, shape = need("weight_shape")
  if not _int_vector(shape, 2) or np.any(shape < 1):
    raise ValueError(f"{f(skey)}: tensor {skey!r} {shape.dtype} {tuple(shape.shape)} = "
                     f"{shape.tolist()!r:.60} must be two positive integers [out, in]")
  out, inn = (int(d) for d in shape)
  pkey, packed = need("weight_packed")
  want = (out, G.packed_words(inn, bits))
  if packed.dtype != np.int32 or tuple(packed.shape) != want:
    old = ""
    if 32 % bits and packed.ndim == 2 and packed.shape[-1] == -(-inn // (32 // bits)):
      old = (f"; its {packed.shape[-1]} words hold {32 // bits} codes each, the padded "
             "packing of compressed-tensors before 0.20, which is not read")
    raise ValueError(f"{f(pkey)}: tensor {pkey!r} {packed.dtype} {tuple(packed.shape)} does "
                     f"not fit weight_shape {[out, inn]} at {bits} bits ({gkey}.num_bits): "
                     f"expected int32 {want}{old}")
  if scheme.group_size is None:
    group, groups = inn, 1
  else:
    group = scheme.group_size
    if inn % group:
      raise ValueError(f"{f(skey)}: module {module}: in_features {inn} (tensor {skey!r}) is "
                       f"not a multiple of group_size {group} ({gkey}.group_size); "
                       "compressed-tensors requires it")
    groups = inn // group
  ckey, scale = need("weight_scale")
  if not np.issubdtype(scale.dtype, np.floating) and scale.dtype != ml_dtypes.bfloat16:
    raise TypeError(f"{f(ckey)}: tensor {ckey!r} has dtype {scale.dtype} "
                    f"{tuple(scale.shape)}; scales must be floating")
  if tuple(scale.shape) != (out, groups):
    raise ValueError(f"{f(ckey)}: tensor {ckey!r} {tuple(scale.shape)} does not fit "
                     f"weight_shape {[out, inn]} with "
                     + (f"group_size {group}" if scheme.group_size else "strategy 'channel'")
                     + f" ({gkey}): expected {(out, groups)}")
  zkey = f"{module}.weight_zero_point"
  zeros = None
  if scheme.symmetric:
    if zkey in sd:
      raise ValueError(f"{f(zkey)}: tensor {zkey!r} is present but {gkey}.symmetric is true; "
                       "the checkpoint does not match its config")
  else:
    zkey, zp = need("weight_zero_point")
    zwant = (G.packed_words(out, bits), groups)
    if zp.dtype != np.int32 or tuple(zp.shape) != zwant:
      raise ValueError(f"{f(zkey)}: tensor {zkey!r} {zp.dtype} {tuple(zp.shape)} does not fit "
                       f"{groups} group(s) of {out} outputs at {bits} bits: expected the zero "
                       f"points packed along dim 0 (out), int32 {zwant}")
    lo, _ = G.qrange(bits)
    u = unpack_np(np.ascontiguousarray(zp.T), bits, out)                  # (groups, out)
    zeros = jnp.asarray(np.ascontiguousarray((u.astype(np.int16) + lo).astype(np.int8).T))
  gikey = f"{module}.weight_g_idx"
  g_idx = None
  if gikey in sd:
    g = _np(sd[gikey])
    if not _int_vector(g, inn):
      raise ValueError(f"{f(gikey)}: tensor {gikey!r} {g.dtype} {tuple(g.shape)} must be "
                       f"({inn},) integers: the group of each input")
    if scheme.group_size is None:
      raise ValueError(f"{f(gikey)}: tensor {gikey!r}: a g_idx with strategy 'channel' "
                       f"({gkey}.strategy) is not read")
    if not np.any(g == -1):        # compressed-tensors: a -1 anywhere means column order
      try:
        G.check_g_idx(g.astype(np.int64), group, f"tensor {gikey!r}")
      except ValueError as e:
        raise ValueError(f"{f(gikey)}: {e}") from None
      g_idx = jnp.asarray(g.astype(np.int32))
  elif scheme.actorder == "group":
    raise ValueError(f"{f(pkey)}: module {module}: {gkey}.actorder is 'group' but tensor "
                     f"{gikey!r} is missing; the groups of the inputs are unknown")
  try:
    return GroupQuantizedArray(
        packed=jnp.asarray(packed), scales=jnp.asarray(scale), zeros=zeros, g_idx=g_idx,
        bits=bits, group_size=group, kernel_shape=(inn, out), dtype=jnp.dtype(scale.dtype))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{f(pkey)}: module {module}: {e}") from None


def from_compressed_tensors(sd: Mapping[str, Any], quantization_config: Mapping[str, Any], *,
                            files: Mapping[str, str] | None = None,
                            module_class: Callable[[str], tuple[str, ...]] | None = None,
                            where: str = "quantization_config") -> dict[str, Any]:
  """Turn the pack-quantized weights of a (flat) state dict into `GroupQuantizedArray`s.

  Args:
    sd: `{name: array}` of a compressed-tensors checkpoint (numpy / jax arrays or CPU
      torch tensors), one module or a whole model.
    quantization_config: the `quantization_config` object of its `config.json`.
    files: optional `{name: file}` the tensors came from, for error messages.
    module_class: optional `module name -> class names` (`("Linear",)`), for targets
      that name classes and to check that every module the config quantizes is
      quantized in the file; without it a module with `weight_packed` is a "Linear"
      and dense modules are not checked.
    where: how to name the config in errors (`".../config.json: quantization_config"`).

  Returns:
    A flat dict: each quantized module's `P.weight` maps to a `GroupQuantizedArray`
    of logical shape `(in, out)` (the kernel, PyTorch's weight transposed) whose
    `packed` words and `scales` are the file's, `zeros` the unpacked zero points
    (int8) or None, `g_idx` the file's `weight_g_idx` or None, and dtype the scales';
    its `weight_*` tensors are consumed; every other entry is returned unchanged.

  Raises:
    ValueError naming the config key for a config this does not read (see the module
    docstring), or the tensor, file and shapes for tensors that do not fit their
    `weight_shape` and scheme, a module quantized in the file that the config does not
    quantize (or ignores), and one the config quantizes that the file holds dense.
  """
  files = dict(files or {})
  schemes, ignore = read_config(quantization_config, where)
  match = _Matcher(schemes, ignore, where)
  classes = module_class or (lambda m: ("Linear",))
  modules: dict[str, None] = {}
  for key in sd:
    mod, _, param = key.rpartition(".")
    if param in _PARAMS and param != "weight_packed" and f"{mod}.weight_packed" not in sd:
      raise ValueError(f"{files.get(key, 'state dict')}: tensor {key!r} has no "
                       f"{mod}.weight_packed beside it; lora_jax reads {FORMAT!r} modules "
                       "(weight_packed, weight_scale, weight_shape[, weight_zero_point])")
    if param == "weight_packed":
      modules[mod] = None
  out: dict[str, Any] = {}
  consumed: set[str] = set()
  for mod in modules:
    fname = files.get(f"{mod}.weight_packed", "state dict")
    cls = tuple(classes(mod) or ())
    hit = match.scheme(mod, cls)
    if hit is None:
      why = ("is in " + f"{where}.ignore" if match.ignored(mod, cls)
             else f"matches no target of {where}.config_groups")
      raise ValueError(f"{fname}: module {mod} is quantized (tensor {mod + '.weight_packed'!r}) "
                       f"but {why}; the checkpoint does not match its config")
    if f"{mod}.weight" in sd:
      raise ValueError(f"{fname}: module {mod} has both {mod}.weight and "
                       f"{mod}.weight_packed")
    extra = sorted(k for k in sd if k.startswith(mod + ".") and "." not in k[len(mod) + 1:]
                   and k[len(mod) + 1:] not in _MODULE_KEYS)
    if extra:
      raise ValueError(f"{files.get(extra[0], fname)}: tensor {extra[0]!r} of quantized "
                       f"module {mod} is not read (activation quantization or another "
                       f"format?); lora_jax reads {', '.join(_MODULE_KEYS)}")
    out[f"{mod}.weight"] = _read_module(sd, mod, hit[0], files, where)
    consumed |= {f"{mod}.{p}" for p in _PARAMS}
  if module_class is not None:
    for key in sd:
      mod, _, param = key.rpartition(".")
      if param != "weight" or mod in modules:
        continue
      cls = tuple(module_class(mod) or ())
      hit = match.scheme(mod, cls) if cls else None
      if hit is not None:
        raise ValueError(f"{files.get(key, 'state dict')}: module {mod} is dense (tensor "
                         f"{key!r} {tuple(_np(sd[key]).shape)}) but "
                         f"{where}.config_groups.{hit[0].name} targets it ({hit[1]!r}) and "
                         f"{where}.ignore does not name it; the checkpoint does not match "
                         "its config")
  for key, val in sd.items():
    if key not in consumed:
      out[key] = val
  return out


# ----------------------------------------------------------------------------
# writing

def _scheme_key(q: GroupQuantizedArray, channel: bool):
  act = "group" if q.g_idx is not None else None
  return (q.bits, q.symmetric, None if channel else q.group_size, act)


def _check_writable(key: str, q: GroupQuantizedArray, name: str) -> None:
  if not key.endswith(".weight"):
    raise ValueError(f"{key}: a quantized module's weight is named '<module>.weight' (its "
                     "tensors become <module>.weight_packed, ...)")
  if q.nbatch:
    raise ValueError(f"{name}: stacked GroupQuantizedArray {q.shape}; write one layer at a "
                     "time (unstack the layers first)")
  k, n = q.kernel_shape
  if k % q.group_size:
    raise ValueError(f"{name}: in_features {k} is not a multiple of group_size "
                     f"{q.group_size} (a last group of {k % q.group_size}); compressed-tensors "
                     "requires group_size to divide in_features")
  if q.zeros is not None:
    if not jnp.issubdtype(q.zeros.dtype, jnp.integer):
      raise ValueError(f"{name}: zero points {tuple(q.zeros.shape)} are "
                       f"{np.dtype(q.zeros.dtype).name} (float zero points, e.g. a QA-LoRA "
                       f"fold); {FORMAT!r} stores integer zero points only")
    z = np.asarray(q.zeros)
    lo, hi = G.qrange(q.bits)
    if z.size and (z.min() < lo or z.max() > hi):
      raise ValueError(f"{name}: zero points span [{z.min()}, {z.max()}], outside the signed "
                       f"{q.bits}-bit range [{lo}, {hi}] that {FORMAT!r} packs")


def _module_tensors(module: str, q: GroupQuantizedArray) -> dict[str, np.ndarray]:
  k, n = q.kernel_shape
  sd = {f"{module}.weight_packed": np.asarray(q.packed, np.int32),
        f"{module}.weight_scale": np.asarray(q.scales),
        f"{module}.weight_shape": np.asarray([n, k], np.int64)}
  if q.zeros is not None:
    lo, _ = G.qrange(q.bits)
    u = (np.asarray(q.zeros).astype(np.int16) - lo).astype(np.uint8).T      # (groups, out)
    # (words, groups): packed along dim 0, as `pack_to_int32(zp, bits, packed_dim=0)`
    sd[f"{module}.weight_zero_point"] = np.ascontiguousarray(pack_np(u, q.bits).T)
  if q.g_idx is not None:
    sd[f"{module}.weight_g_idx"] = np.asarray(q.g_idx, np.int32)
  return sd


def _weights_args(bits, symmetric, group_size, act) -> dict:
  w = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
       "strategy": "channel" if group_size is None else "group", "group_size": group_size}
  if act is not None:
    w["actorder"] = act
  return w


def to_compressed_tensors(tree: Mapping[str, Any], *,
                          module_class: Callable[[str], tuple[str, ...]] | None = None,
                          names: Mapping[str, str] | None = None
                          ) -> tuple[dict[str, np.ndarray], dict | None]:
  """Inverse of `from_compressed_tensors`: `GroupQuantizedArray` weights -> pack-quantized
  tensors, and the `quantization_config` that describes them.

  Args:
    tree: `{"P.weight": GroupQuantizedArray (unbatched, group dividing in, integer
      zero points), ...}`; other values are written as they are (numpy arrays, in the
      caller's layout).
    module_class: optional `module name -> class names`; default: a module with a 2-D
      `weight` is a "Linear". With one scheme the config targets the quantized modules'
      classes and ignores the dense modules of those classes (as llm-compressor
      writes); with several, each group targets its modules by name.
    names: optional `{key: name}` to name a leaf in errors (a parameter path).

  Returns:
    `(state dict of numpy arrays, quantization_config)` (None when `tree` holds no
    `GroupQuantizedArray`); the state dict loads in
    transformers / compressed-tensors 0.20 (`weight_packed`, `weight_scale`,
    `weight_shape`, packed `weight_zero_point`). A leaf with a `g_idx` writes
    `weight_g_idx` and `actorder: "group"`, the layout of compressed-tensors before
    0.20 (which removed it: 0.20 refuses such a config rather than misread it).
    One quantized leaf of `in` inputs in one group is written as strategy "channel"
    unless another leaf with the same bits, symmetry and that group size has several
    groups.

  Raises:
    ValueError naming the key: a stacked leaf, a group that does not divide `in`
    (compressed-tensors requires it), float zero points or zero points out of range,
    a quantized key not named `<module>.weight`; TypeError for other implicit leaves
    (materialize them first).
  """
  quant = {}
  for key, val in tree.items():
    if isinstance(val, GroupQuantizedArray):
      _check_writable(key, val, (names or {}).get(key, key))
      quant[key] = val
    elif lj.is_implicit(val):
      raise TypeError(f"{key}: {type(val).__name__} has no {FORMAT!r} layout; materialize it "
                      "(or write GroupQuantizedArray leaves only)")
  if not quant:
    return {k: np.asarray(v) for k, v in tree.items()}, None
  multi = {(q.bits, q.symmetric, q.group_size, q.g_idx is not None)
           for q in quant.values() if q.groups > 1}
  schemes: dict[tuple, list[str]] = {}
  out: dict[str, np.ndarray] = {}
  for key, val in tree.items():
    if key in quant:
      q = val
      mod = key[:-len(".weight")]
      channel = q.groups == 1 and (q.bits, q.symmetric, q.group_size,
                                   q.g_idx is not None) not in multi
      schemes.setdefault(_scheme_key(q, channel), []).append(mod)
      out.update(_module_tensors(mod, q))
    else:
      out[key] = np.asarray(val)
  default_cls = lambda m: ("Linear",) if np.ndim(out.get(f"{m}.weight")) == 2 else ()  # noqa: E731
  classes = module_class or default_cls
  dense = [k[:-len(".weight")] for k in tree if k.endswith(".weight") and k not in quant]
  groups: dict[str, dict] = {}
  ignore: list[str] = []
  if len(schemes) == 1:
    (skey, mods), = schemes.items()
    targets = sorted({c for m in mods for c in (classes(m) or ("Linear",))[:1]})
    ignore = [m for m in dense if set(classes(m) or ()) & set(targets)]
    groups["group_0"] = {"targets": targets, "weights": _weights_args(*skey)}
  else:
    kinds = set()
    for m in (m for ms in schemes.values() for m in ms):
      kinds |= set((classes(m) or ("Linear",))[:1])
    ignore = [m for m in dense if set(classes(m) or ()) & kinds]
    for i, (skey, mods) in enumerate(schemes.items()):
      groups[f"group_{i}"] = {"targets": list(mods), "weights": _weights_args(*skey)}
  for g in groups.values():
    g.update(input_activations=None, output_activations=None, format=FORMAT)
  qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
  return out, qc


def is_compressed_tensors_config(hf_config: Mapping[str, Any]) -> bool:
  """Whether a `config.json` dict declares a compressed-tensors `quantization_config`."""
  qc = hf_config.get("quantization_config") if isinstance(hf_config, Mapping) else None
  return isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD


__all__ = ["FORMAT", "QUANT_METHOD", "Scheme", "from_compressed_tensors",
           "is_compressed_tensors_config", "read_config", "to_compressed_tensors"]
