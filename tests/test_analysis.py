"""attention_entropy: against plain PyTorch, SDPA against eager, limits (uniform/peaked), live weights, real models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import txcompile as txc
from txcompile.analysis import AttentionStats, _sdpa_scores
from txcompile.models import hf_zoo, reference

STATS = ("entropy", "max_logit", "logit_norm", "weight_norm")


def _assert_same(a: AttentionStats, b: AttentionStats, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.layers == b.layers
    for name in STATS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def encoder_eager():
    model = reference.build("encoder", attention="eager")
    inputs = model.example_inputs()  # sample 1 ends in 4 padded tokens
    return model, inputs, txc.analysis.attention_entropy(txc.capture(model, inputs), inputs)


@pytest.fixture(scope="module")
def encoder_sdpa():
    model = reference.build("encoder")
    inputs = model.example_inputs()
    gm = txc.capture(model, inputs)
    return model, inputs, gm, txc.analysis.attention_entropy(gm, inputs)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def test_eager_matches_plain_pytorch_with_padding(encoder_eager):
    model, (ids, mask), stats = encoder_eager
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((m, *args))) for b in model.blocks]
    with torch.no_grad():
        model(ids, mask)
    for h in hooks:
        h.remove()
    keep = mask.bool()
    heads = model.config.heads
    for layer, (attn, x, additive) in enumerate(seen):
        logits = _heads(attn.q(x), heads) @ _heads(attn.k(x), heads).transpose(-2, -1) / math.sqrt(x.shape[-1] / heads)
        probs = torch.softmax(logits + additive, dim=-1)
        rows = -(probs * probs.clamp_min(1e-38).log()).sum(-1)  # [B, H, T]
        entropy = (rows * keep[:, None]).sum((0, 2)) / keep.sum()  # padded queries do not count
        valid = keep[:, None, :, None] & keep[:, None, None, :]
        max_logit = logits.abs().where(valid, 0.0).amax((0, 2, 3))
        logit_norm = torch.linalg.matrix_norm(logits.where(valid, 0.0), ord=2).mean(0)
        for name, expected in (("entropy", entropy), ("max_logit", max_logit), ("logit_norm", logit_norm)):
            got = getattr(stats, name)[layer].float()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name} layer {layer}")
    assert stats.layers == ("blocks.0.attn", "blocks.1.attn")
    assert stats.entropy.shape == (2, 4) and stats.entropy.dtype == torch.float64
    assert stats.min_entropy == pytest.approx(float(stats.entropy.min()))
    torch.testing.assert_close(stats.mean_entropy, stats.entropy.mean(1))


@pytest.mark.parametrize(
    "case",
    ["float_mask", "bool_mask", "causal", "causal_and_mask", "scale", "gqa"],
)
def test_sdpa_recomputation_reproduces_sdpa_output(case):
    g = torch.Generator().manual_seed(0)
    b, h, t, s, d = 2, 4, 5, 7, 8
    kv = 2 if case == "gqa" else h
    q, k, v = (torch.randn(b, n, length, d, generator=g) for n, length in ((h, t), (kv, s), (kv, s)))
    kwargs: dict = {}
    if case in ("float_mask", "causal_and_mask"):
        kwargs["attn_mask"] = torch.randn(b, 1, t, s, generator=g)
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(b, 1, t, s, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True  # no fully masked row: SDPA's output there is not defined
    if case.startswith("causal"):
        kwargs["is_causal"] = True  # top-left aligned for t != s, as SDPA defines it
    if case == "scale":
        kwargs["scale"] = 0.3
    if case == "gqa":
        kwargs["enable_gqa"] = True
    if case == "causal_and_mask":  # SDPA forbids both; the additive form of the causal mask is what it means
        causal = torch.ones(t, s, dtype=torch.bool).tril()
        additive = kwargs["attn_mask"].masked_fill(~causal, -math.inf)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    else:
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    raw, mask = _sdpa_scores(q, k, **kwargs)
    probs = torch.softmax(raw * kwargs.get("scale", 1 / math.sqrt(d)) + mask, dim=-1)
    torch.testing.assert_close(probs @ v.repeat_interleave(h // kv, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_agrees_with_eager_on_the_same_weights(encoder_eager, encoder_sdpa):
    (_, _, eager), (_, _, _, sdpa) = encoder_eager, encoder_sdpa
    _assert_same(sdpa, eager)
    assert sdpa.weight_norm is not None and bool((sdpa.weight_norm > 0).all())


def test_uniform_and_peaked_attention_and_live_weights():
    model = reference.build("encoder")
    ids, _ = model.example_inputs()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # no padding: every row sees T keys
    gm = txc.capture(model, inputs)
    base = txc.analysis.attention_entropy(gm, inputs)
    qk = [p for n, p in gm.named_parameters() if ".attn.q." in n or ".attn.k." in n]
    saved = [p.detach().clone() for p in qk]
    with torch.no_grad():
        for p in qk:
            p.zero_()
    flat = txc.analysis.attention_entropy(gm, inputs)
    uniform = torch.full((2, 4), math.log(ids.shape[1]), dtype=torch.float64)
    torch.testing.assert_close(flat.entropy, uniform, rtol=1e-6, atol=1e-6)
    for name in ("max_logit", "logit_norm", "weight_norm"):
        assert float(getattr(flat, name).abs().max()) == 0.0, name
    with torch.no_grad():
        for p, s in zip(qk, saved):
            p.copy_(s * 20)  # every logit x400
    peaked = txc.analysis.attention_entropy(gm, inputs)
    assert bool((peaked.entropy < 0.5 * base.entropy).all())
    assert bool((peaked.max_logit > 20 * base.max_logit).all())
    torch.testing.assert_close(peaked.weight_norm, 400 * base.weight_norm, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("qkv", ["separate", "fused"])
def test_weight_norm_by_hand(qkv, encoder_sdpa):
    if qkv == "separate":
        model, _, _, stats = encoder_sdpa
        wq, wk = model.blocks[1].attn.q.weight.detach(), model.blocks[1].attn.k.weight.detach()
    else:
        model = reference.build("encoder", qkv="fused")
        stats = txc.analysis.attention_entropy(model, model.example_inputs())
        wq, wk, _ = model.blocks[1].attn.qkv.weight.detach().chunk(3)
    dh = model.config.head_dim
    for h in range(model.config.heads):
        rows = slice(h * dh, (h + 1) * dh)
        expected = torch.linalg.matrix_norm(wq[rows].T @ wk[rows] / math.sqrt(dh), ord=2)
        assert float(stats.weight_norm[1, h]) == pytest.approx(float(expected), rel=1e-5)


def test_callback_on_an_optimized_program_sees_live_weights():
    model = reference.build("gpt")
    inputs = model.example_inputs()
    opt = txc.optimize(model, [], example_inputs=inputs, verify=False)
    before = txc.analysis.attention_entropy(opt, inputs)
    # Causal SDPA (is_causal=True) against the same weights spelled as eager attention with a triangular mask.
    twin = reference.build("gpt", attention="eager", seed=1)
    twin.load_state_dict(model.state_dict())
    _assert_same(before, txc.analysis.attention_entropy(twin, inputs))
    with torch.no_grad():
        opt.graph_module.get_parameter("blocks.0.attn.q.weight").mul_(10)
    after = txc.analysis.attention_entropy(opt, inputs)
    torch.testing.assert_close(after.weight_norm[0], 10 * before.weight_norm[0], rtol=1e-6, atol=0.0)
    assert not torch.equal(after.entropy[0], before.entropy[0])
    assert bool((after.max_logit[0] > before.max_logit[0]).all())
    torch.testing.assert_close(after.weight_norm[1], before.weight_norm[1])
    assert torch.equal(model.blocks[0].attn.q.weight, reference.build("gpt").blocks[0].attn.q.weight)  # untouched


def test_reparameterized_weights_count_and_training_state_is_left_alone():
    if "sigma_reparam" not in {p.name for p in txc.list_passes()}:
        pytest.skip("the sigma_reparam pass is not registered")
    model = reference.build("gpt")
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=inputs, verify=False)
    gm = opt.graph_module
    before = txc.analysis.attention_entropy(opt, inputs)
    q0 = txc.anatomy(gm).blocks[0].attention.q
    with torch.no_grad():
        gm.get_submodule(str(q0.reparam.target)).gamma.mul_(3)  # the weight q multiplies by is (γ/σ)·W
    opt.train()
    buffers = {n: b.clone() for n, b in gm.named_buffers()}
    after = txc.analysis.attention_entropy(opt, inputs)
    assert gm.training and all(torch.equal(b, buffers[n]) for n, b in gm.named_buffers())  # no power-iteration step
    torch.testing.assert_close(after.weight_norm[0], 3 * before.weight_norm[0], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(after.weight_norm[1], before.weight_norm[1])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hugging_face_causal_models(name):
    """llama: GQA (4 query heads over 2 key heads), RoPE, boolean masks; gpt2: fused Conv1D qkv stored [in, out]."""
    model, inputs = hf_zoo.build(name)
    stats = txc.analysis.attention_entropy(model, inputs)
    heads = model.config.num_attention_heads
    assert stats.entropy.shape == (2, heads) and bool(stats.entropy.isfinite().all())
    # Causal rows see 1..T keys; padded queries of the last sample are left out.
    lengths = inputs["attention_mask"].sum(1).tolist()
    expected_uniform = sum(math.log(i) for n in lengths for i in range(1, n + 1)) / sum(lengths)
    assert bool((stats.entropy <= expected_uniform + 1e-6).all())
    if name == "llama":
        attn = model.layers[0].self_attn
        wq, wk = attn.q_proj.weight.detach(), attn.k_proj.weight.detach()
    else:
        wq, wk, _ = model.h[0].attn.c_attn.weight.detach().T.chunk(3)
    dh = wq.shape[0] // heads
    group = heads // (wk.shape[0] // dh)
    for h in range(heads):
        q_h, k_h = wq[h * dh : (h + 1) * dh], wk[(h // group) * dh : (h // group + 1) * dh]
        expected = torch.linalg.matrix_norm(q_h.T @ k_h / math.sqrt(dh), ord=2)
        assert float(stats.weight_norm[0, h]) == pytest.approx(float(expected), rel=1e-5)


def test_minilm_real_weights(minilm):
    from txcompile.models import minilm as loader

    model, tokenizer = minilm
    inputs = loader.example_inputs(tokenizer)
    stats = txc.analysis.attention_entropy(txc.capture(model, inputs), inputs)
    assert stats.entropy.shape == (6, 12) and len(stats.layers) == 6
    for name in STATS:
        assert bool(getattr(stats, name).isfinite().all()), name
    assert 0 < stats.min_entropy and float(stats.entropy.max()) <= math.log(inputs["input_ids"].shape[1]) + 1e-6
    assert bool((stats.max_logit > 0).all() & (stats.weight_norm > 0).all())
    logged = json.loads(json.dumps(stats.as_dict(), allow_nan=False))
    assert logged["layers"] == list(stats.layers) and len(logged["entropy"][5]) == 12
    assert logged["min_entropy"] == pytest.approx(stats.min_entropy)
    text = str(stats)
    assert "6 layers x 12 heads" in text and stats.layers[5] in text


def test_no_attention_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with pytest.raises(txc.InputError, match=r"no attention in Sequential.*scaled_dot_product_attention"):
        txc.analysis.attention_entropy(mlp, torch.randn(2, 8))
    with pytest.raises(txc.InputError, match="must be a torch.nn.Module"):
        txc.analysis.attention_entropy(lambda x: x, torch.randn(2, 8))
