"""Numerical comparison: the tolerance table, `compare` on nested outputs and non-finite values, `first_divergence`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import fx
from torch.testing._comparison import default_tolerances

import txcompile as txc
from txcompile.capture import normalize_inputs
from txcompile.errors import InputError
from txcompile.ir import call_nodes, copy_graph_module, module_path
from txcompile.models import reference
from txcompile.verify import compare, first_divergence, tolerance

aten = torch.ops.aten


# --- tolerance table -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tolerance_is_torch_testing_default(dtype: torch.dtype) -> None:
    assert tolerance(dtype) == default_tolerances(dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_outputs_must_match_exactly(dtype: torch.dtype) -> None:
    assert tolerance(dtype) == (0.0, 0.0)
    a = torch.tensor([0, 1, 1], dtype=dtype)
    assert compare(a, a.clone()).ok
    assert not compare(a, torch.tensor([0, 1, 0], dtype=dtype)).ok


# --- compare ---------------------------------------------------------------------------------------------------------


def _perturbed(expected: torch.Tensor, factor: float) -> torch.Tensor:
    """`expected` moved by `factor` times the allowed error, alternating sign."""
    rtol, atol = tolerance(expected.dtype)
    allowed = atol + rtol * expected.double().abs()
    sign = torch.ones_like(allowed)
    sign[1::2] = -1
    return (expected.double() + factor * sign * allowed).to(expected.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compare_ok_within_tolerance_fails_just_beyond(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    expected = (torch.randn(1000, generator=g, dtype=torch.float64) * 10).to(dtype)

    within = compare(expected, _perturbed(expected, 0.5))
    assert within.ok and within.max_abs > 0

    actual = expected.clone()
    actual[417] = _perturbed(expected, 1.5)[417]
    beyond = compare(expected, actual)
    assert not beyond.ok
    rtol, atol = tolerance(dtype)
    # rel=5%: the perturbed value is rounded to `dtype`, which moves it by up to one ulp.
    assert beyond.max_abs == pytest.approx(1.5 * (atol + rtol * abs(float(expected[417]))), rel=0.05)
    assert (beyond.rtol, beyond.atol) == (rtol, atol)


def test_compare_scale_widens_the_tolerance() -> None:
    expected = torch.linspace(-5, 5, 101)
    actual = _perturbed(expected, 1.5)
    assert not compare(expected, actual).ok
    assert compare(expected, actual, scale=2.0).ok


def test_compare_nested_outputs_reports_worst_leaf() -> None:
    a, b, c = torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)
    expected = (a, {"x": b, "y": [c]})
    assert compare(expected, (a.clone(), {"x": b.clone(), "y": [c.clone()]})).ok

    cmp = compare(expected, (a, {"x": b, "y": [c + 1e-2]}))
    assert not cmp.ok and cmp.worst_output == "output[1].y[0]"
    assert cmp.max_abs == pytest.approx(1e-2, rel=1e-3)


def test_compare_hf_model_output() -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")
    h, h0, h1 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h0, h1))

    same = outputs.BaseModelOutput(last_hidden_state=h.clone(), hidden_states=(h0.clone(), h1.clone()))
    assert compare(expected, same).ok
    # A ModelOutput is a dict underneath: a plain dict with the same fields compares leaf for leaf.
    assert compare(expected, {"last_hidden_state": h, "hidden_states": (h0, h1)}).ok

    off = outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h0, h1 * 1.01))
    cmp = compare(expected, off)
    assert not cmp.ok and cmp.worst_output == "output.hidden_states[1]"


def test_compare_inf_at_the_same_positions_is_ok() -> None:
    e = torch.tensor([1.0, math.inf, -math.inf, 2.0])
    assert compare(e, e.clone()).ok


@pytest.mark.parametrize(
    "actual",
    [
        torch.tensor([1.0, math.inf, math.inf, 2.0]),  # -inf became +inf
        torch.tensor([1.0, 5.0, -math.inf, 2.0]),  # inf became a number
        torch.tensor([1.0, math.inf, -math.inf, math.nan]),  # number became nan
    ],
)
def test_compare_non_finite_mismatch_fails(actual: torch.Tensor) -> None:
    e = torch.tensor([1.0, math.inf, -math.inf, 2.0])
    cmp = compare(e, actual)
    assert not cmp.ok and cmp.max_abs == math.inf


def test_compare_nan_expected_but_number_produced_fails() -> None:
    assert not compare(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0])).ok


def test_compare_nan_at_the_same_positions_is_ok() -> None:
    e = torch.tensor([1.0, math.nan, 2.0])
    assert compare(e, e.clone()).ok


def test_compare_shape_mismatch_fails() -> None:
    cmp = compare((torch.zeros(2, 3), torch.zeros(4)), (torch.zeros(2, 3), torch.zeros(5)))
    assert not cmp.ok and cmp.worst_output == "output[1]"


def test_compare_structure_mismatch_raises_input_error() -> None:
    with pytest.raises(InputError, match="structure"):
        compare((torch.zeros(2), torch.zeros(2)), (torch.zeros(2),))


def test_compare_same_leaves_in_a_different_container_raises() -> None:
    a, b = torch.ones(3), torch.zeros(3)
    try:
        compare((a, b), {"a": a, "b": b})
    except InputError:
        return
    raise AssertionError("a tuple and a dict compared without an error")


def test_compare_dicts_by_key_not_by_insertion_order() -> None:
    a, b = torch.ones(3), torch.zeros(3)
    assert compare({"a": a, "b": b}, {"b": b, "a": a}).ok


# --- first_divergence ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    model = reference.build("encoder")
    example = model.example_inputs(seq=8)
    return txc.capture(model, example), normalize_inputs(example)


def _scale_linear_output(gm: fx.GraphModule, module_prefix: str) -> tuple[fx.GraphModule, fx.Node]:
    """A copy of `gm` whose first linear under `module_prefix` has its output multiplied by 1.01."""
    broken = copy_graph_module(gm)
    lin = next(n for n in call_nodes(broken, aten.linear) if module_path(n).startswith(module_prefix))
    with broken.graph.inserting_after(lin):
        scaled = broken.graph.call_function(aten.mul.Tensor, (lin, 1.01))
    lin.replace_all_uses_with(scaled, delete_user_cb=lambda n: n is not scaled)
    broken.graph.lint()
    broken.recompile()
    return broken, lin


def test_first_divergence_of_identical_graphs_is_none(encoder) -> None:
    gm, inputs = encoder
    assert first_divergence(gm, copy_graph_module(gm), inputs) is None


@pytest.mark.parametrize("block", [0, 1])
def test_first_divergence_names_a_node_in_the_broken_block(encoder, block: int) -> None:
    gm, inputs = encoder
    broken, lin = _scale_linear_output(gm, f"blocks.{block}.mlp.up")

    where = first_divergence(gm, broken, inputs)

    assert where is not None
    description, max_abs = where
    # The scaled linear itself is unchanged; the first changed value is its consumer, the MLP activation.
    consumer = next(iter(next(iter(lin.users)).users))
    assert description.startswith(f"{consumer.name} (")
    assert f"blocks.{block}.mlp" in description
    assert max_abs > 0


def test_first_divergence_points_at_attention_when_q_is_broken(encoder) -> None:
    gm, inputs = encoder
    broken, _ = _scale_linear_output(gm, "blocks.1.attn.q")

    description, _ = first_divergence(gm, broken, inputs)

    assert "blocks.1.attn" in description and "blocks.0" not in description
