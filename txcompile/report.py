"""What an optimize() run did: per pass what changed, how long it took, and the error measured against the original."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends.base import Fallback
from .capture import CaptureInfo
from .pipeline import PassRecord

__all__ = ["Report", "exit_summary", "quant_table", "render_table"]


@dataclass
class Report:
    """Per-pass records of one optimize() run. `str(report)` is a readable table; `to_dict()` is JSON-ready."""

    model: str
    backend: str
    capture: CaptureInfo | None = None
    capture_error: dict[str, Any] | None = None  # the captured graph vs the model, before any pass
    records: list[PassRecord] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    kernels: dict[str, int] = field(default_factory=dict)  # fused kernel -> groups it replaced (triton backend)
    lowering_error: dict[str, Any] | None = None  # the lowered program vs the unlowered one on the example inputs
    seconds: dict[str, float] = field(default_factory=dict)  # capture / passes / lower / total
    # Set when a pass changed the token count: tokens entering each block and the blocks' FLOPs before and after, as
    # expressions (B batch, T input tokens) and at the example shape.
    tokens: dict[str, Any] | None = None
    # Set by `quantize`: scheme, method, per-layer records (bits, calibration and output errors, kernel times, bytes)
    # and the whole program's measured and predicted speed.
    quant: dict[str, Any] | None = None
    # Set by `early_exit`: criterion, threshold, calibration agreement, exit distribution, expected/measured speedup.
    early_exit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "capture": asdict(self.capture) if self.capture else None,
            "capture_error": self.capture_error,
            "passes": [asdict(r) for r in self.records],
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "kernels": self.kernels,
            "lowering_error": self.lowering_error,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "quant": self.quant,
            "early_exit": self.early_exit,
        }

    def __str__(self) -> str:
        rows = []
        if self.capture is not None:
            err = _fmt_error(self.capture_error)
            rows.append(["capture", "exact", "yes", _fmt_s(self.capture.seconds), err, _capture_note(self.capture)])
        for r in self.records:
            changes = _fmt_changes(r.ops_added, r.ops_removed)
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v)
            detail = "; ".join(x for x in (stats, changes) if x) or "-"
            rows.append(
                [r.spec, r.contract, "yes" if r.modified else "no", _fmt_s(r.seconds), _fmt_error(r.error), detail]
            )
            rows.extend(["", "", "", "", "", f"note: {n}"] for n in r.notes)
        title = f"txcompile: {self.model} -> backend {self.backend}"
        if "total" in self.seconds:
            title += f" ({self.seconds['total']:.2f} s)"
        text = render_table(title, ["pass", "contract", "changed", "time", "error vs original", "what changed"], rows)
        if self.tokens is not None:
            tk = self.tokens
            batch, seq = tk["at"]
            cut = 1 - tk["flops_after_at"] / max(tk["flops_before_at"], 1)
            text += (
                f"\ntokens entering each block: {', '.join(tk['per_block'])} (T = {seq}: "
                f"{', '.join(map(str, tk['per_block_at']))})"
                f"\nblock FLOPs at B={batch}, T={seq}: {tk['flops_before_at'] / 1e9:.3g} G -> "
                f"{tk['flops_after_at'] / 1e9:.3g} G ({cut:.1%} removed)"
                + (f"; after: {tk['flops_after']}" if len(tk["flops_after"]) < 160 else "")
            )
        if self.quant is not None:
            text += "\n" + quant_table(self.quant)
        if self.early_exit is not None:
            text += "\n" + exit_summary(self.early_exit)
        if self.kernels:
            err = f" (vs unlowered: {_fmt_error(self.lowering_error)})" if self.lowering_error else ""
            text += "\nkernels: " + ", ".join(f"{k} x{n}" for k, n in self.kernels.items()) + err
        if self.fallbacks:
            text += f"\n{len(self.fallbacks)} node(s) run as plain ATen:" + "".join(
                f"\n  {len(names)} x {op}: {reason} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                for (op, reason), names in _by_reason(self.fallbacks).items()
            )
        return text

    def __repr__(self) -> str:
        return f"Report(model={self.model!r}, backend={self.backend!r}, passes={[r.spec for r in self.records]})"


def _by_reason(fallbacks: list[Fallback]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for f in fallbacks:
        groups.setdefault((f.op, f.reason), []).append(f.node)
    return groups


def render_table(title: str, header: list[str], rows: list[list[str]], width: int = 140) -> str:
    """A plain-text table rendered by rich (no colour codes), for reports, the CLI and test failures."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    out = io.StringIO()
    Console(file=out, width=width, no_color=True, color_system=None, force_terminal=False).print(table)
    return out.getvalue().rstrip()


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_error(error: dict[str, Any] | Any) -> str:
    if not error:
        return "-"
    if "cosine" in error:
        return f"cos {error['cosine']:.5f}, max abs {error['max_abs']:.2e}"
    return f"max abs {error['max_abs']:.2e}" + ("" if error.get("ok", True) else " (over tolerance)")


