"""What `txcompile inspect` shows: anatomy, op counts, the cost model per block and, after passes, what each changed.

insp = build(gm, label="all-MiniLM-L6-v2", records=records)
print(render_text(insp))                 # rich tables as plain text
Path("inspect.html").write_text(render_html(insp))   # one self-contained page, no scripts or external files
Path("graph.dot").write_text(render_dot(gm, txc.anatomy(gm)))   # the ATen graph, one cluster per block
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from . import cost
from .anatomy import Anatomy, Block, anatomy
from .ir import common_module_path, get_tensor, module_path, op_name, tensor_meta
from .norms import Norm
from .pipeline import PassRecord, count_ops
from .report import render_table

__all__ = ["Inspection", "build", "render_text", "render_html", "render_dot"]

_ANATOMY_HEADER = ["block", "module", "attention", "heads", "qkv", "norm", "mlp", "parallel", "width", "params"]
_PASS_HEADER = ["pass", "contract", "changed", "time", "error vs original", "ops added", "ops removed", "notes"]
# How the cost table splits a block's FLOPs, in the order the HTML bar stacks them.
_SHARES = {
    "attention projections": ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out"),
    "attention core": ("attn.scores", "attn.context"),
    "MLP": ("mlp.fc1", "mlp.up", "mlp.fc2"),
    "elementwise": ("attn.softmax", "mlp.act", "norm", "residual", "bias"),
}


@dataclass
class Inspection:
    """Everything `txcompile inspect` reports about one graph, as plain values ready to render."""

    label: str
    blocks: list[dict[str, Any]]  # anatomy.summary() rows plus heads, width and params
    ops: Counter[str]
    costs: list[dict[str, Any]]  # block, flops/bytes (expression strings), flops_at/bytes_at (ints), shares
    example: tuple[int, int]  # (batch, seq) the numbers are evaluated at
    parts: list[tuple[str, str]]  # embeddings, embedding norm, final norm, head: (part, description)
    params: int  # all parameters of the graph
    notes: list[str] = field(default_factory=list)
    records: list[PassRecord] | None = None

    @property
    def summary(self) -> str:
        kinds = sorted({str(b["attention"]) for b in self.blocks}) or ["no"]
        norms = sorted({f"{b['norm']}-LN" for b in self.blocks})
        batch, seq = self.example
        flops = sum(c["flops_at"] for c in self.costs)
        moved = sum(c["bytes_at"] for c in self.costs)
        block_params = sum(int(b["params"]) for b in self.blocks)
        return (
            f"{len(self.blocks)} blocks, {'/'.join(kinds)} attention, {'/'.join(norms) or 'no norms'}; "
            f"{_si(self.params)} parameters ({_si(block_params)} in blocks); blocks at batch {batch} x {seq} tokens: "
            f"{_si(flops)}FLOP, {_si(moved)}B moved"
        )


def build(gm: fx.GraphModule, *, label: str, records: Sequence[PassRecord] | None = None) -> Inspection:
    """Analyse `gm` (anatomy and cost model) into an `Inspection`; `records` adds the per-pass diff."""
    anat = anatomy(gm)
    costs = cost.block_costs(gm, anat)
    batch, seq = cost.example_shape(gm, anat)
    blocks = []
    for block, row, c in zip(anat.blocks, anat.summary(), costs):
        row = dict(row)
        row["path"] = _layer_path(block) or row["path"]
        row["parallel"] = "yes" if row["parallel"] else "no"
        row["heads"] = cost.heads(block) or "?"
        row["width"] = block.attention.out.out_features
        row["params"] = c.params
        blocks.append(row)
    cost_rows = []
    for c in costs:
        cost_rows.append(
            {
                "block": c.index,
                "tokens": str(c.tokens),
                "tokens_at": cost.evaluate(c.tokens, batch, seq),
                "flops": str(c.flops),
                "bytes": str(c.bytes),
                "flops_at": cost.evaluate(c.flops, batch, seq),
                "bytes_at": cost.evaluate(c.bytes, batch, seq),
                "shares": {
                    name: cost.evaluate(sum((c.parts.get(k, 0) for k in keys), sympy.Integer(0)), batch, seq)
                    for name, keys in _SHARES.items()
                },
            }
        )
    params = sum(p.numel() for p in gm.parameters())
    return Inspection(
        label=label,
        blocks=blocks,
        ops=count_ops(gm),
        costs=cost_rows,
        example=(batch, seq),
        parts=_parts(gm, anat),
        params=params,
        notes=list(anat.notes),
        records=list(records) if records is not None else None,
    )


def _layer_path(block: Block) -> str:
    """The module holding the whole block ("encoder.layer.0"): the common prefix of its linears' module paths."""
    # Linears a pass created carry no module path; common_module_path ignores them.
    return common_module_path(lin.node for lin in block.linears)


