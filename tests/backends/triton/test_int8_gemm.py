"""The Triton int8 GEMM (fused dequantize epilogue) and the fused activation quantizer against their torch references.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from txcompile.backends.triton import available  # noqa: E402
from txcompile.backends.triton.kernels.int8_gemm import (  # noqa: E402
    int8_gemm,
    int8_gemm_reference,
    quantize_per_tensor,
    quantize_per_tensor_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1), (7, 13, 5), (37, 29, 53), (64, 64, 64), (65, 33, 97)]


def _operands(m: int, n: int, k: int, device: str = DEVICE):
    # The full int8 range, -128 included: the GEMM must not assume symmetric inputs even though quantize emits them.
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    w_scale = torch.rand(n, device=device) * 0.02 + 1e-3
    bias = torch.randn(n, device=device)
    return x_q, w_q, w_scale, bias


def test_available() -> None:
    assert available()


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_integer_part_exact(m: int, n: int, k: int) -> None:
    # Unit scales and no bias expose the raw int32 accumulator; |sum| < 2**24 here, so fp32 holds it exactly.
    x_q, w_q, _, _ = _operands(m, n, k)
    out = int8_gemm(x_q, w_q, 1.0, torch.ones(n, device=DEVICE))
    expected = (x_q.long().cpu() @ w_q.long().cpu().T).to(torch.float32)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_fp32(m: int, n: int, k: int, with_bias: bool) -> None:
    x_q, w_q, w_scale, bias = _operands(m, n, k)
    bias = bias if with_bias else None
    out = int8_gemm(x_q, w_q, 0.05, w_scale, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, int8_gemm_reference(x_q, w_q, 0.05, w_scale, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_half_outputs(out_dtype: torch.dtype, with_bias: bool) -> None:
    x_q, w_q, w_scale, bias = _operands(37, 29, 53)
    bias = bias.to(out_dtype) if with_bias else None
    out = int8_gemm(x_q, w_q, 0.01, w_scale, bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, int8_gemm_reference(x_q, w_q, 0.01, w_scale, bias, out_dtype=out_dtype))


@pytest.mark.parametrize("view", ["column_slice", "transposed"])
def test_gemm_non_contiguous_x(view: str) -> None:
    k = 45
    if view == "column_slice":
        x_q = torch.randint(-128, 128, (23, 2 * k + 3), dtype=torch.int8, device=DEVICE)[:, 3 : 3 + 2 * k : 2]
    else:
        x_q = torch.randint(-128, 128, (k, 23), dtype=torch.int8, device=DEVICE).T
    assert not x_q.is_contiguous() and x_q.shape == (23, k)
    _, w_q, w_scale, bias = _operands(23, 19, k)
    w_q = w_q.T.contiguous().T  # W stored column-major: the kernel reads both layouts through strides
    out = int8_gemm(x_q, w_q, 0.02, w_scale, bias)
    expected = int8_gemm_reference(x_q.contiguous(), w_q.contiguous(), 0.02, w_scale, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_x_scale_float_and_tensor_agree() -> None:
    x_q, w_q, w_scale, bias = _operands(7, 13, 37)
    as_float = int8_gemm(x_q, w_q, 0.0375, w_scale, bias)
    as_tensor = int8_gemm(x_q, w_q, torch.tensor(0.0375, device=DEVICE), w_scale, bias)
    torch.testing.assert_close(as_float, as_tensor, rtol=0, atol=0)
    torch.testing.assert_close(as_tensor, int8_gemm_reference(x_q, w_q, 0.0375, w_scale, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (5, 7), (3, 4, 33), (2, 130)])
@pytest.mark.parametrize("affine", [False, True])
def test_quantize_matches_reference(shape: tuple[int, ...], affine: bool) -> None:
    # scale is a power of two so x / scale is exact: every third value sits exactly on a .5 tie, and the x16 spread
    # pushes a few percent of values past +-127 into the clamp.
    scale = 0.25
    x = torch.randn(shape, device=DEVICE) * 16.0
    flat = x.view(-1)
    flat[::3] = (torch.floor(flat[::3] / scale) + 0.5) * scale
    k = shape[-1]
    mul = torch.randn(k, device=DEVICE) if affine else None
    add = torch.randn(k, device=DEVICE) if affine else None
    q = quantize_per_tensor(x, scale, mul, add)
    ref = quantize_per_tensor_reference(x, scale, mul, add)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, ref)
    if x.numel() > 100:
        assert bool((ref.abs() == 127).any())


def test_quantize_ties_clamp_and_inputs() -> None:
    x = torch.tensor([[0.5, -0.5, 1.5, -1.5, 2.5, 1e9, -1e9, 126.6, -127.4, 0.0]], device=DEVICE)
    q = quantize_per_tensor(x, torch.tensor(1.0, device=DEVICE))
    assert q.cpu().tolist() == [[1, 0, 2, -1, 3, 127, -127, 127, -127, 0]]  # half up, then clamp
    assert torch.equal(q, quantize_per_tensor_reference(x, 1.0))
    # Half-precision input and a non-contiguous view go through the same single pass.
    xh = (torch.randn(9, 40, device=DEVICE) * 3).to(torch.float16)[:, ::2]
    assert torch.equal(quantize_per_tensor(xh, 0.03), quantize_per_tensor_reference(xh, 0.03))


def test_quantize_then_gemm_round_trip() -> None:
    x = torch.randn(11, 48, device=DEVICE)
    w = torch.randn(17, 48, device=DEVICE)
    x_scale = x.abs().max() / 127
    w_scale = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    out = int8_gemm(quantize_per_tensor(x, x_scale), w_q, x_scale, w_scale)
    exact = x @ w.T
    assert (out - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"x_q": torch.zeros(3, 5)}, "x_q"),
        ({"w_q": torch.zeros(4, 5, dtype=torch.int32)}, "w_q"),
        ({"w_q": torch.zeros(4, 6, dtype=torch.int8)}, "K mismatch"),
        ({"w_scale": torch.ones(3)}, "w_scale"),
        ({"w_scale": torch.ones(4, dtype=torch.int32)}, "w_scale"),
        ({"bias": torch.ones(5)}, "bias"),
        ({"x_scale": torch.ones(2)}, "x_scale"),
        ({"x_scale": -1.0}, "x_scale"),
        ({"out_dtype": torch.int32}, "out_dtype"),
    ],
)
def test_gemm_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"x_q": torch.zeros(3, 5, dtype=torch.int8), "w_q": torch.zeros(4, 5, dtype=torch.int8)}
    args.update(x_scale=1.0, w_scale=torch.ones(4), bias=None)
    args.update(kwargs)
    for fn in (int8_gemm, int8_gemm_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"x": torch.zeros(2, 3, dtype=torch.int8)}, "x must"),
        ({"mul": torch.ones(4)}, "mul"),
        ({"add": torch.ones(2)}, "add"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_quantize_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"x": torch.zeros(2, 3), "scale": 1.0, **kwargs}
    for fn in (quantize_per_tensor, quantize_per_tensor_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gemm_cuda(out_dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Sizes that exercise the autotuned (64/128-wide) tiles and their ragged edges.
    for m, n, k in [(65, 33, 97), (257, 384, 1000), (1, 4096, 4096)]:
        x_q, w_q, w_scale, bias = _operands(m, n, k, device="cuda")
        out = int8_gemm(x_q, w_q, 0.01, w_scale, bias.to(out_dtype), out_dtype=out_dtype)
        ref = int8_gemm_reference(x_q, w_q, 0.01, w_scale, bias.to(out_dtype), out_dtype=out_dtype)
        tol = {"rtol": 1e-5, "atol": 1e-5} if out_dtype == torch.float32 else {}
        torch.testing.assert_close(out, ref, **tol)
        q = quantize_per_tensor(x_q.float() * 0.3, 0.2)
        assert torch.equal(q, quantize_per_tensor_reference(x_q.float() * 0.3, 0.2))
