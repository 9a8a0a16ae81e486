"""The data pipeline of `lora-jax train`: JSONL files to packed, shuffled batches.

    tok = load_tokenizer(model_dir)                  # tokenizer.json + tokenizer_config.json
    examples = read_jsonl("train.jsonl")             # validated dicts, each with its "_source"
    packed = pack([tokenize_example(e, tok) for e in examples], 2048, pad_id=tok.pad_id or 0)
    for batch in Batches(packed.rows, batch_size=8, seed=0):   # dicts of (8, 2048) arrays
      ...

Everything read is data, never code: a chat template is rendered in jinja2's immutable
sandbox, JSONL lines are bounded in size, and the tokenizer files are read only inside
the model directory.

**Example formats** (one JSON object per line; a file may mix them):

- `{"text": s}`: `encode(s, add_special_tokens=True) + [eos]`; every token is a target.
- `{"prompt": p, "completion": c}`: `encode(p, True) + encode(c, False) + [eos]`, where
  `encode(p, True)` keeps what the post-processor puts before `p` (a bos) but not what it
  appends (an eos); the completion and the eos are the targets.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the chat template's rendering,
  encoded with `add_special_tokens=False` (as `apply_chat_template(tokenize=True)`);
  the assistant turns are the targets.

The eos is not appended twice when the encoding already ends with it. Prompt and
completion are encoded separately, so the boundary between them is exact (tokenizing
`p + c` as one string could merge a token across it).

**Assistant spans** are found by rendering prefixes of the conversation, so any
template works without `{% generation %}` markers: for assistant message `i`,

    start_i = len(render(messages[:i], add_generation_prompt=True))
    end_i   = len(render(messages[:i + 1], add_generation_prompt=False))

and the characters `[start_i, end_i)` of `render(messages)` are the turn: its content
and whatever the template writes after it (`<|eot_id|>`, `<|im_end|>\\n`), but not the
header the generation prompt writes. A token is a target when its character span
overlaps a turn (a token merged across a turn's edge counts, as in transformers'
`return_assistant_tokens_mask`). This assumes that rendering a prefix of the conversation gives a prefix
of the rendering of the whole. The assumption is checked for every example and a
conversation that breaks it is an error naming the line: templates that rewrite earlier
turns (Qwen3 dropping the reasoning of past turns) or write text only after the last
message (Phi-3's trailing eos, with more than one assistant turn) break it.

**Targets.** `loss_mask[t]` says whether token `t` is a target, that is whether the loss
counts predicting token `t` from tokens `< t` of its segment:

    loss = sum(mask[:, 1:] * xent(logits[:, :-1], input_ids[:, 1:])) / sum(mask[:, 1:])

`pack` clears the first position of every segment (nothing precedes it in its segment),
so the shifted loss never predicts across two packed examples. Attention across segments
is the model's to mask, with `segment_ids`; `positions` are the rotary positions.

**Packing** places examples first-fit, in order, into rows of `seq_len` tokens; a row
holds whole examples, told apart by `segment_ids` (1, 2, ... within the row; 0 is
padding) with `positions` restarting at 0 per segment. Examples longer than `seq_len`
keep their first `seq_len` tokens; `Packed.truncated` counts them. Examples left without
a target are dropped and counted (`Packed.skipped`).

**Batches** yields `steps_per_epoch = rows // batch_size` batches per epoch, in an order
that is a function of `(seed, epoch)` only (a splitmix64 hash of the row index, so it does
not depend on the NumPy version); `position` is `(epoch, index)` of the next batch and
`Batches(..., start=position)` continues exactly there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from lora_jax import checkpoint

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"          # transformers >= 4.50 saves the template here
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

MAX_TOKENIZER_BYTES = 100_000_000   # tokenizer.json of a 256k vocabulary is ~35 MB
MAX_TEMPLATE_BYTES = 1_000_000      # real chat templates are a few kB
MAX_LINE_BYTES = 8 * 2 ** 20        # one JSONL line; a long conversation is ~100 kB

# The named special tokens transformers passes to every template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
  """A chat template failed to render (its own `raise_exception`, a syntax error, an
  undefined variable, a sandbox violation) or broke the prefix assumption."""


# ----------------------------------------------------------------------------
# tokenizer

@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """A `tokenizers.Tokenizer` with what `tokenizer_config.json` says about it.

  Attributes:
    backend: the `tokenizers.Tokenizer` from `tokenizer.json` (truncation and padding
      switched off, as transformers does unless asked).
    special_tokens: template variable name -> token string: the named special tokens
      (`bos_token`, `eos_token`, ...), model-specific `*_token` entries and
      `extra_special_tokens`, as transformers' `special_tokens_map` holds them.
    chat_template: the default chat template, or None.
    bos_id, eos_id, pad_id: ids of the bos / eos / pad tokens, or None if unset.
    add_bos_token: `add_bos_token` from the config, if present. Informational: what
      `encode(..., add_special_tokens=True)` adds is decided by tokenizer.json's
      post-processor, as in transformers >= 5 (a disagreement warns at load).
    name: the model directory, for error messages.
  """
  backend: tokenizers.Tokenizer = dataclasses.field(repr=False)   # its repr is the vocabulary
  special_tokens: Mapping[str, str]
  chat_template: str | None = dataclasses.field(repr=False)
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  add_bos_token: bool | None = None
  name: str = "tokenizer"

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; `add_special_tokens` runs the post-processor (bos, ...)."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_offsets(self, text: str, add_special_tokens: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (n,) int32 and character offsets (n, 2) int64 `[start, end)` into `text`."""
    enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
    offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    return np.asarray(enc.ids, np.int32), offsets

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`, special tokens included unless skipped (the backend's decoder)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  add_generation_prompt: bool = False, **variables: Any) -> str:
    """`render_chat` with this tokenizer's template and special tokens."""
    return render_chat(messages, self._template("messages"),
                       add_generation_prompt=add_generation_prompt,
                       **{**self.special_tokens, **variables})

  def _template(self, where: str) -> str:
    if self.chat_template is None:
      raise ValueError(f"{where}: a chat example needs a chat template, and {self.name} has "
                       f"none (chat_template in {CONFIG_FILE}, or {TEMPLATE_FILE})")
    return self.chat_template


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
  """The tokenizer of a Hugging Face model directory.

  Reads `tokenizer.json` (with the `tokenizers` library) and `tokenizer_config.json`
  (special tokens, `chat_template`, `add_bos_token`); `chat_template.jinja`, when present,
  overrides the config's template, and a legacy `special_tokens_map.json` fills in special
  tokens when the config has no `added_tokens_decoder`, both as transformers does. Only
  files inside `model_dir` are read (a symlink out of it is refused).

  Raises:
    FileNotFoundError: `model_dir`, `tokenizer.json` or `tokenizer_config.json` missing.
    ValueError: a file is corrupt, too large, leaves the directory, or names a
      bos/eos/pad token that is not in the vocabulary; the message names the file.
    ChatTemplateError: the chat template does not compile (naming its file).
  """
  root = pathlib.Path(model_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: model directory not found (or not a directory)")
  where = str(root)
  tok_path = checkpoint.inside(root, TOKENIZER_FILE, where)
  if not tok_path.is_file():
    raise FileNotFoundError(f"{tok_path}: {TOKENIZER_FILE} not found (load_tokenizer reads a "
                            "fast tokenizer's tokenizer.json; tokenizer.model / vocab.txt "
                            "alone are not supported)")
  backend = _read_backend(tok_path)
  config = checkpoint.read_json(checkpoint.inside(root, CONFIG_FILE, where), CONFIG_FILE)
  cfg_path = root / CONFIG_FILE

  special = _special_tokens(config, cfg_path)
  legacy = checkpoint.inside(root, SPECIAL_TOKENS_MAP_FILE, where)
  if "added_tokens_decoder" not in config and legacy.is_file():
    special.update(_special_tokens(checkpoint.read_json(legacy, SPECIAL_TOKENS_MAP_FILE),
                                   legacy))

  template = _config_template(config.get("chat_template"), cfg_path)
  template_path = cfg_path
  jinja_path = checkpoint.inside(root, TEMPLATE_FILE, where)
  if jinja_path.is_file():
    template = _read_text(jinja_path, MAX_TEMPLATE_BYTES, "chat template")
    template_path = jinja_path
  if template is not None:
    try:   # a syntax error is the model directory's, not the first example's
      _compile(template)
    except ChatTemplateError as e:
      raise ChatTemplateError(f"{template_path}: {e}") from None

  def token_id(key):
    if key not in special:
      return None
    i = backend.token_to_id(special[key])
    if i is None:
      raise ValueError(f"{cfg_path}: {key} {special[key]!r} is not a token of {tok_path}")
    return i

  add_bos = config.get("add_bos_token")
  if add_bos is not None and not isinstance(add_bos, bool):
    raise ValueError(f"{cfg_path}: add_bos_token must be true or false, got {add_bos!r}")
  tok = Tokenizer(backend=backend, special_tokens=special, chat_template=template,
                  bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                  pad_id=token_id("pad_token"), add_bos_token=add_bos, name=where)
  if add_bos is not None and tok.bos_id is not None:
    with_special, plain = tok.encode("a", True), tok.encode("a", False)
    adds = len(with_special) > len(plain) and with_special[0] == tok.bos_id
    if adds != add_bos:
      warnings.warn(f"{cfg_path}: add_bos_token is {add_bos} but the post-processor of "
                    f"{tok_path} {'adds' if adds else 'does not add'} "
                    f"{special['bos_token']!r}; following {TOKENIZER_FILE}, as "
                    "transformers >= 5 does", stacklevel=2)
  return tok


def _read_text(path: pathlib.Path, limit: int, what: str) -> str:
  size = path.stat().st_size
  if size > limit:
    raise ValueError(f"{path}: {what} is {size} bytes; more than {limit} is refused")
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: {what} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                     f"{e.start})") from None


def _read_backend(path: pathlib.Path) -> tokenizers.Tokenizer:
  text = _read_text(path, MAX_TOKENIZER_BYTES, TOKENIZER_FILE)
  try:
    backend = tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # noqa: BLE001  (the Rust side raises a bare Exception)
    raise ValueError(f"{path}: not a valid {TOKENIZER_FILE}: {e}") from None
  # tokenizer.json may carry truncation / padding settings; transformers applies them only
  # when a call asks for them, and we never do.
  backend.no_truncation()
  backend.no_padding()
  return backend


def _token_string(value: Any) -> str | None:
  """A token as tokenizer_config.json writes it: a string or an AddedToken object."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _special_tokens(config: Mapping[str, Any], path: pathlib.Path) -> dict[str, str]:
  """Template variables from a config: every `*_token` key holding a token (the named
  ones must, when set), plus the entries of an `extra_special_tokens` object."""
  out = {}
  for key, value in config.items():
    if not key.endswith("_token") or value is None:
      continue
    token = _token_string(value)
    if token is not None:
      out[key] = token
    elif key in SPECIAL_TOKEN_NAMES:
      raise ValueError(f"{path}: {key} must be a string or an object with a string "
                       f"'content', got {_json_type(value)}")
    # else a flag such as add_bos_token: not a token
  extra = config.get("extra_special_tokens")
  if isinstance(extra, dict):
    for key, value in extra.items():
      token = _token_string(value)
      if token is None:
        raise ValueError(f"{path}: extra_special_tokens[{key!r}] must be a string or an "
                         f"object with a string 'content', got {_json_type(value)}")
      out[key] = token
  return out


def _config_template(value: Any, path: pathlib.Path) -> str | None:
  """`chat_template` of tokenizer_config.json: a string, or a list of {name, template}
  (the one named "default" is used, as transformers does without tools)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {}
    for i, entry in enumerate(value):
      if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("template"), str)):
        raise ValueError(f"{path}: chat_template[{i}] must be an object with string 'name' "
                         "and 'template'")
      named[entry["name"]] = entry["template"]
    return named.get("default")
  raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}}, "
                   f"got {_json_type(value)}")


# ----------------------------------------------------------------------------
# chat templates, rendered as transformers' apply_chat_template renders them

class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body. transformers uses the tag
  for `return_assistant_tokens_mask`; we find assistant turns by rendering prefixes
  instead, so the tag only has to parse (templates written for TRL carry it)."""
  tags = {"generation"}

  def parse(self, parser):
    next(parser.stream)
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateDict:
  """The `dict` a template sees: construction and `fromkeys` only, no attribute tricks."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace()` refusing underscore names, so a template cannot reach CPython
  internals through attributes it stores."""

  def __init__(*args, **kwargs):  # noqa: N805  (jinja's signature trick: `self` may be a key)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"a chat template may not store an underscore name on a namespace ({name!r})")


class _TemplateRaised(jinja2.exceptions.TemplateError):
  """What the template's `raise_exception(message)` raises."""


