"""txc::exit_* ops: scores against their definitions, the batch split, reassembly, and their fake kernels under
torch.export with data-dependent sizes."""

from __future__ import annotations

import math

import pytest
import torch

import txcompile  # noqa: F401 - registers the ops
from txcompile.ops.early_exit import (
    exit_assemble,
    exit_confidence,
    exit_entropy,
    exit_partition,
    exit_patience,
    exit_positions,
    exit_similarity,
)


def test_confidence_is_the_largest_probability_and_the_weakest_position_decides():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = torch.softmax(logits, -1).amax(-1)
    torch.testing.assert_close(exit_confidence(logits), expected)
    per_position = torch.stack([logits, logits.flip(0)], dim=1)  # row 0: confident then uniform
    torch.testing.assert_close(exit_confidence(per_position), expected.amin().expand(2))


def test_entropy_score_is_one_minus_normalized_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.5, -1.0]])
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1)
    torch.testing.assert_close(exit_entropy(logits), 1 - h / math.log(4))
    assert exit_entropy(logits)[0].abs() < 1e-6 and exit_entropy(logits)[1] > 0.999


def test_similarity_averages_token_cosines_over_valid_tokens_only():
    before = torch.randn(2, 5, 8)
    after = before.clone()
    after[:, 3:] = -before[:, 3:]  # the last two tokens point the other way
    valid = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    got = exit_similarity(before, after, valid)
    torch.testing.assert_close(got, torch.tensor([1.0, (3 - 2) / 5]))
    torch.testing.assert_close(exit_similarity(before, after, None), torch.full((2,), 0.2))
    torch.testing.assert_close(exit_similarity(before[:, 0], after[:, 0], None), torch.ones(2))
    with pytest.raises(ValueError, match="states must both be"):
        exit_similarity(before, after[:, :4], None)


def test_patience_counts_consecutive_agreeing_exits():
    a = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    pred, count = exit_patience(a, None, None)
    assert pred.tolist() == [0, 1] and count.tolist() == [0, 0]
    pred, count = exit_patience(b, pred, count)
    assert count.tolist() == [1, 0]
    pred, count = exit_patience(b, pred, count)
    assert count.tolist() == [2, 1]


def test_partition_splits_rows_in_order_and_inf_or_nan_never_exits():
    score = torch.tensor([0.9, 0.1, float("nan"), 0.95, 0.5])
    exited, kept = exit_partition(score, 0.9)
    assert exited.tolist() == [0, 3] and kept.tolist() == [1, 2, 4]
    exited, kept = exit_partition(score, math.inf)
    assert exited.numel() == 0 and kept.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"score must be \[batch\]"):
        exit_partition(score[None], 0.5)


def test_assemble_puts_rows_back_and_checks_coverage():
    order = exit_positions(torch.zeros(5, 3))
    assert order.tolist() == [0, 1, 2, 3, 4]
    x = torch.arange(5.0)[:, None].expand(5, 2)
    parts = [torch.tensor([3, 0]), torch.tensor([4]), torch.tensor([1, 2])]
    out = exit_assemble([x[p] for p in parts], parts, order)
    torch.testing.assert_close(out, x)
    with pytest.raises(ValueError, match="cover 3 rows of a batch of 5"):
        exit_assemble([x[p] for p in parts[:2]], parts[:2], order)


class _TwoStage(torch.nn.Module):
    """Rows whose first feature is positive leave after stage one; the rest run stage two."""

    def __init__(self):
        super().__init__()
        self.one, self.two = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        order = torch.ops.txc.exit_positions(x)
        h = self.one(x)
        done, rest = torch.ops.txc.exit_partition(h[:, 0], 0.0)
        h2 = self.two(h.index_select(0, rest)).view(-1, 2, 2).reshape(-1, 4)
        return torch.ops.txc.exit_assemble([h.index_select(0, done), h2], [done, rest], order)


def test_ops_export_with_data_dependent_sizes_and_match_eager():
    model = _TwoStage().eval()
    x = torch.randn(7, 4)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=2)},), strict=False)
    for batch in (x, torch.randn(11, 4)):
        torch.testing.assert_close(ep.module()(batch), model(batch))
