"""unpad: exact on the real tokens on MiniLM and every zoo encoder, any padding pattern, declines where it cannot
hold, and the unpadded program saves, loads and runs in a fresh process."""

from __future__ import annotations

import pytest
import torch

import txcompile as txc
from txcompile.models import hf_zoo, reference
from txcompile.models import minilm as minilm_lib
from txcompile.testing import assert_roundtrip, count_ops
from txcompile.verify import valid_tokens_only

# Megatron-BERT and MPNet build their attention bias from more than the padding mask (relative positions): declined.
ENCODERS = ["albert", "bert", "bert_cls", "distilbert", "electra", "roberta", "xlm_roberta"]


def _record(opt):
    return opt.report.records[-1]


@pytest.mark.parametrize("name", hf_zoo.names())
def test_exact_on_real_tokens_for_every_zoo_encoder_and_declines_elsewhere(name):
    model, inputs = hf_zoo.build(name)
    opt = txc.optimize(model, ["unpad"], example_inputs=inputs)
    record = _record(opt)
    if name not in ENCODERS:
        assert not record.modified and record.notes[0].startswith("left padded:"), record.notes
        return
    assert record.modified and record.error["ok"], record.notes
    ops = count_ops(opt.graph_module)
    assert ops["txc.varlen_attention"] >= 1 and ops["aten.scaled_dot_product_attention"] == 0
    other = hf_zoo.make_inputs(name, batch=3, seq=11, seed=5)
    expected = valid_tokens_only(model(**other), opt.graph_module, ((), other))
    actual = valid_tokens_only(opt(**other), opt.graph_module, ((), other))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_minilm_sentence_embeddings_are_unchanged_with_any_padding_pattern(minilm):
    model, tok = minilm
    opt = txc.optimize(model, ["unpad"], example_inputs=minilm_lib.example_inputs(tok))
    held = list(minilm_lib.HELD_OUT_SENTENCES)
    torch.testing.assert_close(minilm_lib.encode(opt, tok, held), minilm_lib.encode(model, tok, held))
    inputs = minilm_lib.example_inputs(tok, held[:5])
    left = {k: v.flip(1) for k, v in inputs.items()}  # padding first, tokens reversed: still one mask per row
    out, ref = opt(**left), model(**left)
    real = left["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], rtol=1e-4, atol=1e-5)
    assert (out.last_hidden_state[~real] == 0).all()  # padded positions are zeros, not the model's leftovers
    no_pad = minilm_lib.example_inputs(tok, [held[0]] * 3)
    torch.testing.assert_close(opt(**no_pad).pooler_output, model(**no_pad).pooler_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_reference_encoder_pre_and_post_ln(norm):
    model = reference.build("encoder", depth=2, norm=norm, vocab_size=60)
    ids = torch.randint(1, 60, (4, 13))
    mask = torch.ones(4, 13, dtype=torch.long)
    mask[0, 5:], mask[2, 1:] = 0, 0
    opt = txc.optimize(model, ["unpad"], example_inputs={"input_ids": ids, "attention_mask": mask})
    assert _record(opt).modified and _record(opt).error["ok"]


@pytest.mark.parametrize(
    "build, inputs, reason",
    [
        (lambda: reference.build("vit", depth=2), lambda: (torch.randn(2, 3, 32, 32),), "not masked by a padding"),
        (lambda: reference.build("gpt", depth=2, vocab_size=50), lambda: (torch.randint(0, 50, (2, 7)),), "padding"),
    ],
)
def test_declines_without_a_padding_mask(build, inputs, reason):
    opt = txc.optimize(build(), ["unpad"], example_inputs=inputs())
    assert not _record(opt).modified and reason in _record(opt).notes[0]


def test_fused_qkv_declines_and_unpad_first_then_fuse_is_the_order(minilm):
    model, tok = minilm
    inputs = minilm_lib.example_inputs(tok)
    late = txc.optimize(model, ["fuse_qkv", "unpad"], example_inputs=inputs)
    assert "fused qkv" in _record(late).notes[0]
    opt = txc.optimize(model, ["unpad", "cleanup"], example_inputs=inputs)
    assert opt.report.records[0].modified
    assert_roundtrip(opt, minilm_lib.example_inputs(tok, list(minilm_lib.HELD_OUT_SENTENCES[:3])))