def _raise_exception(message):
  raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' filter: jinja's own escapes HTML characters (<, >, &, ') and has no
  # separators option, so templates written for transformers would render differently.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002  (the name templates call it with)
  return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env


_ENV = _environment()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  try:
    return _ENV.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template: syntax error at template line {e.lineno}: "
                            f"{e.message}") from None


def _plain(value: Any, where: str) -> Any:
  """A fresh copy of JSON-like data, so the template sees only plain types."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  # Subclasses (enums, numpy scalars) carry methods the sandbox does not know: rebuilt as
  # the base type.
  for base in (bool, str, int, float):
    if isinstance(value, base):
      return base(value) if base is not str else str.__str__(value)
  if isinstance(value, np.generic):
    return _plain(value.item(), where)
  if isinstance(value, Mapping):
    return {_plain(k, where): _plain(v, where) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v, where) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v, where) for v in value)
  raise TypeError(f"{where}: a chat template sees only JSON data, got {type(value).__name__}")


def _template_messages(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict]:
  """Messages as transformers hands them to the template: keys whose value is None
  dropped, plain data, and reasoning under its standard names (`reasoning_content`, and
  `thinking` for templates that read that)."""
  out = []
  for m in messages:
    m = _plain({k: v for k, v in m.items() if v is not None}, where)
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
      m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    out.append(m)
  return out


def _render(template: str, messages: list[dict], add_generation_prompt: bool,
            variables: Mapping[str, Any], where: str) -> str:
  """Render checked, converted `messages`; every template failure names `where`."""
  compiled = _compile(template)
  try:
    return compiled.render(messages=messages, tools=variables.get("tools"),
                           documents=variables.get("documents"),
                           add_generation_prompt=add_generation_prompt,
                           **{k: v for k, v in variables.items()
                              if k not in ("tools", "documents")})
  except _TemplateRaised as e:
    raise ChatTemplateError(f"{where}: the chat template refused the conversation: "
                            f"{e.message}") from None
  except jinja2.exceptions.TemplateError as e:   # undefined variable, sandbox violation
    raise ChatTemplateError(f"{where}: the chat template failed: {type(e).__name__}: "
                            f"{e}") from None
  except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
          RecursionError) as e:
    # A template is foreign code-like data: `'a' + 1`, `x / 0`, ... in it is the template's
    # fault, reported as such instead of a traceback into jinja's generated code.
    raise ChatTemplateError(f"{where}: the chat template failed: {type(e).__name__}: "
                            f"{e}") from None


def render_chat(messages: Sequence[Mapping[str, Any]], template: str, *,
                add_generation_prompt: bool = False, bos_token: str | None = None,
                eos_token: str | None = None, tools: Sequence[Mapping] | None = None,
                documents: Sequence[Mapping] | None = None, **variables: Any) -> str:
  """Render a chat template as `tokenizer.apply_chat_template(messages, tokenize=False)`.

  The environment is transformers': jinja2's `ImmutableSandboxedEnvironment` with
  `trim_blocks` and `lstrip_blocks`, the loop-controls extension, `raise_exception`,
  `strftime_now`, a JSON `tojson` filter (no HTML escaping, `indent`/`separators`/
  `sort_keys` options), a restricted `dict` and `namespace`, and a `{% generation %}` tag
  that renders its body. The template sees `messages` (keys set to null dropped, reasoning
  aliased as transformers does), `tools`, `documents`, `add_generation_prompt`, the
  special tokens and any further `variables`.

  Args:
    messages: a non-empty list of `{"role": str, "content": str, ...}`; other keys
      (`tool_calls`, `name`, `reasoning_content`) reach the template unchanged.
    template: the jinja source (`Tokenizer.chat_template`).
    add_generation_prompt: append the header that opens an assistant turn.
    bos_token, eos_token: the special tokens' strings; a token that is None is not
      passed (as transformers omits unset tokens), so the template sees it undefined.
    tools, documents: as in transformers (JSON schemas, RAG documents).
    **variables: further template variables: the other special tokens (`pad_token`,
      `unk_token`, model-specific `*_token`s) and switches a template reads
      (`enable_thinking`, ...). A `*_token` that is None is omitted too.

  Returns:
    The rendered conversation.

  Raises:
    ValueError: malformed `messages` (naming the message).
    ChatTemplateError: the template does not compile, calls `raise_exception`, or fails.
  """
  check_messages(messages, "messages")
  tokens = {"bos_token": bos_token, "eos_token": eos_token, **variables}
  tokens = {k: v for k, v in tokens.items() if not (k.endswith("_token") and v is None)}
  extra = {"tools": _plain(tools, "tools"), "documents": _plain(documents, "documents"),
           **_plain(tokens, "variables")}
  return _render(template, _template_messages(messages, "messages"), add_generation_prompt,
                 extra, "messages")


def check_messages(messages: Any, where: str) -> None:
  """Raise a ValueError naming `where` unless `messages` is a non-empty list of objects
  with a string "role" and a string "content" (which may be missing or null only in a
  message that has "tool_calls")."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} "
                     f"objects, got {_json_type(messages)}"
                     + (" (empty)" if isinstance(messages, (list, tuple)) else ""))
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and "
                       f"'content', got {_json_type(m)}")
    role = m.get("role")
    if not isinstance(role, str) or not role:
      raise ValueError(f"{where}: messages[{i}] needs a non-empty string 'role', got "
                       + ("no 'role'" if "role" not in m else _json_type(role)))
    content = m.get("content")
    if content is None and m.get("tool_calls"):
      continue
    if not isinstance(content, str):
      raise ValueError(f"{where}: messages[{i}] ({role}) needs a string 'content', got "
                       + ("no 'content'" if "content" not in m else _json_type(content)))


