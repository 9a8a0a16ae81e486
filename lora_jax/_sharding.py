"""Sharding specs for trees with implicit leaves: the base's layout carries to the factors.

A user shards a model by giving each dense weight a `PartitionSpec` (from a table of
path rules, or from Flax's `nn.get_partition_spec`). Once a kernel becomes a
`LoraWeight` or a `QuantizedArray`, its children have other shapes: `a: (*in, r)`,
`b: (r, *out)`, packed codes `(out, in/2)`, ... `partition_specs` turns the dense spec
of each leaf into specs for its children, so that every child is split the way the
dense kernel would be along the axes it shares with it, and replicated along the
rest (the rank axis, the adapter axis):

    w (in, out)  P("fsdp", "tp")  ->  a (in, r) P("fsdp", None), b (r, out) P(None, "tp")

With that layout a column-parallel LoRA'd kernel needs no communication and a
row-parallel one one all-reduce of the `(tokens, r)` product `x @ A`, the same as
the base. Each implicit leaf type says how in `ImplicitArray.partition_specs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax import _paths
from lora_jax._implicit import ImplicitArray, is_implicit

Rules = Sequence[tuple[str, PartitionSpec]] | Callable[[str, Any], PartitionSpec] | Any


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def _is_rule_table(rules: Any) -> bool:
  return (isinstance(rules, Sequence) and not isinstance(rules, (str, PartitionSpec))
          and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str)
                  and isinstance(r[1], PartitionSpec) for r in rules))


def dense_spec(spec: PartitionSpec | None, shape: Sequence[int], path: str) -> tuple:
  """`spec` padded with `None` to one entry per axis of `shape` (a tuple)."""
  spec = PartitionSpec() if spec is None else spec
  if len(spec) > len(shape):
    raise ValueError(f"{path}: PartitionSpec {spec} has {len(spec)} entries but the leaf "
                     f"has shape {tuple(shape)} ({len(shape)} axes)")
  return tuple(spec) + (None,) * (len(shape) - len(spec))


def _spec_lookup(params: Any, rules: Rules) -> Callable[[str, Any], PartitionSpec]:
  """A function `(path, leaf) -> dense PartitionSpec` for the three forms of `rules`."""
  paths = _paths.tree_paths(params, is_leaf=is_implicit)
  if callable(rules) and not _is_spec(rules):
    return rules
  if _is_rule_table(rules):
    compiled = [(p, _paths.compile_patterns(p)[0], s) for p, s in rules]
    for pattern, rx, _ in compiled:
      if not any(rx.fullmatch(p) for p in paths):
        raise ValueError(f"sharding rule {pattern!r} matches no leaf; closest paths: "
                         f"{_paths.closest_paths(pattern, paths)}")

    def lookup(path, leaf):
      for _, rx, spec in compiled:
        if rx.fullmatch(path):
          return spec
      return PartitionSpec()   # unmatched leaves are replicated
    return lookup
  # a tree of specs with the structure of the dense params (e.g. nn.get_partition_spec)
  table = dict(_paths.leaves_with_paths(rules, is_leaf=lambda x: _is_spec(x) or x is None))
  missing = [p for p in paths if p not in table]
  if missing:
    raise ValueError(f"the spec tree has no entry for {len(missing)} leaves of params, e.g. "
                     f"{missing[:3]}; it has {sorted(table)[:5]}...; pass a tree with the "
                     "params' structure, a list of (regex, PartitionSpec) rules, or a "
                     "function (path, leaf) -> PartitionSpec")
  return lambda path, leaf: table[path]


def partition_specs(params: Any, rules: Rules) -> Any:
  """`PartitionSpec`s for every array in `params`, implicit leaves included.

  Args:
    params: a parameter tree; may hold `LoraWeight`, `DoraWeight`, `MultiLoraWeight`,
      `QuantizedArray` leaves (any `ImplicitArray` that defines `partition_specs`).
    rules: the layout of the *dense* weights, one of
      - a list of `(regex, PartitionSpec)`: the first pattern that fullmatches a leaf's
        path wins; unmatched leaves are replicated; a pattern matching no leaf is an error;
      - a tree of `PartitionSpec` with the params' structure, an implicit leaf counting
        as one leaf (what Flax's `nn.get_partition_spec` returns for the base);
      - a function `(path, leaf) -> PartitionSpec`.
      Specs name the logical (dense) axes, shorter specs are padded with `None`.

  Returns:
    A tree with the structure of `params` (implicit leaves keep their class, their
    array children replaced by `PartitionSpec`s), for `jit`'s `in_shardings` through
    `named_shardings`, or for `shard`.
  """
  lookup = _spec_lookup(params, rules)

  def one(path, leaf):
    spec = dense_spec(lookup(path, leaf), leaf.shape, path)
    if is_implicit(leaf):
      return leaf.partition_specs(PartitionSpec(*spec))
    return PartitionSpec(*spec)

  return _paths.map_with_path(one, params, is_leaf=is_implicit)


def named_shardings(params: Any, mesh: Mesh, rules: Rules) -> Any:
  """`partition_specs(params, rules)` as `NamedSharding`s on `mesh`, checked to fit.

  Raises `ValueError` naming the path, the child, its shape and the mesh axes when an
  array axis is not divisible by the product of the mesh axes it is split over.
  """
  specs = partition_specs(params, rules)
  arrays = dict(_paths.leaves_with_paths(params))
  for path, spec in _paths.leaves_with_paths(specs, is_leaf=_is_spec):
    x = arrays[path]
    shape = tuple(getattr(x, "shape", ()))
    _check_fits(path, shape, spec, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard(params: Any, mesh: Mesh, rules: Rules) -> Any:
  """`params` placed on `mesh` by `named_shardings(params, mesh, rules)`."""
  return jax.device_put(params, named_shardings(params, mesh, rules))


def _check_fits(path: str, shape: tuple, spec: PartitionSpec, mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"{path}: PartitionSpec {spec} has more entries than shape {shape}")
  for dim, entry in zip(shape, spec):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    unknown = [n for n in names if n not in mesh.shape]
    if unknown:
      raise ValueError(f"{path}: PartitionSpec {spec} names mesh axes {unknown} that the "
                       f"mesh does not have; mesh axes: {dict(mesh.shape)}")
    n = math.prod(mesh.shape[a] for a in names)
    if dim % n:
      raise ValueError(f"{path}: shape {shape} cannot be split by {spec} on mesh "
                       f"{dict(mesh.shape)}: axis of size {dim} is not divisible by {n}")


def implicit_spec_parts(spec: PartitionSpec, nbatch: int, axes: str):
  """Split a dense spec of a `(*batch, *kernel)` leaf into (batch, in, out) parts."""
  s = tuple(spec)
  batch, kernel = s[:nbatch], s[nbatch:]
  ins = tuple(e for e, a in zip(kernel, axes) if a == "i")
  outs = tuple(e for e, a in zip(kernel, axes) if a == "o")
  return batch, ins, outs


def child_spec(child: Any, spec: PartitionSpec) -> Any:
  """The spec of a child `w` that may itself be implicit (a quantized base)."""
  if isinstance(child, ImplicitArray):
    return child.partition_specs(spec)
  return spec
