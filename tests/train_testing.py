"""A tiny Hugging Face model directory (Llama + a character-level tokenizer with a chat
template) and JSONL data, built in code for the `lora-jax train` tests."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, processors, decoders

from lora_jax import models

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.,")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + "
        "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def write_tokenizer(root: pathlib.Path) -> None:
  vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
  tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tok.add_special_tokens(SPECIALS)
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
  tok.decoder = decoders.Fuse()
  tok.save(str(root / "tokenizer.json"))
  (root / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
      "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
      "chat_template": CHAT}))


def make_base(root: pathlib.Path, *, seed: int = 0, hidden: int = 32, layers: int = 2,
              model_type: str = "llama") -> pathlib.Path:
  """A random tiny model of `model_type` with the character tokenizer, as a HF dir."""
  root.mkdir(parents=True, exist_ok=True)
  write_tokenizer(root)
  cfg = models.DecoderConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, model_type=model_type)
  params = models.init_params(jax.random.key(seed), cfg)
  models.save_hf(root, cfg, params)
  return root


def write_data(path: pathlib.Path, n: int, seed: int = 0, kind: str = "prompt") -> pathlib.Path:
  """`n` addition problems as prompt/completion (or chat) JSONL lines."""
  rng = np.random.RandomState(seed)
  lines = []
  for _ in range(n):
    a, b = rng.randint(0, 50, 2)
    if kind == "prompt":
      lines.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    elif kind == "chat":
      lines.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                 {"role": "assistant", "content": str(a + b)}]})
    else:
      lines.append({"text": f"{a}+{b}={a + b}"})
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` host devices, and the suite's cheap
  compile flags (conftest.FAST_COMPILE) kept, so a child compiles as fast as the suite."""
  import os
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])
