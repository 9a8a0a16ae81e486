"""A Llama-style decoder as pure functions over a parameter pytree.

The reference model of lora_jax: RMSNorm, rotary embeddings (`rope_theta`, and the
"linear" and "llama3" `rope_scaling` types), grouped-query attention, a SwiGLU MLP
and optional tied embeddings, with the numerics of Hugging Face's
`transformers.LlamaForCausalLM` (eager attention).

Parameters keep Hugging Face's module names, kernels in the `x @ W` layout
`(in, out)` (PyTorch's `(out, in)` transposed at the boundary):

    embed_tokens/embedding                 (vocab, hidden)
    layers/{i}/self_attn/q_proj/kernel     (hidden, heads * head_dim)   also k_, v_, o_proj
    layers/{i}/self_attn/q_proj/bias       (heads * head_dim,)          if attention_bias
    layers/{i}/mlp/gate_proj/kernel        (hidden, intermediate)       also up_, down_proj
    layers/{i}/input_layernorm/scale       (hidden,)                    + post_attention_layernorm
    norm/scale                             (hidden,)
    lm_head/kernel                         (hidden, vocab)              absent with tied embeddings

`layers` is a list (one dict per layer, run in a Python loop), or, after
`stack_layers`, one dict whose leaves carry a leading layer axis
(`layers/self_attn/q_proj/kernel` of shape `(L, hidden, heads * head_dim)`),
run with `jax.lax.scan`. For LoRA on stacked layers, give the leading axis in
the layout: `lj.LoraConfig(..., layouts=llama.STACKED_LAYOUTS)`.

Every function here is written for plain arrays, so `lj.implicit(llama.forward)`
runs it on LoRA / DoRA / quantized leaves. `DecoderConfig` is a frozen (hashable)
dataclass: pass it as a static argument to `jax.jit` and `lj.implicit` (non-array
leaves are static there).

Example:
  >>> config, params = llama.load_hf("path/to/checkpoint")      # the file's dtype
  >>> logits = llama.forward(params, config, input_ids)         # (batch, seq, vocab)
  >>> tokens = llama.generate(params, config, prompt_ids, 16)   # greedy, (batch, 16)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import checkpoint
from lora_jax._implicit import ImplicitArray, implicit
from lora_jax._platform import per_platform

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
FUSED_ATTN_PROJ = ("qkv_proj", "o_proj")          # Phi-3: q, k, v in one kernel
FUSED_MLP_PROJ = ("gate_up_proj", "down_proj")    # Phi-3: gate and up in one kernel
NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' ACT2FN names; "gelu_pytorch_tanh" is GELU's tanh approximation
ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

# LoRA layouts for stacked (scanned) layers: the leading axis is the layer axis.
STACKED_LAYOUTS = {r"layers/mlp/experts/.*": "llio", r"layers/.*/kernel": "lio"}
# LoRA layouts of routed experts in unrolled layers: one adapter per expert
EXPERT_LAYOUTS = {r"layers/\d+/mlp/experts/.*": "lio"}


# ----------------------------------------------------------------------------
# Config

@dataclasses.dataclass(frozen=True)
class Rope:
  """The rotary embedding of one layer type, with the keys of a Hugging Face
  `rope_parameters` dict (`rope_type`, `rope_theta`; `factor` for "linear", and the
  low / high frequency factors and original context length for "llama3").

  `DecoderConfig.local_rope` holds one for the sliding (local) layers of a family
  whose layer types have their own rope (Gemma 3); frozen, so the config stays hashable.
  """

  rope_type: str = "default"
  rope_theta: float = 10000.0
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"Rope: rope_type {self.rope_type!r} is not supported; expected one "
                       f"of {ROPE_TYPES}")

  @classmethod
  def from_hf(cls, rope: Mapping[str, Any], *, default_theta: float, max_position_embeddings: int,
              where: str = "rope_parameters") -> Rope:
    """From one `rope_parameters` / `rope_scaling` dict (old `type` key too); `where`
    names the dict in errors."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{where}: rope_type {rope_type!r} is not supported; expected one of "
                       f"{ROPE_TYPES}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    orig = rope.get("original_max_position_embeddings")
    if rope_type == "llama3" and orig is None:
      orig = max_position_embeddings
    return cls(rope_type=str(rope_type), rope_theta=float(rope.get("rope_theta", default_theta)),
               factor=float(rope.get("factor", 1.0)),
               low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
               high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
               original_max_position_embeddings=None if orig is None else int(orig))

  def to_hf(self) -> dict[str, Any]:
    """The `rope_parameters` dict transformers reads."""
    out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "linear":
      out["factor"] = self.factor
    elif self.rope_type == "llama3":
      out.update(factor=self.factor, low_freq_factor=self.low_freq_factor,
                 high_freq_factor=self.high_freq_factor,
                 original_max_position_embeddings=self.original_max_position_embeddings)
    return out


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a Llama decoder, with Hugging Face `config.json` names.

  Frozen and hashable so it can be a static argument of `jax.jit`. Build it from
  a `config.json` dict with `DecoderConfig.from_hf(d)`; `to_hf()` gives the dict back.

  The rope scaling of `rope_type="llama3"` uses `rope_factor`,
  `rope_low_freq_factor`, `rope_high_freq_factor` and
  `rope_original_max_position_embeddings`; `"linear"` uses `rope_factor`. These
  `rope_*` fields are the rope of every layer, or, when `local_rope` (a `Rope`) is set,
  of the full-attention layers only: the sliding layers then use `local_rope` (Gemma 3's
  per-layer-type `rope_parameters`). `rope(layer_type)` gives either as a `Rope`.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  model_type: str = "llama"
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  norm_offset: bool = False
  embed_scale: bool = False
  sandwich_norms: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  fused_projections: bool = False
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = True
  local_rope: Rope | None = None

  def __post_init__(self):
    if isinstance(self.local_rope, Mapping):
      object.__setattr__(self, "local_rope", Rope(**self.local_rope))
    if self.local_rope is not None and not isinstance(self.local_rope, Rope):
      raise TypeError(f"DecoderConfig: local_rope must be a Rope (or its fields as a dict), "
                      f"got {type(self.local_rope).__name__}")
    from lora_jax.models.families import family
    family(self.model_type, "DecoderConfig")
    if self.layer_types is not None:
      lt = tuple(str(t) for t in self.layer_types)
      object.__setattr__(self, "layer_types", lt)
      bad = sorted(set(lt) - set(LAYER_TYPES))
      if bad or len(lt) != self.num_hidden_layers:
        raise ValueError(f"DecoderConfig: layer_types must list one of {LAYER_TYPES} per "
                         f"layer ({self.num_hidden_layers}); got {list(lt)}")
      if "sliding_attention" in lt and not self.sliding_window:
        raise ValueError("DecoderConfig: layer_types has sliding_attention layers but "
                         f"sliding_window={self.sliding_window!r}")
    if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"DecoderConfig: num_experts_per_tok={self.num_experts_per_tok} must be "
                       f"in [1, num_experts={self.num_experts}]")
    if self.sliding_window is not None and int(self.sliding_window) < 1:
      raise ValueError(f"DecoderConfig: sliding_window={self.sliding_window!r} must be >= 1")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"DecoderConfig: num_attention_heads={self.num_attention_heads} is not a "
                       f"multiple of num_key_value_heads={self.num_key_value_heads}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"DecoderConfig: rope_type {self.rope_type!r} is not supported; "
                       f"expected one of {ROPE_TYPES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"DecoderConfig: hidden_act {self.hidden_act!r} is not supported; "
                       f"expected one of {tuple(ACTIVATIONS)}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig: head_dim={self.head_dim} must be even for rotary embeddings")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> DecoderConfig:
    """From a Hugging Face `config.json` dict (old `rope_scaling` or new `rope_parameters`)."""
    if not isinstance(d, Mapping):
      raise TypeError("DecoderConfig.from_hf: expected a dict from config.json, got "
                      f"{type(d).__name__}")
    from lora_jax.models.families import family
    mt = d.get("model_type", "llama")
    fam = family(str(mt), "DecoderConfig.from_hf")
    # keys the file leaves out take the family's transformers defaults
    d = {**fam.config_defaults, **d}
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"DecoderConfig.from_hf: config.json lacks {missing}")
    if d.get("use_bidirectional_attention"):
      raise ValueError("DecoderConfig.from_hf: config.json sets use_bidirectional_attention="
                       f"{d['use_bidirectional_attention']!r} (bidirectional attention, as in "
                       "EmbeddingGemma); the decoder is causal only: not supported")
    max_pos = int(d.get("max_position_embeddings", 2048))
    local_rope = None
    if fam.per_layer_rope:
      rope, local_rope = _per_layer_ropes(d, max_pos)
    else:
      rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
      if rope and all(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError("DecoderConfig.from_hf: per-layer-type rope_parameters are not "
                         f"supported for model_type {mt!r}")
      if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("DecoderConfig.from_hf: partial_rotary_factor != 1 is not supported")
      rope = Rope.from_hf(rope, default_theta=d.get("rope_theta", 10000.0),
                          max_position_embeddings=max_pos,
                          where="DecoderConfig.from_hf: config.json rope_parameters")
    kw = dict(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=rope.rope_theta,
        rope_type=rope.rope_type, rope_factor=rope.factor,
        rope_low_freq_factor=rope.low_freq_factor, rope_high_freq_factor=rope.high_freq_factor,
        rope_original_max_position_embeddings=rope.original_max_position_embeddings,
        max_position_embeddings=max_pos, local_rope=local_rope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act=str(d.get("hidden_activation") or d.get("hidden_act") or "silu"),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), model_type=str(mt), **dict(fam.features),
        **{k: (None if d.get(k) is None else float(d[k])) for k in _FLOAT_OPTIONS
           if k in fam.writes})
    if kw["hidden_act"] == "gelu" and fam.features.get("norm_offset"):
      kw["hidden_act"] = "gelu_pytorch_tanh"      # Gemma's config maps "gelu" so
    kw["sliding_window"], kw["layer_types"] = _sliding_layers(d, fam.sliding,
                                                             int(kw["num_hidden_layers"]))
    if fam.experts is not None:
      kw.update(_moe_options(d, fam))
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """A `config.json` dict that the family's transformers config class reads."""
    rope = self.rope().to_hf()
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    from lora_jax.models.families import family
    fam = family(self.model_type)
    out = {
        "architectures": list(fam.architectures), "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if self.rope_type == "default" else dict(rope),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
        "hidden_act": self.hidden_act, "bos_token_id": self.bos_token_id,
        "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True,
    }
    if fam.sliding == "all":
      out["sliding_window"] = self.sliding_window
    elif fam.sliding == "max_window_layers":
      types = self.layer_types or ("full_attention",) * self.num_hidden_layers
      out.update(use_sliding_window="sliding_attention" in types,
                 sliding_window=self.sliding_window, layer_types=list(types))
    elif fam.sliding in ("alternate", "pattern"):
      out.update(sliding_window=self.sliding_window,
                 layer_types=list(self.layer_types or ("full_attention",) * self.num_hidden_layers))
    for k in {"attention_bias", "mlp_bias", "pretraining_tp"} - set(fam.writes):
      out.pop(k)
    for k in _FLOAT_OPTIONS:
      if k in fam.writes:
        v = getattr(self, k)
        # transformers types query_pre_attn_scalar as an int
        out[k] = int(v) if k == "query_pre_attn_scalar" and v is not None and v == int(v) else v
    if "hidden_activation" in fam.writes:
      out["hidden_activation"] = self.hidden_act
    if self.num_experts:
      out.update({fam.experts.count_key: self.num_experts,
                  "num_experts_per_tok": self.num_experts_per_tok})
      if self.moe_intermediate_size is not None:
        out["moe_intermediate_size"] = self.moe_intermediate_size
      if fam.experts.writes_norm_topk_prob:
        out["norm_topk_prob"] = self.norm_topk_prob
    if "use_bidirectional_attention" in fam.writes:
      out["use_bidirectional_attention"] = False
    if fam.per_layer_rope:
      # Gemma 3: rope_parameters per layer type; the old keys (rope_theta of the global
      # layers, rope_local_base_freq, rope_scaling) too, for older transformers
      local = self.rope("sliding_attention")
      out.update(rope_parameters={"full_attention": rope, "sliding_attention": local.to_hf()},
                 rope_local_base_freq=local.rope_theta)
    return out

  def rope(self, layer_type: str = "full_attention") -> Rope:
    """The `Rope` of a layer type: `local_rope` for "sliding_attention" when it is set,
    else the `rope_*` fields."""
    if layer_type not in LAYER_TYPES:
      raise ValueError(f"DecoderConfig.rope: layer_type {layer_type!r} is not one of {LAYER_TYPES}")
    if layer_type == "sliding_attention" and self.local_rope is not None:
      return self.local_rope
    return Rope(self.rope_type, self.rope_theta, self.rope_factor, self.rope_low_freq_factor,
                self.rope_high_freq_factor, self.rope_original_max_position_embeddings)

  def layer_type(self, layer: int) -> str:
    """"sliding_attention" or "full_attention" for `layer`."""
    return "full_attention" if self.window(layer) is None else "sliding_attention"

  def window(self, layer: int) -> int | None:
    """The sliding window of `layer` (query i sees keys `i - window < j <= i`), or None."""
    if self.layer_types is not None:
      return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
    return self.sliding_window