# ----------------------------------------------------------------------------
# JSONL

_FORMATS = {frozenset({"text"}): "text", frozenset({"prompt", "completion"}):
            "prompt_completion",
            frozenset({"messages"}): "chat"}
_KNOWN = frozenset({"text", "prompt", "completion", "messages"})
SOURCE = "_source"   # where read_jsonl records "path:line"
_FORMAT_HELP = ('one of {"text": ...}, {"prompt": ..., "completion": ...} or '
                '{"messages": [...]}')


def _json_type(x: Any) -> str:
  if x is None:
    return "null"
  if isinstance(x, bool):
    return f"boolean {x!r}".lower()
  if isinstance(x, (int, float)):
    return f"number {x!r}"
  if isinstance(x, str):
    return "a string"
  if isinstance(x, Mapping):
    return "an object"
  if isinstance(x, (list, tuple)):
    return "an array"
  return type(x).__name__


def example_format(example: Mapping[str, Any], where: str) -> str:
  """`"text"`, `"prompt_completion"` or `"chat"`: the format of a valid example.

  Raises:
    ValueError: naming `where`, for a mix or half of a format, wrong types.
  """
  if not isinstance(example, Mapping):
    raise ValueError(f"{where}: an example must be a JSON object ({_FORMAT_HELP}), got "
                     f"{_json_type(example)}")
  # other keys (ids, metadata) are the data set's own and are ignored, as TRL does;
  # the format keys must be exactly one format's
  keys = frozenset(example) & _KNOWN
  kind = _FORMATS.get(keys)
  if kind is None:
    raise ValueError(f"{where}: keys {sorted(keys)} are not a format; a line is "
                     f"{_FORMAT_HELP}")
  if kind == "chat":
    check_messages(example["messages"], where)
  else:
    for key in sorted(keys):
      if not isinstance(example[key], str):
        raise ValueError(f"{where}: '{key}' must be a string, got {_json_type(example[key])}")
  return kind


