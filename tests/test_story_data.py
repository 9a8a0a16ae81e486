"""examples/story_data.py: the story demo's tasks, tokenizer, base model and evaluation.

Answers are checked against solutions written here independently of the module's;
`exact_match` against one unbatched greedy decode per example, written with
`models.forward` (not `models.generate`), with and without a LoRA adapter.
"""

import functools
import os
import re
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import story_data as sd  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax import models  # noqa: E402
from training import data  # noqa: E402

TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1)


def _reference_answer(prompt: str) -> str:
  """Each task solved from its prompt text, without the module's functions."""
  if m := re.fullmatch(r"([1-9][0-9])\+([1-9][0-9])=", prompt):
    return str(int(m[1]) + int(m[2]))
  if m := re.fullmatch(r"rev ([a-z]{3,6})=", prompt):
    return functools.reduce(lambda acc, c: c + acc, m[1], "")
  if m := re.fullmatch(r"sort ([0-9]{3,6})=", prompt):
    return "".join(d * m[1].count(d) for d in "0123456789")      # counting sort
  raise AssertionError(f"{prompt!r} is no task's prompt")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return sd.write_tokenizer(tmp_path_factory.mktemp("story") / "tok")


@pytest.fixture(scope="module")
def tok(tok_dir):
  return data.load_tokenizer(tok_dir)


# ----------------------------------------------------------------------------
# tasks

@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(task=st.sampled_from(sorted(sd.TASKS)), seed=st.integers(0, 2 ** 40),
                  held_out=st.booleans())
def test_answers_are_correct_and_sides_respected(task, seed, held_out):
  problems = sd.sample_problems(task, 20, seed, held_out=held_out)
  assert len({p["prompt"] for p in problems}) == 20
  for p in problems:
    assert p["completion"] == _reference_answer(p["prompt"])
    assert sd.is_held_out(p["prompt"]) == held_out


def test_mistakes_are_the_documented_ones():
  assert sd.TASKS["add"].mistake("58+67=") == "15"       # 5+6 -> 1, 8+7 -> 5: no carries
  assert sd.TASKS["add"].mistake("12+34=") == "46"       # no carry: the mistake is right
  assert sd.TASKS["rev"].mistake("rev abcd=") == "abcd"
  assert sd.TASKS["sort"].mistake("sort 3141=") == "4311"     # descending
  assert sd.TASKS["add"].mistake("50+50=") == "00"
  with pytest.raises(ValueError, match="'rev '"):
    sd.TASKS["rev"].solve("reverse abc=")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 40))
def test_pretraining_lines_fit_and_never_hold_an_eval_prompt(seed):
  import random
  line = sd.pretraining_line(random.Random(seed))
  assert set(line) <= set(sd.ALPHABET) and len(line) + 2 <= sd.SEQ_LEN
  m = re.match(r"(\d\d\+\d\d=|rev [a-z]{3,6}=|sort \d{3,6}=)", line)
  if m:
    assert not sd.is_held_out(m[1])


def test_task_files_are_disjoint_deterministic_and_parse(tmp_path, tok):
  paths = sd.write_task_files(tmp_path / "a", n_train=300, n_eval=40, seed=7)
  assert set(paths) == set(sd.TASKS) | {"all"}
  union = {"train": [], "eval": []}
  for task in sd.TASKS:
    train, ev = (data.read_jsonl(p) for p in paths[task])
    assert (len(train), len(ev)) == (300, 40)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in ev}
    for e in train + ev:
      assert e["completion"] == _reference_answer(e["prompt"])
      ids, mask = data.tokenize_example(e, tok)
      assert len(ids) <= sd.SEQ_LEN and mask.sum() == len(e["completion"]) + 1
    union["train"] += train
    union["eval"] += ev
  for split, i in (("train", 0), ("eval", 1)):
    got = data.read_jsonl(paths["all"][i])
    assert sorted((e["prompt"], e["completion"]) for e in got) == sorted(
        (e["prompt"], e["completion"]) for e in union[split])
  again = sd.write_task_files(tmp_path / "b", n_train=300, n_eval=40, seed=7)
  other = sd.write_task_files(tmp_path / "c", n_train=300, n_eval=40, seed=8)
  for key in paths:
    assert paths[key][0].read_bytes() == again[key][0].read_bytes()
    assert paths[key][0].read_bytes() != other[key][0].read_bytes()


def test_sample_problems_refuses_what_it_cannot_supply():
  with pytest.raises(ValueError, match="unknown task 'mul'"):
    sd.sample_problems("mul", 1, 0, held_out=False)
  with pytest.raises(ValueError, match="found only .* distinct eval problems"):
    sd.sample_problems("add", 2000, 0, held_out=True)     # about 90 * 90 / 8 exist


# ----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_is_one_token_per_character(tok):
  assert tok.vocab_size == len(sd.SPECIAL_TOKENS) + len(sd.ALPHABET)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  s = "sort 3141=1134"
  assert tok.encode(s, True) == [tok.bos_id] + tok.encode(s, False)
  assert len(tok.encode(s, False)) == len(s)
  assert tok.decode(tok.encode(s, True)) == "<bos>" + s
  assert tok.encode("A!", False) == [3, 3]                # <unk> per unknown character


@pytest.mark.interop
@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(text=st.text(alphabet=sd.ALPHABET, max_size=24))
def test_our_ids_are_transformers_ids(text):
  hf, tok = _tokenizers()
  for special in (True, False):
    ids = tok.encode(text, special)
    assert ids == hf(text, add_special_tokens=special)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert hf.decode(ids, skip_special_tokens=True) == text


