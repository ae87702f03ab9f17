"""Pipeline stages from one graph, and the forward schedule that runs microbatches through them.

Before: one graph, embeddings -> blocks 0..n-1 -> head. After, for stage s holding blocks [lo_s, hi_s):

    stage s: (every model input of the microbatch, the values stage s-1 sends) -> (the values stage s+1 needs)

Cut at the residual stream entering the stage's first block (`anatomy` blocks' `stream_in`). What crosses a cut is
exactly what the later stages read of the work done before it: the stream itself, and anything else computed from it
(forwarded stage to stage). Everything computed from the model inputs and weights alone (attention masks, position
ids, rotary tables, sizes) is recomputed by each stage from the inputs every rank holds, so only activations travel.

Schedule (forward; inference): the batch is cut into microbatches along dim 0; stage s receives microbatch i from
stage s-1, runs it and sends it on without waiting for the send (isend), so stage s works on microbatch i while stage
s+1 works on i-1 (GPipe's and 1F1B's forward order are the same; they differ in when backward passes run, which this
forward-only schedule does not do). Values travel with a small header (shapes, dtypes, ints) sent first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from ...errors import SpecError
from ...ir import descendants

__all__ = ["Stage", "split_stages", "run_pipeline"]


@dataclass
class Stage:
    """One stage's graph: model inputs, then received values, as placeholders; sends or model outputs as outputs."""

    index: int
    graph: fx.Graph
    receives: list[str]  # names of the values it receives (in order)
    sends: list[str]  # names of the values it sends (in order; empty on the last stage)


def split_stages(graph: fx.Graph, cuts: list[fx.Node], first: fx.Node) -> list[Stage]:
    """Stages of `graph` cut before each node of `cuts` (the stream entering each stage after the first); `first`:
    the stream entering the first block (what is derived from it is never recomputed)."""
    nodes = list(graph.nodes)
    stream = descendants(first) | {first}
    cut_stage = {c: s + 1 for s, c in enumerate(cuts)}
    n_stages = len(cuts) + 1
    level: dict[fx.Node, int] = {}
    for n in nodes:
        if n not in stream:
            continue
        ins = [x for x in n.all_input_nodes if x in stream]
        level[n] = max([max(level[x], cut_stage.get(x, 0)) for x in ins], default=0)
    out = next(n for n in nodes if n.op == "output")
    level[out] = n_stages - 1

    def needed_by(n: fx.Node) -> int:
        return max((level[u] if u in level else 0 for u in n.users), default=-1)

    stages = []
    sent: list[fx.Node] = []
    for s in range(n_stages):
        receives = list(sent)
        sends = [n for n in nodes if n in level and n.op != "output" and level[n] <= s < needed_by(n)]
        stages.append(_stage_graph(graph, s, level, receives, sends, out))
        sent = sends
    return stages


def _stage_graph(
    graph: fx.Graph, s: int, level: dict[fx.Node, int], receives: list[fx.Node], sends: list[fx.Node], out: fx.Node
) -> Stage:
    mine = [n for n in graph.nodes if level.get(n) == s and n.op != "output"]
    # The non-stream nodes this stage needs: ancestors of its own nodes, not through received values.
    need: set[fx.Node] = set()
    frontier = [x for n in mine + ([out] if level[out] == s else []) for x in n.all_input_nodes]
    got = set(receives)
    while frontier:
        n = frontier.pop()
        if n in need or n in got or n in level:
            continue
        need.add(n)
        frontier.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = g.node_copy(n)
    for i, n in enumerate(receives):
        env[n] = g.placeholder(f"recv_{i}_{n.name}")
        env[n].meta = dict(n.meta)
    for n in graph.nodes:
        if n.op in ("placeholder", "output") or n in env:
            continue
        if n in need or level.get(n) == s:
            env[n] = g.node_copy(n, lambda x: env[x])
    if level[out] == s:
        g.output(fx.node.map_arg(out.args[0], lambda x: env[x]), type_expr=out.type)
    else:
        g.output(tuple(env[n] for n in sends))
    g.eliminate_dead_code()
    return Stage(s, g, [n.name for n in receives], [n.name for n in sends])


# --------------------------------------------------------------------------------------------------------------------
# The runtime


def _header(values: list[Any]) -> list[Any]:
    head = []
    for v in values:
        if isinstance(v, torch.Tensor):
            head.append(("t", tuple(v.shape), v.dtype))
        elif isinstance(v, (int, float, bool)):
            head.append(("s", v))
        else:
            raise SpecError(f"pipeline: cannot send a {type(v).__name__} between stages")
    return head


def _send(values: list[Any], dst: int, pending: list[Any]) -> None:
    dist.send_object_list([_header(values)], dst=dst)
    for v in values:
        if isinstance(v, torch.Tensor):
            pending.append((dist.isend(v.contiguous(), dst=dst), v))


def _recv(src: int, device: torch.device) -> list[Any]:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src)
    out = []
    for item in box[0]:
        if item[0] == "t":
            t = torch.empty(item[1], dtype=item[2], device=device)
            dist.recv(t, src=src)
            out.append(t)
        else:
            out.append(item[1])
    return out


def microbatches(flat: list[Any], count: int) -> list[list[Any]]:
    """The inputs cut into `count` pieces along dim 0 of every tensor with the first tensor's batch size."""
    tensors = [x for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors or count == 1:
        return [flat]
    batch = tensors[0].shape[0]
    count = min(count, batch)
    pieces = [list(x.tensor_split(count)) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch
              else [x] * count for x in flat]  # fmt: skip
    return [[p[i] for p in pieces] for i in range(count)]


def run_pipeline(
    stage: fx.GraphModule, index: int, n_stages: int, flat_inputs: list[Any], count: int, prev: int | None,
    nxt: int | None, device: torch.device,
) -> list[Any] | None:  # fmt: skip
    """Run this rank's stage over the microbatches; the last stage returns each microbatch's outputs, others None."""
    pending: list[Any] = []
    results = []
    for mb in microbatches(flat_inputs, count):
        received = _recv(prev, device) if index > 0 and prev is not None else []
        out = stage(*mb, *received)
        if index < n_stages - 1:
            assert nxt is not None
            _send(list(out), nxt, pending)
        else:
            results.append(out)
    for work, _ in pending:
        work.wait()
    return results if index == n_stages - 1 else None


def cat_microbatches(results: list[Any]) -> Any:
    """Outputs of the microbatches joined along dim 0 (tensors with a batch dim), else the first's."""
    if len(results) == 1:
        return results[0]
    flat = [torch.utils._pytree.tree_flatten(r) for r in results]
    spec = flat[0][1]
    joined = []
    for i, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            joined.append(torch.cat([f[0][i] for f in flat]))
        else:
            joined.append(leaf)
    return torch.utils._pytree.tree_unflatten(joined, spec)
