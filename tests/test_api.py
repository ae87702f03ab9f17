"""`optimize()` as a user sees it: verification errors, input and spec errors, capture errors, no mutation of the
user's model, and the returned OptimizedModule (calling conventions, report, dynamic batch)."""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import txcompile as txc
from txcompile.errors import CaptureError, InputError, SpecError, VerificationError
from txcompile.ir import add_tensor, call_nodes, get_tensor
from txcompile.pipeline import PassContext, PassResult

aten = torch.ops.aten


class Tiny(nn.Module):
    """A residual MLP with a LayerNorm, a buffer, dropout and an HF-style config."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.register_buffer("offset", torch.linspace(-1, 1, 8))
        self.config = types.SimpleNamespace(use_cache=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(x)) * mask[..., None].to(x.dtype) + self.offset


def _tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _inputs(batch: int = 2, seq: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return torch.randn(batch, seq, 8, generator=g), torch.ones(batch, seq, dtype=torch.long)


@dataclass(frozen=True)
class ScaleFirstWeight:
    """Declared exact, but scales the first linear's weight by 1.01: verification must catch it."""

    name: ClassVar[str] = "scale_first_weight"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "deliberately wrong"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lin = next(call_nodes(gm, aten.linear))
        old = lin.args[1]
        target = add_tensor(gm, "scaled_weight", get_tensor(gm, old) * 1.01)
        with gm.graph.inserting_before(lin):
            new = gm.graph.get_attr(target)
        lin.replace_input_with(old, new)
        return PassResult(gm, True, {"scaled": 1})


# --- verification ----------------------------------------------------------------------------------------------------


def test_wrong_exact_pass_raises_verification_error_naming_pass_and_node() -> None:
    model = _tiny()
    with pytest.raises(VerificationError) as info:
        txc.optimize(model, ["cleanup", ScaleFirstWeight()], example_inputs=_inputs())

    err = info.value
    assert err.pass_name == "scale_first_weight"
    assert "scale_first_weight" in str(err) and "exact" in str(err)
    # The divergence starts at the linear whose weight changed, in the model's first MLP layer.
    assert err.node is not None and "aten.linear" in err.node and "mlp.0" in err.node
    assert err.node in str(err)
    assert err.max_abs is not None and err.max_abs > 0


def test_without_verify_the_wrong_pass_goes_through() -> None:
    model = _tiny()
    x, mask = _inputs()
    opt = txc.optimize(model, [ScaleFirstWeight()], example_inputs=(x, mask), verify=False)
    with torch.no_grad():
        # Proves the wrong pass really ran: the result differs from the model.
        assert not torch.allclose(opt(x, mask), model(x, mask))
    assert opt.report.records[0].error is None


# --- bad arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "type_name"), [("bert-base", "str"), (lambda x: x, "function"), (None, "NoneType")])
def test_model_must_be_an_nn_module(model: object, type_name: str) -> None:
    with pytest.raises(InputError) as info:
        txc.optimize(model, ["cleanup"], example_inputs=torch.randn(2, 8))
    assert "torch.nn.Module" in str(info.value) and type_name in str(info.value)


