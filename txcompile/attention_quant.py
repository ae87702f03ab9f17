"""Log2-quantized attention probabilities: the graph surgery behind RepQuant's (and FQ-ViT's) softmax quantizer.

    node = quantize_attention_probs(gm, block.attention, bits=4)   # the node holding the quantized probabilities

Eager attention already has its probabilities as a node: `txc.log2_quantize(softmax, bits)` goes right after the
softmax and takes over all of its users (dropout, probs @ V, an `output_attentions` output). A fused SDPA hides them,
so it is replaced by the same attention written out:

    probs = softmax(q·kᵀ·scale + mask)      per head, in float32: token_prune's `attention_probs` on a singleton
                                            head axis (its head mean then averages one value), so the scale, bool and
                                            additive masks and grouped-query heads are honoured exactly as there
    out   = log2_quantize(probs, bits) @ v  v's heads repeated like SDPA's enable_gqa; cast back to SDPA's dtype

`is_causal` becomes a bool lower-triangular [L, S] mask (top-left aligned, as SDPA's). A query that a bool mask lets
see no key gets all-zero weights, as from SDPA (attention_probs alone would give it a uniform row).
Refused (ValueError, or the reason from `unsupported_reason`, before anything changes): dropout_p != 0, q/k/v not
[batch, heads, tokens, head size], key heads that do not divide query heads, and eager cores that are not a
softmax or are already quantized. New nodes carry the core's `nn_module_stack` and get FakeTensor values from
`ir.refresh_metadata`, so the graph lints, re-exports with torch.export and keeps symbolic batch/sequence sizes.

Note: anatomy's probs-to-values walk does not look through `txc.log2_quantize`, so a graph rewritten here no longer
shows these attentions to `anatomy`: analyse first, then quantize.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from .anatomy import Attention
from .ir import is_op, refresh_metadata, tensor_meta
from .ops.log2_quant import check_bits
from .ops.token_prune import attention_probs

__all__ = ["quantize_attention_probs", "unsupported_reason", "head_probs"]

aten = torch.ops.aten
_SOFTMAX = (aten._softmax, aten.softmax, aten._safe_softmax)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                  "enable_gqa": False}  # fmt: skip


def _log2_quantize_op() -> Any:
    return torch.ops.txc.log2_quantize.default


def _sdpa_args(core: fx.Node) -> dict[str, Any]:
    """The SDPA node's arguments by name, defaults filled in."""
    return {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, core.args)), **core.kwargs}


def _is_quantized(node: fx.Node) -> bool:
    return any(u.op == "call_function" and u.target == _log2_quantize_op() for u in node.users)


