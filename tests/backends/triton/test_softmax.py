"""The fused scale + bias + row softmax Triton kernel against its plain-torch reference.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small; the online (chunked) path
for rows wider than one block is reached with a small `block` rather than with a huge row.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from txcompile.backends.triton.kernels.softmax import softmax, softmax_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def _check(x, bias=None, scale=1.0, **kwargs) -> torch.Tensor:
    out = softmax(x, bias, scale, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, softmax_reference(x, bias, scale))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 61), (2, 3, 97), (3, 384)])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    out = _check(x)
    _check(x, scale=0.125)
    torch.testing.assert_close(out.float().sum(-1), torch.ones(shape[:-1], device=DEVICE), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "bias_shape",
    [
        (2, 1, 1, 97),  # padding mask: one row per batch element, shared by heads and queries
        (2, 1, 5, 97),  # per-batch [Tq, Tk] mask
        (1, 3, 5, 97),  # per-head bias (ALiBi-like), shared by the batch
        (3, 1, 1),  # per-head scalar, broadcast along the row as well
        (97,),
        (5, 1),
        (2, 3, 5, 97),
    ],
)
def test_broadcast_bias(bias_shape: tuple[int, ...]) -> None:
    x = torch.randn(2, 3, 5, 97, device=DEVICE, dtype=torch.float16)
    # fp32 bias with fp16 scores, the usual mixed case for additive attention masks.
    bias = torch.randn(bias_shape, device=DEVICE) * 2
    _check(x, bias, scale=0.3)
    _check(x, bias.to(torch.bfloat16), scale=0.3, block=32)


def test_strided_bias_and_x() -> None:
    x = torch.randn(2, 3, 100, device=DEVICE)[..., 1:98]  # rows 100 apart, read in place
    bias = torch.randn(2, 97, 3, device=DEVICE).transpose(1, 2)  # column stride 3
    assert not x.is_contiguous() and not bias.is_contiguous()
    _check(x, bias, scale=0.5)
    _check(x, bias, scale=0.5, block=16)
    # Leading dims that cannot be merged into three (x is 5-D, broadcast in alternate dims): the bias is copied.
    x5 = torch.randn(2, 3, 2, 3, 11, device=DEVICE)
    _check(x5, torch.randn(2, 1, 2, 1, 11, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,block", [(97, 16), (61, 8), (7, 1)])
def test_online_path(n: int, block: int, dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, n, device=DEVICE) * 4).to(dtype)
    bias = torch.randn(2, 1, n, device=DEVICE)
    chunked = _check(x, bias, scale=0.7, block=block)
    # Chunking changes only the rounding of the fp32 sums, not the answer.
    torch.testing.assert_close(chunked, softmax(x, bias, 0.7))


def test_online_rescales_growing_max() -> None:
    # Ascending rows: every chunk brings a new max and the running sum must be rescaled by up to e**-60 each time;
    # the last row starts with a fully masked chunk, where the running max is still -inf.
    x = torch.linspace(-30.0, 30.0, 97, device=DEVICE).repeat(3, 1)
    x[1] = x[1].flip(0)
    x[2, :40] = NEG_INF
    _check(x, scale=2.0, block=16)
    # Large logits: a softmax without the max shift would overflow exp in fp32.
    _check(torch.randn(4, 61, device=DEVICE) * 1000, block=8)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zeros(dtype: torch.dtype, block: int | None) -> None:
    x = torch.randn(2, 3, 4, 37, device=DEVICE).to(dtype)
    x[0, 1, 2] = NEG_INF  # masked in the scores themselves
    bias = torch.zeros(2, 1, 4, 37, device=DEVICE)
    bias[1, :, 3] = NEG_INF  # masked by the bias, for every head
    bias[1, :, 0, :20] = NEG_INF  # partly masked rows stay ordinary softmaxes
    out = _check(x, bias, 0.5, block=block)
    assert not out.isnan().any()
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 3] == 0).all()
    assert (out[1, :, 0, :20] == 0).all() and (out[1, :, 0, 20:] > 0).all()
    # The zeros are what torch's SDPA-internal safe softmax gives.
    safe = torch.ops.aten._safe_softmax(x.float() * 0.5 + bias, -1).to(dtype)
    torch.testing.assert_close(out, safe)


def test_empty_input() -> None:
    assert softmax(torch.empty(0, 5, device=DEVICE)).shape == (0, 5)
    assert softmax(torch.empty(3, 0, device=DEVICE), torch.empty(0, device=DEVICE)).shape == (3, 0)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"x": torch.zeros(3, 5, dtype=torch.int32)}, "x must"),
        ({"x": torch.zeros(3, 5, dtype=torch.float64)}, "x must"),
        ({"x": torch.tensor(1.0)}, "x must"),
        ({"bias": torch.zeros(3, 5, dtype=torch.bool)}, "boolean mask"),
        ({"bias": torch.zeros(5, dtype=torch.int64)}, "bias must"),
        ({"bias": torch.zeros(4)}, "does not broadcast"),
        ({"bias": torch.zeros(2, 3, 5)}, "does not broadcast"),  # would enlarge x
        ({"bias": torch.zeros(5, device="meta")}, "bias is on"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": "1"}, "scale"),
    ],
)
def test_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"x": torch.zeros(3, 5), "bias": None, "scale": 1.0, **kwargs}
    for fn in (softmax, softmax_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)


@pytest.mark.parametrize("block", [0, 3, 48, 2**17, 16.0])
def test_bad_block(block) -> None:
    with pytest.raises(ValueError, match="block"):
        softmax(torch.zeros(2, 5), block=block)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Attention-sized rows, the widest one-block row, and rows past MAX_BLOCK that take the online path by default.
    for shape in [(2, 8, 128, 128), (1, 4, 16, 4096), (3, 8192), (2, 8193), (2, 20000)]:
        x = (torch.randn(shape, device="cuda") * 3).to(dtype)
        bias = torch.zeros(shape[0], *([1] * (len(shape) - 2)), shape[-1], device="cuda")
        bias[0, ..., : shape[-1] // 3] = NEG_INF
        _check(x, bias, scale=shape[-1] ** -0.5)
