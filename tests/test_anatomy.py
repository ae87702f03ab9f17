"""Anatomy: the Transformer structure found by meaning, on reference models, Hugging Face architectures and MiniLM."""

from __future__ import annotations

import pytest

import txcompile as txc
from txcompile.models import hf_zoo, reference

# Blocks where attention and MLP read the same stream and are summed together (GPT-J style).
PARALLEL = {"gptj", "gpt_neox", "phi", "codegen", "falcon"}


def _mlp_family(name: str) -> str:
    """Collapse anatomy's precise activation names onto the zoo's coarse labels."""
    if name.startswith("gated-"):
        return "gated"
    return {"gelu_tanh": "gelu"}.get(name, name)


@pytest.mark.parametrize("name", hf_zoo.names())
def test_hugging_face_architectures(name):
    entry = hf_zoo.ZOO[name]
    model, inputs = hf_zoo.build(name)
    anat = txc.anatomy(txc.capture(model, inputs))
    assert len(anat.blocks) == entry.blocks, anat.notes
    assert anat.attention_kind == entry.attention
    assert anat.norm_position == entry.norm
    for block, row in zip(anat.blocks, anat.summary()):
        assert _mlp_family(row["mlp"]) == entry.mlp, row
        assert row["qkv"] == entry.qkv, row
        assert row["parallel"] == (name in PARALLEL), row
        assert block.mlp is not None and block.mlp.fc2.out_features == block.attention.out.out_features
        assert all(n.kind == entry.norm_kind for n in block.norms)
    assert [b.index for b in anat.blocks] == list(range(entry.blocks))
    # The stream leaving one block is the stream entering the next.
    for prev, nxt in zip(anat.blocks, anat.blocks[1:]):
        order = {n: i for i, n in enumerate(nxt.attention.core.graph.nodes)}
        assert order[prev.stream_out] <= order[nxt.attention.core]
    if entry.norm == "pre":
        assert anat.final_norm is not None


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("encoder", dict(norm="post")),
        ("encoder", dict(norm="pre", attention="eager", qkv="fused")),
        ("gpt", dict(norm_kind="rmsnorm", activation="swiglu")),
        ("gpt", dict(activation="relu", attention="eager")),
        ("vit", dict(depth=3, activation="silu")),
    ],
)
def test_reference_models(kind, overrides):
    model = reference.build(kind, **overrides)
    config = model.config
    anat = txc.anatomy(txc.capture(model, model.example_inputs()))
    assert len(anat.blocks) == config.depth
    assert anat.norm_position == config.norm
    assert anat.attention_kind == config.attention
    for block in anat.blocks:
        assert block.attention.fused_qkv == (config.qkv == "fused")
        assert block.mlp is not None
        assert block.mlp.gated == (config.activation == "swiglu")
        expected = {"swiglu": "silu"}.get(config.activation, config.activation)
        assert block.mlp.activation == expected
        assert block.mlp.fc1.out_features == config.mlp_hidden
        assert all(n.kind == config.norm_kind for n in block.norms)


def test_minilm_structure(minilm):
    model, tokenizer = minilm
    from txcompile.models import minilm as loader

    gm = txc.capture(model, loader.example_inputs(tokenizer))
    anat = txc.anatomy(gm)
    assert len(anat.blocks) == 6 and anat.attention_kind == "sdpa" and anat.norm_position == "post"
    assert anat.embed_norm is not None and anat.final_norm is None
    assert [h.weight for h in anat.head] == ["pooler.dense.weight"]
    block = anat.blocks[0]
    assert (block.attention.q.in_features, block.attention.q.out_features) == (384, 384)
    assert (block.mlp.fc1.out_features, block.mlp.activation) == (1536, "gelu")
    assert anat.block_params(gm, block) == 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384
    assert block.path == "encoder.layer.0.attention"


def test_graph_without_attention_has_no_blocks():
    import torch

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    anat = txc.anatomy(txc.capture(mlp, (torch.randn(2, 4),)))
    assert anat.blocks == () and len(anat.linears) == 2
