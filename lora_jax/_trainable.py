"""`Trainable`: a weight trained in full beside the LoRA factors (PEFT's `modules_to_save`).

A classification head, or the embeddings and output layer when tokens are added, are
usually trained whole. `LoraConfig(modules_to_save=regex)` wraps those leaves in
`Trainable(value)`, so the tree itself says what trains: `lj.split` puts `value` on
the adapter side, `lj.trainable_mask` marks it, `lj.save_adapter` writes it the way
PEFT does and `lj.merge` unwraps it. Under `lj.implicit` the leaf is just its value
(unwrapped before tracing: there is nothing to factor).
"""

from __future__ import annotations

from typing import Any

from lora_jax._implicit import ImplicitArray, trainable


class Trainable(ImplicitArray):
  """A dense leaf trained in full. `value`: the array, any shape and float dtype."""

  value: Any = trainable()

  materialize_is_free = True          # `implicit` unwraps it up front, no warning

  @property
  def shape(self):
    return tuple(self.value.shape)

  @property
  def dtype(self):
    return self.value.dtype

  def materialize(self):
    return self.value

  def summary_label(self) -> str:
    return "full"

  def partition_specs(self, spec):
    return self.replace_children(value=spec)
