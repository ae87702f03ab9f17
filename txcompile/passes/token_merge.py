"""token_merge: ToMe bipartite soft matching between attention and MLP of every selected block.

Before (one block):                              After:
    h = x + attn(norm(x), mask)                      h = x + attn(norm(x), bias(size, valid))   # proportional attn
                                                     plan = txc.bipartite_match(mean_heads(k), valid, r, protected)
                                                     h, size, valid, source = txc.merge_tokens(h, size, valid, ...)
    y = h + mlp(norm(h))                             y = h + mlp(norm(h))                       # on T - r tokens
    ...                                              ...
    out = final(y_last)                              out = final(unmerge(y_last, source))       # unmerge=true

Each selected block removes r tokens: its tokens are split alternately into sets A and B, each A token finds its most
similar B token (cosine of the attention keys averaged over heads), and the r most similar pairs are merged by a
size-weighted average. Token sizes (how many input tokens a token stands for) are carried along, and every later
attention adds log(size) to its logits as an SDPA mask (proportional attention), so fused attention stays usable.
Protected tokens (CLS, DeiT's distillation token; detected, or `protected=N`) never merge. With a padding mask (text
models), padding never merges with real tokens and the mask follows the merges. `unmerge=true` gives every input token
the value of the token it ended in, so per-token outputs (last_hidden_state, mean pooling) keep their shape.

Options: `r` tokens per block, `schedule` constant or decreasing (2r at the first block down to 0 at the last, the
same total), `flops` (a target fraction of the token-layer FLOPs to remove at the captured length: picks r), `blocks`
("all", "3:", "0,2,4"), `protected`, `unmerge`, `min_cosine` (the budget verification holds the output to).

Contract: approximate (identity at r=0). Metric: cosine similarity of the outputs to the original's >= min_cosine.
Paper: Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023); proportional attention from the same paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..anatomy import Anatomy, Block, anatomy
from ..cost import example_shape
from ..ir import is_op, tensor_meta
from ..ops.token_merge import init_token_state, merged_count, size_bias, token_merge_step
from ..pipeline import PassContext, PassResult
from ..qk import locate_qk
from ..verify import node_values

aten = torch.ops.aten


class _Decline(Exception):
    """The graph does not meet the pass's preconditions; the message is the note."""


def parse_blocks(spec: str, depth: int) -> list[int]:
    """"all", "3:" (from block 3), ":4" (before block 4), "0,2,5" -> block indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(depth))
    if ":" in spec:
        lo, _, hi = spec.partition(":")
        return list(range(depth))[slice(int(lo) if lo else None, int(hi) if hi else None)]
    picked = sorted({int(p) for p in spec.split(",") if p.strip()})
    bad = [i for i in picked if not 0 <= i < depth]
    if bad:
        raise _Decline(f"blocks={spec!r} names blocks {bad}, but the model has blocks 0..{depth - 1}")
    return picked


def schedule(r: int, kind: str, count: int) -> list[int]:
    """Tokens removed by each of `count` selected blocks: constant r, or decreasing from 2r to 0 (the same total)."""
    if kind == "constant" or count <= 1:
        return [r] * count
    return [round(2 * r * (count - 1 - i) / (count - 1)) for i in range(count)]


def _merge_point(block: Block) -> fx.Node:
    """Where the merge goes: after attention's residual add (pre-LN), or after the norm that follows it (post-LN)."""
    if block.norm_position == "post" and block.attn_norm is not None:
        return block.attn_norm.output
    return block.attn_residual


def _protected(anat: Anatomy) -> int:
    """Leading tokens never to merge: learned tokens prepended to the patches (CLS, distillation), else 1 (CLS/BOS)."""
    node = anat.blocks[0].stream_in
    for _ in range(8):  # through the position-embedding add and dropout
        if is_op(node, aten.cat):
            break
        node = node.args[0] if isinstance(node, fx.Node) and node.args else None
        if not isinstance(node, fx.Node):
            return 1
    if not is_op(node, aten.cat) or node.args[1] not in (1, -2):
        return 1
    count = 0
    for part in node.args[0]:
        if any(a.op == "placeholder" for a in _ancestors(part)):
            break
        val = tensor_meta(part)
        count += int(val.shape[1]) if val is not None else 1
    return count


