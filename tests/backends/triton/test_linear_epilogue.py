"""The Triton linear kernels with fused epilogues (bias + activation, SwiGLU) against their torch references.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small: M, N, K like 1, 7, 33,
61 leave partial tiles against the interpreter's 16 x 16 x 32 blocks in every dimension.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from txcompile.backends.triton.kernels.linear_epilogue import (  # noqa: E402
    ACTIVATIONS,
    linear_act,
    linear_act_reference,
    linear_swiglu,
    linear_swiglu_fused,
    linear_swiglu_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # x3 spreads pre-activations to about +-10: relu/silu/gelu all see their saturated tails, not just the middle.
    return (torch.randn(shape, device=DEVICE) * 3).to(dtype)


def _w(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # nn.Linear-like scale keeps outputs O(1..10) whatever K is, so fp32's default tolerance is about rounding only.
    return (torch.randn(n, k, device=DEVICE) / math.sqrt(max(k, 1))).to(dtype)


def _b(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, device=DEVICE).to(dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_act(dtype: torch.dtype, activation: str) -> None:
    for (m, n, k), with_bias in [((61, 33, 61), True), ((1, 7, 33), False)]:
        x, w = _x(m, k, dtype=dtype), _w(n, k, dtype)
        bias = _b(n, dtype) if with_bias else None
        out = linear_act(x, w, bias, activation)
        assert out.shape == (m, n) and out.dtype == dtype
        torch.testing.assert_close(out, linear_act_reference(x, w, bias, activation))


def test_linear_act_leading_dims_and_tiny_k() -> None:
    x, w, b = _x(2, 5, 33), _w(7, 33), _b(7)
    out = linear_act(x, w, b, "gelu")
    assert out.shape == (2, 5, 7)
    torch.testing.assert_close(out, linear_act_reference(x, w, b, "gelu"))
    torch.testing.assert_close(out[1, 3], linear_act(x[1, 3], w, b, "gelu"))  # 1-D x: one row, [N] out
    x, w = _x(7, 1), _w(33, 1)  # K = 1: a single, mostly masked, K block
    torch.testing.assert_close(linear_act(x, w, None, "silu"), linear_act_reference(x, w, None, "silu"))


def test_linear_act_non_contiguous() -> None:
    # A transposed view is the [N, K] weight stored K-major, the layout of a weight tied to or exported as W.T.
    w = _w(61, 33).T
    x = _x(7, 2 * 61)[:, ::2]  # every other column: stride_xk = 2
    assert not w.is_contiguous() and not x.is_contiguous() and w.shape == (33, 61)
    b = _b(40)[3:36]  # a sliced bias view: offset start, still unit stride
    out = linear_act(x, w, b, "gelu_tanh")
    torch.testing.assert_close(out, linear_act_reference(x.contiguous(), w.contiguous(), b, "gelu_tanh"))


def test_linear_act_empty_and_nan() -> None:
    b = _b(7)
    assert linear_act(_x(0, 33), _w(7, 33), b).shape == (0, 7)
    assert linear_act(_x(2, 0, 33), _w(7, 33), b).shape == (2, 0, 7)
    # K = 0: the sum is empty, so every row is act(bias), as with F.linear.
    torch.testing.assert_close(linear_act(_x(3, 0), _w(7, 0), b, "relu"), torch.relu(b).expand(3, 7))
    x = _x(3, 33)
    x[1, 4] = float("nan")
    out = linear_act(x, _w(7, 33), b, "relu")
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()  # relu passes NaN on like torch.relu


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_swiglu(dtype: torch.dtype, with_bias: bool) -> None:
    x = _x(3, 11, 61, dtype=dtype)  # M = 33 rows
    wg, wu = _w(33, 61, dtype), _w(33, 61, dtype)
    # One bias only: the two HAS_BIAS flags are independent, and a missing one must not borrow the other.
    bg, bu = (_b(33, dtype), None) if with_bias else (None, None)
    out = linear_swiglu(x, wg, wu, bg, bu)
    assert out.shape == (3, 11, 33) and out.dtype == dtype
    torch.testing.assert_close(out, linear_swiglu_reference(x, wg, wu, bg, bu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_swiglu_fused_is_gate_first(dtype: torch.dtype) -> None:
    x = _x(7, 33, dtype=dtype)
    wg, wu, bg, bu = _w(61, 33, dtype), _w(61, 33, dtype), _b(61, dtype), _b(61, dtype)
    # The layout fuse_qkv:gated_mlp=true writes: cat([gate; up]) along the output dim.
    fused = linear_swiglu_fused(x, torch.cat([wg, wu]), torch.cat([bg, bu]))
    # The halves are views into the same storage, so it is the very same kernel arithmetic: bit-identical.
    torch.testing.assert_close(fused, linear_swiglu(x, wg, wu, bg, bu), rtol=0, atol=0)
    torch.testing.assert_close(fused, linear_swiglu_reference(x, wg, wu, bg, bu))


def test_linear_swiglu_non_contiguous() -> None:
    x = _x(7, 33)
    w_gate_up = _w(2 * 17, 33).T.contiguous().T  # K-major storage, [2N, K] shape
    assert not w_gate_up.is_contiguous()
    out = linear_swiglu_fused(x, w_gate_up)
    w = w_gate_up.contiguous()
    torch.testing.assert_close(out, linear_swiglu_reference(x, w[:17], w[17:]))


def _bad(fn, needle: str, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=needle):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"weight": torch.zeros(4, 6)}, "K mismatch"),
        ({"weight": torch.zeros(4, 5, dtype=torch.float16)}, "dtype mismatch"),
        ({"weight": torch.zeros(5)}, "weight must be a 2-D"),
        ({"x": torch.zeros(3, 5, dtype=torch.int32)}, "x must be"),
        ({"x": torch.zeros(3, 5, dtype=torch.float64), "weight": torch.zeros(4, 5, dtype=torch.float64)}, "x must"),
        ({"x": torch.tensor(1.0)}, "x must be"),
        ({"bias": torch.zeros(5)}, r"bias must be None or a float tensor of shape \(4,\)"),
        ({"bias": torch.zeros(4, dtype=torch.int64)}, "bias"),
        ({"activation": "swish"}, "unknown activation 'swish'"),
        ({"activation": None}, "unknown activation"),
    ],
)
def test_linear_act_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"x": torch.zeros(3, 5), "weight": torch.zeros(4, 5), "bias": None, "activation": "gelu", **kwargs}
    for fn in (linear_act, linear_act_reference):
        _bad(fn, needle, **args)


def test_linear_swiglu_bad_inputs() -> None:
    x, w = torch.zeros(3, 5), torch.zeros(4, 5)
    for fn in (linear_swiglu, linear_swiglu_reference):
        _bad(fn, "same", x, w, torch.zeros(6, 5))
        _bad(fn, "K mismatch", x, w, torch.zeros(4, 7))
        _bad(fn, "dtype mismatch: x is torch.float32 but w_up is torch.float16", x, w, w.half())
        _bad(fn, "b_up", x, w, w, None, torch.zeros(3))
    _bad(linear_swiglu_fused, r"\[2N, K\]", x, torch.zeros(7, 5))
    _bad(linear_swiglu_fused, "b_gate_up", x, torch.zeros(8, 5), torch.zeros(4))
    _bad(linear_swiglu_fused, "K mismatch", x, torch.zeros(8, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_epilogue_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Sizes that exercise the autotuned (64..256-wide) tiles and their ragged edges, decoding (M = 1) included.
    for m, n, k in [(65, 33, 97), (257, 384, 1000), (1, 4096, 4096)]:
        x, w, wu, b = _x(m, k, dtype=dtype), _w(n, k, dtype), _w(n, k, dtype), _b(n, dtype)
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}  # cuBLAS and Triton sum K differently
        for activation in ACTIVATIONS:
            torch.testing.assert_close(
                linear_act(x, w, b, activation), linear_act_reference(x, w, b, activation), **tol
            )
        torch.testing.assert_close(linear_swiglu(x, w, wu, b, b), linear_swiglu_reference(x, w, wu, b, b), **tol)
