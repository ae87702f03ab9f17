"""A FLOPs/bytes cost model per Transformer block, as sympy expressions in batch `B` and sequence length `T`.

    costs = block_costs(gm, txc.anatomy(gm))
    costs[0].flops                       # 3538944*B*T + 1536*B*T**2 + ...
    evaluate(costs[0].flops, 8, 128)     # at batch 8, 128 tokens
    total(costs).bytes                   # the whole stack

Sizes come from the graph's own (symbolic) shapes, with capture's batch and sequence symbols renamed `B` and `T`, so
a pass that changes the token count (token merging) changes the expressions of the blocks after it. Models whose
token count is fixed (vision) have no sequence symbol; there `T` names the token count the first block sees.

What is counted: matmuls as 2 FLOPs per multiply-add (linears, q @ k^T and probs @ v; causal masks are not
discounted, dense kernels compute the whole square), elementwise work as a small constant per element (below), and
bytes as every weight read once plus each op's activations read and written once (no cache reuse across ops).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from .anatomy import Anatomy, Block
from .capture import capture_info
from .ir import tensor_meta
from .linears import Linear

__all__ = [
    "B", "T", "BlockCost", "MATMUL_PARTS", "block_costs", "total", "evaluate", "example_shape", "heads", "size_symbols",
    "token_summary",
]  # fmt: skip

B, T = sympy.symbols("B T", positive=True, integer=True)

# FLOPs per element of the elementwise work around the matmuls (order-of-magnitude constants, not measurements):
# softmax = max, subtract, exp, sum, divide; layernorm = mean, variance, normalise, scale, shift.
_SOFTMAX = 5
_NORM = {"layernorm": 8, "rmsnorm": 5}
_ACTIVATION = {"relu": 1, "silu": 4, "sigmoid": 4, "gelu": 8, "gelu_tanh": 8}
_UNKNOWN_ACTIVATION = 4

# Parts that are matrix products; the rest is elementwise.
MATMUL_PARTS = frozenset(("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out", "attn.scores", "attn.context",
                          "mlp.fc1", "mlp.up", "mlp.fc2"))  # fmt: skip


@dataclass(frozen=True)
class BlockCost:
    """The cost of one block (index -1 for a `total`): FLOPs and bytes moved, split into named parts."""

    index: int
    flops: sympy.Expr
    bytes: sympy.Expr
    params: int
    parts: dict[str, sympy.Expr] = field(default_factory=dict)  # FLOPs per part: "attn.q", "attn.scores", "norm", ...
    tokens: sympy.Expr = T  # tokens entering the block (fewer after token merging or pruning upstream)

    @property
    def matmul_flops(self) -> sympy.Expr:
        return sympy.expand(sum((v for k, v in self.parts.items() if k in MATMUL_PARTS), sympy.Integer(0)))


def size_symbols(gm: fx.GraphModule) -> dict[sympy.Symbol, sympy.Symbol]:
    """Capture's symbols for the batch and sequence dims ({s72: B, s53: T}), read off the graph's inputs."""
    found: dict[sympy.Symbol, sympy.Symbol] = {}
    for node in gm.graph.nodes:
        val = tensor_meta(node) if node.op == "placeholder" else None
        if val is None:
            continue
        # Capture declares dim 0 of every input and dim 1 of token-like inputs dynamic; those are B and T.
        for dim, symbol in ((0, B), (1, T)):
            if dim < val.dim() and isinstance(val.shape[dim], torch.SymInt):
                expr = val.shape[dim].node.expr
                if isinstance(expr, sympy.Symbol):
                    found.setdefault(expr, symbol)
    return found


def _merge_count(node: fx.Node, tokens: sympy.Expr) -> sympy.Expr:
    from .ops.token_merge import merged_count

    _, _, r, protected = node.args
    if tokens.is_Integer:
        return sympy.Integer(merged_count(int(tokens), r, protected))
    return sympy.Integer(r) if r > 0 else sympy.Integer(0)  # the guard export put on T: T >= min_tokens(r, protected)


def _pruned_count(node: fx.Node, tokens: sympy.Expr) -> sympy.Expr:
    from .ops.token_prune import keep_ratio, pruned_length

    _, _, keep, protected, fuse = node.args
    if tokens.is_Integer:
        return sympy.Integer(pruned_length(int(tokens), keep, protected, fuse))
    num, den = keep_ratio(keep)  # the guard export put on T: T > protected
    return protected + sympy.ceiling(sympy.Rational(num, den) * (tokens - protected)) + int(fuse)


# Ops that plan a token reduction: how many tokens a block keeps, as an expression of how many enter it.
_REDUCERS = {
    "txc.bipartite_match.default": lambda node, t: t - _merge_count(node, t),
    "txc.prune_plan.default": _pruned_count,
}


class _Sizes:
    """Turns the graph's sizes (ints or SymInts) into expressions in B and T."""

    def __init__(self, gm: fx.GraphModule, anat: Anatomy) -> None:
        self.subs = size_symbols(gm)
        self.static_batch: int | None = None
        self.static_tokens: int | None = None
        self.derived: dict[int, sympy.Expr] = {}  # static token counts after a reduction -> expressions in T
        stream = tensor_meta(anat.blocks[0].stream_in) if anat.blocks else None
        if stream is not None and stream.dim() == 3:
            b, t = self.expr(stream.shape[0]), self.expr(stream.shape[1])
            self.static_batch = int(b) if b.is_Integer else None
            self.static_tokens = int(t) if t.is_Integer else None
        if self.static_tokens is not None:
            self._follow_reductions(gm)

    def _follow_reductions(self, gm: fx.GraphModule) -> None:
        """A static token count (vision) that a reduction produced stands for the expression in T the reduction's
        options give (197 tokens, r=16: 181 is T - 16), so costs stay expressions of the input length and options."""
        exprs: dict[int, sympy.Expr] = {self.static_tokens: T}  # type: ignore[dict-item]
        for node in gm.graph.nodes:
            rule = _REDUCERS.get(str(node.target)) if node.op == "call_function" else None
            valid = tensor_meta(node.args[1]) if rule is not None else None
            if valid is None or valid.dim() != 2 or not isinstance(valid.shape[1], int):
                continue
            before = int(valid.shape[1])
            out = rule(node, exprs.get(before, sympy.Integer(before)))  # type: ignore[misc]
            after = int(out.subs(T, self.static_tokens))  # type: ignore[arg-type]
            if after != self.static_tokens:
                exprs.setdefault(after, sympy.expand(out))
        self.derived = {n: e for n, e in exprs.items() if n != self.static_tokens}

    def expr(self, size: int | torch.SymInt) -> sympy.Expr:
        if isinstance(size, torch.SymInt):
            return sympy.sympify(size.node.expr).subs(self.subs)
        return sympy.Integer(int(size))

    def _at(self, size: int | torch.SymInt, symbol: sympy.Symbol, static: int | None) -> sympy.Expr:
        expr = self.expr(size)
        if expr.free_symbols - {B, T}:
            return symbol  # a size capture did not name (a derived symbol): assume the plain dim it stands in for
        if static is not None and expr.is_Integer and int(expr) == static:
            return symbol
        if symbol is T and expr.is_Integer and int(expr) in self.derived:
            return self.derived[int(expr)]
        return expr

    def batch(self, size: int | torch.SymInt) -> sympy.Expr:
        return self._at(size, B, self.static_batch)

    def tokens(self, size: int | torch.SymInt) -> sympy.Expr:
        return self._at(size, T, self.static_tokens)

    def rows(self, node: fx.Node) -> sympy.Expr:
        """How many vectors of the last dim `node` holds: B*T for [B, T, D] and for a flattened [B*T, D]."""
        val = tensor_meta(node)
        if val is None or val.dim() < 2:
            return B * T
        if val.dim() == 2:
            flat = self.expr(val.shape[0])
            if self.static_batch and self.static_tokens and flat == self.static_batch * self.static_tokens:
                return B * T
            return flat
        return self.numel(node, drop_last=True)  # type: ignore[return-value]

    def numel(self, node: fx.Node, *, drop_last: bool = False) -> sympy.Expr | None:
        """Elements of a [batch, ...] value (without its last dim when `drop_last`); None if its shape is unknown."""
        val = tensor_meta(node)
        if val is None or val.dim() < 2:
            return None
        out = self.batch(val.shape[0])
        # Past the batch dim, a size equal to a static token count is taken to be that token count.
        for size in val.shape[1 : -1 if drop_last else None]:
            out *= self.tokens(size)
        return out


