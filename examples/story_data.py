"""The data and the base model of the story demo: three small tasks, a character-level
tokenizer, a small Llama pretrained here, and exact-match evaluation.

The story: a small base model knows the format of three tasks but gets them wrong; one
LoRA adapter per task (trained with `lora-jax train` on the files written here) fixes
one task each; the adapters are merged and served. This module builds everything the
story starts from, in code, in a minute or two of CPU:

    files = write_task_files("story/data", n_train=4000, n_eval=200, seed=0)
    run = pretrain_base("story/base", steps=1500, seed=0)    # an HF checkpoint + tokenizer
    config, params = models.load_hf("story/base")
    tok = data.load_tokenizer("story/base")
    acc = exact_match(params, config, tok, data.read_jsonl(files["add"][1]))

**Tasks** (prompt -> completion, one character per token):

    add    "12+34="      -> "46"      two 2-digit numbers
    rev    "rev abcd="   -> "dcba"    3-6 lowercase letters, reversed
    sort   "sort 3141="  -> "1134"    3-6 digits, ascending

**Held-out problems.** A problem is an eval problem when a hash of its prompt says so
(`is_held_out`, one prompt in eight): eval files draw only those, train files and the
base's pretraining only the others, so no seed or size can leak an eval problem into
training.

**Why the base is poor at the tasks, and why an adapter fixes them fast.** The base
(`base_config`: 2 layers, hidden size 128, 0.44M parameters) is pretrained on
`pretraining_line`s: a few random character strings, and task lines that nearly always
carry the task's *systematic* mistake (`Task.mistake`: addition without carries, the
word copied instead of reversed, the digits sorted descending), rarely the correct
answer (`MIX_CORRECT`) or a random one. So the base has learnt the format and a skill
next to each task's (attend to the operand, sort, add columns) but answers wrongly, and
a low-rank update turns the skill into the right one quickly. Two mixtures that do not
work in the time: wrong answers that are only random (the correct answer is still each
position's most likely, and a base trained long enough would score well), and mixing
correct and mistaken answers in similar shares (the conflicting targets slow the
pretraining so much that the base learns neither, and the adapters start from nothing).

Measured on 2 shared CPU cores (`main`, seed 0): pretraining 1500 steps takes 50-90 s
(the machine's load decides) and leaves the base at 0-3% exact match on every task; a
rank-16 adapter on every linear layer (alpha 32, adamw 3e-3 with a cosine decay to 1e-3,
batches of 32 train problems, loss on the completion) then reaches 100% on 200 eval
problems of its task after 1200 steps, 40-95 s. On bases pretrained 1000 steps instead,
the adapters stalled (addition at 5%): do not cut the pretraining short. The deltas of
the three adapters do not add up: their sum (or mean) on the base scores under 2% on
every task, so the story's merge needs a method that keeps them apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from tokenizers import decoders, processors

from lora_jax import models

# ----------------------------------------------------------------------------
# tasks

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# every character a task line or the chat template writes: one token each
ALPHABET = DIGITS + LETTERS + "+=: \n"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)           # ids 0..3, then ALPHABET in order
HELD_OUT_ONE_IN = 8
ADD_DIGITS = 2          # digits of each addend


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: a prompt generator, the correct answer and the base's usual mistake.

  Attributes:
    name: the task's name (file names, `TASKS` key).
    sample: `rng -> prompt`, a random problem ("12+34=").
    solve: `prompt -> completion`, the correct answer ("46").
    mistake: `prompt -> completion`, the systematic wrong answer of the pretraining mix.
    answer_chars: characters of a random (wrong) answer.
  """
  name: str
  sample: Callable[[random.Random], str]
  solve: Callable[[str], str]
  mistake: Callable[[str], str]
  answer_chars: str


def _operand(prompt: str, prefix: str) -> str:
  """The text between `prefix` and the final "=" of a prompt."""
  if not (prompt.startswith(prefix) and prompt.endswith("=")):
    raise ValueError(f"prompt {prompt!r} is not of the form {prefix!r}...'='")
  return prompt[len(prefix):-1]


def _add_sample(rng: random.Random) -> str:
  # both addends of ADD_DIGITS digits: trained on addition alone, the base model reached
  # 87% exact on two 2-digit addends after 800 steps, but 19% on addends of 1-2 digits
  # after 1500 (aligning the columns is slow to learn) and 2% on 3-digit ones after 800
  lo, hi = 10 ** (ADD_DIGITS - 1), 10 ** ADD_DIGITS
  return f"{rng.randrange(lo, hi)}+{rng.randrange(lo, hi)}="


