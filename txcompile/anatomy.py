"""Find the Transformer in an ATen graph by what its nodes compute, not by module or class names.

    anat = txc.anatomy(gm)
    anat.blocks[3].attention.kind      # "sdpa" | "eager"
    anat.blocks[3].norm_position       # "pre" | "post"
    anat.blocks[3].mlp.fc2.weight      # get_attr target of the MLP's down projection

The analysis works outward from the attention cores (a fused `scaled_dot_product_attention`, or a softmax fed by a
product of two activations and feeding a product with a third): q/k/v projections are the linears the core's inputs
reach through layout ops (views, transposes, splits, RoPE arithmetic); the output projection is the first linear its
output reaches; the residual add is where that projection's output meets the stream. Norm position follows from
where the norm sits relative to that add, and the MLP is the linear chain from the stream after attention back to the
next residual add. `nn_module_stack` is only used to label things for people.
"""

from __future__ import annotations

import operator

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from .ir import PASSTHROUGH_OPS, common_module_path, get_tensor, is_op, module_path, unwrap
from .linears import Linear, find_linears
from .norms import Norm, find_norms

aten = torch.ops.aten

__all__ = ["Anatomy", "Block", "Attention", "MLP", "Linear", "Norm", "anatomy"]

# Ops that only move, reshape or label values between a projection and the attention core (RoPE included).
_LAYOUT = (
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.contiguous, aten.clone,
    aten.unsqueeze, aten.squeeze, aten.expand, aten.slice, aten.select, aten.split, aten.split_with_sizes,
    aten.chunk, aten.unbind, aten.to, aten._to_copy, aten.type_as, aten.repeat_interleave, aten.t, aten.alias,
    aten.dropout, aten.detach, aten.index, aten.index_select, aten.narrow, aten.unflatten,
    aten.flatten,
)  # fmt: skip
_ROPE = (aten.mul, aten.div, aten.add, aten.sub, aten.neg, aten.cat, aten.stack, aten.flatten)
# Per-head q/k norms (qk_norm, Qwen3/OLMo's own) sit between the projections and the core.
_QK_NORMS = (aten.layer_norm, aten.rms_norm)
_GETITEM = "getitem"
# What sits between q @ k^T and softmax: scaling, biases (ALiBi, relative position), masks; in place or not.
_SCORE_ELEMENTWISE = (
    aten.add, aten.add_, aten.div, aten.div_, aten.mul, aten.mul_, aten.sub, aten.where, aten.masked_fill,
    aten.masked_fill_, aten.tanh,
)  # fmt: skip
_SCORE_MATMULS = (aten.matmul, aten.bmm, aten.baddbmm, aten.einsum)
_SOFTMAX = (aten._softmax, aten.softmax, aten._safe_softmax)
_ACTIVATIONS = {
    aten.gelu: "gelu",
    aten.relu: "relu",
    aten.silu: "silu",
    aten.sigmoid: "sigmoid",
    aten.tanh: "tanh",
    aten.gelu_: "gelu",
    aten.relu_: "relu",
    aten.silu_: "silu",
}


@dataclass(frozen=True)
class Attention:
    """One self-attention: projections, core and output projection."""

    kind: Literal["sdpa", "eager"]
    core: fx.Node  # the SDPA node, or the softmax node for eager attention
    input: fx.Node  # what the projections read (the normed stream in pre-LN blocks)
    q: Linear | None
    k: Linear | None
    v: Linear | None
    qkv: Linear | None  # set when one fused projection produces q, k and v
    out: Linear
    context: fx.Node  # the attention-weighted values (SDPA output / probs @ v)
    scores: fx.Node | None = None  # eager: the q @ k^T product

    @property
    def projections(self) -> tuple[Linear, ...]:
        return tuple(x for x in (self.qkv, self.q, self.k, self.v) if x is not None)

    @property
    def fused_qkv(self) -> bool:
        return self.qkv is not None


