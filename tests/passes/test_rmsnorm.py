"""rmsnorm: exact on pre-LN models; LayerNorms reading the stream become RMSNorm; declines; shapes; idempotence."""

from __future__ import annotations

import pytest
import torch

import txcompile as txc
from txcompile.ir import is_op
from txcompile.models import hf_zoo, reference
from txcompile.passes import RMSNorm
from txcompile.pipeline import PassContext, Pipeline
from txcompile.testing import assert_equivalent, assert_ops, assert_roundtrip, count_ops

aten = torch.ops.aten
PRE_LN_HF = ["gpt2", "gpt_neo", "opt"]


def _check_rewritten(opt, blocks: int) -> None:
    record = opt.report.records[-1]
    assert record.modified, record.notes
    # Two norms per block plus the final norm; no LayerNorm is left anywhere in these models.
    assert record.stats["layernorms_replaced"] == 2 * blocks + 1
    assert record.stats["writers_centred"] == 2 * blocks
    assert record.error["max_abs"] <= 1e-5
    assert_ops(opt, expect={"aten.rms_norm": 2 * blocks + 1}, forbid=["aten.layer_norm"])
    anat = txc.anatomy(opt.graph_module)
    assert all(n.kind == "rmsnorm" for b in anat.blocks for n in b.norms)


@pytest.mark.parametrize("name", PRE_LN_HF)
def test_exact_on_pre_ln_hugging_face(name):
    model, inputs = hf_zoo.build(name)
    # optimize() verifies each pass against the original and raises VerificationError if an exact pass is not.
    opt = txc.optimize(model, ["cleanup", "rmsnorm"], example_inputs=inputs)
    _check_rewritten(opt, hf_zoo.ZOO[name].blocks)
    assert_equivalent(model, opt, hf_zoo.make_inputs(name, batch=3, seq=11))


@pytest.mark.parametrize("kind", ["gpt", "encoder"])
def test_exact_on_reference_pre_ln(kind):
    model = reference.build(kind, norm="pre")
    opt = txc.optimize(model, ["rmsnorm"], example_inputs=model.example_inputs())
    _check_rewritten(opt, model.config.depth)
    assert_equivalent(model, opt, model.example_inputs(batch=3, seq=11, seed=1))


def test_stream_is_zero_mean_after_rewrite():
    model, inputs = hf_zoo.build("gpt2")
    opt = txc.optimize(model, ["rmsnorm"], example_inputs=inputs)
    gm = opt.graph_module
    rms = [n for n in gm.graph.nodes if is_op(n, aten.rms_norm)]
    # Record what each RMSNorm reads and check every such stream value has (numerically) zero mean per row.
    seen: list[torch.Tensor] = []
    interp = torch.fx.Interpreter(gm)
    original_run_node = interp.run_node

    def run_node(node):
        out = original_run_node(node)
        if node in {r.args[0] for r in rms}:
            seen.append(out)
        return out

    interp.run_node = run_node  # type: ignore[method-assign]
    with torch.no_grad():
        interp.run(*[inputs[k] for k in ("input_ids", "attention_mask")])
    assert len(seen) == len(rms)
    for value in seen:
        assert value.mean(-1).abs().max() <= 1e-5 * value.abs().max()


def test_tied_lm_head_keeps_original_table():
    model, inputs = hf_zoo.build("gpt2_lm")
    opt = txc.optimize(model, ["cleanup", "rmsnorm"], example_inputs=inputs)
    assert opt.report.records[-1].modified
    gm = opt.graph_module
    tables = [n.args[0].target for n in gm.graph.nodes if is_op(n, aten.embedding)]
    assert all(str(t).startswith("_txc_") for t in tables)
    assert torch.equal(model.transformer.wte.weight, model.lm_head.weight)  # the user's weights are untouched


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_declines_with_a_note(name):
    model, inputs = hf_zoo.build(name)
    opt = txc.optimize(model, ["rmsnorm"], example_inputs=inputs)
    record = opt.report.records[-1]
    assert not record.modified
    expected = {"bert": "post-LN", "llama": "already read by RMSNorm"}[name]
    assert any(expected in note for note in record.notes), record.notes
    assert count_ops(opt.graph_module).get("aten.rms_norm", 0) == 0


def test_declines_on_post_ln_reference():
    model = reference.build("encoder", norm="post")
    gm = txc.capture(model, model.example_inputs())
    before = count_ops(gm)
    result = RMSNorm()(gm, PassContext())
    assert not result.modified and "post-LN" in " ".join(result.notes)
    assert count_ops(result.gm) == before


def test_declines_on_minilm(minilm):
    from txcompile.models import minilm as loader

    model, tokenizer = minilm
    gm = txc.capture(model, loader.example_inputs(tokenizer))
    result = RMSNorm()(gm, PassContext())
    assert not result.modified and "post-LN" in " ".join(result.notes)


def test_declines_on_vision_stem():
    model, inputs = hf_zoo.build("vit")
    gm = txc.capture(model, inputs)
    result = RMSNorm()(gm, PassContext())
    assert not result.modified and result.notes


def test_second_run_changes_nothing():
    model, inputs = hf_zoo.build("gpt2")
    opt = txc.optimize(model, ["rmsnorm"], example_inputs=inputs)
    before = count_ops(opt.graph_module)
    gm, records = Pipeline((RMSNorm(),)).run(opt.graph_module, PassContext())
    assert not records[0].modified and records[0].notes
    assert count_ops(gm) == before


def test_roundtrip_gpt2(tmp_path):
    model, inputs = hf_zoo.build("gpt2")
    opt = txc.optimize(model, ["cleanup", "rmsnorm"], example_inputs=inputs)
    assert_roundtrip(opt, hf_zoo.make_inputs("gpt2", batch=3, seq=11), tmp_dir=tmp_path)


def test_looks_through_no_op_casts_without_cleanup():
    model, inputs = hf_zoo.build("gpt2")
    opt = txc.optimize(model, ["rmsnorm"], example_inputs=inputs)
    _check_rewritten(opt, hf_zoo.ZOO["gpt2"].blocks)
