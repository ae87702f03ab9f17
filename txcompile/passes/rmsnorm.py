"""rmsnorm: a pre-LN Transformer becomes the equivalent pre-RMSNorm Transformer (LayerNorm -> RMSNorm).

Before:                                        After:
    h = embedding(E_tok, ids) + embedding(E_pos, pos)    h = embedding(E_tok', ids) + embedding(E_pos', pos)
    a = aten.linear(attn, W_o, b_o)                        a = aten.linear(attn, W_o', b_o')
    h = h + a                                              h = h + a                  (h is now zero-mean)
    y = aten.layer_norm(h, [d], w, b, eps)                 y = aten.rms_norm(h, [d], w, eps) + b

In a pre-LN Transformer every LayerNorm reading the residual stream removes the stream's mean over the hidden dim,
so the mean of whatever is written into the stream never matters. Centring every writer (each embedding row, and the
output vector of every attention output projection and MLP down projection: W' = W - mean_out(W), b' = b - mean(b))
makes the stream zero-mean, and LayerNorm of a zero-mean vector is RMSNorm: one reduction instead of two.

Preconditions (otherwise the pass declines with a note): every block is pre-LN and sequential (not parallel); the
stream starts at a sum of embedding lookups (scaled by constants at most); everything written into it is an attention
output projection or MLP down projection; and nothing but LayerNorms and residual adds reads it. New tensors replace
the writers' weights (a table tied to an LM head gets its own centred copy; the head keeps the original).

Contract: exact (the same function; recentring rounds slightly differently).
Paper: Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers" (2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..anatomy import Anatomy, Linear, anatomy
from ..ir import add_tensor, get_tensor, is_op, op_name, prune_tensors, tensor_meta
from ..pipeline import PassContext, PassResult

aten = torch.ops.aten

# Ops that carry the stream (or a writer's output) unchanged row by row.
_CARRY = (
    aten.dropout, aten.clone, aten.alias, aten.contiguous, aten.detach, aten.view, aten.reshape, aten._unsafe_view,
)  # fmt: skip


class _Decline(Exception):
    """The graph does not meet the pass's preconditions; the message is the note."""


def _last_dim(node: fx.Node) -> int | None:
    val = tensor_meta(node)
    return None if val is None or val.dim() == 0 else int(val.shape[-1])


def _carries(node: fx.Node, dim: int) -> bool:
    """`node` passes its first argument through row by row over the hidden dim."""
    if is_op(node, aten.to, aten._to_copy):  # a cast to the dtype it already has (GPT-2 casts its embeddings)
        val, src = tensor_meta(node), tensor_meta(node.args[0])
        return val is not None and src is not None and val.dtype == src.dtype and _last_dim(node) == dim
    return is_op(node, *_CARRY) and _last_dim(node) == dim and _last_dim(node.args[0]) == dim