_FLOAT_OPTIONS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


def _moe_options(d: Mapping[str, Any], fam) -> dict:
  """The routed-expert fields of a Mixtral / Qwen3-MoE `config.json`."""
  n = d.get("num_local_experts", d.get("num_experts"))
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"{fam.model_type}: num_local_experts / num_experts must be a positive "
                     f"int, got {n!r}")
  if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1:
    raise ValueError(f"{fam.model_type}: dense MLP layers between the sparse ones "
                     f"(mlp_only_layers={d.get('mlp_only_layers')!r}, decoder_sparse_step="
                     f"{d.get('decoder_sparse_step')!r}) are not supported yet; every layer "
                     "must be a sparse MoE block")
  return dict(num_experts=n, num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
              moe_intermediate_size=d.get("moe_intermediate_size"),
              norm_topk_prob=bool(d.get("norm_topk_prob", True)))
def _per_layer_ropes(d: Mapping[str, Any], max_pos: int) -> tuple[Rope, Rope]:
  """(full-attention rope, sliding-attention rope) of a Gemma 3 config.json, read as
  `Gemma3TextConfig` does: `rope_parameters` per layer type, or the old keys
  (`rope_theta` and `rope_scaling` for the global layers, `rope_local_base_freq` for the
  local ones), a missing theta taking the family default."""
  where = "DecoderConfig.from_hf: config.json rope_parameters"
  rp = d.get("rope_parameters")
  if rp is None:
    rp = {}
  if not isinstance(rp, Mapping) or not all(isinstance(v, Mapping) or v is None
                                            for v in rp.values()):
    raise ValueError(f"{where} must map layer types {LAYER_TYPES} to rope parameters for "
                     f"model_type {d.get('model_type')!r}; got {rp!r}")
  unknown = sorted(set(rp) - set(LAYER_TYPES))
  if unknown:
    raise ValueError(f"{where}: unknown layer types {unknown}; expected {LAYER_TYPES}")
  per = {t: dict(rp.get(t) or {}) for t in LAYER_TYPES}
  scaling = d.get("rope_scaling")
  if isinstance(scaling, Mapping):
    per["full_attention"].update(scaling)
  per["full_attention"].setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
  per["sliding_attention"].setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
  full, local = (Rope.from_hf(per[t], default_theta=per[t]["rope_theta"],
                              max_position_embeddings=max_pos, where=f"{where}[{t!r}]")
                 for t in LAYER_TYPES)
  return full, local