def heads(block: Block) -> int | None:
    """Attention heads, read from the core's query shape [batch, heads, tokens, head_dim]; None if not 4-D."""
    query = block.attention.core.args[0] if block.attention.kind == "sdpa" else block.attention.scores
    val = tensor_meta(query)
    if val is None or val.dim() != 4 or not isinstance(val.shape[1], int):
        return None
    return int(val.shape[1])


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _roles(block: Block) -> Iterable[tuple[str, Linear]]:
    att = block.attention
    for role, lin in (("attn.qkv", att.qkv), ("attn.q", att.q), ("attn.k", att.k), ("attn.v", att.v)):
        if lin is not None:
            yield role, lin
    yield "attn.out", att.out
    if block.mlp is not None:
        for role, lin in (("mlp.fc1", block.mlp.fc1), ("mlp.up", block.mlp.up), ("mlp.fc2", block.mlp.fc2)):
            if lin is not None:
                yield role, lin


def _attention(block: Block, sizes: _Sizes) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr]:
    """(scores FLOPs, context FLOPs, score elements, q/k/v/context elements) of one attention core."""
    att = block.attention
    if att.kind == "sdpa":
        q, k, v = att.core.args[:3]
        kv, vv = tensor_meta(k), tensor_meta(v)
        queries = sizes.numel(q, drop_last=True)  # type: ignore[arg-type]
        io = [sizes.numel(n) for n in (q, k, v, att.core)]  # type: ignore[arg-type]
        if kv is not None and vv is not None and queries is not None and None not in io:
            d, dv = sizes.expr(kv.shape[-1]), sizes.expr(vv.shape[-1])
            scores = queries * sizes.tokens(kv.shape[-2])
            return 2 * scores * d, 2 * scores * dv, scores, sum(io, sympy.Integer(0))  # type: ignore[arg-type]
    elif att.scores is not None:
        scores, q, v = sizes.numel(att.scores), tensor_meta(att.scores.args[-2]), tensor_meta(att.context.args[1])
        if scores is not None and q is not None and v is not None:
            d, dv = sizes.expr(q.shape[-1]), sizes.expr(v.shape[-1])
            io = sum((sizes.numel(n) or 0 for n in (*att.scores.args[-2:], att.context.args[1], att.context)), 0)
            # Eager attention also writes the scores, and softmax reads and writes them before probs @ v reads them.
            return 2 * scores * d, 2 * scores * dv, scores, io + 3 * scores
    # No shapes to read: the context's width is heads * head_dim, which is all the matmul FLOPs need. The score
    # element count needs the heads alone; B*T*T (one head) is then a lower bound for softmax's share.
    width = att.out.in_features
    return 2 * B * T * T * width, 2 * B * T * T * width, B * T * T, 4 * B * T * width


