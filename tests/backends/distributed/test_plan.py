"""The distributed backend's plan: parallel styles, shards, stages, communication volume, errors, big configs."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest

import txcompile as txc
from txcompile.backends.distributed import NETWORKS, make_plan, plan_for_hf_config
from txcompile.backends.distributed.shallow import capture_shallow
from txcompile.backends.distributed.stages import partition as _partition
from txcompile.errors import SpecError
from txcompile.models import hf_zoo, reference


def _ref_gpt(**overrides):
    model = reference.build("gpt", **overrides)
    return txc.capture(model, model.example_inputs())


@pytest.fixture(scope="module")
def graphs():
    out = {"ref_gpt": _ref_gpt()}
    for name in ("gpt2_lm", "llama", "bert", "phi3"):
        model, inputs = hf_zoo.build(name)
        out[name] = txc.capture(model, inputs)
    return out


EXPECTED = {
    "ref_gpt": {"attn.q": "column", "attn.k": "column", "attn.v": "column", "attn.out": "row", "mlp.fc1": "column",
                "mlp.fc2": "row", "head": "vocab"},
    "gpt2_lm": {"attn.qkv": "column", "attn.out": "row", "mlp.fc1": "column", "mlp.fc2": "row", "head": "vocab"},
    "llama": {"attn.q": "column", "attn.k": "column", "attn.v": "column", "attn.out": "row", "mlp.fc1": "column",
              "mlp.up": "column", "mlp.fc2": "row"},
    "bert": {"attn.q": "column", "attn.k": "column", "attn.v": "column", "attn.out": "row", "mlp.fc1": "column",
             "mlp.fc2": "row", "head": "replicated"},  # the pooler is not a vocabulary projection
    "phi3": {"attn.qkv": "column", "attn.out": "row", "mlp.fc1": "column", "mlp.fc2": "row"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_styles_of_every_linear(graphs, name):
    plan = make_plan(graphs[name], tp=2, batch=2, seq=16)
    styles = {}
    for lp in plan.linears:
        assert styles.setdefault(lp.role, lp.style) == lp.style, f"{lp.role} has mixed styles"
    assert styles == EXPECTED[name]
    assert len([x for x in plan.linears if x.block >= 0]) == len(EXPECTED[name]) * 2 - ("head" in EXPECTED[name]) * 2
    # The token embedding is vocab-parallel; norms are replicated.
    assert "vocab" in {s.style for s in plan.shards.values()}
    anat = txc.anatomy(graphs[name])
    for norm in anat.norms:
        assert plan.shards[norm.weight].style == "replicated"


@pytest.mark.parametrize(("name", "tp"), [(n, 2) for n in sorted(EXPECTED)] + [("ref_gpt", 4)])
def test_shards_multiply_back(graphs, name, tp):
    plan = make_plan(graphs[name], tp=tp, batch=2, seq=16)
    for shard in plan.shards.values():
        if shard.dim is None:
            assert shard.local_shape(tp) == shard.shape
            continue
        full = shard.pad_to or shard.shape[shard.dim]
        assert shard.local_shape(tp)[shard.dim] * tp == full, shard
        covered = sorted(r for rank in range(tp) for r in shard.ranges(rank, tp))
        # The ranges of all ranks tile [0, size) exactly, without overlap.
        pos = 0
        for lo, hi in covered:
            assert lo == pos, (shard.param, covered)
            pos = hi
        assert pos == shard.shape[shard.dim]
    # Every rank's parameter bytes add up to the model's (no tied weights across stages at pp=1).
    total = sum(r.param_bytes for r in plan.ranks)
    expected = sum(
        (s.pad_to * math.prod(s.shape) // s.shape[s.dim] if s.pad_to else math.prod(s.shape))
        * (1 if s.dim is not None else tp)
        for s in plan.shards.values()
    )
    assert total == expected * plan.dtype_bytes


def test_fused_qkv_takes_a_slice_of_q_k_and_v(graphs):
    plan = make_plan(graphs["gpt2_lm"], tp=2, batch=2, seq=16)
    c_attn = plan.shards["transformer.h.0.attn.c_attn.weight"]  # Conv1D: [in, 3 * out]
    assert c_attn.dim == 1 and c_attn.parts == (32, 32, 32)
    assert c_attn.ranges(1, 2) == [(16, 32), (48, 64), (80, 96)]
    gate_up = make_plan(graphs["phi3"], tp=2, batch=2, seq=16).shards["layers.0.mlp.gate_up_proj.weight"]
    assert gate_up.ranges(0, 2) == [(0, 32), (64, 96)]


def test_stages_contiguous_and_optimal(graphs):
    gm = graphs["ref_gpt"]
    plan = make_plan(gm, pp=3, microbatches=4, batch=8, seq=16, depth=7, network="cpu-gloo")
    starts = [s.blocks for s in plan.stages]
    assert starts[0][0] == 0 and starts[-1][1] == 7
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(starts, starts[1:]))
    assert plan.stages[0].embeddings and plan.stages[-1].head
    # The dynamic programme against brute force over every contiguous cut.
    costs, first, last = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], 0.5, 2.5
    cuts = _partition(costs, first, last, 3)

    def worst(bounds):
        ranges = list(zip((0, *bounds), (*bounds, len(costs))))
        return max(sum(costs[a:b]) + first * (a == 0) + last * (b == len(costs)) for a, b in ranges)

    best = min(worst(c) for c in itertools.combinations(range(1, len(costs)), 2))
    assert worst([b for _, b in cuts[:-1]]) == pytest.approx(best)
    # Balanced within one block of the ideal split of the plan's own costs.
    comp = [s.compute_s for s in plan.stages]
    one_block = max(comp) / max(s.blocks[1] - s.blocks[0] for s in plan.stages)
    assert max(comp) - sum(comp) / len(comp) <= 2 * one_block


def test_communication_matches_hand_calculation(graphs):
    net = NETWORKS["h100-nvlink"]
    batch, seq, hidden, vocab, tp = 2, 16, 32, 128, 2
    plan = make_plan(graphs["ref_gpt"], tp=tp, batch=batch, seq=seq, dtype_bytes=2)
    act = batch * seq * hidden * 2
    # 2 blocks x 2 all-reduces + 1 for the vocab-parallel embedding; the logits are all-gathered.
    ar, logits = 5, batch * seq * vocab * 2
    sent = ar * 2 * (tp - 1) / tp * act + (tp - 1) / tp * logits
    assert plan.ranks[0].comm_bytes == pytest.approx(sent)
    time_ = ar * (2 * (tp - 1) / tp * act * net.beta + 2 * (tp - 1) * net.alpha) + (
        (tp - 1) / tp * logits * net.beta + (tp - 1) * net.alpha
    )
    assert plan.stages[0].tp_comm_s == pytest.approx(time_)
    # Pipeline: one activation per boundary per microbatch forward, and its gradient back when training.
    p2 = make_plan(graphs["ref_gpt"], pp=2, microbatches=4, batch=8, seq=seq, training=True)
    assert p2.ranks[0].comm_bytes == pytest.approx(
        4 * 2 * seq * hidden * 2 + p2.shards["lm_head.weight"].local_numel(1) * 2
    )
    assert p2.bubble == pytest.approx(1 / 5)
    assert p2.step_s == pytest.approx(5 * max(s.time_per_microbatch for s in p2.stages) + p2.tied_sync_s)
    assert p2.ranks[0].flops == pytest.approx(
        3 * make_plan(graphs["ref_gpt"], pp=2, microbatches=4, batch=8, seq=seq).ranks[0].flops
    )


def test_errors_name_the_numbers(graphs):
    with pytest.raises(
        SpecError, match=r"tp=3 does not divide the 4 attention heads.*Valid tp for this model: 1, 2, 4"
    ):
        make_plan(graphs["ref_gpt"], tp=3, batch=2, seq=16)
    with pytest.raises(SpecError, match=r"tp=4 does not divide the 2 key/value heads"):
        make_plan(graphs["llama"], tp=4, batch=2, seq=16)
    with pytest.raises(SpecError, match=r"tp=4 does not divide the MLP hidden size 98"):
        make_plan(_ref_gpt(mlp_ratio=98 / 32), tp=4, batch=2, seq=16)
    with pytest.raises(SpecError, match=r"pp=3 is larger than the 2 Transformer blocks"):
        make_plan(graphs["ref_gpt"], pp=3, batch=2, seq=16)
    with pytest.raises(SpecError, match=r"microbatches=3 does not divide batch=8"):
        make_plan(graphs["ref_gpt"], pp=2, microbatches=3, batch=8, seq=16)
    odd = _ref_gpt(vocab_size=130)
    with pytest.raises(SpecError, match=r"tp=4 does not divide the vocabulary of 130"):
        make_plan(odd, tp=4, batch=2, seq=16, pad_vocab=False)
    padded = make_plan(odd, tp=4, batch=2, seq=16)
    assert padded.shards["lm_head.weight"].pad_to == 132 and padded.shards["lm_head.weight"].local_shape(4)[0] == 33
    assert make_plan(odd, tp=4, batch=2, seq=16, vocab="replicated").shards["lm_head.weight"].dim is None


def test_json_is_what_an_executor_needs(graphs):
    plan = make_plan(graphs["gpt2_lm"], tp=2, pp=2, microbatches=2, batch=4, seq=16, training=True, name="gpt2")
    data = json.loads(plan.to_json())
    assert data["world_size"] == 4 and len(data["ranks"]) == 4
    r3 = data["ranks"][3]
    assert (r3["tp_rank"], r3["pp_rank"], r3["stage"]) == (1, 1, 1) and r3["blocks"] == [1]
    assert r3["shards"]["transformer.h.1.attn.c_proj.weight"] == {
        "full_shape": [32, 32], "shape": [16, 32], "style": "row", "dim": 0, "ranges": [[16, 32]],
    }  # fmt: skip
    assert "transformer.h.0.attn.c_proj.weight" not in r3["shards"]
    assert "lm_head.weight" in r3["shards"] and "lm_head.weight" in data["ranks"][0]["shards"]  # tied: both ends
    text = plan.report()
    assert "predicted step time" in text and "bubble 33.3%" in text


def test_big_configs_plan_quickly_without_weights():
    transformers = pytest.importorskip("transformers")
    start = time.perf_counter()
    xl = transformers.GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)
    gm, depth = capture_shallow(xl, "GPT2LMHeadModel")
    assert depth == 48 and all(p.is_meta for p in gm.parameters())
    for tp in (8, 4):
        with pytest.raises(SpecError, match=rf"tp={tp} does not divide the 25 attention heads.*1, 5, 25"):
            make_plan(gm, tp=tp, pp=8 // tp, batch=16, seq=1024, depth=depth)
    plan = make_plan(gm, tp=1, pp=8, microbatches=8, batch=16, seq=1024, depth=depth, training=True)
    assert plan.n_blocks == 48 and plan.stages[-1].blocks[1] == 48
    # 1.5576 B parameters; the tied wte/lm_head is held by the first and the last stage.
    wte = 50257 * 1600
    assert sum(r.param_bytes for r in plan.ranks) == (1_557_611_200 + wte) * 2
    assert "transformer.h.47.mlp.c_proj.weight" in plan.rank_shards(7)
    llama = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)  # fmt: skip
    for tp, pp in ((8, 1), (4, 2)):
        p = plan_for_hf_config(llama, "LlamaForCausalLM", tp=tp, pp=pp, microbatches=8, batch=16, seq=4096)
        # 6.738 B parameters (+ the 64-entry RoPE frequency buffer), each once in the shards.
        assert sum(math.prod(s.shape) for s in p.shards.values()) == 6_738_415_616 + 64
        assert p.ranks[0].param_bytes == pytest.approx(6_738_415_616 * 2 / 8, rel=0.01)
        assert "predicted step time" in p.report()
    assert time.perf_counter() - start < 60