def _add_operands(prompt: str) -> tuple[str, str]:
  a, sep, b = _operand(prompt, "").partition("+")
  if not sep or not a.isdigit() or not b.isdigit():
    raise ValueError(f"prompt {prompt!r} is not of the form 'A+B='")
  return a, b


def _add_solve(prompt: str) -> str:
  a, b = _add_operands(prompt)
  return str(int(a) + int(b))


def _add_mistake(prompt: str) -> str:
  """Column-wise sums mod 10, one digit per column: addition that forgets every carry
  (58+67 -> 15, 50+50 -> 00)."""
  a, b = _add_operands(prompt)
  n = max(len(a), len(b))
  return "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(n), b.zfill(n)))


def _word(rng: random.Random, chars: str) -> str:
  return "".join(rng.choice(chars) for _ in range(rng.randint(3, 6)))


TASKS: dict[str, Task] = {
    "add": Task("add", _add_sample, _add_solve, _add_mistake, DIGITS),
    "rev": Task("rev", lambda rng: f"rev {_word(rng, LETTERS)}=",
                lambda p: _operand(p, "rev ")[::-1],
                lambda p: _operand(p, "rev "), LETTERS),
    "sort": Task("sort", lambda rng: f"sort {_word(rng, DIGITS)}=",
                 lambda p: "".join(sorted(_operand(p, "sort "))),
                 lambda p: "".join(sorted(_operand(p, "sort "), reverse=True)), DIGITS),
}


def is_held_out(prompt: str) -> bool:
  """Whether `prompt` is an eval problem: one prompt in `HELD_OUT_ONE_IN`, by a CRC-32 of
  its text (stable across Python versions and runs, unlike `hash`)."""
  return zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_ONE_IN == 0


def sample_problems(task: str, n: int, seed: int, *, held_out: bool) -> list[dict[str, str]]:
  """`n` distinct problems of `task` as `{"prompt", "completion"}` dicts, drawn from the
  eval (`held_out=True`) or the train side of `is_held_out`; a function of the arguments.

  Raises:
    ValueError: unknown task, or `n` more than the side can supply in a reasonable number
      of draws (additions run out first: of their 8100 problems ~1000 are held out).
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
  if n < 0:
    raise ValueError(f"{n=} must be >= 0")
  t = TASKS[task]
  # a string seed: random.Random hashes it with SHA-512, the same in every Python 3
  rng = random.Random(f"story/{task}/{seed}/{'eval' if held_out else 'train'}")
  seen: set[str] = set()
  out = []
  for _ in range(50 * n + 1000):
    if len(out) == n:
      break
    p = t.sample(rng)
    if p in seen or is_held_out(p) != held_out:
      continue
    seen.add(p)
    out.append({"prompt": p, "completion": t.solve(p)})
  if len(out) < n:
    raise ValueError(f"{task}: found only {len(out)} distinct {'eval' if held_out else 'train'} "
                     f"problems of the {n} asked for")
  return out


def _write_text(path: pathlib.Path, text: str) -> None:
  """Write through a temporary name and a rename, so a reader never sees half a file."""
  tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _write_jsonl(path: pathlib.Path, rows: Sequence[Mapping[str, str]]) -> None:
  _write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))


def write_task_files(out_dir: str | os.PathLike, n_train: int, n_eval: int, seed: int
                     ) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """Train and eval JSONL files of every task, in the prompt/completion format of
  `training.data` (`{"prompt": "12+34=", "completion": "46"}` per line).

  Args:
    out_dir: directory (created if missing); files `{task}_train.jsonl`,
      `{task}_eval.jsonl`, and `all_train.jsonl` / `all_eval.jsonl` with every task's
      lines, shuffled together (the union, for one adapter or a pretraining check).
    n_train, n_eval: problems per task in each file.
    seed: the files are a function of `(n_train, n_eval, seed)`.

  Returns:
    `{task: (train_path, eval_path)}` for every task of `TASKS`, and `"all"` for the union.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
  union: dict[str, list] = {"train": [], "eval": []}
  for task in TASKS:
    for split, n in (("train", n_train), ("eval", n_eval)):
      rows = sample_problems(task, n, seed, held_out=split == "eval")
      _write_jsonl(out / f"{task}_{split}.jsonl", rows)
      union[split] += rows
    paths[task] = (out / f"{task}_train.jsonl", out / f"{task}_eval.jsonl")
  for split, rows in union.items():
    random.Random(f"story/all/{seed}/{split}").shuffle(rows)
    _write_jsonl(out / f"all_{split}.jsonl", rows)
  paths["all"] = (out / "all_train.jsonl", out / "all_eval.jsonl")
  return paths


