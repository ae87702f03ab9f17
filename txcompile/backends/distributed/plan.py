"""A tensor- and pipeline-parallel plan for a captured Transformer, with a predicted step time (run by program.py).

    gm = txc.capture(model, inputs)
    plan = make_plan(gm, tp=4, pp=2, microbatches=8, batch=32, seq=1024)
    print(plan.report())                  # per rank: params, FLOPs, communication, predicted busy time; step time
    plan.to_json()                        # plan.json of a converted distributed artifact
    plan_for_hf_config(transformers.LlamaConfig(...), tp=8, batch=8, seq=4096)   # models too big for this machine

What is decided, from `txc.anatomy` (by what the graph computes, never by names):

- Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): in every block, q/k/v (or a fused qkv) and the MLP's fc1
  (gate and up, or a fused gate_up) are column-parallel (output features split, so each rank holds whole heads and
  a slice of the MLP's hidden units); the attention output projection and fc2 are row-parallel (input features
  split, partial sums all-reduced). That is one all-reduce after attention and one after the MLP in the forward
  pass (and the same two on the input gradients in the backward pass). Row-parallel biases are replicated and added
  once, after the all-reduce. The token embedding and a head whose outputs are the vocabulary are vocab-parallel
  (rows of the [vocab, hidden] table split; the embedding's partial lookups are all-reduced, the head's logits stay
  split and feed a vocab-parallel cross-entropy). Norms, position embeddings and other heads are replicated. A fused
  qkv (or gate_up) is split per part: each rank takes its slice of q, of k and of v (several ranges in one dim).
- Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2021): the blocks are cut into `pp`
  contiguous stages; the embeddings go with stage 0, the final norm and head with the last stage; the cut minimises
  the slowest stage's predicted time (exact dynamic programme over contiguous partitions).
- Ranks: rank = pp_rank * tp + tp_rank, so the ranks of one tensor-parallel group are neighbours (one node, NVLink).

The performance model (all of it is in `_Model` below; every number it takes is a field of `Network` or an option):

    B_mb = batch / microbatches                                    (microbatch size)
    per stage s, per microbatch, per rank:
      flops_s  = sum over its blocks of  split_flops(B_mb, T) / tp + replicated_flops(B_mb, T)
                 (+ embeddings on stage 0: no FLOPs; + final norm and head on the last stage, the head / tp if
                 vocab-parallel), times 3 when training (backward = 2 x forward)
      bytes_s  = the cost model's bytes (weights read once + activations read and written) / tp, in `dtype_bytes`
      compute  = max(flops_s / (peak_flops * efficiency), bytes_s / hbm_bytes_per_s)      (a roofline)
      tp comm  = n_ar * allreduce(B_mb * T * hidden * dtype_bytes)
                 allreduce(n) = 2 (tp-1)/tp * n * beta + 2 (tp-1) * alpha        (ring all-reduce)
                 n_ar = 2 per block (x2 when training) + 1 for a vocab-parallel embedding
                 + the head: training 1 all-reduce of the input gradient + 3 of B_mb*T fp32 (parallel cross-entropy:
                 max, sum of exp, target logit); inference an all-gather of the logits,
                 allgather(n) = (tp-1)/tp * n * beta + (tp-1) * alpha
      pp comm  = alpha + B_mb * T * hidden * dtype_bytes * beta per stage boundary this stage sends over (forward
                 activations, and when training the gradients back); each tp rank sends its full copy (no
                 scatter/gather optimisation)
      t_s      = compute + tp comm + pp comm                       (no overlap of communication and compute)
    step time  = (microbatches + pp - 1) * max_s t_s  (+ a tied embedding/head gradient all-reduce between the first
                 and last stage when training with pp > 1)
    bubble     = (pp - 1) / (microbatches + pp - 1)                (the same for GPipe and 1F1B; 1F1B only keeps at
                 most pp - s microbatches of activations alive on stage s instead of all of them)
    per rank   : busy time = microbatches * t_s; FLOPs and bytes sent per step = microbatches * the above.

These are paper estimates for comparing plans, not measurements: no kernel efficiencies per shape, no overlap, no
data parallelism, no activation recomputation, no sequence parallelism, no optimizer step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import sympy
import torch
from torch import fx

from ...anatomy import Anatomy, Block, anatomy
from ...cost import MATMUL_PARTS, B, BlockCost, T, block_costs, evaluate, heads, size_symbols
from ...errors import SpecError
from ...ir import is_op, tensor_meta
from ...linears import Linear
from .stages import partition as _partition
from .network import NETWORKS, Network, _allgather_sent, _allreduce_sent, allgather_time, allreduce_time

aten = torch.ops.aten

__all__ = ["Plan", "RankPlan", "Shard", "Stage", "make_plan"]

Style = Literal["column", "row", "vocab", "replicated"]


# --------------------------------------------------------------------------------------------------------------------
# Plan data


@dataclass(frozen=True)
class Shard:
    """How one parameter is laid out over the tensor-parallel ranks.

    `dim` is the sliced dimension (None: replicated). The dim is cut into `parts` (one part for a plain linear; q, k,
    v for a fused qkv) and every part is split evenly: tp rank r holds, of each part, rows [r*p/tp, (r+1)*p/tp) of
    it, concatenated. `pad_to` (vocab-parallel only) is the padded size of `dim` when the vocabulary does not divide
    by tp; the rows past the real size are zeros.
    """

    param: str
    shape: tuple[int, ...]
    style: Style
    dim: int | None = None
    parts: tuple[int, ...] = ()
    pad_to: int | None = None

    def ranges(self, tp_rank: int, tp: int) -> list[tuple[int, int]]:
        """The [start, stop) index ranges of the full `dim` that tp rank `tp_rank` holds (clipped to the real size)."""
        if self.dim is None:
            return []
        full = self.shape[self.dim]
        out: list[tuple[int, int]] = []
        offset = 0
        for part in self.parts or (self.pad_to or full,):
            step = part // tp
            lo, hi = offset + tp_rank * step, offset + (tp_rank + 1) * step
            out.append((min(lo, full), min(hi, full)))
            offset += part
        return out

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        size = sum(p // tp for p in (self.parts or (self.pad_to or self.shape[self.dim],)))
        return tuple(size if i == self.dim else s for i, s in enumerate(self.shape))

    def local_numel(self, tp: int) -> int:
        return math.prod(self.local_shape(tp))


@dataclass(frozen=True)
class LinearPlan:
    """One linear's parallel style, for people and the executor."""

    block: int  # -1: outside the blocks (head)
    role: str  # attn.q | attn.k | attn.v | attn.qkv | attn.out | mlp.fc1 | mlp.up | mlp.fc2 | head
    style: Style
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)


