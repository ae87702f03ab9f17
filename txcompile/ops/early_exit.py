"""Early exit: the scores an exit point computes, the batch split it makes, and the reassembly of the outputs.

Ops (B: the rows still running at the exit point; `*`: any further dims):
- `txc::exit_confidence(logits [B, *, C]) -> [B] float32`: the largest softmax probability (DeeBERT's confidence);
  with positions (`*`), the least confident position speaks for the row.
- `txc::exit_entropy(logits [B, *, C]) -> [B] float32`: certainty 1 - H(softmax)/log C in [0, 1] (1: one class has
  all the mass), so that, like every score here, higher means readier to exit. DeeBERT exits when H < S: that is
  certainty > 1 - S/log C. Least certain position per row.
- `txc::exit_similarity(before [B, T, D], after [B, T, D], valid [B, T] bool | None) -> [B] float32`: MuE's
  layer-wise similarity, the cosine of each token's state before and after a block averaged over the row's valid
  tokens (for [B, D] states, the cosine of the rows).
- `txc::exit_patience(logits [B, *, C], previous [B, *] int64 | None, count [B] int64 | None) -> (prediction, count)`:
  PABEE's patience counter: how many exits in a row gave the same prediction (all positions equal) as the exit before;
  0 at the first exit. Its score is the count.
- `txc::exit_partition(score [B], threshold) -> (exited [E] int64, kept [K] int64)`: the rows whose score reaches the
  threshold and the rest, each in ascending order (so kept rows keep their relative order). E and K depend on the
  data: under torch.export they are unbacked sizes. NaN never exits; `threshold=inf` never exits.
- `txc::exit_assemble(values [N_i, *], positions [N_i] int64, order [B] int64) -> [B, *]`: the rows of every exit's
  values put back at their original positions (`out[positions[i]] = values[i]`); `order` is the full batch's
  position tensor and gives the output its batch size. Every position must be covered exactly once.

Rows never interact: a row's exit and outputs are what it gets when run alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "exit_confidence",
    "exit_entropy",
    "exit_similarity",
    "exit_patience",
    "exit_partition",
    "exit_assemble",
    "exit_positions",
]


def _rows(score: Tensor) -> Tensor:
    """[B, *] per-position scores -> [B]: the weakest position decides."""
    return score.reshape(score.shape[0], -1).amin(dim=1) if score.dim() > 1 else score


def _check_logits(op: str, logits: Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape)
        raise ValueError(f"txc::{op}: logits must be [batch, ..., classes] with >= 2 classes, got {shape}")


@torch.library.custom_op("txc::exit_confidence", mutates_args=())
def exit_confidence(logits: Tensor) -> Tensor:
    """The largest softmax probability per row (lowest over positions), float32."""
    _check_logits("exit_confidence", logits)
    return _rows(torch.softmax(logits.float(), dim=-1).amax(dim=-1))


@torch.library.custom_op("txc::exit_entropy", mutates_args=())
def exit_entropy(logits: Tensor) -> Tensor:
    """Certainty 1 - H/log C per row (lowest over positions), float32."""
    _check_logits("exit_entropy", logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return _rows(1.0 - entropy / math.log(logits.shape[-1]))


@torch.library.custom_op("txc::exit_similarity", mutates_args=())
def exit_similarity(before: Tensor, after: Tensor, valid: Tensor | None) -> Tensor:
    """Cosine of each token's state before and after a block, averaged over valid tokens, per row (float32)."""
    if before.shape != after.shape or before.dim() not in (2, 3):
        raise ValueError(
            f"txc::exit_similarity: states must both be [B, T, D] or [B, D], got {tuple(before.shape)} and "
            f"{tuple(after.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
    if cos.dim() == 1:
        return cos
    if valid is None:
        return cos.mean(dim=1)
    weight = valid.to(cos.dtype)
    return (cos * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


@torch.library.custom_op("txc::exit_patience", mutates_args=())
def exit_patience(logits: Tensor, previous: Tensor | None, count: Tensor | None) -> tuple[Tensor, Tensor]:
    """(prediction [B, *], count [B]): consecutive exits that agreed with the exit before, per row."""
    _check_logits("exit_patience", logits)
    prediction = logits.argmax(dim=-1)
    if previous is None or count is None:
        return prediction, torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    same = (prediction == previous).reshape(prediction.shape[0], -1).all(dim=1)
    return prediction, torch.where(same, count + 1, torch.zeros_like(count))


@exit_confidence.register_fake
@exit_entropy.register_fake
def _(logits: Tensor) -> Tensor:
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@exit_similarity.register_fake
def _(before: Tensor, after: Tensor, valid: Tensor | None) -> Tensor:
    return before.new_empty((before.shape[0],), dtype=torch.float32)


@exit_patience.register_fake
def _(logits: Tensor, previous: Tensor | None, count: Tensor | None) -> tuple[Tensor, Tensor]:
    prediction = logits.new_empty(logits.shape[:-1], dtype=torch.int64)
    return prediction, logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.custom_op("txc::exit_partition", mutates_args=())
def exit_partition(score: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(rows whose score >= threshold, the other rows), ascending int64 indices."""
    if score.dim() != 1:
        raise ValueError(f"txc::exit_partition: score must be [batch], got {tuple(score.shape)}")
    done = score >= threshold  # NaN compares False: it never exits
    return done.nonzero().flatten(), (~done).nonzero().flatten()


@exit_partition.register_fake
def _(score: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    ctx = torch.library.get_ctx()
    exited, kept = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return score.new_empty((exited,), dtype=torch.int64), score.new_empty((kept,), dtype=torch.int64)


@torch.library.custom_op("txc::exit_positions", mutates_args=())
def exit_positions(x: Tensor) -> Tensor:
    """arange(batch) on x's device: each row's position in the caller's batch, carried through the splits."""
    return torch.arange(x.shape[0], device=x.device)


@exit_positions.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.int64)


@torch.library.custom_op("txc::exit_assemble", mutates_args=())
def exit_assemble(values: list[Tensor], positions: list[Tensor], order: Tensor) -> Tensor:
    """One [B, *] tensor from every exit's rows, each put back at its original position."""
    if len(values) != len(positions) or not values:
        raise ValueError(f"txc::exit_assemble: need one positions tensor per values tensor, got {len(values)} and "
                         f"{len(positions)}")  # fmt: skip
    first = values[0]
    if sum(p.shape[0] for p in positions) != order.shape[0]:
        raise ValueError(f"txc::exit_assemble: the exits cover {sum(p.shape[0] for p in positions)} rows of a batch of "
                         f"{order.shape[0]}")  # fmt: skip
    out = first.new_empty((order.shape[0], *first.shape[1:]))
    for rows, where in zip(values, positions):
        if rows.shape[1:] != first.shape[1:] or rows.shape[0] != where.shape[0]:
            raise ValueError(
                f"txc::exit_assemble: rows {tuple(rows.shape)} do not fit positions {tuple(where.shape)} and the "
                f"first exit's row shape {tuple(first.shape[1:])}"
            )
        out[where] = rows.to(out.dtype)
    return out


@exit_assemble.register_fake
def _(values: list[Tensor], positions: list[Tensor], order: Tensor) -> Tensor:
    first = values[0]
    return first.new_empty((order.shape[0], *first.shape[1:]))