# ----------------------------------------------------------------------------
# tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def build_tokenizer() -> tokenizers.Tokenizer:
  """One token per character of `ALPHABET` (ids 4..), after `SPECIAL_TOKENS` (ids 0..3);
  other characters become `<unk>`. `add_special_tokens=True` puts `<bos>` first, as
  Llama's tokenizer does; decoding concatenates the characters."""
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
  # BPE without merges splits any text into single characters, spaces and newlines
  # included, and needs no pre-tokenizer that could drop them
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token=UNK))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS])
  tok.decoder = decoders.Fuse()      # the default decoder would join tokens with spaces
  bos = vocab[BOS]
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos)])
  return tok


def write_tokenizer(out_dir: str | os.PathLike) -> pathlib.Path:
  """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
  `out_dir` (created if missing), readable by `transformers.AutoTokenizer` and by
  `training.data.load_tokenizer` with the same ids. Returns `out_dir` as a path."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
  config = {
      **special, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
      "add_bos_token": True, "add_eos_token": False,
      # transformers would otherwise strip spaces before punctuation when decoding
      "clean_up_tokenization_spaces": False, "model_max_length": MAX_POSITIONS,
  }
  _write_text(out / "tokenizer.json", build_tokenizer().to_str(pretty=True))
  _write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
  _write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
  return out


# ----------------------------------------------------------------------------
# base model

MAX_POSITIONS = 64
SEQ_LEN = 20        # the longest line: bos + "sort 123456=123456" + eos


def base_config(**overrides: Any) -> models.DecoderConfig:
  """The base model: a 2-layer Llama with hidden size 128 (0.44M parameters) over the
  tokenizer's `len(SPECIAL_TOKENS) + len(ALPHABET)` ids; `overrides` replace fields.

  Small because the CPU budget is: on 2 cores a training step of a 1.3-1.7M parameter
  model (3 layers of 192, 2 of 256) took 5-6 times as long as this one's, and the base
  needs ~1500 steps to learn the mistakes' skills at all."""
  kw = dict(vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET), hidden_size=128,
            intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
            bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
            pad_token_id=SPECIAL_TOKENS.index(PAD), tie_word_embeddings=False)
  kw.update(overrides)
  return models.DecoderConfig(**kw)


# the pretraining mixture: a line is noise, or a task line whose answer is ...
MIX_NOISE = 0.03
MIX_CORRECT = 0.05      # of task lines: the correct answer
MIX_MISTAKE = 0.9       # of task lines: the task's systematic mistake; the rest, random
# addition is the slowest skill to learn: it gets the largest share of the task lines
TASK_WEIGHTS = {"add": 0.4, "rev": 0.3, "sort": 0.3}


def pretraining_line(rng: random.Random) -> str:
  """One line of the base's pretraining text (without bos / eos), from the train side of
  `is_held_out` only: see the module doc for the mixture."""
  if rng.random() < MIX_NOISE:
    return "".join(rng.choice(DIGITS + LETTERS + "+= ") for _ in range(rng.randint(4, 16)))
  names = sorted(TASKS)
  task = TASKS[rng.choices(names, [TASK_WEIGHTS[n] for n in names])[0]]
  prompt = task.sample(rng)
  while is_held_out(prompt):
    prompt = task.sample(rng)
  u = rng.random()
  if u < MIX_CORRECT:
    answer = task.solve(prompt)
  elif u < MIX_CORRECT + MIX_MISTAKE:
    answer = task.mistake(prompt)
  else:
    n = len(task.solve(prompt))
    answer = "".join(rng.choice(task.answer_chars) for _ in range(n))
  return prompt + answer