def _parts(gm: fx.GraphModule, anat: Anatomy) -> list[tuple[str, str]]:
    """The model outside its blocks: embeddings, the norms around the stack, the head."""
    rows = []
    for node in anat.embeddings:
        weight = get_tensor(gm, node.args[0] if op_name(node) == "aten.embedding" else node.args[1])
        shape = "x".join(map(str, weight.shape)) if weight is not None else "?"
        rows.append(("embedding", f"{op_name(node)} {shape} ({module_path(node) or node.name})"))
    for name, norm in (("embedding norm", anat.embed_norm), ("final norm", anat.final_norm)):
        rows.append((name, _norm_text(norm)))
    for lin in anat.head:
        where = module_path(lin.node) or lin.node.name
        rows.append(("head", f"linear {lin.in_features} -> {lin.out_features} ({where})"))
    if not anat.head:
        rows.append(("head", "none"))
    return rows


def _norm_text(norm: Norm | None) -> str:
    if norm is None:
        return "none"
    return f"{norm.kind} eps={norm.eps:g} ({module_path(norm.output) or norm.output.name})"


def _si(value: float) -> str:
    """1234567 -> '1.23 M' (decimal prefixes, as FLOP and byte counts are usually quoted)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:g} "


def _error_text(error: Mapping[str, Any] | None) -> str:
    if not error:
        return "-"
    parts = []
    if "cosine" in error:
        parts.append(f"cos {error['cosine']:.5f}")
    if "max_abs" in error:
        parts.append(f"max abs {error['max_abs']:.2e}")
    if error.get("ok") is False:
        parts.append("over tolerance")
    return ", ".join(parts) or ", ".join(f"{k}={v}" for k, v in error.items())


def _changes(ops: Mapping[str, int]) -> str:
    return " ".join(f"{n} {op}" for op, n in sorted(ops.items())) or "-"


def _tables(insp: Inspection) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(id, title, header, rows) of every table, shared by the text and HTML renderings."""
    batch, seq = insp.example
    anatomy_rows = [[str(b[k]) for k in ("block", "path", "attention", "heads", "qkv", "norm", "mlp", "parallel",
                                          "width")] + [f"{int(b['params']):,}"] for b in insp.blocks]  # fmt: skip
    cost_rows = [
        [str(c["block"]), f"{c['tokens']} = {c['tokens_at']}", c["flops"], c["bytes"], f"{_si(c['flops_at'])}FLOP",
         f"{_si(c['bytes_at'])}B", f"{c['flops_at'] / max(c['bytes_at'], 1):.1f}"]
        for c in insp.costs
    ]  # fmt: skip
    if insp.costs:
        flops, moved = sum(c["flops_at"] for c in insp.costs), sum(c["bytes_at"] for c in insp.costs)
        cost_rows.append(["all", "", "", "", f"{_si(flops)}FLOP", f"{_si(moved)}B", f"{flops / max(moved, 1):.1f}"])
    tables = [
        ("anatomy", "Anatomy", _ANATOMY_HEADER, anatomy_rows),
        ("parts", "Outside the blocks", ["part", "what"], [list(p) for p in insp.parts]),
        (
            "cost",
            f"Cost per block (B = batch, T = tokens; numbers at B={batch}, T={seq})",
            ["block", "tokens in", "FLOPs", "bytes", f"FLOPs @{batch}x{seq}", f"bytes @{batch}x{seq}", "FLOP/byte"],
            cost_rows,
        ),
        ("ops", "Op counts", ["op", "count"], [[op, str(n)] for op, n in sorted(insp.ops.items(), key=_by_count)]),
    ]
    if insp.records is not None:
        pass_rows = [
            [r.spec, r.contract, "yes" if r.modified else "no", f"{r.seconds * 1000:.0f} ms", _error_text(r.error),
             _changes(r.ops_added), _changes(r.ops_removed), "; ".join(r.notes) or "-"]
            for r in insp.records
        ]  # fmt: skip
        tables.append(("passes", "Passes (what each changed)", _PASS_HEADER, pass_rows))
    return tables


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def render_text(insp: Inspection) -> str:
    """The inspection as plain-text tables (rich, no colour codes)."""
    out = [f"txcompile inspect: {insp.label}", insp.summary]
    for _, title, header, rows in _tables(insp):
        out.append(render_table(title, header, rows))
    out.extend(f"note: {n}" for n in insp.notes)
    return "\n\n".join(out) + "\n"


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 2rem auto;
       max-width: 1200px; padding: 0 1.5rem; background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 2rem 0 .5rem; }
