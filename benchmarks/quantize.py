"""Claim: the `quantize` pass makes trained Transformers smaller, and on a CPU faster, at a measured quality cost.

Two parts, each measured in this one run against the unmodified model (every ratio is against a baseline timed or
evaluated in the same run, on the same inputs):

1. all-MiniLM-L6-v2 (the real trained weights, offline) at batch 8 x 128 tokens, fp32 on this CPU. The timing batch
   holds the held-out sentences concatenated until every row has 128 real tokens. Programs: the unmodified Hugging
   Face model (fp32 eager, the 1.00x baseline); txcompile `fuse_qkv` alone (fp32, so the rewrite's own effect is
   visible); PyTorch's own CPU int8, `torch.ao.quantization.quantize_dynamic` of every `nn.Linear` (the peer
   baseline; reported as unavailable if this torch lacks it); and `fuse_qkv` followed by `quantize` in each scheme:
   w8a8 with RepQuant, SmoothQuant and naive per-tensor round-to-nearest (what reparameterization buys), w8a8 with
   LLM.int8()-style outlier columns, weight-only int8 (w8) and weight-only int4 in groups of 64 (w4). Columns: median
   latency, speed vs fp32 eager, bytes of the quantized block linears' weights vs their fp32 bytes (from the pass's
   report; for torch.ao from its packed int8 weights), and the cosine similarity of every held-out sentence
   embedding (mean-pooled, L2-normalised) to the unmodified model's. Calibration: CALIBRATION_SENTENCES in batches
   of 8; the held-out sentences are never calibrated on.
2. The digits ViT (txcompile.models.digits, trained once and cached): top-1 on the 359 test images per scheme (fp32,
   w8a8 RepQuant / RTN / SmoothQuant, w8, w4 with a group size that divides every block linear's inputs) and the
   drop in points. Calibration: a few batches of the train split.

`quantize` runs with `measure=false` (this benchmark does its own timing) and `min_cosine=-1` (it measures quality
itself, so no scheme is refused by the pass's own budget). Optimization (capture, calibration, the pass's search) is
not timed and runs on `--optimize-threads` (default 1) torch threads; the timed programs and the quality evaluation
run on `--threads`.

Timing: every program is warmed up, then all are timed round-robin (`--reps` rounds) so background load hits all
alike; the median call is reported. Writes quantize.json (or --json PATH) and quantize.png to --out.

Run from the repository root:  python benchmarks/quantize.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

import txcompile as txc
from txcompile.models import digits, minilm
from txcompile.timing import round_robin

log = Console(stderr=True, highlight=False)
_START = time.perf_counter()


def say(message: str) -> None:
    log.print(f"[{time.perf_counter() - _START:6.1f} s] {message}")


# (label, quantize spec): each runs after fuse_qkv. The first entries are the --quick subset.
MINILM_SCHEMES = [
    ("w8a8 repquant", "quantize:scheme=w8a8"),
    ("w8", "quantize:scheme=w8"),
    ("w8a8 smoothquant", "quantize:scheme=w8a8,method=smoothquant"),
    ("w8a8 rtn", "quantize:scheme=w8a8,method=rtn"),
    ("w8a8 repquant+outliers", "quantize:scheme=w8a8,outliers=true"),
    ("w4 g64", "quantize:scheme=w4,group_size=64"),
]
DIGITS_SCHEMES = [
    ("w8a8 repquant", "quantize:scheme=w8a8"),
    ("w8", "quantize:scheme=w8"),
    ("w8a8 rtn", "quantize:scheme=w8a8,method=rtn"),
    ("w8a8 smoothquant", "quantize:scheme=w8a8,method=smoothquant"),
    ("w4 g{group}", "quantize:scheme=w4,group_size={group}"),
]
QUICK_SCHEMES = 2
BENCH_OPTIONS = "measure=false,min_cosine=-1"  # we time and judge quality here, on held-out data


def cpu_description() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "quantized_engine": torch.backends.quantized.engine}  # fmt: skip


def optimize(model: nn.Module, spec: str | None, example: Any, calibration: list[Any], threads: int) -> Any:
    """`fuse_qkv`, then `spec` (a quantize spec) if given, run with `threads` torch threads (then restored).

    Calibration and the pass's search run thousands of small elementwise ops; with 2 threads on a 2-core machine that
    also runs other jobs each op waits for a descheduled thread (measured: 118 s for one w8a8 MiniLM pass, against
    15 s with 1 thread), so by default the (untimed) optimization runs on one thread."""
    passes = ["fuse_qkv"] + ([f"{spec},{BENCH_OPTIONS}"] if spec else [])
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return txc.optimize(model, passes, example_inputs=example, calibration_data=calibration or None)
    finally:
        torch.set_num_threads(previous)


def quant_summary(opt: Any) -> dict[str, Any]:
    """Weight bytes and bits of the quantized linears, from the pass's report."""
    layers = opt.report.quant["layers"]
    w_bits = ",".join(map(str, sorted({r["weight_bits"] for r in layers})))
    a_bits = ",".join(map(str, sorted({r["act_bits"] for r in layers if r.get("act_bits")}))) or "32"  # weight-only
    errs = [r["out_err"] for r in layers if r.get("out_err") is not None]
    return {"layers": len(layers), "weight_bytes": sum(r["weight_bytes"] for r in layers),
            "float_weight_bytes": sum(r["float_weight_bytes"] for r in layers),
            "bits": f"{w_bits}/{a_bits}",
            "mean_layer_out_err": statistics.mean(errs) if errs else None}  # fmt: skip


