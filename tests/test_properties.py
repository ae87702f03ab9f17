"""Properties over random small Transformers: passes are exact, idempotent and keep the graph valid.

Configs vary heads, head size, depth, pre/post-LN, LayerNorm/RMSNorm, activation, eager/SDPA attention and
separate/fused q/k/v; inputs use odd and prime sequence lengths and batch 1..4. Each example captures a model, runs a
pipeline with verification on (an exact pass that changes the function raises), checks the rewritten program at a
second, different shape, then runs the pipeline again and requires that nothing changes.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import txcompile as txc
from txcompile.models import reference
from txcompile.pipeline import PassContext, Pipeline
from txcompile.registry import resolve_passes
from txcompile.testing import assert_equivalent, count_ops

PIPELINES = ["cleanup", "fuse_qkv", "cleanup,fuse_qkv", "fuse_qkv:gated_mlp=true,cleanup"]
ODD_AND_PRIME = [1, 2, 3, 5, 7, 9, 11, 13, 17, 23, 31]


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        dim=heads * draw(st.sampled_from([4, 8])),
        heads=heads,
        depth=draw(st.integers(1, 3)),
        norm=draw(st.sampled_from(["pre", "post"])),
        norm_kind=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        activation=draw(st.sampled_from(["gelu", "relu", "silu", "swiglu"])),
        attention=draw(st.sampled_from(["sdpa", "eager"])),
        qkv=draw(st.sampled_from(["separate", "fused"])),
        bias=draw(st.booleans()),
    )


def _inputs(model, kind, batch, seq):
    return model.example_inputs(batch=batch) if kind == "vit" else model.example_inputs(batch=batch, seq=seq)


@given(
    kind=st.sampled_from(["encoder", "gpt", "vit"]),
    config=configs(),
    pipeline=st.sampled_from(PIPELINES),
    batch=st.integers(1, 4),
    seq=st.sampled_from(ODD_AND_PRIME),
    other=st.tuples(st.integers(1, 4), st.sampled_from(ODD_AND_PRIME)),
)
def test_pipelines_are_exact_idempotent_and_valid(kind, config, pipeline, batch, seq, other):
    torch.manual_seed(0)
    model = reference.build(kind, **config)
    opt = txc.optimize(model, pipeline, example_inputs=_inputs(model, kind, batch, seq))
    assert len(txc.anatomy(opt.graph_module).blocks) == config["depth"]
    assert_equivalent(model, opt, _inputs(model, kind, *other))
    # Idempotence: the same pipeline on its own output reports no change and leaves the ops as they are.
    before = count_ops(opt.graph_module)
    gm, records = Pipeline(resolve_passes(pipeline)).run(opt.graph_module, PassContext())
    assert not any(r.modified for r in records), [(r.spec, r.stats) for r in records if r.modified]
    assert count_ops(gm) == before
    gm.graph.lint()
