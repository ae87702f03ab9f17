"""Fused softmax attention in Triton (forward only), FlashAttention-2 style: dense [B, H, T, D] and packed varlen.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h', j] + bias[b, h, i, j]) * v[b, h', j]

with h' = h // (H // Hkv): k and v may have fewer heads Hkv than q as long as Hkv divides H (grouped-query and
multi-query attention). `scale` defaults to 1/sqrt(D); D may be anything from 1 to 256. Inputs are fp32, fp16 or
bf16 (q, k and v alike); all math is fp32 and the output has the input dtype. There is no autograd: the output
never requires grad.

Masking conventions (every one of them removes a key from a row's softmax, i.e. sets its score to -inf):
    bias         float (fp32/fp16/bf16) tensor broadcastable to [B, H, Tq, Tk], added to the scaled scores; or a
                 bool tensor of such a shape where True = keep, exactly like SDPA's `attn_mask`. Broadcast dims
                 are read through stride 0, so a [B, 1, 1, Tk] bias (token merging's proportional attention
                 log(size), a padding mask) costs Tk elements per row block, not a [B, H, Tq, Tk] copy.
    key_padding  bool [B, Tk], True = a real token, False = padding.
    causal       query i sees key j iff j <= i + (Tk - Tq): the diagonal is aligned to the bottom-right corner,
                 as in FlashAttention >= 2.1 and torch's `causal_lower_right`. For Tq == Tk this is SDPA's
                 `is_causal`; for Tq != Tk it is not (SDPA aligns top-left). Queries with i + Tk - Tq < 0
                 (Tq > Tk) see no key at all.
A row whose keys are all masked is all zeros, not NaN, like torch's `_safe_softmax`.

`varlen_attention` takes sequences packed without padding (ByteTransformer, FlashAttention's varlen API):
q [total, H, D], k/v [total, Hkv, D] and cu_seqlens [num_seqs + 1], the prefix sums of the sequence lengths.
Token t of sequence s attends to the tokens of s only (causal: to those at or before it).

Algorithm (FlashAttention-2). One program owns a BLOCK_M x D query tile of one (batch, head), keeps it in SRAM /
registers and streams K and V in BLOCK_N-row tiles. Per tile it computes S = scale * Q K^T (+ bias, masks) and
updates, per query row, a running max m, a running sum l and an un-normalised fp32 accumulator O:
    m_new = max(m, rowmax(S));  P = exp(S - m_new);  alpha = exp(m - m_new)
    l = alpha * l + rowsum(P);  O = alpha * O + P V;  m = m_new
and divides O by l once after the last tile. S and P live only in registers; the exponentials are base 2 with
log2(e) folded into the scale. With `causal`, key tiles entirely above the diagonal are never loaded (the loop
stops at the query tile's last visible key), which halves the work for Tq == Tk. Packed sequences launch
cdiv(max_seqlen, BLOCK_M) query tiles per (sequence, head); tiles past a sequence's end exit at once.
Q K^T runs on the input dtype (fp16/bf16 products are exact in fp32, accumulation is fp32). For fp16/bf16 inputs
P is rounded to the input dtype for P V, as FlashAttention does, so both dots run on tensor cores at full rate (an
fp32 P V costs three tf32 products per element, several times slower); the error that adds is below the dtype's
tolerance on the output. fp32 inputs keep P in fp32, and on CUDA their dots use "tf32x3" (three tf32 tensor-core
products, ~fp32 accuracy) instead of scalar fp32 FMAs.

Memory traffic, in bytes, for B x H heads, Tq = Tk = T, head dim D, e bytes per element of q/k/v:
    materialising S and P (matmul, softmax, matmul): read Q, K (2*B*H*T*D*e), write S (B*H*T^2*e), softmax reads
    S and writes P (2*B*H*T^2*e), the second matmul reads P and V and writes O (B*H*T^2*e + 2*B*H*T*D*e):
    4*B*H*T*D*e + 4*B*H*T^2*e in all, plus a dense mask/bias read that adds B*H*T^2*e again.
    fused: Q read and O written once (2*B*H*T*D*e); K and V read once per query tile, at most
    2*B*H*T*D*e * cdiv(T, BLOCK_M), mostly from L2 since neighbouring programs share them: between
    4*B*H*T*D*e and 2*B*H*T*D*e * (1 + T/BLOCK_M). Nothing grows with T^2 unless the bias itself is [.., T, T].
E.g. T = 4096, D = 64, BLOCK_M = 128: 4*T*D + 4*T^2 = 68M element accesses per head materialised versus at most
2*T*D*33 = 17M fused (1M when K/V re-reads hit L2), and no T x T scratch buffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import tuning as _tuning
from ._common import (
    INTERPRET as _INTERPRET,
    describe as _describe,
    jit as _jit,
    launchable as _launchable,
    tl,
    triton,
)

__all__ = ["attention", "attention_reference", "varlen_attention", "varlen_attention_reference"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


_BLOCKS = ("BLOCK_M", "BLOCK_N")


def _configs(shapes: list) -> tuple:
    if _INTERPRET:  # every program runs in Python here: one small tile keeps tests fast, and nothing is timed
        return ({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1},)
    return tuple({"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s} for m, n, w, s in shapes)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the default when nothing is timed. Large D and fp32 inputs
# outgrow shared memory with the big tiles (the fp32 operands of the tf32x3 dots are staged there): fp32 at D > 128
# fits only the small single-stage tile on sm_80/sm_90, so that is its default; the tuner skips what does not fit.
_SHAPES = [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (32, 32, 4, 1)]
_CONFIGS = _configs([(64, 32, 4, 2), *_SHAPES])
_CONFIGS_WIDE_ROWS = _configs([(32, 32, 4, 1), (64, 32, 4, 2), *_SHAPES[:-1]])
_TUNER = _tuning.Tuner("attention", __file__)
_VARLEN_TUNER = _tuning.Tuner("varlen_attention", __file__)


def _candidates(dtype: torch.dtype, block_d: int) -> tuple:
    return _CONFIGS_WIDE_ROWS if block_d * dtype.itemsize > 512 else _CONFIGS


@_jit
def _attn_tile(
    q, offs_m, q_ok, hi, n_keys, causal_offset, qk_scale,
    k_base, v_base, b_base, kp_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_kpn,
    offs_d, d_ok,
    HAS_BIAS: tl.constexpr, BIAS_IS_MASK: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The normalised fp32 output of one query tile: key tiles [0, hi) streamed through the online softmax."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Scores are kept in log2 units (log2(e) is folded into qk_scale) so that every exponential is an exp2.
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        # K read as its [D, BLOCK_N] transpose through the strides: no transposed copy of K anywhere.
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        # A no-op unless the caller upcast q (QK_FP32); then K follows it into the same fp32 dot.
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        keep = q_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        if HAS_KEY_PADDING:
            keep = keep & (tl.load(kp_base + offs_n * stride_kpn, mask=n_ok, other=0) != 0)[None, :]
        if HAS_BIAS:
            b = tl.load(b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=keep, other=0)
            if BIAS_IS_MASK:
                keep = keep & (b != 0)
            else:
                # log2(e): the bias joins the log2-unit scores. Clamped first: a finfo.min padding bias times
                # log2(e) would overflow to -inf, which masks the same but warns under the interpreter.
                s = s + tl.maximum(b.to(tl.float32), -1e30) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys m_new is -inf and exp2(-inf - -inf) would be NaN; subtracting 0
        # instead gives p = 0 and alpha = 0 on an accumulator that is still 0, so the row stays exactly empty.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if q.dtype == tl.float32:  # fp32 inputs (or bf16 upcast for the interpreter): P.V at ~fp32 accuracy
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision=DOT_PRECISION)
        else:  # fp16/bf16: P rounded to the input dtype, so P.V runs on tensor cores at full rate (FlashAttention-2)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    # l == 0 only for rows with no visible key, whose accumulator is 0 as well: they come out as zeros.
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@_jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, b_ptr, kp_ptr,
    H, KV_GROUP, Tq, Tk, D, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_kpb, stride_kpn,
    HAS_BIAS: tl.constexpr, BIAS_IS_MASK: tl.constexpr, HAS_KEY_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
    QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A 1-D grid, query tiles fastest: the programs that share one head's K and V run together (L2 reuse), and
    # B * H may exceed the 65535 limit of a CUDA grid's second axis.
    num_m = tl.cdiv(Tq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    # int64 base offsets: b * stride_b passes 2**31 for large batches even when every index fits in int32.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // KV_GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < Tq
    # D is padded to the power of two BLOCK_D; the zero-filled lanes add nothing to Q K^T and are never stored.
    d_ok = offs_d < D
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if QK_FP32:
        q = q.to(tl.float32)

    causal_offset = Tk - Tq
    hi = Tk
    if CAUSAL:
        # The tile's last query sees keys up to (pid_m + 1) * BLOCK_M - 1 + Tk - Tq; later key tiles are skipped.
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + causal_offset)
    out = _attn_tile(
        q, offs_m, q_ok, hi, Tk, causal_offset, qk_scale,
        k_ptr + b * stride_kb + h_kv * stride_kh,
        v_ptr + b * stride_vb + h_kv * stride_vh,
        b_ptr + b * stride_bb + h * stride_bh,
        kp_ptr + b * stride_kpb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_kpn,
        offs_d, d_ok,
        HAS_BIAS, BIAS_IS_MASK, HAS_KEY_PADDING, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@_jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
    H, KV_GROUP, D, max_seqlen, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    CAUSAL: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(max_seqlen, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_sh = tl.program_id(0) // num_m
    seq = pid_sh // H
    h = (pid_sh % H).to(tl.int64)
    h_kv = h // KV_GROUP
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    # The grid is sized by max_seqlen (known on the host without a sync); shorter sequences leave idle tiles.
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < seqlen
    d_ok = offs_d < D
    q_base = q_ptr + start * stride_qt + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if QK_FP32:
        q = q.to(tl.float32)
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    # No bias or key padding here: the q pointer stands in for their (never dereferenced) bases.
    out = _attn_tile(
        q, offs_m, q_ok, hi, seqlen, 0, qk_scale,
        k_ptr + start * stride_kt + h_kv * stride_kh,
        v_ptr + start * stride_vt + h_kv * stride_vh,
        q_ptr, q_ptr,
        stride_kt, stride_kd, stride_vt, stride_vd, 0, 0, 0,
        offs_d, d_ok,
        False, False, False, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    o_ptrs = o_ptr + start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton attention kernels need the `triton` package: pip install triton")


def _dot_precision(device: torch.device) -> str:
    # tf32x3 splits each fp32 operand into two tf32 halves: ~fp32 accuracy on tensor cores. GPUs before Ampere
    # have no tf32 and the interpreter ignores the setting, so plain fp32 ("ieee") there.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _qk_fp32(q: Tensor) -> bool:
    # The interpreter stores bf16 as uint16 and its tl.dot multiplies those bit patterns (triton-lang/triton#11584,
    # "not supported yet"); bf16 values are exact in fp32, so an fp32 dot gives the GPU's bf16 result.
    return _INTERPRET and q.dtype == torch.bfloat16


def _check_qkv(q, k, v, scale, rank: int, layout: str) -> tuple[int, float]:
    """Shared q/k/v checks; returns (H // Hkv, scale). The head axis is dim 1 of [B, H, T, D] and of [T, H, D]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != rank or t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be a {rank}-D float32/float16/bfloat16 tensor {layout}, got {_describe(t)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put all operands on one device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {_MAX_HEAD_DIM}, got q of shape {tuple(q.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"head dim mismatch: q is {tuple(q.shape)} but k/v are {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        what = "batch" if rank == 4 else "token count"
        raise ValueError(f"{what} mismatch: q is {tuple(q.shape)} but k/v are {tuple(k.shape)}")
    h, h_kv = q.shape[1], k.shape[1]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"k/v heads ({h_kv}) must divide q heads ({h}): q is {tuple(q.shape)}, k {tuple(k.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    return h // h_kv, float(scale)


def _check_dense(q, k, v, bias, key_padding, scale) -> tuple[int, float, Tensor | None]:
    """Checks `attention`'s arguments; returns (H // Hkv, scale, bias expanded to [B, H, Tq, Tk] with 0 strides)."""
    group, scale = _check_qkv(q, k, v, scale, 4, "of shape [B, H, T, D]")
    (bsz, h, tq, _), tk = q.shape, k.shape[2]
    full = (bsz, h, tq, tk)
    if bias is not None:
        if not isinstance(bias, Tensor) or not (bias.dtype == torch.bool or bias.dtype in _DTYPES):
            raise ValueError(f"bias must be None or a bool/float32/float16/bfloat16 tensor, got {_describe(bias)}")
        shape = tuple(bias.shape)
        if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
            raise ValueError(f"bias of shape {shape} does not broadcast to [B, H, Tq, Tk] = {list(full)}")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        bias = bias.expand(full)
    if key_padding is not None:
        if not isinstance(key_padding, Tensor) or key_padding.dtype != torch.bool or key_padding.shape != (bsz, tk):
            raise ValueError(f"key_padding must be None or a bool tensor of shape ({bsz}, {tk}) = [B, Tk], "
                             f"got {_describe(key_padding)}")  # fmt: skip
        if key_padding.device != q.device:
            raise ValueError(f"key_padding is on {key_padding.device} but q is on {q.device}")
    return group, scale, bias


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_padding: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    config: dict | None = None,
) -> Tensor:
    """softmax(scale * q @ k^T + bias, masked) @ v for q [B, H, Tq, D] and k, v [B, Hkv, Tk, D]; see the module
    docstring for the masking conventions. Any strides; the output is a new contiguous [B, H, Tq, D] tensor.

    `config` ({"BLOCK_M", "BLOCK_N"}, optionally "num_warps"/"num_stages") skips the tuner.
    """
    group, scale, bias = _check_dense(q, k, v, bias, key_padding, scale)
    _require_triton()
    _launchable(q, "q")
    (bsz, h, tq, d), tk = q.shape, k.shape[2]
    if tk == 0 or q.numel() == 0:  # no keys: every row is empty, so zeros (this also covers empty outputs)
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        bias = bias.view(torch.uint8)  # same bytes and strides; a byte load needs no i1 pointer support
    b = bias if bias is not None else q  # never read when HAS_BIAS is False; any pointer will do
    b_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    kp = key_padding.view(torch.uint8) if key_padding is not None else q
    kp_strides = key_padding.stride() if key_padding is not None else (0, 0)

    block_d = max(16, triton.next_power_of_2(d))  # tl.dot wants every dim >= 16

    def launch(cfg: dict) -> None:
        blocks, options = _tuning.launch_parameters(cfg, _BLOCKS)
        _attn_fwd_kernel[(triton.cdiv(tq, blocks["BLOCK_M"]) * bsz * h,)](
            q, k, v, out, b, kp,
            h, group, tq, tk, d, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *b_strides, *kp_strides,
            HAS_BIAS=bias is not None,
            BIAS_IS_MASK=bias is not None and bias.dtype == torch.uint8,
            HAS_KEY_PADDING=key_padding is not None,
            CAUSAL=bool(causal),
            QK_FP32=_qk_fp32(q),
            DOT_PRECISION=_dot_precision(q.device),
            BLOCK_D=block_d,
            enable_fp_fusion=True,  # fma contraction only helps: nothing is meant to round like torch bit for bit
            **blocks, **options,
        )  # fmt: skip

    key = {
        "Tq": _tuning.next_power_of_2(tq),
        "Tk": _tuning.next_power_of_2(tk),
        "D": d,
        "causal": bool(causal),
        "bias": "none" if bias is None else "mask" if bias.dtype == torch.uint8 else "float",
        "key_padding": key_padding is not None,
        "kv_group": group,
    }
    dtypes = [q.dtype] if bias is None else [q.dtype, bias.dtype]
    _TUNER.launch(launch, _candidates(q.dtype, block_d), key=key, dtypes=dtypes, device=q.device, config=config)
    return out