def _sliding_layers(d: Mapping[str, Any], rule: str, n: int):
  """`(sliding_window, layer_types)` from a config.json dict, derived as the family's
  transformers config class does (`Family.sliding`); layer_types is None when every
  layer is of one kind."""
  window, types = d.get("sliding_window"), d.get("layer_types")
  if rule == "none":
    return None, None
  if rule == "all":                        # Mistral: every layer, when set
    return (None if window is None else int(window)), None
  if rule in ("alternate", "pattern"):
    # Gemma 2: even layers (0, 2, ...) slide; Gemma 3: every layer but each
    # `sliding_window_pattern`-th (default 6: 5 local layers, then a global one)
    if types is None:
      every = 2 if rule == "alternate" else int(d.get("sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    types = tuple(types)
    if "sliding_attention" not in types:
      return None, None
    if window is None:
      if rule == "pattern":    # the layer types choose the rope too: keep them, or refuse
        raise ValueError("DecoderConfig.from_hf: config.json has sliding_attention layers but "
                         "sliding_window is null")
      return None, None
    return int(window), types
  if not d.get("use_sliding_window", False):   # Qwen2/3
    window = None
  if types is None:
    first = int(d.get("max_window_layers", n))
    types = ["sliding_attention" if window is not None and i >= first else "full_attention"
             for i in range(n)]
  types = tuple(types)
  if window is None or "sliding_attention" not in types:
    return None, None
  return int(window), types


# ----------------------------------------------------------------------------
# Parameters

def _kernel_shapes(c: DecoderConfig) -> dict[str, tuple[int, int]]:
  """(in, out) of each projection kernel."""
  H, hd = c.hidden_size, c.head_dim
  if c.fused_projections:
    return {"qkv_proj": (H, (c.num_attention_heads + 2 * c.num_key_value_heads) * hd),
            "o_proj": (c.num_attention_heads * hd, H),
            "gate_up_proj": (H, 2 * c.intermediate_size), "down_proj": (c.intermediate_size, H)}
  return {"q_proj": (H, c.num_attention_heads * hd), "k_proj": (H, c.num_key_value_heads * hd),
          "v_proj": (H, c.num_key_value_heads * hd), "o_proj": (c.num_attention_heads * hd, H),
          "gate_proj": (H, c.intermediate_size), "up_proj": (H, c.intermediate_size),
          "down_proj": (c.intermediate_size, H)}


def projections(c: DecoderConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The attention and MLP projection names of one layer (fused for Phi-3)."""
  return (FUSED_ATTN_PROJ, FUSED_MLP_PROJ) if c.fused_projections else (ATTN_PROJ, MLP_PROJ)


def layer_norms(c: DecoderConfig) -> tuple[str, ...]:
  """The RMSNorms of one layer: Llama's two, or Gemma 2's four (a norm after attention
  and one before and after the MLP)."""
  return NORMS + SANDWICH_NORMS if c.sandwich_norms else NORMS


def layer_shapes(c: DecoderConfig) -> dict[tuple, tuple]:
  """Every parameter of one decoder layer: its path inside the layer -> shape."""
  H, lin = c.hidden_size, _kernel_shapes(c)
  out: dict[tuple, tuple] = {(n, "scale"): (H,) for n in layer_norms(c)}
  for grp, names in zip(("self_attn", "mlp"), projections(c)):
    if grp == "mlp" and c.num_experts:
      E, inter = c.num_experts, c.moe_intermediate_size or c.intermediate_size
      out[("mlp", "gate", "kernel")] = (H, E)
      out[("mlp", "experts", "gate_up_proj")] = (E, H, 2 * inter)
      out[("mlp", "experts", "down_proj")] = (E, inter, H)
      continue
    for n in names:
      out[(grp, n, "kernel")] = lin[n]
      bias = (c.mlp_bias if grp == "mlp" else
              c.attention_bias or (c.qkv_bias and n != "o_proj"))
      if bias:
        out[(grp, n, "bias")] = (lin[n][1],)
  if c.qk_norm:
    for n in ("q_norm", "k_norm"):
      out[("self_attn", n, "scale")] = (c.head_dim,)
  return out


def init_params(key: jax.Array, config: DecoderConfig, *, dtype=jnp.float32,
                stacked: bool = False, std: float = 0.02) -> dict:
  """Random parameters: kernels and embeddings ~ N(0, std^2), norm scales 1, biases 0.

  Returns the pytree described in the module docstring (`stacked=True`: one
  dict of layer-stacked leaves).
  """
  c = config
  H = c.hidden_size
  per_layer = layer_shapes(c)
  keys = iter(jax.random.split(key, 2 + len(per_layer) * c.num_hidden_layers))

  def normal(shape):
    return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  def leaf(path, shape):
    kind = path[-1]
    return (normal(shape) if kind in ("kernel", "gate_up_proj", "down_proj")
            else jnp.ones(shape, dtype) if kind == "scale" else jnp.zeros(shape, dtype))

  layers = []
  for _ in range(c.num_hidden_layers):
    lp: dict = {}
    for path, shape in per_layer.items():
      node = lp
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = leaf(path, shape)
    layers.append(lp)
  params = {"embed_tokens": {"embedding": normal((c.vocab_size, H))}, "layers": layers,
            "norm": {"scale": jnp.ones((H,), dtype)}}
  lm = normal((H, c.vocab_size))
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": lm}
  return stack_layers(params) if stacked else params


def is_stacked(params: Mapping[str, Any]) -> bool:
  """True when `params["layers"]` is one dict of layer-stacked leaves."""
  return isinstance(params["layers"], Mapping)


def stack_layers(params: Mapping[str, Any]) -> dict:
  """Unrolled -> stacked: `layers/{i}/...` leaves stacked on a new leading axis.

  Works leaf-wise on any pytree leaves, so stacked LoRA weights come out as
  LoRA weights with a leading layer axis (their metadata must agree).
  """
  if is_stacked(params):
    return dict(params)
  layers = list(params["layers"])
  if not layers:
    raise ValueError("stack_layers: params['layers'] is empty")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "layers": stacked}


def unstack_layers(params: Mapping[str, Any]) -> dict:
  """Stacked -> unrolled: a list of per-layer dicts."""
  if not is_stacked(params):
    return dict(params)
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n)]
  return {**params, "layers": layers}


# ----------------------------------------------------------------------------
# The model

def rope_inv_freq(config: DecoderConfig, layer_type: str = "full_attention") -> np.ndarray:
  """Inverse frequencies `(head_dim // 2,)` float32 of a layer type's rope
  (`config.rope(layer_type)`), as transformers computes them."""
  return _inv_freq(config.rope(layer_type), config.head_dim)


def _inv_freq(rope: Rope, dim: int) -> np.ndarray:
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv = (np.float32(1.0) / np.power(np.float32(rope.rope_theta), exponent)).astype(np.float32)
  if rope.rope_type == "linear":
    inv = (inv / np.float32(rope.factor)).astype(np.float32)
  elif rope.rope_type == "llama3":
    factor = rope.factor
    low, high = rope.low_freq_factor, rope.high_freq_factor
    old = rope.original_max_position_embeddings
    low_wl, high_wl = old / low, old / high
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    inv_l = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
              ).astype(np.float32)
    smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, inv_l).astype(np.float32)
  return inv


def _rope_tables(rope: Rope, head_dim: int, positions: jax.Array, dtype):
  """cos, sin `(batch, seq, head_dim // 2)` for integer `positions` `(batch, seq)`.

  transformers repeats these tables to `head_dim` (`cat([freqs, freqs])`); both
  halves are equal, so half tables carry the same values.
  """
  inv = jnp.asarray(_inv_freq(rope, head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
  return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)


def _apply_rope(x, cos, sin):
  """transformers' `x * cos + rotate_half(x) * sin` on half tables, the same products
  in the same order: `[x1 c - x2 s, x2 c + x1 s]`.

  x: (B, T, heads, hd); cos/sin: (B, T, hd // 2). Built on halves, this never forms
  `rotate_half(x)` or the doubled tables (~6% of a LoRA training step on CPU).
  """
  h = x.shape[-1] // 2
  x1, x2 = x[..., :h], x[..., h:]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """`scale * x / sqrt(mean(x^2) + eps)`, computed in float32 and cast back (as HF)."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = (xf * lax.rsqrt(var + jnp.float32(eps))).astype(x.dtype)
  return jnp.reshape(scale.astype(x.dtype), (1,) * (y.ndim - 1) + scale.shape) * y


def _norm(c: DecoderConfig, x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
  """The family's RMSNorm: Llama's (`scale * normed`, normed cast first), or Gemma's
  `normed * (1 + scale)` all in float32, cast once (transformers' GemmaRMSNorm)."""
  if not c.norm_offset:
    return rms_norm(x, p["scale"], c.rms_norm_eps)
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  w = 1.0 + p["scale"].astype(jnp.float32)
  y = xf * lax.rsqrt(var + jnp.float32(c.rms_norm_eps))
  return (y * jnp.reshape(w, (1,) * (y.ndim - 1) + w.shape)).astype(x.dtype)


def _linear(x, p):
  y = jnp.matmul(x, p["kernel"].astype(x.dtype))
  if "bias" in p:
    y = y + jnp.reshape(p["bias"].astype(y.dtype), (1,) * (y.ndim - 1) + p["bias"].shape)
  return y


# A causal self-attention over at least this many tokens (a multiple of
# CAUSAL_BLOCKS) runs in CAUSAL_BLOCKS query blocks, each attending only to the keys
# up to its end: the all-masked upper blocks are skipped (10/16 of the work for 4
# blocks; a LoRA training step of a 512-wide Llama at 8 x 256 tokens measured 4.5%
# faster on CPU).
CAUSAL_BLOCKS, CAUSAL_BLOCK_MIN_TOKENS = 4, 128
# From ATTN_FLASH_MIN_TOKENS on, causal attention is flash attention in XLA
# (`_flash_attention`): ATTN_BLOCK queries x ATTN_BLOCK keys at a time with an online
# softmax, key blocks above the diagonal skipped, and a custom VJP that recomputes
# each tile's probabilities from the saved log-sum-exp (FlashAttention-2's backward).
# Forward and backward then hold a few (heads, ATTN_BLOCK, ATTN_BLOCK) float32 tiles,
# never (T, T) or (ATTN_BLOCK, T) scores. It replaced 512-query blocks under
# `jax.checkpoint`, each of which still built (heads, 512, T) scores: in a QLoRA step
# (benchmarks/train_memory.py, Llama 512 wide, 4 layers) the longest sequence in 3 GiB
# went from 5120 to 20992 tokens (PEFT + bitsandbytes: 4096), and the step at 4096
# tokens from +1.48 GiB and 27 s to +0.43 GiB and 18 s on CPU (interleaved runs, a
# loaded machine). Blocks of 256 or 1024 were not clearly faster than 512 in a
# forward + backward microbenchmark at 2048 and 4096 tokens.
ATTN_BLOCK, ATTN_FLASH_MIN_TOKENS = 512, 1024


def _attention(config: DecoderConfig, q, k, v, mask, causal: bool = False):
  """q (B,T,nh,hd), k/v (B,S,nkv,hd), mask (B,T,S) bool -> (B,T,nh*hd).

  Chosen per platform when the program is lowered (`extend.per_platform`): on CPU
  `_attention_xla` (dense, 4-block causal, or flash from ATTN_FLASH_MIN_TOKENS, all
  tuned for XLA:CPU); on GPU/TPU `jax.nn.dot_product_attention` (grouped heads without
  repeated keys; cuDNN's fused kernel on CUDA when GPU_ATTENTION = "cudnn") below
  ATTN_FLASH_MIN_TOKENS and our flash attention above. Gemma 2's soft-capping, which
  jax.nn does not do, is `_attention_xla` everywhere.
  """
  if config.attn_logit_softcapping:
    return _attention_xla(config, q, k, v, mask, causal)
  if (causal and k.shape[1] == q.shape[1] >= ATTN_FLASH_MIN_TOKENS
      and GPU_ATTENTION != "cudnn"):
    # every platform's choice at this length: called directly, since the per-platform
    # call's backward recomputes the forward, which XLA does not merge back for the
    # flash loops (a 2048-token LoRA step measured ~9% slower on CPU)
    return _flash_attention(config, q, k, v, mask, ATTN_BLOCK)
  return _attention_per_platform(q, k, v, mask, _AttnSettings(config, causal))


@dataclasses.dataclass(frozen=True)
class _AttnSettings:
  config: DecoderConfig
  causal: bool


def _nn_attention(settings, q, k, v, mask, implementation=None):
  """`jax.nn.dot_product_attention` with our mask and scaling; query rows that see no
  key attend to key 0 instead (their output is padding; a fully masked row is
  undefined in a fused kernel)."""
  c = settings.config
  B, T, nh, hd = q.shape
  qpas = c.query_pre_attn_scalar
  mask = mask.at[..., 0].set(mask[..., 0] | ~jnp.any(mask, axis=-1))
  # jax.nn promotes q's dtype with float32 itself: traced under standard promotion so
  # that a caller's strict promotion does not stop the GPU/TPU lowering
  with jax.numpy_dtype_promotion("standard"):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                       scale=(qpas or hd) ** -0.5,
                                       implementation=implementation)
  return out.reshape(B, T, nh * hd)


# What CUDA/ROCm attention calls: "xla" (`jax.nn.dot_product_attention`'s XLA path) or
# "cudnn" (cuDNN's fused flash attention, bf16/f16, head dim a multiple of 8 up to 128).
# "xla" by default: in jax 0.10.2 the cuDNN call lowers only with a device assignment
# (its custom_partitioning asserts without one), so a program holding it cannot be
# exported (`jax.export`) or AOT-lowered for CUDA, and no GPU here has run it.
GPU_ATTENTION = "xla"


def _cudnn_ok(q) -> bool:
  return (GPU_ATTENTION == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _attention_impls(settings):
  def cpu(q, k, v, m):
    return _attention_xla(settings.config, q, k, v, m, settings.causal)

  def accelerator(q, k, v, m):
    if settings.causal and k.shape[1] == q.shape[1] >= ATTN_FLASH_MIN_TOKENS:
      # jax.nn's XLA path would build (B, heads, T, T) scores
      return _flash_attention(settings.config, q, k, v, m, ATTN_BLOCK)
    return _nn_attention(settings, q, k, v, m, "xla")

  def gpu(q, k, v, m):
    return _nn_attention(settings, q, k, v, m, "cudnn") if _cudnn_ok(q) else accelerator(
        q, k, v, m)

  return {"cpu": cpu, "cuda": gpu, "rocm": accelerator, "tpu": accelerator}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_per_platform(q, k, v, mask, settings):
  return per_platform(_attention_impls(settings), q, k, v, mask)


def _attention_pp_fwd(q, k, v, mask, settings):
  return _attention_per_platform(q, k, v, mask, settings), (q, k, v, mask)


def _attention_pp_bwd(settings, res, g):
  # Each platform differentiates its own implementation. The forward is recomputed
  # here; under jit XLA merges it with the forward pass's identical ops (CSE), and
  # under remat it is recomputed anyway.
  def vjp(impl):
    def f(q, k, v, mask, g):
      _, pull = jax.vjp(lambda q, k, v: impl(q, k, v, mask), q, k, v)
      return pull(g)
    return f
  dq, dk, dv = per_platform({p: vjp(f) for p, f in _attention_impls(settings).items()},
                            *res, g)
  return dq, dk, dv, np.zeros(res[3].shape, jax.dtypes.float0)


_attention_per_platform.defvjp(_attention_pp_fwd, _attention_pp_bwd)


def _attention_xla(config: DecoderConfig, q, k, v, mask, causal: bool = False):
  """q (B,T,nh,hd), k/v (B,S,nkv,hd), mask (B,T,S) bool -> (B,T,nh*hd), in XLA.

  `causal=True` promises that `mask` is causal with S == T (key j > query i is
  masked), which lets long sequences skip the masked keys. A query row with no
  visible key at all (a left-padding or segment-0 position) is padding that no other
  position attends to; its value depends on the path: the dense path spreads it
  evenly over all S keys, the 4-block path over the keys of its block, and the flash
  path (T >= ATTN_FLASH_MIN_TOKENS) returns zeros for it, with zero gradients.
  """
  T = q.shape[1]
  if causal and k.shape[1] == T and T >= ATTN_FLASH_MIN_TOKENS:
    return _flash_attention(config, q, k, v, mask, ATTN_BLOCK)
  n = CAUSAL_BLOCKS
  if causal and T >= CAUSAL_BLOCK_MIN_TOKENS and T % n == 0 and k.shape[1] == T:
    c = T // n
    return jnp.concatenate(
        [_attention_xla(config, q[:, i * c:(i + 1) * c], k[:, :(i + 1) * c], v[:, :(i + 1) * c],
                    mask[:, i * c:(i + 1) * c, :(i + 1) * c]) for i in range(n)], axis=1)
  B, T, nh, hd = q.shape
  g = nh // k.shape[2]
  if g > 1:
    # transformers' repeat_kv: query head h reads key/value head h // g. Plain
    # 4-D (b, h) batched dots run faster on XLA:CPU than a grouped 5-D einsum.
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  qpas = config.query_pre_attn_scalar
  scaling = (qpas if qpas else hd) ** -0.5
  scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.asarray(scaling, q.dtype)
  cap = config.attn_logit_softcapping
  if cap:                   # Gemma 2: tanh soft-capping before the mask, in q's dtype
    scores = jnp.tanh(scores / jnp.asarray(cap, scores.dtype)) * jnp.asarray(cap, scores.dtype)
  scores = scores.astype(jnp.float32)
  scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
  # softmax in float32 as transformers; written out (the max is a constant shift,
  # so it carries no gradient), which differentiates faster than jax.nn.softmax.
  e = jnp.exp(scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  probs = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
  out = jnp.einsum("bhts,bshd->bthd", probs, v)
  return out.reshape(B, T, nh * hd)


# ----------------------------------------------------------------------------
# Flash attention in XLA

def _flash_attention(config: DecoderConfig, q, k, v, mask, block: int):
  """Causal `_attention` (S == T) in `block` x `block` tiles: the same scores
  (scaling, soft-capping in q's dtype, float32 from there on) and the same GQA (query
  head h reads key/value head h // g), an online softmax over the key blocks up to
  the diagonal, and a custom VJP that recomputes each tile's probabilities
  (FlashAttention-2). A query row with no visible key gets zeros (and zero
  gradients): never NaN. T is padded to a multiple of `block` (padded keys masked,
  padded query rows dropped); the mask is then padded too, a copy of (B, T, T) bools.

  The query heads that share a key/value head are stacked on the row axis of a tile
  ((g x block) rows against block keys), so GQA needs no repeated keys or values and
  every dot is a plain 4-D (batch, kv head) batched matmul.
  """
  B, T, nh, hd = q.shape
  nkv = k.shape[2]
  g = nh // nkv
  nb = -(-T // block)
  pad = nb * block - T
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, pad)))
  # (B, T, nh, hd) -> (blocks, B, nkv, g * block, hd): row r of a tile is query head
  # kv * g + r // block at position r % block of the block
  qb = q.reshape(B, nb, block, nkv, g, hd).transpose(1, 0, 3, 4, 2, 5)
  qb = qb.reshape(nb, B, nkv, g * block, hd)
  kb, vb = (x.reshape(B, nb, block, nkv, hd).transpose(1, 0, 3, 2, 4) for x in (k, v))
  qpas = config.query_pre_attn_scalar
  scaling = float((qpas if qpas else hd) ** -0.5)
  cap = config.attn_logit_softcapping
  out = _flash(qb, kb, vb, mask, scaling, float(cap) if cap else None)
  out = out.reshape(nb, B, nkv, g, block, hd).transpose(1, 0, 4, 2, 3, 5)
  return out.reshape(B, nb * block, nh * hd)[:, :T]


def _flash_tile(qi, kj, mask, i, j, scaling, cap):
  """Float32 scores of query block i against key block j, masked keys -inf, and the
  soft-capping's tanh (None without capping). qi (B, nkv, g*bs, hd), kj (B, nkv, bs,
  hd), mask (B, T, T) padded; returns (B, nkv, g*bs, bs)."""
  B, nkv, rows, _ = qi.shape
  bs = kj.shape[2]
  g = rows // bs
  s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj) * jnp.asarray(scaling, qi.dtype)
  t = None
  if cap:
    t = jnp.tanh(s / jnp.asarray(cap, s.dtype))
    s = t * jnp.asarray(cap, s.dtype)
  m = lax.dynamic_slice(mask, (0, i * bs, j * bs), (B, bs, bs))
  s = s.astype(jnp.float32).reshape(B, nkv, g, bs, bs)
  s = jnp.where(m[:, None, None], s, -jnp.inf).reshape(B, nkv, rows, bs)
  return s, t


def _flash_forward(qb, kb, vb, mask, scaling, cap):
  """(out (blocks, B, nkv, rows, hd) in q's dtype, lse (blocks, B, nkv, rows) float32)."""
  nb = qb.shape[0]
  f32 = jnp.float32

  def query_block(_, xs):
    i, qi = xs
    B, nkv, rows, hd = qi.shape

    def key_block(j, carry):
      m, l, acc = carry
      s, _ = _flash_tile(qi, kb[j], mask, i, j, scaling, cap)
      # m starts at float32's lowest (finite), so a row whose keys so far are all
      # masked keeps exp(-inf - m) = 0 and never sees inf - inf
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new[..., None])
      l = alpha * l + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vb[j],
                      preferred_element_type=f32)
      return m_new, l, alpha[..., None] * acc + pv

    init = (jnp.full((B, nkv, rows), jnp.finfo(f32).min, f32), jnp.zeros((B, nkv, rows), f32),
            jnp.zeros((B, nkv, rows, hd), f32))
    m, l, acc = lax.fori_loop(0, i + 1, key_block, init)    # key blocks 0..i (causal)
    seen = l > 0                                             # False: no visible key
    l = jnp.where(seen, l, 1.0)
    out = (acc / l[..., None]).astype(qb.dtype)
    return None, (out, jnp.where(seen, m + jnp.log(l), 0.0))

  _, (out, lse) = lax.scan(query_block, None, (jnp.arange(nb), qb))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(qb, kb, vb, mask, scaling, cap):
  """`_flash_forward`'s output, differentiable in q, k, v (not in the mask)."""
  return _flash_forward(qb, kb, vb, mask, scaling, cap)[0]


def _flash_fwd(qb, kb, vb, mask, scaling, cap):
  out, lse = _flash_forward(qb, kb, vb, mask, scaling, cap)
  return out, (qb, kb, vb, mask, out, lse)


def _flash_bwd(scaling, cap, res, dout):
  """FlashAttention-2's backward: per key block j (a scan), the query blocks i >= j
  recompute their tile's probabilities P = exp(S - lse) and add dV_j += P^T dO_i,
  dS = P * (dO_i V_j^T - D_i), dQ_i += dS K_j, dK_j += dS^T Q_i (times the scaling
  and the soft-capping's 1 - tanh^2); dQ is one float32 accumulator in the carry."""
  f32 = jnp.float32
  qb, kb, vb, mask, out, lse = res
  nb = qb.shape[0]
  # D = rowsum(dO * O): the softmax's gradient is P * (dP - D)
  dsum = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)

  def key_block(dq, xs):
    j, kj, vj = xs

    def query_block(i, carry):      # query blocks j..nb-1 see key block j
      dq, dk, dv = carry
      qi, doi = qb[i], dout[i]
      s, t = _flash_tile(qi, kj, mask, i, j, scaling, cap)
      p = jnp.exp(s - lse[i][..., None])               # masked keys: exp(-inf) = 0
      dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(vb.dtype), doi,
                           preferred_element_type=f32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=f32)
      ds = p * (dp - dsum[i][..., None])
      if cap:                         # d(cap tanh(x / cap)) / dx = 1 - tanh^2
        tf = t.astype(f32)
        ds = ds * (1.0 - tf * tf)
      ds = (ds * scaling).astype(qb.dtype)
      dqi = jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=f32)
      dq = lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, axis=0)
      dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=f32)
      return dq, dk, dv

    zeros = jnp.zeros(kj.shape, f32)
    dq, dk, dv = lax.fori_loop(j, nb, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(qb.shape, f32), (jnp.arange(nb), kb, vb))
  return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _layer(lp, config: DecoderConfig, h, cos, sin, mask, cache=None, layer=None, index=None,
           causal=False):
  """One decoder layer.

  With a cache (`{"k", "v"}` of shape `(L, B, S, nkv, hd)`), this layer's keys and
  values are written in place at `[layer, :, index:index+T]` (`index` a scalar) or at
  `[layer, b, index[b]:index[b]+T]` (`index` of shape `(B,)`: each row at its own
  length) and attention runs over all `S` slots of the layer (`mask` is `(B, T, S)`).
  Returns (h, cache).
  """
  c = config
  B, T, _ = h.shape
  x = _norm(c, h, lp["input_layernorm"])
  at = lp["self_attn"]
  nq, nkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  if c.fused_projections:
    qkv = _linear(x, at["qkv_proj"])
    q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
  else:
    q, k, v = (_linear(x, at[n]) for n in ("q_proj", "k_proj", "v_proj"))
  q = q.reshape(B, T, c.num_attention_heads, c.head_dim)
  k = k.reshape(B, T, c.num_key_value_heads, c.head_dim)
  v = v.reshape(B, T, c.num_key_value_heads, c.head_dim)
  if c.qk_norm:     # Qwen3: RMSNorm over each head's dims, before the rotation
    q = _norm(c, q, at["q_norm"])
    k = _norm(c, k, at["k_norm"])
  q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
  if cache is not None and jnp.ndim(index) == 1:
    # one write slot per row (continuous batching: rows at different lengths)
    rows = jnp.arange(B, dtype=jnp.int32)[:, None]
    cols = jnp.asarray(index, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    lyr = jnp.asarray(layer, jnp.int32)
    ck = cache["k"].at[lyr, rows, cols].set(k.astype(cache["k"].dtype), mode="drop")
    cv = cache["v"].at[lyr, rows, cols].set(v.astype(cache["v"].dtype), mode="drop")
    cache = {"k": ck, "v": cv}
    k = lax.dynamic_index_in_dim(ck, layer, axis=0, keepdims=False).astype(q.dtype)
    v = lax.dynamic_index_in_dim(cv, layer, axis=0, keepdims=False).astype(q.dtype)
  elif cache is not None:
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
    ck = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], start)
    cv = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], start)
    cache = {"k": ck, "v": cv}
    k = lax.dynamic_index_in_dim(ck, layer, axis=0, keepdims=False).astype(q.dtype)
    v = lax.dynamic_index_in_dim(cv, layer, axis=0, keepdims=False).astype(q.dtype)
  attn = _attention(c, q, k, v, mask, causal=causal and cache is None)
  o = _linear(attn, at["o_proj"])
  if c.sandwich_norms:      # Gemma 2: norm the attention output, then norm before the MLP
    h = h + _norm(c, o, lp["post_attention_layernorm"])
    x = _norm(c, h, lp["pre_feedforward_layernorm"])
  else:
    h = h + o
    x = _norm(c, h, lp["post_attention_layernorm"])
  mp = lp["mlp"]
  if c.num_experts:
    from lora_jax.models import moe
    flat = x.reshape(B * T, -1)
    weights, chosen = moe.route(_linear(flat, mp["gate"]), c.num_experts_per_tok,
                                c.norm_topk_prob)
    y = moe.experts_mlp(flat, weights, chosen, mp["experts"], ACTIVATIONS[c.hidden_act],
                        c.num_experts).reshape(B, T, -1)
    if c.sandwich_norms:
      y = _norm(c, y, lp["post_feedforward_layernorm"])
    return h + y, cache
  if c.fused_projections:
    gate_up = _linear(x, mp["gate_up_proj"])
    gate, up = gate_up[..., :c.intermediate_size], gate_up[..., c.intermediate_size:]
  else:
    gate, up = _linear(x, mp["gate_proj"]), _linear(x, mp["up_proj"])
  y = _linear(ACTIVATIONS[c.hidden_act](gate) * up, mp["down_proj"])
  if c.sandwich_norms:
    y = _norm(c, y, lp["post_feedforward_layernorm"])
  return h + y, cache


