"""Early-exit calibration: what every exit point would output and score on calibration data, learned exit heads
trained by self-distillation from the final layer, and the threshold that keeps a target agreement with the model.

1. `observe_exits` runs the captured program once over the calibration batches and keeps, per exit point, the head's
   input (the block's output stream, sliced to the leading tokens when the outputs read only those), the MuE
   similarity of the block's input and output, and the model's own outputs.
2. `train_adapters` (heads=learned) fits one adapter per exit, h -> h + W h + b with W, b starting at zero (so it
   starts as the reused head), by distillation: the exit's outputs through the model's own final norm and head should
   match the final layer's (KL of the class distributions for a classifier, 1 - cosine otherwise). No labels.
3. `exit_table` scores every row at every exit (confidence, certainty, patience count or similarity) and says whether
   its exit output agrees with the full model (same top-1 class, or the cosine of the outputs).
4. `choose_threshold` simulates the exits for candidate thresholds (each row leaves at the first exit whose score
   reaches the threshold) and keeps the one with the lowest expected cost whose agreement reaches the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .calibrate import progress_bar
from .exits import Head
from .ops.early_exit import exit_confidence, exit_entropy, exit_patience, exit_similarity
from .verify import node_values

__all__ = ["Observed", "observe_exits", "train_adapters", "exit_table", "ExitTable", "choose_threshold", "simulate"]

Adapter = tuple[Tensor, Tensor]  # (weight [D, D], bias [D]) of h -> h + h W^T + b


@dataclass
class Observed:
    """One calibration batch as every exit point sees it."""

    inputs: list[Tensor]  # per exit: the head's input
    similarity: list[Tensor]  # per exit: [B] MuE similarity of the block's input and output stream
    externals: list[Any]  # values of the head's externals
    final: list[Tensor]  # the model's head outputs


def observe_exits(
    gm: fx.GraphModule, blocks: Sequence[Any], head: Head, batches: Sequence[Any], padding: fx.Node | None,
    *, progress: bool = True,
) -> list[Observed]:  # fmt: skip
    """Run `gm` over `batches` and keep what the exits after `blocks` need (see the module docstring)."""
    from .exits import output_leaves

    leaves = [output_leaves(gm)[i] for i in head.leaves]
    names = {b.stream_in.name for b in blocks} | {b.stream_out.name for b in blocks}
    names |= {e.name for e in head.externals} | {leaf.name for leaf in leaves}
    if padding is not None:
        names.add(padding.name)
    seen: list[Observed] = []
    with progress_bar("early exit: observing the exits", len(batches), enabled=progress) as advance:
        for batch in batches:
            v = node_values(gm, batch, names)
            valid = v[padding.name] != 0 if padding is not None else None
            seen.append(Observed(
                inputs=[_leading(v[b.stream_out.name], head.leading) for b in blocks],
                similarity=[exit_similarity(v[b.stream_in.name], v[b.stream_out.name], valid) for b in blocks],
                externals=[v[e.name] for e in head.externals],
                final=[v[leaf.name] for leaf in leaves],
            ))  # fmt: skip
            advance()
    return seen


def _leading(stream: Tensor, leading: int | None) -> Tensor:
    return stream if leading is None else stream[:, :leading].contiguous()


def head_outputs(head: Head, x: Tensor, externals: Sequence[Any], adapter: Adapter | None) -> list[Tensor]:
    if adapter is not None:
        x = x + F.linear(x, *adapter)
    return list(head.module(x, *externals))


def distill_loss(outputs: Sequence[Tensor], final: Sequence[Tensor], metric: str) -> Tensor:
    """KL(final || exit) of the first output's class distribution (top1), or the mean 1 - cosine of every output."""
    if metric == "top1":
        student, teacher = (t.flatten(0, -2).float() for t in (outputs[0], final[0]))
        return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
    return torch.stack([1 - _row_cosine(o, f).mean() for o, f in zip(outputs, final)]).mean()


