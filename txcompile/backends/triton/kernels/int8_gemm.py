"""W8A8 linear in Triton: an int8 x int8 GEMM with the dequantize (and bias) fused into its epilogue, and the kernel
that quantizes activations to int8 in the first place.

    out[m, n] = (sum_k int32(x_q[m, k]) * int32(w_q[n, k])) * x_scale * w_scale[n] + bias[n]

`x_scale` is one scale for the whole activation (per tensor), `w_scale` one per output channel, `w_q` keeps the
PyTorch linear layout [N, K] and is read transposed through its strides. Products accumulate exactly in int32
(`tl.dot` on int8 operands), which holds while K * 128 * 128 < 2**31, i.e. K <= 131072; the epilogue is fp32 and
the store casts to `out_dtype`.

`quantize_per_tensor` computes q = clamp(floor(v / scale + 0.5), -127, 127) with v = x * mul + add (mul/add are
optional per-channel vectors, e.g. a folded LayerNorm affine or SmoothQuant factors). Rounding is half up, computed
as floor(t + 0.5) in fp32; libdevice `rint` (half to even) would be the GPU's natural choice but the interpreter
cannot run extern calls, and one rounding everywhere keeps the reference bit-exact. Every fp32 step is a separately
rounded IEEE op (`div_rn`, and `enable_fp_fusion=False` so the compiler cannot contract mul+add into an fma), which
is what plain torch does, so kernel and reference agree to the bit. NaN inputs give an unspecified int8.

Memory traffic (the reason for fusing), for one BLOCK_M x BLOCK_N output tile:
    fused: reads BLOCK_M*K + BLOCK_N*K bytes of int8 plus 4*BLOCK_N (w_scale) and bias, writes BLOCK_M*BLOCK_N
    elements of out_dtype once.
    unfused (dequantize with the scales -> fp16 addmm): the same tile reads 2*(BLOCK_M + BLOCK_N)*K bytes of fp16
    operands, and the dequantize passes have already read 1 and written 2 bytes per element of x and W.
In total (ignoring tile re-reads, equal in both) about M*K + N*K + |out| bytes fused versus 5*(M*K + N*K) + |out|
unfused: in decoding (M small) the weight term dominates, so ~5x fewer bytes. The quantize kernel reads x once and
writes 1 byte per element, where separate scale/round/clamp/cast ops would stream fp32 intermediates 4-5 times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import tuning as _tuning
from ._common import (
    INTERPRET as _INTERPRET,
    describe as _describe,
    grouped_tile as _tile,
    jit as _jit,
    launchable as _launchable,
    tl,
    triton,
)

__all__ = ["int8_gemm", "int8_gemm_reference", "quantize_per_tensor", "quantize_per_tensor_reference"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). int8 tl.dot on CUDA wants BLOCK_K >= 32 and tiles in multiples
# of 16. The first is the default when nothing is timed; under the interpreter every program runs in Python, so one
# small tile keeps the tests fast.
_CONFIGS = (
    ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 1, "num_stages": 1},)
    if _INTERPRET
    else tuple(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s}
        for m, n, k, w, s in [
            (64, 64, 128, 4, 3),
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 128, 128, 8, 3),
        ]
    )
)
_TUNER = _tuning.Tuner("int8_gemm", __file__)


@_jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M * stride_xm can pass 2**31 for large activations even when each index fits in int32.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W is [N, K]; indexing it as [k, n] through the strides gives the K x N operand without a transpose copy.
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        # Zero-fill past the edges: a zero operand adds nothing to the dot, so ragged K needs no separate tail loop.
        a = tl.load(x_ptrs, mask=m_ok & (offs_k[None, :] < k_left), other=0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The dequantize happens here, on the tile still in registers, instead of in a separate pass over memory.
    n_mask = offs_n < N
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc.to(tl.float32) * tl.load(x_scale_ptr)
    out = out * w_scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok)


@_jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, mul_ptr, add_ptr,
    R, K,
    stride_xr, stride_xk,
    HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mask = (offs_r[:, None] < R) & k_mask[None, :]
    rows = offs_r.to(tl.int64)[:, None]
    v = tl.load(x_ptr + rows * stride_xr + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_MUL:
        v = v * tl.load(mul_ptr + offs_k, mask=k_mask, other=1.0).to(tl.float32)[None, :]
    if HAS_ADD:
        v = v + tl.load(add_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    t = tl.math.div_rn(v, tl.load(scale_ptr))
    q = tl.minimum(tl.maximum(tl.floor(t + 0.5), -127.0), 127.0)
    tl.store(q_ptr + rows * K + offs_k[None, :], q.to(tl.int8), mask=mask)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton int8 kernels need the `triton` package: pip install triton")


def _scalar(value: float | Tensor, name: str, device: torch.device) -> Tensor:
    """A one-element fp32 tensor on `device`, loaded in-kernel so a device scale never forces a host sync."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        return value.detach().reshape(1).to(device=device, dtype=torch.float32)
    if not isinstance(value, (int, float)) or not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite float or a tensor, got {value!r}")
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def _check_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype) -> tuple[Tensor, Tensor]:
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int8 tensor, got {_describe(t)}")
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"K mismatch: x_q is {tuple(x_q.shape)} (K={x_q.shape[1]}) but w_q is {tuple(w_q.shape)} "
                         f"(K={w_q.shape[1]}); w_q must be [N, K] like a torch.nn.Linear weight")  # fmt: skip
    n = w_q.shape[0]
    if not isinstance(w_scale, Tensor) or not w_scale.is_floating_point() or tuple(w_scale.shape) != (n,):
        raise ValueError(f"w_scale must be a float tensor of shape ({n},) (one per w_q row), got {_describe(w_scale)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be None or a float tensor of shape ({n},), got {_describe(bias)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {', '.join(map(str, _OUT_DTYPES))}, got {out_dtype}")
    for name, t in (("w_q", w_q), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != x_q.device:
            raise ValueError(f"{name} is on {t.device} but x_q is on {x_q.device}; put all operands on one device")
    return _scalar(x_scale, "x_scale", x_q.device), w_scale.to(torch.float32)


def int8_gemm(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float | Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    config: dict | None = None,
) -> Tensor:
    """out[M, N] = (x_q[M, K] @ w_q[N, K].T in int32) * x_scale * w_scale[N] + bias[N], stored as `out_dtype`.

    `config` ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}, optionally "num_warps"/"num_stages") skips the tuner.
    """
    xs, ws = _check_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    _require_triton()
    _launchable(x_q, "x_q")
    (m, k), n = x_q.shape, w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    ws = ws.contiguous()
    b = bias.contiguous() if bias is not None else ws  # never read when HAS_BIAS is False; any pointer will do

    def launch(cfg: dict) -> None:
        blocks, options = _tuning.launch_parameters(cfg, _BLOCKS)
        grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
        _int8_gemm_kernel[grid](
            x_q, w_q, out, xs, ws, b,
            m, n, k,
            x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None,
            enable_fp_fusion=False,
            **blocks, **options,
        )  # fmt: skip

    key = {"M": _tuning.next_power_of_2(m), "N": n, "K": k}
    _TUNER.launch(launch, _CONFIGS, key=key, dtypes=[x_q.dtype, out_dtype], device=x_q.device, config=config)
    return out


def int8_gemm_reference(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float | Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """`int8_gemm` in plain torch: the integer part in fp64 (exact: |sum| < 2**53), then the same fp32 epilogue."""
    xs, ws = _check_gemm(x_q, w_q, x_scale, w_scale, bias, out_dtype)
    acc = x_q.double() @ w_q.double().T
    out = acc.to(torch.float32) * xs
    out = out * ws
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _check_quantize(x, scale, mul, add) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"x must be a floating-point tensor of shape [..., K], got {_describe(x)}")
    k = x.shape[-1]
    for name, t in (("mul", mul), ("add", add)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (k,):
            raise ValueError(
                f"{name} must be None or a float tensor of shape ({k},) (x's last dim), got {_describe(t)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return _scalar(scale, "scale", x.device), x.reshape(-1, k) if x.numel() else x


def quantize_per_tensor(
    x: Tensor, scale: float | Tensor, mul: Tensor | None = None, add: Tensor | None = None
) -> Tensor:
    """int8 q = clamp(floor((x * mul + add) / scale + 0.5), -127, 127), same shape as x, in one pass over x.

    A float `scale` must be positive; a tensor one is not checked, since that would cost a device-to-host sync.
    """
    s, x2 = _check_quantize(x, scale, mul, add)
    _require_triton()
    _launchable(x, "x")
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0:
        return q
    r, k = x2.shape
    block_r, block_k = (4, 64) if _INTERPRET else (4, min(1024, triton.next_power_of_2(k)))
    grid = (triton.cdiv(r, block_r), triton.cdiv(k, block_k))
    _quantize_kernel[grid](
        x2, q, s, mul.contiguous() if mul is not None else s, add.contiguous() if add is not None else s,
        r, k, x2.stride(0), x2.stride(1),
        HAS_MUL=mul is not None, HAS_ADD=add is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q


def quantize_per_tensor_reference(
    x: Tensor, scale: float | Tensor, mul: Tensor | None = None, add: Tensor | None = None
) -> Tensor:
    """`quantize_per_tensor` in plain torch, op for op in fp32, so the int8 results are identical."""
    s, _ = _check_quantize(x, scale, mul, add)
    v = x.float()
    if mul is not None:
        v = v * mul.float()
    if add is not None:
        v = v + add.float()
    return torch.floor(v / s + 0.5).clamp(-127, 127).to(torch.int8)