@dataclass(frozen=True)
class MLP:
    """The feed-forward sublayer: fc1 (or gate/up), activation, fc2."""

    fc1: Linear  # the up projection; for gated MLPs the gate (or the fused gate_up)
    fc2: Linear
    activation: str  # "gelu", "gelu_tanh", "relu", "silu", ... ("?" if not recognised)
    gated: bool = False
    up: Linear | None = None  # gated MLPs with separate gate and up projections

    @property
    def linears(self) -> tuple[Linear, ...]:
        return tuple(x for x in (self.fc1, self.up, self.fc2) if x is not None)


@dataclass(frozen=True)
class Block:
    """One Transformer block, with the residual stream entering and leaving it."""

    index: int
    stream_in: fx.Node
    attention: Attention
    attn_residual: fx.Node  # the add that puts attention's output back into the stream
    norm_position: Literal["pre", "post"]
    attn_norm: Norm | None  # pre-LN: the norm before attention; post-LN: the norm after attn_residual
    mlp: MLP | None
    mlp_residual: fx.Node | None
    mlp_norm: Norm | None
    stream_out: fx.Node
    parallel: bool = False  # attention and MLP read the same input (GPT-J style)
    path: str = ""  # module path, for people

    @property
    def linears(self) -> tuple[Linear, ...]:
        return self.attention.projections + (self.attention.out,) + (self.mlp.linears if self.mlp else ())

    @property
    def norms(self) -> tuple[Norm, ...]:
        return tuple(n for n in (self.attn_norm, self.mlp_norm) if n is not None)


@dataclass(frozen=True)
class Anatomy:
    """The Transformer structure of one captured graph."""

    blocks: tuple[Block, ...]
    linears: tuple[Linear, ...]
    norms: tuple[Norm, ...]
    embeddings: tuple[fx.Node, ...]
    embed_norm: Norm | None
    final_norm: Norm | None
    head: tuple[Linear, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def attention_kind(self) -> str | None:
        kinds = {b.attention.kind for b in self.blocks}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)

    @property
    def norm_position(self) -> str | None:
        kinds = {b.norm_position for b in self.blocks}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)

    def block_params(self, gm: fx.GraphModule, block: Block) -> int:
        """Parameters a block reads (linears and norms); shared weights count once per block."""
        seen: dict[str, int] = {}
        for lin in block.linears:
            for t in (lin.weight, lin.bias):
                if t is not None:
                    seen[t] = _numel(gm, t)
        for norm in block.norms:
            for t in (norm.weight, norm.bias):
                if t is not None:
                    seen[t] = _numel(gm, t)
        return sum(v or 0 for v in seen.values())

    def summary(self) -> list[dict[str, object]]:
        """One plain dict per block, for tables and tests."""
        return [
            {
                "block": b.index,
                "path": b.path,
                "attention": b.attention.kind,
                "qkv": "fused" if b.attention.fused_qkv else "separate",
                "norm": b.norm_position,
                "mlp": ("gated-" if b.mlp and b.mlp.gated else "") + (b.mlp.activation if b.mlp else "none"),
                "parallel": b.parallel,
            }
            for b in self.blocks
        ]


def _numel(gm: fx.GraphModule, target: str) -> int:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.numel() if isinstance(obj, torch.Tensor) else 0


def _producer_linears(start: fx.Node, by_output: dict[fx.Node, Linear], limit: int = 64) -> list[Linear]:
    """Linears whose outputs reach `start` backwards through layout and RoPE ops (breadth first, bounded)."""
    found: list[Linear] = []
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node in by_output:
            if by_output[node] not in found:
                found.append(by_output[node])
            continue
        if node.op != "call_function" or not (
            is_op(node, *_LAYOUT, *_ROPE, *_QK_NORMS) or getattr(node.target, "__name__", "") == _GETITEM
        ):
            continue
        frontier.extend(a for a in node.all_input_nodes if a.op == "call_function")
    return found


