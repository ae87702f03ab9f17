"""Triton kernels, one module each; every module imports without `triton` installed and its launchers then raise.

- `int8_gemm`: `int8_gemm` (int8 x int8 -> int32 `tl.dot`, fused per-tensor x per-channel dequantize + bias
  epilogue) and `quantize_per_tensor` (optional per-channel affine, then symmetric int8 quantization in one pass),
  with `int8_gemm_reference` / `quantize_per_tensor_reference` in plain torch.
"""
