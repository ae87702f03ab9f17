"""The graph side of token reduction, shared by `token_merge` and `token_prune`.

Where a token-reducing rewrite goes in each block (`merge_point`), which leading tokens never leave (`protected_count`),
which input carries the padding mask (`padding_input`), how attention's mask is read and replaced, the per-token FLOPs
each side of the merge point costs (`token_shares`), how token counts downstream of a reduction are re-derived from
the reduced tensor (`rederive_sizes`), so the rewritten program still runs at other batch sizes and lengths, and the
insertion loop both passes share (`reduce_tokens`: token state, proportional attention, unmerge).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import fx

from .anatomy import Anatomy, Block, anatomy
from .ir import descendants, is_op, tensor_meta
from .ops.token_merge import init_token_state, size_bias
from .pipeline import PassContext, PassResult
from .verify import cosine_shortfall, node_values

aten = torch.ops.aten

__all__ = [
    "Decline",
    "check_reducible",
    "TokenReducer",
    "parse_blocks",
    "merge_point",
    "protected_count",
    "attn_mask",
    "set_attn_mask",
    "padding_input",
    "token_shares",
    "rederive_sizes",
    "reads_only_leading",
    "reduce_tokens",
]


class Decline(Exception):
    """The graph does not meet the pass's preconditions; the message is the note."""


def parse_blocks(spec: str, depth: int) -> list[int]:
    """ "all", "3:" (from block 3), ":4" (before block 4), "3::3" (every third from block 3), "0,2,5" -> indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(depth))
    if ":" in spec:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) > 3:
            raise Decline(f"blocks={spec!r} is not a start:stop[:step] slice")
        return list(range(depth))[slice(*parts)]
    picked = sorted({int(p) for p in spec.split(",") if p.strip()})
    bad = [i for i in picked if not 0 <= i < depth]
    if bad:
        raise Decline(f"blocks={spec!r} names blocks {bad}, but the model has blocks 0..{depth - 1}")
    return picked


# The ops a token reduction inserts; a graph holding them already tracks token sizes and masks.
_REDUCING = ("txc.merge_tokens.default", "txc.prune_plan.default")


def check_reducible(gm: fx.GraphModule, anat: Anatomy) -> None:
    """Raise Decline unless every block can have its tokens reduced between attention and MLP."""
    if not anat.blocks:
        raise Decline("no Transformer blocks found" + (f" ({'; '.join(anat.notes)})" if anat.notes else ""))
    if any(b.attention.kind != "sdpa" for b in anat.blocks):
        raise Decline("eager attention: proportional attention is implemented as an SDPA mask only")
    cores = [b.attention.core for b in anat.blocks]
    if any(c.kwargs.get("is_causal") or (len(c.args) > 5 and c.args[5]) for c in cores):
        raise Decline("causal attention: reducing tokens would mix past and future positions")
    if any(b.parallel for b in anat.blocks):
        raise Decline("parallel attention/MLP blocks: there is no point between attention and MLP")
    if any(str(n.target) in _REDUCING for n in gm.graph.nodes):  # sizes and masks would be tracked twice
        raise Decline("tokens are already reduced (token_merge or token_prune ran before)")
    if tensor_meta(anat.blocks[0].stream_in) is None:
        raise Decline("no shape metadata on the residual stream")


class TokenReducer:
    """What `token_merge` and `token_prune` share as passes: option checks for `blocks`, `protected` and
    `min_cosine`, the quality budget, and the driver that checks the graph, finds the padding input, the protected
    count and the chosen blocks, then calls the subclass's `_reduce`. A Decline becomes an unchanged graph and a
    note. Subclasses are frozen dataclasses with those three fields and `name`, `count_stat`, `is_identity`."""

    reduces_tokens: ClassVar[bool] = True  # the report then shows the tokens per block and the FLOPs removed
    name: ClassVar[str]
    count_stat: ClassVar[str]  # the stat counting reduced blocks ("merged_blocks")
    blocks: str
    protected: int | None
    min_cosine: float

    def is_identity(self) -> bool:
        raise NotImplementedError

    def _reduce(
        self, gm: fx.GraphModule, ctx: PassContext, anat: Anatomy, chosen: list[int], padding: fx.Node | None,
        protected: int,
    ) -> PassResult:  # fmt: skip
        raise NotImplementedError

    def _check_shared_options(self) -> None:
        try:
            parse_blocks(self.blocks, 1000)
        except (ValueError, Decline):
            raise ValueError(
                f"{self.name}: blocks must be 'all', 'start:stop[:step]' or indices like '0,3', got {self.blocks!r}"
            ) from None
        if self.protected is not None and self.protected < 0:
            raise ValueError(f"{self.name}: protected must be >= 0, got {self.protected!r}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"{self.name}: min_cosine must be in [-1, 1], got {self.min_cosine!r}")

    def check_quality(self, measured: dict) -> str | None:
        return cosine_shortfall(measured, self.min_cosine)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.is_identity():
            return PassResult(gm, False, {self.count_stat: 0})
        try:
            anat = anatomy(gm)
            check_reducible(gm, anat)
            padding = padding_input(gm, anat, ctx.example_inputs)
            protected = protected_count(anat) if self.protected is None else self.protected
            chosen = parse_blocks(self.blocks, len(anat.blocks))
            return self._reduce(gm, ctx, anat, chosen, padding, protected)
        except Decline as e:
            return PassResult(gm, False, {self.count_stat: 0}, (f"{self.name} not applied: {e}",))


def merge_point(block: Block) -> fx.Node:
    """Where the merge goes: after attention's residual add (pre-LN), or after the norm that follows it (post-LN)."""
    if block.norm_position == "post" and block.attn_norm is not None:
        return block.attn_norm.output
    return block.attn_residual


