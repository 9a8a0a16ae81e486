"""Reference models as pure functions over parameter pytrees.

`from lora_jax.models import llama` gives a Llama-style decoder that loads and
saves Hugging Face safetensors checkpoints (`llama.load_hf` / `llama.save_hf`).
"""

from lora_jax.models import llama

__all__ = ["llama"]