def _ancestors(node: fx.Node) -> list[fx.Node]:
    """The nodes `node`'s value is computed from; sizes read with sym_size are not values and are not followed."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or is_op(n, aten.sym_size):
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen)


def _attn_mask(core: fx.Node) -> Any:
    return core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")


def _set_attn_mask(core: fx.Node, mask: fx.Node) -> None:
    if len(core.args) > 3:
        core.update_arg(3, mask)
    else:
        core.update_kwarg("attn_mask", mask)


def _padding_input(gm: fx.GraphModule, anat: Anatomy, example: Any) -> fx.Node | None:
    """The [B, T] padding-mask input the attention masks are built from, None if attention is unmasked."""
    mask = _attn_mask(anat.blocks[0].attention.core)
    if not isinstance(mask, fx.Node):
        return None
    # Inputs whose values the mask is computed from (sizes read with sym_size do not count).
    inputs = {n for n in _ancestors(mask) if n.op == "placeholder"}
    if not inputs:
        # A mask that depends on no input (Hugging Face builds an all-True one for ViT): harmless if it hides nothing.
        value = node_values(gm, example).get(mask.name) if example[0] or example[1] else None
        hides = value is None or bool((~value).any() if value.dtype == torch.bool else (value != 0).any())
        if hides:
            raise _Decline("the attention mask hides keys but depends on no input (a fixed pattern)")
        return None
    tokens = tensor_meta(anat.blocks[0].stream_in)
    pads = [n for n in inputs if (v := tensor_meta(n)) is not None and v.dim() == 2 and tokens is not None
            and str(v.shape[1]) == str(tokens.shape[1])]  # fmt: skip
    if len(inputs) != 1 or len(pads) != 1:
        raise _Decline("the attention mask is not built from one [batch, tokens] padding mask")
    return pads[0]


def _token_shares(block: Block) -> tuple[int, int]:
    """Linear weights (in x out) on attention's side of the merge and on the MLP's side: FLOPs per token."""
    att = sum(lin.in_features * lin.out_features for lin in (*block.attention.projections, block.attention.out))
    mlp = sum(lin.in_features * lin.out_features for lin in block.mlp.linears) if block.mlp else 0
    return att, mlp


def r_for_flops(fraction: float, blocks: list[Block], chosen: list[int], tokens: int, protected: int, kind: str) -> int:
    """The smallest r whose schedule removes at least `fraction` of the linear layers' token FLOPs at `tokens`."""
    def removed(r: int) -> float:
        rs = dict(zip(chosen, schedule(r, kind, len(chosen))))
        t, full, kept = tokens, 0.0, 0.0
        for b in blocks:
            att, mlp = _token_shares(b)
            full += (att + mlp) * tokens
            after = t - merged_count(t, rs.get(b.index, 0), protected)
            kept += att * t + mlp * after
            t = after
        return 1 - kept / full

    for r in range(tokens):
        if removed(r) >= fraction:
            return r
    raise _Decline(f"no r removes {fraction:.0%} of the token FLOPs at {tokens} tokens")


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _rederive_sizes(graph: fx.Graph, merges: list[tuple[fx.Node, fx.Node]], stop: fx.Node | None) -> None:
    """Downstream of each merge, sizes the model computed from the token count (view(x, [B, T, H, D])) must use the
    merged count: read it off the merged tensor instead (until `stop`, the unmerge, restores the original count)."""
    after_stop = _descendants(stop) | {stop} if stop is not None else set()
    counts: set[fx.Node] = set()  # nodes that stand for the token count entering the current merge
    static: int | None = None  # or the count itself, when it is a constant in the graph (vision models)
    for before, after in merges:
        count = tensor_meta(before).shape[1]  # type: ignore[union-attr]
        if not counts and static is None:
            if isinstance(count, torch.SymInt):
                expr = str(count.node.expr)
                counts = {n for n in graph.nodes if _sym_expr(n) == expr}
            else:
                static = int(count)
        with graph.inserting_after(after):
            new = graph.call_function(aten.sym_size.int, (after, 1))
        for node in _descendants(after) - after_stop - {new}:
            for arg in node.all_input_nodes:
                if arg in counts:
                    node.replace_input_with(arg, new)
            if static is not None and is_op(node, *_SHAPED) and isinstance(node.args[1], (list, tuple)):
                sizes = list(node.args[1])
                if any(not isinstance(d, fx.Node) and d == static for d in sizes[1:]):
                    node.update_arg(1, [new if i and not isinstance(d, fx.Node) and d == static else d
                                        for i, d in enumerate(sizes)])
        counts, static = {new}, None


