"""A fixed-size device bank of LoRA adapters over one base, with a host cache and LRU.

The bank is an `lj.stack_adapters(..., max_rank=R, slots=N, dora=True)` tree over every
projection kernel of the decoder's layers (attention and dense MLP; not routed experts,
embeddings or the head). An adapter that adapts fewer kernels fills the others with
zeros (its rows see the base there). Slot contents change only through one jitted update
of the bank arrays (`a`, `b`, `scales`, `mags`), donated, with fixed shapes: loading an
adapter never reads the base again, never copies it and never recompiles.

Residency:
- host cache: adapters parsed from disk (`lj.load_adapter`), as numpy arrays already
  padded to the bank's rank, least recently used dropped past `host_capacity`;
- device bank: `slots` slots; `acquire(name)` returns the slot holding `name`, loading
  it into a free slot or the least recently used slot that no running request holds;
  `None` when every slot is held (the caller waits). `release(slot)` when a request ends.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import extend
from lora_jax import extend as _paths      # leaves_with_paths, map_with_path
from lora_jax.models import decoder

MultiLoraWeight, LowRankWeight = lj.MultiLoraWeight, lj.LowRankWeight
_magnitude_factor, _served_form = extend.serving_magnitude, extend.served_form

# the kernels a bank holds: every projection of the decoder layers
BANK_TARGETS = r"layers/(\d+/)?(self_attn|mlp)/[a-z_]+_proj/kernel"


class AdapterError(ValueError):
  """An adapter that cannot be served (not found, another base, a kernel the bank does
  not hold, a rank past the bank's): the server answers 4xx with this message."""


class BankFull(RuntimeError):
  """Every slot is held by a running request."""


@dataclasses.dataclass
class _Parsed:
  """One adapter's bank entries: path -> (a (*L, in, R), b (*L, R, out), scale, mag)."""
  entries: dict[str, tuple[np.ndarray, np.ndarray, float, np.ndarray]]
  rank: int


def _is_multi(x):
  return isinstance(x, MultiLoraWeight)


class AdapterBank:
  """`slots` adapters of rank <= `max_rank` over `base`, loaded on demand.

  Args:
    base: the base parameters (plain or quantized kernels, unrolled or stacked layers).
    config: the model's `DecoderConfig` (for the adapter name table).
    slots: device slots (`--max-adapters`).
    max_rank: rank capacity (`--max-rank`); an adapter of a higher rank is refused.
    host_capacity: parsed adapters kept on the host (default `4 * slots`).
  """

  def __init__(self, base: Any, config: Any, *, slots: int, max_rank: int,
               host_capacity: int | None = None):
    if slots < 0 or max_rank < 1:
      raise ValueError(f"AdapterBank: slots={slots} must be >= 0 and max_rank={max_rank} >= 1")
    self.base, self.config = base, config
    self.slots, self.max_rank = int(slots), int(max_rank)
    self.host_capacity = int(host_capacity or 4 * max(slots, 1))
    if slots == 0:            # the base alone: no bank, no LoRA work in the steps
      self.served = base
    else:
      layouts = decoder.STACKED_LAYOUTS if decoder.is_stacked(base) else {}
      zero = lj.init(jax.random.key(0), base, lj.LoraConfig(
          rank=1, alpha=1.0, targets=BANK_TARGETS, layouts=layouts))
      self.served = lj.stack_adapters([zero], max_rank=max_rank, slots=slots, dora=True)
      self.served = self._with_arrays(self.served, {     # slot 0 empty too
          p: {**d, "a": d["a"] * 0, "b": d["b"] * 0, "scales": d["scales"] * 0}
          for p, d in self._arrays(self.served).items()})
    self.paths = [p for p, x in _paths.leaves_with_paths(self.served, is_leaf=_is_multi)
                  if _is_multi(x)]
    self._lock = threading.RLock()
    self.sources: dict[str, Any] = {}     # name -> adapter directory (or in-memory tree)
    self._trees: dict[str, _Parsed] = {}  # in-memory adapters, never dropped
    self._host: collections.OrderedDict[str, _Parsed] = collections.OrderedDict()
    self._slot_of: dict[str, int] = {}
    self._name_of: list[str | None] = [None] * slots
    self._pins = [0] * slots
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict(
        (s, None) for s in range(slots))
    self.loads = 0            # adapters copied into the device bank (for tests/metrics)
    nbs = {p: x.nbatch for p, x in _paths.leaves_with_paths(self.served, is_leaf=_is_multi)
           if _is_multi(x)}
    self._update = jax.jit(functools.partial(_update_slot, nbs=nbs), donate_argnums=0)

  # -- the bank arrays --------------------------------------------------------------
  @staticmethod
  def _arrays(served):
    return {p: {"a": x.a, "b": x.b, "scales": x.scales, "mags": x.mags}
            for p, x in _paths.leaves_with_paths(served, is_leaf=_is_multi) if _is_multi(x)}

  @staticmethod
  def _with_arrays(served, arrays):
    def put(path, x):
      if not _is_multi(x):
        return x
      d = arrays[path]
      return dataclasses.replace(x, a=d["a"], b=d["b"], scales=d["scales"], mags=d["mags"])
    return _paths.map_with_path(put, served, is_leaf=_is_multi)

  # -- registry ---------------------------------------------------------------------
  def register(self, name: str, path: str | os.PathLike) -> None:
    """Make adapter directory `path` servable as `name` (parsed on first use)."""
    path = pathlib.Path(path)
    if self.slots == 0:
      raise AdapterError(f"{path}: this server has no adapter slots (--max-adapters 0)")
    if not (path / "adapter_config.json").is_file():
      raise AdapterError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    with self._lock:
      self.sources[name] = path

  def register_tree(self, name: str, tree: Any) -> None:
    """Make an in-memory adapter tree (`lj.init` / `lj.load_adapter` over this base)
    servable as `name`; checked now."""
    parsed = self._entries(name, tree)
    with self._lock:
      self.sources[name] = tree
      self._host[name] = parsed
      self._trees[name] = parsed

  def unregister(self, name: str) -> None:
    """Forget `name`; its slot is freed once no running request holds it."""
    with self._lock:
      if name not in self.sources:
        raise KeyError(name)
      del self.sources[name]
      self._host.pop(name, None)
      self._trees.pop(name, None)
      slot = self._slot_of.pop(name, None)
      if slot is not None:
        self._name_of[slot] = None

  def names(self) -> list[str]:
    with self._lock:
      return sorted(self.sources)

  # -- parsing (host) ---------------------------------------------------------------
  def parse(self, name: str) -> _Parsed:
    """The bank entries of adapter `name`, from the host cache or from disk."""
    with self._lock:
      if name in self._host:
        self._host.move_to_end(name)
        return self._host[name]
      if name in self._trees:
        return self._trees[name]
      if name not in self.sources:
        raise KeyError(name)
      src = self.sources[name]
    try:
      tree = lj.load_adapter(src, self.base, config=self.config)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise AdapterError(f"adapter {name!r} ({src}) does not fit this server's base: {e}"
                         ) from None
    parsed = self._entries(name, tree)
    with self._lock:
      self._host[name] = parsed
      while len(self._host) > self.host_capacity:
        self._host.popitem(last=False)
    return parsed

  def _entries(self, name: str, tree: Any) -> _Parsed:
    tree = _served_form(tree)
    got = {p: x for p, x in _paths.leaves_with_paths(tree, is_leaf=lj.is_implicit)
           if isinstance(x, LowRankWeight)}
    extra = sorted(set(got) - set(self.paths))
    if extra:
      raise AdapterError(f"adapter {name!r} adapts {extra[:4]}, which this server's bank "
                         f"does not hold (it holds the layers' projection kernels)")
    others = [p for p, x in _paths.leaves_with_paths(tree, is_leaf=lj.is_implicit)
              if lj.is_implicit(x) and getattr(x, "trainable_fields", ()) and p not in got]
    if others:
      raise AdapterError(f"adapter {name!r} trains {others[:4]} (modules_to_save or another "
                         "kind); a served bank holds LoRA / DoRA factors only")
    multis = dict((p, x) for p, x in _paths.leaves_with_paths(self.served, is_leaf=_is_multi)
                  if _is_multi(x))
    entries, rank = {}, 0
    for p in self.paths:
      m = multis[p]
      nb, R = m.nbatch, self.max_rank
      lw = got.get(p)
      a_shape = m.a.shape[:nb] + m.a.shape[nb + 1:]
      b_shape = m.b.shape[:nb] + m.b.shape[nb + 1:]
      mag_shape = m.mags.shape[:nb] + m.mags.shape[nb + 1:]
      if lw is None:
        entries[p] = (np.zeros(a_shape, m.a.dtype), np.zeros(b_shape, m.b.dtype),
                      np.zeros(m.scales.shape[:nb], np.float32), np.ones(mag_shape, np.float32))
        continue
      if lw.rank > R:
        raise AdapterError(f"adapter {name!r}: {p} has rank {lw.rank}; this server's bank "
                           f"holds rank <= {R} (--max-rank)")
      if tuple(lw.shape) != tuple(m.shape):
        raise AdapterError(f"adapter {name!r}: {p} kernel {tuple(lw.shape)} does not match "
                           f"the base {tuple(m.shape)}")
      rank = max(rank, lw.rank)
      a = np.zeros(a_shape, m.a.dtype)
      b = np.zeros(b_shape, m.b.dtype)
      a[..., :lw.rank] = np.asarray(lw.a, np.float32).astype(m.a.dtype)
      b[(slice(None),) * nb + (slice(0, lw.rank),)] = np.asarray(lw.b, np.float32
                                                                ).astype(m.b.dtype)
      scale = np.full(m.scales.shape[:nb], lw.scale, np.float32)
      mag = np.asarray(_magnitude_factor(lw), np.float32).reshape(mag_shape)
      entries[p] = (a, b, scale, mag)
    return _Parsed(entries, rank)

  # -- residency (device) -----------------------------------------------------------
  def acquire(self, name: str) -> int:
    """Pin adapter `name` in a slot and return the slot (loading it if needed).

    Raises:
      KeyError: `name` is not registered.
      AdapterError: the adapter cannot be served.
      BankFull: every slot is held by a running request (retry when one ends).
    """
    with self._lock:
      if name not in self.sources:
        raise KeyError(name)
      slot = self._slot_of.get(name)
      if slot is not None:
        self._pins[slot] += 1
        self._lru.move_to_end(slot)
        return slot
    parsed = self.parse(name)              # disk reads outside the lock
    with self._lock:
      slot = self._slot_of.get(name)       # another thread loaded it meanwhile
      if slot is None:
        free = [s for s in self._lru if self._pins[s] == 0]
        if not free:
          raise BankFull(f"all {self.slots} adapter slots are in use")
        slot = free[0]                     # least recently used first
        old = self._name_of[slot]
        if old is not None:
          del self._slot_of[old]
        self._write(slot, parsed)
        self._name_of[slot], self._slot_of[name] = name, slot
      self._pins[slot] += 1
      self._lru.move_to_end(slot)
      return slot

  def release(self, slot: int) -> None:
    with self._lock:
      if self._pins[slot] <= 0:
        raise RuntimeError(f"AdapterBank.release: slot {slot} is not held")
      self._pins[slot] -= 1

  def resident(self) -> dict[str, int]:
    with self._lock:
      return dict(self._slot_of)

  def _write(self, slot: int, parsed: _Parsed) -> None:
    new = {p: {"a": jnp.asarray(a), "b": jnp.asarray(b), "scales": jnp.asarray(s),
               "mags": jnp.asarray(m)} for p, (a, b, s, m) in parsed.entries.items()}
    arrays = self._update(self._arrays(self.served), jnp.int32(slot), new)
    self.served = self._with_arrays(self.served, arrays)
    self.loads += 1


def _update_slot(arrays: Mapping[str, dict], slot, new: Mapping[str, dict], *, nbs) -> dict:
  """`arrays[path][k]` with slot `slot` (on the adapter axis, after the `nbs[path]`
  stacked-layer axes) replaced by `new[path][k]`."""
  out = {}
  for p, d in arrays.items():
    nb = nbs[p]
    idx = (slice(None),) * nb + (slot,)
    out[p] = {k: d[k].at[idx].set(new[p][k].astype(d[k].dtype)) for k in d}
  return out


__all__ = ["AdapterBank", "AdapterError", "BankFull", "BANK_TARGETS"]
