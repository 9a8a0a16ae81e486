"""`lora-jax train`: LoRA fine-tuning of a Hugging Face checkpoint from a config file.

- `training.config`: the YAML config (`TrainConfig`; unknown keys are errors).
- `training.data`: JSONL files to packed, shuffled, resumable batches (a Hugging Face
  tokenizer directory, chat templates rendered as transformers' `apply_chat_template`,
  loss masks on completions / assistant turns).
- `training.loss`: the chunked cross-entropy.
- `training.checkpoints`: orbax checkpoints of adapter, optimizer state and data position.
- `training.trainer`: `train(config)`, the run itself; `training.cli` its command line.
"""

from training.config import TrainConfig, load_config
from training.trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
