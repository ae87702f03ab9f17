"""The fused residual add + LayerNorm / RMSNorm Triton kernels against their plain-torch references.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small; the chunked path for rows
wider than one block is reached with a small `block` rather than with a huge row.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from txcompile.backends.triton.kernels.add_norm import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_reference,
    add_rms_norm,
    add_rms_norm_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = DEVICE):
    c = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype)
    # A fp32 weight with half inputs on purpose: the affine is applied in fp32 whatever the parameters' dtype.
    weight = torch.rand(c, device=device) + 0.5
    bias = torch.randn(c, device=device).to(dtype)
    return x, residual, weight, bias


def _check_layer_norm(x, residual, weight, bias, **kwargs) -> None:
    normed, summed = add_layer_norm(x, residual, weight, bias, **kwargs)
    ref_normed, ref_summed = add_layer_norm_reference(x, residual, weight, bias)
    assert normed.shape == x.shape and normed.dtype == x.dtype and summed.dtype == x.dtype
    # summed is the same fp32 add rounded once in both: bit-exact.
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref_normed)


def _check_rms_norm(x, residual, weight, **kwargs) -> None:
    normed, summed = add_rms_norm(x, residual, weight, **kwargs)
    ref_normed, ref_summed = add_rms_norm_reference(x, residual, weight)
    assert normed.shape == x.shape and normed.dtype == x.dtype and summed.dtype == x.dtype
    torch.testing.assert_close(summed, ref_summed, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 61), (2, 3, 97), (3, 384)])
def test_layer_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, residual, weight, bias = _inputs(shape, dtype)
    _check_layer_norm(x, residual, weight, bias)
    _check_layer_norm(x, None, weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 61), (2, 3, 97), (3, 384)])
def test_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, residual, weight, _ = _inputs(shape, dtype)
    _check_rms_norm(x, residual, weight)
    _check_rms_norm(x, None, None)


@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False), (False, True)])
def test_optional_affine(with_weight: bool, with_bias: bool) -> None:
    x, residual, weight, bias = _inputs((5, 61), torch.float16)
    _check_layer_norm(x, residual, weight if with_weight else None, bias if with_bias else None)
    if not with_bias:
        _check_rms_norm(x, residual, weight if with_weight else None)


def test_no_residual_returns_x_itself() -> None:
    x, _, weight, bias = _inputs((3, 7), torch.bfloat16)
    before = x.clone()
    for normed, summed in (add_layer_norm(x, None, weight, bias), add_rms_norm(x, None, weight)):
        assert summed is x
        assert normed.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,block", [(97, 16), (61, 8), (7, 1)])
def test_chunked_rows(c: int, block: int, dtype: torch.dtype) -> None:
    # block < C forces the loop over column chunks (and its ragged last chunk) on a row short enough to interpret.
    x, residual, weight, bias = _inputs((5, c), dtype)
    _check_layer_norm(x, residual, weight, bias, block=block)
    _check_layer_norm(x, None, None, None, block=block)
    _check_rms_norm(x, residual, weight, block=block)
    _check_rms_norm(x, None, None, block=block)
    # Chunking changes only the order of the fp32 sums, not the answer.
    one_block, _ = add_layer_norm(x, residual, weight, bias)
    chunked, _ = add_layer_norm(x, residual, weight, bias, block=block)
    torch.testing.assert_close(chunked, one_block)


@pytest.mark.parametrize("block", [None, 32])
def test_variance_with_large_mean(block: int | None) -> None:
    # std 1 around a mean of 3000. Any fp32 mean is off by about 3000 * 2**-24 ~ 2e-4, which is all the slack given;
    # E[s^2] - E[s]^2 would cancel 9e6 against 9e6 with an ulp of 1 there and lose the variance entirely.
    x = torch.randn(3, 97, device=DEVICE) + 3000.0
    residual = torch.randn(3, 97, device=DEVICE)
    normed, summed = add_layer_norm(x, residual, block=block)
    exact = torch.nn.functional.layer_norm(summed.double(), (97,), eps=1e-5)
    torch.testing.assert_close(normed.double(), exact, rtol=0, atol=2e-3)


def test_strided_and_batched_inputs() -> None:
    wide = torch.randn(4, 3, 80, device=DEVICE, dtype=torch.float16)
    x = wide[..., 5:66]  # rows 80 apart: read through the row stride, no copy
    residual = torch.randn(3, 61, 4, device=DEVICE, dtype=torch.float16).permute(2, 0, 1)  # column stride != 1
    assert not x.is_contiguous() and not residual.is_contiguous() and x.shape == residual.shape
    weight = torch.randn(61, device=DEVICE, dtype=torch.float16)
    _check_layer_norm(x, residual, weight, None)
    _check_rms_norm(x, residual, weight)
    normed, summed = add_rms_norm(x, residual, weight)
    assert normed.is_contiguous() and summed.is_contiguous()


def test_eps_is_used() -> None:
    # A constant row has zero variance, so the output is bias exactly and eps alone keeps rstd finite.
    x = torch.full((2, 7), 3.0, device=DEVICE)
    bias = torch.arange(7.0, device=DEVICE)
    normed, _ = add_layer_norm(x, None, None, bias, eps=1e-5)
    torch.testing.assert_close(normed, bias.expand(2, 7), rtol=0, atol=0)
    # RMS of a row of 3s is 3; with eps = 7 the scale is 1/sqrt(9 + 7) = 1/4.
    normed, _ = add_rms_norm(x, None, None, eps=7.0)
    torch.testing.assert_close(normed, torch.full((2, 7), 0.75, device=DEVICE))


def test_empty_input() -> None:
    x = torch.empty(0, 16, device=DEVICE)
    normed, summed = add_layer_norm(x, x.clone())
    assert normed.shape == (0, 16) and summed.shape == (0, 16)
    normed, summed = add_rms_norm(torch.empty(3, 0, device=DEVICE))
    assert normed.shape == (3, 0)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"x": torch.zeros(3, 5, dtype=torch.int32)}, "x must"),
        ({"x": torch.zeros(3, 5, dtype=torch.float64)}, "x must"),
        ({"x": torch.tensor(1.0)}, "x must"),
        ({"residual": torch.zeros(3, 4)}, "residual"),
        ({"residual": torch.zeros(5, 3)}, "residual"),
        ({"residual": torch.zeros(3, 5, dtype=torch.float16)}, "residual"),
        ({"residual": torch.zeros(3, 5, device="meta")}, "residual is on"),
        ({"weight": torch.ones(4)}, "weight"),
        ({"weight": torch.ones(5, dtype=torch.int64)}, "weight"),
        ({"bias": torch.ones(1, 5)}, "bias"),
        ({"eps": -1e-5}, "eps"),
        ({"eps": float("nan")}, "eps"),
    ],
)
def test_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"x": torch.zeros(3, 5), "residual": torch.zeros(3, 5), "weight": None, "bias": None, "eps": 1e-5}
    args.update(kwargs)
    for fn in (add_layer_norm, add_layer_norm_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)
    if "bias" not in kwargs:
        del args["bias"]
        for fn in (add_rms_norm, add_rms_norm_reference):
            with pytest.raises(ValueError, match=needle):
                fn(**args)


@pytest.mark.parametrize("block", [0, 3, 48, 2**17, 16.0])
def test_bad_block(block) -> None:
    for fn in (add_layer_norm, add_rms_norm):
        with pytest.raises(ValueError, match="block"):
            fn(torch.zeros(2, 5), block=block)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Real model widths, the widest one-block row, and rows past MAX_BLOCK that take the chunked path by default.
    for shape in [(37, 768), (4, 4096), (3, 8192), (2, 8193), (2, 3, 12288)]:
        x, residual, weight, bias = _inputs(shape, dtype, device="cuda")
        _check_layer_norm(x, residual, weight, bias)
        _check_rms_norm(x, residual, weight)
