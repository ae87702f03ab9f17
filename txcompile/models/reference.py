"""Small plain-PyTorch reference Transformers used by examples, tests and benchmarks.

Three model families share one set of building blocks:

* :class:`Encoder` -- BERT-style bidirectional text encoder with a padding mask.
* :class:`ViT` -- vision Transformer classifier on patch embeddings plus a CLS token.
* :class:`GPT` -- decoder-only causal language model.

Every architectural choice a compiler might care about (norm placement and kind, activation, SDPA vs. eager
attention, fused vs. separate QKV projections, biases) is a field of :class:`TransformerConfig`, so one model
class covers many graph shapes. Nothing here depends on ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormPlacement = Literal["pre", "post"]
NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "relu", "silu", "swiglu"]
AttentionKind = Literal["sdpa", "eager"]
QKVLayout = Literal["separate", "fused"]
ModelKind = Literal["vit", "encoder", "gpt"]

__all__ = [
    "GPT",
    "MLP",
    "Attention",
    "Block",
    "Encoder",
    "RMSNorm",
    "TransformerConfig",
    "ViT",
    "build",
    "make_norm",
    "padding_to_additive_mask",
]

_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": get_args(NormPlacement),
    "norm_kind": get_args(NormKind),
    "activation": get_args(Activation),
    "attention": get_args(AttentionKind),
    "qkv": get_args(QKVLayout),
}


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the Transformer blocks shared by all reference models.

    ``activation="swiglu"`` is the gated MLP ``down(silu(gate(x)) * up(x))``. ``attention="eager"`` spells out
    ``softmax(q @ k^T * scale + mask) @ v`` instead of calling ``F.scaled_dot_product_attention``.
    """

    dim: int = 64
    heads: int = 4
    depth: int = 2
    mlp_ratio: float = 4.0
    norm: NormPlacement = "pre"
    norm_kind: NormKind = "layernorm"
    activation: Activation = "gelu"
    attention: AttentionKind = "sdpa"
    qkv: QKVLayout = "separate"
    bias: bool = True
    dropout: float = 0.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "depth"):
            value = getattr(self, name)
            # bool is an int subclass; accepting True as a size would hide a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.heads != 0:
            raise ValueError(f"TransformerConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not self.mlp_ratio > 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"TransformerConfig.mlp_ratio must give a hidden size >= 1, got {self.mlp_ratio!r}")
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"TransformerConfig.{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.eps > 0:
            raise ValueError(f"TransformerConfig.eps must be positive, got {self.eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``. Shape-preserving."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # No fp32 upcast (unlike many production RMSNorms): even a no-op .float() is recorded as aten.to by
        # torch.export, and these fp32 references should export to the bare formula.
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: TransformerConfig) -> nn.Module:
    """The normalization layer selected by ``config.norm_kind`` over ``config.dim`` features."""
    if config.norm_kind == "rmsnorm":
        return RMSNorm(config.dim, eps=config.eps)
    return nn.LayerNorm(config.dim, eps=config.eps, bias=config.bias)


def _causal_additive_mask(length: int, like: Tensor) -> Tensor:
    """``[T, T]`` additive mask: 0 where key <= query, a huge negative value above the diagonal."""
    # finfo.min rather than -inf, like padding_to_additive_mask: it vanishes after softmax just the same.
    blocked = torch.full((length, length), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return blocked.triu(1)


def padding_to_additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a ``[B, T]`` 0/1 keep-mask into an additive ``[B, 1, 1, T]`` mask that hides padded keys."""
    # finfo.min rather than -inf: identical after softmax, but a fully padded sample softmaxes to uniform
    # weights instead of NaN (-inf - -inf), so one empty row cannot poison a batch.
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class Attention(nn.Module):
    """Multi-head self-attention: ``[B, T, dim]`` (+ optional additive mask) -> ``[B, T, dim]``.

    ``mask`` is added to the ``[B, heads, T, T]`` attention scores, so it must broadcast to that shape
    (typically ``[B, 1, 1, T]`` for padding). With ``causal=True`` future keys are hidden as well.
    """

    def __init__(self, config: TransformerConfig, *, causal: bool = False) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.causal = causal
        self.kind = config.attention
        self.fused = config.qkv == "fused"
        self.dropout = config.dropout
        if self.fused:
            self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)
        else:
            self.q = nn.Linear(config.dim, config.dim, bias=config.bias)
            self.k = nn.Linear(config.dim, config.dim, bias=config.bias)
            self.v = nn.Linear(config.dim, config.dim, bias=config.bias)
        self.out = nn.Linear(config.dim, config.dim, bias=config.bias)
        self.out_dropout = nn.Dropout(config.dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        # unflatten avoids naming B and T, which keeps both symbolic under torch.export.
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        dropout_p = self.dropout if self.training else 0.0

        if self.kind == "sdpa":
            if self.causal and mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                if self.causal:
                    mask = mask + _causal_additive_mask(x.shape[1], q)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            scores = q @ k.transpose(-2, -1) * self.scale
            if self.causal:
                scores = scores + _causal_additive_mask(x.shape[1], scores)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            weights = F.dropout(weights, p=dropout_p, training=self.training)
            y = weights @ v

        return self.out_dropout(self.out(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    """Position-wise feed-forward: ``[..., dim]`` -> ``[..., dim]`` through ``config.mlp_hidden`` features."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        self.gated = config.activation == "swiglu"
        if self.gated:
            self.gate = nn.Linear(config.dim, hidden, bias=config.bias)
        self.up = nn.Linear(config.dim, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.dim, bias=config.bias)
        activations: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swiglu": nn.SiLU}
        self.act = activations[config.activation]()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    """One Transformer layer, pre- or post-norm per ``config.norm``: ``[B, T, dim]`` -> ``[B, T, dim]``."""

    def __init__(self, config: TransformerConfig, *, causal: bool = False) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norm1 = make_norm(config)
        self.attn = Attention(config, causal=causal)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask)
            x = x + self.mlp(self.norm2(x))
        else:
            x = self.norm1(x + self.attn(x, mask))
            x = self.norm2(x + self.mlp(x))
        return x


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


def _check_length(owner: str, length: int, max_len: int) -> None:
    # Checked eagerly because an out-of-range position index otherwise fails deep inside embedding lookup.
    # Under torch.export this only narrows the symbolic sequence length to [.., max_len].
    if length > max_len:
        raise ValueError(f"{owner}: sequence length {length} exceeds max_len={max_len}")


class Encoder(nn.Module):
    """BERT-style encoder: ``input_ids [B, T]`` (+ ``attention_mask [B, T]`` of 0/1) -> hidden states ``[B, T, dim]``.

    Post-norm configs normalize the embeddings (as BERT does); pre-norm configs normalize after the last block.
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        *,
        vocab_size: int = 100,
        max_len: int = 128,
        type_vocab_size: int = 2,
    ) -> None:
        super().__init__()
        config = config if config is not None else TransformerConfig()
        _check_positive("Encoder", vocab_size=vocab_size, max_len=max_len, type_vocab_size=type_vocab_size)
        self.config = config
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, config.dim)
        self.pos_emb = nn.Embedding(max_len, config.dim)
        self.type_emb = nn.Embedding(type_vocab_size, config.dim)
        self.emb_norm = make_norm(config) if config.norm == "post" else nn.Identity()
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = make_norm(config) if config.norm == "pre" else nn.Identity()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        _check_length("Encoder", input_ids.shape[1], self.max_len)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)
        x = self.emb_dropout(self.emb_norm(x))
        mask = None if attention_mask is None else padding_to_additive_mask(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def example_inputs(self, batch: int = 2, seq: int = 16, *, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Deterministic ``(input_ids [batch, seq], attention_mask [batch, seq])``; sample 1 ends in padding."""
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, self.vocab_size, (batch, seq), generator=generator)
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1 and seq > 1:
            n_pad = max(1, seq // 4)
            attention_mask[1, seq - n_pad :] = 0
            input_ids[1, seq - n_pad :] = 0
        return input_ids, attention_mask

    def dynamic_shapes(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """``torch.export`` dynamic_shapes matching :meth:`example_inputs`: batch and sequence are ``Dim.AUTO``."""
        dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        return dims, dict(dims)


class ViT(nn.Module):
    """Vision Transformer classifier: ``pixel_values [B, C, H, W]`` -> ``logits [B, num_classes]``.

    Images are cut into non-overlapping ``patch_size`` squares by a strided Conv2d; a learned CLS token is
    prepended and the head reads its final state.
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        *,
        image_size: int = 32,
        patch_size: int = 8,
        channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        config = config if config is not None else TransformerConfig()
        _check_positive("ViT", image_size=image_size, patch_size=patch_size, channels=channels, num_classes=num_classes)
        if image_size % patch_size != 0:
            raise ValueError(f"ViT.image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.config = config
        self.image_size = image_size
        self.channels = channels
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, config.dim, kernel_size=patch_size, stride=patch_size)
        # Small init so the learned tokens start as a mild perturbation of the patch embeddings.
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(1, num_patches + 1, config.dim) * 0.02)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = make_norm(config) if config.norm == "pre" else nn.Identity()
        self.head = nn.Linear(config.dim, num_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, num_patches, dim]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = self.emb_dropout(torch.cat([cls, patches], dim=1) + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x[:, 0]))

    def example_inputs(self, batch: int = 2, *, seed: int = 0) -> tuple[Tensor]:
        """Deterministic ``(pixel_values [batch, channels, image_size, image_size],)`` drawn from N(0, 1)."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, self.channels, self.image_size, self.image_size, generator=generator),)

    def dynamic_shapes(self) -> tuple[dict[int, Any]]:
        """``torch.export`` dynamic_shapes matching :meth:`example_inputs`: batch is ``Dim.AUTO``.

        The spatial size stays static because the position embedding has one row per patch.
        """
        return ({0: torch.export.Dim.AUTO},)


class GPT(nn.Module):
    """Decoder-only causal LM: ``input_ids [B, T]`` -> ``logits [B, T, vocab_size]``.

    With ``tie_weights`` the LM head reuses the token embedding matrix (and has no bias).
    """

    def __init__(
        self,
        config: TransformerConfig | None = None,
        *,
        vocab_size: int = 128,
        max_len: int = 128,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        config = config if config is not None else TransformerConfig()
        _check_positive("GPT", vocab_size=vocab_size, max_len=max_len)
        self.config = config
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, config.dim)
        self.pos_emb = nn.Embedding(max_len, config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.depth))
        self.final_norm = make_norm(config) if config.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.dim, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        _check_length("GPT", input_ids.shape[1], self.max_len)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_dropout(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

    def example_inputs(self, batch: int = 2, seq: int = 16, *, seed: int = 0) -> tuple[Tensor]:
        """Deterministic ``(input_ids [batch, seq],)`` uniform over the vocabulary."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.vocab_size, (batch, seq), generator=generator),)

    def dynamic_shapes(self) -> tuple[dict[int, Any]]:
        """``torch.export`` dynamic_shapes matching :meth:`example_inputs`: batch and sequence are ``Dim.AUTO``."""
        return ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)


_MODELS: dict[str, type[nn.Module]] = {"vit": ViT, "encoder": Encoder, "gpt": GPT}
_SMALL_DEFAULTS = TransformerConfig(dim=32, heads=4, depth=2)


@overload
def build(
    kind: Literal["vit"], *, seed: int = ..., config: TransformerConfig | None = ..., **overrides: Any
) -> ViT: ...
@overload
def build(
    kind: Literal["encoder"], *, seed: int = ..., config: TransformerConfig | None = ..., **overrides: Any
) -> Encoder: ...
@overload
def build(
    kind: Literal["gpt"], *, seed: int = ..., config: TransformerConfig | None = ..., **overrides: Any
) -> GPT: ...
def build(kind: ModelKind, *, seed: int = 0, config: TransformerConfig | None = None, **overrides: Any) -> nn.Module:
    """Build a small reference model with deterministic weights.

    ``overrides`` naming a :class:`TransformerConfig` field (``dim``, ``norm``, ``attention``, ...) replace that
    field of ``config`` (default: dim=32, heads=4, depth=2); any other keyword goes to the model constructor
    (``vocab_size``, ``image_size``, ``tie_weights``, ...). The same ``seed`` always yields the same weights and
    the global RNG state is left untouched. The model is returned in eval mode.
    """
    if kind not in _MODELS:
        raise ValueError(f"build: kind must be one of {tuple(_MODELS)}, got {kind!r}")
    config_fields = {f.name for f in fields(TransformerConfig)}
    config_overrides = {k: v for k, v in overrides.items() if k in config_fields}
    model_kwargs = {k: v for k, v in overrides.items() if k not in config_fields}
    config = replace(config if config is not None else _SMALL_DEFAULTS, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # PyTorch's default initializers are kept on purpose: they give O(1) activations, so numerical
        # differences between a compiled and an eager model show up in tests instead of vanishing in tiny logits.
        model = _MODELS[kind](config, **model_kwargs)
    return model.eval()
