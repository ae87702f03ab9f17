"""Exit points in a captured Transformer: the model's head as its own program, and the graph surgery that splits the
batch at block boundaries (used by the `early_exit` pass).

    head = find_head(gm, anat)                  # what turns the last block's stream into the outputs
    head.module(stream, *externals)             # that program, runnable on any block's stream
    staged = Stager(gm, anat, head)             # then, per exit point, in block order:
    staged.add_exit(block, gate)                # score the rows, let the finished ones leave, run the rest
    staged.finish()                             # outputs put back together in the caller's row order

The head is every node between the last block's output stream and the graph's outputs (final norm, pooling, the
classifier); what else it reads (weights, masks) are its externals. At an exit the head runs on that block's stream,
sliced to the leading tokens when the outputs read only those (a CLS classifier), through an optional learned adapter.

Batch compaction: after an exit point everything runs on the kept rows only. Every value computed before the point
and read after it that carries the batch in dim 0 (the stream, masks, the patience state, the rows' positions) is
`index_select`ed to the kept rows, and sizes equal to the batch are re-read from the kept stream, so the later blocks
run unchanged on fewer rows. `txc::exit_assemble` puts every exit's rows back at their positions at the end.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .anatomy import Anatomy, Block
from .ir import ancestors, descendants, is_op, tensor_meta
from .tokens import Decline, reads_only_leading

aten = torch.ops.aten
txc = torch.ops.txc

__all__ = ["Head", "find_head", "Stager", "Gate", "batch_symbols", "exit_counts"]


@dataclass(frozen=True)
class Head:
    """What turns the last block's output stream into the model's outputs."""

    module: fx.GraphModule  # placeholders: the stream, then `externals` (weights are its own get_attrs)
    stream: fx.Node  # the last block's stream_out
    nodes: tuple[fx.Node, ...]  # the head's nodes in `gm`, graph order
    externals: tuple[fx.Node, ...]  # other values of `gm` the head reads (masks, sizes), computed before the blocks
    leaves: tuple[int, ...]  # the flat output positions the head computes
    leading: int | None  # the head reads only this many leading tokens (a CLS classifier), else None


def exit_counts(gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> list[int]:
    """How many rows of `inputs` leave an early-exit program at each of its exits, and (last) run it to the end."""
    from .verify import node_values

    parts = [n for n in gm.graph.nodes if n.target is txc.exit_partition.default]
    values = node_values(gm, inputs, {n.name for n in parts})
    counts = [len(values[n.name][0]) for n in parts]
    rows = next(int(t.shape[0]) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))
    return [*counts, rows - sum(counts)]


def output_leaves(gm: fx.GraphModule) -> list[Any]:
    return pytree.tree_leaves(gm.graph.output_node().args[0])


def batch_symbols(gm: fx.GraphModule, anat: Anatomy) -> set[str]:
    """The symbols that stand for the batch size: the stream's, and every input's dynamic dim 0 (export may give
    input_ids and attention_mask separate symbols for what is one batch). Static batches cannot be split."""
    val = tensor_meta(anat.blocks[0].stream_in)
    if val is None or val.dim() < 2:
        raise Decline("the residual stream has no recorded [batch, tokens, dim] shape")
    if not isinstance(val.shape[0], torch.SymInt) or len(_symbols(val.shape[0])) != 1:
        raise Decline("the batch size is static in the captured program; capture with dynamic=True")
    symbols = {str(val.shape[0].node.expr)}
    for n in gm.graph.nodes:
        v = tensor_meta(n) if n.op == "placeholder" else None
        if v is not None and v.dim() > 0 and isinstance(v.shape[0], torch.SymInt):
            symbols |= {str(v.shape[0].node.expr)} if len(_symbols(v.shape[0])) == 1 else set()
    return symbols


def find_head(gm: fx.GraphModule, anat: Anatomy) -> Head:
    """The head program, or Decline when the outputs read intermediate blocks (output_hidden_states) or the head reads
    values computed inside the blocks."""
    if not anat.blocks:
        raise Decline("no Transformer block found")
    stream = anat.blocks[-1].stream_out
    inside = descendants(anat.blocks[0].stream_in) | {anat.blocks[0].stream_in}
    leaves = output_leaves(gm)
    from_blocks = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and leaf in inside]
    reached = [leaves[i] for i in from_blocks]
    head_set = descendants(stream) & (ancestors(*reached) | set(reached))
    for i in from_blocks:
        if leaves[i] is not stream and leaves[i] not in head_set:
            raise Decline(f"output {i} ({leaves[i].name}) reads an intermediate block's state (output_hidden_states?); "
                          "exits need outputs computed from the last block only")  # fmt: skip
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(head_set, key=order.__getitem__)
    externals: dict[fx.Node, None] = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg is stream or arg in head_set or arg.op == "get_attr":
                continue
            if arg in inside:
                raise Decline(f"the head reads {arg.name}, computed inside the blocks")
            externals[arg] = None
    leading = next((p for p in (1, 2) if reads_only_leading(stream, p)), None)
    module = _head_module(gm, stream, nodes, list(externals), [leaves[i] for i in from_blocks])
    return Head(module, stream, tuple(nodes), tuple(externals), tuple(from_blocks), leading)


def _head_module(
    gm: fx.GraphModule, stream: fx.Node, nodes: list[fx.Node], externals: list[fx.Node], leaves: list[fx.Node]
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {stream: graph.placeholder("stream")}
    for e in externals:
        env[e] = graph.placeholder(e.name)
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(str(arg.target))
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[leaf] for leaf in leaves))
    # Detached weights: training exit adapters through the head must not accumulate gradients in the model's own.
    weights = {str(n.target): getattr_path(gm, str(n.target)) for n in graph.nodes if n.op == "get_attr"}
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    return fx.GraphModule(detached, graph, class_name="ExitHead")


def getattr_path(obj: Any, target: str) -> Any:
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# The gate at one exit: (stager, block, the block's output stream for the running rows) -> (score [rows] node, the
# head's outputs for all running rows, or None when the score needs no head and the head should see exiting rows only).
Gate = Callable[["Stager", Block, fx.Node], tuple[fx.Node, list[fx.Node] | None]]


class Stager:
    """Rewrites `gm` in place into exits at block boundaries with batch compaction; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, anat: Anatomy, head: Head, threshold: float):
        self.gm, self.graph, self.head, self.threshold = gm, gm.graph, head, threshold
        self.batch = batch_symbols(gm, anat)
        self.adapters: dict[int, tuple[str, str]] = {}  # block index -> (weight, bias) get_attr targets
        self.exits: list[tuple[int, list[fx.Node], fx.Node]] = []  # (block, rows' head outputs, rows' positions)
        self.batched: set[fx.Node] = set()  # inserted nodes that carry the batch in dim 0
        self.sizes: set[fx.Node] = set()  # inserted nodes that are the batch size (of the rows running at the time)
        self.latest: dict[fx.Node, fx.Node] = {}  # node of the original graph -> its version for the running rows
        self.origin: dict[fx.Node, fx.Node] = {}
        self.first_exit: fx.Node | None = None
        first = anat.blocks[0].stream_in
        with self.graph.inserting_after(first):
            self.order = self._call(txc.exit_positions.default, first)
        self.carried: dict[str, fx.Node] = {"positions": self.order}  # state every exit compacts
        _hoist(self.graph, head.externals, self.order)

    def current(self, node: fx.Node) -> fx.Node:
        return self.latest.get(node, node)

    def carry(self, name: str, node: fx.Node | None) -> fx.Node | None:
        """Keep `node` ([running rows, ...]) compacted at every later exit; returns the current value of `name`."""
        if node is not None:
            self.carried[name] = node
            self.batched.add(node)
        return self.carried.get(name)

    def call(self, op: Any, *args: Any) -> fx.Node:
        """Insert `op(*args)` at the current insertion point; its output carries the running rows in dim 0."""
        node = self._call(op, *args)
        self.batched.add(node)
        return node

    def _call(self, op: Any, *args: Any) -> fx.Node:
        return self.graph.call_function(op, args)

    def run_head(self, stream: fx.Node, block: int, rows: fx.Node | None = None) -> list[fx.Node]:
        """The head's outputs for `stream` (running rows; `rows` of them if given), through the block's adapter."""
        h = self._call(aten.index_select.default, stream, 0, rows) if rows is not None else stream
        if self.head.leading is not None:
            h = self._call(aten.slice.Tensor, h, 1, 0, self.head.leading)
        if block in self.adapters:
            weight, bias = (self.graph.get_attr(t) for t in self.adapters[block])
            h = self._call(aten.add.Tensor, h, self._call(aten.linear.default, h, weight, bias))
        env: dict[fx.Node, Any] = {self.head.stream: h}
        for e in self.head.externals:
            env[e] = self._select(self.current(e), rows, h) if rows is not None else self.current(e)
        for n in self.head.nodes:
            copy = self.graph.node_copy(n, lambda a: env.get(a, a))
            copy.meta.pop("val", None)
            env[n] = copy
        leaves = output_leaves(self.gm)  # the output node is never rewired before finish(): original nodes
        return [env[leaves[pos]] for pos in self.head.leaves]

    def add_exit(self, block: Block, gate: Gate) -> None:
        """Score the running rows after `block`; rows reaching the threshold leave with the head's outputs."""
        point = block.stream_out
        val = tensor_meta(point)
        if val is None or self._batched_dims(val) != [0] or str(val.shape[0]) not in self.batch:
            shape = "unknown" if val is None else tuple(val.shape)
            raise Decline(f"block {block.index}'s output {point.name} {shape} does not have the batch alone in dim 0")
        anchor = point.next
        self.first_exit = self.first_exit or point
        with self.graph.inserting_before(anchor):
            score, outputs = gate(self, block, point)
            part = self._call(txc.exit_partition.default, score, self.threshold)
            exited, kept = self._call(operator.getitem, part, 0), self._call(operator.getitem, part, 1)
            if outputs is None:
                outputs = self.run_head(point, block.index, exited)
            else:
                outputs = [self._call(aten.index_select.default, o, 0, exited) for o in outputs]
            positions = self._call(aten.index_select.default, self.carried["positions"], 0, exited)
            self.exits.append((block.index, outputs, positions))
            self._compact(anchor, point, kept)

    def _compact(self, anchor: fx.Node, point: fx.Node, kept: fx.Node) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        cut = order[anchor]
        output = self.graph.output_node()
        stream = self.call(aten.index_select.default, point, 0, kept)
        size = self._call(aten.sym_size.int, stream, 0)
        self.sizes.add(size)
        for name, value in list(self.carried.items()):
            self.carried[name] = self.call(aten.index_select.default, value, 0, kept)
        for n in [n for n in self.graph.nodes if order.get(n, cut) < cut]:
            users = [u for u in n.users if u is not output and order.get(u, -1) >= cut]
            if not users or n.op == "get_attr":
                continue
            new = stream if n is point else self._compacted(n, kept, size)
            if new is None:
                continue
            for u in users:
                u.replace_input_with(n, new)
            original = self.origin.get(n, n)
            self.latest[original] = new
            self.origin[new] = original

    def _compacted(self, n: fx.Node, kept: fx.Node, size: fx.Node, running: bool = True) -> fx.Node | None:
        """`n` for the `kept` rows, None when it does not depend on the batch. `running`: the kept rows go on to the
        next blocks (so later exits must compact the result again), not only to an exit's head."""
        select = self.call if running else self._call
        if n in self.batched:
            return select(aten.index_select.default, n, 0, kept)
        if n in self.sizes:
            return size
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt):
            if str(val.node.expr) in self.batch:
                return size
            if self.batch & _symbols(val):
                raise Decline(f"a size computed from the batch ({n.name} = {val}, e.g. batch x heads) is read after an "
                              "exit point; exits only split values whose dim 0 is the batch")  # fmt: skip
            return None
        if isinstance(val, (tuple, list)):
            if any(isinstance(v, torch.Tensor) and self._batched_dims(v) for v in val):
                raise Decline(f"{n.name} (several tensors) is computed before an exit and read after it")
            return None
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            return None
        dims = self._batched_dims(val)
        if dims == [0] and str(val.shape[0]) in self.batch:
            return select(aten.index_select.default, n, 0, kept)
        if dims:
            raise Decline(f"{n.name} {tuple(val.shape)} carries the batch outside dim 0 alone; exits split dim 0")
        return None

    def _batched_dims(self, val: torch.Tensor) -> list[int]:
        return [i for i, d in enumerate(val.shape) if self.batch & _symbols(d)]

    def _select(self, value: fx.Node, rows: fx.Node, stream: fx.Node) -> fx.Node:
        compacted = self._compacted(value, rows, self._call(aten.sym_size.int, stream, 0), running=False)
        return value if compacted is None else compacted

    def finish(self) -> None:
        """Replace each head output of the graph by every exit's rows and the final rows, in the caller's order."""
        _spell_out_inferred_sizes(self.graph, self.first_exit)
        output = self.graph.output_node()
        leaves, spec = pytree.tree_flatten(output.args[0])
        with self.graph.inserting_before(output):
            for i, pos in enumerate(self.head.leaves):
                values = [outs[i] for _, outs, _ in self.exits] + [leaves[pos]]
                positions = [p for _, _, p in self.exits] + [self.carried["positions"]]
                leaves[pos] = self._call(txc.exit_assemble.default, values, positions, self.order)
        output.args = (pytree.tree_unflatten(leaves, spec),)


