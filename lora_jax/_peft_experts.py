"""PEFT's `target_parameters` adapters: LoRA on raw parameters, routed experts included.

PEFT wraps a targeted `nn.Parameter` in a `ParamWrapper` on the module that holds it.
Two parameters of one module are two nested wrappers: the parameter the module
registers first is wrapped first, so it is the innermost, and its factors are saved
under one `.base_layer` more per wrapper around it
(`model.layers.0.mlp.experts.base_layer.lora_A.weight` for `gate_up_proj`,
`model.layers.0.mlp.experts.lora_A.weight` for `down_proj` when both are targeted).

A 2-D parameter `(out, in)` (a router's `weight`) gets an ordinary LoRA pair. A 3-D
expert parameter `(E, d1, d2)` (transformers 5's `(experts, out, in)`) gets one adapter
per expert packed into two matrices (PEFT's `ParamWrapper.get_delta_weight`):

    lora_A (r * E, in)   reshaped (E, r, in):   expert e's A is lora_A[e * r:(e + 1) * r]
    lora_B (out, r * E)  reshaped (out, r, E):  expert e's B is lora_B[:, e::E]

Ours is one LoRA per expert on the stacked `(E, in, out)` kernel: `a (E, in, r)`,
`b (E, r, out)`, `delta_e = scale * a_e @ b_e = (scale * B_e @ A_e).T`. Rank and alpha
patterns are matched against the parameter's full name (`...experts.gate_up_proj`,
`...gate.weight`), as PEFT matches them for parameter targets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

BASE = ".base_layer"


@dataclasses.dataclass(frozen=True)
class ParamTarget:
  """A module of the adapter file resolved to the parameter it adapts."""
  module: str      # the module holding the parameter (no `.base_layer`)
  param: str       # "weight" or an expert parameter name
  layer: int       # the decoder layer of an expert parameter; -1 otherwise

  @property
  def key(self) -> str:
    """The name PEFT matches `target_parameters` and rank / alpha patterns against."""
    return f"{self.module}.{self.param}"


def targeted(key: str, targets: Sequence[str]) -> bool:
  """PEFT's rule for `target_parameters`: an entry equals the parameter's full name or
  is a dotted suffix of it."""
  return key in targets or any(key.endswith(f".{t}") for t in targets)


def _template(t: str) -> re.Pattern:
  return re.compile(re.escape(t).replace(re.escape("{layer}"), r"(?P<layer>\d+)"))


def resolve(module: str, targets: Sequence[str], spec, where) -> ParamTarget | None:
  """The parameter a file module adapts, or None for an ordinary (target_modules) one.

  `module` is the name before `.lora_A.weight` (`...experts.base_layer`); `spec` is the
  family's `Experts` (or None)."""
  depth = 0
  name = module
  while name.endswith(BASE):
    name, depth = name[:-len(BASE)], depth + 1
  hit = _template(spec.peft_module).fullmatch(name) if spec is not None else None
  candidates = spec.peft_params if hit else ("weight",)
  chosen = [p for p in candidates if targeted(f"{name}.{p}", targets)]
  if not chosen:
    # an entry `<module>.<param>` naming this module, for a parameter we cannot adapt
    # (bare names like PEFT's all-linear "down_proj" name no module, so say nothing)
    named = [t for t in targets if "." in t and (name == t.rpartition(".")[0]
                                                or name.endswith("." + t.rpartition(".")[0]))]
    if named:
      raise ValueError(f"{where}: module {module!r}: target_parameters {named} name a "
                       f"parameter of {name!r} that lora_jax cannot place (it adapts "
                       f"{list(candidates)} there)"
                       + ("" if spec is not None else
                          "; for the routed experts of a MoE model pass "
                          "load_adapter(..., config=config)"))
    if depth:
      raise ValueError(f"{where}: module {module!r} is a nested parameter wrapper, but no "
                       f"target_parameters entry of adapter_config.json ({list(targets)}) "
                       "selects a parameter of it")
    return None
  if depth >= len(chosen):
    raise ValueError(f"{where}: module {module!r} is wrapped {depth} deep, but only "
                     f"{chosen} of {name!r} are in target_parameters")
  param = chosen[len(chosen) - 1 - depth]
  return ParamTarget(name, param, int(hit["layer"]) if hit else -1)


