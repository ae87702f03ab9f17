"""The helpers users put in their own test suites: count_ops, assert_ops, assert_equivalent, graph_table."""

from __future__ import annotations

import types

import pytest
import torch
from torch import fx, nn

import txcompile as txc
from txcompile.ir import add_tensor, call_nodes, copy_graph_module, get_tensor
from txcompile.testing import assert_equivalent, assert_ops, count_ops, graph_table

aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.body(x))


@pytest.fixture(scope="module")
def net() -> tuple[Net, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 4, 8)
    return model, txc.capture(model, (x,)), x


def _broken(gm: fx.GraphModule, factor: float) -> fx.GraphModule:
    """A copy of `gm` whose first linear reads a weight scaled by `factor`."""
    gm = copy_graph_module(gm)
    lin = next(call_nodes(gm, aten.linear))
    old = lin.args[1]
    with gm.graph.inserting_before(lin):
        new = gm.graph.get_attr(add_tensor(gm, "scaled", get_tensor(gm, old) * factor))
    lin.replace_input_with(old, new)
    gm.recompile()
    return gm


# --- count_ops / assert_ops ------------------------------------------------------------------------------------------


def test_count_ops(net) -> None:
    _, gm, _ = net
    counts = count_ops(gm)
    assert counts["aten.linear"] == 2
    assert counts["aten.gelu"] == 1
    assert counts["aten.layer_norm"] == 1
    assert counts["aten.dropout"] == 1
    assert counts["aten.add"] == 1
    # Placeholders, parameters and the output are scaffolding, not ops.
    assert not {"placeholder", "get_attr", "output"} & counts.keys()


@pytest.mark.parametrize("key", ["aten.linear", torch.ops.aten.linear, torch.ops.aten.linear.default])
def test_assert_ops_accepts_names_packets_and_overloads(net, key: object) -> None:
    _, gm, _ = net
    counts = assert_ops(gm, expect={key: 2, "aten.softmax": 0}, forbid=["aten.softmax", torch.ops.aten.relu])
    assert counts == count_ops(gm)


def test_assert_ops_wrong_count_shows_the_op_table(net) -> None:
    _, gm, _ = net
    with pytest.raises(AssertionError) as info:
        assert_ops(gm, expect={torch.ops.aten.linear: 3})
    msg = str(info.value)
    assert "expected 3 x aten.linear, found 2" in msg
    # The table lists every op present, so the failure shows what is there instead.
    for op in ("aten.gelu", "aten.layer_norm", "aten.dropout"):
        assert op in msg


def test_assert_ops_forbidden_op_present(net) -> None:
    _, gm, _ = net
    with pytest.raises(AssertionError) as info:
        assert_ops(gm, forbid=[torch.ops.aten.dropout.default, "aten.softmax"])
    msg = str(info.value)
    assert "expected no aten.dropout, found 1" in msg
    assert "softmax" not in msg.splitlines()[0]


def test_assert_ops_reports_every_problem_at_once(net) -> None:
    _, gm, _ = net
    with pytest.raises(AssertionError) as info:
        assert_ops(gm, expect={"aten.gelu": 0, "aten.relu": 1}, forbid=["aten.linear"])
    first_line = str(info.value).splitlines()[0]
    assert "aten.gelu" in first_line and "aten.relu" in first_line and "aten.linear" in first_line


def test_assert_ops_takes_an_optimized_module(net) -> None:
    _, gm, _ = net
    wrapper = types.SimpleNamespace(graph_module=gm)
    assert assert_ops(wrapper, expect={"aten.linear": 2})["aten.gelu"] == 1


def test_assert_ops_rejects_other_objects(net) -> None:
    model, _, _ = net
    with pytest.raises(TypeError, match="Net"):
        assert_ops(model, expect={"aten.linear": 2})


# --- assert_equivalent -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tensor", "tuple", "other_batch"])
def test_assert_equivalent_passes_for_the_captured_program(net, form: str) -> None:
    model, gm, x = net
    inputs = {"tensor": x, "tuple": (x,), "other_batch": torch.randn(5, 3, 8)}[form]
    assert_equivalent(model, gm, inputs)


def test_assert_equivalent_runs_the_original_in_eval_mode_and_restores_it(net) -> None:
    model, gm, x = net
    model.train()  # dropout p=0.5 would make any comparison fail if the reference ran in train mode
    try:
        assert_equivalent(model, gm, x)
        assert model.training and model.body[2].training
    finally:
        model.eval()


def test_assert_equivalent_fails_with_the_error_and_tolerance(net) -> None:
    model, gm, x = net
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, _broken(gm, 1.01), x)
    msg = str(info.value)
    assert "outputs differ" in msg and "max abs" in msg
    assert "float32" in msg and "rtol=1.3e-06" in msg and "atol=1e-05" in msg


def test_assert_equivalent_scale(net) -> None:
    model, gm, x = net
    slightly_off = _broken(gm, 1 + 1e-3)
    with pytest.raises(AssertionError):
        assert_equivalent(model, slightly_off, x)
    assert_equivalent(model, slightly_off, x, scale=1000.0)


# --- graph_table -----------------------------------------------------------------------------------------------------


def _row(table: str, node: str) -> str:
    return next(line for line in table.splitlines() if line.split() and line.split()[0] == node)


def test_graph_table_lists_nodes_ops_modules_shapes(net) -> None:
    _, gm, _ = net
    table = graph_table(gm)
    first = next(call_nodes(gm, aten.linear))
    row = _row(table, first.name)
    assert "aten.linear" in row and "body.0" in row and "float32" in row
    assert row.split()[-2].endswith("x16")  # the [B, T, 16] output of Linear(8, 16)
    assert "aten.layer_norm" in _row(table, next(call_nodes(gm, aten.layer_norm)).name)
    assert "norm" in _row(table, next(call_nodes(gm, aten.layer_norm)).name)
    assert _row(table, "x").split()[1] == "placeholder"
    # Parameters are hidden by default and shown on request.
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert weight.name not in table.split()
    assert weight.name in graph_table(gm, ops_only=False).split()


def test_graph_table_limit(net) -> None:
    _, gm, _ = net
    rows = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "placeholder", "output")]
    table = graph_table(gm, limit=3)
    assert table.endswith(f"... {len(rows) - 3} more nodes")
    assert rows[2].name in table.split() and rows[3].name not in table.split()
