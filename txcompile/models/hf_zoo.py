"""Tiny, randomly initialised Hugging Face ``transformers`` models for compiler tests and examples.

Every entry is built from a deliberately small config (hidden 32-64, 2-3 blocks) so that exporting and
running the whole zoo stays cheap on a laptop CPU. The structural facts recorded on each :class:`ZooEntry`
describe the *exported ATen graph* (``torch.export`` with ``strict=False``), not the Python source: e.g.
``attention="sdpa"`` means ``aten.scaled_dot_product_attention`` survives export, ``"eager"`` means attention
is spelled as matmul + softmax. ``tests/models/test_hf_zoo.py`` checks each fact against a real export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

__all__ = ["ZooEntry", "ZOO", "build", "names", "make_inputs", "dynamic_shapes"]

# Example shapes are chosen so neither dimension is 0 or 1: export would otherwise specialise that dim.
BATCH = 2
SEQ = 8
PAD = 3  # trailing padded positions in the last sample
IMAGE = 32  # 32x32 images with 8x8 patches -> 16 patches (+ cls / distillation tokens)
VOCAB = 128
MAX_POS = 64

Builder = Callable[[int], "tuple[nn.Module, dict[str, Tensor]]"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Builder
    blocks: int
    attention: Literal["sdpa", "eager"]
    norm: Literal["pre", "post"]
    norm_kind: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu", "relu", "silu", "gated"]
    qkv: Literal["separate", "fused"]
    causal: bool
    modality: Literal["text", "vision"]


def _text_inputs(
    seed: int,
    *,
    pad_id: int = 0,
    mask: bool = True,
    token_types: bool = False,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict[str, Tensor]:
    # A private generator keeps the inputs independent of how many parameters the model drew from the global RNG.
    gen = torch.Generator().manual_seed(seed + 1)
    # Ids >= 4 avoid every special/pad id used below, so the only pad tokens are the ones placed on purpose.
    ids = torch.randint(4, VOCAB, (batch, seq), generator=gen)
    out: dict[str, Tensor] = {"input_ids": ids}
    if mask:
        attn = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1 and seq > PAD:
            attn[-1, seq - PAD :] = 0
            ids[-1, seq - PAD :] = pad_id
        out["attention_mask"] = attn
    if token_types:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def _vision_inputs(seed: int, batch: int = BATCH) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}


def dynamic_shapes(inputs: dict[str, Tensor]) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export``: batch+sequence for token tensors, batch only for images."""
    from torch.export import Dim

    shapes: dict[str, dict[int, Any]] = {}
    for key, value in inputs.items():
        # Image height/width are tied to the position-embedding table, so only the batch is free.
        shapes[key] = {0: Dim.AUTO} if key == "pixel_values" else {i: Dim.AUTO for i in range(min(value.dim(), 2))}
    return shapes


InputFactory = Callable[[int, int, int], "dict[str, Tensor]"]  # (seed, batch, seq) -> kwargs


