"""Tiny, randomly initialised Hugging Face ``transformers`` models for compiler tests and examples.

Every entry is built from a deliberately small config (hidden 32, 2 blocks, 2-4 heads, vocab 128, MLP 64) so that
exporting and running the whole zoo stays cheap on a laptop CPU. The structural facts recorded on each :class:`ZooEntry`
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
    token_types: bool = False,
    batch: int = BATCH,
    seq: int = SEQ,
) -> dict[str, Tensor]:
    # A private generator keeps the inputs independent of how many parameters the model drew from the global RNG.
    gen = torch.Generator().manual_seed(seed + 1)
    # Ids >= 4 avoid every special/pad id used below, so the only pad tokens are the ones placed on purpose.
    ids = torch.randint(4, VOCAB, (batch, seq), generator=gen)
    attn = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > PAD:
        attn[-1, seq - PAD :] = 0
        ids[-1, seq - PAD :] = pad_id
    out: dict[str, Tensor] = {"input_ids": ids, "attention_mask": attn}
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


def _text(**kw: Any) -> InputFactory:
    return lambda seed, batch, seq: _text_inputs(seed, batch=batch, seq=seq, **kw)


def _vision(seed: int, batch: int, seq: int) -> dict[str, Tensor]:
    del seq  # a ViT's token count is fixed by the image size
    return _vision_inputs(seed, batch)


ZOO: dict[str, ZooEntry] = {}
_INPUTS: dict[str, InputFactory] = {}


def _register(name: str, model_cls: str, config_cls: str, inputs: InputFactory, config: dict[str, Any],
              **facts: Any) -> None:
    """Add ``transformers.<model_cls>(transformers.<config_cls>(**config))`` to the zoo."""

    def _build(seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
        import transformers  # deferred: importing the zoo must not pull in transformers

        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        return model.eval(), inputs(seed, BATCH, SEQ)

    ZOO[name] = ZooEntry(name=name, build=_build, **facts)
    _INPUTS[name] = inputs


# Shared knobs; each family spells them differently, so they are spread into the per-family dicts below.
_H, _L, _NH, _FF = 32, 2, 2, 64
# Several configs default to GPT-2's 50256 for bos/eos, which transformers flags as outside our tiny vocab.
_SPECIAL = dict(bos_token_id=1, eos_token_id=2)
_BERTLIKE = dict(
    vocab_size=VOCAB, hidden_size=_H, num_hidden_layers=_L, num_attention_heads=_NH, intermediate_size=_FF,
    max_position_embeddings=MAX_POS, type_vocab_size=2, attn_implementation="sdpa",
)
# RoBERTa-style models derive position ids from ``input_ids != pad_token_id`` and offset them by pad+1.
_ROBERTALIKE = dict(_BERTLIKE, pad_token_id=1, max_position_embeddings=MAX_POS + 2)
# 4 query heads over 2 key/value heads, so grouped-query attention (repeat_kv) is part of every graph.
_LLAMALIKE = dict(
    vocab_size=VOCAB, hidden_size=_H, intermediate_size=_FF, num_hidden_layers=_L, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=MAX_POS, use_cache=False, pad_token_id=0,
    attn_implementation="sdpa", **_SPECIAL,
)
_VIT = dict(
    image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=_H, num_hidden_layers=_L,
    num_attention_heads=_NH, intermediate_size=_FF, attn_implementation="sdpa",
)
_GPT2 = dict(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=_H, n_layer=_L, n_head=_NH, n_inner=_FF,
             use_cache=False, attn_implementation="sdpa", **_SPECIAL)
_EAGER = dict(attn_implementation="eager")

_ENC = dict(blocks=_L, norm="post", norm_kind="layernorm", qkv="separate", causal=False, modality="text")
_VIS = dict(blocks=_L, norm="pre", norm_kind="layernorm", qkv="separate", causal=False, modality="vision",
            mlp="gelu")
_DEC = dict(blocks=_L, norm="pre", norm_kind="layernorm", causal=True, modality="text")
_RMS = dict(blocks=_L, norm="pre", norm_kind="rmsnorm", mlp="gated", causal=True, modality="text")

# --- encoders: post-LN unless noted -----------------------------------------------------------------------------
_register("bert", "BertModel", "BertConfig", _text(token_types=True), _BERTLIKE,
          attention="sdpa", mlp="gelu", **_ENC)
_register("bert_eager", "BertModel", "BertConfig", _text(token_types=True), dict(_BERTLIKE, **_EAGER),
          attention="eager", mlp="gelu", **_ENC)
_register("bert_cls", "BertForSequenceClassification", "BertConfig", _text(), dict(_BERTLIKE, num_labels=3),
          attention="sdpa", mlp="gelu", **_ENC)
_register("roberta", "RobertaModel", "RobertaConfig", _text(pad_id=1), _ROBERTALIKE,
          attention="sdpa", mlp="gelu", **_ENC)
_register("xlm_roberta", "XLMRobertaModel", "XLMRobertaConfig", _text(pad_id=1), _ROBERTALIKE,
          attention="sdpa", mlp="gelu", **_ENC)
# ELECTRA projects a narrower embedding (16) up to the hidden size before the first block.
_register("electra", "ElectraModel", "ElectraConfig", _text(), dict(_BERTLIKE, embedding_size=16),
          attention="sdpa", mlp="gelu", **_ENC)
# ALBERT applies one shared block ``num_hidden_layers`` times: ``blocks`` counts applications, not weight sets.
# Its default gelu_new activation is exported as the written-out tanh formula (pow/mul/add/tanh), not aten.gelu.
_register("albert", "AlbertModel", "AlbertConfig", _text(), dict(_BERTLIKE, embedding_size=16, num_hidden_groups=1),
          attention="sdpa", mlp="gelu", **_ENC)
_register("distilbert", "DistilBertModel", "DistilBertConfig", _text(),
          dict(vocab_size=VOCAB, dim=_H, n_layers=_L, n_heads=_NH, hidden_dim=_FF, max_position_embeddings=MAX_POS,
               attn_implementation="sdpa"),
          attention="sdpa", mlp="gelu", **_ENC)
# Megatron-BERT is the pre-LN BERT (norm before attention/MLP plus a final norm) and only has eager attention.
_register("megatron_bert", "MegatronBertModel", "MegatronBertConfig", _text(), dict(_BERTLIKE, **_EAGER),
          attention="eager", mlp="gelu", **dict(_ENC, norm="pre"))
# MPNet adds a relative-position bias to the scores, so it only has an eager (matmul + softmax) path.
_register("mpnet", "MPNetModel", "MPNetConfig", _text(pad_id=1), dict(_ROBERTALIKE, **_EAGER),
          attention="eager", mlp="gelu", **_ENC)

# --- vision: pre-LN ViT family ----------------------------------------------------------------------------------
_register("vit", "ViTModel", "ViTConfig", _vision, _VIT, attention="sdpa", **_VIS)
_register("vit_eager", "ViTModel", "ViTConfig", _vision, dict(_VIT, **_EAGER), attention="eager", **_VIS)
_register("deit", "DeiTModel", "DeiTConfig", _vision, _VIT, attention="sdpa", **_VIS)

# --- decoders: pre-LN ---------------------------------------------------------------------------------------------
# GPT-2's Conv1D keeps weights as [in, out] and exports as view + addmm + view; c_attn is one fused projection.
_register("gpt2", "GPT2Model", "GPT2Config", _text(), _GPT2, attention="sdpa", mlp="gelu", qkv="fused", **_DEC)
# The LM head is tied to the token embedding, so one parameter feeds both aten.embedding and aten.linear.
_register("gpt2_lm", "GPT2LMHeadModel", "GPT2Config", _text(), _GPT2,
          attention="sdpa", mlp="gelu", qkv="fused", **_DEC)
# GPT-Neo alternates global and local (window 4) attention, has no eager/SDPA switch and never scales the scores.
_register("gpt_neo", "GPTNeoModel", "GPTNeoConfig", _text(),
          dict(vocab_size=VOCAB, max_position_embeddings=MAX_POS, hidden_size=_H, num_layers=_L, num_heads=_NH,
               attention_types=[[["global", "local"], 1]], intermediate_size=_FF, window_size=4, use_cache=False,
               **_SPECIAL),
          attention="eager", mlp="gelu", qkv="separate", **_DEC)
# do_layer_norm_before=True is the layout of most OPT checkpoints (opt-350m alone is post-LN).
_register("opt", "OPTModel", "OPTConfig", _text(pad_id=1),
          dict(vocab_size=VOCAB, hidden_size=_H, num_hidden_layers=_L, ffn_dim=_FF, num_attention_heads=_NH,
               max_position_embeddings=MAX_POS, word_embed_proj_dim=_H, do_layer_norm_before=True, use_cache=False,
               pad_token_id=1, attn_implementation="sdpa"),
          attention="sdpa", mlp="relu", qkv="separate", **_DEC)
# GPT-J: a single LN feeds attention and MLP in parallel; partial rotary; gelu_new; eager attention only.
_register("gptj", "GPTJModel", "GPTJConfig", _text(),
          dict(vocab_size=VOCAB, n_positions=MAX_POS, n_embd=_H, n_layer=_L, n_head=_NH, n_inner=_FF, rotary_dim=8,
               use_cache=False, **_SPECIAL),
          attention="eager", mlp="gelu", qkv="separate", **_DEC)
# CodeGen = GPT-J with a fused qkv_proj that it splits into 4 hard-coded "model parallel" groups (heads % 4 == 0).
_register("codegen", "CodeGenModel", "CodeGenConfig", _text(),
          dict(vocab_size=VOCAB, n_positions=MAX_POS, n_ctx=MAX_POS, n_embd=_H, n_layer=_L, n_head=4, n_inner=_FF,
               rotary_dim=4, use_cache=False, **_SPECIAL),
          attention="eager", mlp="gelu", qkv="fused", **_DEC)
# BLOOM: ALiBi bias instead of positions (scores via baddbmm), fused query_key_value, tanh-formula GELU.
_register("bloom", "BloomModel", "BloomConfig", _text(),
          dict(vocab_size=VOCAB, hidden_size=_H, n_layer=_L, n_head=_NH, use_cache=False),
          attention="eager", mlp="gelu", qkv="fused", **_DEC)
# Falcon-7B layout: multi-query attention, one LN for parallel attention/MLP, bias-free FalconLinear (x @ w.T).
_register("falcon", "FalconModel", "FalconConfig", _text(),
          dict(vocab_size=VOCAB, hidden_size=_H, num_hidden_layers=_L, num_attention_heads=_NH, ffn_hidden_size=_FF,
               alibi=False, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
               max_position_embeddings=MAX_POS, use_cache=False, attn_implementation="sdpa"),
          attention="sdpa", mlp="gelu", qkv="fused", **_DEC)
_register("gpt_neox", "GPTNeoXModel", "GPTNeoXConfig", _text(),
          dict(vocab_size=VOCAB, hidden_size=_H, num_hidden_layers=_L, num_attention_heads=_NH, intermediate_size=_FF,
               rotary_pct=0.5, max_position_embeddings=MAX_POS, use_parallel_residual=True, use_cache=False,
               attn_implementation="sdpa"),
          attention="sdpa", mlp="gelu", qkv="fused", **_DEC)
_register("phi", "PhiModel", "PhiConfig", _text(),
          dict(vocab_size=VOCAB, hidden_size=_H, intermediate_size=_FF, num_hidden_layers=_L, num_attention_heads=_NH,
               partial_rotary_factor=0.5, max_position_embeddings=MAX_POS, use_cache=False,
               attn_implementation="sdpa"),
          attention="sdpa", mlp="gelu", qkv="separate", **_DEC)

# --- Llama family: RMSNorm, gated MLP, RoPE, grouped-query attention --------------------------------------------
_register("llama", "LlamaModel", "LlamaConfig", _text(), _LLAMALIKE, attention="sdpa", qkv="separate", **_RMS)
_register("llama_eager", "LlamaModel", "LlamaConfig", _text(), dict(_LLAMALIKE, **_EAGER),
          attention="eager", qkv="separate", **_RMS)
# A window shorter than the test sequences, so the sliding-window mask really is part of the graph.
_register("mistral", "MistralModel", "MistralConfig", _text(), dict(_LLAMALIKE, sliding_window=4),
          attention="sdpa", qkv="separate", **_RMS)
# Qwen2 = Llama with biased q/k/v projections; Qwen3 adds per-head RMSNorm on q and k.
_register("qwen2", "Qwen2Model", "Qwen2Config", _text(), _LLAMALIKE, attention="sdpa", qkv="separate", **_RMS)
_register("qwen3", "Qwen3Model", "Qwen3Config", _text(), dict(_LLAMALIKE, head_dim=8),
          attention="sdpa", qkv="separate", **_RMS)
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (split again with slicing / chunk).
_register("phi3", "Phi3Model", "Phi3Config", _text(), _LLAMALIKE, attention="sdpa", qkv="fused", **_RMS)
# Gemma scales embeddings by sqrt(hidden), uses (1 + weight) RMSNorm and a tanh-approximate GELU gate.
_register("gemma", "GemmaModel", "GemmaConfig", _text(), dict(_LLAMALIKE, head_dim=8),
          attention="sdpa", qkv="separate", **_RMS)


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
    return _INPUTS[name](seed, batch, seq)
