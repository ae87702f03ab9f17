"""Quantized linear layers that compute in integers: the runtime half of the `quantize` pass.

- `txc::quantize_act(x [.., K], scale, mul [K]?, add [K]?) -> int8`: `clamp(round((x * mul + add) / scale), ±127)`.
  The optional per-channel affine is the reparameterization that cannot be folded into a norm (SmoothQuant / RepQuant
  channel scales and shifts); fusing it here makes it free: quantizing reads `x` once either way.
- `txc::int8_linear(x_q int8 [.., K], x_scale, w_q int8 [N, K], w_scale [N], bias?, activation, out_dtype)`:
  `act((x_q @ w_q^T) * x_scale * w_scale + bias)` with the product accumulated in int32 and the dequantization, bias
  and activation (`"none"`, `"gelu"`, `"gelu_tanh"`) applied in the GEMM's epilogue.
- `txc::weight_only_linear(x, w_q, w_scale, bias?, bits, group_size)`: `x @ dequant(w_q)^T + bias` for int8
  (per output channel) or int4 (two per byte, group-wise scales) weights; activations stay in floating point.

Kernels, chosen by device, each checked against `*_reference` in the tests:
- CPU: oneDNN's u8/s8 x s8 GEMM (`onednn::qlinear_pointwise`, prepacked once per weight and cached). On CPUs
  without VNNI (AVX2), the u8·s8 pair products are summed in int16 and saturate unless one operand uses 7 bits, so
  there the `quantize` pass stores weights in ±63 (`weight_levels()`); a program whose weights use the full ±127
  range (converted on a VNNI machine, or on a GPU) runs the exact reference path instead of a saturating kernel.
  Measured here (AMD EPYC, AVX2, 2 threads, [1024, 384] x [384, 1536]): `torch._int_mm` about 60x slower than fp32,
  `_weight_int8pack_mm` 15x and `_weight_int4pack_mm_for_cpu` 40x slower, oneDNN/fbgemm u8s8 0.95-1.7x fp32 (noisy).
  Weight-only layers therefore dequantize into a float matmul on CPU: they save memory, not time.
- CUDA: the Triton int8 GEMM with the dequantize epilogue (`backends/triton/kernels/int8_gemm.py`).
- Anything else: the reference (dequantize, float matmul), exact up to float rounding.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "dequantize_int4",
    "int8_linear",
    "int8_linear_reference",
    "pack_int4",
    "quantize_act",
    "quantize_act_reference",
    "weight_levels",
    "weight_only_linear",
]

ACTIVATIONS = ("none", "gelu", "gelu_tanh")
LEVELS = 127  # symmetric int8: -127..127 (no -128, so negation and the u8 offset stay in range)


@functools.cache
def full_range_int8() -> bool:
    """Whether this CPU multiplies u8 x s8 without int16 saturation (VNNI / AMX int8 instructions)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def weight_levels(device: torch.device | str = "cpu") -> int:
    """The largest int8 weight magnitude the fast kernel on `device` multiplies exactly: 127, or 63 on AVX2 CPUs."""
    return LEVELS if torch.device(device).type != "cpu" or full_range_int8() else 63


def _check(op: str, cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"txc::{op}: {msg}")


def _per_channel(op: str, name: str, t: Tensor | None, k: int) -> None:
    _check(
        op,
        t is None or (t.dim() == 1 and t.shape[0] == k),
        f"{name} must be [{k}], got {None if t is None else tuple(t.shape)}",
    )