def _block_cost(gm: fx.GraphModule, anat: Anatomy, block: Block, sizes: _Sizes) -> BlockCost:
    parts: dict[str, sympy.Expr] = {}
    stream = tensor_meta(block.stream_in)
    itemsize = stream.dtype.itemsize if stream is not None else 4  # of activations; weights use their own dtypes
    moved = sympy.Integer(0)  # activation elements read and written

    def add(name: str, flops: sympy.Expr) -> None:
        parts[name] = parts.get(name, sympy.Integer(0)) + flops

    for role, lin in _roles(block):
        rows = sizes.rows(lin.input)
        add(role, 2 * rows * lin.in_features * lin.out_features)
        if lin.bias is not None:
            add("bias", rows * lin.out_features)
        moved += rows * (lin.in_features + lin.out_features)
    scores_flops, context_flops, scores, attn_io = _attention(block, sizes)
    add("attn.scores", scores_flops)
    add("attn.context", context_flops)
    add("attn.softmax", _SOFTMAX * scores)
    moved += attn_io
    width, rows = block.attention.out.out_features, sizes.rows(block.stream_in)
    for norm in block.norms:
        add("norm", _NORM.get(norm.kind, 8) * rows * width)
        moved += 2 * rows * width
    if block.mlp is not None:
        hidden, mlp_rows = block.mlp.fc2.in_features, sizes.rows(block.mlp.fc2.input)
        per = _ACTIVATION.get(block.mlp.activation, _UNKNOWN_ACTIVATION) + (1 if block.mlp.gated else 0)
        add("mlp.act", per * mlp_rows * hidden)
        moved += (3 if block.mlp.gated else 2) * mlp_rows * hidden  # a gated MLP reads gate and up
    residuals = sum(r is not None for r in (block.attn_residual, block.mlp_residual))
    add("residual", residuals * rows * width)
    moved += 3 * residuals * rows * width
    # Weights are read once per forward; a tensor two sites share (tied weights) counts once.
    targets = {t for x in (*block.linears, *block.norms) for t in (x.weight, x.bias) if t is not None}
    tensors = [_tensor(gm, name) for name in targets]
    weights = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    parts = {k: sympy.expand(v) for k, v in parts.items()}
    flops = sympy.expand(sum(parts.values(), sympy.Integer(0)))
    tokens = sizes.tokens(stream.shape[1]) if stream is not None and stream.dim() == 3 else T
    params = anat.block_params(gm, block)
    return BlockCost(block.index, flops, sympy.expand(moved * itemsize + weights), params, parts, sympy.expand(tokens))


