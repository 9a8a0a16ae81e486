"""Loading `lora-jax merge` configs: a bounded YAML reader and multi-document plans.

`load(path)` reads one or more YAML documents with a `SafeLoader` that refuses
configs whose expanded size (every alias counted each time it is used: the
"billion laughs") exceeds `MAX_NODES` values, nest deeper than `MAX_DEPTH`, or
contain recursive aliases; the file itself is capped at `MAX_BYTES`. Scalars that
YAML 1.1 leaves as strings but mergekit's pydantic reads as numbers (`1e-5`) are
read as floats.

`order(docs, intermediate_dir)` applies mergekit-multi's rules to several
documents: a document with `name:` is written to `intermediate_dir/name`, later
documents may use that name as a model reference (also as `name+adapter`), and the
document without a name (or else the last one) is the final merge.
"""

from __future__ import annotations

import os
import re

import yaml

from merging._registry import short

MAX_BYTES = 4 * 2 ** 20
MAX_NODES = 200_000
MAX_DEPTH = 64

_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class BoundedLoader(yaml.SafeLoader):
  """`yaml.SafeLoader` that bounds what a document may expand to (see the module doc)."""

  def construct_document(self, node):
    _expanded_size(node, self.name)
    return super().construct_document(node)


BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _expanded_size(root, name) -> int:
  """Number of nodes of `root` with aliases expanded, without expanding them."""
  memo: dict[int, int] = {}
  busy: set[int] = set()

  def size(node, depth):
    if depth > MAX_DEPTH:
      raise ValueError(f"{name}: the config nests deeper than {MAX_DEPTH} levels")
    k = id(node)
    if k in memo:
      return memo[k]
    if k in busy:
      raise ValueError(f"{name}: the config has a recursive alias (a value containing itself)")
    busy.add(k)
    n = 1
    if isinstance(node, yaml.SequenceNode):
      for c in node.value:
        n += size(c, depth + 1)
    elif isinstance(node, yaml.MappingNode):
      for kn, vn in node.value:
        n += size(kn, depth + 1) + size(vn, depth + 1)
    busy.discard(k)
    if n > MAX_NODES:
      raise ValueError(f"{name}: the config expands to more than {MAX_NODES} values "
                       "(YAML aliases used many times?); refusing to load it")
    memo[k] = n
    return n

  return size(root, 0)


def load(path: str) -> list:
  """The documents of the YAML file at `path` (a list; empty documents dropped)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"config file {path!r} is a directory")
  size = os.path.getsize(path)
  if size > MAX_BYTES:
    raise ValueError(f"config file {path!r} is {size} bytes; configs are at most {MAX_BYTES}")
  with open(path, "rb") as f:
    data = f.read(MAX_BYTES + 1)
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"config file {path!r} is not UTF-8 text (byte {e.start})") from None
  return loads(text, path)


def loads(text: str, name: str = "<config>") -> list:
  """`load` for a string."""
  try:
    loader = BoundedLoader(text)
    loader.name = name
    try:
      docs = []
      while loader.check_data():
        docs.append(loader.get_data())
    finally:
      loader.dispose()
  except yaml.YAMLError as e:
    raise ValueError(f"{name}: invalid YAML: {short(str(e), 300)}") from None
  except RecursionError:
    raise ValueError(f"{name}: the config nests too deeply") from None
  return [d for d in docs if d is not None]


def _refs(value, names):
  """Names of earlier merges that `value` (a config fragment) refers to."""
  out = set()
  if isinstance(value, dict):
    for k, v in value.items():
      if k in ("model", "base_model") and isinstance(v, str):
        out |= {v.split("+", 1)[0]} & names
      else:
        out |= _refs(v, names)
  elif isinstance(value, list):
    for v in value:
      out |= _refs(v, names)
  return out


def _patch(value, names, intermediate_dir):
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      if k in ("model", "base_model") and isinstance(v, str):
        head, plus, tail = v.partition("+")
        if head in names:
          v = os.path.join(intermediate_dir, head) + plus + tail
        out[k] = v
      else:
        out[k] = _patch(v, names, intermediate_dir)
    return out
  if isinstance(value, list):
    return [_patch(v, names, intermediate_dir) for v in value]
  return value


def order(docs: list, out_dir: str, intermediate_dir: str | None):
  """`[(name or None, config, output directory)]` in an order that respects the
  references between documents (mergekit-multi). Errors name the document."""
  names: list = []
  for i, d in enumerate(docs):
    if not isinstance(d, dict):
      raise ValueError(f"document {i + 1}: a merge config must be a mapping, got "
                       f"{type(d).__name__}")
    nm = d.get("name")
    if nm is not None and (not isinstance(nm, str) or not nm or "/" in nm or nm in (".", "..")
                           or "+" in nm):
      raise ValueError(f"document {i + 1}: name {short(nm)} must be a non-empty string "
                       "without '/' or '+'")
    if nm is not None and nm in names:
      raise ValueError(f"document {i + 1}: name {nm!r} is used by an earlier document")
    names.append(nm)
  unnamed = [i for i, n in enumerate(names) if n is None]
  if len(unnamed) > 1:
    raise ValueError(f"documents {[i + 1 for i in unnamed]} have no name: a multi-document "
                     "config has at most one final (unnamed) merge")
  final = unnamed[0] if unnamed else len(docs) - 1
  named = {n for n in names if n is not None}
  if len(docs) > 1 and named and not intermediate_dir:
    raise ValueError("a multi-document config writes its named merges to --intermediate-dir: "
                     "pass --intermediate-dir DIR")
  deps = {i: _refs({k: v for k, v in d.items() if k != "name"}, named)
          for i, d in enumerate(docs)}
  index = {n: i for i, n in enumerate(names) if n is not None}
  done: list = []
  state: dict = {}

  def visit(i, chain):
    if state.get(i) == "done":
      return
    if state.get(i) == "busy":
      raise ValueError(f"circular references between merges: {' -> '.join(chain + [names[i]])}")
    state[i] = "busy"
    for dep in sorted(deps[i]):
      visit(index[dep], chain + [str(names[i] or "final")])
    state[i] = "done"
    done.append(i)

  for i in range(len(docs)):
    visit(i, [])
  out = []
  for i in done:
    d = {k: v for k, v in docs[i].items() if k != "name"}
    if named:
      d = _patch(d, named, intermediate_dir)
    dest = out_dir if i == final else os.path.join(intermediate_dir, names[i])
    out.append((names[i], d, dest))
  return out


__all__ = ["BoundedLoader", "load", "loads", "order", "MAX_NODES", "MAX_DEPTH", "MAX_BYTES"]
