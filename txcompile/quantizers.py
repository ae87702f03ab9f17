"""The arithmetic of the `quantize` pass: quantizers, clipping, and the exact scale reparameterization.

Weights:      per output channel, symmetric:  W ≈ s_n · q,  q ∈ [-L, L]   (L = 127, or 63 where the kernel needs it)
              int4, per group of `g` inputs:  W ≈ s_{n,j} · q,  q ∈ [-8, 7]
Activations:  per tensor, symmetric:          x ≈ S · q,  q ∈ [-127, 127], S from a clipping search on calibration rows

Reparameterization (exact before rounding). For one linear input x:

    x' = (x - m) / r          x @ W^T + b  ==  x' @ (W diag(r))^T + (b + W m)

with per-channel ratios r_c = spread_c^α / max|W_{:,c}|^(1-α): α = 1 equalises the channels' ranges so one
per-tensor scale fits them all (RepQ-ViT / RepQuant); smaller α moves less of the activations' difficulty into the
weights, whose per-channel quantizer absorbs it (SmoothQuant). RepQuant also shifts channels by their means m_c.
The pass picks α (and the shift) per input by the measured output error of its linears on calibration rows
(`linear_error`); `rtn` uses none of this (m = 0, r = 1): naive round-to-nearest with per-tensor activations.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

__all__ = ["Reparam", "clip_scale", "fake_quant", "identity", "linear_error", "reparam", "weight_int4", "weight_int8"]


def weight_int8(w: Tensor, levels: int = 127, search: bool = True) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of `w` [N, K]: (q int8 [N, K], scale float32 [N]).

    With `search`, each row's clipping threshold is the one among max|w_n| · {1, 0.97, .., 0.7} with the least
    squared error: a row's few largest weights give way to resolution for all the others (this matters most at the
    ±63 levels of AVX2 CPUs)."""
    w = w.detach().float()
    top = w.abs().amax(dim=1).clamp_min(1e-12)
    best_err, best_scale = None, None
    for frac in torch.linspace(1.0, 0.7, 11 if search else 1).tolist():
        scale = top * frac / levels
        err = (torch.round(w / scale[:, None]).clamp_(-levels, levels) * scale[:, None] - w).pow(2).sum(dim=1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    q = torch.round(w / best_scale[:, None]).clamp_(-levels, levels).to(torch.int8)
    return q, best_scale


def weight_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Group-wise symmetric int4 of `w` [N, K] (K divisible by `group_size`): (q int8 in [-8, 7], scale [N, K/g])."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / 7.5).clamp_min(1e-12)  # ±7.5 covers [-8, 7] with one rounding step
    q = torch.round(groups / scale[..., None]).clamp_(-8, 7).to(torch.int8)
    return q.reshape(n, k), scale


SEARCH_VALUES = 1 << 16  # values the clipping search measures its squared error on


def clip_scale(rows: Tensor, levels: int = 127, search: bool = True, steps: int = 40) -> tuple[float, float]:
    """The per-tensor scale for `rows` and its relative quantization error ||Q(x) - x|| / ||x||.

    With `search`, the clipping threshold is the one among max|x| · {1, 0.98, ..} that minimises the squared error on
    the calibration rows (clipping a few outliers buys resolution for everything else); else it is max|x|."""
    x = rows.float().flatten()
    top = float(x.abs().max()) if x.numel() else 0.0
    if x.numel() > SEARCH_VALUES:  # an even subsample estimates the error as well at a fraction of the cost
        x = x[:: x.numel() // SEARCH_VALUES + 1]
    if top == 0.0:
        return 1.0, 0.0
    norm = float(x.norm()) or 1.0
    best = (float("inf"), top / levels)
    for frac in torch.linspace(1.0, 0.2, steps).tolist() if search else [1.0]:
        scale = top * frac / levels
        err = float((torch.round(x / scale).clamp_(-levels, levels) * scale - x).norm())
        best = min(best, (err, scale))
    return best[1], best[0] / norm


@dataclass(frozen=True)
class Reparam:
    """x' = (x - shift) / ratio per input channel; the consuming linears take W · diag(ratio), b + W · shift."""

    ratio: Tensor  # [K] float64, > 0
    shift: Tensor  # [K] float64

    @property
    def identity(self) -> bool:
        return bool((self.ratio == 1).all() and (self.shift == 0).all())

    def weight(self, w: Tensor) -> Tensor:
        return (w.double() * self.ratio).to(w.dtype)

    def bias(self, w: Tensor, b: Tensor | None) -> Tensor | None:
        if not bool(self.shift.any()):
            return b
        moved = w.double() @ self.shift
        return (moved if b is None else b.double() + moved).to(w.dtype)

    def apply(self, x: Tensor) -> Tensor:
        return ((x.double() - self.shift) / self.ratio).to(x.dtype)


def reparam(
    lo: Tensor, hi: Tensor, mean: Tensor, w_absmax: Tensor, alpha: float, keep: Tensor | None = None,
    centered: bool = False,
) -> Reparam:  # fmt: skip
    """The per-channel (shift, ratio) from channel ranges [lo, hi], means, and the weights' per-input-column max |W|
    (over every linear reading the input). `centered` shifts each channel by its mean (RepQuant's channel offsets;
    the mean, not the mid-range, keeps the bulk of a one-sided channel at zero so clipping still cuts only its tail).
    Channels outside `keep` (outlier columns computed in floating point) are left alone."""
    lo, hi, w_absmax = lo.double(), hi.double(), w_absmax.double()
    ones, zeros = torch.ones_like(lo), torch.zeros_like(lo)
    shift = mean.double() if centered else zeros
    spread = torch.maximum(hi - shift, shift - lo)
    keep = torch.ones_like(lo, dtype=torch.bool) if keep is None else keep
    # Constant channels have no spread: give them the smallest real one, so no ratio is 0 or inf.
    live = keep & (spread > 0)
    spread = spread.clamp_min(float(spread[live].min()) if bool(live.any()) else 1.0)
    w_absmax = w_absmax.clamp_min(float(w_absmax[w_absmax > 0].min()) if bool((w_absmax > 0).any()) else 1.0)
    ratio = spread.pow(alpha) / w_absmax.pow(1 - alpha)
    ratio = ratio / torch.exp(torch.log(ratio[keep]).mean())  # geometric mean 1: weights keep their magnitude
    return Reparam(torch.where(keep, ratio, ones), torch.where(keep, shift, zeros))


def identity(channels: int) -> Reparam:
    return Reparam(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))


def fake_quant(x: Tensor, scale: float, levels: int = 127) -> Tensor:
    """What the integer kernel sees of `x`, back in floating point."""
    return torch.round(x / scale).clamp_(-levels, levels) * scale


def linear_error(
    rows: Tensor, weights: list[tuple[Tensor, Tensor | None]], rp: Reparam, keep: Tensor | None, levels: int,
    search: bool = True,
) -> tuple[float, float, float]:  # fmt: skip
    """Quantize a group's input rows (after `rp`) and its weights as the int8 kernels will, and measure the linears'
    mean relative output error on the rows. Returns (output error, activation scale, activation error)."""
    x = rp.apply(rows.double()).float()
    if keep is not None:
        x = x * keep  # outlier columns are computed in floating point, outside the integer GEMM
    scale, act_err = clip_scale(x if keep is None else x[:, keep], search=search)
    xq = fake_quant(x, scale)
    err = 0.0
    for w, b in weights:
        y = torch.nn.functional.linear(rows.float(), w.float(), None if b is None else b.float())
        w_r = rp.weight(w.double())
        if keep is not None:
            w_r = w_r * keep
        q, s = weight_int8(w_r, levels)
        b_r = rp.bias(w.double(), None if b is None else b.double())
        y_q = torch.nn.functional.linear(xq, (q.float() * s[:, None]), None if b_r is None else b_r.float())
        if keep is not None:
            y_q = y_q + torch.nn.functional.linear(rows.float() * ~keep, w.float())
        err += float((y_q - y).norm() / y.norm().clamp_min(1e-12))
    return err / len(weights), scale, act_err
