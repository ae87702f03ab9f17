"""The `txc_triton::` ops a Triton lowering writes into the graph: one op per fused kernel.

Each op is a `torch.library` custom op with a fake (meta) kernel, so a lowered program is still an ordinary
exportable GraphModule: `torch.export` traces it, `txcompile convert --backend triton` saves it, and loading it needs
only `import txcompile`. The eager implementation launches the Triton kernel from `kernels/` when the tensors are on a
CUDA device (or when `TRITON_INTERPRET=1` runs kernels on CPU tensors, for tests). Anywhere else (a lowered artifact
loaded on a CPU-only machine) it runs the kernel's torch reference, which has the same semantics, so the program
stays portable; the backend itself never claims a node it cannot launch a kernel for (see lowering.py).

    txc_triton::layer_norm(x, w, b, eps)                     aten.layer_norm over the last dim
    txc_triton::add_layer_norm(x, r, w, b, eps) -> (y, x+r)  residual add + LayerNorm, one pass
    txc_triton::rms_norm / add_rms_norm                      the same for RMSNorm
    txc_triton::linear_act(x, W, b, activation)              act(x W^T + b), activation in the GEMM epilogue
    txc_triton::linear_swiglu(x, Wg, Wu, bg, bu)             silu(x Wg^T + bg) * (x Wu^T + bu), one store
    txc_triton::linear_swiglu_fused(x, Wgu, bgu)             the same on fuse_qkv's [gate; up] weight
    txc_triton::softmax(x, bias, scale)                      softmax(scale * x + bias) over the last dim
    txc_triton::attention(q, k, v, bias, causal, scale)      SDPA forward, FlashAttention-2 tiling
    txc_triton::varlen_attention(q, k, v, cu, heads, scale)  txc::varlen_attention on packed tokens
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPS", "runs_kernels"]


def _kernel(name: str) -> Any:
    """A kernel module, imported on first use: `import txcompile` must not import triton."""
    return importlib.import_module(f"{__package__}.kernels.{name}")


@functools.cache
def _interpreting() -> bool:
    return _kernel("_common").INTERPRET


def runs_kernels(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of `device`: CUDA, or any device under TRITON_INTERPRET=1."""
    from . import available

    return available() and (device.type == "cuda" or _interpreting())


@torch.library.custom_op("txc_triton::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return _add_norm(x, None, weight, bias, eps, False)[0]


@layer_norm.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("txc_triton::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return _add_norm(x, residual, weight, bias, eps, False)


@add_layer_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("txc_triton::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return _add_norm(x, None, weight, None, eps, True)[0]


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("txc_triton::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return _add_norm(x, residual, weight, None, eps, True)


@add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def _add_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
) -> tuple[Tensor, Tensor]:
    if runs_kernels(x.device):
        an = _kernel("add_norm")
        out = an.add_rms_norm(x, residual, weight, eps) if rms else an.add_layer_norm(x, residual, weight, bias, eps)
    else:
        from .kernels import add_norm as an

        out = (
            an.add_rms_norm_reference(x, residual, weight, eps)
            if rms
            else an.add_layer_norm_reference(x, residual, weight, bias, eps)
        )
    normed, summed = out
    # A custom op may not return its own input: without a residual the kernels hand x back as the "sum".
    return normed, (summed.clone() if summed is x else summed)


@torch.library.custom_op("txc_triton::linear_act", mutates_args=())
def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    if runs_kernels(x.device):
        return _kernel("linear_epilogue").linear_act(x, weight, bias, activation)
    from .kernels.linear_epilogue import linear_act_reference

    return linear_act_reference(x, weight, bias, activation)


@linear_act.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("txc_triton::linear_swiglu", mutates_args=())
def linear_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None) -> Tensor:
    if runs_kernels(x.device):
        return _kernel("linear_epilogue").linear_swiglu(x, w_gate, w_up, b_gate, b_up)
    from .kernels.linear_epilogue import linear_swiglu_reference

    return linear_swiglu_reference(x, w_gate, w_up, b_gate, b_up)


@linear_swiglu.register_fake
def _(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


@torch.library.custom_op("txc_triton::linear_swiglu_fused", mutates_args=())
def linear_swiglu_fused(x: Tensor, w_gate_up: Tensor, b_gate_up: Tensor | None) -> Tensor:
    if runs_kernels(x.device):
        return _kernel("linear_epilogue").linear_swiglu_fused(x, w_gate_up, b_gate_up)
    from .kernels.linear_epilogue import linear_swiglu_reference

    n = w_gate_up.shape[0] // 2
    halves = (None, None) if b_gate_up is None else (b_gate_up[:n], b_gate_up[n:])
    return linear_swiglu_reference(x, w_gate_up[:n], w_gate_up[n:], *halves)


@linear_swiglu_fused.register_fake
def _(x: Tensor, w_gate_up: Tensor, b_gate_up: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_gate_up.shape[0] // 2))


@torch.library.custom_op("txc_triton::softmax", mutates_args=())
def softmax(x: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    if runs_kernels(x.device):
        return _kernel("softmax").softmax(x, bias, scale)
    from .kernels.softmax import softmax_reference

    return softmax_reference(x, bias, scale)


@softmax.register_fake
def _(x: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("txc_triton::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    if runs_kernels(q.device):
        return _kernel("attention").attention(q, k, v, bias=bias, causal=causal, scale=scale)
    from .kernels.attention import attention_reference

    return attention_reference(q, k, v, bias=bias, causal=causal, scale=scale)


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("txc_triton::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, heads: int, scale: float) -> Tensor:
    """`txc::varlen_attention` (packed [N, heads*D] in and out) through the varlen kernel."""
    if not runs_kernels(q.device):
        from ...ops.unpad import varlen_attention as per_sequence

        return per_sequence(q, k, v, cu_seqlens, heads, scale)
    d = q.shape[1] // heads
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # The grid is sized by the longest sequence: one small device->host read per call, as in FlashAttention's API.
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    out = _kernel("attention").varlen_attention(
        q.unflatten(1, (heads, d)), k.unflatten(1, (-1, d)), v.unflatten(1, (-1, d)), cu_seqlens, max_seqlen,
        scale=scale,
    )  # fmt: skip
    return out.flatten(1)


@varlen_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, heads: int, scale: float) -> Tensor:
    return q.new_empty((q.shape[0], v.shape[1]))


OPS = {
    "layer_norm": torch.ops.txc_triton.layer_norm.default,
    "add_layer_norm": torch.ops.txc_triton.add_layer_norm.default,
    "rms_norm": torch.ops.txc_triton.rms_norm.default,
    "add_rms_norm": torch.ops.txc_triton.add_rms_norm.default,
    "linear_act": torch.ops.txc_triton.linear_act.default,
    "linear_swiglu": torch.ops.txc_triton.linear_swiglu.default,
    "linear_swiglu_fused": torch.ops.txc_triton.linear_swiglu_fused.default,
    "softmax": torch.ops.txc_triton.softmax.default,
    "attention": torch.ops.txc_triton.attention.default,
    "varlen_attention": torch.ops.txc_triton.varlen_attention.default,
}
