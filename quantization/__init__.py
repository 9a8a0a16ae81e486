"""Quantization as pytree transformations, with dequant-matmul kernels: bitsandbytes'
NF4/FP4/int4/int8 (`QuantizedArray`) and GPTQ-style group-wise int2/int3/int4/int8
(`GroupQuantizedArray`, compressed-tensors' format), with both families' checkpoint
state dicts (`from_bnb_state_dict`, `from_compressed_tensors` and their inverses).

    import quantization as qz
    qparams = qz.quantize(params, qz.QuantConfig(format="nf4", block_size=64, double_quant=True))
    qparams = qz.quantize(params, qz.QuantConfig(format="int3", block_size=128, symmetric=False))
    y = qz.matmul(x, qparams["w"])                    # "auto" | "xla" | "pallas"
    y = lj.implicit(apply_fn)(qparams, x)             # any model, quantized kernels stay packed
"""

from quantization._array import (
                                 QuantConfig,
                                 QuantizedArray,
                                 bits_per_param,
                                 dequantize,
                                 is_quantized,
                                 quantize,
                                 quantize_array,
                                 quantize_kernel,
                                 summary,
)
from quantization._group import GROUP_FORMATS, GroupQuantizedArray, quantize_group_array
from quantization._loftq import loftq
from quantization._qalora_fold import fold_qalora
from quantization._gptq import gptq, gptq_kernel
from quantization._bnb import from_bnb_state_dict, to_bnb_state_dict
from quantization._compressed_tensors import from_compressed_tensors, to_compressed_tensors
from quantization._formats import BLOCK_SIZES, FORMATS
from quantization._matmul import (BACKENDS, matmul, matmul_t_xla, matmul_xla,
                                  register_quantized_kind)
from quantization._pallas import QMatmulTiles, qmatmul, qmatmul_reference

__all__ = [
    "BACKENDS", "BLOCK_SIZES", "FORMATS", "GROUP_FORMATS", "GroupQuantizedArray",
    "QMatmulTiles", "QuantConfig", "QuantizedArray", "bits_per_param", "dequantize",
    "fold_qalora", "from_bnb_state_dict", "from_compressed_tensors", "gptq", "gptq_kernel",
    "is_quantized", "loftq", "matmul", "matmul_t_xla", "matmul_xla", "qmatmul",
    "qmatmul_reference", "quantize", "quantize_array", "quantize_group_array",
    "quantize_kernel", "register_quantized_kind", "summary", "to_bnb_state_dict",
    "to_compressed_tensors",
]
