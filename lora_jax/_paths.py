"""Pytree paths as strings, and target selection by regular expression.

A leaf's path is its keys joined by "/": `{"layers": [{"q_proj": {"kernel": w}}]}`
holds `w` at `layers/0/q_proj/kernel`. Targets are regular expressions matched
with `re.fullmatch`; a pattern that matches nothing is an error naming the
closest existing paths, never a silent no-op.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Sequence

import jax
from jax import tree_util as jtu


def key_str(key: Any) -> str:
  """One pytree key as a path component."""
  if isinstance(key, jtu.DictKey):
    return str(key.key)
  if isinstance(key, jtu.GetAttrKey):
    return key.name
  if isinstance(key, jtu.SequenceKey):
    return str(key.idx)
  if isinstance(key, jtu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  """A key path from `jax.tree_util` as a "/"-joined string.

  Flax NNX wraps values in `Variable` nodes whose child is reached through a
  `.value`/`.raw_value` attribute key; that component is dropped so paths read
  the same for linen, NNX and plain dicts.
  """
  parts = [key_str(k) for k in keypath]
  if parts and parts[-1] in ("value", "raw_value") and len(parts) > 1:
    parts = parts[:-1]
  return "/".join(parts)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                      ) -> list[tuple[str, Any]]:
  """All leaves of `tree` with their string paths, in flattening order."""
  flat, _ = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any,
                  is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """`jax.tree.map` where `fn` also receives the leaf's string path."""
  return jtu.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree,
                                is_leaf=is_leaf)


def closest_paths(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
  """The `n` paths most similar to `pattern`, for error messages."""
  paths = list(paths)
  close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
  return close or paths[:n]


def compile_patterns(patterns: str | Sequence[str]) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"target pattern {p!r} is not a valid regular expression: {e}") from e
  return out


def first_match(path: str, table: dict[str, Any] | None, default: Any = None) -> Any:
  """The value of the first pattern in `table` that fullmatches `path`."""
  for pattern, value in (table or {}).items():
    if re.fullmatch(pattern, path):
      return value
  return default


def select_paths(paths: Sequence[str], patterns: str | Sequence[str],
                 what: str = "target") -> set[str]:
  """The paths matched by any of `patterns` (`re.fullmatch`).

  Raises:
    ValueError: a pattern matches no path; the message lists the closest paths.
  """
  selected: set[str] = set()
  for rx in compile_patterns(patterns):
    hits = {p for p in paths if rx.fullmatch(p)}
    if not hits:
      near = ", ".join(closest_paths(rx.pattern, paths))
      raise ValueError(
          f"{what} pattern {rx.pattern!r} matches no parameter path (re.fullmatch); "
          f"closest paths: {near}")
    selected |= hits
  return selected


def tree_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  return [p for p, _ in leaves_with_paths(tree, is_leaf=is_leaf)]


__all__ = ["path_str", "leaves_with_paths", "map_with_path", "select_paths",
           "closest_paths", "first_match", "tree_paths"]

del jax
