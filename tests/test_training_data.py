"""training.data: tokenizer directories, chat templates against transformers'
`apply_chat_template`, JSONL errors naming file and line, loss masks, packing and the
resumable batch iterator.

The tokenizer is a byte-level BPE trained here in a few milliseconds, saved with three
real chat templates (Llama 3, Qwen2.5 / ChatML with tools, Gemma with its
`raise_exception` on a system role) and one ChatML template with `{% generation %}`
markers, whose assistant mask transformers computes itself."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from training import data

# ----------------------------------------------------------------------------
# chat templates as their models ship them

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}")

# ChatML with TRL-style generation markers: transformers' return_assistant_tokens_mask
# is the oracle for our prefix-rendering mask.
CHATML_GEN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Phi-3 style: an eos only after the last message, which breaks the prefix assumption
# for every assistant turn but the last.
TRAILING_EOS = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
    "{{ eos_token }}{% endif %}")

SPECIAL = ["<pad>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>",
           "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|end|>"]

# family: template, bos, eos, pad, whether the post-processor adds the bos; the end of an
# assistant turn, and whether the template trims the content.
FAMILIES = {
    "llama3": dict(template=LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   post_bos=True, end="<|eot_id|>", trim=True),
    "qwen": dict(template=QWEN25, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                 post_bos=False, end="<|im_end|>\n", trim=False),
    "gemma": dict(template=GEMMA, bos="<bos>", eos="<eos>", pad="<pad>", post_bos=True,
                  end="<end_of_turn>\n", trim=True),
    "chatml_gen": dict(template=CHATML_GEN, bos=None, eos="<|im_end|>", pad="<pad>",
                       post_bos=False, end="<|im_end|>\n", trim=False),
    "trailing_eos": dict(template=TRAILING_EOS, bos=None, eos="<|endoftext|>", pad=None,
                         post_bos=False, end="<|end|>\n", trim=False),
}

CORPUS = [
    "Hello world, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé text: héllo, naïve, 東京, 🌍.",
    "user assistant system model tool You are Qwen, created by Alibaba Cloud.",
    "What is the weather in Paris? It is sunny and 22 degrees.",
    "def add(a, b):\n    return a + b\n\n# Tools\n<tools></tools> {\"name\": \"x\"}",
] * 8


def _backend(post_bos: str | None) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if post_bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{post_bos} $A", pair=f"{post_bos} $A {post_bos} $B",
        special_tokens=[(post_bos, tok.token_to_id(post_bos))])
  return tok


def make_model_dir(path, family, **config_over):
  """A Hugging Face tokenizer directory: tokenizer.json + tokenizer_config.json."""
  f = FAMILIES[family]
  os.makedirs(path, exist_ok=True)
  _backend(f["bos"] if f["post_bos"] else None).save(str(path / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f["bos"],
            "eos_token": f["eos"], "pad_token": f["pad"], "chat_template": f["template"],
            "model_max_length": 4096, **config_over}
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {family: make_model_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def toks(dirs):
  return {family: data.load_tokenizer(d) for family, d in dirs.items()}


@pytest.fixture(scope="module")
def hf(dirs):
  transformers = pytest.importorskip("transformers")
  return {family: transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
          for family, d in dirs.items()}


def write(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines), encoding="utf-8")
  return path


# ----------------------------------------------------------------------------
# conversations

SIMPLE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "  It is sunny, 22 degrees.\n"},
    {"role": "user", "content": "Ünïcödé: héllo 東京 🌍 <tools></tools>"},
    {"role": "assistant", "content": "naïve 🌍 answer"},
]
ALTERNATING = [m for m in MULTI if m["role"] != "system"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_CALLS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
    {"role": "tool", "content": "{\"temp\": 22}"},
    {"role": "assistant", "content": "It is 22 °C in Zürich.", "tool_calls": None},
]
CONVERSATIONS = {
    "llama3": [SIMPLE, MULTI], "qwen": [SIMPLE, MULTI, TOOL_CALLS],
    "gemma": [SIMPLE, ALTERNATING], "chatml_gen": [SIMPLE, MULTI],
}
CASES = [(family, i) for family, convs in CONVERSATIONS.items() for i in range(len(convs))]


# ----------------------------------------------------------------------------
# against transformers

@pytest.mark.interop
def test_load_tokenizer_reads_what_transformers_reads(toks, hf):
  for family, tok in toks.items():
    ref = hf[family]
    assert tok.special_tokens == ref.special_tokens_map, family
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id), family
    assert tok.chat_template == ref.chat_template
    assert tok.vocab_size == len(ref)
    for text in ("Hello world", "héllo 東京 🌍 <|im_end|> x", ""):
      for special in (True, False):
        assert tok.encode(text, special) == ref.encode(text, add_special_tokens=special)
    ids = tok.encode("naïve 🌍 <|eot_id|> fox")
    assert tok.decode(ids) == ref.decode(ids)


@pytest.mark.interop
@pytest.mark.parametrize("family,i", CASES)
@pytest.mark.parametrize("gen", [False, True])
def test_render_chat_equals_apply_chat_template(toks, hf, family, i, gen):
  messages = CONVERSATIONS[family][i]
  tok, ref = toks[family], hf[family]
  want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  got = data.render_chat(messages, tok.chat_template, add_generation_prompt=gen,
                         **tok.special_tokens)
  assert got == want
  assert tok.render_chat(messages, add_generation_prompt=gen) == want


@pytest.mark.interop
def test_render_chat_with_tools_equals_apply_chat_template(toks, hf):
  # tojson as transformers defines it: no HTML escaping, non-ASCII kept
  want = hf["qwen"].apply_chat_template(TOOL_CALLS, tools=TOOLS, tokenize=False,
                                        add_generation_prompt=True)
  assert toks["qwen"].render_chat(TOOL_CALLS, tools=TOOLS, add_generation_prompt=True) == want
  assert "Météo d'une ville" in want and '"city": "Zürich"' in want


# Environment features one at a time: tojson options, strftime_now, namespace + loop
# controls, {% generation %}, reasoning aliases, null keys dropped, extra variables.
FEATURES = {
    "tojson": "{{ messages | tojson(indent=2, sort_keys=true) }}|{{ {'a': '<&>'} | tojson }}",
    "strftime": "{{ strftime_now('%Y') }}",
    "namespace": ("{% set ns = namespace(n=0, sys=false) %}{% for m in messages %}"
                  "{% if m.role == 'system' %}{% set ns.sys = true %}{% continue %}{% endif %}"
                  "{% set ns.n = ns.n + 1 %}{% if ns.n > 2 %}{% break %}{% endif %}"
                  "[{{ m.role }}:{{ m.content }}]{% endfor %}{{ ns.sys }}{{ dict(a=1) }}"),
    "generation": ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                   "{% endfor %}"),
    "reasoning": ("{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }}/"
                  "{{ m.tool_calls is defined }}{% endfor %}"),
    "variables": "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ image_token }}|"
                 "{{ tools }}|{{ documents }}|{{ enable_thinking }}",
    "whitespace": "  {% for m in messages %}\n  {{ m.content }}  \n  {% endfor %}\n",
}
FEATURE_MESSAGES = MULTI + [{"role": "assistant", "content": "x", "reasoning": "because",
                             "tool_calls": None}]


@pytest.mark.interop
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_template_environment_equals_transformers(tmp_path, feature):
  transformers = pytest.importorskip("transformers")
  d = make_model_dir(tmp_path / "m", "gemma", chat_template=FEATURES[feature],
                     image_token="<|im_start|>")
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
  tok = data.load_tokenizer(d)
  extra = {"enable_thinking": False} if feature == "variables" else {}
  want = ref.apply_chat_template(FEATURE_MESSAGES, tokenize=False, **extra)
  assert tok.render_chat(FEATURE_MESSAGES, **extra) == want


@pytest.mark.interop
def test_chat_template_jinja_file_overrides_the_config(tmp_path):
  transformers = pytest.importorskip("transformers")
  d = make_model_dir(tmp_path / "m", "qwen")
  (d / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m.content }}>>"
                                         "{% endfor %}")
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
  tok = data.load_tokenizer(d)
  assert tok.chat_template == ref.chat_template
  assert tok.render_chat(SIMPLE) == ref.apply_chat_template(SIMPLE, tokenize=False)


@pytest.mark.interop
def test_raise_exception_surfaces_as_a_clear_error(toks, hf):
  import jinja2
  bad = [{"role": "system", "content": "Be brief."}] + SIMPLE
  with pytest.raises(jinja2.TemplateError, match="System role not supported"):
    hf["gemma"].apply_chat_template(bad, tokenize=False)
  with pytest.raises(data.ChatTemplateError, match="refused the conversation: System role "
                                                   "not supported"):
    toks["gemma"].render_chat(bad)


@pytest.mark.interop
@pytest.mark.parametrize("family,i", CASES)
def test_token_ids_equal_transformers(toks, hf, family, i):
  tok, ref = toks[family], hf[family]
  messages = CONVERSATIONS[family][i]
  ids, mask = data.tokenize_example({"messages": messages}, tok)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
  assert ids.tolist() == ref.apply_chat_template(messages, tokenize=True, return_dict=False)

  text = "The quick brown fox, 東京 🌍"
  ids, mask = data.tokenize_example({"text": text}, tok)
  assert ids.tolist() == ref(text)["input_ids"] + [ref.eos_token_id]
  assert mask.all()

  prompt, completion = "What is the weather in Paris?", " It is sunny."
  ids, mask = data.tokenize_example({"prompt": prompt, "completion": completion}, tok)
  p = ref(prompt)["input_ids"]
  assert ids.tolist() == p + ref(completion, add_special_tokens=False)["input_ids"] + [
      ref.eos_token_id]
  assert not mask[:len(p)].any() and mask[len(p):].all()


@pytest.mark.interop
@pytest.mark.parametrize("i", range(2))
def test_assistant_mask_equals_transformers_generation_mask(toks, hf, i):
  messages = CONVERSATIONS["chatml_gen"][i]
  out = hf["chatml_gen"].apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
  ids, mask = data.tokenize_example({"messages": messages}, toks["chatml_gen"])
  assert ids.tolist() == out["input_ids"]
  assert mask.astype(int).tolist() == out["assistant_masks"]


# ----------------------------------------------------------------------------
# assistant masks, as a property of decoding

def _runs(mask):
  """[start, end) of each run of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return list(zip(edges[::2], edges[1::2]))


content = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)),
                  max_size=12).map(str.strip)


@st.composite
def conversations(draw, family):
  turns = draw(st.integers(1, 3))
  msgs = []
  if family != "gemma" and draw(st.booleans()):
    msgs.append({"role": "system", "content": draw(content)})
  for _ in range(turns):
    msgs.append({"role": "user", "content": draw(content)})
    msgs.append({"role": "assistant", "content": draw(content)})
  if draw(st.booleans()):
    msgs.pop()   # ends on a user turn
  return msgs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawer=st.data())
@pytest.mark.parametrize("family", ["llama3", "qwen", "gemma"])
def test_assistant_mask_selects_exactly_the_assistant_turns(toks, family, drawer):
  tok, fam = toks[family], FAMILIES[family]
  messages = drawer.draw(conversations(family))
  ids, mask = data.tokenize_example({"messages": messages}, tok)
  assert ids.tolist() == tok.encode(tok.render_chat(messages), add_special_tokens=False)
  want = [(m["content"].strip() if fam["trim"] else m["content"]) + fam["end"]
          for m in messages if m["role"] == "assistant"]
  assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == want


def test_chat_without_assistant_turn_has_no_targets(toks):
  ids, mask = data.tokenize_example({"messages": SIMPLE[:1]}, toks["qwen"])
  assert len(ids) and not mask.any()


