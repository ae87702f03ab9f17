"""token_prune: identity at keep=1, token counts per block, vision and text models, padded batches, artifacts."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import txcompile as txc
from txcompile.models import hf_zoo, reference
from txcompile.models import minilm as minilm_lib
from txcompile.passes import TokenPrune
from txcompile.tokens import parse_blocks
from txcompile.pipeline import PassContext
from txcompile.testing import assert_roundtrip, count_ops
from txcompile.verify import node_values


def _record(opt):
    return opt.report.records[0]


def assert_scores_are_the_models_attention(opt, inputs, score, iters=20):
    """Each prune_plan's scores are recomputed from what the block's SDPA really attends with (no padding here)."""
    graph = opt.graph_module.graph
    values = node_values(opt.graph_module, inputs)
    cores = graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
    plans = graph.find_nodes(op="call_function", target=torch.ops.txc.prune_plan.default)
    assert len(plans) == len(cores)  # blocks=all
    for core, plan in zip(cores, plans):
        q, k = values[core.args[0].name], values[core.args[1].name]
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        mask = values[mask.name] if mask is not None else None
        batch, heads, tokens, _ = q.shape
        eye = torch.eye(tokens).expand(batch, heads, tokens, tokens)  # values = identity: SDPA returns its weights
        probs = F.scaled_dot_product_attention(q, k, eye, mask, scale=core.kwargs.get("scale")).mean(1)
        expect = probs[:, 0] if score == "cls" else torch.full((batch, tokens), 1 / tokens)
        for _ in range(iters if score == "pagerank" else 0):
            expect = torch.einsum("bij,bi->bj", probs, expect)
        torch.testing.assert_close(values[plan.args[0].name], expect)


def test_keep_one_is_exact_and_changes_nothing():
    model = reference.build("vit")
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["token_prune:keep=1.0,blocks=all"], example_inputs=inputs)
    record = _record(opt)
    assert record.contract == "exact" and not record.modified
    assert "txc.prune_plan" not in count_ops(opt.graph_module)
    torch.testing.assert_close(opt(*inputs), model(*inputs))


@pytest.mark.parametrize(("score", "fuse", "lengths"), [("cls", True, [10, 7]), ("pagerank", False, [9, 5])])
def test_reference_vit_prunes_each_selected_block_and_runs_at_other_batch_sizes(score, fuse, lengths):
    model = reference.build("vit", depth=2)
    opt = txc.optimize(model, [TokenPrune(keep=0.5, blocks="all", score=score, fuse=fuse, min_cosine=0.5)],
                       example_inputs=model.example_inputs())  # fmt: skip
    record = _record(opt)
    assert record.modified and record.stats["pruned_blocks"] == 2 and record.stats["protected"] == 1
    ops = count_ops(opt.graph_module)
    assert ops["txc.prune_plan"] == 2 and ops["txc.merge_tokens"] == 2
    assert "txc.unmerge_tokens" not in ops and not record.stats["unmerged"]  # the head reads the CLS token only
    # 17 tokens (CLS + 16 patches): 1 + ceil(0.5 * 16) kept, + 1 fused token; then 1 + ceil(0.5 * 9) (+ 1).
    merged = opt.graph_module.graph.find_nodes(op="call_function", target=torch.ops.txc.merge_tokens.default)
    assert [n.meta["val"][0].shape[1] for n in merged] == lengths
    assert_scores_are_the_models_attention(opt, (model.example_inputs(), {}), score)
    again = TokenPrune(keep=0.5, blocks="all")(opt.graph_module, PassContext((model.example_inputs(), {})))
    assert not again.modified and "already reduced" in again.notes[0]  # a second round changes nothing
    for batch in (1, 5):
        inputs = model.example_inputs(batch=batch, seed=batch)
        assert opt(*inputs).shape == model(*inputs).shape == (batch, 10)


@pytest.mark.parametrize(("name", "protected", "score"), [("vit", 1, "pagerank"), ("deit", 2, "cls")])
def test_hugging_face_vision_models_keep_their_class_tokens(name, protected, score):
    model, inputs = hf_zoo.build(name)
    opt = txc.optimize(model, [TokenPrune(keep=0.5, blocks="all", score=score, min_cosine=0)], example_inputs=inputs)
    record = _record(opt)
    assert record.modified and record.stats["pruned_blocks"] == 2 and record.stats["protected"] == protected
    assert_scores_are_the_models_attention(opt, ((), inputs), score)
    other = hf_zoo.make_inputs(name, batch=3, seed=1)
    out, expect = opt(**other), model(**other)
    assert out[0].shape == expect[0].shape and out[1].shape == expect[1].shape  # per-token states, pooled CLS


def test_padded_sentences_get_their_own_embeddings(minilm):
    model, tokenizer = minilm
    inputs = minilm_lib.example_inputs(tokenizer, minilm_lib.CALIBRATION_SENTENCES[:4])
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # really padded
    opt = txc.optimize(model, [TokenPrune(keep=0.7, blocks="2::2", score="pagerank", min_cosine=0.5)],
                       example_inputs=inputs)  # fmt: skip
    record = _record(opt)
    assert record.stats["padding_aware"] and record.stats["pruned_blocks"] == 2
    hidden = opt(**inputs)[0]
    assert hidden.shape == model(**inputs)[0].shape  # unmerged: one state per input token
    batched = minilm_lib.mean_pool(hidden, mask)
    for row in range(len(mask)):
        n = int(mask[row].sum())
        alone = opt(input_ids=inputs["input_ids"][row : row + 1, :n], attention_mask=mask[row : row + 1, :n])[0]
        torch.testing.assert_close(hidden[row, :n], alone[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[row], minilm_lib.mean_pool(alone, mask[row : row + 1, :n])[0])
    # A budget, not a benchmark: pruning 30% of the tokens twice keeps the sentence embeddings close.
    original = minilm_lib.mean_pool(model(**inputs)[0], mask)
    assert torch.nn.functional.cosine_similarity(batched, original).min() > 0.8


def test_text_model_without_fusing_round_trips_as_an_artifact_at_other_lengths(tmp_path):
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, [TokenPrune(keep=0.5, blocks="0", fuse=False, min_cosine=0)], example_inputs=inputs)
    assert _record(opt).stats["padding_aware"]
    other = hf_zoo.make_inputs("bert", batch=3, seq=11, seed=2)
    assert opt(**other)[0].shape == (3, 11, 32)
    assert_roundtrip(opt, other, tmp_dir=tmp_path)


def test_options():
    assert parse_blocks(TokenPrune().blocks, 12) == [3, 6, 9]  # EViT's placement in a 12-block ViT
    assert parse_blocks("1::2", 6) == [1, 3, 5] and parse_blocks("0,2", 4) == [0, 2]
    assert TokenPrune(keep=1.0).is_identity() and not TokenPrune().is_identity()
    assert (
        TokenPrune(min_cosine=0.95).check_quality({"cosine": 0.9})
        and TokenPrune().check_quality({"cosine": 0.95}) is None
    )
    assert txc.parse_spec("token_prune:keep=0.5,score=pagerank,fuse=false") == TokenPrune(
        0.5, score="pagerank", fuse=False
    )
    for spec, message in [
        ("token_prune:keep=0", "keep must be"),
        ("token_prune:keep=1.5", "keep must be"),
        ("token_prune:blocks=3-5", "blocks must be"),
        ("token_prune:iters=0", "iters must be"),
        ("token_prune:protected=-1", "protected must be"),
        ("token_prune:score=random", "expected one of cls, pagerank"),
    ]:
        with pytest.raises(txc.SpecError, match=message):
            txc.parse_spec(spec)


def test_declines_with_a_note():
    model = reference.build("gpt")
    record = _record(txc.optimize(model, ["token_prune:blocks=all"], example_inputs=model.example_inputs()))
    assert not record.modified and "causal" in record.notes[0]
    model = reference.build("vit", depth=2)  # the default blocks start at the fourth
    record = _record(txc.optimize(model, ["token_prune"], example_inputs=model.example_inputs()))
    assert not record.modified and "no block" in record.notes[0]
