"""LoftQ: quantize the base and initialise LoRA so that `Q + s * a @ b` is close to `W`.

PEFT's `init_lora_weights="loftq"` (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware
Quantization"), for any quantization format of ours. For `iters` rounds:

    Q      = quantize(W - s * a @ b)          (a @ b = 0 in the first round)
    a, b   = top-r SVD of (W - dequantize(Q)), split as sqrt(S / s) on each side

so that the starting model `dequantize(Q) + s * a @ b` is nearer to `W` than QLoRA's
`dequantize(quantize(W))`. PEFT sets `lora_A = R`, `lora_B = L` from the SVD with no
division by the LoRA scale `s`, which is right only when `s = 1` (`lora_alpha = r`);
we divide by `s` so the sum is right for every alpha, and equal PEFT's when `s = 1`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax import extend
from quantization._array import QuantConfig, quantize_kernel


def loftq(key: jax.Array, params: Any, lora_cfg: lj.LoraConfig,
          quant_cfg: QuantConfig = QuantConfig(), *, iters: int = 1) -> Any:
  """LoRA targets of `params` become `LoraWeight(w=QuantizedArray, a, b)` by LoftQ.

  Args:
    key: PRNG key (for `lj.init`'s structure; LoftQ itself is deterministic).
    params: float parameter tree (the original, unquantized weights).
    lora_cfg: which kernels get LoRA, rank, alpha, layouts (as for `lj.init`); its
      `init` is ignored. Kernels must have one input and one output axis ("io", "lio").
    quant_cfg: format, block size and double quantization of the bases; its `targets`
      is ignored (the LoRA targets are the ones quantized). Other leaves stay as they
      are; quantize them afterwards with `qz.quantize` if wanted.
    iters: alternating rounds (PEFT's `loftq_iter`), >= 1.

  Returns:
    `params` with each target a QLoRA `LoraWeight` whose base is quantized (an
    `IecLoraWeight` with betas 0 when `lora_cfg.use_iec`).
  """
  if getattr(lora_cfg, "use_qalora", False):
    raise ValueError("loftq: use_qalora=True is not supported: LoftQ's factors are a "
                     "full-resolution SVD of the quantization error, which a QA-LoRA "
                     "a (in / L, r) cannot hold; quantize the base (qz.quantize) and "
                     "lj.init a QA-LoRA adapter on it instead")
  if int(iters) < 1:
    raise ValueError(f"loftq: iters={iters!r} must be >= 1")
  shaped = lj.init(key, params, lj.LoraConfig(**{**lora_cfg.__dict__, "init": "zeros",
                                                 "use_dora": False, "use_iec": False}))
  is_lw = lambda x: isinstance(x, lj.LoraWeight)  # noqa: E731

  def one(path, lw):
    if not is_lw(lw):
      return lw
    if lw.axes != "io":
      raise ValueError(f"{path}: LoftQ quantizes (in, out) kernels; layout {lw.axes!r} of "
                       f"shape {tuple(lw.shape)} has more than one input or output axis")
    w = lw.w
    wf = w.astype(jnp.float32)
    r, s = lw.rank, lw.scale
    target = wf
    for i in range(int(iters)):
      q = quantize_kernel(target.astype(w.dtype), quant_cfg, path=path)
      a, b = extend.mutating_factors(path, wf - q.materialize().astype(jnp.float32), "io", r, s,
                              "pissa")
      if i + 1 < iters:
        target = wf - s * (a @ b)
    out = lj.LoraWeight(w=q, a=a.astype(lw.a.dtype), b=b.astype(lw.b.dtype), scale=s,
                        axes=lw.axes, dropout=lw.dropout)
    if getattr(lora_cfg, "use_iec", False):   # LoftQ's start, then IEC's betas at 0
      zero = jnp.zeros(tuple(lw.shape[:lw.nbatch]), lw.a.dtype)
      return lj.IecLoraWeight(w=q, a=out.a, b=out.b, scale=s, axes=lw.axes,
                              dropout=lw.dropout, beta_a=zero, beta_b=zero)
    return out

  return extend.map_with_path(one, shaped, is_leaf=is_lw)