def test_prefix_assumption_is_checked_per_example(toks, tmp_path):
  tok = toks["trailing_eos"]
  ids, mask = data.tokenize_example({"messages": SIMPLE}, tok)   # one turn: holds
  assert tok.decode(ids[mask]) == "Hi there!<|end|>\n<|endoftext|>"
  path = write(tmp_path / "chat.jsonl", [{"messages": SIMPLE}, {"messages": ALTERNATING}])
  first, second = data.read_jsonl(path)
  data.tokenize_example(first, tok)
  with pytest.raises(data.ChatTemplateError, match=rf"{path}:2: messages\[1\] \(assistant\): "
                     r"the rendering of messages\[:2\] is not a prefix"):
    data.tokenize_example(second, tok)


def test_template_errors_name_the_line(toks, tmp_path):
  path = write(tmp_path / "chat.jsonl", [
      {"messages": SIMPLE}, {"messages": [{"role": "system", "content": "x"}] + SIMPLE}])
  good, bad = data.read_jsonl(path)
  data.tokenize_example(good, toks["gemma"])
  with pytest.raises(data.ChatTemplateError, match=rf"{path}:2: .*System role not supported"):
    data.tokenize_example(bad, toks["gemma"])


def test_template_sandbox_and_syntax_errors_are_clear():
  with pytest.raises(data.ChatTemplateError, match="syntax error at template line 2"):
    data.render_chat(SIMPLE, "ok\n{% for m in messages %}")
  with pytest.raises(data.ChatTemplateError, match="underscore"):
    data.render_chat(SIMPLE, "{% set ns = namespace() %}{% set ns._x = 1 %}")
  with pytest.raises(data.ChatTemplateError, match="SecurityError"):
    data.render_chat(SIMPLE, "{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}")
  with pytest.raises(data.ChatTemplateError, match="TypeError"):
    data.render_chat(SIMPLE, "{{ 'a' + 1 }}")
  with pytest.raises(data.ChatTemplateError, match="UndefinedError"):
    data.render_chat(SIMPLE, "{{ nothing.here }}")