def _tail(node: fx.Node, dim: int) -> fx.Node:
    """Follow single-user carry ops from a writer's output to the node that meets the stream."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _carries(user, dim):
            break
        node = user
    return node


def _embedding_writers(gm: fx.GraphModule, start: fx.Node, dim: int) -> list[fx.Node]:
    """The embedding lookups whose (constant-scaled) sum is the stream entering the first block."""
    found: list[fx.Node] = []
    frontier = [start]
    while frontier:
        node = frontier.pop()
        if is_op(node, aten.embedding) and get_tensor(gm, node.args[0]) is not None:
            found.append(node)
        elif is_op(node, aten.add) and all(isinstance(a, fx.Node) for a in node.args[:2]) and len(node.args) == 2:
            frontier.extend(node.args[:2])  # type: ignore[arg-type]
        elif is_op(node, aten.mul, aten.div) and isinstance(node.args[1], (int, float)):
            frontier.append(node.args[0])  # type: ignore[arg-type]
        elif isinstance(node, fx.Node) and node.op == "call_function" and node.args and _carries(node, dim):
            frontier.append(node.args[0])  # type: ignore[arg-type]
        else:
            what = op_name(node) if isinstance(node, fx.Node) else repr(node)
            raise _Decline(f"the residual stream starts at {what}, not a sum of embedding lookups (vision stem?)")
        if isinstance(node, fx.Node) and node is not start and len(node.users) != 1:
            raise _Decline(f"{node.name} ({op_name(node)}) feeds the embedding sum and is also read elsewhere")
    return found


def _check(gm: fx.GraphModule, anat: Anatomy) -> tuple[list[fx.Node], list[Linear], list[fx.Node]]:
    """(embedding lookups, writer linears, LayerNorm readers), or _Decline with the reason."""
    blocks = anat.blocks
    if not blocks:
        raise _Decline("no Transformer blocks found")
    if any(b.norm_position != "pre" for b in blocks):
        raise _Decline("post-LN blocks: the equivalence needs every stream reader to be a LayerNorm")
    if any(b.parallel for b in blocks):
        raise _Decline("parallel blocks: not supported")
    norms = [n for b in blocks for n in b.norms] + ([anat.final_norm] if anat.final_norm is not None else [])
    if norms and all(n.kind == "rmsnorm" for n in norms):
        raise _Decline("the stream is already read by RMSNorm: nothing to do")
    if any(n.kind != "layernorm" for n in norms):
        raise _Decline("mixed LayerNorm/RMSNorm stream readers")
    dim = _last_dim(blocks[0].stream_in)
    if dim is None:
        raise _Decline("no shape metadata on the residual stream")
    writers: dict[fx.Node, Linear] = {}
    for b in blocks:
        if b.mlp is None:
            raise _Decline(f"block {b.index} has no MLP")
        for lin in (b.attention.out, b.mlp.fc2):
            if lin.out_features != dim:
                raise _Decline(f"{lin.node.name} writes {lin.out_features} features into a {dim}-wide stream")
            if lin.reparam is not None:
                raise _Decline(f"{lin.node.name} has a σReparam'd weight: run fold_sigma_reparam first")
            writers[_tail(lin.output, dim)] = lin
    embeddings = _embedding_writers(gm, blocks[0].stream_in, dim)
    if not embeddings:
        raise _Decline("no embedding lookups feed the residual stream")
    readers: list[fx.Node] = []
    used: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    frontier = [blocks[0].stream_in]
    while frontier:
        s = frontier.pop()
        if s in seen:
            continue
        seen.add(s)
        for u in s.users:
            if is_op(u, aten.layer_norm) and u.args[0] is s and len(u.args[1]) == 1:  # type: ignore[arg-type]
                readers.append(u)
            elif is_op(u, aten.add) and len(u.args) == 2 and all(isinstance(a, fx.Node) for a in u.args):
                other = u.args[1] if u.args[0] is s else u.args[0]
                if other not in writers:
                    raise _Decline(f"{u.name} adds {other} to the residual stream, which is not a block's writer")
                used.add(other)  # type: ignore[arg-type]
                frontier.append(u)
            elif _carries(u, dim):
                frontier.append(u)
            else:
                what = "the graph output" if u.op == "output" else f"{u.name} ({op_name(u)})"
                raise _Decline(f"{what} reads the residual stream: only LayerNorms and residual adds may")
    missing = [lin.node.name for tail, lin in writers.items() if tail not in used]
    if missing:
        raise _Decline(f"writers not added to the residual stream: {', '.join(missing)}")
    for tail in writers:
        if len(tail.users) != 1:
            raise _Decline(f"{tail.name} is written into the stream and also read elsewhere")
    return embeddings, list(writers.values()), readers


def _rewire(gm: fx.GraphModule, node: fx.Node, target: str, new_target: str) -> None:
    """Make `node` read `new_target` where it read `target` (directly or through one single-user layout op)."""
    graph = gm.graph
    for arg in node.all_input_nodes:
        holder = None
        if arg.op == "get_attr" and str(arg.target) == target:
            holder = node
        elif arg.op == "call_function" and len(arg.users) == 1:
            if any(a.op == "get_attr" and str(a.target) == target for a in arg.all_input_nodes):
                holder, arg = arg, next(a for a in arg.all_input_nodes if str(a.target) == target)
        if holder is None:
            continue
        with graph.inserting_before(holder):
            new = graph.get_attr(new_target)
        holder.replace_input_with(arg, new)
        return
    raise _Decline(f"cannot find {target} among the inputs of {node.name}")


@dataclass(frozen=True)
class RMSNorm:
    """Centre every write into a pre-LN residual stream, then read it with RMSNorm instead of LayerNorm."""

    name: ClassVar[str] = "rmsnorm"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "pre-LN -> pre-RMSNorm: zero-mean residual stream, LayerNorm becomes RMSNorm"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        try:
            embeddings, writers, readers = _check(gm, anatomy(gm))
        except _Decline as why:
            return PassResult(gm, False, {"layernorms_replaced": 0}, (f"rmsnorm not applied: {why}",))
        graph = gm.graph
        made: dict[tuple[str, str], str] = {}

        def centred(target: str, kind: str, value: torch.Tensor) -> str:
            if (target, kind) not in made:
                made[(target, kind)] = add_tensor(gm, f"{target}_centred", value)
            return made[(target, kind)]

        for emb in embeddings:
            target = str(emb.args[0].target)  # type: ignore[union-attr]
            table = get_tensor(gm, emb.args[0]).detach()  # type: ignore[union-attr]
            _rewire(gm, emb, target, centred(target, "rows", table - table.mean(-1, keepdim=True)))
        for lin in writers:
            w = _stored_weight(gm, lin)
            axis = 0 if lin.layout == "out_in" else 1
            _rewire(gm, lin.node, lin.weight, centred(lin.weight, f"w{axis}", w - w.mean(axis, keepdim=True)))
            b = lin.bias_tensor(gm)
            if b is not None and lin.bias is not None:
                b = b.detach()
                _rewire(gm, lin.node, lin.bias, centred(lin.bias, "bias", b - b.mean()))
        for ln in readers:
            x, shape = ln.args[0], ln.args[1]
            weight = ln.args[2] if len(ln.args) > 2 else None
            bias = ln.args[3] if len(ln.args) > 3 else None
            eps = float(ln.args[4]) if len(ln.args) > 4 else 1e-5  # type: ignore[arg-type]
            with graph.inserting_before(ln):
                out = graph.call_function(aten.rms_norm.default, (x, shape, weight, eps))
                out.meta = dict(ln.meta)
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
                    out.meta = dict(ln.meta)
            ln.replace_all_uses_with(out)
            graph.erase_node(ln)
        graph.lint()
        dropped = prune_tensors(gm)
        stats = {
            "layernorms_replaced": len(readers),
            "writers_centred": len(writers),
            "embeddings_centred": len(embeddings),
            "tensors_dropped": dropped,
        }
        return PassResult(gm, True, stats, ())


def _stored_weight(gm: fx.GraphModule, lin: Linear) -> torch.Tensor:
    """The writer's weight as stored (its own layout), detached."""
    obj: object = gm
    for part in lin.weight.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj.detach()
