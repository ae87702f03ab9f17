"""σReparam: W_hat = (γ / σ(W)) · W, with σ(W) tracked by power iteration.

Two ops and the module that owns their state:
- `txc::sigma_reparam(W, u, v, γ)` computes `W · γ / (vᵀ W u)`: pure, differentiable in W and γ (u and v are
  constants to autograd, as in the paper's reference implementation);
- `txc::power_iteration_(W, u, v, n)` runs n power-iteration steps in place (v ← W u / ‖W u‖, u ← Wᵀ v / ‖Wᵀ v‖);
- `SigmaReparamWeight(W)` holds u, v (buffers) and γ (a parameter). It is called with W as a `call_module` node in a
  rewritten graph, so `train()` / `eval()` on the program switch it: training-mode forwards run the power iteration,
  eval-mode forwards only read u and v. At construction u and v come from an exact SVD and γ = vᵀ W u = σ(W), so
  γ / σ = 1 and the function is unchanged.

u and v are defined for the matrix as stored: a Conv1D weight ([in, out]) has the same spectral norm as its transpose.
Paper: Zhai et al., "Stabilizing Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SigmaReparamWeight", "sigma_reparam", "power_iteration_"]


def _sigma(weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
    # The one expression for σ used everywhere (γ at insertion, forward, backward, folding): γ / σ is then exactly 1.
    return torch.dot(v, torch.mv(weight, u))


@torch.library.custom_op("txc::sigma_reparam", mutates_args=())
def sigma_reparam(weight: Tensor, u: Tensor, v: Tensor, gamma: Tensor) -> Tensor:
    """`weight * (gamma / sigma)` with `sigma = v @ weight @ u`: the σReparam'd weight."""
    return weight * (gamma / _sigma(weight, u, v))


@sigma_reparam.register_fake
def _(weight: Tensor, u: Tensor, v: Tensor, gamma: Tensor) -> Tensor:
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's callback signature
    weight, u, v, gamma = inputs
    ctx.save_for_backward(weight, u, v, gamma)


def _backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    # W_hat = γ W / σ with σ = vᵀ W u, so dσ/dW = v uᵀ:
    #   dL/dW = (γ/σ) G - (γ/σ²) <G, W> v uᵀ,   dL/dγ = <G, W> / σ.
    weight, u, v, gamma = ctx.saved_tensors
    sigma = _sigma(weight, u, v)
    inner = (grad * weight).sum()
    grad_weight = grad * (gamma / sigma) - torch.outer(v, u) * (gamma * inner / sigma**2)
    grad_gamma = (inner / sigma).reshape(gamma.shape)
    return grad_weight, None, None, grad_gamma


sigma_reparam.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("txc::power_iteration_", mutates_args=("u", "v"))
def power_iteration_(weight: Tensor, u: Tensor, v: Tensor, iters: int) -> None:
    """`iters` steps of power iteration on `weight`, updating its singular-vector estimates `u` and `v` in place."""
    w = weight.detach()
    for _ in range(iters):
        v.copy_(nn.functional.normalize(torch.mv(w, u), dim=0))
        u.copy_(nn.functional.normalize(torch.mv(w.t(), v), dim=0))


@power_iteration_.register_fake
def _(weight: Tensor, u: Tensor, v: Tensor, iters: int) -> None:
    return None


class SigmaReparamWeight(nn.Module):
    """The σReparam state of one weight matrix; `forward(W)` returns `(γ / σ(W)) · W`.

    Args:
        weight: the matrix as the graph stores it; only read here (u, v, γ are initialised from it).
        iters: power-iteration steps per training-mode forward (the paper uses 1).
    """

    # Marks modules that transform a weight before a linear reads it (see txcompile.linears).
    weight_reparameterization = True

    def __init__(self, weight: Tensor, iters: int = 1) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SigmaReparamWeight needs a 2-D weight, got shape {tuple(weight.shape)}")
        w = weight.detach()
        # The SVD runs in float32 at least: half-precision SVD is unsupported on CPU and too coarse for σ.
        left, _, right_h = torch.linalg.svd(w.float(), full_matrices=False)
        self.register_buffer("u", right_h[0].to(w.dtype).clone())  # own storage: not a view of the SVD
        self.register_buffer("v", left[:, 0].to(w.dtype).clone())
        self.gamma = nn.Parameter(_sigma(w, self.u, self.v).clone())
        self.iters = int(iters)

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and self.iters > 0:
            torch.ops.txc.power_iteration_(weight, self.u, self.v, self.iters)
        return torch.ops.txc.sigma_reparam(weight, self.u, self.v, self.gamma)

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate of σ(weight) (no iteration)."""
        return _sigma(weight.detach(), self.u, self.v)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, gamma={float(self.gamma.detach()):.4g}"