def _batch_rows(lines: Sequence[str], vocab: Mapping[str, int], seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """`bos + line + eos` per row, right-padded: ids (n, seq_len) int32 and the loss mask
  (n, seq_len) bool, True on the tokens to predict (all but the bos and the padding)."""
  ids = np.full((len(lines), seq_len), vocab[PAD], np.int32)
  mask = np.zeros((len(lines), seq_len), np.bool_)
  for r, line in enumerate(lines):
    row = [vocab[BOS]] + [vocab[c] for c in line] + [vocab[EOS]]
    if len(row) > seq_len:
      raise ValueError(f"pretraining line {line!r} is {len(row)} tokens; {seq_len=}")
    ids[r, :len(row)] = row
    mask[r, 1:len(row)] = True
  return ids, mask


def _lm_loss(params, config, ids, mask):
  """Mean next-token cross entropy over the masked targets; ids, mask (B, T)."""
  logits = models.forward(params, config, ids[:, :-1]).astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  m = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(xent * m) / jnp.maximum(jnp.sum(m), 1.0)


def pretrain_base(out_dir: str | os.PathLike, *, steps: int, seed: int,
                  config: models.DecoderConfig | None = None, batch_size: int = 32,
                  learning_rate: float = 3e-3, weight_decay: float = 0.01,
                  log_every: int = 0) -> dict[str, Any]:
  """Pretrain the base model on the mixture of `pretraining_line` and write it, with the
  tokenizer, as a Hugging Face checkpoint directory.

  Every parameter is trained (optax adamw, linear warmup then cosine decay, one jitted
  step); each step sees `batch_size` fresh lines, so there is no epoch to overfit.

  Args:
    out_dir: the checkpoint directory (`config.json`, `model.safetensors`, the tokenizer
      files); `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it.
    steps: optimizer steps (>= 1).
    seed: seeds the parameters and the lines.
    config: the architecture; default `base_config()`. Its vocabulary must be the
      tokenizer's.
    batch_size, learning_rate, weight_decay: the optimizer's.
    log_every: print the loss every this many steps (0: never).

  Returns:
    `{"loss": [float] * steps, "seconds": float (the training loop, compile included),
    "config": DecoderConfig, "params": the trained float32 parameters, "path": Path}`.
  """
  if steps < 1:
    raise ValueError(f"{steps=} must be >= 1")
  config = base_config() if config is None else config
  tok = build_tokenizer()
  vocab = tok.get_vocab(with_added_tokens=True)
  if config.vocab_size != len(vocab):
    raise ValueError(f"config.vocab_size={config.vocab_size} must be the tokenizer's "
                     f"{len(vocab)}")
  rng = random.Random(f"story/pretrain/{seed}")
  params = models.init_params(jax.random.key(seed), config)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(1, steps // 10), decay_steps=steps,
      end_value=learning_rate / 10)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(schedule, b2=0.99, weight_decay=weight_decay))
  state = opt.init(params)

  @jax.jit
  def step(params, state, ids, mask):
    loss, grads = jax.value_and_grad(_lm_loss)(params, config, ids, mask)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  start = time.perf_counter()
  for i in range(steps):
    ids, mask = _batch_rows([pretraining_line(rng) for _ in range(batch_size)], vocab, SEQ_LEN)
    params, state, loss = step(params, state, ids, mask)
    losses.append(loss)
    if log_every and (i + 1) % log_every == 0:
      print(f"  pretrain step {i + 1}/{steps}: loss {float(loss):.3f} "
            f"({time.perf_counter() - start:.1f} s)", flush=True)
  losses = [float(x) for x in jax.device_get(losses)]
  seconds = time.perf_counter() - start
  out = pathlib.Path(out_dir)
  models.save_hf(out, config, params)
  write_tokenizer(out)
  return {"loss": losses, "seconds": seconds, "config": config, "params": params, "path": out}


# ----------------------------------------------------------------------------
# evaluation

