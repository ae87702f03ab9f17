"""Tests for the plain-PyTorch reference Transformers in ``txcompile.models.reference``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from txcompile.models.reference import GPT, Attention, Encoder, TransformerConfig, ViT, build

KINDS = ("vit", "encoder", "gpt")

# One entry per architectural switch plus a combination, so every branch of the blocks is traced at least once.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "post-norm": {"norm": "post"},
    "eager": {"attention": "eager"},
    "fused-qkv": {"qkv": "fused"},
    "relu": {"activation": "relu"},
    "silu": {"activation": "silu"},
    "swiglu": {"activation": "swiglu"},
    "rmsnorm": {"norm_kind": "rmsnorm"},
    "no-bias": {"bias": False},
    "mixed": {
        "norm": "post",
        "norm_kind": "rmsnorm",
        "activation": "swiglu",
        "attention": "eager",
        "qkv": "fused",
        "bias": False,
        "mlp_ratio": 2.0,
        "depth": 3,
    },
}


def make_inputs(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[Tensor, ...]:
    if isinstance(model, ViT):
        return model.example_inputs(batch, seed=seed)
    return model.example_inputs(batch, seq, seed=seed)


def expected_shape(model: nn.Module, batch: int, seq: int) -> tuple[int, ...]:
    if isinstance(model, ViT):
        return (batch, model.head.out_features)
    if isinstance(model, GPT):
        return (batch, seq, model.vocab_size)
    return (batch, seq, model.config.dim)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_forward_shape_and_finite(kind: str, overrides: dict[str, Any]) -> None:
    model = build(kind, **overrides)
    with torch.no_grad():
        out = model(*make_inputs(model, batch=2, seq=10))
    assert out.shape == expected_shape(model, batch=2, seq=10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_vit_digits_geometry() -> None:
    # scikit-learn digits: 8x8 grayscale images, 10 classes.
    model = build("vit", channels=1, image_size=8, patch_size=2)
    (pixels,) = model.example_inputs(batch=4)
    assert pixels.shape == (4, 1, 8, 8)
    with torch.no_grad():
        logits = model(pixels)
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm": "post", "qkv": "fused"}, {"activation": "swiglu", "norm_kind": "rmsnorm", "bias": False}],
    ids=["pre", "post-fused", "swiglu-rmsnorm"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_matches_eager(kind: str, overrides: dict[str, Any]) -> None:
    sdpa = build(kind, attention="sdpa", **overrides)
    eager = build(kind, attention="eager", **overrides)
    # The attention kind adds no parameters, but copying makes "same weights" explicit rather than seed-dependent.
    eager.load_state_dict(sdpa.state_dict())
    inputs = make_inputs(sdpa)
    with torch.no_grad():
        assert_close(eager(*inputs), sdpa(*inputs))


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_causal_attention_with_extra_mask(kind: str) -> None:
    # Models never combine a causal flag with an explicit mask, so check that path of Attention directly:
    # an all-zero additive mask must not change the causal result.
    torch.manual_seed(0)
    attn = Attention(TransformerConfig(dim=16, heads=2, attention=kind), causal=True).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert_close(attn(x, torch.zeros(2, 1, 1, 7)), attn(x))


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_encoder_ignores_padded_tokens(attention: str, norm: str) -> None:
    model = build("encoder", attention=attention, norm=norm)
    input_ids, attention_mask = model.example_inputs(batch=2, seq=12)
    valid = int(attention_mask[1].sum())
    assert 0 < valid < 12, "example_inputs should pad the second sample"

    with torch.no_grad():
        padded = model(input_ids, attention_mask)
        alone = model(input_ids[1:, :valid])
        assert_close(padded[1, :valid], alone[0])

        scrambled = input_ids.clone()
        scrambled[1, valid:] = torch.arange(12 - valid) + 7
        assert_close(model(scrambled, attention_mask)[1, :valid], padded[1, :valid])

        # An all-ones mask must be equivalent to passing no mask.
        assert_close(padded[0], model(input_ids[:1])[0])

        # A sample that is padding only is meaningless but must not poison the batch with NaN.
        assert torch.isfinite(model(input_ids, torch.zeros_like(attention_mask))).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt_is_causal(attention: str) -> None:
    model = build("gpt", attention=attention)
    (input_ids,) = model.example_inputs(batch=2, seq=12)
    t = 5
    changed = input_ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % model.vocab_size
    with torch.no_grad():
        before, after = model(input_ids), model(changed)
    assert_close(after[:, : t + 1], before[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


EXPORT_CASES = [
    ("vit", {}),
    ("vit", {"attention": "eager", "channels": 1, "image_size": 8, "patch_size": 2}),
    ("encoder", {}),
    ("encoder", {"attention": "eager", "norm": "post", "qkv": "fused"}),
    ("gpt", {}),
    ("gpt", {"attention": "eager", "norm_kind": "rmsnorm", "activation": "swiglu"}),
]


@pytest.mark.parametrize(("kind", "overrides"), EXPORT_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(EXPORT_CASES)])
def test_export_with_dynamic_shapes(kind: str, overrides: dict[str, Any]) -> None:
    model = build(kind, **overrides)
    dynamic_shapes = model.dynamic_shapes()
    text = not isinstance(model, ViT)
    expected_dims = {0, 1} if text else {0}
    assert all(set(spec) == expected_dims for spec in dynamic_shapes)
    assert all(d is torch.export.Dim.AUTO for spec in dynamic_shapes for d in spec.values())

    # Batch 2 / seq 16 rather than 1: Dim.AUTO silently specializes dimensions whose example size is 0 or 1.
    program = torch.export.export(model, make_inputs(model), dynamic_shapes=dynamic_shapes, strict=False)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in ("input_ids", "pixel_values")]
    (user_input,) = placeholders
    shape = user_input.meta["val"].shape
    assert isinstance(shape[0], torch.SymInt)
    if text:
        assert isinstance(shape[1], torch.SymInt)

    exported = program.module()
    for batch, seq in [(3, 9), (5, 24)]:
        inputs = make_inputs(model, batch=batch, seq=seq, seed=1)
        with torch.no_grad():
            assert_close(exported(*inputs), model(*inputs))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 30, "heads": 4}, "dim"),
        ({"dim": 0}, "dim"),
        ({"heads": 0}, "heads"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"norm": "sandwich"}, "norm"),
        ({"norm_kind": "batchnorm"}, "norm_kind"),
        ({"activation": "tanh"}, "activation"),
        ({"attention": "flash"}, "attention"),
        ({"qkv": "packed"}, "qkv"),
        ({"dropout": 1.0}, "dropout"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_config_rejects_invalid_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}\b"):
        TransformerConfig(**kwargs)


def test_model_argument_validation() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        ViT(TransformerConfig(dim=16, heads=2), image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="max_len"):
        GPT(TransformerConfig(dim=16, heads=2), max_len=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        build("resnet")  # type: ignore[call-overload]


def test_build_is_deterministic_and_keeps_global_rng() -> None:
    rng_state = torch.random.get_rng_state()
    first, second, other = build("encoder"), build("encoder"), build("encoder", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not first.training

    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, value in first_state.items():
        assert torch.equal(value, second_state[name]), name
    assert not torch.equal(first.tok_emb.weight, other.tok_emb.weight)

    a, b = first.example_inputs(), second.example_inputs()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_build_routes_overrides() -> None:
    model = build("gpt", dim=48, heads=6, depth=1, vocab_size=50, tie_weights=False)
    assert isinstance(model, GPT)
    assert (model.config.dim, model.config.heads, model.config.depth) == (48, 6, 1)
    assert model.vocab_size == 50
    assert model.lm_head.weight is not model.tok_emb.weight

    tied = build("gpt")
    assert tied.lm_head.weight is tied.tok_emb.weight

    base = TransformerConfig(dim=24, heads=3, norm="post")
    encoder = build("encoder", config=base, depth=1)
    assert isinstance(encoder, Encoder)
    assert encoder.config == TransformerConfig(dim=24, heads=3, norm="post", depth=1)


def test_dropout_is_inactive_in_eval_and_active_in_train() -> None:
    plain = build("gpt")
    noisy = build("gpt", dropout=0.5)
    inputs = make_inputs(plain)
    with torch.no_grad():
        assert_close(noisy(*inputs), plain(*inputs))
        noisy.train()
        assert not torch.allclose(noisy(*inputs), plain(*inputs))
