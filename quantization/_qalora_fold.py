"""`qz.fold_qalora`: a trained QA-LoRA adapter folded into its group-wise quantized base.

A `QALoraWeight` over a `GroupQuantizedArray` whose group size equals the adapter's
`L` adds, to every input `i` of output `o`, a value that depends only on the group
`g = i // L`:

    W'[i, o] = (q[o, i] - z[o, g]) * s[o, g] + c[o, g],
    c[o, g]  = s_lora * (in / L) / L * (a @ b)[g, o]

so `W'` is the same codes and scales with zero points `z' = z - c / s`. Nothing dense
is built: `a @ b` is `(in / L, out)`, the size of the scales.

With float32 zero points the fold is exact to float rounding. compressed-tensors (and
GPTQ kernels) store integer zero points: `integer_zero_points=True` rounds `z'` to int8
in the code range, which moves each group's weights by up to `s / 2` (and by more where
`z'` leaves the code range and is clamped); the test suite measures the cost on a
small model and prints it (tests/test_qalora.py::test_fold_integer_zero_points_cost).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax import extend
from quantization._group import GroupQuantizedArray, qrange


def _fold_one(path: str, qw: lj.QALoraWeight, integer_zero_points: bool):
  q = qw.w
  L = int(qw.group_size)
  k, n = tuple(qw.shape[-2:])
  where = f"{path}: fold_qalora"
  if not isinstance(q, GroupQuantizedArray):
    if isinstance(q, lj.ImplicitArray):
      raise ValueError(f"{where}: the base is a {type(q).__name__} {tuple(q.shape)}, not a "
                       "group-wise integer GroupQuantizedArray with zero points; QA-LoRA "
                       "folds only into those (lj.merge gives the dense weight)")
    raise ValueError(f"{where}: the base {tuple(q.shape)} {jnp.dtype(q.dtype).name} is not "
                     "quantized; for a dense base the fold is just lj.merge(params)")
  if k % L:
    raise ValueError(f"{where}: group size {L} does not divide the input size {k} of the "
                     f"kernel {tuple(qw.shape)}")
  if q.zeros is None:
    raise ValueError(f"{where}: the base int{q.bits}/g{q.group_size} {tuple(q.shape)} is "
                     "symmetric (no zero points), so there is nothing to fold the update "
                     "into; quantize with QuantConfig(symmetric=False)")
  if int(q.group_size) != L:
    raise ValueError(f"{where}: the base's quantization group size {q.group_size} differs "
                     f"from the QA-LoRA group size {L} (kernel {tuple(qw.shape)}); the "
                     "update is constant over groups of L inputs only")
  if q.g_idx is not None:
    raise ValueError(f"{where}: the base int{q.bits}/g{q.group_size} {tuple(q.shape)} has a "
                     "g_idx (activation order): its groups are not runs of L consecutive "
                     "inputs, which QA-LoRA pools")
  ab = jnp.einsum("...gr,...ro->...og", qw.a.astype(jnp.float32),
                  qw.b.astype(jnp.float32))                         # (*batch, out, groups)
  c = jnp.float32(qw.scale) * jnp.float32(qw.pool_scale) * ab
  s = q.scales.astype(jnp.float32)
  z = q.zeros.astype(jnp.float32) - c / s
  if integer_zero_points:
    lo, hi = qrange(q.bits)
    z = jnp.clip(jnp.round(z), lo, hi).astype(jnp.int8)
  return q.replace_children(zeros=z)


def fold_qalora(params: Any, integer_zero_points: bool = False) -> Any:
  """Every `QALoraWeight` over a group-wise quantized base folded into that base.

  Args:
    params: a tree with `lj.QALoraWeight` leaves (from `lj.init(..., LoraConfig(
      use_qalora=True, qalora_group_size=L))` on a `qz.quantize`d tree, or
      `lj.load_adapter`). Other leaves are returned unchanged.
    integer_zero_points: False (default): the new zero points `z - c / s` are float32,
      and the folded model computes what the adapter did, to float rounding.
      True: they are rounded to int8 and clamped to the code range, what
      compressed-tensors can store; each weight then moves by up to half its group's
      scale (more where a zero point is clamped), so outputs change by about
      `sum_i |x_i| * s / 4` on average (measured in tests/test_qalora.py).

  Returns:
    `params` with each such leaf replaced by a `GroupQuantizedArray` with the same
    packed codes and scales (the same arrays) and new zero points.

  Raises:
    ValueError naming the path and shapes: a base that is not a `GroupQuantizedArray`
    (a dense base: use `lj.merge`), a symmetric base (no zero points), a base whose
    group size differs from the adapter's, a base with a `g_idx`, a group size that does
    not divide the input size.
  """
  is_qa = lambda x: isinstance(x, lj.QALoraWeight)  # noqa: E731

  def one(path, x):
    return _fold_one(path, x, bool(integer_zero_points)) if is_qa(x) else x

  return extend.map_with_path(one, params, is_leaf=lambda x: is_qa(x) or lj.is_implicit(x))


__all__ = ["fold_qalora"]
