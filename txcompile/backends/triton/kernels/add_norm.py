"""Fused residual add + LayerNorm / RMSNorm in Triton, row-wise over the last dimension.

    summed = x + residual                                   (rounded to x's dtype, as the unfused add would store it)
    add_layer_norm: normed = (summed - mean) / sqrt(var + eps) * weight + bias   (var biased, i.e. divided by C)
    add_rms_norm:   normed = summed / sqrt(mean(summed**2) + eps) * weight

Both return `(normed, summed)`: the pre-norm residual stream of a Transformer block needs `summed` as the next
residual and `normed` as the next sublayer's input. `residual=None` skips the add: `summed` is `x` itself (the same
tensor object, never written again). `weight` and `bias` are optional [C] vectors of any float dtype.

Inputs are [..., C] tensors of fp32, fp16 or bf16, and `residual` must match `x` exactly in shape, dtype and device.
The add is done in fp32 and rounded once to the input dtype; the statistics are then taken from that rounded
`summed`, so `normed` is exactly the norm of the tensor handed back, as with two separate ops. Mean, variance and
mean square accumulate in fp32 and the affine is applied in fp32 before the single cast back to the input dtype,
which is what torch's `layer_norm` / `rms_norm` do for half types (and `add_*_reference` does the same in plain
torch). Variance is two-pass, mean((s - mean)**2), never E[s**2] - E[s]**2, which cancels badly when |mean| >> std.

A row of up to `block` columns (default `MAX_BLOCK` = 8192, a power of two) is held in registers whole and loaded
once; each program takes as many rows as fill about 2048 elements, so small C still gives a program real work. Longer
rows are walked in `block`-wide chunks: pass 1 adds, stores `summed` and accumulates its sum (or sum of squares);
LayerNorm re-reads `summed` for the variance around the now known mean (pass 2: the two-pass variance); the last pass
re-reads it to normalize and store. The re-reads hit a row the same program has just touched, so mostly L2.

Memory traffic, in bytes per element of x, with b the element size (2 for fp16/bf16, 4 for fp32) and weight/bias
(C elements per row, cached) ignored:
    fused, row in one block: read x and residual, write summed and normed: 4b (8 bytes in half precision); without a
    residual 2b (read x, write normed).
    fused, chunked row: 5b for RMSNorm (one re-read of summed), 6b for LayerNorm (two).
    unfused (`s = x + r; F.layer_norm(s)`): the add reads 2b and writes b, the norm reads s and writes its output:
    5b (10 bytes in half precision), more when the norm kernel itself re-reads long rows, plus a second launch. The
    common hand-written `s.float()` -> normalize -> `.to(dtype)` chain is far worse: each fp32 temporary it
    materializes costs 8 more bytes per element (written once, read once), all of which the fused kernel keeps in
    registers.
"""

from __future__ import annotations

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

__all__ = ["MAX_BLOCK", "add_layer_norm", "add_layer_norm_reference", "add_rms_norm", "add_rms_norm_reference"]

MAX_BLOCK = 8192  # widest row held in registers whole; fp32 at 16 warps is 16 registers a thread
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program: with small C one row per program would leave most lanes of a program idle.
_TILE = 2048


