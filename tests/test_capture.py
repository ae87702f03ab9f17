"""Capture: ATen IR with metadata, dynamic dims, inputs in every accepted form, errors, and no mutation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import txcompile as txc
from txcompile.capture import capture_info
from txcompile.models import hf_zoo, reference
from txcompile.models import minilm as minilm_loader
from txcompile.testing import assert_equivalent


def test_positional_inputs_capture_aten_graph_with_metadata():
    model = reference.build("encoder")
    gm = txc.capture(model, model.example_inputs())
    ops = {str(getattr(n.target, "overloadpacket", "")) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.linear", "aten.layer_norm", "aten.scaled_dot_product_attention"} <= ops
    for node in gm.graph.nodes:
        if node.op in ("call_function", "get_attr", "placeholder") and node.name != "_guards_fn":
            val = node.meta.get("val")
            assert val is not None, f"{node.name} has no val metadata"
    assert any(n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function")


def test_keyword_inputs_and_other_shapes():
    model, inputs = hf_zoo.build("bert")
    gm = txc.capture(model, inputs)
    info = capture_info(gm)
    assert {s.name for s in info.inputs} == set(inputs)
    assert all(s.dynamic == (0, 1) for s in info.inputs)
    for batch, seq in ((1, 5), (3, 13), (5, 2)):
        assert_equivalent(model, gm, hf_zoo.make_inputs("bert", batch=batch, seq=seq))


def test_batch_one_example_still_gives_a_dynamic_program():
    model = reference.build("gpt")
    (ids,) = model.example_inputs(batch=1, seq=1)
    gm = txc.capture(model, (ids,))
    assert_equivalent(model, gm, model.example_inputs(batch=4, seq=9))


def test_static_capture_keeps_shapes_fixed():
    model = reference.build("vit")
    (x,) = model.example_inputs(batch=2)
    gm = txc.capture(model, (x,), dynamic=False)
    assert capture_info(gm).range_constraints == {}
    with pytest.raises(Exception):
        gm(torch.randn(3, *x.shape[1:]))


def test_model_is_never_mutated():
    model, inputs = hf_zoo.build("gpt2")
    model.train()
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = txc.capture(model, inputs)
    assert model.training and all(m.training for m in model.modules())
    assert model.config.use_cache is True
    # The captured program owns its weights: changing them leaves the model alone.
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_decoder_with_cache_enabled_in_config_captures():
    model, inputs = hf_zoo.build("llama")
    model.config.use_cache = True
    gm = txc.capture(model, inputs)
    assert_equivalent(model, gm, hf_zoo.make_inputs("llama", batch=3, seq=6))


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a value: torch.export cannot trace this
            return x * 2
        return x


def test_uncapturable_model_raises_capture_error_with_hint():
    with pytest.raises(txc.CaptureError) as err:
        txc.capture(_DataDependent(), (torch.randn(2, 3),))
    message = str(err.value)
    assert "_DataDependent" in message and "hint:" in message


@pytest.mark.parametrize(
    "bad, fragment",
    [("text", "str"), (["a", "b"], "str"), (None, "required"), (3.0, "float"), ({1: torch.ones(1)}, "keys")],
)
def test_bad_example_inputs_raise_input_error(bad, fragment):
    with pytest.raises(txc.InputError, match=fragment):
        txc.capture(reference.build("gpt"), bad)


def test_inputs_that_do_not_fit_the_signature_raise_input_error():
    with pytest.raises(txc.InputError, match="forward"):
        txc.capture(reference.build("gpt"), {"no_such_argument": torch.ones(2, 3, dtype=torch.long)})


def test_not_a_module_raises_input_error():
    with pytest.raises(txc.InputError, match="nn.Module"):
        txc.capture(lambda x: x, (torch.ones(1),))


def test_minilm_capture_runs_at_other_batch_and_length(minilm):
    """Done-when of the core issue: the real model's capture runs at other shapes and matches it."""
    model, tokenizer = minilm
    gm = txc.capture(model, minilm_loader.example_inputs(tokenizer, minilm_loader.CALIBRATION_SENTENCES[:2]))
    held_out = minilm_loader.HELD_OUT_SENTENCES
    for n, max_length in ((5, 64), (1, 9), (7, 128)):
        assert_equivalent(model, gm, minilm_loader.example_inputs(tokenizer, held_out[:n], max_length=max_length))


def test_a_sliced_example_input_does_not_pin_shapes():
    model = reference.build("gpt")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    gm = txc.capture(model, (ids[:2, :16],))
    other = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gm(other), model(other))
