"""exits: the head as its own program, and batch compaction that gives every row what it gets alone at its exit."""

from __future__ import annotations

import math

import pytest
import torch

import txcompile as txc
from txcompile.anatomy import anatomy
from txcompile.exits import Stager, batch_symbols, find_head, output_leaves
from txcompile.models import hf_zoo, reference
from txcompile.tokens import Decline
from txcompile.verify import node_values, run_program

txo = torch.ops.txc


def _vit():
    model = reference.build("vit", depth=4, image_size=16, patch_size=4, num_classes=5)
    return model, (torch.randn(6, 3, 16, 16),)


def _encoder():
    model = reference.build("encoder", depth=3, vocab_size=50)
    ids = torch.randint(1, 50, (5, 9))
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_head_is_everything_after_the_last_block_and_reads_only_cls_in_a_vit():
    model, inputs = _vit()
    gm = txc.capture(model, inputs)
    anat = anatomy(gm)
    head = find_head(gm, anat)
    assert head.leading == 1 and head.leaves == (0,)
    stream = node_values(gm, (inputs, {}), {anat.blocks[-1].stream_out.name})[anat.blocks[-1].stream_out.name]
    torch.testing.assert_close(head.module(stream[:, :1])[0], model(*inputs))
    # The head program's weights are detached: training an adapter through it leaves the model's grads alone.
    assert all(not t.requires_grad for t in head.module.parameters()) or not list(head.module.parameters())


def test_head_of_a_text_encoder_runs_on_every_token_and_reproduces_the_output():
    model, inputs = _encoder()
    gm = txc.capture(model, inputs)
    anat = anatomy(gm)
    head = find_head(gm, anat)
    assert head.leading is None and head.leaves == (0,)
    names = {anat.blocks[-1].stream_out.name} | {e.name for e in head.externals}
    values = node_values(gm, ((), inputs), names)
    outs = head.module(values[anat.blocks[-1].stream_out.name], *[values[e.name] for e in head.externals])
    torch.testing.assert_close(outs[0], model(**inputs))


def test_outputs_reading_intermediate_blocks_decline():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=64, output_hidden_states=True)).eval()  # fmt: skip
    inputs = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    gm = txc.capture(model, inputs)
    with pytest.raises(Decline, match="intermediate block"):
        find_head(gm, anatomy(gm))


def test_static_batch_cannot_be_split():
    model, inputs = _vit()
    gm = txc.capture(model, inputs, dynamic=False)
    with pytest.raises(Decline, match="static"):
        batch_symbols(gm, anatomy(gm))


def _staged(gm, threshold, criterion="confidence"):
    anat = anatomy(gm)
    stager = Stager(gm, anat, find_head(gm, anat), threshold)

    def gate(st, block, stream):
        if criterion == "similarity":
            return st.call(txo.exit_similarity.default, st.current(block.stream_in), stream, None), None
        outs = st.run_head(stream, block.index)
        return st.call(txo.exit_confidence.default, outs[0]), outs

    for block in anat.blocks[:-1]:
        stager.add_exit(block, gate)
    stager.finish()
    gm.recompile()
    return gm


def _alone(gm, head, anat, row_inputs, threshold):
    """The row's output computed alone: the first exit whose confidence reaches the threshold, else the model."""
    names = {b.stream_out.name for b in anat.blocks} | {e.name for e in head.externals}
    values = node_values(gm, row_inputs, names)
    externals = [values[e.name] for e in head.externals]
    for block in anat.blocks[:-1]:
        h = values[block.stream_out.name]
        outs = head.module(h[:, : head.leading] if head.leading else h, *externals)
        if float(txo.exit_confidence(outs[0])[0]) >= threshold:
            return outs[0], block.index
    return run_program(gm, row_inputs), len(anat.blocks) - 1


def test_mixed_exits_give_every_row_its_own_exit_output_in_the_callers_order():
    model, inputs = _vit()
    gm = txc.capture(model, inputs)
    anat, head = anatomy(gm), find_head(gm, anatomy(gm))
    x = torch.randn(9, 3, 16, 16)
    name = anat.blocks[0].stream_out.name
    first = head.module(node_values(gm, ((x,), {}), {name})[name][:, :1])
    threshold = float(txo.exit_confidence(first[0]).median())  # about half the rows leave at the first exit
    expected = [_alone(gm, head, anat, ((x[i : i + 1],), {}), threshold) for i in range(len(x))]
    assert len({layer for _, layer in expected}) >= 2, "the test needs rows leaving at different layers"
    staged = _staged(txc.capture(model, inputs), threshold)
    out = staged(x)
    for i, (want, _) in enumerate(expected):
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-4, atol=1e-5)


def test_threshold_inf_is_exact_and_the_program_exports_with_unbacked_sizes():
    model, inputs = _encoder()
    staged = _staged(txc.capture(model, inputs), math.inf, criterion="similarity")
    assert sum(n.target is txo.exit_partition.default for n in staged.graph.nodes) == 2
    torch.testing.assert_close(staged(**inputs), model(**inputs), rtol=0, atol=0)
    dims = {"input_ids": {0: torch.export.Dim("b", min=2)}, "attention_mask": {0: torch.export.Dim("b", min=2)}}
    ep = torch.export.export(staged, (), inputs, dynamic_shapes=dims, strict=False)
    torch.testing.assert_close(ep.module()(**inputs), model(**inputs))


def test_every_row_leaving_at_the_first_exit_still_runs():
    """Later stages then see zero rows: inferred view sizes (-1) are spelled out so they still run."""
    model, inputs = hf_zoo.build("bert")
    staged = _staged(txc.capture(model, inputs), -math.inf, criterion="similarity")
    out = staged(**inputs)
    assert out.last_hidden_state.shape == model(**inputs).last_hidden_state.shape
    assert len(output_leaves(staged)) == len(output_leaves(txc.capture(model, inputs)))