def read_jsonl(path: str | os.PathLike, *, max_line_bytes: int = MAX_LINE_BYTES
               ) -> list[dict]:
  """The examples of a JSONL file, validated, each with its `"_source"` (`"path:line"`).

  Each non-blank line is one JSON object in one of the three formats (see the module
  doc); a file may mix them. Blank lines are skipped and a UTF-8 byte order mark is
  allowed. A line longer than `max_line_bytes` (default `MAX_LINE_BYTES`, 8 MiB) is
  refused before it is read whole.

  Returns:
    One dict per line: the line's keys plus `"_source"`; keys beyond
    the format's (ids, metadata) are kept and ignored.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file and line: not UTF-8, not JSON (also NaN / Infinity and
      duplicate keys), not an object, no or mixed format keys, wrong types, malformed messages, a
      line too long; or a file without examples.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: data file not found")
  if not path.is_file():
    raise ValueError(f"{path}: data file is not a regular file")
  out = []
  with open(path, "rb") as f:
    lineno = 0
    while raw := f.readline(max_line_bytes + 1):
      lineno += 1
      where = f"{path}:{lineno}"
      if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
        raise ValueError(f"{where}: line is longer than {max_line_bytes} bytes (the limit "
                         "of read_jsonl's max_line_bytes)")
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1})") from None
      text = text.removesuffix("\n").removesuffix("\r")   # columns count in the line alone
      if lineno == 1:
        text = text.removeprefix("\ufeff")
      if not text.strip():
        continue
      try:
        obj = checkpoint.loads_json(text, allow_nan=False)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
      except RecursionError:
        raise ValueError(f"{where}: JSON nests too deeply") from None
      except ValueError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
      if isinstance(obj, dict) and SOURCE in obj:
        raise ValueError(f"{where}: key {SOURCE!r} is reserved (the reader records each "
                         "example's file and line under it)")
      example_format(obj, where)
      obj[SOURCE] = where
      out.append(obj)
  if not out:
    raise ValueError(f"{path}: no examples (the file is empty or blank)")
  return out


# ----------------------------------------------------------------------------
# tokenization

def _append_eos(ids: list[int], tokenizer: Tokenizer, where: str) -> list[int]:
  if tokenizer.eos_id is None:
    raise ValueError(f"{where}: text and prompt/completion examples end with the eos token, "
                     f"and {tokenizer.name} has none (eos_token in {CONFIG_FILE})")
  return ids if ids and ids[-1] == tokenizer.eos_id else ids + [tokenizer.eos_id]


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
  """`prompt` with the special tokens the post-processor puts before it (a bos), but not
  those it puts after it (an eos, with `"<s> $A </s>"`): the completion follows."""
  with_special, plain = tokenizer.encode(prompt, True), tokenizer.encode(prompt, False)
  n = len(plain)
  for i in range(len(with_special) - n + 1):
    if with_special[i:i + n] == plain:
      return with_special[:i + n]
  return with_special   # a post-processor that rewrites the text's tokens: keep its output


def _first_difference(a: str, b: str) -> int:
  n = min(len(a), len(b))
  return next((i for i in range(n) if a[i] != b[i]), n)


def assistant_spans(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
                    where: str = "messages") -> tuple[str, list[tuple[int, int]]]:
  """The rendered conversation and the character span `[start, end)` of each assistant
  turn in it, found by rendering prefixes of the conversation (see the module doc).

  Raises:
    ChatTemplateError: naming `where` and the message, when rendering a prefix of the
      conversation does not give a prefix of the whole rendering.
  """
  check_messages(messages, where)
  template = tokenizer._template(where)
  msgs = _template_messages(messages, where)
  variables = dict(tokenizer.special_tokens)

  def render(upto, gen):
    return _render(template, msgs[:upto], gen, variables, where)

  full = render(len(msgs), False)

  def prefix_length(upto, gen, i):
    part = full if (upto == len(msgs) and not gen) else render(upto, gen)
    if not full.startswith(part):
      k = _first_difference(part, full)
      raise ChatTemplateError(
          f"{where}: messages[{i}] (assistant): the rendering of messages[:{upto}]"
          f"{' with the generation prompt' if gen else ''} is not a prefix of the rendering "
          f"of the whole conversation (they differ at character {k}: {part[k:k + 40]!r} vs "
          f"{full[k:k + 40]!r}), so the turn's tokens cannot be located; the template "
          "rewrites earlier turns or writes text only after the last message")
    return len(part)

  spans = []
  for i, m in enumerate(msgs):
    if m["role"] != "assistant":
      continue
    start, end = prefix_length(i, True, i), prefix_length(i + 1, False, i)
    if end < start or (spans and start < spans[-1][1]):
      raise ChatTemplateError(
          f"{where}: messages[{i}] (assistant): the turn's rendering ends (character {end}) "
          f"before it starts ({start}) or before the previous turn ends; the template's "
          "generation prompt is not how it renders an assistant turn")
    spans.append((start, end))
  return full, spans


def _span_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """Tokens (by character offsets (n, 2)) overlapping any span; an empty token counts
  when it sits inside a span."""
  starts, ends = offsets[:, 0], offsets[:, 1]
  mask = np.zeros(len(offsets), np.bool_)
  for a, b in spans:
    mask |= (starts < b) & (ends > a)
    mask |= (starts == ends) & (starts >= a) & (starts < b)
  return mask


def tokenize_example(example: Mapping[str, Any], tokenizer: Tokenizer
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and loss mask of one example (formats and targets: see the module doc).

  Args:
    example: a dict as `read_jsonl` returns it (its `"_source"`, if any, names it in
      errors), or one built in memory in the same formats.
    tokenizer: from `load_tokenizer`.

  Returns:
    `(ids, loss_mask)`: `(n,)` int32 and `(n,)` bool; `loss_mask[t]` says whether token `t`
    is a target. The first token is a target here for text examples; `pack` clears the
    first position of every segment.

  Raises:
    ValueError: the example is malformed, the tokenizer lacks an eos (text, completion)
      or a chat template (chat), or the template fails (`ChatTemplateError`); the message
      names the example's source.
  """
  where = str(example.get(SOURCE, "example")) if isinstance(example, Mapping) else "example"
  kind = example_format(example, where)
  if kind == "text":
    ids = _append_eos(tokenizer.encode(example["text"], True), tokenizer, where)
    return np.asarray(ids, np.int32), np.ones(len(ids), np.bool_)
  if kind == "prompt_completion":
    prompt = prompt_ids(tokenizer, example["prompt"])
    completion = _append_eos(tokenizer.encode(example["completion"], False), tokenizer, where)
    mask = np.zeros(len(prompt) + len(completion), np.bool_)
    mask[len(prompt):] = True
    return np.asarray(prompt + completion, np.int32), mask
  full, spans = assistant_spans(example["messages"], tokenizer, where)
  ids, offsets = tokenizer.encode_with_offsets(full, add_special_tokens=False)
  return ids, _span_mask(offsets, spans)


