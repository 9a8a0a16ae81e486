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


ALL_LINEAR = "all-linear"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAM_NAMES = ("kernel", "embedding", "scale", "bias")


def _module_of(path: str) -> str:
  """A leaf's module path: the path without a trailing parameter name."""
  head, _, last = path.rpartition("/")
  return head if head and last in _PARAM_NAMES else path


def is_linear_kernel(path: str) -> bool:
  """PEFT's "all-linear": every `.../kernel` except the output layer (`lm_head`), and
  routed experts' stacked weights (`.../experts/<proj>`: PEFT adds them, and the router,
  as `target_parameters`)."""
  if "/experts/" in path and path.rpartition("/")[0].endswith("/experts"):
    return True
  return path.endswith("/kernel") and _module_of(path).rpartition("/")[2] != "lm_head"


def _matchers(patterns: str | Sequence[str]) -> list[tuple[str, Callable[[str], bool]]]:
  """(description, predicate) per pattern, in PEFT's three forms: a string is a regular
  expression fullmatched against the path ("all-linear": every kernel but lm_head); in a
  list, a plain name (`"q_proj"`) selects the modules of that name (PEFT's suffix rule:
  the module path is the name or ends in `/name`) and anything else is a regex."""
  if isinstance(patterns, str):
    if patterns == ALL_LINEAR:
      return [(ALL_LINEAR, is_linear_kernel)]
    return [(rx.pattern, rx.fullmatch) for rx in compile_patterns(patterns)]
  out = []
  for p in patterns:
    if isinstance(p, str) and _MODULE_NAME.fullmatch(p):
      def by_name(path, name=p):
        module = _module_of(path)
        return path == name or module == name or module.endswith("/" + name)
      out.append((f"module name {p!r}", by_name))
    else:
      out.extend((rx.pattern, rx.fullmatch) for rx in compile_patterns(p))
  return out


def select_paths(paths: Sequence[str], patterns: str | Sequence[str],
                 what: str = "target") -> set[str]:
  """The paths matched by any of `patterns`: a regular expression (`re.fullmatch`),
  `"all-linear"`, or a list of regexes and module names (see `_matchers`).

  Raises:
    ValueError: a pattern matches no path; the message lists the closest paths.
  """
  if not isinstance(patterns, str) and not list(patterns):
    raise ValueError(f"{what} patterns are empty: give at least one regular expression")
  selected: set[str] = set()
  for desc, match in _matchers(patterns):
    hits = {p for p in paths if match(p)}
    if not hits:
      near = ", ".join(closest_paths(desc.removeprefix("module name ").strip("'"), paths))
      how = "" if desc.startswith("module name") or desc == ALL_LINEAR else " (re.fullmatch)"
      raise ValueError(
          f"{what} pattern {desc if desc.startswith('module name') else repr(desc)} matches "
          f"no parameter path{how}; closest paths: {near}")
    selected |= hits
  return selected


def tree_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  return [p for p, _ in leaves_with_paths(tree, is_leaf=is_leaf)]


def _describe_leaf(x: Any) -> str:
  if x is None:
    return "None"
  shape = getattr(x, "shape", None)
  if shape is None:
    return type(x).__name__
  dtype = getattr(x, "dtype", None)
  return f"{type(x).__name__}{tuple(shape)}" + (f" {dtype}" if dtype is not None else "")


def check_same_structure(trees: Sequence[Any], names: Sequence[str], *,
                         is_leaf: Callable[[Any], bool] | None = None,
                         what: str = "trees") -> None:
  """Raise `ValueError` unless every tree has the structure of `trees[0]`.

  The message names the paths found in one tree and not in the other and, when the
  paths agree, the first path whose node differs (a leaf kind, a rank, a `None`
  placeholder), with what each tree holds there, never two whole tree definitions.
  """
  defs = [jtu.tree_structure(t, is_leaf=is_leaf) for t in trees]
  for k in range(1, len(trees)):
    if defs[k] == defs[0]:
      continue
    a = dict(leaves_with_paths(trees[0], is_leaf=is_leaf))
    b = dict(leaves_with_paths(trees[k], is_leaf=is_leaf))
    only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
    if only_a or only_b:
      raise ValueError(f"{what}: {names[k]} does not have the structure of {names[0]}: "
                       f"paths only in {names[0]}: {only_a or '-'}; only in {names[k]}: "
                       f"{only_b or '-'}")
    # same leaf paths: the difference is in a node (static metadata, a leaf kind)
    for (pa, ka, xa), (pb, kb, xb) in zip(_nodes(trees[0], is_leaf), _nodes(trees[k], is_leaf)):
      if pa != pb or ka != kb:
        raise ValueError(f"{what}: {names[k]} differs from {names[0]} at {pa or pb}: "
                         f"{xa} vs {xb}")
    raise ValueError(f"{what}: {names[k]} does not have the structure of {names[0]}")


def _nodes(tree: Any, is_leaf) -> list[tuple[str, str, str]]:
  """(path, structure key, description) of every leaf or leaf-kind node: a kind is keyed
  by its class and static fields (what makes two structures differ), and described
  with its children's shapes."""
  out = []
  def stop(y):   # None placeholders and leaf kinds (which carry static fields) are nodes
    return y is None or hasattr(type(y), "static_fields") or (
        is_leaf is not None and is_leaf(y))

  for kp, x in jtu.tree_flatten_with_path(tree, is_leaf=stop)[0]:
    desc, key = _describe_leaf(x), "leaf"
    statics = getattr(type(x), "static_fields", None)
    if statics is not None:
      key = type(x).__name__ + "(" + ", ".join(f"{n}={getattr(x, n)!r}" for n in statics) + ")"
      desc = key + " with " + ", ".join(f"{n}: {_describe_leaf(getattr(x, n))}"
                                        for n in getattr(type(x), "data_fields", ()))
    out.append((path_str(kp), key, desc))
  return out


__all__ = ["path_str", "leaves_with_paths", "map_with_path", "select_paths",
           "closest_paths", "first_match", "tree_paths", "check_same_structure"]

del jax
