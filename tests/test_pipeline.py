"""Pipeline: pass errors named with their predecessors, per-pass records, bounded fixpoint, verify hook, contracts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import fx, nn

import txcompile as txc
from txcompile.errors import PassError, SpecError
from txcompile.ir import call_nodes, copy_graph_module
from txcompile.passes import Cleanup
from txcompile.pipeline import PassContext, PassRecord, PassResult, Pipeline, count_ops, effective_contract

aten = torch.ops.aten


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.lin(x))) * 2


@pytest.fixture(scope="module")
def captured() -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(2, 4, 8)
    return model, txc.capture(model, (x,)), x


@pytest.fixture
def gm(captured) -> fx.GraphModule:
    return copy_graph_module(captured[1])


CTX = PassContext()


@dataclass(frozen=True)
class Boom:
    name: ClassVar[str] = "boom"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "raises"

    code: int = 0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise RuntimeError(f"boom inside (code {self.code})")


@dataclass(frozen=True)
class RaisesSpecError:
    name: ClassVar[str] = "raises_spec_error"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "raises a TxcError"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise SpecError("calibration_data is required")


@dataclass(frozen=True)
class ReturnsGraph:
    name: ClassVar[str] = "returns_graph"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "forgets to wrap its result"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> Any:
        return gm


@dataclass(frozen=True)
class BreaksLint:
    name: ClassVar[str] = "breaks_lint"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "uses a value before it is defined"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        relu = next(call_nodes(gm, aten.relu))
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(first):
            gm.graph.call_function(aten.neg.default, (relu,))
        return PassResult(gm, True)


@dataclass(frozen=True)
class NoOp:
    name: ClassVar[str] = "noop"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "looks, changes nothing"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False, {"looked": 3}, ("nothing to do",))


@dataclass(frozen=True)
class ReluToClamp:
    """Replaces one relu per call, so it changes the graph exactly as many times as there are relus."""

    name: ClassVar[str] = "relu_to_clamp"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "relu(x) => clamp_min(x, 0), one at a time"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        relu = next(call_nodes(gm, aten.relu), None)
        if relu is None:
            return PassResult(gm, False)
        with gm.graph.inserting_before(relu):
            clamp = gm.graph.call_function(aten.clamp_min.default, (relu.args[0], 0))
        relu.replace_all_uses_with(clamp)
        gm.graph.erase_node(relu)
        return PassResult(gm, True, {"replaced": 1})


@dataclass(frozen=True)
class AlwaysModified:
    name: ClassVar[str] = "always_modified"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "claims a change every time: never settles"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, True)


@dataclass(frozen=True)
class MutatesThenRaises:
    name: ClassVar[str] = "mutates_then_raises"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "erases a node in place, then fails"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ReluToClamp()(gm, ctx)
        raise RuntimeError("half done")


@dataclass(frozen=True)
class Merge:
    name: ClassVar[str] = "merge"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "approximate, exact at r=0"

    r: int = 0

    def is_identity(self) -> bool:
        return self.r == 0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return ReluToClamp()(gm, ctx)


@dataclass(frozen=True)
class Lossy:
    name: ClassVar[str] = "lossy"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "approximate, no identity setting"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_pass_exception_names_pass_spec_and_the_passes_before_it(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((Cleanup(), NoOp(), Boom(code=3))).run(gm, CTX)

    msg = str(info.value)
    assert "pass 'boom:code=3'" in msg
    assert "after [cleanup, noop]" in msg
    assert "RuntimeError" in msg and "boom inside (code 3)" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_failing_first_pass_says_so(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((Boom(),)).run(gm, CTX)
    assert "pass 'boom' (the first pass)" in str(info.value)


def test_txc_error_inside_a_pass_keeps_its_message(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((Cleanup(), RaisesSpecError())).run(gm, CTX)
    msg = str(info.value)
    assert "raises_spec_error" in msg and "after [cleanup]" in msg and "calibration_data is required" in msg


def test_non_pass_result_is_a_pass_error(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((ReturnsGraph(),)).run(gm, CTX)
    msg = str(info.value)
    assert "returns_graph" in msg and "PassResult" in msg and "GraphModule" in msg


def test_graph_that_fails_lint_is_a_pass_error(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((BreaksLint(),)).run(gm, CTX)
    assert "breaks_lint" in str(info.value) and "before it has been defined" in str(info.value)


def test_max_iters_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_iters"):
        Pipeline((NoOp(),), max_iters=0)


def test_failed_pass_leaves_the_input_graph_as_it_was(gm: fx.GraphModule) -> None:
    before = count_ops(gm)
    with pytest.raises(PassError):
        Pipeline((MutatesThenRaises(),)).run(gm, CTX)
    assert count_ops(gm) == before


# --- records ---------------------------------------------------------------------------------------------------------


def test_records_say_what_each_pass_did(gm: fx.GraphModule) -> None:
    out, records = Pipeline((Cleanup(), NoOp(), ReluToClamp())).run(gm, CTX)

    assert [r.name for r in records] == ["cleanup", "noop", "relu_to_clamp"]
    cleanup, noop, clamp = records
    assert cleanup.modified and cleanup.spec == "cleanup" and cleanup.contract == "exact"
    assert cleanup.stats["identities"] == 1
    assert cleanup.ops_removed == {"aten.dropout": 1} and cleanup.ops_added == {}

    assert not noop.modified
    assert noop.stats == {"looked": 3} and noop.notes == ("nothing to do",)
    assert noop.ops_added == {} and noop.ops_removed == {}

    assert clamp.modified and clamp.stats == {"replaced": 1}
    assert clamp.ops_added == {"aten.clamp_min": 1} and clamp.ops_removed == {"aten.relu": 1}
    assert all(r.seconds >= 0 and r.iteration == 0 and r.error is None for r in records)

    counts = count_ops(out)
    assert counts["aten.clamp_min"] == 1 and counts["aten.relu"] == 0 and counts["aten.dropout"] == 0


def test_rewritten_module_still_computes_the_model(captured, gm: fx.GraphModule) -> None:
    model, _, x = captured
    out, _ = Pipeline((Cleanup(), ReluToClamp())).run(gm, CTX)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x))
        assert out(torch.randn(3, 5, 8)).shape == (3, 5, 8)


def test_modified_pass_gets_fresh_metadata(gm: fx.GraphModule) -> None:
    out, _ = Pipeline((ReluToClamp(),)).run(gm, CTX)
    clamp = next(call_nodes(out, aten.clamp_min))
    assert clamp.meta["val"].shape[-1] == 8


def test_on_record_sees_every_record_in_order(gm: fx.GraphModule) -> None:
    seen: list[PassRecord] = []
    _, records = Pipeline((NoOp(), Cleanup())).run(gm, CTX, on_record=seen.append)
    assert seen == records and [r.name for r in seen] == ["noop", "cleanup"]


# --- bounded fixpoint ------------------------------------------------------------------------------------------------


def test_pass_that_never_settles_is_an_error(gm: fx.GraphModule) -> None:
    with pytest.raises(PassError) as info:
        Pipeline((NoOp(), AlwaysModified()), max_iters=3).run(gm, CTX)
    msg = str(info.value)
    assert "always_modified" in msg and "3 rounds" in msg


def test_single_round_does_not_check_for_a_fixpoint(gm: fx.GraphModule) -> None:
    _, records = Pipeline((AlwaysModified(),), max_iters=1).run(gm, CTX)
    assert [r.modified for r in records] == [True]


def test_pipeline_stops_at_the_first_round_that_changes_nothing(gm: fx.GraphModule) -> None:
    # One relu in the graph: the pass changes it in round 0 and finds nothing in round 1.
    _, records = Pipeline((ReluToClamp(),), max_iters=3).run(gm, CTX)
    assert [(r.iteration, r.modified) for r in records] == [(0, True), (1, False)]


def test_fixpoint_that_needs_several_rounds(gm: fx.GraphModule) -> None:
    # A second relu makes the pass change the graph in two rounds; max_iters=3 leaves room for the quiet third.
    relu = next(call_nodes(gm, aten.relu))
    with gm.graph.inserting_after(relu):
        extra = gm.graph.call_function(aten.relu.default, (relu,))
    relu.replace_all_uses_with(extra, delete_user_cb=lambda n: n is not extra)
    gm.recompile()
    two_relus = copy_graph_module(gm)

    _, records = Pipeline((ReluToClamp(),), max_iters=3).run(gm, CTX)
    assert [(r.iteration, r.modified) for r in records] == [(0, True), (1, True), (2, False)]

    with pytest.raises(PassError, match="2 rounds"):
        Pipeline((ReluToClamp(),), max_iters=2).run(two_relus, CTX)


# --- verification hook and contracts ---------------------------------------------------------------------------------


def test_verify_is_called_only_for_passes_that_modified(gm: fx.GraphModule) -> None:
    calls: list[tuple[str, int, int]] = []

    def verify(p: Any, before: fx.GraphModule, after: fx.GraphModule) -> dict[str, Any]:
        calls.append((p.name, count_ops(before)["aten.dropout"], count_ops(after)["aten.dropout"]))
        return {"ok": True, "max_abs": 0.0}

    _, records = Pipeline((NoOp(), Cleanup(), NoOp())).run(gm, CTX, verify=verify)

    # `before` is a snapshot taken ahead of the pass, so cleanup's in-place edit does not show in it.
    assert calls == [("cleanup", 1, 0)]
    assert [r.error for r in records] == [None, {"ok": True, "max_abs": 0.0}, None]


def test_effective_contract_of_approximate_pass_at_identity_is_exact() -> None:
    assert effective_contract(Merge(r=0)) == "exact"
    assert effective_contract(Merge(r=4)) == "approximate"
    assert effective_contract(Lossy()) == "approximate"
    assert effective_contract(Cleanup()) == "exact"


def test_record_holds_the_effective_contract(gm: fx.GraphModule) -> None:
    _, records = Pipeline((Merge(), Merge(r=2))).run(gm, CTX)
    assert [(r.spec, r.contract) for r in records] == [("merge", "exact"), ("merge:r=2", "approximate")]