def _safe_softmax_av(s: Tensor, v: Tensor) -> Tensor:
    """(exp(s - rowmax) @ v) / rowsum with -inf for masked scores; rows with every score -inf give zeros."""
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = torch.exp(s - m)
    l_ = p.sum(dim=-1, keepdim=True)
    return (p @ v) / l_.masked_fill(l_ == 0, 1.0)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_padding: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """`attention` in plain torch: S and P materialised in fp32, the same masks, output in the input dtype."""
    group, scale, bias = _check_dense(q, k, v, bias, key_padding, scale)
    tq, tk = q.shape[2], k.shape[2]
    if tk == 0 or q.numel() == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if bias is not None and bias.dtype == torch.bool:
        s = s.masked_fill(~bias, float("-inf"))
    elif bias is not None:
        s = s + bias.float()
    if key_padding is not None:
        s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    if causal:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        s = s.masked_fill(~visible, float("-inf"))
    return _safe_softmax_av(s, vf).to(q.dtype)


def _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale) -> tuple[int, float]:
    group, scale = _check_qkv(q, k, v, scale, 3, "of shape [total_tokens, H, D]")
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
    ):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [num_seqs + 1], got {_describe(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    # The values decide which memory the kernel touches, so they are checked even though that costs one small
    # device-to-host copy; not while a CUDA graph is captured, where such a copy is illegal.
    if cu_seqlens.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return group, scale
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != q.shape[0] or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at total_tokens = {q.shape[0]}, "
                         f"got {cu if len(cu) <= 16 else cu[:8] + ['...'] + cu[-8:]}")  # fmt: skip
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is less than the longest sequence in cu_seqlens ({max(lengths)})")
    return group, scale


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    config: dict | None = None,
) -> Tensor:
    """Attention within each packed sequence: q [total, H, D], k/v [total, Hkv, D], cu_seqlens [num_seqs + 1].

    `max_seqlen` (>= the longest sequence) sizes the grid. Output [total, H, D] in q's dtype, contiguous.
    `config` as for `attention`.
    """
    group, scale = _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    _require_triton()
    _launchable(q, "q")
    _, h, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # cu_seqlens covers every token: all get written
    num_seqs = cu_seqlens.numel() - 1
    if q.numel() == 0 or max_seqlen == 0:
        return out
    cu = cu_seqlens.contiguous()

    block_d = max(16, triton.next_power_of_2(d))

    def launch(cfg: dict) -> None:
        blocks, options = _tuning.launch_parameters(cfg, _BLOCKS)
        _varlen_fwd_kernel[(triton.cdiv(max_seqlen, blocks["BLOCK_M"]) * num_seqs * h,)](
            q, k, v, out, cu,
            h, group, d, max_seqlen, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            CAUSAL=bool(causal),
            QK_FP32=_qk_fp32(q),
            DOT_PRECISION=_dot_precision(q.device),
            BLOCK_D=block_d,
            enable_fp_fusion=True,
            **blocks, **options,
        )  # fmt: skip

    # Keyed on the longest sequence, bucketed: every batch of a varlen workload has its own max_seqlen.
    key = {"max_seqlen": _tuning.next_power_of_2(max_seqlen), "D": d, "causal": bool(causal)}
    _VARLEN_TUNER.launch(
        launch, _candidates(q.dtype, block_d), key=key, dtypes=[q.dtype], device=q.device, config=config
    )
    return out


def varlen_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """`varlen_attention` in plain torch: `attention_reference` on each sequence in turn."""
    _, scale = _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            # [L, H, D] -> [1, H, L, D] and back.
            seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            out[a:b] = attention_reference(*seq, causal=causal, scale=scale)[0].transpose(0, 1)
    return out