p.summary { color: #57606a; margin: 0 0 1rem; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #d8dee4; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
th.num, td.num { text-align: right; } code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 2rem; }
.bar { display: flex; height: .9rem; min-width: 12rem; border-radius: 3px; overflow: hidden; background: #eaeef2; }
.bar span { display: block; height: 100%; }
.legend span { display: inline-block; width: .8rem; height: .8rem; margin: 0 .3rem 0 1rem; vertical-align: -1px; }
.s0 { background: #4c78a8; } .s1 { background: #f58518; } .s2 { background: #54a24b; } .s3 { background: #b8b8b8; }
.notes { color: #9a6700; }
"""


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).isdigit()


def _cells(row: Sequence[str], numeric: Sequence[bool], tag: str = "td") -> str:
    out = []
    for cell, num in zip(row, numeric):
        text = str(cell)
        inner = f"<code>{html.escape(text)}</code>" if "*" in text else html.escape(text)  # sympy expressions
        attr = ' class="num"' if num else ""
        out.append(f"<{tag}{attr}>{inner}</{tag}>")
    return "".join(out)


def _html_table(
    table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]], extra: tuple[str, Sequence[str]] | None = None
) -> str:
    """A table; `extra` is (header, pre-rendered HTML cells) for one more column, e.g. the cost bars."""
    # Columns whose cells are all numbers are right-aligned, header included.
    numeric = [all(_is_number(str(r[i])) or not r[i] for r in rows) and any(r[i] for r in rows)
               for i in range(len(header))]  # fmt: skip
    head = _cells(header, numeric, "th") + (f"<th>{html.escape(extra[0])}</th>" if extra else "")
    body = []
    for i, row in enumerate(rows):
        more = f"<td>{extra[1][i]}</td>" if extra and i < len(extra[1]) else ("<td></td>" if extra else "")
        body.append(f"<tr>{_cells(row, numeric)}{more}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _share_bar(shares: Mapping[str, int]) -> str:
    whole = max(sum(shares.values()), 1)
    spans = "".join(
        f'<span class="s{i}" style="width:{100 * v / whole:.2f}%" title="{html.escape(k)}: {100 * v / whole:.1f}%">'
        "</span>"
        for i, (k, v) in enumerate(shares.items())
    )
    return f'<div class="bar">{spans}</div>'


def render_html(insp: Inspection) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no external resources) with the same tables."""
    tables = _tables(insp)
    sections: dict[str, str] = {}
    for table_id, title, header, rows in tables:
        heading = f"<h2>{html.escape(title)}</h2>"
        if table_id == "cost":
            # A stacked bar per block shows where its FLOPs go.
            legend = "".join(f'<span class="s{i}"></span>{html.escape(k)}' for i, k in enumerate(_SHARES))
            bars = [_share_bar(c["shares"]) for c in insp.costs]
            table = _html_table(table_id, header, rows, extra=("where the FLOPs go", bars))
            heading += f'<p class="legend">{legend}</p>'
        else:
            table = _html_table(table_id, header, rows)
        sections[table_id] = f"<section>{heading}{table}</section>"
    # Op counts and the parts outside the blocks are short two-column tables: side by side.
    side = f'<div class="grid">{sections["parts"]}{sections["ops"]}</div>'
    order = [sections["anatomy"], sections["cost"], side, sections.get("passes", "")]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in insp.notes)
    title = html.escape(f"txcompile inspect: {insp.label}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>"
        f'<p class="summary">{html.escape(insp.summary)}</p>{"".join(order)}'
        + (f'<h2>Notes</h2><ul class="notes">{notes}</ul>' if notes else "")
        + "</body></html>\n"
    )


# Fill colours per block (cycled); nodes outside every block stay white.
_PALETTE = ("#dbe9f6", "#fde2c8", "#d9efd5", "#f3d9e7", "#e4dcf1", "#f6efc5", "#d5eeee", "#eadfd3")
_MATMULS = {"aten.linear", "aten.addmm", "aten.matmul", "aten.mm", "aten.bmm", "aten.scaled_dot_product_attention"}


def _block_members(gm: fx.GraphModule, anat: Anatomy) -> dict[fx.Node, int]:
    """Block index of every node computed from that block's input stream, up to and including its output stream."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    member: dict[fx.Node, int] = {}
    for block in anat.blocks:
        reached = {block.stream_in}
        for node in nodes[order[block.stream_in] + 1 : order[block.stream_out] + 1]:
            # Mask and size computations interleaved with the block do not read the stream: they stay outside.
            if any(i in reached for i in node.all_input_nodes):
                reached.add(node)
                member.setdefault(node, block.index)
    return member


def _shape_text(node: fx.Node, symbols: Mapping[sympy.Symbol, sympy.Symbol]) -> str:
    val = tensor_meta(node)
    if val is None:
        return ""

    def dim(size: int | torch.SymInt) -> str:
        return str(sympy.sympify(size.node.expr).subs(symbols)) if isinstance(size, torch.SymInt) else str(size)

    return f"[{', '.join(dim(s) for s in val.shape)}] {str(val.dtype).removeprefix('torch.')}"


def render_dot(gm: fx.GraphModule, anat: Anatomy) -> str:
    """Graphviz DOT of the ATen graph: inputs, calls and the output, data edges, one cluster per block."""
    import networkx as nx
    import pydot
    from networkx.drawing.nx_pydot import to_pydot

    symbols = cost.size_symbols(gm)
    member = _block_members(gm, anat)
    graph = nx.DiGraph(name="txcompile")
    graph.graph["graph"] = {"rankdir": "TB", "fontname": "Helvetica"}
    graph.graph["node"] = {"fontname": "Helvetica", "fontsize": "10", "shape": "box", "style": "rounded,filled"}
    ids: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            continue  # weights (get_attr) would double the node count without showing any computation
        # fx names are identifiers; the prefix keeps them clear of DOT keywords ("graph", "node", "edge").
        ids[node] = f"n_{node.name}"
        name = op_name(node)
        lines = [node.name, name if node.op == "call_function" else "", _shape_text(node, symbols)]
        fill = _PALETTE[member[node] % len(_PALETTE)] if node in member else "#ffffff"
        attrs = {"label": _dot_string(*(x for x in lines if x)), "fillcolor": _dot_string(fill)}
        if node.op != "call_function":
            attrs["shape"] = "ellipse" if node.op == "placeholder" else "doubleoctagon"
        elif name in _MATMULS:
            attrs["penwidth"] = "2"
        graph.add_node(ids[node], **attrs)
    for node, ident in ids.items():
        for source in node.all_input_nodes:
            if source in ids:
                graph.add_edge(ids[source], ident)
    dot = to_pydot(graph)
    clusters = {}
    for b in anat.blocks:
        label = _dot_string(f"block {b.index}: {_layer_path(b) or b.path}")
        clusters[b.index] = pydot.Cluster(str(b.index), label=label, style="rounded", color=_dot_string("#8c959f"))
    # to_pydot knows no subgraphs: move each block's nodes into its cluster (edges stay at the top level).
    for node, index in member.items():
        found = dot.get_node(ids[node]) if node in ids else []
        if found:
            dot.del_node(ids[node])
            clusters[index].add_node(found[0])
    for cluster in clusters.values():
        dot.add_subgraph(cluster)
    return dot.to_string()


def _dot_string(*lines: str) -> str:
    """A quoted DOT string of one or more lines (joined by DOT's `\\n` line break); backslashes and quotes escaped."""
    return '"' + "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'
