"""GPTQ (OPTQ): group-wise integer quantization with second-order error feedback.

`qz.gptq(params, forward, calibration_batches, config)` quantizes the chosen kernels
of any pure JAX model. It needs no model-specific hooks: every target is wrapped in a
probe leaf, and `lj.implicit(forward)` runs the user's own function; the probe's
`dot_general` rule computes `x @ W` as usual and sends `X^T X` of its input rows to a
host accumulator (`jax.debug.callback`), so the second moments `H = 2 X^T X / n` are
collected from the activations as they flow, under `jit`, `scan` (stacked layers,
each slice its own H) and `remat`.

Layer after layer: targets are grouped into stages (a layer: the path up to its first
integer index, e.g. `layers/3`, or slice `l` of the stacked kernels under `scan`), in
the order the forward first uses them. Stage `s` is calibrated with every earlier
stage already quantized (its kernels replaced by their dequantized values), then
quantized, so later layers see the quantized earlier ones (llm-compressor's
sequential pipeline does the same per decoder layer). `sequential=False` collects
every H in one pass over the float model instead (faster, `stages` passes fewer).

The per-kernel algorithm is llm-compressor 0.14's `quantize_weight`:

- scales and zero points come from the original weight (min-max per group, as the
  round-to-nearest `GroupQuantizedArray`), fixed before the column loop;
- dead inputs (`H[i, i] == 0`) get `H[i, i] = 1` and zero weights; dampening adds
  `percdamp * mean(diag H)` to the diagonal; `Hinv` is the upper Cholesky factor of
  `H^-1`;
- columns are quantized one by one in lazy blocks of `block_columns` (128): the error
  `(w - q) / Hinv[i, i]` updates the rest of the block at once and the columns after
  it by one matrix product per block;
- activation order (`act_order=True` / "weight"): columns are visited by decreasing
  `diag H`, each keeping its own group (no `g_idx`); `act_order="group"` forms the
  groups in that order instead and stores the `g_idx` (GPTQ's `desc_act`).

Differences from llm-compressor, by design: H is normalized by the number of token
rows (theirs by the number of sequences; GPTQ is invariant to that scale up to
rounding), accumulated in float64 on the host; a Hessian that is not positive
definite after dampening is an error naming the path (theirs falls back to
round-to-nearest with a warning).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

import lora_jax as lj
from lora_jax import extend
from quantization import _group as G
from quantization._array import QuantConfig


# ----------------------------------------------------------------------------
# collecting H through the user's forward

class _Probe(lj.ImplicitArray):
  """A dense kernel `(*stack, in, out)` whose `x @ W` reports `X^T X` of its inputs.

  `slot` holds, per stacked slice, the accumulator index it reports to (-1: do not
  report); `scan` slices it with the kernel."""

  w: Any = extend.base()
  slot: Any = extend.data()

  @property
  def nbatch(self) -> int:
    return self.w.ndim - 2

  def materialize(self):
    return self.w


class _Recorder:
  """Host-side sums of `X^T X` (float64) and row counts per slot, and the order in
  which slots were first seen."""

  def __init__(self, sizes: list[int]):
    self.h = [np.zeros((k, k), np.float64) for k in sizes]
    self.n = [0] * len(sizes)
    self.order: list[int] = []

  def __call__(self, slot, xtx, rows):
    slot = int(slot)
    if slot < 0:
      return
    if self.n[slot] == 0 and slot not in self.order:
      self.order.append(slot)
    self.h[slot] += np.asarray(xtx, np.float64)
    self.n[slot] += int(rows)


_RECORDER: list[_Recorder] = []          # the active recorder (set while a pass runs)


def _report(slot, xtx, rows):
  _RECORDER[-1](slot, xtx, rows)


@lj.register_dot_rule(_Probe)
def _probe_dot(prim, x, probe, *, dimension_numbers, precision=None,
               preferred_element_type=None, **params):
  (xc, wc), (xb, wb) = dimension_numbers
  x = lj.materialize(x)
  k = probe.w.shape[-2]
  if (probe.nbatch == 0 and tuple(wc) == (0,) and not xb and not wb
      and tuple(xc) == (x.ndim - 1,) and x.shape[-1] == k):
    rows = x.reshape(-1, k).astype(jnp.float32)
    xtx = lax.dot_general(rows, rows, (((0,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST)
    jax.debug.callback(_report, probe.slot, xtx, rows.shape[0], ordered=True)
  return lax.dot_general(x, probe.w, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **params)


# ----------------------------------------------------------------------------
# one kernel

def _qparams(wt: jax.Array, col_group: jax.Array, groups: int, group: int, bits: int,
             symmetric: bool, wdtype):
  """Per-group scales/zeros of `wt` (out, in) where input j belongs to group
  col_group[j] (each group holding `group` inputs; the last may hold fewer)."""
  order = jnp.argsort(col_group, stable=True)
  ws = wt[:, order]
  pad = groups * group - ws.shape[1]
  if pad:
    ws = jnp.pad(ws, ((0, 0), (0, pad)))
  return G.group_qparams(ws.reshape(ws.shape[0], groups, group), bits, symmetric, wdtype)


@functools.partial(jax.jit, static_argnames=("bits", "group", "symmetric", "wdtype",
                                             "act_order", "block", "percdamp"))
def _prepare(w, h, *, bits, group, symmetric, wdtype, act_order, block, percdamp):
  """Everything before the column loop: dead inputs, activation order, the fixed
  scales / zero points (from the original weight), the visited order's per-column
  scales, dampening and padding to whole blocks."""
  k, n = w.shape
  groups = -(-k // group)
  wt = w.T                                                     # (out, in), as torch
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = jnp.where(jnp.diag(dead), 1.0, h)
  wt = jnp.where(dead[None, :], 0.0, wt)
  # by the diagonal before dead inputs are set to 1, as llm-compressor
  perm = jnp.argsort(-diag, stable=True) if act_order else jnp.arange(k)
  if act_order == "group":
    g_idx = jnp.zeros(k, jnp.int32).at[perm].set(jnp.arange(k, dtype=jnp.int32) // group)
  else:
    g_idx = jnp.arange(k, dtype=jnp.int32) // group
  scales, zeros = _qparams(wt, g_idx, groups, group, bits, symmetric, wdtype)
  cols_group = g_idx[perm]                                     # group of each visited column
  s_cols = scales.astype(jnp.float32)[:, cols_group]           # (out, in)
  # symmetric: zero point 0 (x / s + 0 rounds as x / s does)
  z_cols = (jnp.zeros_like(s_cols) if zeros is None
            else zeros.astype(jnp.float32)[:, cols_group])
  wp = wt[:, perm]
  hp = h[perm][:, perm]
  hp = hp + percdamp * jnp.mean(jnp.diagonal(hp)) * jnp.eye(k, dtype=hp.dtype)
  # pad to whole blocks with decoupled identity columns of zero weight (quantize to 0)
  kp = -(-k // block) * block
  if kp != k:
    e = kp - k
    hp = jnp.block([[hp, jnp.zeros((k, e), hp.dtype)], [jnp.zeros((e, k), hp.dtype),
                                                         jnp.eye(e, dtype=hp.dtype)]])
    wp = jnp.pad(wp, ((0, 0), (0, e)))
    s_cols = jnp.pad(s_cols, ((0, 0), (0, e)), constant_values=1.0)
    z_cols = jnp.pad(z_cols, ((0, 0), (0, e)))
  return wp, hp, s_cols, z_cols, scales, zeros, g_idx, perm


@functools.partial(jax.jit, static_argnames=("block",))
def _column_loop(wp, hp, s_cols, z_cols, qmin, qmax, *, block):
  """The GPTQ column loop over a padded, permuted `wp` (out, kp) with damped `hp`.

  One compile per kernel shape: the format enters as values (`qmin`, `qmax`, zero
  points), so every format and activation order of a shape share it. Returns the
  integer codes (out, kp) float32 in visiting order, the loss and whether the
  Cholesky factor is finite."""
  n, kp = wp.shape
  chol = jnp.linalg.cholesky(hp)
  finite = jnp.all(jnp.isfinite(chol))
  hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(kp, dtype=hp.dtype))
  hinv = jnp.linalg.cholesky(hinv).T                           # upper factor of H^-1

  def block_step(i1, carry):
    wp, q_all, loss = carry
    start = i1 * block
    w1 = lax.dynamic_slice_in_dim(wp, start, block, axis=1)
    h1 = lax.dynamic_slice(hinv, (start, start), (block, block))
    s1 = lax.dynamic_slice_in_dim(s_cols, start, block, axis=1)
    z1 = lax.dynamic_slice_in_dim(z_cols, start, block, axis=1)

    def col_step(i, c):
      w1, q1, err1 = c
      col, s, z = w1[:, i], s1[:, i], z1[:, i]
      q = jnp.round(jnp.clip(G.div_rn(col, s) + z, qmin, qmax))
      dq = (q - z) * s
      err = (col - dq) / h1[i, i]
      w1 = w1 - err[:, None] * h1[i][None, :]                 # h1 is upper triangular
      w1 = w1.at[:, i].set(dq)
      return w1, q1.at[:, i].set(q), err1.at[:, i].set(err)

    z0 = jnp.zeros_like(w1)
    w1, q1, err1 = lax.fori_loop(0, block, col_step, (w1, z0, z0))
    loss = loss + jnp.sum(err1 * err1) / 2
    # the columns after this block: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    rows = lax.dynamic_slice_in_dim(hinv, start, block, axis=0)       # (block, kp)
    after = jnp.arange(kp) >= start + block
    wp = wp - (err1 @ jnp.where(after[None, :], rows, 0.0))
    wp = lax.dynamic_update_slice_in_dim(wp, w1, start, axis=1)
    q_all = lax.dynamic_update_slice_in_dim(q_all, q1, start, axis=1)
    return wp, q_all, loss

  q_all = jnp.zeros((n, kp), jnp.float32)
  _, q_all, loss = lax.fori_loop(0, kp // block, block_step,
                                 (wp, q_all, jnp.zeros((), jnp.float32)))
  return q_all, loss, finite


def _gptq_kernel(w, h, *, bits, group, symmetric, wdtype, act_order, block, percdamp):
  """GPTQ of one kernel.

  Args:
    w: (in, out) float32 kernel. h: (in, in) float32 second moment of its inputs.
  Returns:
    (codes (out, in) int8, scales (out, groups), zeros or None, g_idx (in,) int32,
    loss (): sum of squared scaled errors, as llm-compressor reports, finite: bool).
  """
  k = w.shape[0]
  wp, hp, s_cols, z_cols, scales, zeros, g_idx, perm = _prepare(
      w, h, bits=bits, group=group, symmetric=symmetric, wdtype=wdtype, act_order=act_order,
      block=block, percdamp=percdamp)
  qmin, qmax = G.qrange(bits)
  q_all, loss, finite = _column_loop(wp, hp, s_cols, z_cols, jnp.float32(qmin),
                                     jnp.float32(qmax), block=block)
  codes = q_all[:, :k][:, jnp.argsort(perm)].astype(jnp.int8)
  return codes, scales, zeros, g_idx, loss, finite


def gptq_kernel(w: jax.Array, hessian: jax.Array, config: QuantConfig, *,
                block_columns: int = 128, percdamp: float = 0.01,
                path: str = "kernel") -> tuple[G.GroupQuantizedArray, float]:
  """GPTQ of one kernel `(in, out)` given the second moment `hessian` `(in, in)` of its
  inputs (`2 X^T X / n`). Returns `(GroupQuantizedArray, loss)`, the loss being
  llm-compressor's `sum(err^2) / 2` of the scaled column errors."""
  if not config.group_wise:
    raise ValueError(f"{path}: GPTQ quantizes to the group-wise integer formats "
                     f"(QuantConfig(format='int2'|'int3'|'int4'|'int8', symmetric=True|False)); "
                     f"got format {config.format!r} with symmetric=None")
  if w.ndim != 2:
    raise ValueError(f"{path}: gptq_kernel takes one (in, out) kernel, got {tuple(w.shape)}")
  k, n = w.shape
  if tuple(hessian.shape) != (k, k):
    raise ValueError(f"{path}: hessian {tuple(hessian.shape)} does not fit kernel "
                     f"{tuple(w.shape)}; expected {(k, k)}")
  group = k if config.block_size == -1 else config.block_size
  if group > k:
    group = k
  act = config.act_order
  act = "weight" if act is True else (act or False)
  codes, scales, zeros, g_idx, loss, finite = _gptq_kernel(
      jnp.asarray(w, jnp.float32), jnp.asarray(hessian, jnp.float32), bits=config.bits,
      group=group, symmetric=config.symmetric, wdtype=jnp.dtype(w.dtype), act_order=act,
      block=int(block_columns), percdamp=float(percdamp))
  if not bool(finite):
    raise ValueError(f"{path}: the input second moment H ({k}x{k}) is not positive definite "
                     f"after dampening {percdamp} x mean(diag); use more calibration data "
                     "or a larger percdamp")
  packed = G.pack_codes((codes.astype(jnp.int16) - G.qrange(config.bits)[0]).astype(jnp.uint8),
                        config.bits)
  q = G.GroupQuantizedArray(packed=packed, scales=scales, zeros=zeros,
                            g_idx=g_idx if act == "group" else None, bits=config.bits,
                            group_size=group, kernel_shape=(k, n), dtype=jnp.dtype(w.dtype))
  return q, float(loss)


