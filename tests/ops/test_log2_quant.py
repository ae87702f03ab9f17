"""txc::log2_quantize against the textbook formula and exact rational boundaries; edge values, bits, export, stats."""

from __future__ import annotations

import io
from fractions import Fraction

import pytest
import torch

from txcompile.ops.log2_quant import log2_error, log2_quantize_reference

txc = torch.ops.txc


def _probs(seed: int, shape: tuple[int, ...] = (3, 4, 17, 17)) -> torch.Tensor:
    """Softmax rows with a wide spread (peaked and flat), plus exact 0s and 1s from masked and one-hot rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 12
    logits[..., 0, 3:] = float("-inf")  # a row with masked keys: exact zeros
    logits[..., 1, 1:] = float("-inf")  # a one-hot row: an exact 1
    return logits.softmax(-1)


def _exact(p: float, bits: int) -> float:
    """The log-domain rounding in exact rationals: the level nearest in log2 distance, or 0 below the last one."""
    x = Fraction(p)
    if x <= 0:
        return 0.0
    levels = 2**bits - 1
    for c in range(levels + 1):
        # x rounds to 2^-c when x >= 2^-(c + 1/2), i.e. x² >= 2^-(2c + 1): no irrational numbers needed.
        if x * x >= Fraction(1, 2 ** (2 * c + 1)):
            return 2.0**-c
    return 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_matches_reference_exactly(bits):
    p = torch.cat([_probs(bits).flatten(), torch.rand(20000) ** 12, torch.rand(1000)])
    got = txc.log2_quantize(p, bits)
    assert got.dtype == p.dtype and got.shape == p.shape
    assert torch.equal(got, log2_quantize_reference(p, bits))
    nonzero = got[got > 0]
    assert torch.equal(nonzero, torch.exp2(torch.round(torch.log2(nonzero))))  # every value is a power of two
    assert nonzero.min() >= 2.0 ** -(2**bits - 1)


def test_zero_one_and_powers_of_two_are_exact():
    for bits in (2, 4, 8):
        levels = 2**bits - 1
        powers = torch.tensor([2.0**-c for c in range(min(levels, 149) + 1)])
        assert torch.equal(txc.log2_quantize(powers, bits), powers)  # every level maps to itself
        edge = torch.tensor([0.0, 1.0, 1.0 + 2**-23, 3.0, -0.25, float("inf"), 2.0 ** -(levels + 1)])
        assert txc.log2_quantize(edge, bits).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert txc.log2_quantize(torch.tensor([float("nan")]), 4).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_boundaries_are_geometric_means_of_levels(dtype):
    # Around 2^-(c + 1/2): the largest value below rounds down to 2^-(c+1), the smallest above rounds up to 2^-c.
    bits = 4
    levels = 2**bits - 1
    zero, one = torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    for c in range(levels + 1):
        boundary = torch.tensor(2.0 ** -(c + 0.5), dtype=torch.float64).to(dtype)
        near = torch.stack([torch.nextafter(boundary, zero), boundary, torch.nextafter(boundary, one)])
        expect = [_exact(float(x), bits) for x in near]
        assert txc.log2_quantize(near, bits).tolist() == expect
        assert expect[0] == (2.0 ** -(c + 1) if c < levels else 0.0) and expect[2] == 2.0**-c
    # The zero level: just below 2^-15 / sqrt(2) vanishes, just above becomes the smallest level 2^-15.
    assert _exact(2**-15.5 * (1 - 1e-6), bits) == 0.0 and _exact(2**-15.5 * (1 + 1e-6), bits) == 2.0**-15


def test_half_precision_computes_in_float32():
    p = _probs(1).to(torch.bfloat16)
    got = txc.log2_quantize(p, 3)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, log2_quantize_reference(p.float(), 3).to(torch.bfloat16))
    tiny = torch.tensor([2.0**-24, 2.0**-20], dtype=torch.float16)
    assert txc.log2_quantize(tiny, 8).tolist() == [2.0**-24, 2.0**-20]  # float16 keeps its subnormal levels


@pytest.mark.parametrize("bits", [1, 9, 0, True, 4.0])
def test_bits_outside_2_to_8_name_bits(bits):
    with pytest.raises((ValueError, RuntimeError), match="bits"):
        txc.log2_quantize(torch.rand(4), bits)
    with pytest.raises(ValueError, match="bits"):
        log2_quantize_reference(torch.rand(4), bits)
    with pytest.raises(ValueError, match="bits"):
        log2_error(torch.rand(4), bits)


def test_integer_input_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        txc.log2_quantize(torch.ones(3, dtype=torch.int64), 4)


def test_opcheck():
    torch.library.opcheck(txc.log2_quantize.default, (_probs(2), 4))
    torch.library.opcheck(txc.log2_quantize.default, (_probs(3).half(), 8))


class _Attend(torch.nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return txc.log2_quantize(probs, self.bits) @ v


def test_export_with_dynamic_sizes_saves_and_loads():
    model = _Attend(4)
    auto = torch.export.Dim.AUTO
    qkv = tuple(torch.randn(2, 3, 9, 8) for _ in range(3))
    ep = torch.export.export(model, qkv, dynamic_shapes=tuple({0: auto, 2: auto} for _ in range(3)))
    assert txc.log2_quantize.default in [n.target for n in ep.graph.nodes]
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for batch, tokens in ((3, 13), (1, 5)):
        args = tuple(torch.randn(batch, 3, tokens, 8) for _ in range(3))
        for program in (ep, loaded):
            torch.testing.assert_close(program.module()(*args), model(*args), rtol=0, atol=0)


def test_log2_error_by_hand():
    # bits=2: levels 1, 1/2, 1/4, 1/8; below 2^-3.5 ≈ 0.088 is 0.
    p = torch.tensor([[0.7, 0.2, 0.06, 0.04], [0.5, 0.25, 0.25, 0.0]])
    q = txc.log2_quantize(p, 2)
    assert q.tolist() == [[0.5, 0.25, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    stats = log2_error(p, 2)
    row0 = (0.2 + 0.05 + 0.06 + 0.04) / 1.0
    assert stats["rel_l1"] == pytest.approx(row0 / 2)  # the second row is exact
    assert stats["underflow"] == pytest.approx(2 / 7)  # 0.06 and 0.04 of 7 nonzero probabilities
    assert stats["row_sum"] == pytest.approx((0.75 + 1.0) / 2)
    assert stats["row_sum_min"] == pytest.approx(0.75) and stats["row_sum_max"] == pytest.approx(1.0)
    assert stats["bits"] == 2.0


def test_log2_error_shrinks_underflow_with_bits_but_not_the_rounding():
    p = _probs(5)
    coarse, fine = log2_error(p, 2), log2_error(p, 8)
    assert fine["underflow"] < coarse["underflow"] and fine["rel_l1"] < coarse["rel_l1"]
    # More bits only add smaller levels: the sqrt(2)-wide log-domain steps stay, so the error does not vanish.
    assert 0.05 < fine["rel_l1"] < 0.3
    assert log2_error(torch.zeros(2, 3), 4) == {"bits": 4.0, "rel_l1": 0.0, "underflow": 0.0, "row_sum": 0.0,
                                                "row_sum_min": 0.0, "row_sum_max": 0.0}  # fmt: skip


@pytest.mark.gpu
def test_cuda_matches_the_cpu_reference():
    p = torch.cat([_probs(6).flatten(), torch.rand(20000) ** 12])
    for bits in (2, 5, 8):
        got = txc.log2_quantize(p.cuda(), bits).cpu()
        assert torch.equal(got, log2_quantize_reference(p, bits))
