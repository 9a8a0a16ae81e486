"""The Llama reference model: `lora_jax.models.decoder` under its Llama names.

Kept as the module most code imports (`from lora_jax.models import llama`): every
public name of the decoder is here (it reads and runs every family in
`lora_jax.models.families`: Llama, Mistral, Qwen2, Qwen3), and `LlamaConfig` is
`DecoderConfig`. Module constants (`CAUSAL_BLOCKS`, ...) are the decoder's: change
them on `lora_jax.models.decoder`.
"""

from lora_jax.models import decoder as _decoder

globals().update({k: v for k, v in vars(_decoder).items()
                  if not k.startswith("__") and k != "annotations"})
LlamaConfig = _decoder.DecoderConfig

__all__ = [*_decoder.__all__, "LlamaConfig"]