# ----------------------------------------------------------------------------
# the model

def _stage_of(path: str, layer: int | None) -> tuple:
  if layer is not None:
    return ("stacked", layer)
  m = re.match(r"^(.*?/\d+)(/|$)", path)
  return ("path", m.group(1) if m else path)


def gptq(params: Any, forward: Callable[..., Any], calibration_batches: Iterable[Any],
         config: QuantConfig, *, block_columns: int = 128, percdamp: float = 0.01,
         sequential: bool = True, progress: bool | None = None,
         return_losses: bool = False):
  """Quantize `params` with GPTQ, calibrated on `forward(params, batch)`.

  Args:
    params: a parameter pytree of dense kernels `(*stack, in, out)` (stacked layers
      under `scan` are calibrated slice by slice).
    forward: the model, `forward(params, batch) -> anything`; it runs as
      `lj.implicit(forward)` under `jax.jit`, so it may use `scan`, `remat`, ....
    calibration_batches: an iterable (re-iterated once per stage: a list, or a
      sequence) of batches, each passed as `forward(params, batch)`.
    config: `QuantConfig` of a group-wise integer format (`format="int4"`,
      `symmetric=False`, `block_size=128`, `act_order=...`); `config.targets` as
      for `qz.quantize` (None: every floating kernel the forward uses as `x @ W`).
    block_columns: GPTQ's lazy-batch width (128). percdamp: dampening as a fraction
      of the mean diagonal of H (0.01).
    sequential: calibrate stage after stage on the partly quantized model (default),
      or every target in one pass over the float model.
    progress: show a tqdm bar (default: when there are more than 4 stages).
    return_losses: also return `{path: loss}` (`{path[l]: ...}` for stacked slices).

  Returns:
    `params` with each target a `GroupQuantizedArray` (stacked targets stacked),
    and the losses if asked.

  Raises:
    ValueError naming the path: a format GPTQ does not produce, a target that is not
    a dense floating kernel, one that the forward never uses as `x @ W` (e.g. only
    through a gather), calibration batches that do not fit `forward`, an H that is
    not positive definite.
  """
  if not config.group_wise:
    raise ValueError("qz.gptq: GPTQ quantizes to the group-wise integer formats "
                     "(QuantConfig(format='int2'|'int3'|'int4'|'int8', symmetric=True|False)); "
                     f"got format {config.format!r} with symmetric=None")
  batches = list(calibration_batches)
  if not batches:
    raise ValueError("qz.gptq: calibration_batches is empty")
  leaves = extend.leaves_with_paths(params, is_leaf=lj.is_implicit)
  paths = [p for p, _ in leaves]
  if config.targets is None:
    targets = [p for p, x in leaves if extend.is_float_kernel(x)]
  else:
    chosen = extend.select_paths(paths, config.targets)
    targets = [p for p in paths if p in chosen]
  by_path = dict(leaves)
  for p in targets:
    x = by_path[p]
    if lj.is_implicit(x) or not extend.is_float_kernel(x):
      raise ValueError(f"qz.gptq: target {p} is a {type(x).__name__} "
                       f"{getattr(x, 'shape', '')}; GPTQ quantizes dense floating kernels "
                       "(*stack, in, out): run it before lj.init / qz.quantize")
  # slots: one per (target, stacked slice)
  slots: list[tuple[str, int | None]] = []
  for p in targets:
    x = by_path[p]
    if x.ndim == 2:
      slots.append((p, None))
    else:
      stack = int(np.prod(x.shape[:-2]))
      slots.extend((p, i) for i in range(stack))
  slot_index = {s: i for i, s in enumerate(slots)}
  sizes = [by_path[p].shape[-2] for p, _ in slots]

  def probed(current: dict[str, Any], active: set[int]):
    def wrap(path, leaf):
      if path not in current:
        return leaf
      w = current[path]
      if w.ndim == 2:
        i = slot_index[(path, None)]
        slot = jnp.asarray(i if i in active else -1, jnp.int32)
      else:
        ids = [slot_index[(path, j)] for j in range(int(np.prod(w.shape[:-2])))]
        slot = jnp.asarray([i if i in active else -1 for i in ids], jnp.int32
                           ).reshape(w.shape[:-2])
      return _Probe(w=w, slot=slot)
    return extend.map_with_path(wrap, params, is_leaf=lj.is_implicit)

  run = jax.jit(lj.implicit(forward))

  def calibrate(current, active: set[int]) -> _Recorder:
    rec = _Recorder(sizes)
    _RECORDER.append(rec)
    try:
      tree = probed(current, active)
      for i, batch in enumerate(batches):
        try:
          out = run(tree, batch)
        except (TypeError, ValueError) as e:
          raise ValueError(f"qz.gptq: calibration batch {i} "
                           f"({jax.tree.map(lambda a: getattr(a, 'shape', a), batch)}) does "
                           f"not fit forward: {e}") from e
        jax.block_until_ready(out)
      jax.effects_barrier()
    finally:
      _RECORDER.pop()
    return rec

  current = {p: jnp.asarray(by_path[p]) for p in targets}
  everything = set(range(len(slots)))
  # stage order: the order in which the forward first uses each slot
  first = calibrate(current, everything)
  unused = [slots[i] for i in range(len(slots)) if first.n[i] == 0]
  if unused:
    p, j = unused[0]
    raise ValueError(f"qz.gptq: target {p}{'' if j is None else f'[{j}]'} is never used by "
                     "forward as the weight of `x @ W` (a dot_general contracting its "
                     f"input axis), so GPTQ has no activations for it; {len(unused)} such "
                     "target slot(s). Leave it out of config.targets")
  stages: dict[tuple, list[int]] = {}
  for i in first.order:
    p, j = slots[i]
    stages.setdefault(_stage_of(p, j), []).append(i)
  stage_list = list(stages.values()) if sequential else [list(first.order)]
  show = progress if progress is not None else len(stage_list) > 4
  bar = None
  if show:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(stage_list), desc="gptq", unit="stage")
  quantized: dict[int, G.GroupQuantizedArray] = {}
  losses: dict[str, float] = {}
  for s, members in enumerate(stage_list):
    rec = first if s == 0 else calibrate(current, set(members))
    for i in members:
      p, j = slots[i]
      w = current[p] if j is None else current[p].reshape(-1, *current[p].shape[-2:])[j]
      w_orig = by_path[p] if j is None else jnp.asarray(by_path[p]).reshape(
          -1, *by_path[p].shape[-2:])[j]
      h = 2.0 * rec.h[i] / max(rec.n[i], 1)
      name = p if j is None else f"{p}[{j}]"
      q, loss = gptq_kernel(w_orig, jnp.asarray(h, jnp.float32), config,
                            block_columns=block_columns, percdamp=percdamp, path=name)
      quantized[i] = q
      losses[name] = loss
      del w
      # later stages see this slot quantized (its dequantized values)
      deq = q.materialize()
      if j is None:
        current[p] = deq
      else:
        flat = current[p].reshape(-1, *current[p].shape[-2:]).at[j].set(deq)
        current[p] = flat.reshape(current[p].shape)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()

  def leaf_for(path):
    x = by_path[path]
    if x.ndim == 2:
      return quantized[slot_index[(path, None)]]
    parts = [quantized[slot_index[(path, j)]] for j in range(int(np.prod(x.shape[:-2])))]
    stacked = jax.tree.map(lambda *c: jnp.stack(c).reshape(*x.shape[:-2], *c[0].shape),
                           *parts)
    return stacked

  out = extend.map_with_path(lambda p, x: leaf_for(p) if p in current else x, params,
                             is_leaf=lj.is_implicit)
  return (out, losses) if return_losses else out


del P
__all__ = ["gptq", "gptq_kernel"]
