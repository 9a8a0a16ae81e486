"""The model families the decoder reads, as data (mergekit keeps its architectures as
data files, `mergekit/_data/architectures/*.json`; this is the same kind of table).

A `Family` says, for one Hugging Face `model_type`:

- `architectures`: what `config.json` names the causal-LM class (written by `save_hf`);
- `features`: the decoder options this family always has (`qkv_bias`: biases on
  q/k/v but not o; `qk_norm`: RMSNorm of each query / key head before the rotation;
  `norm_offset`: Gemma's `(1 + w)` RMSNorm in float32; `embed_scale`: embeddings times
  `sqrt(hidden)`; `sandwich_norms`: Gemma 2's norms after attention and around the MLP;
  `fused_projections`: Phi-3's `qkv_proj` and `gate_up_proj` kernels);
- `config_defaults`: the values transformers' config class assumes for keys a
  `config.json` may leave out, where they differ from Llama's;
- `sliding`: how the family's config selects sliding-window layers: "none", "all"
  (Mistral: every layer when `sliding_window` is set), "max_window_layers" (Qwen2/3:
  with `use_sliding_window`, the layers from `max_window_layers` on), "alternate"
  (Gemma 2: layers 0, 2, 4, ...), or "pattern" (Gemma 3: every layer but each
  `sliding_window_pattern`-th, default 6), unless the config lists `layer_types` itself;
- `per_layer_rope`: `rope_parameters` per layer type (Gemma 3: the sliding layers
  have their own rope, `DecoderConfig.local_rope`);
- `names`: its table of Hugging Face tensor names to parameter paths, the one the
  checkpoint reader, PEFT adapter I/O, bnb-4bit and compressed-tensors loading and
  `lora-jax merge` use (`checkpoint.NameTable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax import checkpoint


@dataclasses.dataclass(frozen=True)
class Experts:
  """How a family's checkpoints store routed experts: `{prefix}.experts.{e}.{name}.weight`
  for each of the (gate, up, down) projection `names`, the router at `{prefix}.gate`;
  `count_key` is config.json's number of experts.

  PEFT adapters name modules as transformers 5 holds them in memory, which is not the
  checkpoint's layout: the router is `model.layers.{layer}.mlp.gate` (a module with a
  `weight` parameter, not a Linear) and the experts are one module
  `model.layers.{layer}.mlp.experts` holding the 3-D parameters `peft_params`
  (`(experts, out, in)` each, PyTorch's Linear layout per expert), in the order the
  module registers them: PEFT wraps targeted parameters in that order, the first
  innermost. Our paths are `layers/{layer}/mlp/experts/<param>` `(experts, in, out)`."""
  prefix: str
  names: tuple[str, str, str]
  count_key: str
  writes_norm_topk_prob: bool = False
  peft_module: str = "model.layers.{layer}.mlp.experts"
  peft_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
  peft_router: str = "model.layers.{layer}.mlp.gate"


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architectures: tuple[str, ...]
  names: checkpoint.NameTable
  features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sliding: str = "none"
  experts: Experts | None = None
  per_layer_rope: bool = False
  # config.json keys this family reads and writes beyond the shared ones (the
  # soft-capping / query scalar options are read only by families that list them)
  writes: tuple[str, ...] = ()


def _qk_norm_names() -> checkpoint.NameTable:
  """Llama's table with Qwen3's per-head norms in front (the first match wins, and a
  `{norm}` placeholder would match q_proj too, so the two are spelled out)."""
  pairs = tuple((f"model.layers.{{layer}}.self_attn.{n}", f"layers/{{layer}}/self_attn/{n}/scale")
                for n in ("q_norm", "k_norm"))
  return checkpoint.NameTable(modules=pairs + checkpoint.LLAMA.modules,
                              ignore=checkpoint.LLAMA.ignore)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", ("LlamaForCausalLM",), checkpoint.LLAMA,
           writes=("attention_bias", "mlp_bias", "pretraining_tp")),
    Family("mistral", ("MistralForCausalLM",), checkpoint.LLAMA,
           config_defaults={"sliding_window": 4096, "max_position_embeddings": 131072,
                            "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
           sliding="all"),
    Family("qwen2", ("Qwen2ForCausalLM",), checkpoint.LLAMA, features={"qkv_bias": True},
           config_defaults={"sliding_window": 4096, "max_window_layers": 28,
                            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
           sliding="max_window_layers"),
    Family("qwen3", ("Qwen3ForCausalLM",), _qk_norm_names(), features={"qk_norm": True},
           config_defaults={"sliding_window": 4096, "max_window_layers": 28,
                            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
           sliding="max_window_layers", writes=("attention_bias",)),
    Family("gemma", ("GemmaForCausalLM",), checkpoint.LLAMA,
           features={"norm_offset": True, "embed_scale": True},
           config_defaults={"hidden_act": "gelu_pytorch_tanh", "head_dim": 256,
                            "tie_word_embeddings": True, "max_position_embeddings": 8192,
                            "rms_norm_eps": 1e-6}, writes=("attention_bias",)),
    Family("gemma2", ("Gemma2ForCausalLM",), checkpoint.LLAMA,
           features={"norm_offset": True, "embed_scale": True, "sandwich_norms": True},
           config_defaults={"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
                            "tie_word_embeddings": True, "max_position_embeddings": 8192,
                            "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
                            "sliding_window": 4096, "final_logit_softcapping": 30.0,
                            "attn_logit_softcapping": 50.0},
           sliding="alternate",
           writes=("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                   "final_logit_softcapping", "hidden_activation")),
    Family("gemma3_text", ("Gemma3ForCausalLM",), _qk_norm_names(),
           features={"norm_offset": True, "embed_scale": True, "sandwich_norms": True,
                     "qk_norm": True},
           config_defaults={"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
                            "tie_word_embeddings": True, "max_position_embeddings": 131072,
                            "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
                            "sliding_window": 4096, "final_logit_softcapping": None,
                            "attn_logit_softcapping": None, "rope_theta": 1_000_000.0,
                            "rope_local_base_freq": 10_000.0, "bos_token_id": 2,
                            "eos_token_id": 1, "pad_token_id": 0},
           sliding="pattern", per_layer_rope=True,
           writes=("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                   "final_logit_softcapping", "hidden_activation",
                   "use_bidirectional_attention")),
    Family("phi3", ("Phi3ForCausalLM",), checkpoint.LLAMA,
           features={"fused_projections": True},
           config_defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                            "sliding_window": None}, sliding="all"),
    Family("mixtral", ("MixtralForCausalLM",), checkpoint.NameTable(
               modules=(("model.layers.{layer}.block_sparse_moe.gate",
                         "layers/{layer}/mlp/gate/kernel"),) + checkpoint.LLAMA.modules,
               ignore=checkpoint.LLAMA.ignore),
           experts=Experts("model.layers.{layer}.block_sparse_moe", ("w1", "w3", "w2"),
                           "num_local_experts"),
           config_defaults={"sliding_window": None, "max_position_embeddings": 131072,
                            "rms_norm_eps": 1e-5, "rope_theta": 1e6},
           sliding="all"),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), _qk_norm_names(), features={"qk_norm": True},
           experts=Experts("model.layers.{layer}.mlp", ("gate_proj", "up_proj", "down_proj"),
                           "num_experts", writes_norm_topk_prob=True),
           config_defaults={"sliding_window": 4096, "max_window_layers": 28,
                            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                            "norm_topk_prob": False},
           sliding="max_window_layers", writes=("attention_bias",)),
)}


def family(model_type: str, where: str = "config.json") -> Family:
  """The `Family` of a `model_type`; an unknown one is an error listing the known ones."""
  f = FAMILIES.get(model_type)
  if f is None:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model "
                     f"types: {', '.join(sorted(FAMILIES))}")
  return f


__all__ = ["Experts", "FAMILIES", "Family", "family"]