def _fmt_changes(added: dict[str, int], removed: dict[str, int]) -> str:
    parts = [f"+{n} {op}" for op, n in sorted(added.items())] + [f"-{n} {op}" for op, n in sorted(removed.items())]
    return " ".join(parts[:8]) + (" ..." if len(parts) > 8 else "")


def _capture_note(info: CaptureInfo) -> str:
    dyn = [f"{s.name}[{','.join(map(str, s.dynamic))}]" for s in info.inputs if s.dynamic]
    note = f"{info.model}; dynamic dims: {', '.join(dyn) if dyn else 'none'}"
    return note + "".join(f"; {w}" for w in info.warnings)


def quant_table(q: dict[str, Any]) -> str:
    """The per-layer table of a quantized program, with its weight bytes and measured speed."""
    rows = []
    for r in q["layers"]:
        bits = f"w{r['weight_bits']}" + (f"a{r['act_bits']}" if r.get("act_bits") else "")
        times = f"{r['float_ms']:.2f} -> {r['quant_ms']:.2f}" if "quant_ms" in r else "-"
        extra = ", ".join(x for x in (f"+{r['activation']}" if r["activation"] != "none" else "",
                                      f"{r['outliers']} fp cols" if r.get("outliers") else "") if x)  # fmt: skip
        calib = f"{r['calib_err']:.2%}" if r.get("calib_err") is not None else "-"
        alpha = "-" if r.get("alpha") is None else f"{r['alpha']:g}"
        out = f"{r['out_err']:.2%}" if "out_err" in r else "-"
        rows.append([r["layer"], bits, r["fold"], alpha, calib, out, times, extra])
    q_bytes = sum(r["weight_bytes"] for r in q["layers"])
    f_bytes = sum(r["float_weight_bytes"] for r in q["layers"])
    title = (f"quantize: scheme={q['scheme']} method={q['method']}; weights {f_bytes / 2**20:.2f} MiB -> "
             f"{q_bytes / 2**20:.2f} MiB ({q_bytes / max(f_bytes, 1):.2f}x)")  # fmt: skip
    header = ["layer", "bits", "reparam", "alpha", "act quant err", "output err", "kernel ms (float -> quant)", ""]
    text = render_table(title, header, rows)
    soft = q.get("softmax")
    if soft and soft["blocks"]:
        b = soft["blocks"]
        text += (f"\nattention probabilities: log2, {soft['bits']} bits, in {len(b)} blocks; on the example inputs "
                 f"{sum(x['rel_l1'] for x in b) / len(b):.2%} of each row's mass moved, "
                 f"{max(x['underflow'] for x in b):.2%} of probabilities underflow to 0 (worst block), "
                 f"row sums {min(x['row_sum_min'] for x in b):.3f}..{max(x['row_sum_max'] for x in b):.3f}"
                 )  # fmt: skip
    speed = q.get("speed")
    if speed:
        text += (f"\nspeed on the example inputs: {speed['before_ms']:.1f} ms -> {speed['after_ms']:.1f} ms, measured "
                 f"{speed['measured']:.2f}x, predicted from the layer times {speed['predicted']:.2f}x")  # fmt: skip
    return text


def exit_summary(e: dict[str, Any]) -> str:
    """Where rows leave an early-exit program, on the calibration data, and what that buys."""
    header = ["exit after block", *map(str, e["exit_blocks"]), "none (full model)"]
    rows = [["rows (simulated)", *map(str, e["distribution"])]]
    if "measured_distribution" in e:
        rows.append(["rows (measured)", *map(str, e["measured_distribution"])])
    rows.append(["agreement if all left here", *(f"{a:.4f}" for a in e["exit_agreement"]), "1"])
    thr = "inf (never exit)" if e["threshold"] == float("inf") else f"{e['threshold']:.4g}"
    title = (f"early_exit: criterion={e['criterion']} threshold={thr} heads={e['heads']}; {e['rows']} calibration "
             f"rows, {e['metric']} agreement {e['agreement']:.4f} (target {e['target_agreement']:g})")  # fmt: skip
    text = render_table(title, header, rows)
    text += f"\nexpected speedup (block FLOPs) {e['expected_speedup']:.2f}x"
    if "measured_speedup" in e:
        text += (f"; measured on the calibration data {e['full_ms']:.1f} ms -> {e['staged_ms']:.1f} ms, "
                 f"{e['measured_speedup']:.2f}x")  # fmt: skip
    return text