# ----------------------------------------------------------------------------
# packing

@dataclasses.dataclass(frozen=True)
class Packed:
  """Rows of packed examples.

  Attributes:
    rows: `input_ids` (N, seq_len) int32, `segment_ids` (N, seq_len) int32 (0 = padding,
      1.. = the example's place within its row), `positions` (N, seq_len) int32 (0.. per
      segment, 0 on padding), `loss_mask` (N, seq_len) bool (never on padding nor on the
      first token of a segment).
    truncated: examples longer than `seq_len`, cut to their first `seq_len` tokens.
    dropped_tokens: tokens removed by that truncation.
    skipped: examples dropped because no target was left (empty, a single token, a
      prompt that filled `seq_len`, a chat without an assistant turn).
  """
  rows: dict[str, np.ndarray]
  truncated: int = 0
  dropped_tokens: int = 0
  skipped: int = 0


class _FirstFit:
  """Rows' free space in a max segment tree: the first row with room for `n` tokens in
  O(log rows), so packing stays linear-ish on large data sets."""

  def __init__(self, max_rows: int):
    self.size = 1 << max(0, (max_rows - 1).bit_length())
    self.free = [0] * (2 * self.size)
    self.rows = 0

  def place(self, n: int, seq_len: int) -> tuple[int, int]:
    """(row, offset) of `n` tokens in the first row with room, opening a row if none."""
    free = self.free
    if free[1] >= n:
      i = 1
      while i < self.size:
        i = 2 * i if free[2 * i] >= n else 2 * i + 1
      row = i - self.size
    else:
      row = self.rows
      self.rows += 1
      self._set(row, seq_len)
    offset = seq_len - free[row + self.size]
    self._set(row, free[row + self.size] - n)
    return row, offset

  def _set(self, row: int, value: int) -> None:
    i = row + self.size
    self.free[i] = value
    i //= 2
    while i:
      self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])
      i //= 2