def block_costs(gm: fx.GraphModule, anat: Anatomy) -> list[BlockCost]:
    """One `BlockCost` per block of `anat`, in block order."""
    sizes = _Sizes(gm, anat)
    return [_block_cost(gm, anat, block, sizes) for block in anat.blocks]


def total(costs: Sequence[BlockCost]) -> BlockCost:
    """The sum of several blocks' costs (index -1)."""
    parts: dict[str, sympy.Expr] = {}
    for c in costs:
        for name, value in c.parts.items():
            parts[name] = sympy.expand(parts.get(name, sympy.Integer(0)) + value)
    flops = sympy.expand(sum((c.flops for c in costs), sympy.Integer(0)))
    nbytes = sympy.expand(sum((c.bytes for c in costs), sympy.Integer(0)))
    return BlockCost(-1, flops, nbytes, sum(c.params for c in costs), parts)


def evaluate(expr: sympy.Expr | int, batch: int, seq: int) -> int:
    """The value of a cost expression at a concrete batch size and sequence length."""
    value = sympy.sympify(expr).subs({B: batch, T: seq})
    if value.free_symbols:
        names = sorted(map(str, value.free_symbols))
        raise ValueError(f"cost expression {expr} has symbols other than B and T: {names}")
    return int(round(value))


def example_shape(gm: fx.GraphModule, anat: Anatomy | None = None) -> tuple[int, int]:
    """(batch, seq) of the inputs the graph was captured with; for vision models seq is the blocks' token count."""
    batch: int | None = None
    seq: int | None = None
    info = capture_info(gm)
    for spec in info.inputs if info is not None else ():
        if batch is None and 0 in spec.dynamic and spec.shape:
            batch = spec.shape[0]
        if seq is None and 1 in spec.dynamic and len(spec.shape) > 1:
            seq = spec.shape[1]
    if batch is None or seq is None:
        # No capture record, or no token-like input: read the example sizes off the first block's input.
        from .anatomy import anatomy

        anat = anat if anat is not None else anatomy(gm)
        stream = tensor_meta(anat.blocks[0].stream_in) if anat.blocks else None
        if stream is not None and stream.dim() == 3:
            batch = batch if batch is not None else _hint(stream.shape[0])
            seq = seq if seq is not None else _hint(stream.shape[1])
    return batch or 1, seq or 1


def _hint(size: int | torch.SymInt) -> int | None:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else None
    return int(size)


def token_summary(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, Any] | None:
    """Tokens entering each block of `after` and the blocks' FLOPs before and after a token-reducing rewrite, as
    expressions and at the captured shape (JSON-ready strings and ints); None if `after` has no blocks. A reduction in
    the last block leaves every block's input count alone but still removes FLOPs (its MLP's)."""
    from .anatomy import anatomy

    anat = anatomy(after)
    costs = block_costs(after, anat)
    if not costs:
        return None
    old = total(block_costs(before, anatomy(before))).flops
    new = total(costs).flops
    batch, seq = example_shape(before)
    return {
        "per_block": [str(c.tokens) for c in costs],
        "per_block_at": [evaluate(c.tokens, batch, seq) for c in costs],
        "at": [batch, seq],
        "flops_before": str(old),
        "flops_after": str(new),
        "flops_before_at": evaluate(old, batch, seq),
        "flops_after_at": evaluate(new, batch, seq),
    }
