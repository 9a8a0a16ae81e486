"""Quantization (NF4/FP4/int4/int8) as pytree transformations, with dequant-matmul kernels."""
