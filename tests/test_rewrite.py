"""Rules over captured ATen graphs, in the style of torch's test_subgraph_rewriter.

Each case: a tiny module, a pattern, a replacement, and a hand-written comparison function computing what the
rewritten graph must compute. Modules are captured once per file; every test rewrites its own copy.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import fx, nn

import txcompile as txc
from txcompile.errors import PassError
from txcompile.ir import copy_graph_module
from txcompile.pipeline import count_ops
from txcompile.rewrite import Match, Rule, rewrite

aten = torch.ops.aten


class DoubleRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(torch.relu(self.lin(x)))
        b = torch.relu(torch.relu(x * 3))
        return a + b


class MulAdd(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x * y + z


class TwoWidths(nn.Module):
    """One relu on an 8-wide value, one on a 16-wide value."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Linear(8, 8)
        self.wide = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.narrow(x)), torch.relu(self.wide(x))


class ParamAndComputedWeight(nn.Module):
    """One linear reads a parameter as its weight; the other a weight computed at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.b2 = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.w, self.b) + nn.functional.linear(x, self.w * 2, self.b2)


class SharedInner(nn.Module):
    """relu(relu(x)) whose inner relu is also read elsewhere: replacing it would drop a live value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x - 1)
        return torch.relu(h) + h


def _capture(module: nn.Module, *inputs: torch.Tensor) -> tuple[nn.Module, fx.GraphModule, tuple[torch.Tensor, ...]]:
    module = module.eval()
    return module, txc.capture(module, inputs), inputs


@pytest.fixture(scope="module")
def double_relu():
    torch.manual_seed(0)
    return _capture(DoubleRelu(), torch.randn(2, 4, 8))


@pytest.fixture(scope="module")
def mul_add():
    torch.manual_seed(0)
    return _capture(MulAdd(), torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))


@pytest.fixture(scope="module")
def two_widths():
    torch.manual_seed(0)
    return _capture(TwoWidths(), torch.randn(2, 4, 8))


@pytest.fixture(scope="module")
def param_weight():
    torch.manual_seed(0)
    return _capture(ParamAndComputedWeight(), torch.randn(2, 4, 8))


def _fresh(captured: tuple) -> tuple[nn.Module, fx.GraphModule, tuple[torch.Tensor, ...]]:
    module, gm, inputs = captured
    return module, copy_graph_module(gm), inputs


def _run(gm: fx.GraphModule, inputs: tuple) -> object:
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        return gm(*inputs)


RELU_RELU = Rule(
    "relu(relu(x)) => relu(x)",
    pattern=lambda x: aten.relu.default(aten.relu.default(x)),
    replacement=lambda x: aten.relu.default(x),
)
RELU_TO_CLAMP = Rule(
    "relu(x) => clamp_min(x, 0)",
    pattern=lambda x: aten.relu.default(x),
    replacement=lambda x: aten.clamp_min.default(x, 0),
)
CLAMP_TO_RELU = Rule(
    "clamp_min(x, 0) => relu(x)",
    pattern=lambda x: aten.clamp_min.default(x, 0),
    replacement=lambda x: aten.relu.default(x),
)