@functools.cache
def _tokenizers():
  import tempfile
  import transformers
  d = sd.write_tokenizer(tempfile.mkdtemp(prefix="story-tok-"))
  return transformers.AutoTokenizer.from_pretrained(d), data.load_tokenizer(d)


@pytest.mark.interop
def test_transformers_reads_the_same_special_tokens_and_template():
  hf, tok = _tokenizers()
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 0, 3)
  assert len(hf) == tok.vocab_size
  for s in ["12+34=46", "rev abcd=dcba", "sort 3141=1134"]:
    assert hf(s)["input_ids"] == tok.encode(s, True)
  messages = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}]
  assert (hf.apply_chat_template(messages, tokenize=False)
          == tok.render_chat(messages) == "user: 12+34=\nassistant: 46\n")
  assert hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True
                                ).endswith("assistant: ")


# ----------------------------------------------------------------------------
# base model

@pytest.mark.interop
def test_pretrain_base_writes_a_transformers_checkpoint(tmp_path, standard_promotion):
  import torch
  import transformers
  config = sd.base_config(**TOY)
  run = sd.pretrain_base(tmp_path / "base", steps=40, seed=0, config=config, batch_size=16,
                         learning_rate=1e-2)
  loss = np.asarray(run["loss"])
  assert len(loss) == 40 and np.isfinite(loss).all()
  assert loss[-5:].mean() < loss[:5].mean() - 0.5
  assert run["seconds"] > 0

  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                            dtype=torch.float32)
  loaded_config, params = models.load_hf(tmp_path / "base")
  assert loaded_config == config
  lines = ["12+34=46", "rev abcd=dcba", "sort 3141=1134"]
  batch = hf_tok(lines, padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  for p in (params, run["params"]):
    got = np.asarray(models.forward(p, config, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


def test_pretrain_base_checks_the_vocabulary(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=50 must be the tokenizer's 45"):
    sd.pretrain_base(tmp_path, steps=1, seed=0, config=sd.base_config(**TOY, vocab_size=50))


# ----------------------------------------------------------------------------
# evaluation

def _greedy_one(params, config, prompt_ids, n, eos_id):
  """One example, unbatched and unpadded: `n` argmax steps of `models.forward` on the
  growing sequence, kept in a right-padded buffer so one program serves every step
  (causal attention: the padding after position t does not change its logits)."""
  buf = np.zeros((1, len(prompt_ids) + n), np.int32)
  buf[0, :len(prompt_ids)] = prompt_ids
  out = []
  for t in range(len(prompt_ids), len(prompt_ids) + n):
    logits = _forward(params, config, jnp.asarray(buf))
    nxt = int(jnp.argmax(logits[0, t - 1]))
    if nxt == eos_id:
      break
    out.append(nxt)
    buf[0, t] = nxt
  return out


_forward = jax.jit(models.forward, static_argnums=1)


@pytest.fixture(scope="module")
def toy_model():
  config = sd.base_config(**TOY)
  # a wide init, so greedy decoding of the untrained model is not one token repeated
  params = models.init_params(jax.random.key(3), config, std=0.3)
  return config, params


def _examples():
  """Prompts of every length the tasks have, so the batches are left-padded."""
  return [e for t in sd.TASKS for e in sd.sample_problems(t, 3, 11, held_out=True)]


@pytest.mark.parametrize("adapter", [False, True])
def test_exact_match_equals_unbatched_greedy_decoding(toy_model, tok, adapter):
  config, params = toy_model
  if adapter:
    params = lj.init(jax.random.key(4), params, lj.LoraConfig(rank=4, alpha=8,
                                                              targets="all-linear"))
    b_keys = iter(jax.random.split(jax.random.key(5), 100))
    is_lora = lambda x: isinstance(x, lj.LoraWeight)  # noqa: E731
    params = jax.tree.map(
        lambda x: x.replace_children(b=0.3 * jax.random.normal(next(b_keys), x.b.shape))
        if is_lora(x) else x, params, is_leaf=is_lora)
  plain = lj.merge(params) if adapter else params
  examples = _examples()
  n = 5
  ref = [tok.decode(_greedy_one(plain, config, tok.encode(e["prompt"], True), n, tok.eos_id))
         for e in examples]
  assert len(set(ref)) > 3, ref            # the check means something
  if adapter:
    base = sd.predict(toy_model[1], config, tok, examples, max_new_tokens=n, batch_size=4)
    assert base != ref                      # the adapter changes the answers

  # half of the examples get the reference answer as their completion
  scored = [dict(e, completion=r if i % 2 else "x") for i, (e, r) in
            enumerate(zip(examples, ref))]
  cache = models.decoder._generate_jit._cache_size()
  assert sd.predict(params, config, tok, scored, max_new_tokens=n, batch_size=4) == ref
  assert models.decoder._generate_jit._cache_size() <= cache + 1   # 3 batches, 1 program
  assert sd.exact_match(params, config, tok, scored, max_new_tokens=n,
                        batch_size=4) == sum(i % 2 for i in range(len(scored))) / len(scored)


def test_predict_default_length_leaves_room_for_the_eos(toy_model, tok):
  config, params = toy_model
  examples = _examples()
  longest = max(len(e["completion"]) for e in examples)
  got = sd.predict(params, config, tok, examples, batch_size=4)
  want = sd.predict(params, config, tok, examples, max_new_tokens=longest + 1, batch_size=4)
  assert got == want and len(got) == len(examples)
  assert sd.predict(params, config, tok, []) == []
  with pytest.raises(ValueError, match="no examples"):
    sd.exact_match(params, config, tok, [])