def protected_count(anat: Anatomy) -> int:
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


def attn_mask(core: fx.Node) -> Any:
    return core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")


def set_attn_mask(core: fx.Node, mask: fx.Node) -> None:
    if len(core.args) > 3:
        core.update_arg(3, mask)
    else:
        core.update_kwarg("attn_mask", mask)


def padding_input(gm: fx.GraphModule, anat: Anatomy, example: Any) -> fx.Node | None:
    """The [B, T] padding-mask input the attention masks are built from, None if attention is unmasked."""
    mask = attn_mask(anat.blocks[0].attention.core)
    if not isinstance(mask, fx.Node):
        return None
    # Inputs whose values the mask is computed from (sizes read with sym_size do not count).
    inputs = {n for n in _ancestors(mask) if n.op == "placeholder"}
    if not inputs:
        # A mask that depends on no input (Hugging Face builds an all-True one for ViT): harmless if it hides nothing.
        value = node_values(gm, example).get(mask.name) if example[0] or example[1] else None
        hides = value is None or bool((~value).any() if value.dtype == torch.bool else (value != 0).any())
        if hides:
            raise Decline("the attention mask hides keys but depends on no input (a fixed pattern)")
        return None
    tokens = tensor_meta(anat.blocks[0].stream_in)
    pads = [n for n in inputs if (v := tensor_meta(n)) is not None and v.dim() == 2 and tokens is not None
            and str(v.shape[1]) == str(tokens.shape[1])]  # fmt: skip
    if len(inputs) != 1 or len(pads) != 1:
        raise Decline("the attention mask is not built from one [batch, tokens] padding mask")
    return pads[0]


def token_shares(block: Block) -> tuple[int, int]:
    """Linear weights (in x out) on attention's side of the merge and on the MLP's side: FLOPs per token."""
    att = sum(lin.in_features * lin.out_features for lin in (*block.attention.projections, block.attention.out))
    mlp = sum(lin.in_features * lin.out_features for lin in block.mlp.linears) if block.mlp else 0
    return att, mlp


def rederive_sizes(graph: fx.Graph, merges: list[tuple[fx.Node, fx.Node]], stop: fx.Node | None) -> None:
    """Downstream of each merge, sizes the model computed from the token count (view(x, [B, T, H, D])) must use the
    merged count: read it off the merged tensor instead (until `stop`, the unmerge, restores the original count)."""
    after_stop = descendants(stop) | {stop} if stop is not None else set()
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
        for node in descendants(after) - after_stop - {new}:
            for arg in node.all_input_nodes:
                if arg in counts:
                    node.replace_input_with(arg, new)
            if static is not None and is_op(node, *_SHAPED) and isinstance(node.args[1], (list, tuple)):
                sizes = list(node.args[1])
                if any(not isinstance(d, fx.Node) and d == static for d in sizes[1:]):
                    node.update_arg(
                        1, [new if i and not isinstance(d, fx.Node) and d == static else d for i, d in enumerate(sizes)]
                    )
        counts, static = {new}, None