def _sym_expr(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(val.node.expr) if isinstance(val, torch.SymInt) else None


# Ops whose second argument is a size list a model may spell with the token count.
_SHAPED = (aten.view, aten.reshape, aten._unsafe_view, aten.expand)


@dataclass(frozen=True)
class TokenMerge:
    """ToMe: merge the r most similar token pairs between attention and MLP of each block (bipartite matching)."""

    name: ClassVar[str] = "token_merge"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "ToMe bipartite soft matching: r tokens merged per block, proportional attention"

    r: int = 8
    schedule: Literal["constant", "decreasing"] = "constant"
    flops: float | None = None
    blocks: str = "all"
    protected: int | None = None
    unmerge: bool = True
    min_cosine: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"token_merge: r must be an integer >= 0, got {self.r!r}")
        if self.flops is not None and not 0.0 <= self.flops < 1.0:
            raise ValueError(f"token_merge: flops must be a fraction in [0, 1), got {self.flops!r}")
        if self.protected is not None and self.protected < 0:
            raise ValueError(f"token_merge: protected must be >= 0, got {self.protected!r}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"token_merge: min_cosine must be in [-1, 1], got {self.min_cosine!r}")

    def is_identity(self) -> bool:
        return (self.r == 0 and self.flops is None) or self.flops == 0.0

    def check_quality(self, measured: dict) -> str | None:
        cos = measured.get("cosine")
        if cos is not None and cos < self.min_cosine:
            return f"output cosine similarity {cos:.4f} < min_cosine {self.min_cosine}"
        return None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        try:
            return self._rewrite(gm, ctx)
        except _Decline as e:
            return PassResult(gm, False, {"merged_blocks": 0}, (f"token_merge not applied: {e}",))

    def _rewrite(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.is_identity():
            return PassResult(gm, False, {"merged_blocks": 0})
        anat = anatomy(gm)
        if not anat.blocks:
            raise _Decline("no Transformer blocks found" + (f" ({'; '.join(anat.notes)})" if anat.notes else ""))
        cores = [b.attention.core for b in anat.blocks]
        if any(b.attention.kind != "sdpa" for b in anat.blocks):
            raise _Decline("eager attention: proportional attention is implemented as an SDPA mask only")
        if any(c.kwargs.get("is_causal") or (len(c.args) > 5 and c.args[5]) for c in cores):
            raise _Decline("causal attention: merging tokens would mix past and future positions")
        if any(b.parallel for b in anat.blocks):
            raise _Decline("parallel attention/MLP blocks: there is no point between attention and MLP")
        padding = _padding_input(gm, anat, ctx.example_inputs)
        protected = _protected(anat) if self.protected is None else self.protected
        chosen = parse_blocks(self.blocks, len(anat.blocks))
        tokens = tensor_meta(anat.blocks[0].stream_in)
        if tokens is None:
            raise _Decline("no shape metadata on the residual stream")
        r = self.r
        if self.flops is not None:
            seq = example_shape(gm, anat)[1] if isinstance(tokens.shape[1], torch.SymInt) else int(tokens.shape[1])
            r = r_for_flops(self.flops, list(anat.blocks), chosen, seq, protected, self.schedule)
        per_block = dict(zip(chosen, schedule(r, self.schedule, len(chosen))))
        return self._insert(gm, anat, per_block, padding, protected)

    def _insert(
        self, gm: fx.GraphModule, anat: Anatomy, per_block: dict[int, int], padding: fx.Node | None, protected: int
    ) -> PassResult:
        graph = gm.graph
        tracer = fx.proxy.GraphAppendingTracer(graph)

        def proxy(n: fx.Node | None) -> Any:
            return None if n is None else fx.Proxy(n, tracer)

        state: tuple[Any, Any, Any] | None = None  # (size, valid, source) proxies entering the next block
        merges: list[tuple[fx.Node, fx.Node]] = []  # (stream before, stream after) per merge
        notes: list[str] = []
        for block in anat.blocks:
            core = block.attention.core
            if state is not None:  # tokens were merged before this block: proportional attention
                dtype = tensor_meta(core.args[0]).dtype  # type: ignore[union-attr]
                with graph.inserting_before(core):
                    bias = size_bias(state[0], state[1], dtype)
                _set_attn_mask(core, bias.node)
            r = per_block.get(block.index, 0)
            if r <= 0:
                continue
            edges = locate_qk(block.attention)
            if isinstance(edges, str):
                notes.append(f"block {block.index}: not merged: {edges}")
                continue
            point = _merge_point(block)
            key = edges[1][0]
            users = list(point.users)
            with graph.inserting_before(point.next):
                if state is None:
                    valid = None
                    if padding is not None:
                        valid = aten.ne.Scalar(proxy(padding), 0)
                    state = init_token_state(proxy(point), valid)
                    if not self.unmerge:
                        state = (state[0], state[1], None)
                metric = aten.mean.dim(proxy(key), [1])  # keys averaged over heads: [B, T, Dh]
                x, size, valid, source = token_merge_step(proxy(point), *state[:2], metric, r, protected, state[2])
            for user in users:
                user.replace_input_with(point, x.node)
            merges.append((point, x.node))
            state = (size, valid, source)
        if state is None:
            return PassResult(gm, False, {"merged_blocks": 0}, tuple(notes) or ("no block was selected",))
        if self.unmerge and state[2] is not None:
            out = anat.blocks[-1].stream_out
            users = list(out.users)
            with graph.inserting_before(out.next):
                full = torch.ops.txc.unmerge_tokens.default(proxy(out), state[2])
            for user in users:
                user.replace_input_with(out, full.node)
            _rederive_sizes(graph, merges, stop=full.node)
        else:
            _rederive_sizes(graph, merges, stop=None)
        stats = {"merged_blocks": len(merges), "r": max(per_block.values()), "protected": protected,
                 "padding_aware": padding is not None, "unmerge": self.unmerge}  # fmt: skip
        return PassResult(gm, True, stats, tuple(notes))
