"""quantize_attention_probs: SDPA decomposition, eager insertion, accuracy at 8 bits, padding, causality, re-export."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

import txcompile as txc
from txcompile.ir import copy_graph_module
from txcompile.attention_quant import quantize_attention_probs, unsupported_reason
from txcompile.models import hf_zoo, reference
from txcompile.ops.log2_quant import log2_quantize_reference
from txcompile.verify import node_values

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LOG2 = torch.ops.txc.log2_quantize.default


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _id(case):
    source, name, overrides = case
    return "-".join([source, name, *overrides.values()])


@functools.cache
def _captured(source, name, *overrides):
    if source == "hf":
        model, kwargs = hf_zoo.build(name)
        mask = kwargs.get("attention_mask")
        return txc.capture(model, kwargs), ((), kwargs), mask, hf_zoo.dynamic_shapes(kwargs)
    model = reference.build(name, **dict(overrides))
    args = model.example_inputs()
    mask = args[1] if name == "encoder" else None
    return txc.capture(model, args), (args, {}), mask, model.dynamic_shapes()


def _program(case):
    """(captured gm, (args, kwargs), valid-token mask or None, dynamic_shapes) for a zoo or reference model.

    Captured once per module (export dominates the cost); each test rewrites its own copy of the graph."""
    source, name, overrides = case
    gm, *rest = _captured(source, name, *sorted(overrides.items()))
    return (copy_graph_module(gm), *rest)


def _run(gm, inputs):
    with torch.no_grad():
        return _hidden(gm(*inputs[0], **inputs[1]))


def _quantize_all(gm, bits=8):
    return [quantize_attention_probs(gm, block.attention, bits) for block in txc.anatomy(gm).blocks]


# (case, min cosine at 8 bits). More bits only add smaller levels: the grid's step stays a factor sqrt(2), so a model
# whose attention is spread thin (random weights, flat rows) loses more; 0.99 marks those.
CASES = [
    (("hf", "bert", {}), 0.999), (("hf", "bert_eager", {}), 0.999), (("hf", "vit", {}), 0.999),
    (("hf", "vit_eager", {}), 0.999), (("hf", "gpt2", {}), 0.999), (("hf", "llama", {}), 0.99),
    (("ref", "encoder", {}), 0.999), (("ref", "gpt", {}), 0.999),
    (("ref", "gpt", {"attention": "eager"}), 0.999), (("ref", "vit", {}), 0.99),
]  # fmt: skip


# Re-exported (the slow part): bool mask, eager, is_causal (a symbolic-size mask), additive mask.
REEXPORT = {"hf-bert", "hf-bert_eager", "ref-gpt", "ref-encoder"}


@pytest.mark.parametrize(("case", "min_cosine"), [pytest.param(*c, id=_id(c[0])) for c in CASES])
def test_eight_bits_stays_close_lints_and_reexports(case, min_cosine):
    gm, inputs, valid, shapes = _program(case)
    kinds = {block.attention.kind for block in txc.anatomy(gm).blocks}
    before = _run(gm, inputs)
    nodes = _quantize_all(gm)
    assert len(nodes) == 2 and all(n.target is LOG2 and n.args[1] == 8 for n in nodes)
    assert not gm.graph.find_nodes(op="call_function", target=SDPA)
    gm.graph.lint()
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")  # inserted nodes too
    if kinds == {"eager"}:  # eager: the quantizer sits right after the softmax and took over all its users
        assert all(len(n.args[0].users) == 1 for n in nodes)
    after = _run(gm, inputs)
    if valid is not None:
        before, after = before[valid.bool()], after[valid.bool()]
    assert _cosine(before, after) > min_cosine
    if _id(case) not in REEXPORT:
        return
    ep = torch.export.export(gm, *inputs, dynamic_shapes=shapes)
    assert sum(n.target is LOG2 for n in ep.graph.nodes) == 2
    torch.testing.assert_close(_hidden(ep.module()(*inputs[0], **inputs[1])), _run(gm, inputs), rtol=0, atol=0)


SDPA_CASES = [("hf", "bert", {}), ("hf", "vit", {}), ("hf", "gpt2", {}), ("hf", "falcon", {}), ("hf", "llama", {}),
              ("ref", "encoder", {}), ("ref", "gpt", {})]  # fmt: skip


@pytest.mark.parametrize("case", SDPA_CASES, ids=_id)
def test_sdpa_decomposition_is_sdpa_and_quantizes_its_probabilities(case):
    """Bool masks (HF), additive masks (reference encoder), is_causal (reference GPT), one shared key head (Falcon)."""
    gm, inputs, _, _ = _program(case)
    before = _run(gm, inputs)
    cores = gm.graph.find_nodes(op="call_function", target=SDPA)
    operands = [(c.args[0].name, c.args[1].name, c.args[3] if len(c.args) > 3 else None,
                 len(c.args) > 5 and c.args[5], c.kwargs.get("scale")) for c in cores]  # fmt: skip
    nodes = _quantize_all(gm)
    values = node_values(gm, inputs)
    for (q, k, mask, causal, scale), node in zip(operands, nodes):
        q, k = values[q], values[k]
        mask = values[mask.name] if mask is not None else None
        eye = torch.eye(k.shape[2]).expand(*q.shape[:2], k.shape[2], k.shape[2])  # identity values: SDPA's weights
        k = k.expand(-1, q.shape[1], -1, -1)  # Falcon's one key head serves all query heads
        probs = F.scaled_dot_product_attention(q, k, eye, mask, is_causal=causal, scale=scale)
        torch.testing.assert_close(values[node.args[0].name], probs)
        assert torch.equal(values[node.name], log2_quantize_reference(values[node.args[0].name], 8))
    for node in nodes:  # without the quantizer, the written-out attention is SDPA within float32 rounding
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.recompile()
    torch.testing.assert_close(_run(gm, inputs), before, rtol=1e-5, atol=1e-5)


class _GQABlock(torch.nn.Module):
    """One pre-norm block with 4 query heads over 2 key/value heads through SDPA's enable_gqa, and an optional mask."""

    def __init__(self, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm, self.q = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim)
        self.k, self.v = (torch.nn.Linear(dim, kv_heads * self.hd) for _ in range(2))
        self.o, self.fc1, self.fc2 = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 32), torch.nn.Linear(32, dim)

    def forward(self, x, mask=None):
        h = self.norm(x)
        q, k, v = (p(h).unflatten(-1, (-1, self.hd)).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, mask, scale=0.3, enable_gqa=True)
        x = x + self.o(y.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_grouped_query_attention_repeats_key_and_value_heads(mask_kind):
    block = _GQABlock().eval()
    x = torch.randn(2, 7, 16)
    keep = torch.rand(7, 7) > 0.3
    keep.fill_diagonal_(True)
    keep[2] = False  # a query that sees no key: SDPA gives it zero weights
    mask = {None: None, "bool": keep, "additive": torch.randn(2, 1, 7, 7)}[mask_kind]
    inputs = ((x,) if mask is None else (x, mask), {})
    gm = txc.capture(block, inputs[0])
    before = _run(gm, inputs)
    (node,) = _quantize_all(gm)
    assert _cosine(before, _run(gm, inputs)) > 0.99
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    gm.recompile()
    torch.testing.assert_close(_run(gm, inputs), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [("hf", "bert", {}), ("hf", "bert_eager", {}), ("hf", "gpt2", {}),
                                  ("ref", "encoder", {})], ids=_id)  # fmt: skip
def test_padded_row_matches_its_sequence_alone(case):
    gm, inputs, valid, _ = _program(case)
    _quantize_all(gm)
    row = valid.shape[0] - 1
    length = int(valid[row].sum())
    assert length < valid.shape[1]  # the example really pads that row

    def alone(t):
        return t[row : row + 1, :length] if t.dim() == 2 else t

    single = (tuple(alone(a) for a in inputs[0]), {k: alone(v) for k, v in inputs[1].items()})
    torch.testing.assert_close(_run(gm, inputs)[row, :length], _run(gm, single)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_causal_outputs_do_not_see_later_tokens(attention):
    model = reference.build("gpt", attention=attention)
    gm = txc.capture(model, model.example_inputs())
    _quantize_all(gm, bits=4)
    (ids,) = model.example_inputs(batch=2, seq=12, seed=3)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % model.vocab_size
    full, edited, prefix = (_run(gm, ((t,), {})) for t in (ids, changed, ids[:, :7]))
    torch.testing.assert_close(full[:, :7], edited[:, :7], rtol=0, atol=0)
    torch.testing.assert_close(full[:, :7], prefix, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full[:, 7:], edited[:, 7:])


def test_refusals_leave_the_graph_unchanged():
    gm, inputs, _, _ = _program(("hf", "bert", {}))
    attention = txc.anatomy(gm).blocks[0].attention
    code = gm.code
    with pytest.raises(ValueError, match="bits"):
        quantize_attention_probs(gm, attention, 9)
    attention.core.update_kwarg("dropout_p", 0.1)
    assert "dropout" in unsupported_reason(attention)
    with pytest.raises(ValueError, match="dropout"):
        quantize_attention_probs(gm, attention, 4)
    attention.core.kwargs = {k: v for k, v in attention.core.kwargs.items() if k != "dropout_p"}
    gm.recompile()
    assert gm.code == code


def test_eager_attention_is_quantized_once():
    gm, inputs, _, _ = _program(("hf", "bert_eager", {}))
    attention = txc.anatomy(gm).blocks[0].attention
    node = quantize_attention_probs(gm, attention, 3)
    assert node.args == (attention.core, 3) and list(attention.core.users) == [node]
    assert unsupported_reason(attention) == "its probabilities are already log2-quantized"
    with pytest.raises(ValueError, match="already"):
        quantize_attention_probs(gm, attention, 3)
    values = node_values(gm, inputs)
    assert torch.equal(values[node.name], log2_quantize_reference(values[attention.core.name], 3))