def _linear_ahead(
    start: fx.Node, by_input: dict[fx.Node, list[Linear]], follow: Callable[[fx.Node], bool], limit: int
) -> Linear | None:
    """The first linear that `start` reaches forwards (breadth first) through nodes `follow` accepts."""
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node is not start and node in by_input:
            return by_input[node][0]
        frontier.extend(user for user in node.users if follow(user))
    return None


def _consumer_linear(start: fx.Node, by_input: dict[fx.Node, list[Linear]]) -> Linear | None:
    """The output projection: the first linear the attention context reaches through layout ops."""
    if start in by_input:
        return by_input[start][0]
    return _linear_ahead(start, by_input, lambda n: is_op(n, *_LAYOUT), limit=32)


def _add_chain(node: fx.Node, depth: int = 3) -> list[tuple[fx.Node, fx.Node]]:
    """The adds `node` flows into, in order: [(add, other operand), ...].

    A sequential block has one (projection + stream); a parallel block (GPT-J, GPT-NeoX, Falcon) first adds the
    other branch and then the stream, in either order. Dropout, casts, views and scalar scaling are looked through.
    """
    chain: list[tuple[fx.Node, fx.Node]] = []
    cur = node
    for _ in range(8 + depth):
        adds = [u for u in cur.users if is_op(u, aten.add, aten.add_) and not _is_scalar_add(u)]
        if adds:
            add = adds[0]
            others = [a for a in add.args[:2] if isinstance(a, fx.Node) and a is not cur]
            if not others:
                break
            chain.append((add, others[0]))
            if len(chain) == depth:
                break
            cur = add
            continue
        nxt = [u for u in cur.users if is_op(u, *PASSTHROUGH_OPS, aten.view, aten.reshape, aten.mul)]
        if len(nxt) != 1:
            break
        cur = nxt[0]
    return chain


def _attention_cores(gm: fx.GraphModule) -> list[tuple[str, fx.Node, fx.Node, fx.Node, fx.Node, fx.Node | None]]:
    """(kind, core, q, k, v, scores) for every attention core, in graph order."""
    cores = []
    for node in gm.graph.nodes:
        if is_op(node, aten.scaled_dot_product_attention):
            q, k, v = node.args[:3]
            cores.append(("sdpa", node, q, k, v, None))
        elif is_op(node, *_SOFTMAX):
            scores = _score_matmul(node.args[0])
            if scores is None:
                continue
            pv = _probs_times_values(node)
            if pv is None:
                continue
            q, k = scores.args[-2], scores.args[-1]
            v = pv.args[1]
            cores.append(("eager", node, q, k, v, scores))
    return cores


def _score_matmul(start: fx.Node, limit: int = 16) -> fx.Node | None:
    """The q @ k^T product behind softmax's input, through scaling, masking (add/where/masked_fill) and casts."""
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if is_op(node, aten.matmul, aten.bmm, aten.baddbmm):
            a, b = node.args[-2], node.args[-1]
            if all(isinstance(x, fx.Node) and x.op == "call_function" for x in (a, b)):
                return node
            continue
        if is_op(node, *PASSTHROUGH_OPS, *_SCORE_ELEMENTWISE, aten.view, aten.reshape, aten._unsafe_view):
            frontier.extend(node.all_input_nodes)
    return None


def _probs_times_values(softmax: fx.Node) -> fx.Node | None:
    cur = softmax
    for _ in range(6):
        for user in cur.users:
            if is_op(user, aten.matmul, aten.bmm) and user.args[0] is cur:
                return user
        nxt = [u for u in cur.users if is_op(u, *PASSTHROUGH_OPS, aten.where, aten.masked_fill, aten.view,
                                             aten.reshape, aten._unsafe_view)]  # fmt: skip
        if len(nxt) != 1:
            return None
        cur = nxt[0]
    return None