@dataclass(frozen=True)
class Stage:
    index: int
    blocks: tuple[int, int]  # [first, stop)
    embeddings: bool
    head: bool
    time_per_microbatch: float  # t_s, seconds
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    flops: float  # per rank, per microbatch (x3 when training)
    tp_bytes: float  # bytes one rank sends per microbatch for tensor parallelism
    pp_bytes: float


@dataclass(frozen=True)
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    stage: int
    blocks: tuple[int, int]
    param_bytes: int
    flops: float  # per step
    comm_bytes: float  # sent per step
    busy_s: float  # microbatches * t_s


@dataclass(frozen=True)
class Plan:
    """A tp x pp plan: per parameter shards, stages, per rank costs and the predicted step time."""

    model: str
    tp: int
    pp: int
    microbatches: int
    schedule: str
    batch: int
    seq: int
    dtype_bytes: int
    training: bool
    efficiency: float
    network: Network
    hidden: int
    n_blocks: int
    heads: int
    kv_heads: int
    mlp_hidden: int
    vocab: int | None
    linears: tuple[LinearPlan, ...]
    shards: dict[str, Shard]
    param_stages: dict[str, tuple[int, ...]]  # parameter -> the stages holding it
    stages: tuple[Stage, ...]
    ranks: tuple[RankPlan, ...]
    step_s: float
    bubble: float
    tied_sync_s: float
    notes: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank_shards(self, rank: int) -> dict[str, dict[str, Any]]:
        """{param: {full_shape, shape, style, dim, ranges}} for the parameters `rank` holds."""
        r = self.ranks[rank]
        out: dict[str, dict[str, Any]] = {}
        for name, stages in self.param_stages.items():
            if r.stage not in stages:
                continue
            s = self.shards[name]
            out[name] = {
                "full_shape": list(s.shape),
                "shape": list(s.local_shape(self.tp)),
                "style": s.style,
                "dim": s.dim,
                "ranges": [list(x) for x in s.ranges(r.tp_rank, self.tp)],
            }
            if s.pad_to is not None:
                out[name]["pad_to"] = s.pad_to
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "model": self.model,
            "world_size": self.world_size,
            "tp": self.tp,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
            "batch": self.batch,
            "seq": self.seq,
            "dtype_bytes": self.dtype_bytes,
            "training": self.training,
            "efficiency": self.efficiency,
            "network": self.network.to_dict(),
            "model_shape": {
                "blocks": self.n_blocks,
                "hidden": self.hidden,
                "heads": self.heads,
                "kv_heads": self.kv_heads,
                "mlp_hidden": self.mlp_hidden,
                "vocab": self.vocab,
            },  # fmt: skip
            "rank_order": "rank = pp_rank * tp + tp_rank",
            "linears": [vars(x) for x in self.linears],
            "stages": [
                {
                    "stage": s.index,
                    "blocks": list(s.blocks),
                    "embeddings": s.embeddings,
                    "head": s.head,
                    "time_per_microbatch_s": s.time_per_microbatch,
                    "compute_s": s.compute_s,
                    "tp_comm_s": s.tp_comm_s,
                    "pp_comm_s": s.pp_comm_s,
                }
                for s in self.stages
            ],  # fmt: skip
            "ranks": [
                {
                    "rank": r.rank,
                    "tp_rank": r.tp_rank,
                    "pp_rank": r.pp_rank,
                    "stage": r.stage,
                    "blocks": list(range(*r.blocks)),
                    "param_bytes": r.param_bytes,
                    "flops_per_step": r.flops,
                    "comm_bytes_per_step": r.comm_bytes,
                    "busy_s": r.busy_s,
                    "shards": self.rank_shards(r.rank),
                }
                for r in self.ranks
            ],  # fmt: skip
            "step": {"time_s": self.step_s, "bubble": self.bubble, "tied_embedding_sync_s": self.tied_sync_s},
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def report(self, width: int = 140) -> str:
        from ...report import render_table

        kind = "training (fwd+bwd)" if self.training else "inference (forward)"
        title = (
            f"{self.model}: tp={self.tp} x pp={self.pp} ({self.world_size} ranks), {self.schedule}, "
            f"{self.microbatches} microbatches, batch {self.batch} x seq {self.seq}, {kind}, "
            f"{self.dtype_bytes}-byte weights/activations, {self.network.name} at {self.efficiency:.0%} of peak"
        )
        rows = []
        mem = self.network.memory_bytes
        state = 16 if self.training else self.dtype_bytes  # mixed-precision Adam: 16 bytes per parameter
        for r in self.ranks:
            need = r.param_bytes / self.dtype_bytes * state
            rows.append([
                str(r.rank), str(r.tp_rank), str(r.pp_rank), f"{r.blocks[0]}-{r.blocks[1] - 1}",
                f"{r.param_bytes / 1e6:,.0f}", f"{r.flops / 1e9:,.0f}", f"{r.comm_bytes / 1e6:,.1f}",
                f"{r.busy_s * 1e3:,.2f}", "yes" if need <= mem else f"no ({need / 1e9:,.0f} GB)",
            ])  # fmt: skip
        head = ["rank", "tp", "pp", "blocks", "params MB", "GFLOPs/step", "comm MB/step", "busy ms", "fits"]
        out = [render_table(title, head, rows, width)]
        srows = [
            [str(s.index), f"{s.blocks[0]}-{s.blocks[1] - 1}", "emb" * s.embeddings + " head" * s.head,
             f"{s.compute_s * 1e3:.3f}", f"{s.tp_comm_s * 1e3:.3f}", f"{s.pp_comm_s * 1e3:.3f}",
             f"{s.time_per_microbatch * 1e3:.3f}"]
            for s in self.stages
        ]  # fmt: skip
        out.append(render_table("per stage, per microbatch (ms)", ["stage", "blocks", "holds", "compute",
                                "tp comm", "pp comm", "total"], srows, width))  # fmt: skip
        total_params = sum(r.param_bytes for r in self.ranks)
        total_flops = sum(r.flops for r in self.ranks)
        total_comm = sum(r.comm_bytes for r in self.ranks)
        useful = total_flops / (self.step_s * self.world_size * self.network.peak_flops) if self.step_s else 0.0
        out.append(
            f"totals: params {total_params / 1e9:,.2f} GB over all ranks, {total_flops / 1e12:,.1f} TFLOPs/step, "
            f"{total_comm / 1e9:,.2f} GB sent/step\n"
            f"predicted step time {self.step_s * 1e3:,.2f} ms; pipeline bubble {self.bubble:.1%}; "
            f"model FLOPs utilisation {useful:.1%}"
            + (f"; tied embedding/head grad sync {self.tied_sync_s * 1e3:.3f} ms" if self.tied_sync_s else "")
            + f"\nfits: parameters{' + gradients + Adam state (16 B/param)' if self.training else ''} within "
            f"{self.network.memory_bytes / 1e9:.0f} GB; activations are not counted"
        )
        if self.notes:
            out.append("notes:\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------------
# Analysis of the captured graph


@dataclass(frozen=True)
class _Part:
    """One unit of cost: per rank FLOPs and bytes as expressions in B, T (already divided by tp where split)."""

    flops: sympy.Expr
    bytes: sympy.Expr


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _try_tensor(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _rows(gm: fx.GraphModule, node: fx.Node) -> sympy.Expr:
    """Vectors of the last dim in `node`'s value (B*T for [B, T, C]), as an expression in B and T."""
    val = tensor_meta(node)
    if val is None:
        return B * T
    subs = size_symbols(gm)
    out: sympy.Expr = sympy.Integer(1)
    for s in val.shape[:-1]:
        out *= sympy.sympify(s.node.expr).subs(subs) if isinstance(s, torch.SymInt) else sympy.Integer(int(s))
    return out


def _head_dims(block: Block) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of a block's attention."""
    att = block.attention
    hq = heads(block)
    width = att.out.in_features
    if hq is None:
        raise SpecError(f"cannot read the number of attention heads of block {block.index} ({block.path})")
    hd = width // hq
    if att.qkv is not None:
        hkv = (att.qkv.out_features // hd - hq) // 2
    else:
        assert att.k is not None
        hkv = att.k.out_features // hd
    return hq, hkv, hd


def _qkv_per_head(lin: Linear, hq: int, hd: int) -> bool:
    """True when a fused qkv's output is laid out per head ([.., heads, 3*hd]: BLOOM, GPT-NeoX) rather than as
    [q | k | v] blocks (GPT-2, Phi-3, Falcon): the first reshape after it has a heads dim before any split."""
    frontier, seen = [lin.output], set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if is_op(user, aten.split, aten.split_with_sizes, aten.chunk, aten.slice, aten.narrow):
                return False
            if is_op(user, aten.view, aten.reshape, aten._unsafe_view):
                val = tensor_meta(user)
                shape = list(val.shape) if val is not None else []
                if len(shape) >= 3 and shape[-2] == hq and shape[-1] != hd:
                    return True
                if len(shape) >= 4 and shape[-3] == hq and shape[-1] == hd:
                    return True
                frontier.append(user)
    return False


def _rename(name: str, template: int, index: int) -> str:
    """A template block's parameter name for block `index` (the first path component equal to the template's)."""
    if template == index:
        return name
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == str(template):
            parts[i] = str(index)
            return ".".join(parts)
    raise SpecError(f"cannot find block index {template} in parameter name {name!r} to scale the depth")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Model:
    """Everything the plan needs from the graph, at full depth (template blocks repeated when `depth` is given)."""

    def __init__(self, gm: fx.GraphModule, depth: int | None, vocab_mode: str) -> None:
        self.gm = gm
        self.anat: Anatomy = anatomy(gm)
        if not self.anat.blocks:
            raise SpecError("no Transformer blocks found in the graph; nothing to parallelise")
        self.costs: list[BlockCost] = block_costs(gm, self.anat)
        captured = len(self.anat.blocks)
        self.depth = depth if depth is not None else captured
        if self.depth < captured:
            raise SpecError(f"depth={self.depth} is smaller than the {captured} blocks in the graph")
        stream = tensor_meta(self.anat.blocks[0].stream_in)
        self.itemsize = stream.dtype.itemsize if stream is not None else 4
        self.hidden = self.anat.blocks[0].attention.out.out_features
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # Every tensor the graph reads (tied weights under each name they are read by), by get_attr target.
        self.params = {t: tuple(_tensor(gm, t).shape) for t in self._used()}
        self.vocab_mode = vocab_mode
        self._find_embeddings()

    def _used(self) -> list[str]:
        found = [str(n.target) for n in self.gm.graph.nodes if n.op == "get_attr" and n.users]
        return [t for t in dict.fromkeys(found) if isinstance(_try_tensor(self.gm, t), torch.Tensor)]

    def template(self, index: int) -> int:
        return min(index, len(self.anat.blocks) - 1)

    def _find_embeddings(self) -> None:
        """The token embedding table (vocab-parallel) and a head producing vocabulary logits (vocab-parallel)."""
        tables = []
        for node in self.anat.embeddings:
            w = node.args[0] if is_op(node, aten.embedding) else None
            if isinstance(w, fx.Node) and w.op == "get_attr":
                tables.append(str(w.target))
        head_out = {lin.out_features for lin in self.anat.head}
        token = [t for t in tables if self.params[t][0] in head_out] or sorted(
            tables, key=lambda t: -self.params[t][0]
        )[:1]
        self.token_table = token[0] if token else None
        self.vocab = self.params[self.token_table][0] if self.token_table else None
        self.vocab_head = [lin for lin in self.anat.head if self.vocab is not None and lin.out_features == self.vocab]
        if self.vocab_mode == "replicated":
            self.token_table, self.vocab_head = None, []

    # -- costs, per rank, as expressions in B and T

    def block_part(self, index: int, tp: int, dtype_bytes: int) -> _Part:
        c = self.costs[self.template(index)]
        split = MATMUL_PARTS | {"attn.softmax", "mlp.act", "bias"}
        flops = sum((v / tp if k in split else v for k, v in c.parts.items()), sympy.Integer(0))
        scale = sympy.Rational(dtype_bytes, self.itemsize)
        return _Part(sympy.expand(flops), sympy.expand(c.bytes * scale / tp))

    def embed_part(self, tp: int, dtype_bytes: int) -> _Part:
        n = len(self.anat.embeddings)
        return _Part(sympy.Integer(0), n * B * T * self.hidden * dtype_bytes)

    def head_part(self, tp: int, dtype_bytes: int) -> _Part:
        flops: sympy.Expr = sympy.Integer(0)
        nbytes: sympy.Expr = sympy.Integer(0)
        if self.anat.final_norm is not None:
            flops += 8 * B * T * self.hidden
            nbytes += 2 * B * T * self.hidden * dtype_bytes
        for lin in self.anat.head:
            div = tp if lin in self.vocab_head else 1
            rows = _rows(self.gm, lin.input)
            flops += 2 * rows * lin.in_features * lin.out_features / div
            nbytes += (lin.in_features * lin.out_features + rows * (lin.in_features + lin.out_features)) * (
                dtype_bytes / div
            )
        return _Part(sympy.expand(flops), sympy.expand(nbytes))

    # -- shards

    def linear_plans(self, index: int, tp: int) -> list[tuple[LinearPlan, Shard, Shard | None]]:
        """(plan, weight shard, bias shard) of every linear of block `index` (names of the real block)."""
        t = self.template(index)
        block = self.anat.blocks[t]
        hq, hkv, hd = _head_dims(block)
        att, mlp = block.attention, block.mlp
        roles: list[tuple[str, Linear, Style, tuple[int, ...]]] = []
        if att.qkv is not None:
            parts = () if _qkv_per_head(att.qkv, hq, hd) else (hq * hd, hkv * hd, hkv * hd)
            roles.append(("attn.qkv", att.qkv, "column", parts))
        for role, lin in (("attn.q", att.q), ("attn.k", att.k), ("attn.v", att.v)):
            if lin is not None:
                roles.append((role, lin, "column", ()))
        roles.append(("attn.out", att.out, "row", ()))
        if mlp is not None:
            h = mlp.fc2.in_features
            fused_gate = mlp.gated and mlp.up is None and mlp.fc1.out_features == 2 * h
            roles.append(("mlp.fc1", mlp.fc1, "column", (h, h) if fused_gate else ()))
            if mlp.up is not None:
                roles.append(("mlp.up", mlp.up, "column", ()))
            roles.append(("mlp.fc2", mlp.fc2, "row", ()))
        out = []
        for role, lin, style, parts in roles:
            out.append(self._linear(index, t, role, lin, style, parts))
        return out

    def _linear(
        self, index: int, t: int, role: str, lin: Linear, style: Style, parts: tuple[int, ...]
    ) -> tuple[LinearPlan, Shard, Shard | None]:
        w, b = _rename(lin.weight, t, index), _rename(lin.bias, t, index) if lin.bias else None
        shape = self.params[lin.weight]
        out_dim = 0 if lin.layout == "out_in" else 1
        dim = out_dim if style == "column" else 1 - out_dim
        ws = Shard(w, shape, style, dim, parts)
        bs = None
        if b is not None:
            bshape = self.params[lin.bias]  # type: ignore[index]
            bs = Shard(b, bshape, style, 0, parts) if style == "column" else Shard(b, bshape, "replicated")
        lp = LinearPlan(index, role, style, w, b, lin.in_features, lin.out_features, lin.layout)
        return lp, ws, bs

    def owner(self, target: str) -> int | str:
        """Where a parameter is used: a (template) block index, "pre" (before the blocks) or "post" (after)."""
        users = [u for n in self.gm.graph.nodes if n.op == "get_attr" and str(n.target) == target for u in n.users]
        if not users:
            return "unused"
        first = min(self.order[u] for u in users)
        spans = [(self.order[b.stream_in], self.order[b.stream_out]) for b in self.anat.blocks]
        if first < spans[0][0] and all(self.order[u] < spans[0][0] for u in users):
            return "pre"
        if first > spans[-1][1]:
            return "post"
        owner = 0
        for i, (lo, _) in enumerate(spans):
            if first >= lo:
                owner = i
        return owner


# --------------------------------------------------------------------------------------------------------------------
# The plan


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SpecError(message)


def make_plan(
    gm: fx.GraphModule,
    *,
    tp: int = 1,
    pp: int = 1,
    microbatches: int = 1,
    schedule: str = "1f1b",
    batch: int,
    seq: int,
    dtype_bytes: int = 2,
    training: bool = False,
    network: str | Network = "h100-nvlink",
    efficiency: float = 0.5,
    vocab: str = "parallel",
    pad_vocab: bool = True,
    depth: int | None = None,
    name: str | None = None,
) -> Plan:
    """Plan tp-way tensor parallelism and a pp-stage pipeline for a captured Transformer (see the module docstring).

    batch, seq: the global batch (one pipeline, no data parallelism) and sequence length of one step; it is split into
    `microbatches`. training: FLOPs and communication of forward and backward (backward = 2 x forward); else forward
    only. efficiency: the fraction of `network.peak_flops` matmuls reach. vocab: "parallel" (token embedding and a
    vocabulary head split by rows) or "replicated". pad_vocab: pad a vocabulary tp does not divide up to a multiple of
    tp (Megatron-LM pads to a multiple of 128 * tp), else raise. depth: the real number of blocks when `gm` holds a
    shallower copy of identical blocks (the last captured block stands for the rest; parameter names are renamed).
    Raises SpecError naming the number that does not divide or fit.
    """
    net = NETWORKS.get(network) if isinstance(network, str) else network
    if net is None:
        raise SpecError(f"unknown network {network!r}; presets: {', '.join(sorted(NETWORKS))}")
    for label, value in (("tp", tp), ("pp", pp), ("microbatches", microbatches), ("batch", batch), ("seq", seq)):
        _check(isinstance(value, int) and value >= 1, f"{label} must be a positive integer, got {value!r}")
    _check(schedule in ("1f1b", "gpipe"), f"schedule must be '1f1b' or 'gpipe', got {schedule!r}")
    _check(vocab in ("parallel", "replicated"), f"vocab must be 'parallel' or 'replicated', got {vocab!r}")
    _check(dtype_bytes in (1, 2, 4, 8), f"dtype_bytes must be 1, 2, 4 or 8, got {dtype_bytes!r}")
    _check(0 < efficiency <= 1, f"efficiency must be in (0, 1], got {efficiency!r}")
    _check(
        batch % microbatches == 0,
        f"microbatches={microbatches} does not divide batch={batch}; pick a divisor of {batch}",
    )
    m = _Model(gm, depth, vocab)
    n = m.depth
    _check(pp <= n, f"pp={pp} is larger than the {n} Transformer blocks; a stage needs at least one block")

    # -- tensor-parallel divisibility
    hq, hkv, hd = _head_dims(m.anat.blocks[0])
    mlp_h = m.anat.blocks[0].mlp.fc2.in_features if m.anat.blocks[0].mlp else 0
    for block in m.anat.blocks:
        bq, bkv, _ = _head_dims(block)
        common = math.gcd(math.gcd(bq, bkv), block.mlp.fc2.in_features if block.mlp else 0)
        valid = ", ".join(map(str, _divisors(common)))
        _check(
            bq % tp == 0,
            f"tp={tp} does not divide the {bq} attention heads of block {block.index} ({block.path or 'block'}): "
            f"tensor parallelism gives each rank whole heads. Valid tp for this model: {valid}. (Megatron-LM "
            f"requires heads % tp == 0 too; running tp={tp} needs a model trained with a different head count, or "
            f"padded dummy heads, which changes the FLOPs and is not planned here.)",
        )
        _check(
            bkv % tp == 0,
            f"tp={tp} does not divide the {bkv} key/value heads of block {block.index} ({block.path or 'block'}) "
            f"(grouped-query attention); valid tp for this model: {valid} (replicating kv heads is not planned)",
        )
        if block.mlp is not None:
            h = block.mlp.fc2.in_features
            _check(
                h % tp == 0,
                f"tp={tp} does not divide the MLP hidden size {h} of block {block.index}; valid tp: {valid}",
            )
    notes: list[str] = []
    vocab_pad: int | None = None
    if m.token_table is not None and tp > 1:
        v = m.vocab
        assert v is not None
        if v % tp:
            _check(
                pad_vocab,
                f"tp={tp} does not divide the vocabulary of {v} tokens (vocab-parallel embedding/head); use "
                f"pad_vocab=True (Megatron-LM pads it) or vocab='replicated'",
            )
            vocab_pad = -(-v // tp) * tp
            notes.append(f"vocabulary {v} padded to {vocab_pad} (a multiple of tp={tp}) for the vocab-parallel split")
    if m.anat.head and not m.vocab_head:
        notes.append("head " + ", ".join(x.weight for x in m.anat.head) + " is not a vocabulary projection: replicated")

    # -- shards and where every parameter lives
    linears: list[LinearPlan] = []
    shards: dict[str, Shard] = {}
    block_of: dict[str, int | str] = {}
    claimed: set[tuple[int, str]] = set()  # (template block, template param name)
    for i in range(n):
        for lp, ws, bs in m.linear_plans(i, tp):
            linears.append(lp)
            for s in (ws, bs):
                if s is not None:
                    shards[s.param] = s
                    block_of[s.param] = i
    for i in range(len(m.anat.blocks)):
        for lin in m.anat.blocks[i].linears:
            claimed.update((i, t) for t in (lin.weight, lin.bias) if t)
    for lin in m.anat.head:
        style: Style = "vocab" if lin in m.vocab_head else "replicated"
        pad = vocab_pad if style == "vocab" else None
        out_dim = 0 if lin.layout == "out_in" else 1
        linears.append(LinearPlan(-1, "head", style, lin.weight, lin.bias, lin.in_features, lin.out_features,
                                  lin.layout))  # fmt: skip
        shards[lin.weight] = Shard(lin.weight, m.params[lin.weight], style, out_dim if style == "vocab" else None,
                                   (), pad)  # fmt: skip
        if lin.bias:
            shards[lin.bias] = Shard(lin.bias, m.params[lin.bias], style, 0 if style == "vocab" else None, (), pad)
    if m.token_table is not None and m.token_table not in shards:
        shards[m.token_table] = Shard(m.token_table, m.params[m.token_table], "vocab", 0, (), vocab_pad)
    # Everything else (norms, position embeddings, q/k norms, buffers read by the graph): replicated where used.
    for target in m.params:
        owner = m.owner(target)
        if owner == "unused":
            continue
        if isinstance(owner, int):
            copies = range(n) if owner == len(m.anat.blocks) - 1 and n > len(m.anat.blocks) else [owner]
            for i in copies:
                if (owner, target) in claimed:
                    continue
                name_i = _rename(target, owner, i) if owner != i else target
                shards.setdefault(name_i, Shard(name_i, m.params[target], "replicated"))
                block_of[name_i] = i
        else:
            shards.setdefault(target, Shard(target, m.params[target], "replicated"))
            block_of[target] = owner
    head_targets = {t for lin in m.anat.head for t in (lin.weight, lin.bias) if t}
    for t in head_targets:
        block_of.setdefault(t, "post")
    if m.token_table is not None:
        block_of[m.token_table] = "pre"

    # -- stages
    mb = batch // microbatches
    blocks = [m.block_part(i, tp, dtype_bytes) for i in range(n)]
    emb, head = m.embed_part(tp, dtype_bytes), m.head_part(tp, dtype_bytes)
    mult = 3 if training else 1

    def compute_s(part: _Part) -> float:
        f = evaluate(part.flops, mb, seq) * mult
        by = evaluate(part.bytes, mb, seq) * mult
        return max(f / (net.peak_flops * efficiency), by / net.hbm_bytes_per_s)

    ranges = _partition([compute_s(p) for p in blocks], compute_s(emb), compute_s(head), pp)
    act = mb * seq * m.hidden * dtype_bytes  # one activation tensor [B_mb, T, C]
    stages: list[Stage] = []
    # Tied embedding/head: with pp > 1 the first and last stages each hold a copy and all-reduce its gradient.
    tied = m.token_table is not None and m.token_table in head_targets
    param_stages: dict[str, tuple[int, ...]] = {}
    for s, (lo, hi) in enumerate(ranges):
        parts = blocks[lo:hi] + ([emb] if s == 0 else []) + ([head] if s == pp - 1 else [])
        flops = sum(evaluate(p.flops, mb, seq) for p in parts) * mult
        comp = sum(compute_s(p) for p in parts)
        n_ar = (hi - lo) * 2 * (2 if training else 1)
        if s == 0 and m.token_table is not None:
            n_ar += 1
        tp_time = n_ar * allreduce_time(act, tp, net)
        tp_bytes = n_ar * _allreduce_sent(act, tp)
        if s == pp - 1 and m.vocab_head:
            if training:
                small = mb * seq * 4
                tp_time += allreduce_time(act, tp, net) + 3 * allreduce_time(small, tp, net)
                tp_bytes += _allreduce_sent(act, tp) + 3 * _allreduce_sent(small, tp)
            else:
                logits = mb * seq * (vocab_pad or m.vocab or 0) * dtype_bytes
                tp_time += allgather_time(logits, tp, net)
                tp_bytes += _allgather_sent(logits, tp)
        sends = (s < pp - 1) + (training and s > 0)
        pp_time = sends * (net.alpha + act * net.beta)
        stages.append(Stage(s, (lo, hi), s == 0, s == pp - 1, comp + tp_time + pp_time, comp, tp_time, pp_time,
                            float(flops), tp_bytes, float(sends * act)))  # fmt: skip
    stage_of_block = {i: s for s, (lo, hi) in enumerate(ranges) for i in range(lo, hi)}
    for target, owner in block_of.items():
        if owner == "pre":
            where: tuple[int, ...] = (0,)
        elif owner == "post":
            where = (pp - 1,)
        else:
            where = (stage_of_block[int(owner)],)
        if tied and target == m.token_table:
            where = tuple(sorted({0, pp - 1}))
        param_stages[target] = where

    bubble = (pp - 1) / (microbatches + pp - 1)
    t_max = max(st.time_per_microbatch for st in stages)
    tied_sync = 0.0
    if tied and training and pp > 1:
        table = shards[m.token_table]  # type: ignore[index]
        tied_sync = allreduce_time(table.local_numel(tp) * dtype_bytes, 2, net)
    step = (microbatches + pp - 1) * t_max + tied_sync
    if microbatches < pp and pp > 1:
        notes.append(f"microbatches={microbatches} < pp={pp}: most of the pipeline idles (bubble {bubble:.0%})")
    if schedule == "gpipe" and pp > 1:
        notes.append(f"gpipe keeps all {microbatches} microbatches' activations alive per stage; 1f1b at most pp")

    ranks = []
    for pr, st in enumerate(stages):
        for tr in range(tp):
            pbytes = sum(shards[t].local_numel(tp) * dtype_bytes for t, where in param_stages.items() if pr in where)
            ranks.append(RankPlan(
                pr * tp + tr, tr, pr, pr, st.blocks, pbytes, st.flops * microbatches,
                (st.tp_bytes + st.pp_bytes) * microbatches + (tied_sync > 0 and pr in (0, pp - 1)) * (
                    shards[m.token_table].local_numel(tp) * dtype_bytes if m.token_table else 0),
                st.time_per_microbatch * microbatches,
            ))  # fmt: skip
    if depth is not None and depth != len(m.anat.blocks):
        notes.append(f"{len(m.anat.blocks)} captured blocks scaled to {depth} identical blocks")
    return Plan(
        model=name or "model", tp=tp, pp=pp, microbatches=microbatches, schedule=schedule, batch=batch,
        seq=seq, dtype_bytes=dtype_bytes, training=training, efficiency=efficiency, network=net, hidden=m.hidden,
        n_blocks=n, heads=hq, kv_heads=hkv, mlp_hidden=mlp_h, vocab=m.vocab, linears=tuple(linears),
        shards=shards, param_stages=param_stages, stages=tuple(stages), ranks=tuple(ranks), step_s=step,
        bubble=bubble, tied_sync_s=tied_sync, notes=tuple(notes),
    )  # fmt: skip
