"""Quantization (NF4/FP4/int4/int8) as pytree transformations, with dequant-matmul kernels.

    import quantization as qz
    qparams = qz.quantize(params, qz.QuantConfig(format="nf4", block_size=64, double_quant=True))
    y = qz.matmul(x, qparams["w"])                    # "auto" | "xla" | "pallas"
    y = lj.implicit(apply_fn)(qparams, x)             # any model, quantized kernels stay packed
"""

from quantization._array import (
                                 QuantConfig,
                                 QuantizedArray,
                                 bits_per_param,
                                 dequantize,
                                 quantize,
                                 quantize_array,
                                 summary,
)
from quantization._loftq import loftq
from quantization._bnb import from_bnb_state_dict, to_bnb_state_dict
from quantization._formats import BLOCK_SIZES, FORMATS
from quantization._matmul import BACKENDS, matmul, matmul_t_xla, matmul_xla
from quantization._pallas import QMatmulTiles, qmatmul, qmatmul_reference

__all__ = [
    "BACKENDS", "BLOCK_SIZES", "FORMATS", "QMatmulTiles", "QuantConfig", "QuantizedArray",
    "bits_per_param", "dequantize", "from_bnb_state_dict", "loftq", "matmul", "matmul_t_xla",
    "matmul_xla", "qmatmul", "qmatmul_reference", "quantize", "quantize_array", "summary",
    "to_bnb_state_dict",
]