def _symbols(size: Any) -> set[str]:
    return {str(s) for s in size.node.expr.free_symbols} if isinstance(size, torch.SymInt) else set()


def _spell_out_inferred_sizes(graph: fx.Graph, start: fx.Node | None) -> None:
    """After `start`, view(x, [B, T, -1, 32]) -> view(x, [B, T, 12, 32]) where the -1 is a constant: once every row
    has left, later stages run on zero rows, where torch cannot infer a -1."""
    after = False
    for n in graph.nodes:
        after = after or n is start
        val = tensor_meta(n)
        if not after or val is None or not is_op(n, aten.view, aten.reshape, aten._unsafe_view):
            continue
        sizes = n.args[1]
        if isinstance(sizes, (list, tuple)) and -1 in sizes and len(sizes) == val.dim():
            i = list(sizes).index(-1)
            if isinstance(val.shape[i], int):
                n.update_arg(1, [*sizes[:i], int(val.shape[i]), *sizes[i + 1 :]])


def _hoist(graph: fx.Graph, externals: Sequence[fx.Node], anchor: fx.Node) -> None:
    """Move the head's externals (and what they are computed from) before `anchor`, the first block, so every exit
    can read them; they do not depend on the blocks (find_head checked)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    late = {n for e in externals for n in (ancestors(e) | {e}) if order[n] > order[anchor] and n.op != "placeholder"}
    for n in sorted(late, key=order.__getitem__):
        anchor.append(n)
        anchor = n