def _sym_expr(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(val.node.expr) if isinstance(val, torch.SymInt) else None


# Ops whose second argument is a size list a model may spell with the token count.
_SHAPED = (aten.view, aten.reshape, aten._unsafe_view, aten.expand)


# Ops a token-indexed value passes through unchanged in its token order on the way to a classifier head.
_PER_TOKEN = (aten.layer_norm, aten.native_layer_norm, aten.clone, aten.dropout, aten._to_copy, aten.alias,
              aten.contiguous, aten.rms_norm)  # fmt: skip


def reads_only_leading(node: fx.Node, count: int) -> bool:
    """Whether every use of the [B, T, C] value `node` reads only its first `count` tokens (a CLS/distillation head),
    so the order and number of the other tokens never reach an output and need no unmerging."""
    stack = [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                stack.append(user)  # native_layer_norm's output
            elif is_op(user, *_PER_TOKEN) and user.args[0] is n:
                stack.append(user)
            elif is_op(user, aten.slice) and user.args[0] is n and _slice_dim(user) == 0 and _full(user):
                stack.append(user)
            elif is_op(user, aten.select) and user.args[1] in (1, -2) and 0 <= _int(user.args[2]) < count:
                continue
            elif is_op(user, aten.slice) and _slice_dim(user) in (1, -2) and _slice_end(user) <= count:
                continue
            else:
                return False
    return True


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1


def _slice_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else 0  # type: ignore[return-value]


def _slice_end(node: fx.Node) -> float:
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    if start not in (0, None) or not isinstance(end, int) or end < 0:
        return float("inf")
    return end


def _full(node: fx.Node) -> bool:
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


# (block, reduced before it) -> what `step` needs for the block, or why the block is left alone.
Check = Callable[[Block, bool], Any]
# (what check returned, proxy of a node, the stream at the merge point, (size, valid, source)) -> the reduced
# (x, size, valid, source), as fx Proxies.
Step = Callable[[Any, Callable[[Any], Any], Any, tuple[Any, Any, Any]], tuple[Any, Any, Any, Any]]


def reduce_tokens(
    gm: fx.GraphModule,
    anat: Anatomy,
    chosen: Iterable[int],
    padding: fx.Node | None,
    protected: int,
    unmerge: bool,
    check: Check,
    step: Step,
) -> tuple[int, list[str], bool]:
    """Insert a token reduction at the merge point of each chosen block, and what every reduction needs around it:
    the token state (size, valid, source) starting at the first one, proportional attention in every later block,
    the unmerge after the last block (unless the outputs read only the protected tokens), and the token counts
    re-derived downstream. Returns (blocks reduced, notes, whether outputs are unmerged); nothing changes if 0."""
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def proxy(n: Any) -> Any:
        return fx.Proxy(n, tracer) if isinstance(n, fx.Node) else n

    chosen = set(chosen)
    unmerge = unmerge and not reads_only_leading(anat.blocks[-1].stream_out, protected)
    state: tuple[Any, Any, Any] | None = None  # (size, valid, source) proxies entering the next block
    done: list[tuple[fx.Node, fx.Node]] = []  # (stream before, stream after) per reduction
    notes: list[str] = []
    for block in anat.blocks:
        core = block.attention.core
        if state is not None:  # tokens were reduced before this block: padding masked, sizes weigh the keys
            dtype = tensor_meta(core.args[0]).dtype  # type: ignore[union-attr]
            with graph.inserting_before(core):
                bias = size_bias(state[0], state[1], dtype)
            set_attn_mask(core, bias.node)
        if block.index not in chosen:
            continue
        plan = check(block, state is not None)
        if isinstance(plan, str):
            notes.append(f"block {block.index}: left alone: {plan}")
            continue
        point = merge_point(block)
        users = list(point.users)
        with graph.inserting_before(point.next):
            if state is None:
                valid = aten.ne.Scalar(proxy(padding), 0) if padding is not None else None
                state = init_token_state(proxy(point), valid, track_source=unmerge)
            x, size, valid, source = step(plan, proxy, proxy(point), state)
        for user in users:
            user.replace_input_with(point, x.node)
        done.append((point, x.node))
        state = (size, valid, source)
    if state is None:
        return 0, notes or ["no block was selected"], False
    stop = None
    if unmerge:
        out = anat.blocks[-1].stream_out
        users = list(out.users)
        with graph.inserting_before(out.next):
            stop = torch.ops.txc.unmerge_tokens.default(proxy(out), state[2]).node
        for user in users:
            user.replace_input_with(out, stop)
    rederive_sizes(graph, done, stop=stop)
    return len(done), notes, unmerge
