"""Continuous batching over a fixed-slot KV cache, many adapters in one batch.

The cache holds `max_batch` rows of `max_len` slots per layer, preallocated once:
`(layers, max_batch, max_len, kv_heads, head_dim)` for keys and for values. A request
owns one row from admission to its end; its tokens sit at slots `0..length-1`, so a
slot is a position and the sliding-window masks of Mistral / Gemma hold as they are.
Fixed rows instead of pages: every row can reach the full context, which wastes memory
when most requests are short, but it needs no block table, no gather in attention and
no allocator, and on this scale (tens of rows) memory is not the limit; a paged cache
is the change to make when rows x context outgrow the device (vLLM's reason for it).

One scheduler step:
1. admit waiting requests into free rows (an adapter request also needs a bank slot;
   when every slot is held it waits), and prefill each one alone (its prompt padded
   on the right to a power of two, so few shapes compile), writing its keys and values
   into its row and sampling its first token;
2. one decode step for every running row at once: one new token per row, each row at
   its own position (per-row cache writes) with its own adapter (the per-row gather
   rule of `lj.MultiLoraWeight`: BGMV) and its own sampling parameters;
3. hand each row's token to its request; finished or cancelled requests leave, freeing
   their row and their adapter slot, and waiting ones join at the next step.

Prefill runs one request per call, so its LoRA term is one adapter's plain GEMM (the
gather picks the same adapter for every token): there is no mixed-adapter prefill to
sort into segments (SGMV) unless prefills are batched, which this engine does not do.
Nothing recompiles as requests come and go or adapters load: the decode step has one
shape, prefill one per length bucket (counted in `Engine.traces`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax import models

from serving.bank import AdapterBank, BankFull
from serving.sampling import sample_rows

MIN_BUCKET = 16


@dataclasses.dataclass
class Sampling:
  """Sampling parameters of one request (OpenAI's names)."""
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  ignore_eos: bool = False     # vLLM's extension: go on to max_tokens past an eos


@dataclasses.dataclass(eq=False)
class Request:
  """One generation. `on_token(id) -> bool` gets each new token (False: stop here, e.g.
  a stop string was met); `on_done(reason, error)` once at the end, `reason` one of
  "stop" (eos or a stop string), "length" (max_tokens), "cancelled", "error"."""
  prompt: Sequence[int]
  sampling: Sampling
  on_token: Callable[[int], bool]
  on_done: Callable[[str, str | None], None]
  adapter: str | None = None
  rid: int = dataclasses.field(default_factory=itertools.count().__next__)
  cancelled: bool = False
  # engine state
  row: int = -1
  slot: int = -1
  made: int = 0
  seed: int = 0
  t_submit: float = dataclasses.field(default_factory=time.perf_counter)


class Engine:
  """The scheduler and the jitted model steps over one base and one adapter bank.

  Args:
    config: the model's `DecoderConfig`.
    bank: an `AdapterBank` over the base parameters.
    max_batch: rows of the KV cache (requests decoded together).
    max_len: slots per row: prompt plus generated tokens of one request.
    eos_ids: token ids that end a generation.
  """

  def __init__(self, config, bank: AdapterBank, *, max_batch: int = 8, max_len: int = 512,
               eos_ids: Sequence[int] = ()):
    self.config, self.bank = config, bank
    self.B, self.S = int(max_batch), int(max_len)
    self.eos = set(int(e) for e in eos_ids)
    c = config
    dtype = jax.tree.leaves(bank.base["embed_tokens"])[0].dtype
    shape = (c.num_hidden_layers, self.B, self.S, c.num_key_value_heads, c.head_dim)
    self.cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    self.valid = np.zeros((self.B, self.S), bool)
    self.rows: list[Request | None] = [None] * self.B
    self.last = np.zeros(self.B, np.int32)          # each row's latest token
    self.waiting: collections.deque[Request] = collections.deque()
    self._lock = threading.Condition()
    self._rng = np.random.default_rng()
    self.traces = collections.Counter()             # compiles of each step kind
    self.steps = 0
    self._decode = jax.jit(self._decode_fn, static_argnums=(1,), donate_argnums=(6,))
    self._prefill = jax.jit(self._prefill_fn, static_argnums=(1,), donate_argnums=(5,))

  # -- the jitted steps -----------------------------------------------------------
  def _prefill_fn(self, served, config, tokens, length, adapter, cache, row, sampling):
    """tokens (1, P) right-padded, length (): the first token and the cache with the
    prompt's keys/values in row `row`, slots 0..P-1."""
    self.traces[f"prefill{tokens.shape[1]}"] += 1
    return lj.implicit(self._prefill_core)(self._route(served, adapter), config,
                                           tokens, length, cache, row, sampling)

  def _route(self, served, ids):
    """The served tree with each row's adapter; the base itself when there is no bank."""
    return served if self.bank.slots == 0 else lj.with_adapter_ids(served, ids)

  @staticmethod
  def _prefill_core(s, config, tokens, length, cache, row, sampling):
    P = tokens.shape[1]
    c = config
    dtype = cache["k"].dtype
    small = {k: jnp.zeros((c.num_hidden_layers, 1, P, c.num_key_value_heads, c.head_dim),
                          dtype) for k in ("k", "v")}
    pos = jnp.arange(P, dtype=jnp.int32)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] < length)
    h, small = models.cached_forward(s, c, tokens, pos[None], mask[None], small, 0,
                                     head=False)
    h_last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)
    logits = models.logits_from_hidden(s, c, h_last)[:, 0]
    start = (0, row, 0, 0, 0)
    cache = {k: jax.lax.dynamic_update_slice(cache[k], small[k], start) for k in cache}
    tok = sample_rows(logits, *sampling)
    return tok, cache

  def _decode_fn(self, served, config, tokens, positions, valid, ids, cache, sampling):
    """One token for every row: tokens/positions/ids (B,), valid (B, S) bool with each
    row's new slot already set."""
    self.traces["decode"] += 1
    return lj.implicit(self._decode_core)(self._route(served, ids), config, tokens,
                                          positions, valid, cache, sampling)

  @staticmethod
  def _decode_core(s, config, tokens, positions, valid, cache, sampling):
    logits, cache = models.cached_forward(s, config, tokens[:, None], positions[:, None],
                                          valid[:, None, :], cache, positions)
    return sample_rows(logits[:, -1], *sampling), cache

  # -- requests -------------------------------------------------------------------
  def check(self, n_prompt: int, max_tokens: int) -> str | None:
    """Why a request of `n_prompt` tokens asking `max_tokens` cannot run, or None."""
    if n_prompt < 1:
      return "the prompt is empty"
    if n_prompt >= self.S:
      return (f"the prompt has {n_prompt} tokens; this server's context is {self.S} tokens "
              "(--max-model-len), prompt and completion together")
    if n_prompt + max_tokens > self.S:
      return (f"this server's context is {self.S} tokens, but {n_prompt} prompt tokens + "
              f"max_tokens {max_tokens} = {n_prompt + max_tokens}; lower max_tokens to at "
              f"most {self.S - n_prompt}")
    return None

  def submit(self, req: Request) -> None:
    why = self.check(len(req.prompt), req.sampling.max_tokens)
    if why:
      raise ValueError(why)
    req.seed = (int(req.sampling.seed) if req.sampling.seed is not None
                else int(self._rng.integers(0, 2**31))) & 0xFFFFFFFF
    with self._lock:
      self.waiting.append(req)
      self._lock.notify()

  def cancel(self, req: Request) -> None:
    """Stop `req` at the next step (its row and adapter slot are freed then)."""
    with self._lock:
      req.cancelled = True
      self._lock.notify()

  def busy(self) -> bool:
    return bool(self.waiting) or any(r is not None for r in self.rows)

  # -- the scheduler --------------------------------------------------------------
  def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
    if req.row >= 0:
      self.rows[req.row] = None
      self.valid[req.row] = False
      req.row = -1
    if req.slot >= 0:
      self.bank.release(req.slot)
      req.slot = -1
    try:
      req.on_done(reason, error)
    except Exception:  # noqa: BLE001  (a client callback must not stop the engine)
      pass

  def _emit(self, req: Request, tok: int) -> None:
    """Hand `tok` to `req`; end it on eos, a stop, max_tokens or a cancel."""
    if req.cancelled:
      return self._finish(req, "cancelled")
    if tok in self.eos and not req.sampling.ignore_eos:
      return self._finish(req, "stop")
    req.made += 1
    try:
      go_on = req.on_token(tok)
    except Exception as e:  # noqa: BLE001
      return self._finish(req, "error", f"{type(e).__name__}: {e}")
    if not go_on:
      return self._finish(req, "stop")
    if req.made >= req.sampling.max_tokens:
      return self._finish(req, "length")

  def _sampling(self, reqs: Sequence[Request | None]):
    def col(f, dtype, idle):
      return jnp.asarray(np.array([f(r) if r is not None else idle for r in reqs], dtype))
    return (col(lambda r: r.sampling.temperature, np.float32, 0.0),
            col(lambda r: r.sampling.top_k, np.int32, 0),
            col(lambda r: r.sampling.top_p, np.float32, 1.0),
            col(lambda r: r.seed, np.uint32, 0),
            col(lambda r: r.made, np.int32, 0))

  def _admit(self) -> list[Request]:
    """Waiting requests that get a row (and their adapter a slot) now, in order."""
    admitted = []
    with self._lock:
      free = [i for i, r in enumerate(self.rows) if r is None]
      keep = collections.deque()
      while self.waiting:
        req = self.waiting.popleft()
        if req.cancelled:
          self._finish(req, "cancelled")
          continue
        if not free:
          keep.append(req)
          continue
        if req.adapter is not None:
          try:
            req.slot = self.bank.acquire(req.adapter)
          except BankFull:
            keep.append(req)            # waits for a slot; others may still join
            continue
          except KeyError:
            self._finish(req, "error", f"adapter {req.adapter!r} was unloaded")
            continue
          except ValueError as e:
            self._finish(req, "error", str(e))
            continue
        req.row = free.pop(0)
        self.rows[req.row] = req
        admitted.append(req)
      self.waiting = keep
    return admitted

  def _prefill_one(self, req: Request) -> None:
    n = len(req.prompt)
    P = min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), self.S)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, :n] = req.prompt
    tok, self.cache = self._prefill(
        self.bank.served, self.config, jnp.asarray(tokens), jnp.int32(n),
        jnp.asarray([req.slot], jnp.int32), self.cache, jnp.int32(req.row),
        self._sampling([req]))
    self.valid[req.row] = False
    self.valid[req.row, :n] = True
    self.last[req.row] = int(tok[0])
    self._emit(req, int(tok[0]))

  def step(self) -> bool:
    """One scheduler step; False when there was nothing to do."""
    for req in self._admit():
      self._prefill_one(req)
    for i, req in enumerate(self.rows):        # cancels between steps
      if req is not None and req.cancelled:
        self._finish(req, "cancelled")
    running = [r for r in self.rows if r is not None]
    if not running:
      return bool(self.waiting)
    positions = np.zeros(self.B, np.int32)
    ids = np.full(self.B, -1, np.int32)
    for r in running:
      positions[r.row] = len(r.prompt) + r.made - 1   # the slot of the latest token
      ids[r.row] = r.slot
      self.valid[r.row, positions[r.row]] = True
    tokens, self.cache = self._decode(
        self.bank.served, self.config, jnp.asarray(self.last), jnp.asarray(positions),
        jnp.asarray(self.valid), jnp.asarray(ids), self.cache, self._sampling(self.rows))
    tokens = np.asarray(tokens)
    self.steps += 1
    for r in running:
      self.last[r.row] = tokens[r.row]
      self._emit(r, int(tokens[r.row]))
    return True

  def _fail_all(self, why: str) -> None:
    """End every running and waiting request with an error and start from an empty
    cache (a failed step may have consumed the donated one)."""
    with self._lock:
      waiting, self.waiting = list(self.waiting), collections.deque()
    for req in [r for r in self.rows if r is not None] + waiting:
      self._finish(req, "error", why)
    self.cache = {k: jnp.zeros(v.shape, v.dtype) for k, v in self.cache.items()}

  def run(self, stop: threading.Event) -> None:
    """Step until `stop` is set; sleeps on a condition while idle."""
    while not stop.is_set():
      try:
        worked = self.step()
      except Exception as e:  # noqa: BLE001  (one bad step must not stop the server)
        self._fail_all(f"{type(e).__name__}: {e}")
        worked = False
      if not worked:
        with self._lock:
          if not self.busy():
            self._lock.wait(timeout=0.1)


__all__ = ["Engine", "Request", "Sampling"]