def _activation(start: fx.Node, end_input: fx.Node) -> str:
    """Name the activation between fc1's output and fc2's input by the ops on the paths joining them."""
    forward: set[fx.Node] = set()
    frontier = [start]
    while frontier and len(forward) < 256:
        node = frontier.pop(0)
        if node not in forward:
            forward.add(node)
            if node is not end_input:
                frontier.extend(node.users)
    on_path: list[fx.Node] = []
    frontier, seen = [end_input], set()
    while frontier:
        node = frontier.pop()
        if node in seen or node not in forward:
            continue
        seen.add(node)
        on_path.append(node)
        frontier.extend(node.all_input_nodes)
    names: set[str] = set()
    for node in on_path:
        for packet, name in _ACTIVATIONS.items():
            if is_op(node, packet):
                approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
                names.add("gelu_tanh" if name == "gelu" and approximate == "tanh" else name)
        if is_op(node, aten.erf):
            names.add("erf")
        if any(isinstance(a, float) and abs(a - 0.044715) < 1e-6 for a in node.args):
            names.add("gelu_cubic")  # the cubic term of the tanh approximation of GELU
    if "gelu_tanh" in names or {"tanh", "gelu_cubic"} <= names:
        return "gelu_tanh"
    if "erf" in names:
        return "gelu"
    for name in ("gelu", "relu", "silu"):
        if name in names:
            return name
    return "silu" if "sigmoid" in names else "?"


def _mlp(stream: fx.Node, by_input: dict[fx.Node, list[Linear]], exclude: Iterable[Linear]) -> MLP | None:
    """The MLP reading `stream`: one up projection (or gate+up, or fused gate_up) leading to one down projection."""
    excluded = set(id(x) for x in exclude)
    first = [lin for lin in by_input.get(stream, []) if id(lin) not in excluded]
    if not first:
        return None
    downs: dict[int, Linear] = {}
    for lin in first:
        down = _next_linear(lin.output, by_input)
        if down is not None:
            downs[id(down)] = down
    if len(downs) != 1:
        return None
    fc2 = next(iter(downs.values()))
    if len(first) == 2:
        gate, up = first
        act = _activation(gate.output, fc2.input)
        if act == "?":
            gate, up = up, gate
            act = _activation(gate.output, fc2.input)
        return MLP(fc1=gate, fc2=fc2, activation=act, gated=True, up=up)
    fc1 = first[0]
    act = _activation(fc1.output, fc2.input)
    gated = any(is_op(u, aten.chunk, aten.split, aten.split_with_sizes, aten.slice) for u in fc1.output.users)
    return MLP(fc1=fc1, fc2=fc2, activation=act, gated=gated)


def _next_linear(start: fx.Node, by_input: dict[fx.Node, list[Linear]]) -> Linear | None:
    """The down projection: the first linear reached through activation math and gating (not residual adds)."""

    def follow(n: fx.Node) -> bool:
        return n.op == "call_function" and (not is_op(n, aten.add) or _is_scalar_add(n))

    return _linear_ahead(start, by_input, follow, limit=48)


def _is_scalar_add(node: fx.Node) -> bool:
    # gelu written out adds constants (1 + tanh(...)); a residual add has two tensor operands.
    return is_op(node, aten.add) and sum(isinstance(a, fx.Node) for a in node.args[:2]) < 2