def test_missing_template_or_eos_is_an_error(tmp_path):
  tok = data.load_tokenizer(make_model_dir(tmp_path / "m", "qwen", chat_template=None,
                                           eos_token=None))
  with pytest.raises(ValueError, match="example: a chat example needs a chat template"):
    data.tokenize_example({"messages": SIMPLE}, tok)
  with pytest.raises(ValueError, match="has none \\(eos_token in tokenizer_config.json\\)"):
    data.tokenize_example({"text": "x"}, tok)


# ----------------------------------------------------------------------------
# files: tokenizer directories and JSONL

def test_tokenizer_directory_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="model directory not found"):
    data.load_tokenizer(tmp_path / "nope")
  d = make_model_dir(tmp_path / "m", "llama3")
  (d / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
  with pytest.raises(ValueError, match=r"tokenizer_config.json: .*not valid JSON.*line 1"):
    data.load_tokenizer(d)
  (d / "tokenizer_config.json").write_text('{"bos_token": "<not-in-vocab>"}')
  with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token '<not-in-vocab>' "
                                       r"is not a token of .*tokenizer.json"):
    data.load_tokenizer(d)
  (d / "tokenizer_config.json").write_text('{"eos_token": 3}')
  with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token must be a string"):
    data.load_tokenizer(d)
  (d / "tokenizer_config.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
    data.load_tokenizer(d)
  (d / "tokenizer.json").write_text('{"model": 1}')
  with pytest.raises(ValueError, match=r"tokenizer.json: not a valid tokenizer.json"):
    data.load_tokenizer(d)
  (d / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"tokenizer.json: tokenizer.json not found"):
    data.load_tokenizer(d)


def test_tokenizer_files_outside_the_directory_are_refused(tmp_path):
  real = make_model_dir(tmp_path / "real", "llama3")
  d = tmp_path / "m"
  d.mkdir()
  (d / "tokenizer.json").symlink_to(real / "tokenizer.json")
  (d / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"tokenizer.json resolves to .*outside"):
    data.load_tokenizer(d)
  (d / "tokenizer.json").unlink()
  (d / "tokenizer.json").write_bytes((real / "tokenizer.json").read_bytes())
  (d / "chat_template.jinja").symlink_to(tmp_path / "elsewhere.jinja")
  with pytest.raises(ValueError, match=r"chat_template.jinja resolves to .*outside"):
    data.load_tokenizer(d)


def test_a_template_that_does_not_compile_names_its_file(tmp_path):
  d = make_model_dir(tmp_path / "m", "qwen", chat_template="{% for m in messages %}")
  with pytest.raises(data.ChatTemplateError, match=r"tokenizer_config.json: chat template: "
                                                   r"syntax error at template line 1"):
    data.load_tokenizer(d)
  (d / "chat_template.jinja").write_text("ok\n{{ messages[0] ")
  with pytest.raises(data.ChatTemplateError, match=r"chat_template.jinja: chat template: "
                                                   r"syntax error at template line 2"):
    data.load_tokenizer(d)


@pytest.mark.interop
def test_legacy_special_tokens_map_is_read_as_transformers_reads_it(tmp_path):
  transformers = pytest.importorskip("transformers")
  d = make_model_dir(tmp_path / "m", "gemma", bos_token=None, eos_token=None)
  (d / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": {"content": "<bos>", "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False}, "eos_token": "<eos>"}))
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
  tok = data.load_tokenizer(d)
  assert tok.special_tokens == ref.special_tokens_map
  assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
  assert tok.render_chat(SIMPLE) == ref.apply_chat_template(SIMPLE, tokenize=False)


