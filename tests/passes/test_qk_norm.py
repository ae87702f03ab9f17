"""qk_norm: matches a hand-written QK-layernorm model; q/k reach the dot product normalized; trainable; declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import txcompile as txc
from txcompile.models import hf_zoo, reference
from txcompile.passes import QKNorm
from txcompile.pipeline import PassContext, Pipeline
from txcompile.testing import assert_roundtrip, count_ops

aten = torch.ops.aten


def _new_parameters(opt) -> dict[str, nn.Parameter]:
    """The parameters qk_norm added, by hint ("block0_q_norm_weight")."""
    return {n.split("_txc_")[1]: p for n, p in opt.named_parameters() if "_txc_" in n and "_norm_" in n}


def _gpt_with_qk_norm(model: reference.GPT, ids: torch.Tensor, eps: float, extra: dict[str, torch.Tensor]):
    """The reference GPT written out by hand, with F.layer_norm on q and k per head before attention."""
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        q, k, v = attn.qkv(h).chunk(3, -1) if attn.fused else (attn.q(h), attn.k(h), attn.v(h))
        q, k, v = (t.unflatten(-1, (attn.heads, attn.head_dim)).transpose(1, 2) for t in (q, k, v))
        q = F.layer_norm(q, (attn.head_dim,), extra[f"block{i}_q_norm_weight"], extra[f"block{i}_q_norm_bias"], eps)
        k = F.layer_norm(k, (attn.head_dim,), extra[f"block{i}_k_norm_weight"], extra[f"block{i}_k_norm_bias"], eps)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.out(y.transpose(1, 2).flatten(2))
        x = x + block.mlp(block.norm2(x))
    return model.lm_head(model.final_norm(x))


@pytest.mark.parametrize(
    "attention,qkv,spec,eps",
    [("sdpa", "separate", "qk_norm", 1e-6), ("eager", "fused", "qk_norm:eps=0.001", 1e-3)],
)
def test_reference_gpt_equals_hand_written_qk_norm(attention, qkv, spec, eps):
    model = reference.build("gpt", attention=attention, qkv=qkv)
    opt = txc.optimize(model, [spec], example_inputs=model.example_inputs())
    record = opt.report.records[-1]
    assert record.modified and record.contract == "retrain"
    assert record.ops_added == {"aten.layer_norm": 4} and not record.ops_removed
    assert record.error is not None and record.error["cosine"] < 0.9999  # the function did change
    ids = model.example_inputs(batch=2, seq=11, seed=1)[0]
    extra = _new_parameters(opt)
    assert len(extra) == 4 * model.config.depth
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), _gpt_with_qk_norm(model, ids, eps, extra))
        # Trained weights and biases must act on q and k respectively, per head-dim channel.
        for p in extra.values():
            p.copy_(torch.randn_like(p))
        torch.testing.assert_close(opt(ids), _gpt_with_qk_norm(model, ids, eps, extra))


def _dot_product_sites(gm) -> list[tuple[str, bool]]:
    """(name of the node computing q·k, whether it reads k^T) per attention, found by anatomy on a raw capture."""
    return [
        (att.core.name, False) if att.kind == "sdpa" else (att.scores.name, True)
        for att in (block.attention for block in txc.anatomy(gm).blocks)
    ]


def _dot_product_inputs(gm, inputs: dict[str, torch.Tensor], sites) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run `gm` and return, per site, the (q, k) its dot product reads (k^T transposed back)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    watch: dict[torch.fx.Node, tuple[int, int, bool]] = {}
    for i, (name, transposed) in enumerate(sites):
        node = by_name[name]
        q, k = node.args[-2:] if transposed else node.args[:2]  # matmul/bmm (q, kT), baddbmm (b, q, kT), sdpa (q, k, v)
        watch[q], watch[k] = (i, 0, False), (i, 1, transposed)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    interp = torch.fx.Interpreter(gm)
    original_run_node = interp.run_node

    def run_node(node):
        out = original_run_node(node)
        if node in watch:
            i, j, transposed = watch[node]
            seen[(i, j)] = out.transpose(-2, -1) if transposed else out
        return out

    interp.run_node = run_node  # type: ignore[method-assign]
    with torch.no_grad():
        interp.run(*[inputs[n.target] for n in gm.graph.nodes if n.op == "placeholder"])
    return [(seen[(i, 0)], seen[(i, 1)]) for i in range(len(sites))]


# bert_eager: eager attention, post-LN; gpt2: fused Conv1D qkv; llama: RoPE + grouped-query attention; vit: vision.
@pytest.mark.parametrize("name", ["bert_eager", "gpt2", "llama", "vit"])
def test_hugging_face_dot_product_reads_normalized_q_and_k(name):
    model, inputs = hf_zoo.build(name)
    blocks = hf_zoo.ZOO[name].blocks
    raw = txc.capture(model, inputs)
    gm, records = Pipeline((QKNorm(),)).run(raw, PassContext())  # rewrites a copy: `raw` stays the original
    assert records[0].modified and records[0].stats["attentions"] == blocks, records[0].notes
    assert records[0].ops_added == {"aten.layer_norm": 2 * blocks} and not records[0].ops_removed
    # Node names survive the pass, so the raw capture's anatomy names the same dot products in the rewritten graph.
    sites = _dot_product_sites(raw)
    pairs = _dot_product_inputs(gm, inputs, sites)
    assert len(pairs) == blocks
    for q, k in pairs:
        for t in (q, k):
            var = t.var(-1, unbiased=False)
            zero = t.abs().amax(-1) == 0  # padding tokens with a zero embedding: LayerNorm(0) = bias = 0
            assert t.mean(-1).abs().max() < 1e-5 and ((var - 1).abs() < 1e-3)[~zero].all(), var
    if name == "llama":  # grouped-query attention: 4 query heads read 2 key heads, repeated after the norm
        assert pairs[0][0].shape[1] == pairs[0][1].shape[1] == 4
    # Before the pass the same dot products saw raw projections, far from unit variance.
    before = _dot_product_inputs(raw, inputs, sites)
    assert any((q.var(-1, unbiased=False) - 1).abs().max() > 0.1 for q, _ in before)


def test_new_parameters_train():
    model = reference.build("gpt")
    opt = txc.optimize(model, ["qk_norm"], example_inputs=model.example_inputs())
    extra = _new_parameters(opt)
    assert len(extra) == 8 and all(p.requires_grad for p in extra.values())
    assert {id(p) for p in extra.values()} <= {id(p) for p in opt.parameters()}
    before = {n: p.detach().clone() for n, p in extra.items()}
    user_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.train()
    optimizer = torch.optim.AdamW(opt.parameters(), lr=1e-2)
    ids = model.example_inputs(batch=2, seq=12, seed=2)[0]
    logits = opt(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra.values())
    optimizer.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in extra.items())
    # Training the program (all of its parameters) never writes into the user's model.
    assert all(torch.equal(user_weights[n], p) for n, p in model.named_parameters())


def test_without_affine_adds_no_parameters_and_second_run_declines():
    model = reference.build("encoder", attention="eager")
    opt = txc.optimize(model, ["qk_norm:affine=false"], example_inputs=model.example_inputs())
    record = opt.report.records[-1]
    assert record.modified and record.stats["parameters_added"] == 0 and not _new_parameters(opt)
    norms = [n for n in opt.graph_module.graph.nodes if n.op == "call_function" and n.target == aten.layer_norm.default]
    assert sum(n.args[2] is None for n in norms) == 2 * model.config.depth
    before = count_ops(opt.graph_module)
    gm, records = Pipeline((QKNorm(),)).run(opt.graph_module, PassContext())
    assert not records[0].modified and records[0].notes and count_ops(gm) == before


def test_declines_where_q_and_k_are_already_normalized():
    model, inputs = hf_zoo.build("qwen3")  # Qwen3 applies its own RMSNorm to q and k per head, before RoPE
    gm = txc.capture(model, inputs)
    before = count_ops(gm)
    result = QKNorm()(gm, PassContext())
    assert not result.modified and count_ops(result.gm) == before
    assert any("q and k already normalized per head" in note for note in result.notes), result.notes


def test_declines_without_attention():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    opt = txc.optimize(mlp, ["qk_norm"], example_inputs=(torch.randn(2, 8),))
    record = opt.report.records[-1]
    assert not record.modified and any("no attention blocks found" in n for n in record.notes), record.notes
    assert count_ops(opt.graph_module).get("aten.layer_norm", 0) == 0


def test_roundtrip(tmp_path):
    model = reference.build("gpt", attention="eager")
    opt = txc.optimize(model, ["qk_norm"], example_inputs=model.example_inputs())
    assert_roundtrip(opt, model.example_inputs(batch=3, seq=7, seed=3), tmp_dir=tmp_path)
