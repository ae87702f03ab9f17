"""unpad: padding-free execution (ByteTransformer): the blocks run on the real tokens only, packed into one tensor.

Before (B sequences padded to T):              After (N = real tokens in the batch):
    h = embed(ids)              # [B, T, C]        h = embed(ids)
                                                   index, cu = txc.unpad_index(mask != 0)
                                                   h = h.flatten(0, 1).index_select(0, index)      # [N, C]
    q, k, v = linear(h) ...     # [B, T, C]        q, k, v = linear(h) ...                          # [N, C]
    a = sdpa(view(q), view(k), view(v), mask4d)    a = txc.varlen_attention(q, k, v, cu, H, scale)  # per sequence
    h = norm(h + linear(a)); h = mlp(h) ...        h = norm(h + linear(a)); h = mlp(h) ...          # [N, C]
    out = h                     # [B, T, C]        out = txc.unpack_tokens(h, index, mask)          # zeros at pads

Every token-wise op (linears, norms, activations, residual adds) runs on the N real tokens instead of B*T; attention
runs per sequence without a mask. On CPU `txc::varlen_attention` is one SDPA call per sequence; on GPU the varlen
kernel of backends/triton. The anatomy must find SDPA attention with separate q/k/v projections in every block and a
padding mask that depends on the key only (encoders: no causal or other pattern); otherwise the pass declines with
the reason. Outputs at padded positions become zeros (the model's values there are meaningless); every other value is
unchanged, which verification checks on the real tokens only (the program's meta records the padding input).

Contract: exact on the real tokens. Paper: Zhai et al., "ByteTransformer: A High-Performance Transformer Boosted for
Variable-Length Inputs" (IPDPS 2023); MosaicBERT's unpadding.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from ..anatomy import Anatomy, Block, anatomy
from ..ir import ancestors, descendants, is_op, tensor_meta
from ..pipeline import PassContext, PassResult
from ..tokens import Decline, attn_mask, padding_input
from ..verify import VALID_ONLY, node_values

__all__ = ["UnPad"]

aten = torch.ops.aten
txc = torch.ops.txc


@dataclass(frozen=True)
class UnPad:
    """ByteTransformer's padding-free execution: token-wise ops on the packed real tokens, varlen attention."""

    name: ClassVar[str] = "unpad"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "padding-free execution: blocks run on the packed real tokens, attention per sequence"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        try:
            padding = _check(gm, anat, ctx)
        except Decline as e:
            return PassResult(gm, False, {"unpadded_blocks": 0}, (f"left padded: {e}",))
        graph = gm.graph
        first, last = anat.blocks[0].stream_in, anat.blocks[-1].stream_out
        region = descendants(first) & (ancestors(last) | {last})
        with graph.inserting_before(first.next):  # in order, right after the stream enters the first block
            valid = graph.call_function(aten.ne.Scalar, (padding, 0))
            plan = graph.call_function(txc.unpad_index.default, (valid,))
            index = graph.call_function(operator.getitem, (plan, 0))
            cu = graph.call_function(operator.getitem, (plan, 1))
            flat = graph.call_function(aten.flatten.using_ints, (first, 0, 1))
            packed = graph.call_function(aten.index_select.default, (flat, 0, index))
        for user in [u for u in first.users if u in region]:
            user.replace_input_with(first, packed)
        for block in anat.blocks:
            _varlen(graph, block, cu)
        with graph.inserting_after(last):
            unpacked = graph.call_function(txc.unpack_tokens.default, (last, index, valid))
        for user in [u for u in last.users if u is not unpacked]:
            user.replace_input_with(last, unpacked)
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        gm.meta[VALID_ONLY] = padding.name
        stats = {"unpadded_blocks": len(anat.blocks), "dead": before - len(graph.nodes)}
        return PassResult(gm, True, stats)