def test_prompt_keeps_the_bos_but_not_an_eos_the_post_processor_appends(tmp_path):
  d = make_model_dir(tmp_path / "m", "gemma")
  backend = _backend(None)
  bos, eos = backend.token_to_id("<bos>"), backend.token_to_id("<eos>")
  backend.post_processor = processors.TemplateProcessing(
      single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
      special_tokens=[("<bos>", bos), ("<eos>", eos)])
  backend.save(str(d / "tokenizer.json"))
  tok = data.load_tokenizer(d)
  prompt, completion = tok.encode("Hello", False), tok.encode(" world", False)
  ids, mask = data.tokenize_example({"prompt": "Hello", "completion": " world"}, tok)
  assert ids.tolist() == [bos] + prompt + completion + [eos]
  assert mask.tolist() == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)
  ids, mask = data.tokenize_example({"text": "Hello"}, tok)
  assert ids.tolist() == [bos] + prompt + [eos] and mask.all()   # one eos, not two


def test_config_tokens_the_tokenizer_does_not_add_warn(tmp_path):
  d = make_model_dir(tmp_path / "m", "llama3", add_bos_token=False)
  with pytest.warns(UserWarning, match="add_bos_token is False but the post-processor"):
    tok = data.load_tokenizer(d)
  assert tok.encode("Hello")[0] == tok.bos_id   # tokenizer.json decides, as transformers 5


def test_read_jsonl_accepts_the_three_formats_mixed(tmp_path):
  lines = [{"text": "a"}, "", {"prompt": "p", "completion": "c"}, "   ",
           {"messages": TOOL_CALLS}]
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + write(tmp_path / "x", lines).read_bytes())
  got = data.read_jsonl(path)
  assert [e["_source"] for e in got] == [f"{path}:1", f"{path}:3", f"{path}:5"]
  assert [data.example_format(e, "") for e in got] == ["text", "prompt_completion", "chat"]
  assert got[2]["messages"] == TOOL_CALLS


BAD_LINES = [
    ('{"text": "a"', r"not valid JSON: Expecting ',' delimiter at column 13"),
    ('{"text": NaN}', r"not valid JSON: NaN is not JSON"),
    ('{"text": "a", "text": "b"}', r"not valid JSON: key 'text' appears twice"),
    ('["text"]', r"an example must be a JSON object .*got an array"),
    ('{"_source": "x.jsonl:9", "text": "a"}', r"key '_source' is reserved"),
    ('{"id": 3}', r"keys \[\] are not a format"),
    ('{"prompt": "a"}', r"keys \['prompt'\] are not a format"),
    ('{"text": "a", "messages": []}', r"keys \['messages', 'text'\] are not a format"),
    ('{"text": 3}', r"'text' must be a string, got number 3"),
    ('{"prompt": "a", "completion": null}', r"'completion' must be a string, got null"),
    ('{"messages": "hi"}', r"'messages' must be a non-empty list .*got a string"),
    ('{"messages": []}', r"'messages' must be a non-empty list .*\(empty\)"),
    ('{"messages": [{"role": "user", "content": "a"}, "b"]}',
     r"messages\[1\] must be an object with 'role' and 'content', got a string"),
    ('{"messages": [{"content": "a"}]}', r"messages\[0\] needs a non-empty string 'role', got "
                                         r"no 'role'"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}',
     r"messages\[0\] \(user\) needs a string 'content', got an array"),
    ('{"messages": [{"role": "assistant"}]}', r"messages\[0\] \(assistant\) needs a string "
                                              r"'content', got no 'content'"),
]


@pytest.mark.parametrize("line,match", BAD_LINES)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, match):
  path = write(tmp_path / "d.jsonl", [{"text": "fine"}, "", line, {"text": "after"}])
  with pytest.raises(ValueError, match=rf"^{path}:3: {match}"):
    data.read_jsonl(path)