@_jit
def _add_norm_kernel(
    x_ptr, res_ptr, sum_ptr, out_ptr, w_ptr, b_ptr,
    R, C,
    stride_x, stride_r, stride_s, stride_o,
    eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < R)[:, None]
    # int64 row offsets: R * stride can pass 2**31 for large activations even when each index fits in int32.
    rows = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_C)

    if ONE_BLOCK:
        col_ok = cols < C
        mask = row_ok & col_ok[None, :]
        s = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + rows * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # Round before the statistics so normed is the norm of exactly the summed tensor we hand back.
            s_low = _to(s, sum_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
            tl.store(sum_ptr + rows * stride_s + cols[None, :], s_low, mask=mask)
            s = s_low.to(tl.float32)
        if IS_RMS:
            d = s
        else:
            mean = tl.sum(s, axis=1) / C
            # The padding lanes loaded 0 but would contribute mean**2 each to the variance without the where.
            d = tl.where(mask, s - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = _to(y, out_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
        tl.store(out_ptr + rows * stride_o + cols[None, :], y, mask=mask)
    else:
        # Per-lane partial sums, reduced once after the loop: a row reduction per chunk would cost a shuffle tree
        # each iteration, and lane-wise accumulation also adds fewer values into each fp32 sum.
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            mask = row_ok & (cc < C)[None, :]
            s = tl.load(x_ptr + rows * stride_x + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                s += tl.load(res_ptr + rows * stride_r + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                s_low = _to(s, sum_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
                tl.store(sum_ptr + rows * stride_s + cc[None, :], s_low, mask=mask)
                s = s_low.to(tl.float32)
            if IS_RMS:
                acc += s * s
            else:
                acc += s

        # Later passes read the rounded sum back; with no residual that is x itself.
        if HAS_RES:
            src_ptr = sum_ptr
            stride_src = stride_s
            # The reloads below may be served by other threads than the ones that stored: order them.
            tl.debug_barrier()
        else:
            src_ptr = x_ptr
            stride_src = stride_x

        if IS_RMS:
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / C + eps)
        else:
            mean = tl.sum(acc, axis=1) / C
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                mask = row_ok & (cc < C)[None, :]
                s = tl.load(src_ptr + rows * stride_src + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, s - mean[:, None], 0.0)
                acc += d * d
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / C + eps)

        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cols
            col_ok = cc < C
            mask = row_ok & col_ok[None, :]
            s = tl.load(src_ptr + rows * stride_src + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                y = s * rstd[:, None]
            else:
                y = (s - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + cc, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(b_ptr + cc, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            y = _to(y, out_ptr.dtype.element_ty, BF16_RNE_BY_HAND)
            tl.store(out_ptr + rows * stride_o + cc[None, :], y, mask=mask)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton add+norm kernels need the `triton` package: pip install triton")


def _check(x, residual, weight, bias, eps) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES or x.dim() == 0:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor of shape [..., C], got {_describe(x)}")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must be None or a tensor of x's shape and dtype ({x.dtype}, {tuple(x.shape)}), "
                f"got {_describe(residual)}"
            )
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (c,):
            raise ValueError(
                f"{name} must be None or a float tensor of shape ({c},) (x's last dim), got {_describe(t)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < float("inf")):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")


def _rows(t: Tensor, c: int) -> Tensor:
    """t as [R, C] with unit column stride; a copy only when the layout cannot be viewed that way."""
    t2 = t.reshape(-1, c)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _check_block(block: int | None) -> int:
    if block is None:
        return MAX_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1) or block > 2**16:
        raise ValueError(f"block must be a power of two between 1 and 65536, got {block!r}")
    return block


def _launch(x, residual, weight, bias, eps, block, is_rms) -> tuple[Tensor, Tensor]:
    _check(x, residual, weight, bias, eps)
    max_block = _check_block(block)
    _require_triton()
    _launchable(x, "x")
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return normed, summed
    c = x.shape[-1]
    x2 = _rows(x, c)
    r2 = _rows(residual, c) if residual is not None else x2  # never read when HAS_RES is False
    s2 = summed.view(-1, c) if residual is not None else x2
    rows = x2.shape[0]
    block_c = min(triton.next_power_of_2(c), max_block)
    block_r = min(max(1, _TILE // block_c), triton.next_power_of_2(rows))
    num_warps = max(1, min(16, (block_r * block_c) // 256))
    w = weight.contiguous() if weight is not None else x2  # any pointer will do when HAS_W / HAS_B is False
    b = bias.contiguous() if bias is not None else x2
    _add_norm_kernel[(triton.cdiv(rows, block_r),)](
        x2, r2, s2, normed, w, b,
        rows, c,
        x2.stride(0), r2.stride(0), s2.stride(0), c,
        float(eps),
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        ONE_BLOCK=c <= max_block, BLOCK_R=block_r, BLOCK_C=block_c,
        BF16_RNE_BY_HAND=_INTERPRET and x.dtype == torch.bfloat16,
        num_warps=num_warps,
    )  # fmt: skip
    return normed, summed


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(x + residual) * weight + bias, x + residual) over the last dim, in one pass over the inputs.

    `block` (a power of two, default `MAX_BLOCK`) is the widest row kept in registers whole; longer rows are
    processed in `block`-wide chunks. It changes only speed and rounding order, never the result's meaning.
    """
    return _launch(x, residual, weight, bias, eps, block, is_rms=False)


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) over the last dim, in one pass over the inputs.

    `block` works as in `add_layer_norm`.
    """
    return _launch(x, residual, weight, None, eps, block, is_rms=True)


def _summed_reference(x: Tensor, residual: Tensor | None) -> Tensor:
    return x if residual is None else (x.float() + residual.float()).to(x.dtype)


def add_layer_norm_reference(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """`add_layer_norm` in plain torch: the add rounded to x's dtype, then `layer_norm` in fp32, cast back once."""
    _check(x, residual, weight, bias, eps)
    summed = _summed_reference(x, residual)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    normed = torch.nn.functional.layer_norm(summed.float(), (x.shape[-1],), w, b, eps)
    return normed.to(x.dtype), summed


def add_rms_norm_reference(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """`add_rms_norm` in plain torch: the add rounded to x's dtype, then `rms_norm` in fp32, cast back once."""
    _check(x, residual, weight, None, eps)
    summed = _summed_reference(x, residual)
    w = weight.float() if weight is not None else None
    normed = torch.nn.functional.rms_norm(summed.float(), (x.shape[-1],), w, eps)
    return normed.to(x.dtype), summed
