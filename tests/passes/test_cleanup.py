"""cleanup: dead code, identities, CSE and constant folding; exact, idempotent, and never growing memory."""

from __future__ import annotations

import torch
from torch import nn

import txcompile as txc
from txcompile.models import hf_zoo
from txcompile.passes import Cleanup
from txcompile.pipeline import PassContext, Pipeline
from txcompile.testing import assert_equivalent, assert_ops, count_ops


class Messy(nn.Module):
    """Everything cleanup should remove: dead values, a repeated expression, param-only math, eval dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.log_scale = nn.Parameter(torch.randn(8))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unused = torch.relu(x) * 3  # noqa: F841 - dead on purpose
        a = torch.sigmoid(x)
        b = torch.sigmoid(x)  # same as a
        y = (a + b) @ self.w.t()  # w.t() depends on parameters only
        return self.drop(y * self.log_scale.exp())  # exp() of a parameter, dropout in eval


def test_removes_dead_code_duplicates_identities_and_folds_parameters():
    model, x = Messy(), torch.randn(3, 5, 8)
    opt = txc.optimize(model, ["cleanup"], example_inputs=(x,))
    stats = opt.report.records[0].stats
    assert stats["folded"] == 2 and stats["cse"] >= 1 and stats["identities"] >= 1 and stats["dead"] >= 1
    assert_ops(
        opt, expect={"aten.sigmoid": 1, "aten.matmul": 1}, forbid=["aten.relu", "aten.exp", "aten.t", "aten.dropout"]
    )
    # The folded tensors replace the parameters they came from: no extra memory is kept.
    assert sum(p.numel() for p in opt.graph_module.parameters()) + sum(
        b.numel() for b in opt.graph_module.buffers()
    ) == sum(p.numel() for p in model.parameters())
    assert_equivalent(model, opt, torch.randn(2, 7, 8))


def test_folding_does_not_materialize_broadcasts():
    class Broadcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias.expand(64, 64)

    opt = txc.optimize(Broadcast(), ["cleanup"], example_inputs=(torch.randn(64, 64),), dynamic=False)
    assert_ops(opt, expect={"aten.expand": 1})


def test_idempotent_on_a_real_architecture():
    model, inputs = hf_zoo.build("gpt_neo")
    opt = txc.optimize(model, ["cleanup"], example_inputs=inputs)
    assert opt.report.records[0].modified
    before = count_ops(opt.graph_module)
    gm, records = Pipeline((Cleanup(),)).run(opt.graph_module, PassContext())
    assert not records[0].modified and count_ops(gm) == before


def test_options_turn_steps_off():
    model, x = Messy(), torch.randn(3, 5, 8)
    opt = txc.optimize(model, ["cleanup:fold=false,cse=false"], example_inputs=(x,))
    stats = opt.report.records[0].stats
    assert stats["folded"] == 0 and stats["cse"] == 0
    assert_ops(opt, expect={"aten.sigmoid": 2, "aten.exp": 1})


def test_folded_graph_round_trips_through_an_artifact(tmp_path):
    from txcompile.testing import assert_roundtrip

    model = Messy()
    opt = txc.optimize(model, ["cleanup"], example_inputs=(torch.randn(3, 5, 8),))
    assert_roundtrip(opt, (torch.randn(2, 7, 8),), tmp_dir=tmp_path)