def _is_embedding(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A token embedding lookup, or a patch embedding (a convolution with a weight parameter)."""
    if is_op(node, aten.embedding):
        return True
    return is_op(node, aten.conv2d, aten.convolution) and get_tensor(gm, node.args[1]) is not None


def anatomy(gm: fx.GraphModule) -> Anatomy:
    """Analyse a captured graph; blocks are listed in execution order."""
    linears = find_linears(gm)
    norms = find_norms(gm)
    by_output = {lin.output: lin for lin in linears}
    by_input: dict[fx.Node, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    norm_by_output = {n.output: n for n in norms}
    norm_by_input: dict[fx.Node, list[Norm]] = {}
    for n in norms:
        norm_by_input.setdefault(unwrap(n.input, PASSTHROUGH_OPS), []).append(n)
    notes: list[str] = []
    blocks: list[Block] = []
    for kind, core, q, k, v, scores in _attention_cores(gm):
        block = _block(len(blocks), kind, core, q, k, v, scores, by_output, by_input, norm_by_output, norm_by_input)
        if isinstance(block, str):
            notes.append(f"attention at {core.name} ({module_path(core)}): {block}")
        else:
            blocks.append(block)
    embeddings = tuple(n for n in gm.graph.nodes if _is_embedding(gm, n))
    embed_norm = final_norm = None
    head: tuple[Linear, ...] = ()
    if blocks:
        first_in = unwrap(blocks[0].stream_in, PASSTHROUGH_OPS)
        embed_norm = _norm_producing(first_in, norm_by_output)
        last = blocks[-1].stream_out
        final_norm = _norm_reading(last, norm_by_input) if blocks[-1].norm_position == "pre" else None
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        in_blocks = {id(x) for b in blocks for x in b.linears}
        head = tuple(x for x in linears if order[x.node] > order[last] and id(x) not in in_blocks)
    return Anatomy(tuple(blocks), tuple(linears), tuple(norms), embeddings, embed_norm, final_norm, head, tuple(notes))


def _norm_producing(node: fx.Node, norm_by_output: dict[fx.Node, Norm]) -> Norm | None:
    """The norm whose output `node` is, looking back through pass-through ops (casts after Gemma's norm)."""
    for _ in range(6):
        if node in norm_by_output:
            return norm_by_output[node]
        if not (isinstance(node, fx.Node) and is_op(node, *PASSTHROUGH_OPS) and node.args):
            return None
        node = node.args[0]  # type: ignore[assignment]
    return None


def _join_stream(
    chain: list[tuple[fx.Node, fx.Node]], attn_input: fx.Node, in_norm: Norm | None
) -> tuple[Literal["pre", "post"], int] | None:
    """Where in the add chain the residual stream joins, and whether the block normalises before or after."""
    for i, (_, other) in enumerate(chain):
        o = unwrap(other, PASSTHROUGH_OPS)
        if in_norm is not None and unwrap(in_norm.input, PASSTHROUGH_OPS) is o:
            return "pre", i
        if unwrap(attn_input, PASSTHROUGH_OPS) is o:
            return "post", i
    return None


def _parallel_mlp(
    stream: fx.Node,
    attn_input: fx.Node,
    in_norm: Norm | None,
    by_input: dict[fx.Node, list[Linear]],
    norm_by_input: dict[fx.Node, list[Norm]],
    exclude: tuple[Linear, ...],
) -> tuple[MLP | None, Norm | None]:
    """The MLP of a parallel block: it reads attention's normed input, or its own norm of the same stream."""
    mlp = _mlp(attn_input, by_input, exclude)
    if mlp is not None:
        return mlp, None
    for norm in norm_by_input.get(stream, []):
        if norm is not in_norm:
            return _mlp(norm.output, by_input, exclude), norm
    return None, None


def past_token_reduction(node: fx.Node) -> fx.Node:
    """The stream after the token merge/prune (`txc.merge_tokens`) or unmerge a rewrite put right after `node`, else
    `node`: the blocks of a token-reduced program are the same blocks, on fewer tokens."""
    for user in node.users:
        if user.op == "call_function" and user.args and user.args[0] is node:
            if str(user.target) == "txc.unmerge_tokens.default":
                return user
            if str(user.target) == "txc.merge_tokens.default":
                for item in user.users:
                    if item.target is operator.getitem and item.args[1] == 0:
                        return item
    return node


def _norm_reading(node: fx.Node, norm_by_input: dict[fx.Node, list[Norm]]) -> Norm | None:
    """The norm applied to `node`, also when the stream is reshaped first (OPT flattens to [B*T, D]) or its tokens
    are merged first (token_merge, token_prune)."""
    node = past_token_reduction(node)
    if node in norm_by_input:
        return norm_by_input[node][0]
    for user in node.users:
        if is_op(user, aten.view, aten.reshape, aten._unsafe_view) and user in norm_by_input:
            return norm_by_input[user][0]
    return None


def _block(
    index: int,
    kind: str,
    core: fx.Node,
    q: fx.Node,
    k: fx.Node,
    v: fx.Node,
    scores: fx.Node | None,
    by_output: dict[fx.Node, Linear],
    by_input: dict[fx.Node, list[Linear]],
    norm_by_output: dict[fx.Node, Norm],
    norm_by_input: dict[fx.Node, list[Norm]],
) -> Block | str:
    pq, pk, pv = (_producer_linears(x, by_output) for x in (q, k, v))
    if not (pq and pk and pv):
        return "q/k/v do not come from linear projections"
    fused = pq[0] is pk[0] is pv[0]
    context = core if kind == "sdpa" else _probs_times_values(core)
    assert context is not None
    out = _consumer_linear(context, by_input)
    if out is None:
        return "no output projection after the attention core"
    chain = _add_chain(out.output)
    if not chain:
        return "the output projection does not feed a residual add"
    attn_input = pq[0].input
    in_norm = _norm_producing(attn_input, norm_by_output)
    projections = (pq[0],) if fused else (pq[0], pk[0], pv[0])
    joined = _join_stream(chain, attn_input, in_norm)
    if joined is None:
        return "the residual add does not join the attention's input stream"
    position, i = joined
    attn_residual, stream = chain[i][0], unwrap(chain[i][1], PASSTHROUGH_OPS)
    mlp_norm: Norm | None = None
    if position == "pre":
        attn_norm: Norm | None = in_norm
        after_attn = attn_residual
    else:
        attn_norm = _norm_reading(attn_residual, norm_by_input)
        after_attn = attn_norm.output if attn_norm else attn_residual
    mlp = None
    parallel = i > 0  # another branch joined attention's output before the stream did
    if not parallel:
        mlp_norm = _norm_reading(attn_residual, norm_by_input) if position == "pre" else None
        mlp = _mlp(mlp_norm.output if mlp_norm else past_token_reduction(after_attn), by_input, projections)
    if mlp is None:
        mlp, mlp_norm = _parallel_mlp(stream, attn_input, in_norm, by_input, norm_by_input, projections)
        parallel = mlp is not None
    mlp_residual = None
    stream_out = after_attn
    if mlp is not None and not parallel:
        res = _add_chain(mlp.fc2.output, depth=1)
        if res:
            mlp_residual = stream_out = res[0][0]
            if position == "post":
                mlp_norm = _norm_reading(mlp_residual, norm_by_input)
                stream_out = mlp_norm.output if mlp_norm else mlp_residual
    elif mlp is not None:
        # attn + mlp + stream in some order; the block ends at the add that completes all three.
        joins = _add_chain(mlp.fc2.output, depth=1)
        mlp_residual = joins[0][0] if joins else None
        ends = [add for add, _ in chain[: i + 2]]
        stream_out = attn_residual
        if mlp_residual in ends and ends.index(mlp_residual) > i:
            stream_out = mlp_residual
    return Block(
        index=index,
        stream_in=stream,
        attention=Attention(
            kind=kind,  # type: ignore[arg-type]
            core=core,
            input=attn_input,
            q=None if fused else pq[0],
            k=None if fused else pk[0],
            v=None if fused else pv[0],
            qkv=pq[0] if fused else None,
            out=out,
            context=context,
            scores=scores,
        ),
        attn_residual=attn_residual,
        norm_position=position,
        attn_norm=attn_norm,
        mlp=mlp,
        mlp_residual=mlp_residual,
        mlp_norm=mlp_norm,
        stream_out=stream_out,
        parallel=parallel,
        path=common_module_path((core, out.node)),
    )