def split_experts(A: np.ndarray, B: np.ndarray, num_experts: int, key: str,
                  wfile) -> tuple[np.ndarray, np.ndarray, int]:
  """PEFT's packed `lora_A (r*E, in)`, `lora_B (out, r*E)` -> ours `a (E, in, r)`,
  `b (E, r, out)` and the per-expert rank r."""
  E = num_experts
  if A.ndim != 2 or B.ndim != 2:
    raise ValueError(f"{wfile}: {key}: lora_A {A.shape} / lora_B {B.shape} are not 2-D")
  if A.shape[0] % E or B.shape[1] != A.shape[0]:
    raise ValueError(f"{wfile}: {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                     f"do not pack {E} experts (expected lora_A (r * {E}, in) and lora_B "
                     f"(out, r * {E})); is this adapter for another base model?")
  r = A.shape[0] // E
  a = np.ascontiguousarray(np.asarray(A).reshape(E, r, -1).transpose(0, 2, 1))
  b = np.ascontiguousarray(np.asarray(B).reshape(B.shape[0], r, E).transpose(2, 1, 0))
  return a, b, r


def pack_experts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ours `a (E, in, r)`, `b (E, r, out)` -> PEFT's `lora_A (r*E, in)`, `lora_B (out, r*E)`."""
  E, din, r = a.shape
  A = np.asarray(a).transpose(0, 2, 1).reshape(E * r, din)
  B = np.asarray(b).transpose(2, 1, 0).reshape(b.shape[-1], r * E)
  return np.ascontiguousarray(A), np.ascontiguousarray(B)


def expert_path(path: str, spec) -> tuple[int | None, str] | None:
  """`layers/{l}/mlp/experts/<param>` -> (l, param); stacked `layers/mlp/experts/<param>`
  -> (None, param); anything else None."""
  if spec is None:
    return None
  alt = "|".join(re.escape(p) for p in spec.peft_params)
  m = re.fullmatch(rf"layers/(?:(?P<layer>\d+)/)?mlp/experts/(?P<param>{alt})", path)
  if m is None:
    return None
  return (int(m["layer"]) if m["layer"] is not None else None), m["param"]


def peft_module(spec, layer: int) -> str:
  return spec.peft_module.format(layer=layer)


def wrapper_prefix(spec, layer: int, param: str, chosen: Sequence[str]) -> str:
  """Where PEFT saves the factors of `param` when `chosen` parameters of the layer's
  experts module are targeted: one `.base_layer` per wrapper outside it."""
  depth = len(chosen) - 1 - list(chosen).index(param)
  return peft_module(spec, layer) + BASE * depth


def is_router(module: str, spec) -> bool:
  return spec is not None and _template(spec.peft_router).fullmatch(module) is not None


# ----------------------------------------------------------------------------
# adapters trained on transformers 4, whose experts were separate Linear modules

def legacy_expert(module: str, spec) -> tuple[int, int, int] | None:
  """`{prefix}.experts.{e}.{gate|up|down name}` (a transformers 4 expert Linear, the
  checkpoint's own naming) -> (layer, expert, 0 gate | 1 up | 2 down), else None."""
  if spec is None:
    return None
  alt = "|".join(re.escape(n) for n in spec.names)
  p = re.escape(spec.prefix).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
  m = re.fullmatch(rf"{p}\.experts\.(?P<expert>\d+)\.(?P<proj>{alt})", module)
  if m is None:
    return None
  return int(m["layer"]), int(m["expert"]), spec.names.index(m["proj"])


def fuse_legacy(per_expert: dict, num_experts: int, spec, wfile) -> dict:
  """Per-expert Linear LoRA `{(layer, expert, role): (lora_A (r, in), lora_B (out, r),
  scale)}` -> `{(layer, param): (a (E, in, R), b (E, R, out), scale)}` on our fused,
  stacked expert kernels.

  The gate and up projections share `gate_up_proj = [gate | up]`, so their factors
  fuse exactly at rank `r_gate + r_up` (PEFT's conversion of such adapters does the
  same): `a_e = [A_gate.T | A_up.T]`, `b_e = [[B_gate.T, 0], [0, B_up.T]]`. One scale
  per parameter (the first factor's); other scales are folded into their `b` block.
  Experts without factors get zero ones, which leaves them unchanged."""
  E = num_experts
  out = {}
  for layer in sorted({k[0] for k in per_expert}):
    for param, roles in (("gate_up_proj", (0, 1)), ("down_proj", (2,))):
      here = {(e, ro): v for (li, e, ro), v in per_expert.items() if li == layer and ro in roles}
      if not here:
        continue
      bad = sorted(e for e, _ in here if e >= E)
      if bad:
        raise ValueError(f"{wfile}: LoRA factors for expert {bad[0]} of layer {layer} "
                         f"({spec.prefix.format(layer=layer)}.experts.{bad[0]}.*); the "
                         f"config has {E} experts")
      ranks = {ro: max(v[0].shape[0] for (e, r2), v in here.items() if r2 == ro)
               for ro in roles if any(r2 == ro for _, r2 in here)}
      dims = {}
      for (e, ro), (A, B, _) in here.items():
        d = dims.setdefault(ro, (A.shape[1], B.shape[0]))
        if (A.shape[1], B.shape[0]) != d:
          raise ValueError(f"{wfile}: layer {layer} expert {e} {spec.names[ro]}: lora_A "
                           f"{tuple(A.shape)} / lora_B {tuple(B.shape)} disagree with the "
                           f"other experts' (in, out) = {d}")
      if param == "gate_up_proj" and len(dims) == 2 and dims[0][0] != dims[1][0]:
        raise ValueError(f"{wfile}: layer {layer}: gate and up LoRA inputs differ "
                         f"({dims[0][0]} vs {dims[1][0]})")
      din = next(iter(dims.values()))[0]
      widths = {ro: dims.get(ro, dims.get(roles[0] if ro != roles[0] else roles[-1]))[1]
                for ro in roles}
      R = sum(ranks.values())
      a = np.zeros((E, din, R), np.float32)
      b = np.zeros((E, R, sum(widths.values())), np.float32)
      scale = next(v[2] for _, v in sorted(here.items()))
      r0 = c0 = 0
      for ro in roles:
        if ro in ranks:
          for e in range(E):
            v = here.get((e, ro))
            if v is not None:
              A, B, s = v
              r = A.shape[0]
              a[e, :, r0:r0 + r] = np.asarray(A, np.float32).T
              b[e, r0:r0 + r, c0:c0 + widths[ro]] = np.asarray(B, np.float32).T * np.float32(
                  s / scale)
          r0 += ranks[ro]
        c0 += widths[ro]
      out[(layer, param)] = (a, b, scale)
  return out


__all__ = ["ParamTarget", "resolve", "split_experts", "pack_experts", "expert_path",
           "wrapper_prefix", "is_router", "targeted", "legacy_expert", "fuse_legacy"]