def _sliding_mask(mask: jax.Array, window: int, index) -> jax.Array:
  """`mask (B, T, S)` with keys more than `window - 1` slots behind each query removed,
  as transformers' `sliding_window_overlay` (`kv > q - window`, in cache slots).
  Queries sit at slots `index + 0..T-1` (`index` None: 0, a forward without cache; a
  `(B,)` index: each row's own slots)."""
  T, S = mask.shape[-2:]
  idx = jnp.zeros((), jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
  q = jnp.arange(T, dtype=jnp.int32)[None, :] + jnp.reshape(idx, (-1, 1))      # (1|B, T)
  band = jnp.arange(S, dtype=jnp.int32)[None, None, :] > q[:, :, None] - jnp.int32(window)
  return mask & band


# activation checkpointing: what a layer keeps for the backward pass
REMAT_POLICIES = {
    "full": None,       # nothing: the whole layer is recomputed in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn, remat: str | None):
  """`fn` under `jax.checkpoint` with the named policy (None or "none": `fn` itself)."""
  if remat in (None, "none"):
    return fn
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of none, {', '.join(REMAT_POLICIES)}")
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


def _run(params, config: DecoderConfig, input_ids, positions, mask, cache=None, index=None,
         causal=False, last_only=False, remat=None, head=True):
  """Embeddings -> layers -> norm -> logits. Returns (logits, cache).

  `last_only`: logits of the last position only, `(B, 1, V)`: all a prefill for
  decoding needs (the output projection then runs on B rows, not B * T).
  `remat`: a `REMAT_POLICIES` name, each layer checkpointed (training; no cache).
  `head=False`: return the final-normed hidden states `(B, T, H)` instead of logits."""
  if remat not in (None, "none") and cache is not None:
    raise ValueError("remat applies to a forward without a KV cache")
  emb = params["embed_tokens"]["embedding"]
  h = jnp.take(emb, input_ids, axis=0)
  dtype = h.dtype
  if config.embed_scale:    # Gemma: embeddings times sqrt(hidden), the factor in their dtype
    h = h * jnp.asarray(config.hidden_size ** 0.5, dtype)
  windows = [config.window(i) for i in range(config.num_hidden_layers)]
  window_masks = {w: _sliding_mask(mask, w, index) for w in set(windows) if w is not None}
  # one rope table per distinct rope (two for Gemma 3: local and global layers)
  ropes = [config.rope(config.layer_type(i)) for i in range(config.num_hidden_layers)]
  kinds = list(dict.fromkeys(ropes))
  tables = {r: _rope_tables(r, config.head_dim, positions, dtype) for r in kinds}
  if is_stacked(params):
    # the cache rides in the scan carry, so each layer updates it in place
    mixed = len(set(windows)) > 1
    if not mixed:
      mask = window_masks.get(windows[0], mask)
    cos, sin = tables[kinds[0]]

    def body(carry, xs):
      h, cache, i = carry
      lp, sliding, other_rope = xs
      m = jnp.where(sliding, window_masks[config.sliding_window], mask) if mixed else mask
      c, s = cos, sin
      if len(kinds) > 1:      # select the layer's rope table like its mask
        c, s = (jnp.where(other_rope, t, u) for t, u in zip(tables[kinds[1]], (cos, sin)))
      h, cache = _layer(lp, config, h, c, s, m, cache, i, index, causal)
      return (h, cache, i + 1), None
    body = _remat(body, remat)
    sliding = jnp.asarray([w is not None for w in windows])
    other_rope = jnp.asarray([r != kinds[0] for r in ropes])
    (h, cache, _), _ = lax.scan(body, (h, cache, jnp.zeros((), jnp.int32)),
                                (params["layers"], sliding, other_rope))
  else:
    layers = params["layers"]
    if len(layers) != config.num_hidden_layers:
      raise ValueError(f"{config.model_type}: params have {len(layers)} layers, config says "
                       f"num_hidden_layers={config.num_hidden_layers}")
    layer = _remat(lambda lp, h, cos, sin, m, cache, i: _layer(
        lp, config, h, cos, sin, m, cache, i, index, causal), remat)
    for i, lp in enumerate(layers):
      m = mask if windows[i] is None else window_masks[windows[i]]
      cos, sin = tables[ropes[i]]
      h, cache = layer(lp, h, cos, sin, m, cache, i)
  if last_only:
    h = h[:, -1:]
  h = _norm(config, h, params["norm"])
  if not head:
    return h, cache
  return _head(params, config, h), cache


def _head(params, config: DecoderConfig, h):
  """Final-normed hidden states `(..., T, H)` -> logits `(..., T, V)` (tied or untied
  head, Gemma 2's final soft-capping)."""
  emb = params["embed_tokens"]["embedding"]
  dtype = h.dtype
  if config.tie_word_embeddings or "lm_head" not in params:
    # (B,T,H) x (V,H) contracting H: a LoRA'd embedding contracts its out axis.
    logits = lax.dot_general(h, emb.astype(dtype), (((h.ndim - 1,), (1,)), ((), ())))
  else:
    logits = jnp.matmul(h, params["lm_head"]["kernel"].astype(dtype))
  cap = config.final_logit_softcapping
  if cap:
    logits = jnp.tanh(logits / jnp.asarray(cap, logits.dtype)) * jnp.asarray(cap, logits.dtype)
  return logits


def forward(params: Mapping[str, Any], config: DecoderConfig, input_ids: jax.Array, *,
            attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            remat: str | None = None) -> jax.Array:
  """Logits of a causal LM, as `LlamaForCausalLM(input_ids, attention_mask).logits`.

  Args:
    params: parameter pytree (unrolled or stacked layers), dtype of the embedding
      table is the compute dtype.
    config: `DecoderConfig` (static).
    input_ids: `(batch, seq)` integer token ids.
    attention_mask: optional `(batch, seq)`, 1/True for tokens, 0/False for padding;
      padded keys are not attended to.
    positions: optional `(batch, seq)` integer rotary positions; default
      `0..seq-1` (as transformers when `position_ids` is not given).
    segment_ids: optional `(batch, seq)` integers for packed rows: a token attends
      only to earlier tokens of its own segment; 0 marks padding (attends to and is
      seen by nothing). Pass the per-segment `positions` with it.
    remat: activation checkpointing per layer: None / "none", "full", "dots",
      "dots_no_batch" (`REMAT_POLICIES`); the values are the same, the backward pass
      recomputes what the policy does not keep.

  Returns:
    `(batch, seq, vocab)` logits in the compute dtype.
  """
  h = hidden_states(params, config, input_ids, attention_mask=attention_mask,
                    positions=positions, segment_ids=segment_ids, remat=remat)
  return _head(params, config, h)


def logits_from_hidden(params: Mapping[str, Any], config: DecoderConfig,
                       hidden: jax.Array) -> jax.Array:
  """`(..., H)` final hidden states (from `hidden_states`) -> `(..., V)` logits, so a
  loss can compute the vocabulary projection chunk by chunk."""
  return _head(params, config, hidden)


def cached_forward(params: Mapping[str, Any], config: DecoderConfig, input_ids: jax.Array,
                   positions: jax.Array, mask: jax.Array, cache: Mapping[str, jax.Array],
                   index: jax.Array, *, head: bool = True) -> tuple[jax.Array, dict]:
  """One forward over a preallocated KV cache: the step a serving engine runs.

  Args:
    input_ids: `(B, T)` int ids; positions: `(B, T)` int32 rotary positions.
    mask: `(B, T, S)` bool, which cache slots each query sees (causality included).
    cache: `{"k", "v"}`, each `(layers, B, S, kv_heads, head_dim)`.
    index: write slot of the first token: a scalar (every row) or `(B,)` (each row at
      its own length, continuous batching); sliding windows count slots from it.
    head: False returns the final-normed hidden states `(B, T, H)` instead of logits
      (`logits_from_hidden` on the positions that need them).

  Returns:
    (`(B, T, V)` logits or `(B, T, H)` hidden states, the updated cache).
  """
  return _run(params, config, input_ids, positions, mask, dict(cache), index, head=head)


def hidden_states(params: Mapping[str, Any], config: DecoderConfig, input_ids: jax.Array, *,
                  attention_mask: jax.Array | None = None,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  remat: str | None = None) -> jax.Array:
  """The final-normed hidden states `(batch, seq, hidden)` that `forward` projects to
  logits (same arguments); `forward = logits_from_hidden(hidden_states(...))`."""
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"llama.forward: input_ids must be (batch, seq) integers, got "
                     f"{input_ids.shape} {input_ids.dtype}")
  B, T = input_ids.shape
  for name, arr in (("attention_mask", attention_mask), ("positions", positions),
                    ("segment_ids", segment_ids)):
    if arr is not None and tuple(jnp.shape(arr)) != (B, T):
      raise ValueError(f"llama.forward: {name} {tuple(jnp.shape(arr))} must match input_ids "
                       f"{(B, T)}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  mask = jnp.tril(jnp.ones((T, T), bool))[None]
  if attention_mask is not None:
    mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, :]
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, None, :]
  mask = jnp.broadcast_to(mask, (B, T, T))
  h, _ = _run(params, config, input_ids, positions, mask, causal=True, remat=remat,
              head=False)
  return h


