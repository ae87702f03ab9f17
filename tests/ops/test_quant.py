"""txc::quantize_act / int8_linear / weight_only_linear against their references; kernels, bad inputs, export."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as F

from txcompile.ops import quant
from txcompile.quantizers import weight_int4, weight_int8

txc = torch.ops.txc


def _case(m=37, k=53, n=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.1
    return x, w, torch.randn(n, generator=gen)


def test_quantize_act_matches_the_reference_and_clamps():
    x, _, _ = _case()
    x[0, 0] = 1e3  # beyond the clipping threshold
    scale = torch.tensor(0.02)
    mul, add = torch.rand(x.shape[1]) + 0.5, torch.randn(x.shape[1]) * 0.1
    for args in ((), (mul,), (mul, add)):
        q = txc.quantize_act(x, scale, *args)
        assert q.dtype == torch.int8 and q.shape == x.shape
        assert int(q.abs().max()) == quant.LEVELS
        ref = quant.quantize_act_reference(x, scale, *args)
        # The kernel folds 1/scale into the affine: at most one level apart on exact rounding ties.
        assert int((q.int() - ref.int()).abs().max()) <= 1
        assert float((q != ref).float().mean()) < 1e-3


@pytest.mark.parametrize("activation", quant.ACTIVATIONS)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (7, 13, 5), (37, 53, 29), (130, 384, 96)])
def test_int8_linear_matches_the_integer_reference(activation, m, k, n):
    x, w, b = _case(m, k, n)
    q, s = weight_int8(w, quant.weight_levels("cpu"))
    scale = (x.abs().max() / 127).reshape(())
    x_q = txc.quantize_act(x, scale)
    got = txc.int8_linear(x_q, scale, q, s, b, activation)
    torch.testing.assert_close(got, quant.int8_linear_reference(x_q, scale, q, s, b, activation), rtol=1e-5, atol=1e-5)


def test_int8_linear_keeps_leading_dims_and_output_dtype():
    x, w, b = _case(12, 16, 8)
    q, s = weight_int8(w, 63)
    scale = torch.tensor(0.05)
    x_q = txc.quantize_act(x.reshape(3, 4, 16), scale)
    y = txc.int8_linear(x_q, scale, q, s, b, "none", torch.bfloat16)
    assert y.shape == (3, 4, 8) and y.dtype == torch.bfloat16
    assert txc.int8_linear(x_q[:0], scale, q, s, b).shape == (0, 4, 8)


def test_full_range_weights_never_hit_a_saturating_kernel():
    """±127 weights with large activations saturate int16 pair sums in AVX2's u8·s8 path; the op must stay exact."""
    gen = torch.Generator().manual_seed(1)
    x_q = torch.full((16, 256), 127, dtype=torch.int8)
    w_q = torch.randint(100, 128, (32, 256), dtype=torch.int8, generator=gen)
    ones = torch.ones(32)
    got = txc.int8_linear(x_q, torch.tensor(1.0), w_q, ones)
    exact = (x_q.double() @ w_q.double().t()).float()
    torch.testing.assert_close(got, exact, rtol=0, atol=0)


def test_quantized_linear_is_close_to_float():
    x, w, b = _case(256, 384, 96)
    q, s = weight_int8(w, quant.weight_levels("cpu"))
    scale = (x.abs().max() / 127).reshape(())
    y = txc.int8_linear(txc.quantize_act(x, scale), scale, q, s, b)
    ref = F.linear(x, w, b)
    assert float((y - ref).norm() / ref.norm()) < 0.03


@pytest.mark.parametrize(("bits", "group"), [(8, 0), (4, 16), (4, 64)])
def test_weight_only_linear_dequantizes_exactly(bits, group):
    x, w, b = _case(9, 64, 24)
    if bits == 8:
        q, s = weight_int8(w)
        deq, stored = q.float() * s[:, None], q
    else:
        q, s = weight_int4(w, group)
        deq = (q.float().reshape(24, -1, group) * s[..., None]).reshape(24, 64)
        stored = quant.pack_int4(q)
        assert stored.dtype == torch.uint8 and stored.shape == (24, 32)
        torch.testing.assert_close(quant.dequantize_int4(stored, s, group), deq)
    got = txc.weight_only_linear(x, stored, s, b, bits, group)
    torch.testing.assert_close(got, F.linear(x, deq, b))
    assert float((got - F.linear(x, w, b)).norm() / F.linear(x, w, b).norm()) < (0.01 if bits == 8 else 0.15)


def test_int4_codes_cover_minus_eight_to_seven():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    low = (quant.pack_int4(q) & 0xF).to(torch.int8) - 8
    torch.testing.assert_close(low, q[:, 0::2])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, q, s: txc.int8_linear(x.float(), torch.tensor(1.0), q, s), "int8"),
        (lambda x, q, s: txc.int8_linear(x[:, :-1], torch.tensor(1.0), q, s), "disagree"),
        (lambda x, q, s: txc.int8_linear(x, torch.tensor(1.0), q, s[:-1]), "w_scale"),
        (lambda x, q, s: txc.int8_linear(x, torch.tensor(1.0), q, s, torch.zeros(3)), "bias"),
        (lambda x, q, s: txc.int8_linear(x, torch.tensor(1.0), q, s, None, "relu6"), "activation"),
        (lambda x, q, s: txc.quantize_act(x.float(), torch.ones(2)), "scale"),
        (lambda x, q, s: txc.quantize_act(x.float(), torch.tensor(1.0), torch.ones(3)), "mul"),
        (lambda x, q, s: txc.weight_only_linear(x.float(), q, s, None, 3), "bits"),
        (lambda x, q, s: txc.weight_only_linear(x.float(), q, s, None, 4, 8), "uint8"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    x = torch.ones(4, 16, dtype=torch.int8)
    q, s = weight_int8(torch.randn(8, 16))
    with pytest.raises(ValueError, match=match):
        call(x, q, s)


class _QuantLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        q, s = weight_int8(w, 63)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("b", b)
        self.register_buffer("scale", torch.tensor(0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return txc.int8_linear(txc.quantize_act(x, self.scale), self.scale, self.q, self.s, self.b, "gelu")


def test_export_with_dynamic_dims_saves_and_loads():
    _, w, b = _case(4, 32, 16)
    model = _QuantLinear(w, b)
    x = torch.randn(2, 5, 32)
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: auto, 1: auto},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    other = torch.randn(3, 7, 32)
    torch.testing.assert_close(loaded(other), model(other))