def unsupported_reason(attention: Attention) -> str | None:
    """Why `quantize_attention_probs` would refuse this attention, or None if it can rewrite it."""
    core = attention.core
    if attention.kind == "eager":
        if not is_op(core, *_SOFTMAX):
            return f"the eager attention core {core.name} is not a softmax"
        return "its probabilities are already log2-quantized" if _is_quantized(core) else None
    if not is_op(core, aten.scaled_dot_product_attention):
        return f"the attention core {core.name} is not scaled_dot_product_attention"
    args = _sdpa_args(core)
    if args["dropout_p"] != 0:
        return f"attention dropout (dropout_p={args['dropout_p']}) would drop quantized probabilities at random"
    q, k, v = (tensor_meta(args[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None or not q.dim() == k.dim() == v.dim() == 4:
        return "q, k and v are not [batch, heads, tokens, head size] tensors with recorded values"
    if not q.is_floating_point():
        return f"q has dtype {q.dtype}, not a floating-point dtype"
    hq, hk, hv = (int(t.shape[1]) for t in (q, k, v))
    if hk != hv or hq % hk:
        return f"{hk} key and {hv} value heads do not evenly serve {hq} query heads"
    mask = tensor_meta(args["attn_mask"])
    if args["attn_mask"] is not None and (mask is None or mask.dim() > 4):
        return "the attention mask has no recorded value or more than 4 dims"
    return None


def head_probs(q: Any, k: Any, mask: Any, scale: float, *, bool_mask: bool, groups: int, mask_dims: int) -> Any:
    """Per-head softmax(q·kᵀ·scale + mask) in float32, [B, H, L, S], on tensors or fx Proxies.

    token_prune's `attention_probs` averages over dim 1; given q and k with a singleton dim 1 inserted (and key heads
    already repeated, since its `groups` repeats dim 1), that mean is over one value and the heads survive. A 4-D mask
    gets the same singleton dim; masks with fewer dims broadcast from the right and need none.
    """
    if groups > 1:
        k = aten.repeat_interleave.self_int(k, groups, 1)
    q, k = aten.unsqueeze.default(q, 1), aten.unsqueeze.default(k, 1)
    if mask is not None and mask_dims == 4:
        mask = aten.unsqueeze.default(mask, 1)
    return attention_probs(q, k, mask, scale, bool_mask=bool_mask)


def _proxy(tracer: fx.proxy.GraphAppendingTracer, node: Any) -> Any:
    return fx.Proxy(node, tracer) if isinstance(node, fx.Node) else node


def _decompose_sdpa(gm: fx.GraphModule, core: fx.Node, bits: int) -> fx.Node:
    """Replace the SDPA node by probs -> log2_quantize -> @ v; returns the log2_quantize node."""
    args = _sdpa_args(core)
    vq, vk, vv = (tensor_meta(args[n]) for n in ("query", "key", "value"))
    assert vq is not None and vk is not None and vv is not None  # checked by unsupported_reason
    scale = args["scale"]
    scale = 1.0 / math.sqrt(int(vq.shape[-1])) if scale is None else float(scale)
    groups = int(vq.shape[1]) // int(vk.shape[1])
    out_meta = tensor_meta(core)
    out_dtype = out_meta.dtype if out_meta is not None else vq.dtype
    graph = gm.graph
    existing = set(graph.nodes)
    tracer = fx.proxy.GraphAppendingTracer(graph)
    q, k, v = (_proxy(tracer, args[n]) for n in ("query", "key", "value"))
    mask_node = args["attn_mask"]
    meta = tensor_meta(mask_node)
    bool_mask = meta is not None and meta.dtype == torch.bool
    mask_dims = meta.dim() if meta is not None else 0
    with graph.inserting_before(core):
        mask = _proxy(tracer, mask_node)
        if args["is_causal"]:  # SDPA forbids is_causal with an explicit mask, so there is none to combine with
            size = (aten.sym_size.int(q, 2), aten.sym_size.int(k, 2))
            mask = aten.tril.default(aten.new_ones.default(q, size, dtype=torch.bool))
            bool_mask, mask_dims = True, 2
        probs = head_probs(q, k, mask, scale, bool_mask=bool_mask, groups=groups, mask_dims=mask_dims)
        if bool_mask and not args["is_causal"]:  # SDPA gives a query that sees no key zero weights, not uniform ones
            probs = aten.where.ScalarOther(aten.any.dim(mask, -1, True), probs, 0.0)
        quant = _log2_quantize_op()(probs, bits)
        if vv.dtype != torch.float32:
            v = aten._to_copy.default(v, dtype=torch.float32)
        if groups > 1:  # enable_gqa repeats each key/value head for consecutive query heads
            v = aten.repeat_interleave.self_int(v, groups, 1)
        out = aten.matmul.default(quant, v)
        if out_dtype != torch.float32:
            out = aten._to_copy.default(out, dtype=out_dtype)
    _label(core, [n for n in graph.nodes if n not in existing])
    core.replace_all_uses_with(out.node)
    graph.erase_node(core)
    return quant.node


def _label(core: fx.Node, nodes: list[fx.Node]) -> None:
    """Give inserted nodes the core's module stack, so reports and module paths place them in its block."""
    stack = core.meta.get("nn_module_stack")
    for node in nodes if stack is not None else ():
        node.meta["nn_module_stack"] = dict(stack)


def quantize_attention_probs(gm: fx.GraphModule, attention: Attention, bits: int) -> fx.Node:
    """Log2-quantize the attention probabilities of `attention` (from `anatomy(gm)`) to `bits` bits, in place.

    Returns the `txc.log2_quantize` node, whose value is the quantized probabilities [B, H, L, S] (what a
    calibration hook observes, and what a shift-based probs @ V kernel would consume). Raises ValueError naming the
    reason (see `unsupported_reason`) without touching the graph when the attention cannot be rewritten.
    """
    check_bits(bits)
    reason = unsupported_reason(attention)
    if reason is not None:
        raise ValueError(f"quantize_attention_probs: cannot rewrite the attention at {attention.core.name}: {reason}")
    core = attention.core
    if attention.kind == "sdpa":
        node = _decompose_sdpa(gm, core, bits)
    else:
        graph = gm.graph
        with graph.inserting_after(core):
            node = graph.call_function(_log2_quantize_op(), (core, bits))
        _label(core, [node])
        core.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.graph.lint()
    gm.recompile()
    refresh_metadata(gm)  # incremental: only the inserted nodes (and nothing downstream: shapes are unchanged)
    return node
