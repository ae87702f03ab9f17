"""Linear layers with their elementwise tail fused into the GEMM epilogue: bias + activation, and SwiGLU.

    linear_act:           out[m, n] = act(sum_k x[m, k] * weight[n, k] + bias[n])
    linear_swiglu:        out[m, n] = silu(x @ w_gate.T + b_gate)[m, n] * (x @ w_up.T + b_up)[m, n]
    linear_swiglu_fused:  linear_swiglu with w_gate = w_gate_up[:N], w_up = w_gate_up[N:] (likewise the bias)

`x` is [..., K] (flattened to [M, K]; a copy only when its layout cannot be viewed that way), weights keep the
PyTorch linear layout [N, K] and are read transposed through their strides, so transposed or sliced views cost no
copy. x and the weights share one dtype out of fp32/fp16/bf16; the bias may be any float dtype. Products accumulate
in fp32 (`tl.dot`; fp32 operands use input_precision="ieee", i.e. no TF32, matching torch's default
`allow_tf32=False`), and the bias, the activation and the SwiGLU product all happen in fp32 on the tile still in
registers; the only rounding to the input dtype is the single store. That is one rounding fewer per intermediate
than eager torch in fp16/bf16, so the references compute in fp32 and cast once, which is what the kernels do.

Activations: "none", "relu" (NaN propagates, like torch), "silu" (x * sigmoid(x)), "gelu" (the erf form,
0.5 * x * (1 + erf(x / sqrt(2))), torch's default; `tl.math.erf` runs in the interpreter too) and "gelu_tanh"
(torch's approximate="tanh"). Triton has no tanh outside libdevice, whose extern calls the interpreter cannot run,
so "gelu_tanh" uses the identity 0.5 * (1 + tanh(u)) = sigmoid(2u): x * sigmoid(2u) with
u = sqrt(2/pi) * (x + 0.044715 x^3). It is the same function; the fp32 results differ from torch's tanh form by a
few ulp (and are more accurate for large negative x, where 1 + tanh(u) cancels).

Fused gate/up layout: the first N rows of `w_gate_up` are the gate (the input of silu), the last N the up
projection. That is the order `fuse_qkv:gated_mlp=true` writes: it concatenates [mlp.fc1; mlp.up] and
`anatomy` names the activated projection fc1. (Phi-3's fused `gate_up_proj`, chunked gate first, is the same;
a pass that emits [up; gate] would need the halves swapped before calling this.)

Memory traffic (the reason for fusing), with e bytes per element (4/2/2) and biases ignored (N elements each):
    linear_act fused: e*(M*K + N*K + M*N) -- read x and W, write out once.
    unfused, GEMM then separate bias-add and activation kernels: the [M, N] intermediate is written by the GEMM,
    read + written by the bias add, read + written by the activation: e*(M*K + N*K + 5*M*N), or e*(M*K + N*K +
    3*M*N) when the bias rides in addmm. Fusing saves 2*e*M*N to 4*e*M*N bytes.
    linear_swiglu fused: e*(M*K + 2*N*K + M*N) -- x read once for both products (each tile loads its x block once
    and feeds two dots), one [M, N] store.
    unfused, one fused gate_up GEMM (biases in addmm) writes 2*M*N, silu reads M*N of it and writes M*N, the
    multiply reads 2*M*N and writes M*N: e*(M*K + 2*N*K + 7*M*N); with separate gate and up GEMMs x is also read
    twice (+e*M*K). Fusing saves 6*e*M*N bytes, which dominates for prefill (M in the thousands, N ~ 2.7*K).
(Tile re-reads of x and W are the same in both and left out.) In decoding (M small) the weight term dominates and
the saving is launches rather than bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import tuning as _tuning
from ._common import (
    INTERPRET as _INTERPRET,
    describe as _describe,
    jit as _jit,
    launchable as _launchable,
    grouped_tile as _tile,
    tl,
    triton,
)

__all__ = [
    "ACTIVATIONS",
    "linear_act",
    "linear_act_reference",
    "linear_swiglu",
    "linear_swiglu_fused",
    "linear_swiglu_reference",
]

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu", "relu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Under the interpreter every program runs in Python: one small tile keeps the tests fast, and nothing is timed.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 1, "num_stages": 1}
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def _interpreted(config: dict | None, m: int, n: int) -> dict | None:
    # Under the interpreter one tile is one numpy op, so whole models (the backend's tests) take a big tile: a
    # MiniLM-sized GEMM drops from ~10 s to under 1 s. Small problems keep the small tile, which covers edges better.
    if config is None and _INTERPRET and m >= 64 and n >= 128:
        return {**_INTERPRETER_CONFIG, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    return config


def _configs(shapes: list) -> tuple:
    if _INTERPRET:
        return (_INTERPRETER_CONFIG,)
    return tuple(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s}
        for m, n, k, w, s in shapes
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first is the default when nothing is timed, so it is one
# that fits shared memory in fp32 too; the tuner skips the others where they do not fit.
_ACT_CONFIGS = _configs([
    (64, 64, 64, 4, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (32, 64, 64, 4, 4),  # small M (decoding): a narrow M tile wastes less of the tensor core work
])  # fmt: skip
# Two fp32 accumulators and two W tiles per stage: half the N extent keeps registers and shared memory where the
# single-accumulator kernel has them.
_SWIGLU_CONFIGS = _configs([
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 32, 4, 4),
    (32, 64, 64, 4, 4),
])  # fmt: skip
_ACT_TUNER = _tuning.Tuner("linear_act", __file__)
_SWIGLU_TUNER = _tuning.Tuner("linear_swiglu", __file__)


@_jit
def _sigmoid(z):
    # exp of -|z| only: never overflows, so large |z| saturates to exactly 0 or 1 without an inf intermediate.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@_jit
def _activate(v, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh is available that the interpreter can run (see module doc).
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = v * _sigmoid(2.0 * u)
    elif ACTIVATION == "silu":
        v = v * _sigmoid(v)
    elif ACTIVATION == "relu":
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return v


@_jit
def _operand(ptrs, mask, UPCAST: tl.constexpr):
    t = tl.load(ptrs, mask=mask, other=0.0)
    # The interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit patterns (triton#11584);
    # bf16 -> fp32 is exact and so are bf16 x bf16 products in fp32, so the upcast changes nothing but speed.
    if UPCAST:
        t = t.to(tl.float32)
    return t


@_jit
def _linear_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        # Zero-fill past the edges: a zero operand adds nothing to the dot, so ragged K needs no separate tail loop.
        a = _operand(x_ptrs, m_ok & (offs_k[None, :] < k_left), UPCAST)
        b = _operand(w_ptrs, (offs_k[:, None] < k_left) & n_ok, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Bias and activation on the fp32 tile in registers instead of two more passes over an [M, N] intermediate.
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = _activate(acc, ACTIVATION)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok)


@_jit
def _linear_swiglu_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_gn, stride_gk, stride_un, stride_uk, stride_om, stride_on,
    HAS_BIAS_G: tl.constexpr, HAS_BIAS_U: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Separate strides per weight: the halves of a fused [2N, K] weight are just two row-offset views of it.
    g_ptrs = wg_ptr + offs_k[:, None] * stride_gk + offs_n.to(tl.int64)[None, :] * stride_gn
    u_ptrs = wu_ptr + offs_k[:, None] * stride_uk + offs_n.to(tl.int64)[None, :] * stride_un
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        k_ok = offs_k[:, None] < k_left
        # One x block feeds both products: x is read once where two linears would read it twice.
        a = _operand(x_ptrs, m_ok & (offs_k[None, :] < k_left), UPCAST)
        acc_g = tl.dot(a, _operand(g_ptrs, k_ok & n_ok, UPCAST), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, _operand(u_ptrs, k_ok & n_ok, UPCAST), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk

    n_mask = offs_n < N
    if HAS_BIAS_G:
        acc_g = acc_g + tl.load(bg_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_U:
        acc_u = acc_u + tl.load(bu_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = _activate(acc_g, "silu") * acc_u
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton linear-epilogue kernels need the `triton` package: pip install triton")


def _check_x(x: object) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES or x.dim() == 0:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor of shape [..., K], got {_describe(x)}")


def _check_weight(x: Tensor, w: object, name: str) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, K] tensor like a torch.nn.Linear weight, got {_describe(w)}")
    if w.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: x is {x.dtype} but {name} is {w.dtype}; cast one so they agree")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)} (K={x.shape[-1]}) but {name} is {tuple(w.shape)} "
                         f"(K={w.shape[1]}); {name} must be [N, K] like a torch.nn.Linear weight")  # fmt: skip
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device} but x is on {x.device}; put all operands on one device")


def _check_bias(x: Tensor, b: object, n: int, name: str) -> None:
    if b is None:
        return
    if not isinstance(b, Tensor) or not b.is_floating_point() or tuple(b.shape) != (n,):
        raise ValueError(f"{name} must be None or a float tensor of shape ({n},), got {_describe(b)}")
    if b.device != x.device:
        raise ValueError(f"{name} is on {b.device} but x is on {x.device}; put all operands on one device")


def _check_act(x, weight, bias, activation) -> None:
    _check_x(x)
    _check_weight(x, weight, "weight")
    _check_bias(x, bias, weight.shape[0], "bias")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def _check_swiglu(x, w_gate, w_up, b_gate, b_up) -> None:
    _check_x(x)
    _check_weight(x, w_gate, "w_gate")
    _check_weight(x, w_up, "w_up")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must have the same [N, K] shape")
    _check_bias(x, b_gate, w_gate.shape[0], "b_gate")
    _check_bias(x, b_up, w_up.shape[0], "b_up")


def _split_fused(x, w_gate_up, b_gate_up) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if not isinstance(w_gate_up, Tensor) or w_gate_up.dim() != 2 or w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must be a 2-D [2N, K] tensor (gate rows first), got {_describe(w_gate_up)}")
    n = w_gate_up.shape[0] // 2
    if b_gate_up is not None and (
        not isinstance(b_gate_up, Tensor) or not b_gate_up.is_floating_point() or tuple(b_gate_up.shape) != (2 * n,)
    ):
        raise ValueError(f"b_gate_up must be None or a float tensor of shape ({2 * n},), got {_describe(b_gate_up)}")
    # Views, not copies: the kernel reads each half through its own base pointer and strides.
    b_gate, b_up = (b_gate_up[:n], b_gate_up[n:]) if b_gate_up is not None else (None, None)
    return w_gate_up[:n], w_gate_up[n:], b_gate, b_up


def _rows(x: Tensor) -> Tensor:
    # An explicit row count: reshape(-1, K) is ambiguous when the tensor is empty.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _dot_flags(dtype: torch.dtype) -> dict:
    # "ieee" keeps fp32 products exact like torch's default matmul (no TF32); 16-bit operands get triton's default.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return {"DOT_PRECISION": precision, "UPCAST": _INTERPRET and dtype == torch.bfloat16}


def linear_act(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none", *, config: dict | None = None
) -> Tensor:
    """act(x[..., K] @ weight[N, K].T + bias[N]) as [..., N] in x's dtype, in one kernel (fp32 accumulate/epilogue).

    `config` ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}, optionally "num_warps"/"num_stages") skips the tuner.
    """
    _check_act(x, weight, bias, activation)
    _require_triton()
    _launchable(x, "x")
    x2 = _rows(x)
    (m, k), n = x2.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        b = bias.contiguous() if bias is not None else out  # never read when HAS_BIAS is False; any pointer will do

        def launch(cfg: dict) -> None:
            blocks, options = _tuning.launch_parameters(cfg, _BLOCKS)
            grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
            _linear_act_kernel[grid](
                x2, weight, b, out,
                m, n, k,
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                HAS_BIAS=bias is not None, ACTIVATION=activation, **_dot_flags(x.dtype), **blocks, **options,
            )  # fmt: skip

        key = {"M": _tuning.next_power_of_2(m), "N": n, "K": k, "activation": activation}
        _ACT_TUNER.launch(
            launch, _ACT_CONFIGS, key=key, dtypes=[x.dtype], device=x.device, config=_interpreted(config, m, n)
        )
    return out.reshape(*x.shape[:-1], n)


def linear_swiglu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    *,
    config: dict | None = None,
) -> Tensor:
    """silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up) as [..., N] in x's dtype: two accumulators, one store.

    `config` as for `linear_act`.
    """
    _check_swiglu(x, w_gate, w_up, b_gate, b_up)
    _require_triton()
    _launchable(x, "x")
    x2 = _rows(x)
    (m, k), n = x2.shape, w_gate.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        bg = b_gate.contiguous() if b_gate is not None else out  # never read without its HAS_BIAS flag
        bu = b_up.contiguous() if b_up is not None else out

        def launch(cfg: dict) -> None:
            blocks, options = _tuning.launch_parameters(cfg, _BLOCKS)
            grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
            _linear_swiglu_kernel[grid](
                x2, w_gate, w_up, bg, bu, out,
                m, n, k,
                x2.stride(0), x2.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
                out.stride(0), out.stride(1),
                HAS_BIAS_G=b_gate is not None, HAS_BIAS_U=b_up is not None, **_dot_flags(x.dtype),
                **blocks, **options,
            )  # fmt: skip

        key = {"M": _tuning.next_power_of_2(m), "N": n, "K": k}
        _SWIGLU_TUNER.launch(
            launch, _SWIGLU_CONFIGS, key=key, dtypes=[x.dtype], device=x.device, config=_interpreted(config, m, n)
        )
    return out.reshape(*x.shape[:-1], n)


def linear_swiglu_fused(
    x: Tensor, w_gate_up: Tensor, b_gate_up: Tensor | None = None, *, config: dict | None = None
) -> Tensor:
    """`linear_swiglu` on a fused [2N, K] weight whose first N rows are the gate (fuse_qkv's [fc1; up] order)."""
    return linear_swiglu(x, *_split_fused(x, w_gate_up, b_gate_up), config=config)


def _activate_reference(v: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(v)
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if activation == "silu":
        return F.silu(v)
    if activation == "relu":
        return F.relu(v)
    return v


def linear_act_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """`linear_act` in plain torch: F.linear and the activation in fp32, one cast to x's dtype at the end."""
    _check_act(x, weight, bias, activation)
    v = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    return _activate_reference(v, activation).to(x.dtype)


def linear_swiglu_reference(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None, b_up: Tensor | None = None
) -> Tensor:
    """`linear_swiglu` in plain torch: both linears, silu and the product in fp32, one cast to x's dtype."""
    _check_swiglu(x, w_gate, w_up, b_gate, b_up)
    xf = x.float()
    gate = F.linear(xf, w_gate.float(), b_gate.float() if b_gate is not None else None)
    up = F.linear(xf, w_up.float(), b_up.float() if b_up is not None else None)
    return (F.silu(gate) * up).to(x.dtype)
