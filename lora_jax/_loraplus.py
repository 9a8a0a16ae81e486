"""LoRA+ (Hayou et al., 2024): the `b` factor learns `ratio` times faster than `a`.

`lj.loraplus(optax.adamw, 2e-4, ratio=16)` is an optax transformation over the adapter
tree (`lj.split(params)[0]`) built with `optax.multi_transform`: every low-rank leaf's
`b` and every 1-D trainable array (a DoRA magnitude, a trained bias or norm) get
`ratio * learning_rate`, its `a` and every other trainable array get `learning_rate`,
and the low-rank leaves whose path matches `embedding_targets` get `embedding_lr`:
PEFT's `create_loraplus_optimizer` groups, read from the leaf protocol
(`trainable_fields`) instead of parameter names.

Reference: https://arxiv.org/abs/2402.12354; PEFT `peft/optimizers/loraplus.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax import _paths
from lora_jax._implicit import ImplicitArray
from lora_jax._lora_weight import LowRankWeight

GROUPS = ("a", "b", "embedding")


def _scaled(lr, factor: float):
  if callable(lr):
    return lambda step: factor * lr(step)
  return factor * lr


def loraplus_labels(adapter: Any, embedding_targets: str | None = r".*embed.*") -> Any:
  """The LoRA+ group ("a", "b" or "embedding") of every array in `adapter`, as a tree of
  strings with `adapter`'s structure (None where `adapter` has None)."""
  pattern = None if embedding_targets is None else re.compile(embedding_targets)

  def by_rank(x, nbatch=0):
    # PEFT: a 1-D parameter is in group B (DoRA's magnitude, IEC's [1]-shaped betas);
    # a stacked leaf's children carry its layer axes in front, which do not count
    return "b" if getattr(x, "ndim", 2) - nbatch <= 1 else "a"

  def label(path, leaf):
    if leaf is None:
      return None
    if isinstance(leaf, ImplicitArray):
      kids = {}
      embed = (pattern is not None and isinstance(leaf, LowRankWeight)
               and pattern.fullmatch(path) is not None)
      for name in leaf.trainable_fields:
        child = getattr(leaf, name)
        if child is None:
          continue
        if embed:
          kids[name] = "embedding"
        elif isinstance(leaf, LowRankWeight) and name in ("a", "b"):
          kids[name] = name
        else:
          # stacked axes from `a` (*batch, *in, r): in an adapter tree the base is None
          nb = (len(leaf.a.shape) - 1 - leaf.axes.count("i")
                if isinstance(leaf, LowRankWeight) and leaf.a is not None else 0)
          kids[name] = jax.tree.map(lambda c: by_rank(c, nb), child)
      # every other child (the frozen base, rng) is None in an adapter tree
      rest = {n: jax.tree.map(lambda _: None, getattr(leaf, n)) for n in leaf.data_fields
              if n not in kids}
      return leaf.replace_children(**kids, **rest)
    return by_rank(leaf)

  return _paths.map_with_path(label, adapter,
                              is_leaf=lambda x: x is None or isinstance(x, ImplicitArray))


def loraplus(optimizer: Callable[..., optax.GradientTransformation],
             learning_rate: float | optax.Schedule, ratio: float = 16.0, *,
             embedding_lr: float = 1e-6, embedding_targets: str | None = r".*embed.*",
             **optimizer_kwargs) -> optax.GradientTransformation:
  """An optax optimizer for the adapter tree with LoRA+'s learning rates.

  Args:
    optimizer: a factory such as `optax.adamw`, called as
      `optimizer(learning_rate, **optimizer_kwargs)` once per group.
    learning_rate: `a`'s learning rate (a float or an optax schedule).
    ratio: `b`'s learning rate over `a`'s (PEFT `loraplus_lr_ratio`; the paper uses 16).
    embedding_lr: learning rate of low-rank leaves on embeddings (PEFT's default 1e-6).
    embedding_targets: regex fullmatched against adapter paths that are embeddings;
      None: no embedding group.
    **optimizer_kwargs: passed to every `optimizer` call (weight_decay, b1, ...).

  Returns:
    An `optax.GradientTransformation`: `opt.init(adapter)`, `opt.update(grads, state,
    adapter)` as with any optax optimizer.
  """
  if not ratio > 0:
    raise ValueError(f"lj.loraplus: ratio must be positive, got {ratio!r}")
  transforms = {
      "a": optimizer(learning_rate, **optimizer_kwargs),
      "b": optimizer(_scaled(learning_rate, float(ratio)), **optimizer_kwargs),
      "embedding": optimizer(embedding_lr, **optimizer_kwargs),
  }
  return optax.multi_transform(
      transforms, lambda adapter: loraplus_labels(adapter, embedding_targets))


__all__ = ["loraplus", "loraplus_labels"]