def _row_cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def train_adapters(
    head: Head, observed: Sequence[Observed], metric: str, *, steps: int, lr: float, seed: int = 0,
    progress: bool = True,
) -> list[Adapter]:  # fmt: skip
    """One adapter per exit, trained by self-distillation on the observed batches (`steps` Adam steps each, cycling
    through the batches)."""
    exits = len(observed[0].inputs)
    dim = observed[0].inputs[0].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    adapters: list[Adapter] = []
    with progress_bar("early exit: training exit heads", exits * steps, enabled=progress) as advance:
        for k in range(exits):
            weight = nn.Parameter(torch.zeros(dim, dim))
            bias = nn.Parameter(torch.zeros(dim))
            opt = torch.optim.Adam([weight, bias], lr=lr)
            for step in range(steps):
                # Cycle through the batches in a seeded order so no batch is always seen last.
                if step % len(observed) == 0:
                    order = torch.randperm(len(observed), generator=gen).tolist()
                seen = observed[order[step % len(observed)]]
                x = seen.inputs[k].to(weight.dtype)
                loss = distill_loss(head_outputs(head, x, seen.externals, (weight, bias)), seen.final, metric)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                advance()
            adapters.append((weight.detach().clone(), bias.detach().clone()))
    return adapters


@dataclass
class ExitTable:
    """Every calibration row at every exit point."""

    scores: Tensor  # [E, N]: the criterion's score; a row leaves at the first exit whose score reaches the threshold
    agreement: Tensor  # [E + 1, N]: 1/0 (same top-1 as the model) or the outputs' cosine; row E: the model itself
    metric: str


def exit_table(
    head: Head, observed: Sequence[Observed], criterion: str, metric: str, adapters: Sequence[Adapter | None]
) -> ExitTable:
    scores: list[Tensor] = []
    agreement: list[Tensor] = []
    with torch.no_grad():
        for seen in observed:
            rows_s, rows_a = [], []
            previous = count = None
            for k, x in enumerate(seen.inputs):
                outs = head_outputs(head, x, seen.externals, adapters[k])
                rows_a.append(_agreement(outs, seen.final, metric))
                if criterion == "similarity":
                    rows_s.append(seen.similarity[k].float())
                elif criterion == "confidence":
                    rows_s.append(exit_confidence(outs[0]))
                elif criterion == "entropy":
                    rows_s.append(exit_entropy(outs[0]))
                else:
                    previous, count = exit_patience(outs[0], previous, count)
                    rows_s.append(count.float())
            rows_a.append(torch.ones(len(seen.final[0])))
            scores.append(torch.stack(rows_s))
            agreement.append(torch.stack(rows_a))
    return ExitTable(torch.cat(scores, dim=1), torch.cat(agreement, dim=1), metric)


def _agreement(outputs: Sequence[Tensor], final: Sequence[Tensor], metric: str) -> Tensor:
    if metric == "top1":
        same = outputs[0].argmax(-1) == final[0].argmax(-1)
        return same.reshape(len(same), -1).all(dim=1).float()
    return torch.stack([_row_cosine(o, f) for o, f in zip(outputs, final)]).mean(dim=0)


def simulate(table: ExitTable, threshold: float) -> Tensor:
    """[N] the exit each row takes (E: none, the full model)."""
    passed = table.scores >= threshold
    never = torch.full(passed.shape[1:], passed.shape[0], dtype=torch.long)
    return torch.where(passed.any(dim=0), passed.float().argmax(dim=0), never)


def agreement_at(table: ExitTable, exit_index: Tensor) -> float:
    return float(table.agreement.gather(0, exit_index[None]).mean())


def choose_threshold(table: ExitTable, costs: Sequence[float], target: float, integer: bool = False) -> float:
    """The threshold with the lowest expected cost whose agreement on the calibration rows is >= target (inf: never
    exit, always qualifies). `costs[k]`: the cost of leaving at exit k (the last: the full model)."""
    cost = torch.tensor(list(costs), dtype=torch.float64)
    if integer:
        candidates = torch.arange(1, table.scores.shape[0] + 1, dtype=torch.float32)
    else:
        values = table.scores.flatten().unique()
        if len(values) > 512:  # quantiles are enough to place the threshold
            values = values.quantile(torch.linspace(0, 1, 512, dtype=values.dtype))
        candidates = values
    best, best_cost = float("inf"), float(cost[-1])
    for t in sorted(candidates.tolist(), reverse=True):  # from the strictest: ties keep the safer threshold
        chosen = simulate(table, t)
        if agreement_at(table, chosen) < target:
            continue
        expected = float(cost[chosen].mean())
        if expected < best_cost:
            best, best_cost = t, expected
    return best
