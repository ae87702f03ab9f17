"""Cost model: symbolic FLOPs/bytes per block, cross-checked against torch's FlopCounterMode on real runs."""

from __future__ import annotations

import pytest
import sympy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import txcompile as txc
from txcompile import cost
from txcompile.cost import B, T
from txcompile.models import minilm as minilm_loader
from txcompile.models import reference


def _measured_per_block(model: torch.nn.Module, prefix: str, depth: int, *args, **kwargs) -> list[int]:
    """FLOPs torch counts inside each block module (matmuls only) for one real forward pass."""
    # The math SDPA backend spells attention as bmm, which FlopCounterMode counts; the fused CPU kernel has no formula.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    return [sum(counts[f"{prefix}.{i}"].values()) for i in range(depth)]


def _close(predicted: int, measured: int, rel: float = 0.02) -> bool:
    return abs(predicted - measured) <= rel * measured


@pytest.fixture(scope="module")
def minilm_graph(minilm):
    model, tokenizer = minilm
    gm = txc.capture(model, minilm_loader.example_inputs(tokenizer))
    return model, gm, txc.anatomy(gm)


@pytest.mark.parametrize(
    "kind, overrides, shapes",
    [
        ("encoder", dict(attention="eager", qkv="fused", norm="post"), [(2, 16), (3, 37)]),
        ("gpt", dict(norm_kind="rmsnorm", activation="swiglu"), [(2, 16), (4, 29)]),
        ("vit", dict(depth=3, activation="silu"), [(2, None), (5, None)]),  # the token count is fixed by the image
    ],
)
def test_matmul_flops_match_flop_counter(kind, overrides, shapes):
    model = reference.build(kind, **overrides)
    gm = txc.capture(model, model.example_inputs())
    anat = txc.anatomy(gm)
    costs = cost.block_costs(gm, anat)
    assert len(costs) == model.config.depth
    _, tokens = cost.example_shape(gm, anat)
    for batch, seq in shapes:
        inputs = model.example_inputs(batch, seq) if seq is not None else model.example_inputs(batch)
        measured = _measured_per_block(model, f"{type(model).__name__}.blocks", len(costs), *inputs)
        for c, m in zip(costs, measured):
            predicted = cost.evaluate(c.matmul_flops, batch, seq if seq is not None else tokens)
            assert _close(predicted, m), (kind, batch, seq, c.index, predicted, m, c.parts)


def test_minilm_matches_flop_counter_at_two_shapes(minilm_graph, minilm):
    model, gm, anat = minilm_graph
    costs = cost.block_costs(gm, anat)
    assert len(costs) == 6
    _, tokenizer = minilm
    for batch, seq in ((8, 128), (2, 40)):
        inputs = tokenizer(
            list(minilm_loader.SENTENCES[:batch]), padding="max_length", max_length=seq, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        measured = _measured_per_block(
            model, "BertModel.encoder.layer", 6, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        for c, m in zip(costs, measured):
            assert _close(cost.evaluate(c.matmul_flops, batch, seq), m), (batch, seq, c.index, m)


def test_minilm_blocks_cost_the_same(minilm_graph):
    _, gm, anat = minilm_graph
    costs = cost.block_costs(gm, anat)
    first = costs[0]
    for c in costs[1:]:
        assert sympy.simplify(c.flops - first.flops) == 0
        assert sympy.simplify(c.bytes - first.bytes) == 0
        assert c.params == first.params == anat.block_params(gm, anat.blocks[0])
    # BERT-base-like shape: 4 d^2 attention + 2 * d * 4d MLP weights (plus biases and two LayerNorms).
    assert first.params == 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384
    agg = cost.total(costs)
    assert agg.index == -1 and agg.params == 6 * first.params
    assert cost.evaluate(agg.flops, 8, 128) == 6 * cost.evaluate(first.flops, 8, 128)


def test_expressions_are_symbolic_in_batch_and_sequence(minilm_graph):
    _, gm, anat = minilm_graph
    c = cost.block_costs(gm, anat)[0]
    assert c.flops.free_symbols == {B, T}
    poly = sympy.Poly(c.flops, B, T)
    assert poly.degree(B) == 1 and poly.degree(T) == 2  # attention's T x T scores
    # Every FLOP scales with the batch: doubling it doubles the cost exactly.
    assert cost.evaluate(c.flops, 16, 77) == 2 * cost.evaluate(c.flops, 8, 77)
    assert all(part.free_symbols <= {B, T} for part in c.parts.values())


def test_bytes_positive_and_growing_with_sequence(minilm_graph):
    _, gm, anat = minilm_graph
    c = cost.block_costs(gm, anat)[0]
    sizes = [cost.evaluate(c.bytes, 8, seq) for seq in (1, 16, 128, 512)]
    assert all(s > 0 for s in sizes)
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # At least the fp32 weights are read, whatever the shape.
    assert cost.evaluate(c.bytes, 1, 1) > 4 * c.params


def test_eager_attention_moves_the_score_matrix_and_sdpa_does_not():
    def bytes_degree(attention: str) -> int:
        model = reference.build("encoder", attention=attention)
        gm = txc.capture(model, model.example_inputs())
        c = cost.block_costs(gm, txc.anatomy(gm))[0]
        return sympy.Poly(c.bytes, B, T).degree(T)

    assert bytes_degree("eager") == 2
    assert bytes_degree("sdpa") == 1


def test_example_shape():
    vit = reference.build("vit")
    gm = txc.capture(vit, vit.example_inputs(3))
    assert cost.example_shape(gm) == (3, 17)  # 16 patches + the CLS token
    enc = reference.build("encoder")
    gm = txc.capture(enc, enc.example_inputs(2, 24))
    assert cost.example_shape(gm) == (2, 24)


def test_evaluate_rejects_foreign_symbols():
    with pytest.raises(ValueError, match="other than B and T"):
        cost.evaluate(B * T * sympy.Symbol("H"), 2, 3)
    assert cost.evaluate(2 * B * T**2, 3, 4) == 96
