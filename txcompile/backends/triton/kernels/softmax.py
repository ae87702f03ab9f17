"""Row softmax over the last dimension in Triton, with the score scale and an additive bias/mask fused in.

    out = softmax(x * scale + bias, dim=-1)

`x` is [..., N] of fp32, fp16 or bf16 and `bias` (optional) any fp32/fp16/bf16 tensor that broadcasts to x's shape
without enlarging it: for attention scores [B, H, Tq, Tk] that covers a padding mask [B, 1, 1, Tk], a causal or ALiBi
bias [1, H, Tq, Tk] or [B, 1, Tq, Tk], a plain [Tk], and so on. Broadcast dims are read through zero strides, so the
bias is never expanded in memory. `x * scale + bias`, the max, the exponentials and the sum are all fp32; the result
is cast once to x's dtype. `scale` is any finite float (masking with -inf entries of x relies on scale > 0; an
additive -inf in `bias` masks whatever the scale).

Fully masked rows (every logit -inf) give all zeros rather than the NaNs of 0/0: torch's `_safe_softmax`, which
`scaled_dot_product_attention` uses for exactly this case, does the same, so a query with nothing to attend to
contributes nothing instead of poisoning the output. Any other row is an ordinary softmax: +inf or NaN logits still
give NaN.

A row of up to `block` columns (default `MAX_BLOCK` = 8192, a power of two) is processed in registers whole: read
once, max, exp, sum, written once; several rows share a program when N is small. Longer rows use the online softmax
of Milakov & Gimelshein ("Online normalizer calculation for softmax", 2018): the classic safe softmax needs three
passes over the row (max, then sum of exp(x - max), then normalize), but a running max m and running sum l can be
kept together, rescaling l by exp(m_old - m_new) whenever the max grows, so one read pass yields both and a second
pass writes exp(x - m) / l.

Memory traffic, in bytes per element of x, with b its element size (2 for fp16/bf16, 4 for fp32); a bias adds its own
reads, which a broadcast one mostly serves from cache:
    fused, row in one block: read x once, write out once: 2b (4 bytes in half precision).
    fused, longer rows: read x twice (statistics, then output), write once: 3b.
    unfused (`torch.softmax(x * scale + bias, -1)`): the multiply reads b and writes b, the add reads b and writes b,
    the softmax reads at least b and writes b: 6b or more (12 bytes in half precision), with two full-size
    temporaries allocated and three kernel launches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import (
    INTERPRET as _INTERPRET,
    describe as _describe,
    jit as _jit,
    launchable as _launchable,
    to_dtype as _to,
    tl,
    triton,
)

__all__ = ["MAX_BLOCK", "softmax", "softmax_reference"]

MAX_BLOCK = 8192  # widest row held in registers whole; fp32 at 16 warps is 16 registers a thread
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: with small N one row per program would leave most lanes of a program idle.
_TILE = 2048


@_jit
def _logits(x_ptr, bias_ptr, x_rows, b_rows, cols, mask, stride_bn, scale, HAS_BIAS: tl.constexpr):
    z = tl.load(x_ptr + x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        z += tl.load(bias_ptr + b_rows + cols[None, :] * stride_bn, mask=mask, other=0.0).to(tl.float32)
    # Padding lanes must not win the max nor add to the sum: -inf does both.
    return tl.where(mask, z, float("-inf"))


@_jit
def _softmax_kernel(
    x_ptr, bias_ptr, out_ptr,
    R, N,
    stride_x, stride_o,
    D1, D2, stride_b0, stride_b1, stride_b2, stride_bn,
    scale,
    HAS_BIAS: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < R)[:, None]
    # int64 row offsets: R * stride can pass 2**31 for large score tensors even when each index fits in int32.
    rows = rows.to(tl.int64)
    x_rows = rows[:, None] * stride_x
    o_rows = rows[:, None] * stride_o
    # The flat row index splits into the (at most three) collapsed leading dims of the bias; broadcast ones have
    # stride 0, so e.g. every head and query row of one batch element lands on the same [Tk] padding mask.
    b_rows = ((rows // (D1 * D2)) * stride_b0 + ((rows // D2) % D1) * stride_b1 + (rows % D2) * stride_b2)[:, None]
    cols = tl.arange(0, BLOCK_N)

    if ONE_BLOCK:
        mask = row_ok & (cols < N)[None, :]
        z = _logits(x_ptr, bias_ptr, x_rows, b_rows, cols, mask, stride_bn, scale, HAS_BIAS)
        m = tl.max(z, axis=1)
        # A fully masked row has max -inf and z - max = NaN; shifting by 0 instead gives exp(-inf) = 0 everywhere.
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(z - m[:, None])
        den = tl.sum(e, axis=1)
        # Only a fully masked row sums to 0 (the max term contributes exp(0) = 1); 0 / 1 keeps its zeros.
        den = tl.where(den == 0.0, 1.0, den)
        y = _to(e / den[:, None], out_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
        tl.store(out_ptr + o_rows + cols[None, :], y, mask=mask)
    else:
        m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        den = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cc = c0 + cols
            mask = row_ok & (cc < N)[None, :]
            z = _logits(x_ptr, bias_ptr, x_rows, b_rows, cc, mask, stride_bn, scale, HAS_BIAS)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # The sum so far was taken relative to the old max: rescale it to the new one before adding this chunk.
            den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        den = tl.where(den == 0.0, 1.0, den)
        for c0 in range(0, N, BLOCK_N):
            cc = c0 + cols
            mask = row_ok & (cc < N)[None, :]
            z = _logits(x_ptr, bias_ptr, x_rows, b_rows, cc, mask, stride_bn, scale, HAS_BIAS)
            y = tl.exp(z - m[:, None]) / den[:, None]
            y = _to(y, out_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
            tl.store(out_ptr + o_rows + cc[None, :], y, mask=mask)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton softmax kernel needs the `triton` package: pip install triton")


def _check(x, bias, scale) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES or x.dim() == 0:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor of shape [..., N], got {_describe(x)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dtype not in _DTYPES:
            hint = (
                "; turn a boolean mask into one with torch.where(mask, 0.0, -inf)" if isinstance(bias, Tensor) else ""
            )
            raise ValueError(f"bias must be None or a float32/float16/bfloat16 tensor, got {_describe(bias)}{hint}")
        try:
            ok = torch.broadcast_shapes(bias.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to x's shape {tuple(x.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_block(block: int | None) -> int:
    if block is None:
        return MAX_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1) or block > 2**16:
        raise ValueError(f"block must be a power of two between 1 and 65536, got {block!r}")
    return block


def _bias_layout(bias: Tensor, shape: torch.Size) -> tuple[Tensor, list[tuple[int, int]], int]:
    """bias viewed as x's shape, with its leading dims collapsed to three (size, stride) pairs, outermost first.

    Size-1 dims are dropped and neighbours merged where one stride steps over the other whole (zero strides always
    merge), so any attention-style broadcast fits; a layout that still needs more than three dims is copied.
    """
    b = bias.expand(shape)
    dims: list[tuple[int, int]] = []
    for size, stride in zip(shape[:-1], b.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if len(dims) > 3:
        b = b.contiguous()
        dims = [(b.numel() // shape[-1], shape[-1])]
    return b, [(1, 0)] * (3 - len(dims)) + dims, b.stride(-1)


def softmax(x: Tensor, bias: Tensor | None = None, scale: float = 1.0, *, block: int | None = None) -> Tensor:
    """softmax(x * scale + bias) over the last dim, fp32 inside, x's dtype out; fully masked rows give zeros.

    `block` (a power of two, default `MAX_BLOCK`) is the widest row kept in registers whole; longer rows take the
    two-pass online path in `block`-wide chunks. It changes only speed and rounding order, never the result's meaning.
    """
    _check(x, bias, scale)
    max_block = _check_block(block)
    _require_triton()
    _launchable(x, "x")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if bias is not None:
        b, ((_, sb0), (d1, sb1), (d2, sb2)), sbn = _bias_layout(bias, x.shape)
    else:
        b, d1, d2, sb0, sb1, sb2, sbn = x2, 1, 1, 0, 0, 0, 0  # never read when HAS_BIAS is False
    block_n = min(triton.next_power_of_2(n), max_block)
    block_r = min(max(1, _TILE // block_n), triton.next_power_of_2(rows))
    num_warps = max(1, min(16, (block_r * block_n) // 256))
    _softmax_kernel[(triton.cdiv(rows, block_r),)](
        x2, b, out,
        rows, n,
        x2.stride(0), n,
        d1, d2, sb0, sb1, sb2, sbn,
        float(scale),
        HAS_BIAS=bias is not None, ONE_BLOCK=n <= max_block, BLOCK_R=block_r, BLOCK_N=block_n,
        BF16_RNE_BY_HAND=_INTERPRET and x.dtype == torch.bfloat16,
        num_warps=num_warps,
    )  # fmt: skip
    return out


def softmax_reference(x: Tensor, bias: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """`softmax` in plain torch: fp32 logits and softmax, fully masked rows zeroed as `_safe_softmax` does."""
    _check(x, bias, scale)
    z = x.float() * scale
    if bias is not None:
        z = z + bias.float()
    out = torch.softmax(z, dim=-1)
    masked = (z == float("-inf")).all(dim=-1, keepdim=True)
    return torch.where(masked, torch.zeros_like(out), out).to(x.dtype)
