"""token_merge: identity at r=0, shapes re-derived downstream, padding-aware batches, unmerge, artifacts."""

from __future__ import annotations

import pytest
import sympy
import torch

import txcompile as txc
from txcompile import cost, inspection
from txcompile.models import hf_zoo, reference
from txcompile.passes.token_merge import schedule
from txcompile.tokens import parse_blocks
from txcompile.testing import assert_roundtrip, count_ops


def test_r_zero_is_exact_and_changes_nothing():
    model = reference.build("vit")
    opt = txc.optimize(model, ["token_merge:r=0"], example_inputs=model.example_inputs())
    record = opt.report.records[0]
    assert record.contract == "exact" and not record.modified


def test_reference_vit_merges_every_block_and_runs_at_other_batch_sizes():
    model = reference.build("vit", depth=3)
    opt = txc.optimize(model, ["token_merge:r=2,min_cosine=0.5"], example_inputs=model.example_inputs())
    record = opt.report.records[0]
    assert record.modified and record.stats["merged_blocks"] == 3 and record.stats["protected"] == 1
    ops = count_ops(opt.graph_module)
    assert ops["txc.bipartite_match"] == 3 and ops["txc.merge_tokens"] == 3
    for batch in (1, 5):
        out = opt(*model.example_inputs(batch=batch))
        assert out.shape == model(*model.example_inputs(batch=batch)).shape


@pytest.mark.parametrize(("name", "protected"), [("vit", 1), ("deit", 2)])
def test_hugging_face_vision_models_protect_their_class_tokens(name, protected):
    model, inputs = hf_zoo.build(name)
    opt = txc.optimize(model, ["token_merge:r=1,min_cosine=0.5"], example_inputs=inputs)
    record = opt.report.records[0]
    assert record.modified and record.stats["protected"] == protected


def test_padded_batch_gives_each_text_its_own_result():
    model, _ = hf_zoo.build("bert")
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    opt = txc.optimize(model, ["token_merge:r=1,min_cosine=0"], example_inputs=inputs)
    assert opt.report.records[0].stats["padding_aware"]
    batched = opt(input_ids=ids, attention_mask=mask)[0]
    for row in range(3):
        n = int(mask[row].sum())
        alone = opt(input_ids=ids[row : row + 1, :n], attention_mask=mask[row : row + 1, :n])[0]
        torch.testing.assert_close(batched[row, :n], alone[0], atol=1e-5, rtol=1e-4)


def test_unmerge_keeps_per_token_outputs_and_the_artifact_round_trips(tmp_path):
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, ["token_merge:r=2,min_cosine=0"], example_inputs=inputs)
    out = opt(**inputs)[0]
    assert out.shape == model(**inputs)[0].shape
    assert_roundtrip(opt, inputs, tmp_dir=tmp_path)


def test_options():
    assert schedule(4, "constant", 3) == [4, 4, 4]
    assert schedule(4, "decreasing", 5) == [8, 6, 4, 2, 0]
    assert parse_blocks("all", 4) == [0, 1, 2, 3] and parse_blocks("2:", 4) == [2, 3]
    assert parse_blocks("0,3", 4) == [0, 3]
    with pytest.raises(txc.SpecError, match="r must be"):
        txc.parse_spec("token_merge:r=-1")
    model = reference.build("vit", depth=2)
    opt = txc.optimize(model, ["token_merge:r=0,flops=0.2,min_cosine=0"], example_inputs=model.example_inputs())
    assert opt.report.records[0].stats["r"] >= 1


def test_declines_on_causal_models():
    model = reference.build("gpt")
    opt = txc.optimize(model, ["token_merge:r=2"], example_inputs=model.example_inputs())
    record = opt.report.records[0]
    assert not record.modified and "causal" in record.notes[0]


def test_cost_model_and_report_give_tokens_per_block_as_expressions():
    model = reference.build("vit", depth=3)  # 17 tokens: CLS + 16 patches
    opt = txc.optimize(model, ["token_merge:r=3,min_cosine=0"], example_inputs=model.example_inputs())
    gm = opt.graph_module
    anat = txc.anatomy(gm)
    assert all(b.mlp is not None for b in anat.blocks), "the MLP after a merge is still the block's MLP"
    costs = cost.block_costs(gm, anat)
    assert [c.tokens for c in costs] == [cost.T, cost.T - 3, cost.T - 6]
    # The MLP of a block runs on the merged tokens: its rows are T - 3r' where r' merges happened so far.
    assert costs[0].parts["mlp.fc1"] == sympy.expand(2 * cost.B * (cost.T - 3) * 32 * 128)
    tokens = opt.report.tokens
    assert tokens["per_block"] == ["T", "T - 3", "T - 6"] and tokens["per_block_at"] == [17, 14, 11]
    assert 0 < tokens["flops_after_at"] < tokens["flops_before_at"]
    assert "tokens entering each block: T, T - 3, T - 6" in str(opt.report)
    insp = inspection.build(gm, label="merged")
    assert [c["tokens"] for c in insp.costs] == ["T", "T - 3", "T - 6"]
    assert "T - 6 = 11" in inspection.render_text(insp)


def test_text_model_token_counts_follow_the_input_length():
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, ["token_merge:r=1,min_cosine=0"], example_inputs=inputs)
    costs = cost.block_costs(opt.graph_module, txc.anatomy(opt.graph_module))
    assert [c.tokens for c in costs] == [cost.T - i for i in range(len(costs))]


def test_a_class_token_head_needs_no_unmerge_and_per_token_outputs_get_one():
    model = reference.build("vit", depth=2)  # a classifier: the head reads the CLS token only
    opt = txc.optimize(model, ["token_merge:r=1,min_cosine=0.5"], example_inputs=model.example_inputs())
    assert not opt.report.records[0].stats["unmerged"]
    assert "txc.unmerge_tokens" not in count_ops(opt.graph_module)
    model, inputs = hf_zoo.build("bert")  # last_hidden_state is per token
    opt = txc.optimize(model, ["token_merge:r=1,min_cosine=0"], example_inputs=inputs)
    assert opt.report.records[0].stats["unmerged"]


@pytest.mark.parametrize("metric", ["keys_concat", "hidden"])
def test_other_similarity_metrics(metric):
    model = reference.build("vit", depth=2)
    opt = txc.optimize(
        model, [f"token_merge:r=2,metric={metric},min_cosine=0.5"], example_inputs=model.example_inputs()
    )
    assert opt.report.records[0].stats["merged_blocks"] == 2
    with pytest.raises(txc.SpecError, match="metric"):
        txc.parse_spec("token_merge:metric=values")


def test_auto_picks_the_largest_r_within_the_budget():
    model = reference.build("vit", depth=3)
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["token_merge:auto=true,min_cosine=0.995"], example_inputs=inputs)
    record = opt.report.records[0]
    r = record.stats["r"]
    assert record.modified and r >= 1 and record.error["cosine"] >= 0.995
    # One more token per block breaks the budget (the bisection's answer is the largest that holds).
    with pytest.raises(txc.VerificationError, match="min_cosine"):
        txc.optimize(model, [f"token_merge:r={r + 1},min_cosine=0.995"], example_inputs=inputs)


def test_merged_programs_compile_with_torch_compile():
    model = reference.build("vit", depth=2)
    opt = txc.optimize(model, ["token_merge:r=3,min_cosine=0"], example_inputs=model.example_inputs())
    compiled = torch.compile(opt.graph_module)
    for batch in (2, 5):
        inputs = model.example_inputs(batch=batch)
        torch.testing.assert_close(compiled(*inputs), opt(*inputs), atol=1e-5, rtol=1e-4)
