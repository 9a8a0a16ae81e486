"""lora-jax: LoRA, QLoRA, model merging and multi-LoRA serving as pytree transformations."""

from lora_jax import _batch_slicing  # noqa: F401  (registers the batch-axis slicing rules)
from lora_jax import _ragged  # noqa: F401  (LoRA through ragged_dot: routed experts)
from lora_jax._dora import DoraWeight, to_dora
from lora_jax._extract import extract_lora
from lora_jax._implicit import (ImplicitArray, bind, implicit, is_implicit, materialize,
                                materialize_tree, register_dot_rule, register_rule)
from lora_jax._inits import to_standard_lora
from lora_jax._lora import (LoraConfig, combine, init, merge, split, summary,
                            trainable_mask, with_dropout_rng)
from lora_jax._lora_weight import LoraWeight, LowRankWeight, check_factors
from lora_jax._qalora import QALoraWeight
from lora_jax._iec import IecLoraWeight
from lora_jax._loraplus import loraplus, loraplus_labels
from lora_jax import extend  # noqa: F401  (the public seam for leaf authors)
from lora_jax._serving import MultiLoraWeight, set_adapter, stack_adapters, with_adapter_ids
from lora_jax._peft_io import LLAMA_NAME_MAP, load_adapter, save_adapter
from lora_jax._paths import leaves_with_paths, map_with_path, path_str, select_paths
from lora_jax._trainable import Trainable
from lora_jax._sharding import named_shardings, partition_specs, shard

__version__ = "0.1.0"

__all__ = [
    "ImplicitArray", "LoraConfig", "LoraWeight", "LowRankWeight", "register_dot_rule", "extend", "bind", "check_factors", "combine", "extract_lora",
    "implicit", "init", "is_implicit", "leaves_with_paths", "map_with_path",
    "materialize", "materialize_tree", "merge", "path_str", "register_rule",
    "select_paths", "split", "summary", "trainable_mask", "with_dropout_rng",
    "DoraWeight", "to_dora", "LLAMA_NAME_MAP", "load_adapter", "save_adapter",
    "MultiLoraWeight", "stack_adapters", "with_adapter_ids", "set_adapter",
    "partition_specs", "named_shardings", "shard", "to_standard_lora",
    "Trainable", "loraplus", "loraplus_labels", "QALoraWeight", "IecLoraWeight",
]
