"""txc::sigma_reparam / txc::power_iteration_ and the SigmaReparamWeight module: values, gradients, train/eval."""

from __future__ import annotations

import pytest
import torch

from txcompile.ops import SigmaReparamWeight


def _spectral_norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def test_identity_at_construction_and_gamma_is_sigma():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    mod = SigmaReparamWeight(w).eval()
    assert torch.equal(mod(w), w)  # γ / σ is exactly 1
    assert float(mod.gamma.detach()) == pytest.approx(_spectral_norm(w), rel=1e-5)


def test_value_is_gamma_over_sigma_times_w():
    g = torch.Generator().manual_seed(1)
    w, u, v = torch.randn(8, 5, generator=g), torch.randn(5, generator=g), torch.randn(8, generator=g)
    gamma = torch.tensor(2.5)
    expected = w * gamma / (v @ w @ u)
    torch.testing.assert_close(torch.ops.txc.sigma_reparam(w, u, v, gamma), expected)


def test_gradients_match_autograd_of_the_formula():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    u, v = torch.randn(4, dtype=torch.float64, generator=g), torch.randn(7, dtype=torch.float64, generator=g)
    gamma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, gm: torch.ops.txc.sigma_reparam(w, u, v, gm), (w, gamma))


def test_opcheck_fake_and_schema():
    g = torch.Generator().manual_seed(3)
    w, u, v = torch.randn(6, 3, generator=g), torch.randn(3, generator=g), torch.randn(6, generator=g)
    torch.library.opcheck(torch.ops.txc.sigma_reparam.default, (w, u, v, torch.tensor(1.0)))
    torch.library.opcheck(torch.ops.txc.power_iteration_.default, (w, u.clone(), v.clone(), 2))


def test_power_iteration_converges_to_the_spectral_norm():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.ones(32, dtype=torch.float64), dim=0)
    v = torch.zeros(64, dtype=torch.float64)
    torch.ops.txc.power_iteration_(w, u, v, 200)
    assert float(v @ w @ u) == pytest.approx(_spectral_norm(w), rel=1e-6)


def test_training_forwards_iterate_and_eval_forwards_do_not():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    mod = SigmaReparamWeight(w)
    w2 = w + 0.5 * torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    u0 = mod.u.clone()
    mod.eval()(w2)
    assert torch.equal(mod.u, u0)
    mod.train()(w2)
    assert not torch.equal(mod.u, u0)
    for _ in range(30):
        mod(w2)
    assert float(mod.sigma(w2)) == pytest.approx(_spectral_norm(w2), rel=1e-3)


def test_zero_iterations_never_updates():
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(7))
    mod = SigmaReparamWeight(w, iters=0).train()
    u0 = mod.u.clone()
    mod(2 * w.flip(0))
    assert torch.equal(mod.u, u0)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D weight"):
        SigmaReparamWeight(torch.randn(3))


def test_half_precision_weights():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    mod = SigmaReparamWeight(w).eval()
    assert mod.u.dtype == torch.bfloat16 and torch.equal(mod(w), w)