def _make(model_cls: str, config_cls: str, inputs: InputFactory, **config: Any) -> Builder:
    """Builder that instantiates ``transformers.<model_cls>`` from ``transformers.<config_cls>(**config)``."""

    def _build(seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
        import transformers

        torch.manual_seed(seed)
        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        return model.eval(), inputs(seed, BATCH, SEQ)

    # Kept on the function so ``make_inputs`` can produce other shapes for the same entry.
    _build.make_inputs = inputs  # type: ignore[attr-defined]
    return _build


def _text(**kw: Any) -> InputFactory:
    return lambda seed, batch, seq: _text_inputs(seed, batch=batch, seq=seq, **kw)


def _vision(seed: int, batch: int, seq: int) -> dict[str, Tensor]:
    del seq  # the token count of a ViT is fixed by the image size
    return _vision_inputs(seed, batch)


# Shared knobs; each family spells them differently, so they are spread into the per-family dicts below.
_H, _L, _NH, _FF = 32, 2, 2, 64
# Several configs default to GPT-2's 50256 for bos/eos, which transformers flags as outside our tiny vocab.
_SPECIAL = dict(bos_token_id=1, eos_token_id=2)
_BERTLIKE = dict(
    vocab_size=VOCAB, hidden_size=_H, num_hidden_layers=_L, num_attention_heads=_NH, intermediate_size=_FF,
    max_position_embeddings=MAX_POS, type_vocab_size=2,
)
# RoBERTa-style models derive position ids from ``input_ids != pad_token_id`` and offset them by pad+1.
_ROBERTALIKE = dict(_BERTLIKE, pad_token_id=1, max_position_embeddings=MAX_POS + 2)
_LLAMALIKE = dict(
    vocab_size=VOCAB, hidden_size=_H, intermediate_size=_FF, num_hidden_layers=_L, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=MAX_POS, use_cache=False, pad_token_id=0,
    attn_implementation="sdpa", **_SPECIAL,
)
_VIT = dict(
    image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=_H, num_hidden_layers=_L,
    num_attention_heads=_NH, intermediate_size=_FF,
)

ZOO: dict[str, ZooEntry] = {}


def _register(name: str, builder: Builder, **facts: Any) -> None:
    ZOO[name] = ZooEntry(name=name, build=builder, **facts)


_ENC = dict(norm="post", norm_kind="layernorm", qkv="separate", causal=False, modality="text")
_DEC = dict(norm="pre", causal=True, modality="text")

# --- encoders (post-LN unless noted) -------------------------------------------------------------------------
_register("bert", _make("BertModel", "BertConfig", _text(token_types=True), **_BERTLIKE,
                        attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
_register("bert_eager", _make("BertModel", "BertConfig", _text(token_types=True), **_BERTLIKE,
                              attn_implementation="eager"), blocks=_L, attention="eager", mlp="gelu", **_ENC)
_register("bert_cls", _make("BertForSequenceClassification", "BertConfig", _text(), **_BERTLIKE, num_labels=3,
                            attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
_register("roberta", _make("RobertaModel", "RobertaConfig", _text(pad_id=1), **_ROBERTALIKE,
                           attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
_register("xlm_roberta", _make("XLMRobertaModel", "XLMRobertaConfig", _text(pad_id=1), **_ROBERTALIKE,
                               attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
# ELECTRA projects a narrower embedding (16) up to the hidden size before the first block.
_register("electra", _make("ElectraModel", "ElectraConfig", _text(), **_BERTLIKE, embedding_size=16,
                           attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
# ALBERT shares one block's weights across all layers; ``blocks`` counts applications, not parameter sets.
# Its default activation is gelu_new, which export writes out as the tanh formula (pow/tanh/mul/add).
_register("albert", _make("AlbertModel", "AlbertConfig", _text(), **_BERTLIKE, embedding_size=16,
                          num_hidden_groups=1, attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
_register("distilbert", _make("DistilBertModel", "DistilBertConfig", _text(), vocab_size=VOCAB, dim=_H,
                              n_layers=_L, n_heads=_NH, hidden_dim=_FF, max_position_embeddings=MAX_POS,
                              attn_implementation="sdpa"), blocks=_L, attention="sdpa", mlp="gelu", **_ENC)
# Megatron-BERT is the pre-LN BERT variant (LN before attention/MLP, one final LN after the stack).
_register("megatron_bert", _make("MegatronBertModel", "MegatronBertConfig", _text(), **_BERTLIKE,
                                 attn_implementation="eager"),
          blocks=_L, attention="eager", mlp="gelu", **dict(_ENC, norm="pre"))
# MPNet adds a relative-position bias to the scores, so it only has an eager (matmul+softmax) path.
_register("mpnet", _make("MPNetModel", "MPNetConfig", _text(pad_id=1), **_ROBERTALIKE),
          blocks=_L, attention="eager", mlp="gelu", **_ENC)

# --- vision (pre-LN ViT family) -------------------------------------------------------------------------------
_VIS = dict(norm="pre", norm_kind="layernorm", qkv="separate", causal=False, modality="vision", mlp="gelu")
_register("vit", _make("ViTModel", "ViTConfig", _vision, **_VIT, attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", **_VIS)
_register("vit_eager", _make("ViTModel", "ViTConfig", _vision, **_VIT, attn_implementation="eager"),
          blocks=_L, attention="eager", **_VIS)
_register("deit", _make("DeiTModel", "DeiTConfig", _vision, **_VIT, attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", **_VIS)

# --- decoders (pre-LN) -----------------------------------------------------------------------------------------
_GPT2 = dict(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=_H, n_layer=_L, n_head=_NH, n_inner=_FF,
             use_cache=False, attn_implementation="sdpa", **_SPECIAL)
# GPT-2 uses Conv1D (weight stored [in, out]) with fused c_attn, and gelu_new.
_register("gpt2", _make("GPT2Model", "GPT2Config", _text(), **_GPT2),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
_register("gpt2_lm", _make("GPT2LMHeadModel", "GPT2Config", _text(), **_GPT2),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
# GPT-Neo alternates global and local (windowed) attention and never scales scores by 1/sqrt(d).
_register("gpt_neo", _make("GPTNeoModel", "GPTNeoConfig", _text(), vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                           hidden_size=_H, num_layers=_L, attention_types=[[["global", "local"], 1]], num_heads=_NH,
                           intermediate_size=_FF, window_size=4, use_cache=False, **_SPECIAL),
          blocks=_L, attention="eager", norm_kind="layernorm", mlp="gelu", qkv="separate", **_DEC)
_register("opt", _make("OPTModel", "OPTConfig", _text(pad_id=1), vocab_size=VOCAB, hidden_size=_H,
                       num_hidden_layers=_L, ffn_dim=_FF, num_attention_heads=_NH, max_position_embeddings=MAX_POS,
                       word_embed_proj_dim=_H, do_layer_norm_before=True, use_cache=False, pad_token_id=1,
                       attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="relu", qkv="separate", **_DEC)
# GPT-J: one LN feeding attention and MLP in parallel, partial rotary, gelu_new; only an eager path.
_register("gptj", _make("GPTJModel", "GPTJConfig", _text(), vocab_size=VOCAB, n_positions=MAX_POS, n_embd=_H,
                        n_layer=_L, n_head=_NH, n_inner=_FF, rotary_dim=8, use_cache=False, **_SPECIAL),
          blocks=_L, attention="eager", norm_kind="layernorm", mlp="gelu", qkv="separate", **_DEC)
# CodeGen splits its fused qkv into 4 hard-coded "model parallel" groups, so it needs a multiple of 4 heads.
_register("codegen", _make("CodeGenModel", "CodeGenConfig", _text(), vocab_size=VOCAB, n_positions=MAX_POS,
                           n_ctx=MAX_POS, n_embd=_H, n_layer=_L, n_head=4, n_inner=_FF, rotary_dim=4, use_cache=False, **_SPECIAL),
          blocks=_L, attention="eager", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
# BLOOM: ALiBi bias instead of positions, fused query_key_value, tanh-formula GELU, baddbmm scores.
_register("bloom", _make("BloomModel", "BloomConfig", _text(), vocab_size=VOCAB, hidden_size=_H, n_layer=_L,
                         n_head=_NH, use_cache=False),
          blocks=_L, attention="eager", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
_register("falcon", _make("FalconModel", "FalconConfig", _text(), vocab_size=VOCAB, hidden_size=_H,
                          num_hidden_layers=_L, num_attention_heads=_NH, ffn_hidden_size=_FF, alibi=False,
                          multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
                          max_position_embeddings=MAX_POS, use_cache=False, attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
_register("gpt_neox", _make("GPTNeoXModel", "GPTNeoXConfig", _text(), vocab_size=VOCAB, hidden_size=_H,
                            num_hidden_layers=_L, num_attention_heads=_NH, intermediate_size=_FF, rotary_pct=0.5,
                            max_position_embeddings=MAX_POS, use_parallel_residual=True, use_cache=False,
                            attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="gelu", qkv="fused", **_DEC)
_register("phi", _make("PhiModel", "PhiConfig", _text(), vocab_size=VOCAB, hidden_size=_H, intermediate_size=_FF,
                       num_hidden_layers=_L, num_attention_heads=_NH, partial_rotary_factor=0.5,
                       max_position_embeddings=MAX_POS, use_cache=False, attn_implementation="sdpa"),
          blocks=_L, attention="sdpa", norm_kind="layernorm", mlp="gelu", qkv="separate", **_DEC)

# --- Llama family: RMSNorm, gated SiLU MLP, RoPE, grouped-query attention ------------------------------------
_RMS = dict(norm_kind="rmsnorm", mlp="gated", **_DEC)
_register("llama", _make("LlamaModel", "LlamaConfig", _text(), **_LLAMALIKE),
          blocks=_L, attention="sdpa", qkv="separate", **_RMS)
_register("llama_eager", _make("LlamaModel", "LlamaConfig", _text(), **dict(_LLAMALIKE, attn_implementation="eager")),
          blocks=_L, attention="eager", qkv="separate", **_RMS)
# A window shorter than the test sequences, so the sliding-window mask is really part of the graph.
_register("mistral", _make("MistralModel", "MistralConfig", _text(), **_LLAMALIKE, sliding_window=4),
          blocks=_L, attention="sdpa", qkv="separate", **_RMS)
_register("qwen2", _make("Qwen2Model", "Qwen2Config", _text(), **_LLAMALIKE),
          blocks=_L, attention="sdpa", qkv="separate", **_RMS)
_register("qwen3", _make("Qwen3Model", "Qwen3Config", _text(), **_LLAMALIKE, head_dim=8),
          blocks=_L, attention="sdpa", qkv="separate", **_RMS)
_register("phi3", _make("Phi3Model", "Phi3Config", _text(), **_LLAMALIKE),
          blocks=_L, attention="sdpa", qkv="fused", **_RMS)
# Gemma scales embeddings by sqrt(hidden), uses (1 + weight) RMSNorm and a tanh-GELU gate.
_register("gemma", _make("GemmaModel", "GemmaConfig", _text(), **_LLAMALIKE, head_dim=8),
          blocks=_L, attention="sdpa", qkv="separate", **_RMS)


def names() -> list[str]:
    return sorted(ZOO)


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """Build zoo entry ``name`` with parameters drawn from ``torch.manual_seed(seed)``; returns (eval model, kwargs)."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(names())}") from None
    return entry.build(seed)


def make_inputs(name: str, *, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> dict[str, Tensor]:
    """Example kwargs for ``name`` at another shape (``seq`` is ignored for vision entries)."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(names())}")
    return ZOO[name].build.make_inputs(seed, batch, seq)  # type: ignore[attr-defined]