def test_read_jsonl_bounds_lines_and_names_bad_bytes(tmp_path):
  path = write(tmp_path / "d.jsonl", [{"text": "a" * 100}, {"text": "b" * 1000}])
  assert len(data.read_jsonl(path, max_line_bytes=1012)) == 2   # 1000 + '{"text": ""}'
  with pytest.raises(ValueError, match=rf"^{path}:2: line is longer than 1011 bytes"):
    data.read_jsonl(path, max_line_bytes=1011)
  path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
  with pytest.raises(ValueError, match=rf"^{path}:2: not UTF-8 text \(byte 0xff at column 11"):
    data.read_jsonl(path)
  path.write_bytes(b'{"text":' + b"[" * 100_000 + b"\n")
  with pytest.raises(ValueError, match=rf"^{path}:1: "):
    data.read_jsonl(path)
  path.write_text("\n\n")
  with pytest.raises(ValueError, match="no examples"):
    data.read_jsonl(path)
  with pytest.raises(FileNotFoundError, match="data file not found"):
    data.read_jsonl(tmp_path / "missing.jsonl")


def test_in_memory_examples_are_validated_too(toks):
  np.testing.assert_array_equal(   # a data set's own keys are ignored
      data.tokenize_example({"text": "a", "label": 1}, toks["qwen"])[0],
      data.tokenize_example({"text": "a"}, toks["qwen"])[0])
  with pytest.raises(ValueError, match=r"^example: keys \['completion'\] are not a format"):
    data.tokenize_example({"completion": "a", "label": 1}, toks["qwen"])
  with pytest.raises(ValueError, match=r"^messages: messages\[0\] needs a non-empty string"):
    data.render_chat([{"content": "x"}], QWEN25)


# ----------------------------------------------------------------------------
# packing

def reference_first_fit(lengths, seq_len):
  """(row, offset) per length: the first row with room, in the obvious O(n * rows) way."""
  free, out = [], []
  for n in lengths:
    row = next((r for r, f in enumerate(free) if f >= n), None)
    if row is None:
      row = len(free)
      free.append(seq_len)
    out.append((row, seq_len - free[row]))
    free[row] -= n
  return out


@st.composite
def examples(draw):
  out = []
  for k in range(draw(st.integers(0, 25))):
    n = draw(st.integers(0, 40))
    ids = (np.arange(n) + 1000 * (k + 1)).astype(np.int32)   # ids name their example
    mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), np.bool_)
    out.append((ids, mask))
  return out