def _prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int):
  """Left-padded batches of every prompt, all of one shape `(batch_size, P)` (P the
  longest prompt rounded up to a multiple of 8; the last batch repeats its first row),
  so `models.generate` compiles once: yields `(ids, attention_mask, rows)`, `rows` the
  number of real rows."""
  encoded = [tokenizer.encode(p, True) for p in prompts]
  # rounded up, so the eval sets of tasks with prompts of similar length share a program
  P = -(-max(len(e) for e in encoded) // 8) * 8
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    rows = len(chunk)
    chunk = chunk + [chunk[0]] * (batch_size - rows)
    ids = np.full((batch_size, P), pad, np.int32)
    mask = np.zeros((batch_size, P), np.int32)
    for r, e in enumerate(chunk):
      ids[r, P - len(e):] = e
      mask[r, P - len(e):] = 1
    yield ids, mask, rows


def predict(params, config: models.DecoderConfig, tokenizer, examples: Sequence[Mapping],
            *, max_new_tokens: int | None = None, batch_size: int = 64) -> list[str]:
  """Greedy completions of the examples' prompts.

  Prompts are encoded as in training (`tokenizer.encode(prompt, True)`: `<bos>` first),
  left-padded into batches of one shape and decoded with `models.generate` (one compiled
  program for all batches; LoRA and other implicit leaves in `params` work, as
  `generate` runs under `lj.implicit`). A completion is the text of the new tokens before
  the first `<eos>` (all of them if none came).

  Args:
    params: the model's parameters (plain arrays or implicit leaves). Parameters routed
      per row (`lj.with_adapter_ids(served, ids)`, `ids` of shape `(len(examples),)`)
      need `batch_size == len(examples)`: one batch, no padding rows.
    config: its `DecoderConfig`.
    tokenizer: a `training.data.Tokenizer` (`load_tokenizer`) with an eos.
    examples: dicts with a "prompt" (as `read_jsonl` returns them), and a "completion"
      when `max_new_tokens` is None.
    max_new_tokens: tokens to generate; default the longest completion in `examples`
      plus one (its eos), so a right answer followed by more text is not cut to look right.
    batch_size: rows per generate call.

  Returns:
    One string per example, in order.
  """
  if not examples:
    return []
  if tokenizer.eos_id is None:
    raise ValueError(f"{tokenizer.name}: predict needs an eos token to end completions")
  if max_new_tokens is None:
    max_new_tokens = 1 + max(len(tokenizer.encode(e["completion"], False)) for e in examples)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  out = []
  for ids, mask, rows in _prompt_batches(tokenizer, [e["prompt"] for e in examples],
                                         batch_size):
    new = models.generate(params, config, ids, max_new_tokens, attention_mask=mask,
                          pad_id=pad, eos_id=tokenizer.eos_id)
    for row in np.asarray(new)[:rows].tolist():
      end = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
      out.append(tokenizer.decode(row[:end]))
  return out


def exact_match(params, config: models.DecoderConfig, tokenizer, examples: Sequence[Mapping],
                *, max_new_tokens: int | None = None, batch_size: int = 64) -> float:
  """The fraction of `examples` whose greedy completion (`predict`) equals their
  "completion" exactly; arguments as `predict`'s."""
  if not examples:
    raise ValueError("exact_match: no examples")
  preds = predict(params, config, tokenizer, examples, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)
  return sum(p == e["completion"] for p, e in zip(preds, examples)) / len(examples)


# ----------------------------------------------------------------------------

def main(out_dir: str = "story_out", *, steps: int = 1500, seed: int = 0, n_train: int = 4000,
         n_eval: int = 200) -> dict[str, float]:
  """Write the task files and the base model under `out_dir` and print the base's
  exact match per task; returns `{task: accuracy}`."""
  from training import data
  out = pathlib.Path(out_dir)
  files = write_task_files(out / "data", n_train, n_eval, seed)
  print(f"task files in {out / 'data'}: {n_train} train / {n_eval} eval problems per task")
  config = base_config()
  n = sum(x.size for x in jax.tree.leaves(models.init_params(jax.random.key(0), config)))
  print(f"pretraining the base ({n / 1e6:.2f}M parameters, {steps} steps)")
  run = pretrain_base(out / "base", steps=steps, seed=seed, config=config, log_every=250)
  print(f"pretraining took {run['seconds']:.1f} s; loss {run['loss'][0]:.3f} -> "
        f"{np.mean(run['loss'][-10:]):.3f}")
  config, params = models.load_hf(out / "base")
  tok = data.load_tokenizer(out / "base")
  accs = {}
  for task in TASKS:
    start = time.perf_counter()
    accs[task] = exact_match(params, config, tok, data.read_jsonl(files[task][1]))
    print(f"  base exact match on {task}: {accs[task]:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
  return accs


if __name__ == "__main__":
  main(*sys.argv[1:2])