def quantize_act_reference(x: Tensor, scale: Tensor, mul: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    v = x.float()
    if mul is not None:
        v = v * mul.float()
    if add is not None:
        v = v + add.float()
    return torch.round(v / scale.float()).clamp_(-LEVELS, LEVELS).to(torch.int8)


@torch.library.custom_op("txc::quantize_act", mutates_args=())
def quantize_act(x: Tensor, scale: Tensor, mul: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """Symmetric per-tensor int8 of `x * mul + add` (scale: a 0-d float tensor)."""
    _check("quantize_act", x.is_floating_point() and x.dim() >= 1, f"x must be a float tensor, got {x.dtype}")
    _check("quantize_act", scale.numel() == 1, f"scale must be one value, got shape {tuple(scale.shape)}")
    _per_channel("quantize_act", "mul", mul, x.shape[-1])
    _per_channel("quantize_act", "add", add, x.shape[-1])
    if x.device.type == "cuda" and _triton() is not None:
        return _triton().quantize_per_tensor(x, scale, mul, add)
    # One fused affine, then in-place rounding: the pass reads x once and writes one float temporary.
    inv = 1.0 / scale.float()
    m = inv if mul is None else mul.float() * inv
    v = torch.mul(x.float(), m) if add is None else torch.addcmul(add.float() * inv, x.float(), m.expand(x.shape[-1]))
    return v.round_().clamp_(-LEVELS, LEVELS).to(torch.int8)


@quantize_act.register_fake
def _(x: Tensor, scale: Tensor, mul: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


def _epilogue(y: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def int8_linear_reference(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    # float64 holds every int32 partial sum exactly (|sum| < 127 * 127 * K < 2^53).
    acc = x_q.double() @ w_q.double().t()
    y = _epilogue((acc * (x_scale.double() * w_scale.double())).float(), bias, activation)
    return y.to(out_dtype or torch.float32)


# Per int8 weight tensor: its oneDNN prepacked form (None if the CPU kernel would saturate on it), dropped when the
# weight is freed. Packing costs about as much as one GEMM, so it is done once per weight, not per call.
_PACKED: dict[tuple[int, int], tuple[weakref.ref[Tensor], Tensor | None]] = {}


def _packed(w_q: Tensor) -> Tensor | None:
    key = (w_q.data_ptr(), w_q._version)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is w_q:
        return hit[1]
    fits = full_range_int8() or w_q.numel() == 0 or int(w_q.abs().max()) <= weight_levels("cpu")
    packed = torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None) if fits else None
    _PACKED[key] = (weakref.ref(w_q, lambda _r, k=key: _PACKED.pop(k, None)), packed)
    return packed


@functools.cache
def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@functools.cache
def _triton():  # noqa: ANN202 - the kernel module, or None without triton
    try:
        from ..backends.triton.kernels import int8_gemm
    except ImportError:
        return None
    from ..backends.triton import available

    return int8_gemm if available() else None


def _check_linear(x_q: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, activation: str) -> None:
    op = "int8_linear"
    _check(
        op,
        x_q.dtype == torch.int8 and w_q.dtype == torch.int8,
        f"x_q and w_q must be int8, got {x_q.dtype}, {w_q.dtype}",
    )
    _check(
        op,
        w_q.dim() == 2 and x_q.shape[-1] == w_q.shape[1],
        f"x_q [.., K] and w_q [N, K] disagree: {tuple(x_q.shape)}, {tuple(w_q.shape)}",
    )
    _per_channel(op, "w_scale", w_scale, w_q.shape[0])
    _per_channel(op, "bias", bias, w_q.shape[0])
    _check(op, activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@torch.library.custom_op("txc::int8_linear", mutates_args=())
def int8_linear(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """`act(x_q @ w_q^T * x_scale * w_scale + bias)`: int8 operands, int32 accumulation, dequantizing epilogue."""
    _check_linear(x_q, w_q, w_scale, bias, activation)
    out_dtype = out_dtype or torch.float32
    lead, k, n = x_q.shape[:-1], x_q.shape[-1], w_q.shape[0]
    x2 = x_q.reshape(-1, k)
    if x_q.device.type == "cuda" and _triton() is not None:
        y = _triton().int8_gemm(x2, w_q, x_scale, w_scale.float(), None, torch.float32)
        return _epilogue(y, bias, activation).to(out_dtype).reshape(*lead, n)
    packed = _packed(w_q) if x_q.device.type == "cpu" and _onednn() and x2.shape[0] > 0 else None
    if packed is not None:
        post = {"none": ("none", [None], ""), "gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh")}
        name, args, algo = post[activation]
        y = torch.ops.onednn.qlinear_pointwise.default(
            x2.contiguous(),
            float(x_scale),
            0,
            packed,
            w_scale.float(),
            _zeros(n),
            None if bias is None else bias.float(),
            1.0,
            0,
            torch.float32,
            name,
            args,
            algo,
        )
        return y.to(out_dtype).reshape(*lead, n)
    return int8_linear_reference(x2, x_scale, w_q, w_scale, bias, activation, out_dtype).reshape(*lead, n)


@functools.cache
def _zeros(n: int) -> Tensor:  # the weights' zero points: symmetric, so all zero
    return torch.zeros(n, dtype=torch.int64)


@int8_linear.register_fake
def _(
    x_q: Tensor,
    x_scale: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    _check_linear(x_q, w_q, w_scale, bias, activation)
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype or torch.float32)


def pack_int4(q: Tensor) -> Tensor:
    """int4 values in [-8, 7], [N, K] with K even -> uint8 [N, K/2]: column 2j in the low nibble, 2j+1 in the high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def dequantize_int4(packed: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """uint8 [N, K/2] and group scales [N, K/group_size] -> float [N, K]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    q = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)
    return (q.view(q.shape[0], -1, group_size) * scale.unsqueeze(-1)).reshape(q.shape)


def _check_weight_only(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, bits: int, group_size: int
) -> None:
    op = "weight_only_linear"
    _check(op, bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    want = torch.int8 if bits == 8 else torch.uint8
    _check(
        op, w_q.dtype == want and w_q.dim() == 2, f"w_q must be a 2-D {want} tensor for {bits} bits, got {w_q.dtype}"
    )
    k = w_q.shape[1] * (2 if bits == 4 else 1)
    _check(op, x.shape[-1] == k, f"x [.., K] and the weight disagree: K={x.shape[-1]} vs {k}")
    groups = 1 if bits == 8 else k // max(group_size, 1)
    _check(op, bits == 8 or (group_size > 0 and k % group_size == 0), f"group_size {group_size} must divide K={k}")
    want_scale = (w_q.shape[0],) if bits == 8 else (w_q.shape[0], groups)
    _check(op, tuple(w_scale.shape) == want_scale, f"w_scale must be {list(want_scale)}, got {list(w_scale.shape)}")
    _per_channel(op, "bias", bias, w_q.shape[0])


@torch.library.custom_op("txc::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, bits: int = 8, group_size: int = 0
) -> Tensor:
    """`x @ dequant(w_q)^T + bias`, weights stored as int8 (per channel) or packed int4 (per group)."""
    _check_weight_only(x, w_q, w_scale, bias, bits, group_size)
    if bits == 8:
        w = w_q.to(x.dtype).mul_(w_scale.to(x.dtype)[:, None])
    else:
        w = dequantize_int4(w_q, w_scale.to(x.dtype), group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@weight_only_linear.register_fake
def _(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, bits: int = 8, group_size: int = 0
) -> Tensor:
    _check_weight_only(x, w_q, w_scale, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
