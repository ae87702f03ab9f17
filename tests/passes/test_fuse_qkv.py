"""fuse_qkv: exact on every Hugging Face architecture and MiniLM; structure; idempotence; gated MLPs; declines."""

from __future__ import annotations

import pytest

import txcompile as txc
from txcompile.models import hf_zoo, reference
from txcompile.passes import FuseQKV
from txcompile.pipeline import PassContext, Pipeline
from txcompile.testing import assert_equivalent, assert_ops, count_ops


@pytest.mark.parametrize("name", hf_zoo.names())
def test_cleanup_then_fuse_qkv_is_exact_on_hugging_face(name):
    entry = hf_zoo.ZOO[name]
    model, inputs = hf_zoo.build(name)
    # optimize() verifies each pass against the original and raises VerificationError if an exact pass is not.
    opt = txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=inputs)
    fuse = opt.report.records[-1]
    expected = entry.blocks if entry.qkv == "separate" else 0
    assert fuse.stats["fused_qkv"] == expected
    assert fuse.modified == bool(expected)
    if expected:
        assert fuse.ops_added.get("aten.split_with_sizes") == expected
        assert fuse.ops_removed.get("aten.linear", 0) == 2 * expected
        assert fuse.error["max_abs"] <= 1e-5
    assert_equivalent(model, opt, hf_zoo.make_inputs(name, batch=3, seq=11))


def test_second_run_changes_nothing():
    model, inputs = hf_zoo.build("llama")
    opt = txc.optimize(model, ["fuse_qkv:gated_mlp=true"], example_inputs=inputs)
    before = count_ops(opt.graph_module)
    gm, records = Pipeline((FuseQKV(gated_mlp=True),)).run(opt.graph_module, PassContext())
    assert not records[0].modified and count_ops(gm) == before


def test_gated_mlp_fuses_gate_and_up():
    model, inputs = hf_zoo.build("llama")
    opt = txc.optimize(model, ["fuse_qkv:gated_mlp=true"], example_inputs=inputs)
    stats = opt.report.records[0].stats
    assert (stats["fused_qkv"], stats["fused_gate_up"]) == (2, 2)
    # Per block: one qkv, one gate_up, o_proj and down_proj; nothing else is a linear in LlamaModel.
    assert_ops(opt, expect={"aten.linear": 8, "aten.split_with_sizes": 4})
    anat = txc.anatomy(opt.graph_module)
    assert all(b.attention.fused_qkv and b.mlp.gated for b in anat.blocks)


def test_fused_weights_replace_the_old_ones():
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, ["fuse_qkv"], example_inputs=inputs)
    names = dict(opt.graph_module.named_parameters())
    assert not any(n.endswith(("query.weight", "key.weight", "value.weight")) for n in names)
    fused = [n for n in names if "qkv" in n]
    assert len(fused) == 4 and names[fused[0]].shape[0] == 3 * model.config.hidden_size


def test_missing_bias_is_filled_with_zeros():
    model = reference.build("encoder", bias=False)
    opt = txc.optimize(model, ["fuse_qkv"], example_inputs=model.example_inputs())
    assert opt.report.records[0].stats["fused_qkv"] == model.config.depth
    assert_equivalent(model, opt, model.example_inputs(batch=3, seq=7))


def test_minilm_real_weights(minilm):
    from txcompile.models import minilm as loader

    model, tokenizer = minilm
    opt = txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=loader.example_inputs(tokenizer))
    assert opt.report.records[-1].stats["fused_qkv"] == 6
    held_out = loader.example_inputs(tokenizer, loader.HELD_OUT_SENTENCES[:6])
    assert_equivalent(model, opt, held_out)
    expected = loader.encode(model, tokenizer, loader.HELD_OUT_SENTENCES[:6])
    actual = loader.encode(opt, tokenizer, loader.HELD_OUT_SENTENCES[:6])
    assert (expected - actual).abs().max() < 1e-5


def test_rewritten_graph_round_trips_through_an_artifact(tmp_path):
    from txcompile.testing import assert_roundtrip

    model, inputs = hf_zoo.build("llama")
    opt = txc.optimize(model, ["fuse_qkv:gated_mlp=true"], example_inputs=inputs)
    assert_roundtrip(opt, hf_zoo.make_inputs("llama", batch=3, seq=5), tmp_dir=tmp_path)
