"""Triton kernels, one module each; every module imports without `triton` installed and its launchers then raise.

- `int8_gemm`: `int8_gemm` (int8 x int8 -> int32 `tl.dot`, fused per-tensor x per-channel dequantize + bias
  epilogue) and `quantize_per_tensor` (optional per-channel affine, then symmetric int8 quantization in one pass),
  with `int8_gemm_reference` / `quantize_per_tensor_reference` in plain torch.
- `add_norm`: residual add + LayerNorm / RMSNorm in one pass over each row (`add_layer_norm`, `add_rms_norm`).
- `softmax`: softmax(x * scale + bias) over the last dim, one read per row that fits a block, online otherwise.
- `linear_epilogue`: GEMM with bias and activation (GELU, tanh-GELU, SiLU, ReLU) in the epilogue (`linear_act`), and
  the gated SwiGLU MLP input in one kernel with two accumulators (`linear_swiglu`, `linear_swiglu_fused`).
- `attention`: FlashAttention-2-style forward (online softmax, causal, additive/bool bias, key padding, GQA) and
  `varlen_attention` over packed sequences (`cu_seqlens`), the kernel behind the `unpad` pass on GPU.
Every module has `*_reference` functions in plain torch with the same semantics; the tests compare them under
`TRITON_INTERPRET=1` on CPU. None of these kernels has run on a GPU yet, and the lowering that uses them is to come.
"""
