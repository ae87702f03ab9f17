"""Tensor parallelism as a graph rewrite: one tensor-parallel rank's program, from the captured graph and the plan.

Before (one process, every weight whole):

    h = layer_norm(x); q = linear(h, Wq); ...; a = sdpa(view(q, [B, T, 12, 64]).transpose(1, 2), ...)
    y = x + linear(view(a.transpose(1, 2), [B, T, 768]), Wo, bo)

After, on tp rank r of tp (Megatron-LM, Shoeybi et al. 2019):

    h = copy_to(layer_norm(x)); q = linear(h, Wq[r]); ...; a = sdpa(view(q, [B, T, 12/tp, 64]).transpose(1, 2), ...)
    y = x + add(reduce_from(linear(view(a.transpose(1, 2), [B, T, 768/tp]), Wo[:, r])), bo)

How: every value of the graph carries where it is split (`None`: replicated; `d`: this rank holds a 1/tp slice of dim
`d`), starting from the plan's shards (column-parallel weights split on their output features, row-parallel on their
input features, vocab-parallel tables on the vocabulary) and propagated through the ops by what each op computes, read
from the graph's full shapes (`node.meta["val"]`), never from names:

- a linear/matmul whose contracted dim is split gives partial sums: `reduce_from` (all-reduce) right after it, and its
  bias is added once, after the reduction (row-parallel);
- pointwise ops, views, transposes, splits, softmax over another dim and attention keep the split, and the size
  constants of views, expands and splits along the split dim are divided by tp (12 heads -> 12/tp);
- a replicated operand that meets a split value at full size along the split dim (an attention bias per head) is sliced
  to this rank's part; a replicated float value that enters split work goes through `copy_to`, so that its gradient
  sums the ranks' partial gradients;
- the token embedding looks up only this rank's vocabulary rows and all-reduces; split graph outputs (vocab-parallel
  logits) are all-gathered, padding trimmed;
- any other op that meets a split value gets its inputs all-gathered first (correct, but it costs communication and is
  listed in `TensorParallel.gathers`).

Contract: exact up to floating-point summation order (the all-reduce adds tp partial sums).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from ...errors import SpecError
from ...ir import tensor_meta
from . import collectives
from .plan import Plan, Shard

aten = torch.ops.aten

__all__ = ["TensorParallel", "shard_graph", "shard_tensor"]

_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten, aten.expand)
_KEEP = (aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
         aten.lift_fresh_copy, aten.native_dropout)  # fmt: skip
_SOFTMAX = (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
_REDUCE = (aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std)
_MATMUL = (aten.matmul, aten.mm, aten.bmm)


def shard_tensor(full: torch.Tensor, shard: Shard, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a parameter: the ranges of `shard.dim` it holds, concatenated, zero rows for padding."""
    if shard.dim is None or tp == 1:
        return full
    wants = [p // tp for p in (shard.parts or (shard.pad_to or full.shape[shard.dim],))]
    pieces = []
    for (lo, hi), want in zip(shard.ranges(tp_rank, tp), wants):
        piece = full.narrow(shard.dim, lo, hi - lo)
        if hi - lo < want:
            pad = list(full.shape)
            pad[shard.dim] = want - (hi - lo)
            piece = torch.cat([piece, full.new_zeros(pad)], shard.dim)
        pieces.append(piece)
    return torch.cat(pieces, shard.dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()


@dataclass
class TensorParallel:
    """The rewritten graph of one rank and what the rewrite did."""

    graph: fx.Graph
    env: dict[fx.Node, Any]  # old node -> new node
    reduces: int = 0
    gathers: list[str] = field(default_factory=list)  # ops whose split inputs had to be gathered (with why)


def _expr(x: Any) -> sympy.Expr:
    return sympy.sympify(x.node.expr) if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _prod(xs: Any) -> sympy.Expr:
    out: sympy.Expr = sympy.Integer(1)
    for x in xs:
        out = out * _expr(x)
    return out


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


class _Rewrite:
    def __init__(self, gm: fx.GraphModule, plan: Plan, tp_rank: int, key: str) -> None:
        self.gm, self.tp, self.r, self.key = gm, plan.tp, tp_rank, key
        self.shards = plan.shards
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.sd: dict[fx.Node, Any] = {}  # old node -> split dim, None, or a list of them for tuple values
        self.copied: dict[fx.Node, fx.Node] = {}
        self.local: dict[tuple[fx.Node, int], fx.Node] = {}
        self.result = TensorParallel(self.g, self.env)

    # -- helpers on the new graph

    def call(self, target: Any, *args: Any, like: fx.Node | None = None, **kwargs: Any) -> fx.Node:
        node = self.g.call_function(target, args, kwargs)
        if like is not None:
            node.meta = dict(like.meta)
        return node

    def new(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda x: self.env[x])

    def copy(self, n: fx.Node, args: Any = None, kwargs: Any = None) -> fx.Node:
        args = self.new(n.args) if args is None else args
        kwargs = self.new(n.kwargs) if kwargs is None else kwargs
        return self.call(n.target, *args, like=n, **kwargs)

    def enter(self, old: fx.Node) -> fx.Node:
        """A replicated value entering split work: through copy_to if it is a float tensor (backward all-reduce)."""
        val = tensor_meta(old)
        if val is None or not val.dtype.is_floating_point:
            return self.env[old]
        if old not in self.copied:
            self.copied[old] = self.call(collectives.copy_to, self.env[old], self.key, like=old)
        return self.copied[old]

    def localize(self, old: fx.Node, dim: int) -> fx.Node:
        """This rank's slice of a replicated value along `dim` (its full size splits like the value it meets)."""
        val = tensor_meta(old)
        assert val is not None
        size = val.shape[dim]
        if not isinstance(size, int) or size % self.tp:
            raise SpecError(f"cannot split {old.name} (size {size} along dim {dim}) over tp={self.tp}")
        if (old, dim) not in self.local:
            step = size // self.tp
            self.local[(old, dim)] = self.call(aten.narrow.default, self.enter(old), dim, self.r * step, step)
        return self.local[(old, dim)]

    def gather(self, old: fx.Node, dim: int) -> fx.Node:
        val = tensor_meta(old)
        assert val is not None
        return self.call(collectives.gather_from, self.env[old], dim, val.shape[dim], self.key, like=old)

    def reduce(self, node: fx.Node, like: fx.Node) -> fx.Node:
        self.result.reduces += 1
        return self.call(collectives.reduce_from, node, self.key, like=like)

    # -- the walk

    def run(self) -> TensorParallel:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder" or (n.op == "get_attr" and n.target not in self.shards):
                self.env[n], self.sd[n] = self.g.node_copy(n, self.new), None
            elif n.op == "get_attr":
                s = self.shards[n.target]
                self.env[n], self.sd[n] = self.g.node_copy(n, self.new), (s.dim if s.style != "replicated" else None)
            elif n.op == "output":
                self.env[n] = self.g.output(fx.node.map_arg(n.args[0], self.out), type_expr=n.type)
            elif n.op == "call_function":
                self.env[n], self.sd[n] = self.visit(n)
            elif not any(self.sd.get(x) is not None for x in self.inputs(n)):
                self.env[n], self.sd[n] = self.g.node_copy(n, self.new), None  # export's input guards
            else:
                raise SpecError(f"tensor parallelism: cannot split the inputs of {n.op} node {n.name}")
        return self.result

    def out(self, old: fx.Node) -> fx.Node:
        d = self.sd.get(old)
        return self.gather(old, d) if isinstance(d, int) else self.env[old]

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), found.append)
        return found

    def visit(self, n: fx.Node) -> tuple[fx.Node, Any]:
        split = [x for x in self.inputs(n) if self.sd.get(x) is not None]
        if n.target is operator.getitem and isinstance(self.sd.get(n.args[0]), list):
            return self.copy(n), self.sd[n.args[0]][n.args[1]]
        if not split:
            return self.copy(n), None
        if n.target is aten.sym_size.int:
            node = self.copy(n)
            return (self.call(operator.mul, node, self.tp) if n.args[1] == self.sd[n.args[0]] else node), None
        packet = getattr(n.target, "overloadpacket", None)
        rule = _RULES.get(packet) if packet is not None else None
        if rule is None and isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags:
            rule = _Rewrite.pointwise
        if rule is not None:
            done = rule(self, n)
            if done is not None:
                return done
        return self.fallback(n, "no tensor-parallel rule for this op" if rule is None else "split along an op's dim")

    def fallback(self, n: fx.Node, why: str) -> tuple[fx.Node, Any]:
        self.result.gathers.append(f"{n.name} ({n.target}): {why}")
        args = fx.node.map_arg(n.args, lambda x: self.out(x))
        kwargs = fx.node.map_arg(n.kwargs, lambda x: self.out(x))
        return self.copy(n, args, kwargs), None

    # -- rules: each returns (new node, split dim of the result) or None to fall back

    def keep(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        return self.copy(n), self.sd[n.args[0]]

    def pointwise(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        val = tensor_meta(n)
        if val is None:
            return None
        rank = val.dim()
        dims = {self.sd[x] + rank - tensor_meta(x).dim() for x in self.inputs(n) if self.sd.get(x) is not None}
        if len(dims) != 1:
            return None
        k = dims.pop()
        return self.copy(n, self.mixed(n.args, k, rank), self.mixed(n.kwargs, k, rank)), k

    def mixed(self, args: Any, k: int, rank: int) -> Any:
        """New args for an op splitting output dim `k`: replicated tensors sliced when full along it, else entered."""

        def one(x: fx.Node) -> fx.Node:
            if self.sd.get(x) is not None:
                return self.env[x]
            val = tensor_meta(x)
            if val is None:
                return self.env[x]
            kk = k - (rank - val.dim())
            if kk >= 0 and val.shape[kk] != 1:
                return self.localize(x, kk)
            return self.enter(x)

        return fx.node.map_arg(args, one)

    def view(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        src, d = n.args[0], self.sd[n.args[0]]
        vin, vout = tensor_meta(src), tensor_meta(n)
        if vin is None or vout is None or not isinstance(d, int):
            return None
        if n.target.overloadpacket is aten.expand:
            j = d + vout.dim() - vin.dim()
        else:
            pre = _prod(vin.shape[:d])
            j = next((i for i in range(vout.dim()) if vout.shape[i] != 1 and _same(_prod(vout.shape[:i]), pre)), None)
            if j is None or not _same(_expr(vout.shape[j]) % self.tp, 0):
                return None
        args = list(self.new(n.args))
        packet = n.target.overloadpacket
        if packet in (aten.view, aten.reshape, aten._unsafe_view, aten.expand):
            args[1] = self.divide(list(args[1]), j)
        elif packet is aten.unflatten:
            dim = args[1] % vin.dim()
            if dim <= j < dim + len(args[2]):
                args[2] = self.divide(list(args[2]), j - dim)
        return self.copy(n, tuple(args)), j

    def divide(self, sizes: list[Any], j: int) -> list[Any]:
        s = sizes[j]
        if isinstance(s, int):
            if s != -1:
                if s % self.tp:
                    raise SpecError(f"tp={self.tp} does not divide the size {s} of a view along the split dim")
                sizes[j] = s // self.tp
        else:
            sizes[j] = self.call(operator.floordiv, s, self.tp)
        return sizes

    def permute(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, rank = self.sd[n.args[0]], tensor_meta(n.args[0]).dim()
        packet = n.target.overloadpacket
        if packet is aten.permute:
            order = [x % rank for x in n.args[1]]
            j = order.index(d)
        elif packet is aten.t:
            j = 1 - d if rank == 2 else d
        else:
            a, b = n.args[1] % rank, n.args[2] % rank
            j = b if d == a else a if d == b else d
        return self.copy(n), j

    def unsqueeze(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d = self.sd[n.args[0]]
        at = n.args[1] % (tensor_meta(n.args[0]).dim() + 1)
        return self.copy(n), d + (at <= d)

    def squeeze(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, vin = self.sd[n.args[0]], tensor_meta(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else list(range(vin.dim()))
        dims = [x % vin.dim() for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
        gone = [x for x in dims if vin.shape[x] == 1]
        if d in gone:
            return None
        return self.copy(n), d - sum(x < d for x in gone)

    def split(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, vin = self.sd[n.args[0]], tensor_meta(n.args[0])
        packet = n.target.overloadpacket
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % vin.dim()
        val = n.meta.get("val")
        count = len(val) if isinstance(val, (list, tuple)) else 0
        if dim != d or packet is aten.chunk:
            return self.copy(n), [d] * count
        args = list(self.new(n.args))
        sizes = args[1]
        if isinstance(sizes, int):
            args[1] = self.divide([sizes], 0)[0]
        else:
            args[1] = [self.divide([size], 0)[0] for size in sizes]
        return self.copy(n, tuple(args)), [d] * count

    def unbind(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, vin = self.sd[n.args[0]], tensor_meta(n.args[0])
        dim = (n.args[1] if len(n.args) > 1 else 0) % vin.dim()
        if dim == d:
            return None
        return self.copy(n), [d - (dim < d)] * len(n.meta.get("val", ()))

    def slice(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, vin = self.sd[n.args[0]], tensor_meta(n.args[0])
        dim = (n.args[1] if len(n.args) > 1 else 0) % vin.dim()
        if n.target.overloadpacket is aten.select:
            return (self.copy(n), d - (dim < d)) if dim != d else None
        start = n.args[2] if len(n.args) > 2 else 0
        end = n.args[3] if len(n.args) > 3 else None
        whole = start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))
        if dim != d or whole:
            return self.copy(n), d
        return None

    def cat(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        val = tensor_meta(n)
        dim = (n.args[1] if len(n.args) > 1 else 0) % val.dim()
        dims = {self.sd[x] for x in n.args[0] if self.sd.get(x) is not None}
        if len(dims) != 1 or dim in dims:
            return None
        k = dims.pop()
        return self.copy(n, (self.mixed(n.args[0], k, val.dim()), *self.new(n.args[1:]))), k

    def softmax(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d = self.sd[n.args[0]]
        return (self.copy(n), d) if n.args[1] % tensor_meta(n.args[0]).dim() != d else None

    def reduction(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        d, vin = self.sd[n.args[0]], tensor_meta(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else None
        if not dims:
            return None
        dims = [x % vin.dim() for x in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if d in dims:
            return None
        return self.copy(n), d if keep else d - sum(x < d for x in dims)

    def attention(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        q, k, v = n.args[:3]
        dims = {self.sd.get(x) for x in (q, k, v)}
        rank = tensor_meta(q).dim()
        if len(dims) != 1 or None in dims or dims == {rank - 1} or dims == {rank - 2}:
            return None
        d = dims.pop()
        return self.copy(n, self.mixed(n.args, d, rank), self.mixed(n.kwargs, d, rank)), d

    def linear(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        x, w = n.args[:2]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        rank = tensor_meta(x).dim()
        dx, dw = self.sd.get(x), self.sd.get(w)
        if dw == 0 and dx is None:  # column-parallel (or vocab-parallel head)
            return self.copy(n, (self.enter(x), *self.new(n.args[1:])), self.new(n.kwargs)), rank - 1
        if dw == 1 and dx == rank - 1 and (b is None or self.sd.get(b) is None):  # row-parallel
            y = self.reduce(self.call(aten.linear.default, self.env[x], self.env[w], like=n), n)
            return (self.call(aten.add.Tensor, y, self.env[b], like=n) if b is not None else y), None
        return None

    def addmm(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        b, x, w = n.args[:3]
        dx, dw = self.sd.get(x), self.sd.get(w)
        if dw == 1 and dx is None:
            return self.copy(n, (self.env[b], self.enter(x), *self.new(n.args[2:])), self.new(n.kwargs)), 1
        if dw == 0 and dx == 1 and self.sd.get(b) is None and not n.kwargs and len(n.args) == 3:
            y = self.reduce(self.call(aten.mm.default, self.env[x], self.env[w], like=n), n)
            return self.call(aten.add.Tensor, y, self.env[b], like=n), None
        return None

    def matmul(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        a, b = n.args[:2]
        va, vb, vo = tensor_meta(a), tensor_meta(b), tensor_meta(n)
        if va.dim() < 2 or vb.dim() < 2:
            return None
        da, db = self.sd.get(a), self.sd.get(b)
        na = None if da is None else da - va.dim()
        nb = None if db is None else db - vb.dim()
        if na == -1 and nb == -2:
            return self.reduce(self.copy(n), n), None
        if na == -1 or nb == -2:
            return None
        if nb == -1 and na is None:
            return self.copy(n, (self.enter(a), self.env[b])), vo.dim() - 1
        if na == -2 and nb is None:
            return self.copy(n, (self.env[a], self.enter(b))), vo.dim() - 2
        ks = {x + vo.dim() for x in (na, nb) if x is not None}
        if len(ks) != 1:
            return None
        k = ks.pop()
        return self.copy(n, self.mixed(n.args, k, vo.dim())), k

    def embedding(self, n: fx.Node) -> tuple[fx.Node, Any] | None:
        w, ids = n.args[:2]
        if self.sd.get(w) != 0 or w.op != "get_attr" or self.sd.get(ids) is not None:
            return None
        start = self.shards[w.target].ranges(self.r, self.tp)[0][0]
        rest = self.new(n.args[2:])
        node = self.call(collectives.vocab_embedding, self.env[w], self.env[ids], start, self.key, *rest, like=n)
        self.result.reduces += 1
        return node, None


_RULES: dict[Any, Any] = {
    **{p: _Rewrite.keep for p in _KEEP},
    **{p: _Rewrite.view for p in _VIEWS},
    **{p: _Rewrite.softmax for p in _SOFTMAX},
    **{p: _Rewrite.reduction for p in _REDUCE},
    **{p: _Rewrite.matmul for p in _MATMUL},
    aten.permute: _Rewrite.permute,
    aten.transpose: _Rewrite.permute,
    aten.t: _Rewrite.permute,
    aten.unsqueeze: _Rewrite.unsqueeze,
    aten.squeeze: _Rewrite.squeeze,
    aten.split: _Rewrite.split,
    aten.split_with_sizes: _Rewrite.split,
    aten.chunk: _Rewrite.split,
    aten.unbind: _Rewrite.unbind,
    aten.slice: _Rewrite.slice,
    aten.select: _Rewrite.slice,
    aten.cat: _Rewrite.cat,
    aten.scaled_dot_product_attention: _Rewrite.attention,
    aten.linear: _Rewrite.linear,
    aten.addmm: _Rewrite.addmm,
    aten.embedding: _Rewrite.embedding,
}


def shard_graph(gm: fx.GraphModule, plan: Plan, tp_rank: int, group: Any = None) -> TensorParallel:
    """The graph of tensor-parallel rank `tp_rank` (collectives over `group`; None: the default group)."""
    if not 0 <= tp_rank < plan.tp:
        raise SpecError(f"tp_rank {tp_rank} is outside [0, {plan.tp})")
    return _Rewrite(gm, plan, tp_rank, collectives.register_group(group)).run()