def block_linears(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The linears inside the Transformer blocks (what `quantize` covers by default: not the head or pooler)."""
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and hasattr(m, "in_features")}


def float_bytes(model: nn.Module, prefix: str) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in block_linears(model, prefix).values())


def packed_bytes(qmodel: nn.Module, prefix: str) -> int:
    """Bytes of torch.ao's packed int8 block weights: int8 values plus a float scale and int zero point per scale."""
    total = 0
    for m in block_linears(qmodel, prefix).values():
        w = m._packed_params._weight_bias()[0]
        scales = 1 if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric) else w.size(0)
        total += w.int_repr().numel() * w.int_repr().element_size() + 8 * scales
    return total


def group_size_for(model: nn.Module, prefix: str, cap: int) -> int:
    """The largest power of two <= cap that divides every block linear's in-features (w4's groups must tile them)."""
    common = math.gcd(*(m.in_features for m in block_linears(model, prefix).values()))
    group = 2
    while group * 2 <= cap and common % (group * 2) == 0:
        group *= 2
    if common % group:
        raise ValueError(f"no even group size divides the in-features (gcd {common})")
    return group


def timing_batch(tok: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """`batch` rows of `seq` real tokens: held-out sentences concatenated (row i starting at sentence i), truncated."""
    held = minilm.HELD_OUT_SENTENCES
    texts = [" ".join(held[(i + j) % len(held)] for j in range(len(held))) for i in range(batch)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    say("MiniLM: load all-MiniLM-L6-v2")
    model, tok = minilm.load_minilm()
    prefix = "encoder.layer."
    held = list(minilm.HELD_OUT_SENTENCES)
    calib_sentences = minilm.CALIBRATION_SENTENCES[: 16 if args.quick else None]
    calib = [minilm.example_inputs(tok, calib_sentences[i : i + 8]) for i in range(0, len(calib_sentences), 8)]
    inputs = timing_batch(tok, args.batch, args.seq)
    reference = minilm.encode(model, tok, held)
    fp32_bytes = float_bytes(model, prefix)
    candidates: dict[str, Callable[[], Any]] = {}
    rows: dict[str, dict[str, Any]] = {}

    def add(label: str, passes: str, program: Any, **info: Any) -> None:
        emb = minilm.encode(program, tok, held)
        cos = (emb * reference).sum(1)
        rows[label] = {"setting": label, "passes": passes, "cosine_mean": float(cos.mean()),
                       "cosine_min": float(cos.min()), **info}  # fmt: skip
        candidates[label] = lambda: program(**inputs)

    add("fp32 eager", "-", model, weight_bytes=fp32_bytes, float_weight_bytes=fp32_bytes, bits="32/32")
    say("MiniLM: optimize fuse_qkv")
    fused = optimize(model, None, calib[0], [], args.optimize_threads)
    add("txcompile fp32", "fuse_qkv", fused, weight_bytes=fp32_bytes, float_weight_bytes=fp32_bytes, bits="32/32")
    say("MiniLM: torch.ao.quantization.quantize_dynamic")
    try:
        from torch.ao.quantization import quantize_dynamic

        qmodel = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)  # a copy: the model is left as is
        add("torch.ao dynamic int8", "quantize_dynamic({nn.Linear}, qint8)", qmodel,
            weight_bytes=packed_bytes(qmodel, prefix), float_weight_bytes=fp32_bytes, bits="8/8 dyn")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the peer baseline is optional: report why it is missing
        say(f"MiniLM: torch.ao dynamic int8 unavailable: {type(exc).__name__}: {exc}")
        rows["torch.ao dynamic int8"] = {"setting": "torch.ao dynamic int8", "passes": "quantize_dynamic",
                                         "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    for label, spec in MINILM_SCHEMES[: QUICK_SCHEMES if args.quick else None]:
        say(f"MiniLM: optimize fuse_qkv,{spec} ({len(calib)} calibration batches)")
        start = time.perf_counter()
        # The first calibration batch is the capture example; the pass calibrates on it and the rest.
        opt = optimize(model, spec, calib[0], calib[1:], args.optimize_threads)
        add(label, f"fuse_qkv,{spec}", opt, optimize_s=time.perf_counter() - start, **quant_summary(opt))
    say(f"MiniLM: timing {len(candidates)} programs x {args.reps} rounds at {args.batch}x{args.seq}")
    times = round_robin(candidates, args.reps)
    base = times["fp32 eager"]
    out = []
    for label, row in rows.items():
        if label in times:
            row.update(latency_ms=times[label] * 1000, speedup=base / times[label],
                       weight_ratio=row["weight_bytes"] / row["float_weight_bytes"])  # fmt: skip
        out.append(row)
    return out


def digits_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    say("digits: load the trained ViT (trains and caches it on first use)")
    model = digits.load_or_train(threads=args.threads or None)
    prefix = "blocks."
    images, labels = digits.load_data("test")
    train, _ = digits.load_data("train")
    size, count = (32, 2) if args.quick else (64, 4)
    calib = [(train[i * size : (i + 1) * size],) for i in range(count)]
    group = group_size_for(model, prefix, cap=32)
    base_top1 = digits.accuracy(model, images, labels)
    fp32_bytes = float_bytes(model, prefix)
    rows = [{"setting": "fp32", "passes": "-", "top1": base_top1, "top1_drop": 0.0, "weight_bytes": fp32_bytes,
             "float_weight_bytes": fp32_bytes, "weight_ratio": 1.0, "bits": "32/32"}]  # fmt: skip
    for label, spec in DIGITS_SCHEMES[: QUICK_SCHEMES if args.quick else None]:
        label, spec = label.format(group=group), spec.format(group=group)
        say(f"digits: optimize fuse_qkv,{spec}")
        opt = optimize(model, spec, calib[0], calib[1:], args.optimize_threads)
        top1 = digits.accuracy(opt, images, labels)
        summary = quant_summary(opt)
        rows.append({"setting": label, "passes": f"fuse_qkv,{spec}", "top1": top1, "top1_drop": base_top1 - top1,
                     "weight_ratio": summary["weight_bytes"] / summary["float_weight_bytes"], **summary})  # fmt: skip
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def tables(result: dict[str, Any]) -> list[Table]:
    m, a = result["machine"], result["args"]
    cpu = f"{m['cpu']} ({m['capability']}, {m['threads']} threads)"
    title = (f"all-MiniLM-L6-v2, batch {a['batch']} x {a['seq']} tokens, CPU {cpu}: median of {a['reps']} "
             f"round-robin rounds; cosine on {result['held_out']} held-out sentences")  # fmt: skip
    text = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ("setting", "passes", "W/A bits", "latency ms", "vs fp32 eager", "weights MiB (vs fp32)",
                "cosine mean", "cosine min"):  # fmt: skip
        text.add_column(col)
    for r in result["minilm"]:
        if "error" in r:
            text.add_row(r["setting"], r["passes"], "-", "unavailable", "-", "-", "-", r["error"][:60])
            continue
        text.add_row(r["setting"], r["passes"], r["bits"], f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x",
                     f"{_mib(r['weight_bytes'])} ({r['weight_ratio']:.2f})", f"{r['cosine_mean']:.4f}",
                     f"{r['cosine_min']:.4f}")  # fmt: skip
    dig = Table(title="digits ViT (trained): top-1 on 359 test images", box=box.SIMPLE_HEAD)
    for col in ("setting", "passes", "W/A bits", "top-1 %", "drop (pts)", "weights KiB (vs fp32)"):
        dig.add_column(col)
    for r in result["digits"]:
        dig.add_row(r["setting"], r["passes"], r["bits"], f"{r['top1']:.2f}", f"{r['top1_drop']:.2f}",
                    f"{r['weight_bytes'] / 1024:.1f} ({r['weight_ratio']:.2f})")  # fmt: skip
    return [text, dig]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    pts = [r for r in result["minilm"] if "error" not in r]
    baselines = {"fp32 eager": "s", "txcompile fp32": "D", "torch.ao dynamic int8": "^"}
    for r in pts:  # the baselines get a legend entry (two sit on top of each other at 1.0), the schemes a label
        if r["setting"] in baselines:
            ax.plot([r["speedup"]], [r["cosine_mean"]], marker=baselines[r["setting"]], ls="", color="grey",
                    mfc="none" if r["setting"] == "txcompile fp32" else "grey", ms=8, label=r["setting"])  # fmt: skip
    schemes = [r for r in pts if r["setting"] not in baselines]
    ax.plot([r["speedup"] for r in schemes], [r["cosine_mean"] for r in schemes], marker="o", ls="", label="quantize")
    for r in schemes:
        ax.annotate(r["setting"], (r["speedup"], r["cosine_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set(xlabel="speed vs fp32 eager", ylabel="held-out embedding cosine vs fp32 (mean)",
           title=f"all-MiniLM-L6-v2, {result['args']['batch']}x{result['args']['seq']}, "
           f"{result['machine']['capability']} CPU")  # fmt: skip
    ax.legend(fontsize=8, loc="best")
    ax = axes[1]
    dig = result["digits"]
    ax.bar(range(len(dig)), [r["top1"] for r in dig], color=["grey"] + ["C0"] * (len(dig) - 1))
    ax.set_xticks(range(len(dig)), [r["setting"] for r in dig], rotation=20, fontsize=8)
    low = min(r["top1"] for r in dig)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.axhline(dig[0]["top1"] - 1, ls="--", color="grey", lw=1, label="1 point below fp32")
    ax.set(ylabel="top-1 % (test)", title="digits ViT (trained)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per row of the timing batch (default 128)")
    p.add_argument("--reps", type=int, default=15, help="timing rounds (default 15)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's choice)")
    p.add_argument("--optimize-threads", type=int, default=1,
                   help="torch threads while optimizing (untimed; default 1, 0: same as --threads)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: fewer schemes, calibration data and rounds")
    p.add_argument("--out", default="benchmarks/out/quantize", help="directory for the PNG and JSON")
    p.add_argument("--json", default=None, help="write the JSON here instead of OUT/quantize.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "quantize.json"
    result: dict[str, Any] = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, **cpu_description()},
        "held_out": len(minilm.HELD_OUT_SENTENCES),
    }
    result["minilm"] = minilm_rows(args)
    result["digits"] = digits_rows(args)
    say("done")
    console = Console(width=200)
    for table in tables(result):
        console.print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    written = [json_path]
    try:
        plot(result, out / "quantize.png")
        written.append(out / "quantize.png")
    except ImportError:
        say("matplotlib is not installed (pip install txcompile[bench]): no plot")
    console.print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
