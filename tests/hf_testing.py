"""A tiny random Hugging Face Llama for the tests that run PEFT / transformers (import
after `pytest.importorskip("transformers")`)."""

import numpy as np
import torch
import transformers

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
IDS = np.random.RandomState(0).randint(0, 128, (2, 12))


def hf_base(path, seed=0, **over):
  """Save a random `LlamaForCausalLM` (TINY, with `over`) to `path`; returns `path`.
  Kernels ~ N(0, 0.1^2), norm scales ~ U(0.5, 1.5) so that no weight is trivial."""
  torch.manual_seed(seed)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **over})).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0.0, 0.1) if p.ndim == 2 else p.uniform_(0.5, 1.5)
  m.save_pretrained(str(path), safe_serialization=True)
  return path


def load_base(path):
  return transformers.LlamaForCausalLM.from_pretrained(
      str(path), attn_implementation="eager").eval()


def logits(m, ids=IDS):
  with torch.no_grad():
    return m(torch.tensor(ids)).logits.numpy()
