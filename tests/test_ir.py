"""ir.refresh_metadata: a new node's failing meta kernel names the upstream nodes that kept stale sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import txcompile as txc
from txcompile.ir import call_nodes, refresh_metadata

aten = torch.ops.aten


def _no_meta_kernel(t: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this op has no meta kernel for these sizes")


def test_failure_downstream_of_a_stale_node_names_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    gm = txc.capture(model, (torch.randn(2, 4, 8),))
    linear = next(call_nodes(gm, aten.linear))
    graph = gm.graph
    with graph.inserting_after(linear):
        doubled = graph.call_function(aten.cat.default, ([linear, linear], 1))  # new: twice the tokens
    with graph.inserting_after(doubled):
        picky = graph.call_function(_no_meta_kernel, (doubled,))
    picky.meta["val"] = linear.meta["val"]  # an old value that the new input makes out of date
    with graph.inserting_after(picky):
        graph.call_function(aten.add.Tensor, (picky, doubled))  # new: the sizes disagree because picky kept its old
    with pytest.raises(RuntimeError) as info:
        refresh_metadata(gm)
    msg = str(info.value)
    assert "out-of-date sizes" in msg and picky.name in msg and "no meta kernel" in msg


def test_a_node_that_cannot_be_recomputed_keeps_its_value_when_nothing_breaks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    gm = txc.capture(model, (torch.randn(2, 4, 8),))
    relu = next(call_nodes(gm, aten.relu))
    relu.target = _no_meta_kernel
    before = relu.meta["val"]
    refresh_metadata(gm, full=True)
    assert relu.meta["val"] is before
