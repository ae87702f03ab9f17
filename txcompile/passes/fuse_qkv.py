"""fuse_qkv: separate q/k/v projections that read the same input become one linear plus a split.

Before:                                   After:
    q = aten.linear(x, Wq, bq)                qkv = aten.linear(x, cat[Wq; Wk; Wv], cat[bq; bk; bv])
    k = aten.linear(x, Wk, bk)                q, k, v = aten.split_with_sizes(qkv, [dq, dk, dv], -1)
    v = aten.linear(x, Wv, bv)

One GEMM instead of three reads `x` once and gives the backends one larger, better-shaped matrix product; tensor
parallelism later shards the fused weight by heads. With `gated_mlp=true` the gate and up projections of gated MLPs
(SwiGLU) are fused the same way. A missing bias among the group is filled with zeros.

Contract: exact (each output column is the same dot product; only the GEMM's blocking can differ).
Paper: standard practice in Megatron-LM and FlashAttention-era kernels (one QKV GEMM).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..anatomy import Linear, anatomy
from ..ir import add_tensor, prune_tensors
from ..pipeline import PassContext, PassResult

aten = torch.ops.aten


def _fusable(group: Sequence[Linear | None]) -> str | None:
    """None if `group` can become one linear, else the reason it cannot."""
    if any(lin is None for lin in group):
        return "already fused"
    lins = [lin for lin in group if lin is not None]
    if any(lin.kind != "linear" for lin in lins):
        return "not plain aten.linear layers"
    if any(lin.reparam is not None for lin in lins):
        return "σReparam'd weights (run fold_sigma_reparam first)"
    if len({lin.input for lin in lins}) != 1:
        return "projections read different inputs (cross-attention)"
    if len({lin.in_features for lin in lins}) != 1 or len({lin.dtype for lin in lins}) != 1:
        return "projections differ in input size or dtype"
    return None


def fuse_linears(gm: fx.GraphModule, lins: Sequence[Linear], hint: str) -> fx.Node:
    """Replace linears that read the same input by one linear over stacked weights and a split; return the linear."""
    weights = [lin.weight_out_in(gm).detach() for lin in lins]
    biases = []
    if any(lin.bias is not None for lin in lins):
        for lin, w in zip(lins, weights):
            b = lin.bias_tensor(gm)
            biases.append(b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    first = min((lin.node for lin in lins), key=lambda n: _position(gm, n))
    graph = gm.graph
    with graph.inserting_before(first):
        w_node = graph.get_attr(add_tensor(gm, f"{hint}_weight", torch.cat(weights, 0)))
        b_node = graph.get_attr(add_tensor(gm, f"{hint}_bias", torch.cat(biases, 0))) if biases else None
        fused = graph.call_function(aten.linear.default, (lins[0].input, w_node, b_node))
        sizes = [w.shape[0] for w in weights]
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        for i, lin in enumerate(lins):
            part = graph.call_function(operator.getitem, (split, i))
            lin.node.replace_all_uses_with(part)
    for lin in lins:
        graph.erase_node(lin.node)
    return fused


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    for i, n in enumerate(gm.graph.nodes):
        if n is node:
            return i
    raise ValueError(f"{node} is not in the graph")


@dataclass(frozen=True)
class FuseQKV:
    """Fuse separate q/k/v projections (and optionally gated-MLP gate/up projections) into one linear each."""

    name: ClassVar[str] = "fuse_qkv"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "one linear + split for separate q/k/v projections (and gate/up with gated_mlp)"

    gated_mlp: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        fused_attention = fused_mlp = 0
        notes: list[str] = []
        for block in anat.blocks:
            att = block.attention
            reason = _fusable([att.q, att.k, att.v])
            if reason is None:
                fuse_linears(gm, [att.q, att.k, att.v], f"block{block.index}_qkv")  # type: ignore[list-item]
                fused_attention += 1
            elif reason != "already fused":
                notes.append(f"block {block.index}: q/k/v left separate: {reason}")
            mlp = block.mlp
            if self.gated_mlp and mlp is not None and mlp.gated and mlp.up is not None:
                reason = _fusable([mlp.fc1, mlp.up])
                if reason is None:
                    fuse_linears(gm, [mlp.fc1, mlp.up], f"block{block.index}_gate_up")
                    fused_mlp += 1
                else:
                    notes.append(f"block {block.index}: gate/up left separate: {reason}")
        modified = bool(fused_attention or fused_mlp)
        dropped = prune_tensors(gm) if modified else 0
        stats = {"fused_qkv": fused_attention, "fused_gate_up": fused_mlp, "tensors_dropped": dropped}
        return PassResult(gm, modified, stats, tuple(notes))