# ----------------------------------------------------------------------------
# Generation

def _select(logits, key, sample: bool, temperature, top_k):
  """Next token from `(B, V)` logits: argmax, or a sample at `temperature` among the
  `top_k` most likely (both traced, so changing them does not recompile)."""
  logits = logits.astype(jnp.float32)
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  V = logits.shape[-1]
  kth = lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), V - top_k, axis=1)  # (B, 1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate_impl(params, config, prompt_ids, prompt_mask, rng, max_new_tokens,
                   sample, temperature, top_k, pad_id, eos_ids):
  B, P = prompt_ids.shape
  N = max_new_tokens
  S = P + N
  dtype = params["embed_tokens"]["embedding"].dtype
  L, nkv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
  cache = {"k": jnp.zeros((L, B, S, nkv, hd), dtype), "v": jnp.zeros((L, B, S, nkv, hd), dtype)}
  pm = prompt_mask.astype(bool)
  lengths = jnp.sum(pm.astype(jnp.int32), axis=1)
  # transformers: position_ids = cumsum(mask) - 1, padding filled with 1.
  positions = jnp.where(pm, jnp.cumsum(pm.astype(jnp.int32), axis=1) - 1, 1)
  valid = jnp.concatenate([pm, jnp.zeros((B, N), bool)], axis=1)           # (B, S)
  causal = jnp.arange(S)[None, :] <= jnp.arange(P)[:, None]                # (P, S)
  mask = causal[None] & valid[:, None, :]
  logits, cache = _run(params, config, prompt_ids, positions, mask, cache, 0, last_only=True)
  keys = jax.random.split(rng, N) if rng is not None else None
  key0 = keys[0] if keys is not None else None
  tok = _select(logits[:, -1], key0, sample, temperature, top_k)
  # eos_ids: (n,) int32, -1 entries match nothing; pad_id: () int32 (both traced)
  done = jnp.any(tok[:, None] == eos_ids[None, :], axis=1)
  out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)

  def step(t, carry):
    tok, done, valid, cache, out = carry
    slot = P + t - 1
    valid = lax.dynamic_update_slice(valid, jnp.ones((B, 1), bool),
                                     (jnp.zeros((), jnp.int32), slot.astype(jnp.int32)))
    pos = (lengths + t - 1)[:, None]
    logits, cache = _run(params, config, tok[:, None], pos, valid[:, None, :], cache, slot)
    key = keys[t] if keys is not None else None
    nxt = _select(logits[:, -1], key, sample, temperature, top_k)
    nxt = jnp.where(done, pad_id, nxt)
    done = done | jnp.any(nxt[:, None] == eos_ids[None, :], axis=1)
    out = lax.dynamic_update_slice(out, nxt[:, None],
                                   (jnp.zeros((), jnp.int32), t.astype(jnp.int32)))
    return nxt, done, valid, cache, out

  carry = lax.fori_loop(1, N, step, (tok, done, valid, cache, out))
  return carry[-1]


