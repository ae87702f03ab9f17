"""Log2 quantization of attention probabilities (FQ-ViT, RepQ-ViT, RepQuant's softmax quantizer).

Post-softmax probabilities crowd near 0 with a few large values, which a uniform grid wastes its levels on; a log2
grid spends them where the mass is, and `probs @ V` then needs only shifts. With L = 2^bits - 1:

    c = clamp(round(-log2 p), 0, L)          the stored integer code
    q = 2^-c, or 0 where round(-log2 p) > L  (p < 2^-L / sqrt(2): below the smallest level, rounded in the log domain)

Rounding happens in the log domain: p goes to the level nearest in log2 distance, so the boundary between 2^-c and
2^-(c+1) is their geometric mean 2^-(c+0.5) = 2^-c / sqrt(2), not their midpoint. The op finds c exactly: with
p = m·2^e (frexp, m in [0.5, 1)), -log2 p = -e - log2 m rounds to -e when m >= 1/sqrt(2) and to 1 - e otherwise, and
m is compared against the nearest representable value above 1/sqrt(2) (irrational, so there are no ties). A plain
float32 `round(-log2(p))` can land on the wrong side of a boundary; `log2_quantize_reference` is that textbook formula
in float64, which is accurate enough to agree with the op on float32 inputs.

Edge values: p = 1 (and p >= 1, which softmax rounding can produce) -> 1; p = 0 and p < 0 -> 0; NaN stays NaN.
Computed in float32 at least, returned in p's dtype: levels below a half-precision dtype's range (2^-24 in float16)
flush to 0 when cast back; float32 has every level of bits <= 7 and the levels down to 2^-149 of bits = 8.
Not differentiable (calibration and inference only).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["log2_quantize", "log2_quantize_reference", "log2_error", "check_bits", "MIN_BITS", "MAX_BITS"]

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> int:
    """`bits` as an int in [MIN_BITS, MAX_BITS]; a ValueError naming it otherwise (the code must fit a byte)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"txc::log2_quantize: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"txc::log2_quantize: p must be a floating-point tensor, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def _sqrt_half_above(dtype: torch.dtype) -> float:
    """The smallest `dtype` value >= 1/sqrt(2): m >= 1/sqrt(2) exactly when m >= this, for m of that dtype."""
    t = torch.tensor(2**-0.5, dtype=dtype)
    if Fraction(float(t)) ** 2 < Fraction(1, 2):
        t = torch.nextafter(t, torch.tensor(1.0, dtype=dtype))
    return float(t)


_THRESHOLD = {dt: _sqrt_half_above(dt) for dt in (torch.float32, torch.float64)}


@torch.library.custom_op("txc::log2_quantize", mutates_args=())
def log2_quantize(p: Tensor, bits: int) -> Tensor:
    """`p` (probabilities) rounded in the log domain to {0} ∪ {2^-c : 0 <= c <= 2^bits - 1}; same shape and dtype."""
    check_bits(bits)
    x = p.to(_compute_dtype(p.dtype))
    levels = 2**bits - 1
    mantissa, exponent = torch.frexp(x)  # x = mantissa · 2^exponent, mantissa in [0.5, 1) for finite x > 0
    code = (mantissa < _THRESHOLD[x.dtype]).to(exponent.dtype) - exponent  # round(-log2 x), exactly
    zero = (code > levels) | (x <= 0)
    out = torch.exp2(-code.clamp(0, levels).to(x.dtype)).masked_fill(zero, 0.0)  # exact: integer exponents
    out = out.masked_fill(x.isinf() & (x > 0), 1.0)  # frexp leaves inf alone; like p > 1, it gets the top level
    out = torch.where(x.isnan(), x, out)
    return out.to(p.dtype)


@log2_quantize.register_fake
def _(p: Tensor, bits: int) -> Tensor:
    check_bits(bits)
    _compute_dtype(p.dtype)
    return torch.empty_like(p)


def log2_quantize_reference(p: Tensor, bits: int) -> Tensor:
    """The textbook formula in float64: 2^-clamp(round(-log2 p), 0, L), 0 where round(-log2 p) > L or p <= 0."""
    check_bits(bits)
    levels = 2**bits - 1
    x = p.to(torch.float64)
    code = torch.round(-torch.log2(x.clamp(min=0)))  # log2(0) = -inf: code inf, beyond every level
    out = torch.where(code > levels, 0.0, torch.exp2(-code.clamp(0, levels)))
    out = torch.where(x <= 0, 0.0, out)
    return torch.where(x.isnan(), x, out).to(p.dtype)


def log2_error(p: Tensor, bits: int) -> dict[str, float]:
    """How well a `bits`-bit log2 grid represents observed probabilities `p` (rows along the last dim).

    For the calibration report, the three ways a log2 softmax quantizer goes wrong:
    - `rel_l1`: mean over rows of sum|q - p| / sum|p|, the share of each row's attention mass that moved;
    - `underflow`: the fraction of nonzero probabilities that became exactly 0 (the tail the grid cannot reach);
    - `row_sum`: the mean row sum after quantization, with `row_sum_min` / `row_sum_max`: rows no longer sum to 1
      (each probability moves by up to a factor sqrt(2) either way), which scales that token's attention output.
    Rows whose probabilities are all zero are left out of `rel_l1`.
    """
    check_bits(bits)
    x = p.detach().to(_compute_dtype(p.dtype))
    q = torch.ops.txc.log2_quantize(x, bits).to(torch.float64)
    x = x.to(torch.float64)
    rows_x, rows_q = x.reshape(-1, x.shape[-1]), q.reshape(-1, q.shape[-1])
    mass = rows_x.abs().sum(-1)
    seen = mass > 0
    rel = (rows_q - rows_x).abs().sum(-1)[seen] / mass[seen]
    nonzero = x != 0
    sums = rows_q.sum(-1)
    return {
        "bits": float(bits),
        "rel_l1": float(rel.mean()) if rel.numel() else 0.0,
        "underflow": float((nonzero & (q == 0)).sum() / nonzero.sum()) if nonzero.any() else 0.0,
        "row_sum": float(sums.mean()) if sums.numel() else 0.0,
        "row_sum_min": float(sums.min()) if sums.numel() else 0.0,
        "row_sum_max": float(sums.max()) if sums.numel() else 0.0,
    }
