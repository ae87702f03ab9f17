"""Quantizer arithmetic: weight grids, the clipping search, and the reparameterization's exactness (property test)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from txcompile.quantizers import clip_scale, fake_quant, identity, linear_error, reparam, weight_int4, weight_int8


def test_weight_int8_is_per_output_channel_and_within_half_a_step():
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16)[:, None]  # rows of very different magnitude
    for levels in (127, 63):
        q, s = weight_int8(w, levels)
        assert q.dtype == torch.int8 and int(q.abs().max()) == levels and s.shape == (16,)
        assert bool(((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all())


def test_weight_int4_groups_use_minus_eight_to_seven():
    w = torch.randn(6, 64)
    q, s = weight_int4(w, 16)
    assert s.shape == (6, 4) and int(q.min()) >= -8 and int(q.max()) <= 7
    deq = (q.float().reshape(6, 4, 16) * s[..., None]).reshape(6, 64)
    assert float((deq - w).abs().max()) <= float(s.max()) / 2 + 1e-6


def test_clip_search_trades_a_few_outliers_for_resolution():
    x = torch.distributions.StudentT(1.5).sample((4000,))  # heavy tails, like GELU outputs' outliers
    s_max, err_max = clip_scale(x, search=False)
    s_opt, err_opt = clip_scale(x, search=True)
    assert s_max == float(x.abs().max()) / 127 and s_opt < s_max and err_opt < err_max
    assert err_opt == pytest.approx(float((fake_quant(x, s_opt) - x).norm() / x.norm()), rel=1e-5)


@given(
    st.integers(1, 6),
    st.integers(2, 12),
    st.floats(0.0, 1.0),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_reparameterization_is_exact_before_rounding(n, k, alpha, centered, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(20, k, generator=gen, dtype=torch.float64) * torch.rand(k, generator=gen, dtype=torch.float64) * 10
         + torch.randn(k, generator=gen, dtype=torch.float64) * 5)  # fmt: skip
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    keep = torch.rand(k, generator=gen) > 0.2
    rp = reparam(x.amin(0), x.amax(0), x.mean(0), w.abs().amax(0), alpha, keep, centered)
    assert bool((rp.ratio > 0).all()) and bool(torch.isfinite(rp.ratio).all())
    assert bool((rp.ratio[~keep] == 1).all() and (rp.shift[~keep] == 0).all())
    y = x @ w.t() + b
    torch.testing.assert_close(rp.apply(x) @ rp.weight(w).t() + rp.bias(w, b), y, rtol=1e-10, atol=1e-10)


def test_equalising_helps_channels_of_different_ranges():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=gen) * torch.logspace(-2, 1, 32)  # ranges over three decades
    w = torch.randn(16, 32, generator=gen)
    weights = [(w, None)]
    base, _, _ = linear_error(x, weights, identity(32), None, 127)
    rp = reparam(x.amin(0), x.amax(0), x.mean(0), w.abs().amax(0), 0.5)
    better, scale, act_err = linear_error(x, weights, rp, None, 127)
    assert better < 0.8 * base and scale > 0 and 0 <= act_err < 1


def test_constant_channels_get_a_finite_ratio():
    lo = torch.tensor([0.0, 1.0, -2.0])
    hi = torch.tensor([0.0, 3.0, 2.0])  # channel 0 never varies
    rp = reparam(lo, hi, (lo + hi) / 2, torch.ones(3), 1.0, centered=True)
    assert bool(torch.isfinite(rp.ratio).all()) and bool((rp.ratio > 0).all())