def pack(examples: Iterable[tuple[Any, Any]], seq_len: int, *, pad_id: int) -> Packed:
  """Greedy first-fit packing of `(ids, loss_mask)` examples into rows of `seq_len`.

  Examples are placed in order, each into the first row with room for all of it (a new
  row when none has), so the result is a function of the inputs only. An example longer
  than `seq_len` keeps its first `seq_len` tokens (counted in `truncated`). The first
  token of each segment is not a target (see the module doc); an example left without
  a target is skipped.

  Args:
    examples: `(ids (n,) int, loss_mask (n,) bool)` pairs, as from `tokenize_example`.
    seq_len: tokens per row, > 0.
    pad_id: the id written on padding (never a target; any valid id works).

  Returns:
    `Packed` (rows and counts). The rows are in memory: 13 bytes per token slot.

  Raises:
    ValueError: `seq_len` or `pad_id` is not a valid int, or an example's arrays are not
      1-D of one length with integer ids (naming the example's index).
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"{seq_len=} must be a positive int")
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
    raise ValueError(f"{pad_id=} must be a non-negative int (a token id)")
  seq_len = int(seq_len)
  kept, truncated, dropped, skipped = [], 0, 0, 0
  for k, (ids, mask) in enumerate(examples):
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 1 or mask.shape != ids.shape:
      raise ValueError(f"examples[{k}]: ids {ids.shape} and loss_mask {mask.shape} must be "
                       "1-D of one length")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"examples[{k}]: ids must be integers, got {ids.dtype}")
    if mask.size and mask.dtype != np.bool_:
      raise ValueError(f"examples[{k}]: loss_mask must be bool, got {mask.dtype}")
    if len(ids) > seq_len:
      truncated += 1
      dropped += len(ids) - seq_len
      ids, mask = ids[:seq_len], mask[:seq_len]
    if not mask[1:].any():
      skipped += 1
      continue
    kept.append((ids, mask))

  fit = _FirstFit(len(kept))
  placed = [fit.place(len(ids), seq_len) for ids, _ in kept]
  n = fit.rows
  input_ids = np.full((n, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  positions = np.zeros((n, seq_len), np.int32)
  loss_mask = np.zeros((n, seq_len), np.bool_)
  segments = np.zeros(n, np.int32)
  for (ids, mask), (row, off) in zip(kept, placed):
    end = off + len(ids)
    segments[row] += 1
    input_ids[row, off:end] = ids
    segment_ids[row, off:end] = segments[row]
    positions[row, off:end] = np.arange(len(ids), dtype=np.int32)
    loss_mask[row, off + 1:end] = mask[1:]
  rows = {"input_ids": input_ids, "segment_ids": segment_ids, "positions": positions,
          "loss_mask": loss_mask}
  return Packed(rows=rows, truncated=truncated, dropped_tokens=dropped, skipped=skipped)


# ----------------------------------------------------------------------------
# batches

_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer on uint64 (a bijection: distinct inputs, distinct outputs)."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """A permutation of `range(n)` that depends on `(seed, epoch)` only: rows sorted by a
  splitmix64 hash of (seed, epoch, row). Written out rather than `np.random`, whose
  streams NumPy may change between versions; a saved position must resume the same
  order after an upgrade."""
  key = _splitmix64(np.array([seed & _M64], np.uint64))
  key = _splitmix64(key ^ np.array([epoch & _M64], np.uint64))
  return np.argsort(_splitmix64(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


class Position(NamedTuple):
  """Where a `Batches` iterator is: the next batch is batch `index` of epoch `epoch`.
  A tuple of two ints, so it saves as JSON and `Position(*saved)` restores it."""
  epoch: int
  index: int


class Batches(Iterator[dict]):
  """Shuffled batches of rows, resumable from a saved `position`.

  Each epoch visits `steps_per_epoch = N // batch_size` batches of distinct rows in the
  order `epoch_order(N, seed, epoch)`; the `N % batch_size` rows left over are not seen in
  that epoch (the leftovers differ from epoch to epoch). Iteration runs for `num_epochs`
  epochs (forever if None).

  Args:
    rows: name -> array with N rows (`Packed.rows`); every batch holds the same names
      with `batch_size` rows.
    batch_size: rows per batch, 1 <= batch_size <= N.
    seed: a non-negative int.
    start: the position to begin at (`Batches.position` of an earlier run).
    num_epochs: stop after this many epochs, or never.

  The order depends on `(seed, epoch)` and N only; resuming is exact when the rows are
  the same (same data, tokenizer and `seq_len`).

  >>> it = Batches({"x": np.arange(10)}, batch_size=4, seed=0)
  >>> first = [next(it)["x"] for _ in range(3)]
  >>> saved = it.position                      # Position(epoch=1, index=1)
  >>> again = Batches({"x": np.arange(10)}, batch_size=4, seed=0, start=saved)
  >>> bool((next(again)["x"] == next(it)["x"]).all())
  True
  """

  def __init__(self, rows: Mapping[str, np.ndarray], batch_size: int, seed: int, *,
               start: Position | tuple[int, int] = Position(0, 0),
               num_epochs: int | None = None):
    if not isinstance(rows, Mapping) or not rows:
      raise ValueError("rows must be a non-empty mapping of name -> array (Packed.rows)")
    self.rows = {k: np.asarray(v) for k, v in rows.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self.rows.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(f"rows must all have the same number of rows; got {sizes}")
    self.num_rows = next(iter(sizes.values()))
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if batch_size > self.num_rows:
      raise ValueError(f"batch_size={batch_size} is more than the {self.num_rows} rows")
    if num_epochs is not None and (isinstance(num_epochs, bool) or num_epochs < 0):
      raise ValueError(f"{num_epochs=} must be None or an int >= 0")
    self.batch_size, self.seed, self.num_epochs = int(batch_size), int(seed), num_epochs
    self.steps_per_epoch = self.num_rows // self.batch_size
    try:
      epoch, index = start
    except (TypeError, ValueError):
      raise ValueError(f"start={start!r} must be a Position (epoch, index)") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
               for v in (epoch, index)) or index >= self.steps_per_epoch:
      raise ValueError(f"start={tuple(start)!r} must be (epoch >= 0, 0 <= index < "
                       f"{self.steps_per_epoch}) for {self.num_rows} rows in batches of "
                       f"{self.batch_size}")
    self._epoch, self._index = int(epoch), int(index)
    self._order_epoch, self._order = None, None

  @property
  def position(self) -> Position:
    """The position of the next batch (after the last of an epoch: the next epoch's 0)."""
    return Position(self._epoch, self._index)

  def order(self, epoch: int) -> np.ndarray:
    """The row order of `epoch`."""
    if self._order_epoch != epoch:
      self._order_epoch, self._order = epoch, epoch_order(self.num_rows, self.seed, epoch)
    return self._order

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    b = self.batch_size
    take = self.order(self._epoch)[self._index * b:(self._index + 1) * b]
    batch = {k: v[take] for k, v in self.rows.items()}
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return batch


__all__ = [
    "Batches", "ChatTemplateError", "MAX_LINE_BYTES", "Packed", "Position", "Tokenizer",
    "assistant_spans", "check_messages", "epoch_order", "example_format", "load_tokenizer",
    "pack", "prompt_ids", "read_jsonl", "render_chat", "tokenize_example",
]