_generate_jit = jax.jit(implicit(_generate_impl),
                        static_argnums=(1, 5, 6))


def generate(params: Mapping[str, Any], config: DecoderConfig, prompt_ids: jax.Array,
             max_new_tokens: int, *, rng: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, attention_mask: jax.Array | None = None,
             pad_id: int = 0, eos_id: int | tuple[int, ...] | None = None) -> jax.Array:
  """Decode `max_new_tokens` tokens after each prompt with a preallocated KV cache.

  One jit-compiled program (prefill, then a `fori_loop` of single-token steps);
  LoRA/DoRA/quantized leaves in `params` are handled by `lj.implicit`, so
  `generate(lora_params, ...)` equals `generate(lj.merge(lora_params), ...)`
  without building the merged weights.

  Args:
    params: parameter pytree (plain or with implicit leaves).
    config: `DecoderConfig`.
    prompt_ids: `(batch, prompt_len)` integer ids, prompts of different lengths
      left-padded.
    max_new_tokens: number of tokens to produce (>= 1).
    rng: PRNG key, required when `temperature > 0`.
    temperature: 0 for greedy decoding; otherwise logits are divided by it and sampled.
    top_k: sample only among the k most likely tokens (with temperature > 0).
    attention_mask: `(batch, prompt_len)` 1 for tokens, 0 for (left) padding.
    pad_id: id written after a sequence has produced `eos_id`.
    eos_id: optional end-of-sequence id (or ids); after it, a row emits `pad_id`.

  Returns:
    `(batch, max_new_tokens)` int32 new tokens (the prompt is not repeated).
  """
  prompt_ids = jnp.asarray(prompt_ids)
  if prompt_ids.ndim != 2 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise ValueError(f"llama.generate: prompt_ids must be (batch, prompt_len) integers, got "
                     f"{prompt_ids.shape} {prompt_ids.dtype}")
  if int(max_new_tokens) < 1:
    raise ValueError(f"llama.generate: max_new_tokens={max_new_tokens} must be >= 1")
  temperature = float(temperature)
  if temperature < 0:
    raise ValueError(f"llama.generate: temperature={temperature} must be >= 0")
  if temperature > 0 and rng is None:
    raise ValueError("llama.generate: sampling (temperature > 0) needs an explicit rng key")
  if top_k is not None:
    top_k = int(top_k)
    if not 1 <= top_k <= config.vocab_size:
      raise ValueError(f"llama.generate: top_k={top_k} must be in [1, vocab_size="
                       f"{config.vocab_size}]")
  sample = temperature > 0
  if not sample:
    rng = None  # greedy ignores rng and top_k
  B, P = prompt_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((B, P), jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if tuple(attention_mask.shape) != (B, P):
    raise ValueError(f"llama.generate: attention_mask {tuple(attention_mask.shape)} must match "
                     f"prompt_ids {(B, P)}")
  if not isinstance(attention_mask, jax.core.Tracer):
    m = np.asarray(attention_mask).astype(bool)
    if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
      raise ValueError("llama.generate: prompts must be left-padded (attention_mask rows like "
                       "[0, 0, 1, 1, 1], every row ending in a token)")
  eos = () if eos_id is None else (
      (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(e) for e in eos_id))
  eos = jnp.asarray(eos or (-1,), jnp.int32)
  return _generate_jit(params, config, prompt_ids.astype(jnp.int32),
                       attention_mask.astype(jnp.int32), rng, int(max_new_tokens), sample,
                       jnp.asarray(temperature if sample else 1.0, jnp.float32),
                       jnp.asarray(top_k or config.vocab_size, jnp.int32),
                       jnp.asarray(pad_id, jnp.int32), eos)


# ----------------------------------------------------------------------------
# Hugging Face checkpoints

_BNB_STATE = ".quant_state.bitsandbytes__"
NAMES = checkpoint.LLAMA     # Llama's Hugging Face tensor names <-> parameter paths


def names(config: DecoderConfig) -> checkpoint.NameTable:
  """The family's table of Hugging Face tensor names <-> parameter paths."""
  from lora_jax.models.families import family
  return family(config.model_type).names


def _key_tuple(path: str) -> tuple:
  return tuple(int(s) if s.isdigit() else s for s in path.split("/"))


def _hf_name_to_path(name: str, table: checkpoint.NameTable) -> tuple[tuple, bool] | None:
  """HF state-dict key -> (our path as a key tuple, transpose?) or None."""
  hit = table.tensor_to_path(name)
  return None if hit is None else (_key_tuple(hit[0]), hit[1])


def _expected_shapes(config: DecoderConfig) -> dict[tuple, tuple]:
  c = config
  H = c.hidden_size
  out = {("embed_tokens", "embedding"): (c.vocab_size, H), ("norm", "scale"): (H,)}
  if not c.tie_word_embeddings:
    out[("lm_head", "kernel")] = (H, c.vocab_size)
  per_layer = layer_shapes(c)
  for i in range(c.num_hidden_layers):
    for p, shape in per_layer.items():
      out[("layers", i, *p)] = shape
  return out


def _path_to_hf(path: tuple, table: checkpoint.NameTable) -> str:
  return table.path_to_tensor("/".join(map(str, path)))[0]


_CLASSES = {"kernel": ("Linear",), "embedding": ("Embedding",), "scale": ("RMSNorm",)}


def _module_class(module: str, table: checkpoint.NameTable = NAMES) -> tuple[str, ...]:
  """The transformers class names of a Hugging Face module (for compressed-tensors
  targets such as "Linear")."""
  hit = table.module_to_path(module)
  return () if hit is None else _CLASSES.get(hit[0].rsplit("/", 1)[-1], ())


_CT = "compressed-tensors"


def _read_state_dict(root: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of the checkpoint in `root` (single file or index + shards, every file
  inside `root`), validated by `checkpoint.checkpoint_headers` before any is read, and
  the file each tensor came from (for error messages)."""
  infos = checkpoint.checkpoint_headers(root)
  return ({k: checkpoint.read_tensor(t) for k, t in infos.items()},
          {k: t.file for k, t in infos.items()})


def load_hf(path: str | os.PathLike, *, dtype=None,
            stacked: bool = False) -> tuple[DecoderConfig, dict]:
  """Read a Hugging Face Llama checkpoint directory into `(config, params)`.

  Args:
    path: directory with `config.json` and `model.safetensors` (or a sharded
      `model.safetensors.index.json` with its shards).
    dtype: dtype of every parameter; default `None` keeps the file's (a bf16
      checkpoint stays bf16, half the memory of float32).
    stacked: stack the layers on a leading axis (for `scan`).

  Returns:
    `(DecoderConfig, params)`, PyTorch `(out, in)` weights transposed to `(in, out)`.
    A bitsandbytes 4-bit checkpoint (saved by transformers with `load_in_4bit`)
    gives `quantization.QuantizedArray` kernels (same bytes, NF4/FP4, double
    quantization kept; a layer whose in_features is not a multiple of the block,
    so that bnb's blocks cross rows, in the "flat" layout); a compressed-tensors
    "pack-quantized" checkpoint (what llm-compressor saves: GPTQ / RTN int2/3/4/8,
    groups or per channel, symmetric or with zero points) gives
    `quantization.GroupQuantizedArray` kernels with the file's packed words, scales
    and zero points, and the modules its `quantization_config` ignores (lm_head, ...)
    dense. Run either with `lj.implicit(llama.forward)`; quantized kernels compute in
    `dtype`, their scales keep the file's dtype.

  Raises:
    FileNotFoundError for missing files; ValueError naming the tensor for
    unknown or missing keys and shape mismatches, or a corrupt file; for a
    compressed-tensors config this does not read (another format, float or
    activation quantization, ...), naming the config key.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such checkpoint directory (config.json not found)")
  hf = checkpoint.read_config(root)
  try:
    config = DecoderConfig.from_hf(hf)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{root / 'config.json'}: {e}") from None
  table = names(config)
  sd, files = _read_state_dict(root)
  int8 = sorted(k for k in sd if k.endswith(".SCB"))
  if int8:
    raise ValueError(f"{files[int8[0]]}: tensor {int8[0]!r} belongs to a bitsandbytes 8-bit (LLM.int8) "
                     "checkpoint, which load_hf does not read; 4-bit (nf4/fp4) bnb "
                     "checkpoints and float checkpoints are supported")
  if any(_BNB_STATE in k for k in sd):
    # A bnb-4bit checkpoint (transformers' `load_in_4bit` + `save_pretrained`).
    # Imported here, not at the top: `quantization` builds on `lora_jax`.
    from quantization import from_bnb_state_dict
    sd = from_bnb_state_dict(sd)
  qc = hf.get("quantization_config")
  if isinstance(qc, Mapping) and qc.get("quant_method") == _CT:
    from quantization import from_compressed_tensors
    sd = from_compressed_tensors(sd, qc, files=files,
                                 module_class=lambda m: _module_class(m, table),
                                 where=f"{root / 'config.json'}: quantization_config")
  else:
    packed = next((k for k in sd if k.endswith(".weight_packed")), None)
    if packed is not None:
      raise ValueError(f"{files[packed]}: tensor {packed!r} is compressed-tensors data but "
                       f"{root / 'config.json'} has no quantization_config with quant_method "
                       f"{_CT!r}; its format and bit width are unknown")
  expected = _expected_shapes(config)
  flat: dict[tuple, Any] = {}
  if config.num_experts:
    sd = _read_experts(sd, config, flat, files, root, dtype)
  for name, arr in sd.items():
    if table.ignored(name):
      continue
    hit = _hf_name_to_path(name, table)
    if hit is None:
      raise ValueError(f"{files.get(name, root)}: tensor {name!r} {tuple(arr.shape)} is not "
                       f"part of a {config.model_type} checkpoint this loader knows")
    p, transpose = hit
    if p == ("lm_head", "kernel") and config.tie_word_embeddings:
      continue
    if p not in expected:
      raise ValueError(f"{files.get(name, root)}: tensor {name!r} {tuple(arr.shape)} (parameter "
                       f"{'/'.join(map(str, p))}) does not fit config.json "
                       f"(num_hidden_layers={config.num_hidden_layers}, "
                       f"attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias})")
    if isinstance(arr, ImplicitArray):
      # a QuantizedArray / GroupQuantizedArray: already the (in, out) kernel; it keeps
      # its packed codes and computes in `dtype` when it is dequantized.
      if p[-1] != "kernel":
        raise ValueError(f"{files.get(name, root)}: tensor {name!r} (parameter "
                         f"{'/'.join(map(str, p))}) is quantized; only projection kernels "
                         "and lm_head are read quantized")
      if tuple(arr.shape) != expected[p]:
        raise ValueError(f"{files.get(name, root)}: quantized tensor {name!r} has kernel shape "
                         f"{tuple(arr.shape)}; config.json implies {expected[p]}")
      flat[p] = arr if dtype is None else dataclasses.replace(arr, dtype=jnp.dtype(dtype))
      continue
    if arr.ndim == 2 and transpose:
      arr = arr.T
    if tuple(arr.shape) != expected[p]:
      raise ValueError(f"{files.get(name, root)}: tensor {name!r} {arr.dtype} has shape "
                       f"{tuple(sd[name].shape)}; config.json "
                       f"implies {expected[p][::-1] if transpose else expected[p]}")
    flat[p] = jnp.asarray(arr, dtype=dtype) if dtype is not None else jnp.asarray(arr)
  missing = [_path_to_hf(p, table) for p in expected if p not in flat]  # experts: above
  if missing:
    raise ValueError(f"{root}: checkpoint lacks tensors {missing[:5]}"
                     + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
  params = _unflatten(flat, config)
  return config, (stack_layers(params) if stacked else params)


def _read_experts(sd: dict, config: DecoderConfig, flat: dict, files: Mapping[str, str],
                  root: pathlib.Path, dtype) -> dict:
  """Stack the per-expert tensors of `sd` into `flat` (`mlp/experts/*` of each layer);
  returns the other tensors."""
  from lora_jax.models import moe
  from lora_jax.models.families import family
  spec = family(config.model_type).experts
  rx = moe.expert_tensor_regex(spec.prefix, spec.names)
  quantized = next((k for k, v in sd.items() if rx.fullmatch(k) and isinstance(v, ImplicitArray)),
                   None)
  if quantized is not None:
    raise ValueError(f"{files.get(quantized, root)}: expert tensor {quantized!r} is quantized; "
                     "quantized expert weights are not read yet (load the float checkpoint "
                     "and quantize with qz.quantize)")
  where = f"{root} ({config.model_type})"
  stacked, used = moe.stack_experts(sd, spec.prefix, spec.names, config.num_hidden_layers,
                                    config.num_experts, where)
  inter = config.moe_intermediate_size or config.intermediate_size
  H, E = config.hidden_size, config.num_experts
  for layer in range(config.num_hidden_layers):
    for proj, want in (("gate_up_proj", (E, H, 2 * inter)), ("down_proj", (E, inter, H))):
      arr = stacked.get((layer, proj))
      if arr is None:
        raise ValueError(f"{where}: checkpoint lacks the expert tensors of layer {layer} "
                         f"({spec.prefix.format(layer=layer)}.experts.<e>."
                         f"{'/'.join(spec.names)}.weight)")
      if tuple(arr.shape) != want:
        raise ValueError(f"{where}: layer {layer} experts give {proj} {tuple(arr.shape)}; "
                         f"config.json implies {want} (experts, in, out)")
      flat[("layers", layer, "mlp", "experts", proj)] = (
          jnp.asarray(arr, dtype=dtype) if dtype is not None else jnp.asarray(arr))
  return {k: v for k, v in sd.items() if k not in used}


def _unflatten(flat: Mapping[tuple, Any], config: DecoderConfig) -> dict:
  params: dict[str, Any] = {"layers": [dict() for _ in range(config.num_hidden_layers)]}
  for p, v in flat.items():
    node: Any = params
    keys = list(p)
    for j, k in enumerate(keys[:-1]):
      if isinstance(node, list):
        node = node[k]
      else:
        node = node.setdefault(k, {})
    node[keys[-1]] = v
  return params


def _for_saving(params: Any, dequantize: bool) -> Any:
  """Implicit leaves materialized, except group-wise quantized kernels (written
  pack-quantized) unless `dequantize`."""
  from lora_jax._implicit import is_implicit, materialize
  from lora_jax._paths import map_with_path
  if dequantize or not any(is_implicit(x) for x in jax.tree.leaves(params, is_leaf=is_implicit)):
    return jax.tree.map(materialize, params, is_leaf=is_implicit)
  from quantization import GroupQuantizedArray   # `quantization` builds on `lora_jax`

  def keep(path, x):
    if isinstance(x, GroupQuantizedArray) and path.endswith("/kernel"):
      return x
    return materialize(x) if is_implicit(x) else x
  return map_with_path(keep, params, is_leaf=is_implicit)


def save_hf(path: str | os.PathLike, config: DecoderConfig, params: Mapping[str, Any], *,
            dtype=None, dequantize: bool = False) -> None:
  """Write `params` as a Hugging Face checkpoint (`config.json` + `model.safetensors`).

  Group-wise quantized kernels (`quantization.GroupQuantizedArray`, from
  `qz.quantize(..., QuantConfig("int4", 128, symmetric=...))`, `qz.gptq` or a
  compressed-tensors checkpoint) are written in compressed-tensors' "pack-quantized"
  form, with its `quantization_config` in `config.json` (transformers, vLLM and
  compressed-tensors read it; `load_hf` reads it back leaf for leaf). Other implicit
  leaves (LoRA, bnb `QuantizedArray`, ...) are materialized. Kernels are transposed
  back to PyTorch's `(out, in)`. The directory is written atomically
  (`checkpoint.atomic_directory`): an interrupted save leaves the old checkpoint;
  other files already in `path` (tokenizer, ...) are kept, an old sharded checkpoint's
  shards and index are not.

  Args:
    path: output directory (created if missing).
    config: `DecoderConfig`.
    params: unrolled or stacked parameters.
    dtype: optional dtype for every dense tensor; default keeps each leaf's dtype
      (quantized kernels keep their scales' dtype either way).
    dequantize: write every quantized kernel dense (a plain float checkpoint).

  Raises:
    ValueError naming the parameter: a shape the config does not imply, a missing
    parameter; for a quantized kernel compressed-tensors cannot store (a group that
    does not divide `in`, float zero points such as a QA-LoRA fold): pass
    `dequantize=True` to write it dense.
  """
  root = pathlib.Path(path)
  params = unstack_layers(_for_saving(params, dequantize))
  table = names(config)
  expected = _expected_shapes(config)
  tensors = {}
  quantized: dict[str, str] = {}      # HF tensor -> parameter path, of quantized kernels
  from lora_jax._implicit import is_implicit
  from lora_jax._paths import leaves_with_paths
  experts: dict[tuple, np.ndarray] = {}
  for spath, leaf in leaves_with_paths(params, is_leaf=is_implicit):
    p = tuple(int(s) if s.isdigit() else s for s in spath.split("/"))
    if p == ("lm_head", "kernel") and config.tie_word_embeddings:
      continue
    if len(p) == 5 and p[2:4] == ("mlp", "experts") and p in expected:
      if tuple(leaf.shape) != expected[p] or is_implicit(leaf):
        raise ValueError(f"save_hf: expert parameter {spath} is a {type(leaf).__name__} "
                         f"{tuple(leaf.shape)}; expected a plain array {expected[p]}")
      experts[p] = np.asarray(leaf if dtype is None else jnp.asarray(leaf).astype(dtype))
      continue
    if p not in expected:
      raise ValueError(f"save_hf: parameter {spath} {tuple(leaf.shape)} is not part of a "
                       f"{config.model_type} model with this config")
    if tuple(leaf.shape) != expected[p]:
      raise ValueError(f"save_hf: parameter {spath} has shape {tuple(leaf.shape)}, config "
                       f"implies {expected[p]}")
    if is_implicit(leaf):            # a GroupQuantizedArray kernel, stored (out, in)
      tensors[_path_to_hf(p, table)] = leaf
      quantized[_path_to_hf(p, table)] = spath
      continue
    arr = jnp.asarray(leaf) if dtype is None else jnp.asarray(leaf).astype(dtype)
    if p[-1] == "kernel":
      arr = arr.T
    tensors[_path_to_hf(p, table)] = arr
  if config.num_experts:
    from lora_jax.models import moe
    from lora_jax.models.families import family
    spec = family(config.model_type).experts
    for layer in range(config.num_hidden_layers):
      gu, dn = (experts.get(("layers", layer, "mlp", "experts", n))
                for n in ("gate_up_proj", "down_proj"))
      if gu is None or dn is None:
        raise ValueError(f"save_hf: params lack layers/{layer}/mlp/experts/"
                         f"{'gate_up_proj' if gu is None else 'down_proj'}")
      tensors.update(moe.split_experts(layer, gu, dn, spec.prefix, spec.names))
  missing = [t for p in expected if p[2:4] != ("mlp", "experts")
             for t in [_path_to_hf(p, table)] if t not in tensors]
  if missing:
    raise ValueError(f"save_hf: params lack {missing[:5]}")
  hf = config.to_hf()
  hf["dtype"] = str(np.dtype(tensors["model.embed_tokens.weight"].dtype))
  if quantized:
    from quantization import to_compressed_tensors
    try:
      tensors, hf["quantization_config"] = to_compressed_tensors(
          tensors, module_class=lambda m: _module_class(m, table), names=quantized)
    except ValueError as e:
      raise ValueError(f"save_hf: {e}; pass dequantize=True to write the kernels "
                       "dense") from None
  with checkpoint.atomic_directory(root, keep_other_files=True,
                                   replaced=(r"model.*\.safetensors", re.escape(checkpoint.INDEX))
                                   ) as tmp:
    checkpoint.write_safetensors(tmp / checkpoint.SINGLE, tensors, {"format": "pt"})
    checkpoint.write_json(tmp / "config.json", hf)


__all__ = [
  "STACKED_LAYOUTS",
  "EXPERT_LAYOUTS",
  "DecoderConfig",
  "LAYER_TYPES",
  "Rope",
  "REMAT_POLICIES",
  "forward",
  "generate",
  "hidden_states",
  "logits_from_hidden",
  "init_params",
  "is_stacked",
  "layer_shapes",
  "layer_norms",
  "projections",
  "load_hf",
  "names",
  "rms_norm",
  "rope_inv_freq",
  "save_hf",
  "stack_layers",
  "unstack_layers",
]
