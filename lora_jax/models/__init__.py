"""Reference models as pure functions over parameter pytrees.

`from lora_jax import models`: `config, params = models.load_hf(path)` reads a Hugging
Face checkpoint of any family in `models.FAMILIES` (dispatching on `model_type`);
`models.forward`, `models.generate` and `models.save_hf` run and write it. The families
are data (`lora_jax.models.families`) over one decoder (`lora_jax.models.decoder`);
`from lora_jax.models import llama` keeps the Llama names (`llama.LlamaConfig`).
"""

from lora_jax.models import decoder, llama
from lora_jax.models.decoder import (DecoderConfig, cached_forward, forward, generate,
                                     hidden_states,
                                     init_params, load_hf, logits_from_hidden, names, save_hf,
                                     stack_layers, unstack_layers)
from lora_jax.models.families import FAMILIES, Family, family

__all__ = ["DecoderConfig", "FAMILIES", "Family", "decoder", "family", "forward", "generate",
           "cached_forward", "hidden_states", "init_params", "logits_from_hidden", "llama", "load_hf", "names", "save_hf", "stack_layers",
           "unstack_layers"]