def test_rule_fires_on_every_match_and_keeps_numerics(double_relu) -> None:
    module, gm, (x,) = _fresh(double_relu)
    assert count_ops(gm)["aten.relu"] == 4

    fired = rewrite(gm, [RELU_RELU])

    assert fired == Counter({RELU_RELU.name: 2})
    assert count_ops(gm)["aten.relu"] == 2

    def comparison(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(module.lin(x)) + torch.relu(x * 3)

    torch.testing.assert_close(_run(gm, (x,)), comparison(x))


def test_multi_argument_pattern_binds_arguments_by_position(mul_add) -> None:
    _, gm, inputs = _fresh(mul_add)
    rule = Rule(
        "add(mul(x, y), z) => addcmul(z, x, y)",
        pattern=lambda x, y, z: aten.add.Tensor(aten.mul.Tensor(x, y), z),
        replacement=lambda x, y, z: aten.addcmul.default(z, x, y),
    )

    assert rewrite(gm, [rule]) == Counter({rule.name: 1})

    counts = count_ops(gm)
    assert counts["aten.addcmul"] == 1 and counts["aten.mul"] == 0 and counts["aten.add"] == 0
    x, y, z = inputs
    torch.testing.assert_close(_run(gm, inputs), torch.addcmul(z, x, y))


def test_replacement_may_return_its_input(mul_add) -> None:
    _, gm, inputs = _fresh(mul_add)
    # Deliberately not semantics-preserving, so the comparison proves the graph really changed.
    rule = Rule("mul(x, y) => x", pattern=lambda x, y: aten.mul.Tensor(x, y), replacement=lambda x, y: x)

    assert rewrite(gm, [rule]) == Counter({rule.name: 1})

    x, _, z = inputs
    assert count_ops(gm)["aten.mul"] == 0
    torch.testing.assert_close(_run(gm, inputs), x + z)


def test_where_sees_shapes_and_fires_only_where_it_holds(two_widths) -> None:
    module, gm, (x,) = _fresh(two_widths)
    seen: list[int] = []

    def only_width_8(match: Match) -> bool:
        seen.append(match.val("x").shape[-1])
        return match.val("x").shape[-1] == 8

    rule = Rule(RELU_TO_CLAMP.name, RELU_TO_CLAMP.pattern, RELU_TO_CLAMP.replacement, where=only_width_8)

    assert rewrite(gm, [rule]) == Counter({rule.name: 1})

    assert sorted(set(seen)) == [8, 16]
    counts = count_ops(gm)
    assert counts["aten.clamp_min"] == 1 and counts["aten.relu"] == 1
    clamp = next(n for n in gm.graph.nodes if n.target is aten.clamp_min.default)
    assert clamp.args[0].meta["val"].shape[-1] == 8
    narrow, wide = _run(gm, (x,))
    torch.testing.assert_close(narrow, module.narrow(x).clamp_min(0))
    torch.testing.assert_close(wide, torch.relu(module.wide(x)))


def test_where_declining_leaves_graph_unchanged(two_widths) -> None:
    module, gm, (x,) = _fresh(two_widths)
    before = count_ops(gm)
    names_before = [n.name for n in gm.graph.nodes]
    rule = Rule(
        RELU_TO_CLAMP.name,
        RELU_TO_CLAMP.pattern,
        RELU_TO_CLAMP.replacement,
        where=lambda m: m.val("x").shape[-1] == 7,
    )

    assert rewrite(gm, [rule]) == Counter()

    assert count_ops(gm) == before
    assert [n.name for n in gm.graph.nodes] == names_before
    narrow, wide = _run(gm, (x,))
    torch.testing.assert_close(narrow, torch.relu(module.narrow(x)))


LINEAR_TO_MATMUL = dict(
    pattern=lambda x, w, b: aten.linear.default(x, w, b),
    replacement=lambda x, w, b: aten.add.Tensor(aten.matmul.default(x, aten.t.default(w)), b),
)


def test_where_on_param_fires_only_for_parameter_weights(param_weight) -> None:
    module, gm, (x,) = _fresh(param_weight)
    params: list[tuple[int, ...]] = []

    def weight_is_parameter(match: Match) -> bool:
        w = match.param("w")
        if w is not None:
            params.append(tuple(w.shape))
        return w is not None

    rule = Rule(
        "linear(x, W, b) => add(matmul(x, t(W)), b) for parameter W", **LINEAR_TO_MATMUL, where=weight_is_parameter
    )

    assert rewrite(gm, [rule]) == Counter({rule.name: 1})

    assert params == [(8, 8)]
    counts = count_ops(gm)
    assert counts["aten.linear"] == 1 and counts["aten.matmul"] == 1
    # The linear left alone is the one whose weight is computed (mul) at run time.
    remaining = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert remaining.args[1].target is aten.mul.Tensor

    def comparison(x: torch.Tensor) -> torch.Tensor:
        return x @ module.w.t() + module.b + nn.functional.linear(x, module.w * 2, module.b2)

    with torch.no_grad():
        torch.testing.assert_close(_run(gm, (x,)), comparison(x))


def test_where_on_param_declines_for_activations(param_weight) -> None:
    _, gm, _ = _fresh(param_weight)
    before = count_ops(gm)
    rule = Rule("linear(x, W, b) => ... for parameter x", **LINEAR_TO_MATMUL, where=lambda m: m.param("x") is not None)

    assert rewrite(gm, [rule]) == Counter()
    assert count_ops(gm) == before


def test_no_match_returns_empty_counter(double_relu) -> None:
    _, gm, _ = _fresh(double_relu)
    before = count_ops(gm)
    rule = Rule(
        "gelu(x) => relu(x)", pattern=lambda x: aten.gelu.default(x), replacement=lambda x: aten.relu.default(x)
    )

    fired = rewrite(gm, [rule])

    assert fired == Counter() and not fired
    assert count_ops(gm) == before


def test_inner_value_used_elsewhere_is_not_rewritten() -> None:
    _, gm, (x,) = _capture(SharedInner(), torch.randn(2, 4, 8))

    assert rewrite(gm, [RELU_RELU]) == Counter()

    assert count_ops(gm)["aten.relu"] == 2
    h = torch.relu(x - 1)
    torch.testing.assert_close(_run(gm, (x,)), torch.relu(h) + h)


def test_rules_that_undo_each_other_raise_pass_error_naming_them(double_relu) -> None:
    _, gm, _ = _fresh(double_relu)

    with pytest.raises(PassError) as info:
        rewrite(gm, [RELU_TO_CLAMP, CLAMP_TO_RELU], max_iters=4)

    msg = str(info.value)
    assert RELU_TO_CLAMP.name in msg and CLAMP_TO_RELU.name in msg
    assert "4 rounds" in msg


def test_rules_that_settle_run_to_a_fixpoint(double_relu) -> None:
    module, gm, (x,) = _fresh(double_relu)

    # relu(relu(x)) collapses first, then the single relus become clamps; a second round finds nothing.
    fired = rewrite(gm, [RELU_RELU, RELU_TO_CLAMP], max_iters=3)

    assert fired == Counter({RELU_RELU.name: 2, RELU_TO_CLAMP.name: 2})
    counts = count_ops(gm)
    assert counts["aten.relu"] == 0 and counts["aten.clamp_min"] == 2
    torch.testing.assert_close(_run(gm, (x,)), module.lin(x).clamp_min(0) + (x * 3).clamp_min(0))


class AbsAbsRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.abs(torch.abs(x)))


def test_where_sees_shapes_of_values_an_earlier_rule_produced() -> None:
    _, gm, _ = _capture(AbsAbsRelu(), torch.randn(2, 4, 8))
    collapse = Rule(
        "abs(abs(x)) => abs(x)",
        pattern=lambda x: aten.abs.default(aten.abs.default(x)),
        replacement=lambda x: aten.abs.default(x),
    )
    seen: list[object] = []

    def width_8(match: Match) -> bool:
        val = match.val("x")
        seen.append(val)
        return val is not None and val.shape[-1] == 8

    to_clamp = Rule(RELU_TO_CLAMP.name, RELU_TO_CLAMP.pattern, RELU_TO_CLAMP.replacement, where=width_8)

    fired = rewrite(gm, [collapse, to_clamp])

    assert None not in seen
    assert fired == Counter({collapse.name: 1, to_clamp.name: 1})
