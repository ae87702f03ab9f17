"""How to check, in your own pytest suite, what a txcompile pipeline did to your model (shown in the README)."""

import txcompile as txc
from txcompile.models import minilm
from txcompile.testing import assert_equivalent, assert_ops


def test_pipeline_fuses_attention_projections_and_stays_exact():
    model, tokenizer = minilm.load_minilm()
    opt = txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=minilm.example_inputs(tokenizer))

    # 6 blocks: 18 q/k/v linears became 6 fused ones, each followed by one split; eval-mode dropout is gone.
    assert_ops(opt, expect={"aten.split_with_sizes": 6, "aten.linear": 6 * 4 + 1}, forbid=["aten.dropout"])

    # Other sentences, another batch size and length than the example inputs.
    held_out = minilm.example_inputs(tokenizer, minilm.HELD_OUT_SENTENCES[:5], max_length=64)
    assert_equivalent(model, opt, held_out)
