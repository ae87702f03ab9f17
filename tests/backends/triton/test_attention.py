"""The fused Triton attention (dense and packed varlen) against its torch references and, in fp32, against SDPA.

Without CUDA these run under TRITON_INTERPRET=1 (set by conftest.py) with 16 x 16 tiles, so sequence lengths like
17 and 31 already give several key tiles and ragged edges; sizes stay small because every program runs in Python.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from txcompile.backends.triton.kernels.attention import (  # noqa: E402
    attention,
    attention_reference,
    varlen_attention,
    varlen_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b, h, h_kv, tq, tk, d, dtype=torch.float32, device=DEVICE):
    q = torch.randn(b, h, tq, d, device=device).to(dtype)
    k = torch.randn(b, h_kv, tk, d, device=device).to(dtype)
    v = torch.randn(b, h_kv, tk, d, device=device).to(dtype)
    return q, k, v


def _sdpa(q, k, v, mask=None, causal=False, scale=None):
    """SDPA with FlashAttention's bottom-right causal diagonal (SDPA's own `is_causal` is top-left for Tq != Tk)."""
    tq, tk = q.shape[2], k.shape[2]
    if causal:
        tril = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        mask = tril if mask is None else (mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, -1e30))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize(
    "b,h,h_kv,tq,tk,d,causal",
    [
        (1, 1, 1, 1, 1, 8, False),
        (2, 2, 2, 5, 17, 20, False),
        (1, 2, 1, 17, 31, 8, True),  # Tq < Tk: bottom-right diagonal, grouped-query heads
        (1, 2, 2, 31, 31, 64, True),
        (1, 4, 2, 17, 5, 20, False),
        (1, 1, 1, 5, 17, 200, True),  # D padded to 256 inside the kernel
    ],
)
def test_dense_fp32(b: int, h: int, h_kv: int, tq: int, tk: int, d: int, causal: bool) -> None:
    q, k, v = _qkv(b, h, h_kv, tq, tk, d)
    out = attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=causal))
    torch.testing.assert_close(out, _sdpa(q, k, v, causal=causal))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_half(dtype: torch.dtype) -> None:
    q, k, v = _qkv(2, 2, 1, 17, 31, 20, dtype=dtype)
    bias = torch.randn(2, 1, 1, 31, device=DEVICE).to(dtype)
    out = attention(q, k, v, bias=bias, causal=True, scale=0.3)
    assert out.dtype == dtype
    # P is rounded to fp16 for P.V, as in FlashAttention; the fp32 reference keeps it: ~1 fp16 ulp of P apart.
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(out, attention_reference(q, k, v, bias=bias, causal=True, scale=0.3), **tol)


@pytest.mark.parametrize("shape", [(1, 1, 17, 31), (2, 1, 1, 31), (2, 3, 17, 31), (31,)])
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_bias_broadcast(shape: tuple[int, ...], kind: str) -> None:
    q, k, v = _qkv(2, 3, 3, 17, 31, 8)
    if kind == "float":
        # log(size) like proportional attention, with a -inf (a masked key) in every row but never a whole row.
        bias = torch.rand(shape, device=DEVICE).mul(4).add(1).log()
        bias[..., 3] = float("-inf")
    else:
        bias = torch.rand(shape, device=DEVICE) > 0.3
        bias[..., 0] = True
    out = attention(q, k, v, bias=bias)
    torch.testing.assert_close(out, attention_reference(q, k, v, bias=bias))
    torch.testing.assert_close(out, _sdpa(q, k, v, mask=bias.expand(2, 3, 17, 31)))  # SDPA wants a >= 2-D mask


def test_fully_masked_rows_are_zero() -> None:
    q, k, v = _qkv(2, 2, 2, 5, 17, 8)
    key_padding = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    key_padding[0, 11:] = False
    key_padding[1] = False  # batch 1 has no real key at all
    mask = torch.ones(1, 2, 5, 17, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 2] = False  # one query row of head 1 sees nothing
    out = attention(q, k, v, bias=mask, key_padding=key_padding)
    assert not out.isnan().any()
    assert (out[1] == 0).all() and (out[0, 1, 2] == 0).all()
    expected = attention_reference(q, k, v, bias=mask, key_padding=key_padding)
    torch.testing.assert_close(out, expected)
    # Rows with visible keys match SDPA with the padding folded into its mask.
    torch.testing.assert_close(out[0, 0], _sdpa(q[:1], k[:1], v[:1], mask=key_padding[:1, None, None, :])[0, 0])


def test_causal_more_queries_than_keys() -> None:
    # Tq > Tk: the first Tq - Tk queries see no key (zeros); the rest follow the bottom-right diagonal.
    q, k, v = _qkv(1, 2, 2, 20, 7, 8)
    out = attention(q, k, v, causal=True)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))
    assert (out[:, :, :13] == 0).all()
    torch.testing.assert_close(out[:, :, 13:], _sdpa(q[:, :, 13:], k, v, causal=True))


def test_strided_inputs_and_empty_keys() -> None:
    # q/k/v as views of one packed [B, T, 3, H, D] projection, the layout a fused QKV linear produces.
    qkv = torch.randn(2, 17, 3, 2, 20, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, causal=True)
    torch.testing.assert_close(out, attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))
    q, k, v = _qkv(1, 2, 2, 3, 0, 8)
    assert (attention(q, k, v) == 0).all() and (attention_reference(q, k, v) == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen(causal: bool, dtype: torch.dtype) -> None:
    lengths = [1, 7, 16, 3]
    cu = torch.tensor([0, 1, 8, 24, 27], dtype=torch.int32, device=DEVICE)
    total, h, h_kv, d = sum(lengths), 4, 2, 20
    q = torch.randn(total, h, d, device=DEVICE).to(dtype)
    k = torch.randn(total, h_kv, d, device=DEVICE).to(dtype)
    v = torch.randn(total, h_kv, d, device=DEVICE).to(dtype)
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, max(lengths), causal=causal))
    if dtype == torch.float32:
        # The same as padding every sequence to 16 and masking, done by SDPA.
        pad = torch.zeros(4, 16, dtype=torch.bool, device=DEVICE)
        dense = [torch.zeros(4, 16, hh, d, device=DEVICE) for hh in (h, h_kv, h_kv)]
        for i, (a, n) in enumerate(zip(cu.tolist(), lengths)):
            pad[i, :n] = True
            for dst, src in zip(dense, (q, k, v)):
                dst[i, :n] = src[a : a + n]
        qd, kd, vd = (t.transpose(1, 2) for t in dense)
        mask = pad[:, None, None, :]
        if causal:
            mask = mask & torch.ones(16, 16, dtype=torch.bool, device=DEVICE).tril()
        ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, torch.cat([ref[i, :n] for i, n in enumerate(lengths)]))


def test_varlen_empty_sequence_and_loose_max_seqlen() -> None:
    cu = torch.tensor([0, 5, 5, 9], dtype=torch.int64, device=DEVICE)
    q, k, v = (torch.randn(9, 2, 8, device=DEVICE) for _ in range(3))
    out = varlen_attention(q, k, v, cu, 40, scale=0.5)  # max_seqlen may overestimate: extra tiles exit at once
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, 9, scale=0.5))


def _dense_args() -> dict:
    q, k, v = _qkv(2, 4, 2, 5, 7, 8, device="cpu")
    return {"q": q, "k": k, "v": v}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"q": torch.zeros(2, 4, 5)}, "q must be a 4-D"),
        ({"q": torch.zeros(2, 4, 5, 8, dtype=torch.float64)}, "q must be"),
        ({"k": torch.zeros(2, 2, 7, 8, dtype=torch.float16)}, "one dtype"),
        ({"v": torch.zeros(2, 2, 6, 8)}, "same shape"),
        ({"k": torch.zeros(2, 3, 7, 8), "v": torch.zeros(2, 3, 7, 8)}, "must divide"),
        ({"k": torch.zeros(1, 2, 7, 8), "v": torch.zeros(1, 2, 7, 8)}, "batch mismatch"),
        ({"k": torch.zeros(2, 2, 7, 4), "v": torch.zeros(2, 2, 7, 4)}, "head dim mismatch"),
        ({"q": torch.zeros(1, 1, 2, 300), "k": torch.zeros(1, 1, 2, 300), "v": torch.zeros(1, 1, 2, 300)}, "256"),
        ({"bias": torch.zeros(2, 4, 5, 6)}, "does not broadcast"),
        ({"bias": torch.zeros(1, 2, 4, 5, 7)}, "does not broadcast"),
        ({"bias": torch.zeros(5, 7, dtype=torch.int32)}, "bias must be"),
        ({"key_padding": torch.ones(2, 7)}, "key_padding"),
        ({"key_padding": torch.ones(2, 5, dtype=torch.bool)}, "key_padding"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_dense_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {**_dense_args(), **kwargs}
    for fn in (attention, attention_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"q": torch.zeros(9, 2, 1, 8)}, "q must be a 3-D"),
        ({"k": torch.zeros(8, 2, 8), "v": torch.zeros(8, 2, 8)}, "token count mismatch"),
        ({"cu_seqlens": torch.tensor([0.0, 4.0, 9.0])}, "int32/int64"),
        ({"cu_seqlens": torch.tensor([[0, 4, 9]])}, "1-D"),
        ({"cu_seqlens": torch.tensor([0])}, "num_seqs"),
        ({"cu_seqlens": torch.tensor([1, 4, 9])}, "start at 0"),
        ({"cu_seqlens": torch.tensor([0, 6, 4, 9])}, "never decrease"),
        ({"cu_seqlens": torch.tensor([0, 4, 8])}, "total_tokens = 9"),
        ({"max_seqlen": 4}, "longest sequence"),
        ({"max_seqlen": 5.0}, "max_seqlen"),
    ],
)
def test_varlen_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"q": torch.zeros(9, 2, 8), "k": torch.zeros(9, 1, 8), "v": torch.zeros(9, 1, 8)}
    args.update(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen=5)
    args.update(kwargs)
    for fn in (varlen_attention, varlen_attention_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_cuda(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Sizes that exercise the autotuned 64/128-row tiles, D = 256 and ragged edges.
    # fp16 rounds P for P.V (FlashAttention does too); the reference keeps P in fp32.
    tol = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}.get(dtype, {})
    for b, h, h_kv, t, d in [(2, 8, 2, 1000, 64), (1, 4, 4, 333, 256), (3, 12, 12, 197, 72)]:
        q, k, v = _qkv(b, h, h_kv, t, t, d, dtype=dtype, device="cuda")
        bias = torch.randn(b, 1, 1, t, device="cuda")
        for causal in (False, True):
            out = attention(q, k, v, bias=bias, causal=causal)
            torch.testing.assert_close(out, attention_reference(q, k, v, bias=bias, causal=causal), **tol)
    lengths = [1, 300, 1024, 77]
    cu = torch.tensor([0, 1, 301, 1325, 1402], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1402, 8, 128, device="cuda").to(dtype) for _ in range(3))
    out = varlen_attention(q, k, v, cu, max(lengths), causal=True)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu, max(lengths), causal=True), **tol)
