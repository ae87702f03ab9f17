"""early_exit: rows leave the model at block boundaries once an exit criterion says they are done.

Before:                                   After (exits after blocks 0..L-2; batch compaction):
    h0 = embed(x)                             h0 = embed(x); pos = txc.exit_positions(h0)
    h1 = block0(h0)                           h1 = block0(h0)
    ...                                       y1 = head(h1[:, :1] + adapter1(..))        # the model's own norm + head
    y = head(hL)                              out1, run = txc.exit_partition(txc.exit_confidence(y1), threshold)
                                              h1, mask, pos = index_select(h1, mask, pos over the rows in `run`)
                                              h2 = block1(h1)                            # on the rows still running
                                              ...
                                              y = txc.exit_assemble([y1[out1], ..., head(hL)], [pos1, ..., pos])

Exit points sit at the block boundaries anatomy finds (`exits`: which blocks, the last excluded). At each one the
model's own head (final norm, pooling, classifier: everything between the last block and the outputs) runs on the
block's stream, through a learned adapter with `heads=learned` (trained by self-distillation from the final layer on
the calibration data, see exit_calibration.py; `heads=reuse` uses the head as it is). A criterion scores every row:
- `confidence`: the largest class probability (DeeBERT); `entropy`: certainty 1 - H/log C (DeeBERT's entropy);
- `patience`: consecutive exits with an unchanged prediction (PABEE; `threshold` is the patience);
- `similarity`: cosine of each token's state before and after the block, averaged over real tokens (MuE); needs no
  head, so it also serves embedding models; `auto`: confidence for a classifier, similarity otherwise.
Rows whose score reaches `threshold` leave with the head's outputs; the rest continue on a compacted batch, and the
outputs are put back in the caller's row order. `threshold` unset: calibrated to the lowest expected cost whose
agreement with the full model on the calibration data reaches `target_agreement` (top-1 agreement for a classifier,
mean cosine of the outputs otherwise; `metric` overrides). `threshold=inf` never exits: the identity, held exact.
The report gives the threshold, the agreement, the exit distribution (simulated on the calibration data and measured
by running the rewritten program on it), and the expected (block FLOPs) and measured speedups.

Contract: approximate (identity at threshold=inf). Metric: agreement with the full model (`target_agreement`).
Papers: Tang et al., "You Need Multiple Exiting: Dynamic Early Exiting for Accelerating Unified Vision Language Model"
(MuE, CVPR 2023); Xin et al., "DeeBERT" (ACL 2020); Zhou et al., "BERT Loses Patience" (PABEE, NeurIPS 2020).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..anatomy import Anatomy, Block, anatomy
from ..cost import block_costs, evaluate, example_shape
from ..exit_calibration import ExitTable, agreement_at, choose_threshold, exit_table, observe_exits, simulate, \
    train_adapters  # fmt: skip
from ..exits import Head, Stager, exit_counts, find_head, output_leaves
from ..ir import add_tensor, copy_graph_module, tensor_meta
from ..pipeline import PassContext, PassResult
from ..timing import round_robin
from ..tokens import Decline, padding_input, parse_blocks
from ..verify import run_program

__all__ = ["EarlyExit"]

txc = torch.ops.txc
CRITERIA = ("auto", "confidence", "entropy", "patience", "similarity")
_LOGIT_CRITERIA = ("confidence", "entropy", "patience")


@dataclass(frozen=True)
class EarlyExit:
    """Per-row early exit at block boundaries with batch compaction; calibrated thresholds, reused or learned heads."""

    name: ClassVar[str] = "early_exit"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "per-row exits at block boundaries (confidence/entropy/patience/similarity), compacted"

    criterion: Literal["auto", "confidence", "entropy", "patience", "similarity"] = "auto"
    threshold: float | None = None  # unset: calibrated to target_agreement; inf: never exit
    target_agreement: float = 0.99
    heads: Literal["reuse", "learned"] = "reuse"
    exits: str = "all"  # blocks after which rows may leave ("all", "1:", "0,2"); the last block never has an exit
    metric: Literal["auto", "top1", "cosine"] = "auto"
    train_steps: int = 300  # Adam steps per learned head
    holdout: float = 0.25  # heads=learned: this fraction of the calibration batches calibrates, the rest trains
    lr: float = 3e-3
    measure: bool = True  # run the rewritten program on the calibration data: exit distribution and speed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"early_exit: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("early_exit: threshold must be a number or inf (never exit), got nan")
        if self.criterion == "patience" and self.threshold is not None and self.threshold < 1:
            raise ValueError(f"early_exit: a patience threshold counts agreeing exits: >= 1, got {self.threshold!r}")
        if not 0.0 < self.target_agreement <= 1.0:
            raise ValueError(f"early_exit: target_agreement must be in (0, 1], got {self.target_agreement!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"early_exit: holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if self.train_steps < 1 or not self.lr > 0:
            raise ValueError(f"early_exit: train_steps >= 1 and lr > 0 needed, got {self.train_steps}, {self.lr}")

    def is_identity(self) -> bool:
        return self.threshold == math.inf

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        try:
            if any(n.target is txc.exit_partition.default for n in gm.graph.nodes):
                raise Decline("the program already has exits")
            head = find_head(gm, anat)
            blocks = [anat.blocks[i] for i in parse_blocks(self.exits, len(anat.blocks)) if i < len(anat.blocks) - 1]
            if not blocks:
                raise Decline(f"exits={self.exits!r} leaves no block before the last")
            # Can the graph be split at all? Cheap, and before any calibration work.
            _stage(copy_graph_module(gm), [b.index for b in blocks], [None] * len(blocks), math.inf, "similarity", None)
        except Decline as e:
            return PassResult(gm, False, {"exits": 0}, (f"no exits: {e}",))
        classifier = _is_classifier(anat, head, gm)
        criterion = self.criterion if self.criterion != "auto" else "confidence" if classifier else "similarity"
        metric = self.metric if self.metric != "auto" else "top1" if classifier else "cosine"
        if criterion in _LOGIT_CRITERIA and not classifier:
            raise ValueError(f"criterion={criterion} needs class logits as the model's first output, but it comes "
                             "from no classifier layer; use criterion=similarity")  # fmt: skip
        notes: list[str] = []
        padding = _padding(gm, anat, ctx, notes)
        batches = [ctx.example_inputs, *(ctx.calibration_data or ())]
        if not ctx.calibration_data and (self.threshold is None or self.heads == "learned"):
            notes.append("calibrated on the example inputs only: pass calibration_data (or --calib) for a real set")
        observed = observe_exits(gm, blocks, head, batches, padding)
        adapters: list[Any] = [None] * len(blocks)
        calibrate_on = observed
        if self.heads == "learned":
            # A given threshold needs no calibration rows: then the heads train on every batch.
            fit, calibrate_on = _split(observed, self.holdout if self.threshold is None else 0.0)
            adapters = train_adapters(head, fit, metric, steps=self.train_steps, lr=self.lr, seed=self.seed)
            if calibrate_on is observed and self.threshold is None and self.holdout > 0:
                notes.append("too few calibration batches to hold any out: the threshold is calibrated on the rows "
                             "the exit heads were trained on (optimistic)")  # fmt: skip
        table = exit_table(head, calibrate_on, criterion, metric, adapters)
        costs = _exit_costs(gm, anat, blocks)
        threshold = self.threshold
        if threshold is None:
            threshold = choose_threshold(table, costs, self.target_agreement, integer=criterion == "patience")
            if threshold == math.inf:
                ctx.scratch["early_exit"] = _summary(self, criterion, metric, threshold, blocks, table, costs)
                notes.append(f"no threshold lets any row leave early at {metric} agreement >= "
                             f"{self.target_agreement:g} on the calibration data: program left unchanged")  # fmt: skip
                return PassResult(gm, False, {"exits": 0, "criterion": criterion}, tuple(notes))
        original = copy_graph_module(gm) if self.measure else None
        _stage(gm, [b.index for b in blocks], adapters, threshold, criterion, padding)
        summary = _summary(self, criterion, metric, threshold, blocks, table, costs)
        if original is not None:
            summary.update(_measure(original, gm, batches[len(batches) - len(calibrate_on) :]))
        ctx.scratch["early_exit"] = summary
        stats = {"exits": len(blocks), "criterion": criterion, "threshold": _fmt(threshold), "heads": self.heads,
                 "calib_agreement": f"{summary['agreement']:.4f}",
                 "expected_speedup": f"{summary['expected_speedup']:.2f}x"}  # fmt: skip
        if "measured_speedup" in summary:
            stats["measured_speedup"] = f"{summary['measured_speedup']:.2f}x"
        return PassResult(gm, True, stats, tuple(notes))


def _stage(
    gm: fx.GraphModule, exits: list[int], adapters: list[Any], threshold: float, criterion: str,
    padding: fx.Node | None,
) -> None:  # fmt: skip
    """Rewrite `gm` in place: an exit after each block in `exits` (with its adapter, if any), compacted batches."""
    anat = anatomy(gm)
    pad = next((n for n in gm.graph.nodes if n.name == padding.name), None) if padding is not None else None
    stager = Stager(gm, anat, find_head(gm, anat), threshold)
    for index, adapter in zip(exits, adapters):
        if adapter is not None:
            names = (add_tensor(gm, f"exit{index}_adapter_{part}", t) for part, t in zip("wb", adapter))
            stager.adapters[index] = tuple(names)  # type: ignore[assignment]
        stager.add_exit(anat.blocks[index], _gate(criterion, pad))
    stager.finish()
    gm.recompile()


def _split(observed: list[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    """(batches to train exit heads on, batches to calibrate the threshold on): the last `holdout` of them are held
    out, so the threshold sees how the heads do on rows they were not fitted to; all of them when too few."""
    held = math.ceil(holdout * len(observed))
    if held == 0 or held >= len(observed):
        return observed, observed
    return observed[:-held], observed[-held:]


def _fmt(threshold: float) -> str:
    return "inf" if threshold == math.inf else f"{threshold:.4g}"


def _is_classifier(anat: Anatomy, head: Head, gm: fx.GraphModule) -> bool:
    """Whether the first output the head computes is class logits: a linear outside the blocks, [B, ..., C >= 2]."""
    first = output_leaves(gm)[head.leaves[0]]
    val = tensor_meta(first)
    outside = {lin.output for lin in anat.linears} - {lin.output for b in anat.blocks for lin in b.linears}
    return first in outside and val is not None and val.dim() >= 2 and int(val.shape[-1]) >= 2


def _padding(gm: fx.GraphModule, anat: Anatomy, ctx: PassContext, notes: list[str]) -> fx.Node | None:
    try:
        return padding_input(gm, anat, ctx.example_inputs)
    except Decline as e:
        notes.append(f"similarity averages over every token: {e}")
        return None


def _gate(criterion: str, padding: fx.Node | None) -> Any:
    """The exit gate for `criterion`: (stager, block, stream) -> (score node, head outputs for all rows or None)."""

    def gate(st: Stager, block: Block, stream: fx.Node) -> tuple[fx.Node, list[fx.Node] | None]:
        if criterion == "similarity":
            valid = st.carried.get("valid")
            if valid is None and padding is not None:
                valid = st.carry("valid", st.call(torch.ops.aten.ne.Scalar, padding, 0))
            return st.call(txc.exit_similarity.default, st.current(block.stream_in), stream, valid), None
        outs = st.run_head(stream, block.index)
        if criterion == "patience":
            state = st.call(txc.exit_patience.default, outs[0], st.carried.get("prediction"), st.carried.get("count"))
            st.carry("prediction", st.call(operator.getitem, state, 0))
            return st.carry("count", st.call(operator.getitem, state, 1)), outs  # type: ignore[return-value]
        op = txc.exit_confidence.default if criterion == "confidence" else txc.exit_entropy.default
        return st.call(op, outs[0]), outs

    return gate


def _exit_costs(gm: fx.GraphModule, anat: Anatomy, blocks: list[Block]) -> list[float]:
    """Block FLOPs run by a row leaving at each exit, and by a row running the whole model (last)."""
    batch, seq = example_shape(gm, anat)
    per_block = [float(evaluate(c.flops, 1, seq)) for c in block_costs(gm, anat)]
    done = [sum(per_block[: b.index + 1]) for b in blocks]
    return [*done, sum(per_block)]


def _summary(
    p: EarlyExit, criterion: str, metric: str, threshold: float, blocks: list[Block], table: ExitTable,
    costs: list[float],
) -> dict[str, Any]:  # fmt: skip
    chosen = simulate(table, threshold)
    counts = torch.bincount(chosen, minlength=len(blocks) + 1).tolist()
    expected = costs[-1] / (sum(c * n for c, n in zip(costs, counts)) / max(len(chosen), 1))
    return {
        "criterion": criterion, "metric": metric, "threshold": threshold, "heads": p.heads,
        "target_agreement": p.target_agreement, "exit_blocks": [b.index for b in blocks],
        "rows": len(chosen), "agreement": agreement_at(table, chosen), "distribution": counts,
        "exit_agreement": [float(a) for a in table.agreement.mean(dim=1)],
        "expected_speedup": expected, "exit_costs": costs,
    }  # fmt: skip


def _measure(original: fx.GraphModule, staged: fx.GraphModule, batches: list[Any]) -> dict[str, Any]:
    """Run the rewritten program on the batches the threshold was calibrated on: where their rows really left (the
    simulation's prediction, checked), and both programs' time."""
    counts = [sum(c) for c in zip(*(exit_counts(staged, b) for b in batches))]

    def run_all(fn: Any) -> Any:
        return lambda: [run_program(fn, b) for b in batches]

    times = round_robin({"full": run_all(original), "staged": run_all(staged)}, repeats=5, warmup=1)
    return {"measured_distribution": counts, "full_ms": times["full"] * 1e3, "staged_ms": times["staged"] * 1e3,
            "measured_speedup": times["full"] / times["staged"]}  # fmt: skip
