"""quantize: calibrated, reparameterized int8/int4 linears that run real integer arithmetic.

Before:                                      After (scheme=w8a8):
    h = layer_norm(x, γ, β)                      h = layer_norm(x, γ / r, (β - m) / r)        # RepQuant fold (pre-LN)
    y = aten.linear(h, W, b)                     h_q = txc.quantize_act(h, S)                 # per-tensor int8
                                                 y = txc.int8_linear(h_q, S, W_q, s_w, b + W m)   # W_q ≈ (W r) / s_w
    z = gelu(aten.linear(c, W2, b2))             z = txc.int8_linear(txc.quantize_act(c, S2, 1/r2, -m2/r2), ..,
                                                                     activation="gelu")       # fused epilogue

1. Calibration runs the captured program over `calibration_data` (else the example inputs) and observes every
   quantized linear's input: per-channel ranges and a sample of rows (`calibrate.observe`, with a progress bar).
2. Reparameterization, exact before rounding (`quantizers.reparam`): per-channel ratios r (and, for
   `method=repquant`, shifts m) that equalise the channels or migrate part of their difficulty into the weights
   (`method=smoothquant`); the strength `alpha` (and whether to shift) is chosen per input by the measured output error
   of its linears on calibration rows, unless given. They fold into the norm's affine when the norm feeds only these
   linears, else into the activation quantizer (free: it reads the input once anyway). The reparameterized program is
   run (in float64 linears) against the original and must match it.
3. Quantizers: weights per output channel (int8; ±63 on AVX2 CPUs whose int8 kernel would saturate, see
   `ops/quant.py`) or int4 in groups (`scheme=w4`, `group_size`); activations per tensor with a clipping threshold
   searched on the calibration rows. `outliers=true` keeps input columns whose calibrated |x| exceeds
   `outlier_threshold` in floating point (LLM.int8()'s decomposition, with columns fixed at calibration).
   `softmax_bits` log2-quantizes attention probabilities (RepQuant's softmax quantizer, `attention_quant.py`): SDPA
   is then written out as explicit math, so on a CPU this costs time; it is off by default.
4. Each linear becomes a `txc` op (`int8_linear`, or `weight_only_linear` for `w8`/`w4`); a following GELU moves into
   the GEMM's epilogue. Per layer the report gets the scheme, bits, calibration error, measured output error and
   measured kernel times; the whole program's speed is measured against the unquantized one, with a warning when it
   is slower on this machine.

Contract: approximate (cosine of the outputs, held to `min_cosine`); `scheme=none` only reparameterizes: exact.
Papers: RepQuant (Li et al., 2024; RepQ-ViT lineage), SmoothQuant (Xiao et al., 2023), LLM.int8() (Dettmers et al.,
2022).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import fx

from ..anatomy import Linear, anatomy
from ..attention_quant import quantize_attention_probs, unsupported_reason
from ..calibrate import ChannelStats, observe
from ..ir import copy_graph_module, prune_tensors
from ..pipeline import PassContext, PassResult
from ..quant_plan import Group, layer_records, plan_groups, remap, rewrite_groups
from ..timing import median_seconds
from ..tokens import Decline, padding_input
from ..ops.log2_quant import log2_error
from ..verify import compare, cosine_shortfall, node_values, run_program

__all__ = ["Quantize"]

SCHEMES = ("w8a8", "w8", "w4", "none")


@dataclass(frozen=True)
class Quantize:
    """Post-training quantization with exact scale reparameterization and integer kernels."""

    name: ClassVar[str] = "quantize"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "int8/int4 linears (w8a8|w8|w4), RepQuant/SmoothQuant reparameterization, integer kernels"

    scheme: Literal["w8a8", "w8", "w4", "none"] = "w8a8"
    method: Literal["repquant", "smoothquant", "rtn"] = "repquant"
    alpha: float | None = None  # how far ratios follow the activations; unset: searched per input (0, 0.25, .., 1)
    group_size: int = 128  # w4: inputs per scale
    outliers: bool = False  # LLM.int8()-style floating-point columns
    outlier_threshold: float = 6.0
    layers: Literal["blocks", "all"] = "blocks"  # all: also the head, pooler and other linears outside blocks
    fuse_activation: bool = True  # GELU into the int8 GEMM's epilogue
    max_rows: int = 4096  # calibration rows kept per input, for clipping and error measurement
    softmax_bits: int = 0  # log2-quantize attention probabilities to this many bits (2..8); 0: keep them in float
    measure: bool = True  # time each layer and the whole program
    min_cosine: float = 0.95  # of all outputs (per-token hidden states included), on the example inputs

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantize: scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"quantize: alpha must be in [0, 1], got {self.alpha!r}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"quantize: group_size must be an even number >= 2, got {self.group_size!r}")
        if self.outlier_threshold <= 0:
            raise ValueError(f"quantize: outlier_threshold must be > 0, got {self.outlier_threshold!r}")
        if self.softmax_bits and not 2 <= self.softmax_bits <= 8:
            raise ValueError(f"quantize: softmax_bits must be 0 (off) or 2..8, got {self.softmax_bits!r}")
        if self.max_rows < 16:
            raise ValueError(f"quantize: max_rows must be >= 16, got {self.max_rows!r}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"quantize: min_cosine must be in [-1, 1], got {self.min_cosine!r}")

    def is_identity(self) -> bool:
        return self.scheme == "none" and not self.softmax_bits

    def check_quality(self, measured: dict) -> str | None:
        return cosine_shortfall(measured, self.min_cosine)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        chosen, notes = _chosen_linears(anat, self.layers)
        if not chosen:
            return PassResult(gm, False, {"quantized": 0}, tuple(notes) or ("no linear layer to quantize",))
        batches = [ctx.example_inputs, *(ctx.calibration_data or ())]
        if not ctx.calibration_data:
            notes.append("calibrated on the example inputs only: pass calibration_data (or --calib) for a real set")
        activations = self.scheme in ("w8a8", "none")
        stats: dict[fx.Node, ChannelStats] = {}
        if activations or self.measure:
            stats = observe(gm, list({lin.input: None for lin in chosen}), batches, max_rows=self.max_rows,
                            padding=_padding(gm, anat, ctx))  # fmt: skip
        groups = plan_groups(gm, chosen, stats, self)
        before = copy_graph_module(gm)
        reparam_err = self._check_reparam(gm, before, groups, ctx) if activations else None
        if self.scheme != "none":
            rewrite_groups(gm, groups, quantized=True)
            gm.recompile()
        summary: dict[str, Any] = {"scheme": self.scheme, "method": self.method, "layers": []}
        if self.softmax_bits:
            summary["softmax"] = _quantize_softmax(gm, anat, self.softmax_bits, ctx.example_inputs, notes)
        prune_tensors(gm)
        if self.scheme == "none" and not self.softmax_bits:
            return PassResult(gm, True, _stats(groups, reparam_err, self.scheme), tuple(notes))
        summary["layers"] = layers = layer_records(gm, groups, stats, self.measure) if self.scheme != "none" else []
        kept = [r["layer"] for r in layers if self.scheme == "w4" and r["weight_bits"] == 8]
        if kept:
            notes.append(f"{len(kept)} layer(s) kept int8 weights: group_size={self.group_size} does not divide "
                         f"their inputs ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})")  # fmt: skip
        if self.measure:
            summary["speed"] = _speed(before, gm, ctx.example_inputs, layers)
            if summary["speed"]["measured"] < 1.0:
                msg = (f"quantize:{self.scheme} measured {summary['speed']['measured']:.2f}x the unquantized program "
                       "on this machine (slower); see the report's per-layer kernel times")  # fmt: skip
                notes.append(msg)
                warnings.warn(msg, stacklevel=2)
        ctx.scratch["quantize"] = summary
        return PassResult(gm, True, _stats(groups, reparam_err, self.scheme), tuple(notes))

    def _check_reparam(
        self, gm: fx.GraphModule, before: fx.GraphModule, groups: list[Group], ctx: PassContext
    ) -> float:
        """Apply the reparameterization in floating point (to `gm` itself for scheme=none, else to a copy) and check
        the program still computes what it did: the algebra runs in float64 linears, so any error is a bug."""
        floated = gm if self.scheme == "none" else copy_graph_module(gm)
        rewrite_groups(floated, groups if floated is gm else remap(groups, floated), quantized=False)
        floated.recompile()
        cmp = compare(run_program(before, ctx.example_inputs), run_program(floated, ctx.example_inputs))
        if not cmp.ok:
            raise RuntimeError(f"quantize: the reparameterization changed the outputs ({cmp.max_abs:.3g} max abs)")
        return cmp.max_abs


def _quantize_softmax(gm: fx.GraphModule, anat: Any, bits: int, inputs: Any, notes: list[str]) -> dict[str, Any]:
    """Log2-quantize every block's attention probabilities (after the linears: the rewrite hides attention from
    anatomy); measure the quantizer on the example inputs' real probabilities."""
    quantizers = []
    for block in anat.blocks:
        reason = unsupported_reason(block.attention)
        if reason is not None:
            notes.append(f"block {block.index}: attention probabilities left in floating point: {reason}")
            continue
        quantizers.append((block.index, quantize_attention_probs(gm, block.attention, bits)))
    values = node_values(gm, inputs)
    blocks = [dict(log2_error(values[q.args[0].name], bits), block=i) for i, q in quantizers]
    return {"bits": bits, "blocks": blocks}