def _check(gm: fx.GraphModule, anat: Anatomy, ctx: PassContext) -> fx.Node:
    """The padding input, or Decline naming what stops padding-free execution."""
    if not anat.blocks:
        raise Decline("no Transformer block found")
    if any(n.target is txc.unpad_index.default for n in gm.graph.nodes):
        raise Decline("the program already runs unpadded")
    padding = padding_input(gm, anat, ctx.example_inputs)
    if padding is None:
        raise Decline("attention is not masked by a padding input")
    stream, pad = tensor_meta(anat.blocks[0].stream_in), tensor_meta(padding)
    # Export may name the inputs' batch dims apart (s72 vs s43); the token dims are one symbol.
    shapes_fit = stream is not None and pad is not None and stream.dim() == 3 and pad.dim() == 2
    if not shapes_fit or str(stream.shape[1]) != str(pad.shape[1]):  # type: ignore[union-attr]
        raise Decline("the residual stream is not [batch, tokens, dim] over the padding mask's [batch, tokens]")
    for block in anat.blocks:
        att = block.attention
        if att.kind != "sdpa":
            raise Decline(f"block {block.index}: eager attention (capture with SDPA attention)")
        if att.q is None or att.k is None or att.v is None:
            raise Decline(f"block {block.index}: fused qkv projection (run unpad before fuse_qkv)")
        if _sdpa_arg(att.core, 5, "is_causal", False):
            raise Decline(f"block {block.index}: causal attention")
        if _heads(att.core) is None:
            raise Decline(f"block {block.index}: the head count is not static")
        for lin, i in ((att.q, 0), (att.k, 1), (att.v, 2)):
            if _through_layout(att.core.args[i]) is not lin.output:
                raise Decline(f"block {block.index}: {lin.weight} reaches attention through more than reshapes")
        if _layout_users(att.core) is not att.out.input:
            raise Decline(
                f"block {block.index}: attention's output reaches {att.out.weight} through more than reshapes"
            )
    masks = {str(attn_mask(b.attention.core)) for b in anat.blocks if isinstance(attn_mask(b.attention.core), fx.Node)}
    values = node_values(gm, ctx.example_inputs, masks)
    for name, mask in values.items():
        if mask.dim() == 4 and mask.shape[2] > 1 and not bool((mask == mask[:, :, :1]).all()):
            raise Decline(f"the attention mask {name} differs between queries (causal or another pattern)")
    return padding


_LAYOUT = (aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.contiguous,
           aten.unflatten, aten.flatten, aten.clone, aten.alias)  # fmt: skip


def _through_layout(node: Any) -> Any:
    """The value `node` is a reshaped view of (through layout ops only)."""
    while isinstance(node, fx.Node) and is_op(node, *_LAYOUT):
        node = node.args[0]
    return node


def _layout_users(node: fx.Node) -> fx.Node:
    """The last node of the chain of single layout ops that reads `node` (node itself if none)."""
    while len(node.users) == 1 and is_op(next(iter(node.users)), *_LAYOUT):
        node = next(iter(node.users))
    return node


def _sdpa_arg(core: fx.Node, position: int, name: str, default: Any) -> Any:
    return core.args[position] if len(core.args) > position else core.kwargs.get(name, default)


def _heads(core: fx.Node) -> int | None:
    q = tensor_meta(core.args[0])
    return int(q.shape[1]) if q is not None and q.dim() == 4 and isinstance(q.shape[1], int) else None


def _varlen(graph: fx.Graph, block: Block, cu: fx.Node) -> None:
    """Replace the block's attention, from its projections' outputs to the output projection's input, by one
    varlen attention over the packed tokens."""
    att = block.attention
    q = tensor_meta(att.core.args[0])
    assert q is not None and att.q is not None and att.k is not None and att.v is not None  # _check saw them
    scale = _sdpa_arg(att.core, 6, "scale", None)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(q.shape[-1]))
    out = att.out.node
    with graph.inserting_before(out):
        new = graph.call_function(
            txc.varlen_attention.default, (att.q.output, att.k.output, att.v.output, cu, _heads(att.core), scale)
        )
    out.replace_input_with(att.out.input, new)
    # SDPA counts as impure (its dropout draws random numbers), so dead-code elimination would keep it: erase the old
    # path from the core to the projection by hand; the reshapes feeding the core then die with it.
    node = att.out.input
    while node is not att.core and not node.users and is_op(node, *_LAYOUT):
        parent = node.args[0]
        graph.erase_node(node)
        node = parent
    if not att.core.users:
        graph.erase_node(att.core)