@pytest.mark.parametrize(
    ("example_inputs", "fragment"),
    [
        ("a photo of a cat", "str"),
        (["a photo", "of a cat"], "str"),
        (None, "example_inputs"),
        ({0: torch.randn(2, 8)}, "str"),
        (3.5, "float"),
    ],
)
def test_example_inputs_of_the_wrong_type(example_inputs: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        txc.optimize(_tiny(), ["cleanup"], example_inputs=example_inputs)
    assert fragment in str(info.value)


class ForwardMustNotRun(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward ran although the arguments were invalid")


@pytest.mark.parametrize(
    ("passes", "backend", "fragment"),
    [
        (["fuse_qvk"], "eager", "did you mean 'fuse_qkv'"),
        ("cleanup,fuse_qvk", "eager", "fuse_qvk"),
        (["cleanup:fold=maybe"], "eager", "fold"),
        (["cleanup"], "tritonn", "unknown backend 'tritonn'"),
        (["cleanup"], 42, "int"),
        ([3], "eager", "int"),
    ],
)
def test_spec_errors_come_before_any_model_run(passes: object, backend: object, fragment: str) -> None:
    model = ForwardMustNotRun()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="forward ran"):
        model(x)
    with pytest.raises(SpecError) as info:
        txc.optimize(model, passes, example_inputs=x, backend=backend)
    assert fragment in str(info.value)


class BranchesOnSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class BranchesOnItem(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean().item() > 0 else x


@pytest.mark.parametrize("model_cls", [BranchesOnSum, BranchesOnItem])
def test_data_dependent_control_flow_is_a_capture_error(model_cls: type[nn.Module]) -> None:
    with pytest.raises(CaptureError) as info:
        txc.optimize(model_cls(), ["cleanup"], example_inputs=torch.randn(2, 3))
    msg = str(info.value)
    assert model_cls.__name__ in msg
    assert "hint" in msg and "control flow" in msg
    # The user's own source line is named, not a frame inside torch.
    assert "test_api.py" in msg


# --- the user's model is never mutated -------------------------------------------------------------------------------


def test_users_model_is_untouched_by_optimize_and_by_training_the_result() -> None:
    model = _tiny()
    model.train()
    model.mlp[2].eval()  # mixed flags, so a blanket train()/eval() on restore would be caught
    flags = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    x, mask = _inputs()

    opt = txc.optimize(model, ["cleanup"], example_inputs=(x, mask))

    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.config.use_cache is True
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    trainable = [p for p in opt.parameters() if p.requires_grad]
    assert trainable, "the optimized module should expose trainable parameters"
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    opt(x, mask).square().mean().backward()
    optimizer.step()

    assert any(not torch.equal(p, b) for p, b in zip(trainable, before)), "the step changed nothing: test is vacuous"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


# --- the OptimizedModule ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optimized() -> tuple[Tiny, txc.OptimizedModule]:
    model = _tiny()
    return model, txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=_inputs())


def test_called_like_the_model_positionally(optimized) -> None:
    model, opt = optimized
    x, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask))


def test_keyword_capture_called_with_keywords_in_any_order() -> None:
    model = _tiny()
    x, mask = _inputs()
    opt = txc.optimize(model, ["cleanup"], example_inputs={"x": x, "mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(opt(mask=mask, x=x), model(x, mask))


def test_positional_capture_accepts_keywords(optimized) -> None:
    model, opt = optimized
    x, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(x=x, mask=mask), model(x, mask))


def test_keyword_capture_accepts_positional() -> None:
    model = _tiny()
    x, mask = _inputs()
    opt = txc.optimize(model, [], example_inputs={"x": x, "mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask))


def test_report_names_every_pass(optimized) -> None:
    _, opt = optimized
    text = str(opt.report)
    assert "cleanup" in text and "fuse_qkv" in text and "Tiny" in text
    assert "cleanup" in repr(opt)


def test_report_to_dict_is_json(optimized) -> None:
    _, opt = optimized
    data = json.loads(json.dumps(opt.report.to_dict(), default=str))
    assert {"model", "backend", "capture", "capture_error", "passes", "fallbacks", "seconds"} <= data.keys()
    assert data["model"] == "Tiny" and data["backend"] == "eager"
    assert [p["spec"] for p in data["passes"]] == ["cleanup", "fuse_qkv"]
    cleanup = data["passes"][0]
    assert cleanup["modified"] is True and cleanup["contract"] == "exact"
    assert cleanup["ops_removed"] == {"aten.dropout": 1}
    assert cleanup["error"]["ok"] is True
    assert data["capture_error"]["ok"] is True
    assert [i["name"] for i in data["capture"]["inputs"]] == ["x", "mask"]


def test_captured_at_batch_1_runs_at_batch_3() -> None:
    model = _tiny()
    opt = txc.optimize(model, ["cleanup"], example_inputs=_inputs(batch=1))
    for batch, seq in [(3, 4), (3, 7)]:
        x, mask = _inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(opt(x, mask), model(x, mask))


class Positions(nn.Module):
    """Builds tensors on its input's device at run time, as Hugging Face models build masks and position ids."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
        return self.proj(x + pos[:, None]) * mask.to(x.device, torch.bool)[..., None]


def test_moving_the_result_moves_the_devices_its_graph_names() -> None:
    model = Positions().eval()
    opt = txc.optimize(model, ["cleanup"], example_inputs=_inputs())
    assert _devices(opt.graph_module) == {torch.device("cpu")}  # the capture recorded where it ran

    moved = opt.to("meta")  # a device every machine has; the same path serves .to("cuda") and .cuda()
    assert moved is opt and _devices(opt.graph_module) == {torch.device("meta")}
    x, mask = _inputs(batch=3, seq=5)
    out = opt(x.to("meta"), mask.to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 5, 8)
    assert next(model.parameters()).device.type == "cpu"  # the user's model stays where it was


def _devices(gm: fx.GraphModule) -> set[torch.device]:
    """Every torch.device the graph's calls name."""
    found: set[torch.device] = set()
    for node in gm.graph.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.add(a) if isinstance(a, torch.device) else None)
    return found