def _padding(gm: fx.GraphModule, anat: Any, ctx: PassContext) -> fx.Node | None:
    """The padding-mask input, if the model has one calibration can read real tokens from."""
    try:
        return padding_input(gm, anat, ctx.example_inputs) if anat.blocks else None
    except Decline:
        return None


def _chosen_linears(anat: Any, layers: str) -> tuple[list[Linear], list[str]]:
    in_blocks = [lin for block in anat.blocks for lin in block.linears]
    pool = in_blocks if layers == "blocks" else list(anat.linears)
    notes = [f"{lin.weight}: left in floating point: σReparam'd weight (fold_sigma_reparam first)"
             for lin in pool if lin.reparam is not None]  # fmt: skip
    return [lin for lin in pool if lin.reparam is None], notes


def _stats(groups: list[Group], reparam_err: float | None, scheme: str) -> dict[str, Any]:
    out: dict[str, Any] = {"quantized": sum(len(g.linears) for g in groups) if scheme != "none" else 0}
    out["reparameterized"] = sum(1 for g in groups if g.reparam is not None and not g.reparam.identity)
    out["folded_into_norm"] = sum(1 for g in groups if g.fold is not None)
    out["outlier_columns"] = sum(0 if g.outlier_cols is None else len(g.outlier_cols) for g in groups)
    if reparam_err is not None:
        out["reparam_max_abs"] = f"{reparam_err:.2e}"
    return out


def _speed(before: fx.GraphModule, after: fx.GraphModule, inputs: Any, layers: list[dict]) -> dict[str, float]:
    """Measured: the whole program vs the unquantized one. Predicted: the same, from the per-layer kernel times."""
    t_before, t_after = median_seconds([before, after], inputs, repeats=5, warmup=1)
    saved = sum(r["float_ms"] - r["quant_ms"] for r in layers) / 1000
    return {"before_ms": t_before * 1000, "after_ms": t_after * 1000, "measured": t_before / t_after,
            "predicted": t_before / max(t_before - saved, 1e-9)}  # fmt: skip