@settings(max_examples=150, deadline=None)
@given(examples(), st.integers(1, 32), st.integers(0, 5))
def test_packing_invariants(exs, seq_len, pad_id):
  packed = data.pack(exs, seq_len, pad_id=pad_id)
  rows = packed.rows
  ids, seg, pos, mask = (rows[k] for k in ("input_ids", "segment_ids", "positions",
                                            "loss_mask"))
  n = ids.shape[0]
  assert all(v.shape == (n, seq_len) for v in rows.values())
  assert (ids.dtype, seg.dtype, pos.dtype, mask.dtype) == (np.int32, np.int32, np.int32,
                                                           np.bool_)
  kept = [(k, i[:seq_len], m[:seq_len]) for k, (i, m) in enumerate(exs) if m[1:seq_len].any()]
  assert packed.skipped == len(exs) - len(kept)
  assert packed.truncated == sum(len(i) > seq_len for i, _ in exs)
  assert packed.dropped_tokens == sum(max(0, len(i) - seq_len) for i, _ in exs)

  # each kept example is one segment, whole and in order, where first-fit puts it
  where = reference_first_fit([len(i) for _, i, _ in kept], seq_len)
  assert n == (max(r for r, _ in where) + 1 if where else 0)
  seen = {}
  for r in range(n):
    # segments 1, 2, ... left to right, then padding only
    k = seg[r].max()
    run = np.concatenate([np.repeat(np.arange(1, k + 1), np.bincount(seg[r])[1:]),
                          np.zeros((seg[r] == 0).sum(), np.int32)])
    assert (seg[r] == run).all()
    pad = seg[r] == 0
    assert (ids[r][pad] == pad_id).all() and not mask[r][pad].any() and (pos[r][pad] == 0).all()
    for s in range(1, k + 1):
      cols = np.flatnonzero(seg[r] == s)
      tokens = ids[r, cols]
      assert (pos[r, cols] == np.arange(len(cols))).all()
      assert not mask[r, cols[0]]                  # first token of a segment: no target
      seen[int(tokens[0]) // 1000 - 1] = (r, int(cols[0]), tokens, mask[r, cols])
  assert sorted(seen) == [k for k, _, _ in kept]
  for (k, i, m), rc in zip(kept, where):
    r, c, tokens, got_mask = seen[k]
    assert (r, c) == rc
    assert (tokens == i).all()
    assert (got_mask[1:] == m[1:]).all()
  again = data.pack(exs, seq_len, pad_id=pad_id)
  assert all((again.rows[k] == v).all() for k, v in rows.items())


def test_pack_bad_input_is_named():
  with pytest.raises(ValueError, match="seq_len=0 must be a positive int"):
    data.pack([], 0, pad_id=0)
  with pytest.raises(ValueError, match="pad_id=-1"):
    data.pack([], 4, pad_id=-1)
  with pytest.raises(ValueError, match=r"examples\[1\]: ids \(3,\) and loss_mask \(2,\)"):
    data.pack([(np.arange(2), np.ones(2, bool)), (np.arange(3), np.ones(2, bool))], 4, pad_id=0)
  with pytest.raises(ValueError, match=r"examples\[0\]: ids must be integers, got float"):
    data.pack([(np.ones(2), np.ones(2, bool))], 4, pad_id=0)


def test_pack_from_a_jsonl_file_end_to_end(toks, tmp_path):
  tok = toks["llama3"]
  path = write(tmp_path / "d.jsonl", [{"text": "Hello world"}, {"messages": MULTI},
                                      {"prompt": "What is the weather?", "completion": " Sunny."}])
  packed = data.pack([data.tokenize_example(e, tok) for e in data.read_jsonl(path)], 128,
                     pad_id=tok.eos_id)
  rows = packed.rows
  assert rows["input_ids"].shape == (1, 128) and packed.truncated == 0
  targets = rows["input_ids"][rows["loss_mask"]]
  assert "Sunny.<|eot_id|>" in tok.decode(targets)
  assert "What is the weather" not in tok.decode(targets)


# ----------------------------------------------------------------------------
# batches

def test_epoch_order_is_pinned():
  # The order is ours (splitmix64), not NumPy's RNG: a saved position must resume the
  # same order on any NumPy version. Changing these numbers breaks resumption.
  assert data.epoch_order(10, 0, 0).tolist() == PINNED_0_0
  assert data.epoch_order(10, 0, 1).tolist() == PINNED_0_1
  assert data.epoch_order(10, 7, 0).tolist() != PINNED_0_0


PINNED_0_0 = [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
PINNED_0_1 = [8, 3, 0, 1, 5, 2, 7, 4, 9, 6]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.data())
def test_batches_resume_where_they_stopped(n, drawer):
  batch_size = drawer.draw(st.integers(1, n))
  seed = drawer.draw(st.integers(0, 2 ** 64 - 1))
  epochs = drawer.draw(st.integers(1, 3))
  rows = {"input_ids": np.arange(n * 3, dtype=np.int32).reshape(n, 3),
          "loss_mask": np.arange(n)[:, None] % 2 == np.zeros((1, 3), int)}
  full = list(data.Batches(rows, batch_size, seed, num_epochs=epochs))
  steps = n // batch_size
  assert len(full) == steps * epochs
  for e in range(epochs):   # an epoch's batches are distinct rows
    seen = np.concatenate([b["input_ids"][:, 0] for b in full[e * steps:(e + 1) * steps]])
    assert len(set(seen.tolist())) == steps * batch_size
  assert all(b["input_ids"].shape == (batch_size, 3) for b in full)

  k = drawer.draw(st.integers(0, len(full)))
  it = data.Batches(rows, batch_size, seed, num_epochs=epochs)
  head = [next(it) for _ in range(k)]
  saved = json.loads(json.dumps(it.position))
  assert it.position == (k // steps, k % steps)
  rest = list(data.Batches(rows, batch_size, seed, num_epochs=epochs,
                           start=data.Position(*saved)))
  assert len(head) + len(rest) == len(full)
  for got, want in zip(head + rest, full):
    assert all((got[name] == want[name]).all() for name in rows)


def test_batches_bad_arguments_are_named():
  rows = {"x": np.arange(10)}
  with pytest.raises(ValueError, match="batch_size=11 is more than the 10 rows"):
    data.Batches(rows, 11, 0)
  with pytest.raises(ValueError, match=r"start=\(0, 5\) must be \(epoch >= 0, 0 <= index < 5\)"):
    data.Batches(rows, 2, 0, start=(0, 5))
  with pytest.raises(ValueError, match="seed=-1 must be an int >= 0"):
    data.Batches(rows, 2, -1)
  with pytest.raises(ValueError, match="same number of rows"):
    data.Batches({"x": np.arange(10), "y": np.arange(9)}, 2, 0)
