"""Claim: token merging and pruning, as graph passes, speed up real Transformers at a measured quality cost.

Three parts, each measured in this one run against the unmodified model:

1. Speed: a ViT-B/16 (Hugging Face `ViTForImageClassification`, default config, random weights) at 224x224,
   batch 8, fp32, on this CPU. Throughput of `token_merge` at r in {0, 4, 8, 16} and of `token_prune` at keep rates
   {0.7, 0.5} (EViT CLS attention) and 0.7 (Zero-TPrune PageRank) vs the unmodified eager model, and
   `torch.compile` of the unmodified model for context, and of the r=16 program (merges compose with compile).
   Target: r=16 >= 1.8x eager. Random weights make quality
   meaningless here, so these programs are checked with min_cosine=0 (only that they run and match in shape).
2. Quality on trained text: the real all-MiniLM-L6-v2 (mean-pooled, L2-normalised sentence embeddings) rewritten
   with the program captured on a padded batch; cosine similarity of every embedding to the unmodified model's, on
   the 16 held-out sentences (13-17 tokens) and on 10 paragraphs of four sentences (47-61 tokens). "FLOPs removed"
   is the cost model's (txcompile.cost) count over all blocks at the captured shape. Target: cosine >= 0.97 at a
   setting that removes >= 30% of the blocks' FLOPs.
3. Quality and speed on a trained vision model: the digits ViT (txcompile.models.digits, trained once and cached):
   top-1 on the 359 held-out test images, and the time of one forward over all of them vs the unmodified model.
   Target: top-1 drop <= 1 point at >= 1.4x.

Timing: every candidate is warmed up, then all are timed round-robin (`--reps` rounds) so background load hits all
alike; the median call is reported. Writes token_reduction.json and token_reduction.png to --out.

Run from the repository root:  python benchmarks/token_reduction.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local or built from a config

import torch
from rich import box
from rich.console import Console
from rich.table import Table

import txcompile as txc
from txcompile.models import digits, minilm
from txcompile.timing import round_robin

log = Console(stderr=True, highlight=False)

VIT_SETTINGS = ["token_merge:r=0", "token_merge:r=4", "token_merge:r=8", "token_merge:r=16",
                "token_prune:keep=0.7", "token_prune:keep=0.5", "token_prune:keep=0.7,score=pagerank"]  # fmt: skip
TEXT_SETTINGS = ["token_merge:flops=0.2", "token_merge:flops=0.2,metric=keys_concat",
                 "token_merge:flops=0.3", "token_merge:flops=0.3,metric=keys_concat", "token_merge:r=2,blocks=3:",
                 "token_prune:keep=0.7", "token_prune:keep=0.7,score=pagerank"]  # fmt: skip
DIGITS_SETTINGS = ["token_merge:r=4", "token_merge:r=8", "token_merge:r=12", "token_merge:r=12,schedule=decreasing",
                   "token_merge:r=16,schedule=decreasing", "token_prune:keep=0.7", "token_prune:keep=0.5",
                   "token_prune:keep=0.5,blocks=all"]  # fmt: skip


def optimize(model: torch.nn.Module, spec: str, inputs: Any, min_cosine: float | None = None) -> Any:
    if min_cosine is not None:
        spec += f",min_cosine={min_cosine}"
    return txc.optimize(model, [spec], example_inputs=inputs)


def flops_removed(opt: Any) -> float:
    tk = opt.report.tokens
    return 0.0 if tk is None else 1 - tk["flops_after_at"] / tk["flops_before_at"]


def vit_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import ViTConfig, ViTForImageClassification

    small = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 768}
    cfg = ViTConfig(num_labels=1000, **(small if args.quick else {}))
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg).eval()
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size)
    candidates: dict[str, Callable[[], Any]] = {"eager (unmodified)": lambda: model(images)}
    rows: dict[str, dict[str, Any]] = {"eager (unmodified)": {"flops_removed": 0.0}}
    programs = {}
    for spec in VIT_SETTINGS:
        log.print(f"ViT: optimize {spec}")
        opt = programs[spec] = optimize(model, spec, (images,), min_cosine=0.0)
        candidates[spec] = lambda opt=opt: opt(images)
        rows[spec] = {"flops_removed": flops_removed(opt), "tokens": (opt.report.tokens or {}).get("per_block_at")}
    if not args.no_compile:
        # The unmodified model, and the r=16 program: merged programs are plain PyTorch programs torch.compile takes.
        for name, target, removed in (("torch.compile (unmodified)", model, 0.0),
                                      ("torch.compile (token_merge:r=16)", programs["token_merge:r=16"].graph_module,
                                       rows["token_merge:r=16"]["flops_removed"])):  # fmt: skip
            log.print(f"ViT: {name} (first call compiles)")
            compiled = torch.compile(target)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(images)
            rows[name] = {"flops_removed": removed, "compile_s": time.perf_counter() - start}
            candidates[name] = lambda compiled=compiled: compiled(images)
    log.print(f"ViT: timing {len(candidates)} candidates x {args.reps} rounds")
    times = round_robin(candidates, args.reps)
    base = times["eager (unmodified)"]
    return [{"setting": name, "seconds": t, "images_per_s": args.batch / t, "speedup": base / t, **rows[name]}
            for name, t in times.items()]  # fmt: skip


def minilm_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tok = minilm.load_minilm()
    held = list(minilm.HELD_OUT_SENTENCES)
    every = list(minilm.HELD_OUT_SENTENCES + minilm.CALIBRATION_SENTENCES)
    sets = {"sentences": held, "paragraphs": [" ".join(every[i : i + 4]) for i in range(0, len(every) - 3, 4)]}
    rows = []
    for set_name, texts in sets.items():
        inputs = minilm.example_inputs(tok, texts, max_length=256)
        reference = minilm.encode(model, tok, texts, max_length=256)
        lengths = inputs["attention_mask"].sum(1)
        for spec in TEXT_SETTINGS[: 2 if args.quick else None]:
            log.print(f"MiniLM {set_name}: optimize {spec}")
            opt = optimize(model, spec, inputs, min_cosine=-1.0)
            cos = (minilm.encode(opt, tok, texts, max_length=256) * reference).sum(1)
            rows.append({"set": set_name, "setting": spec, "tokens": f"{int(lengths.min())}-{int(lengths.max())}",
                         "flops_removed": flops_removed(opt), "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min())})  # fmt: skip
    return rows


def digits_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = digits.load_or_train(threads=args.threads or None)
    images, labels = digits.load_data("test")
    example = digits.example_inputs()
    base_top1 = digits.accuracy(model, images, labels)
    programs: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {"unmodified": {"top1": base_top1, "flops_removed": 0.0}}
    for spec in DIGITS_SETTINGS[: 3 if args.quick else None]:
        log.print(f"digits: optimize {spec}")
        opt = optimize(model, spec, example, min_cosine=-1.0)
        programs[spec] = opt
        rows[spec] = {"top1": digits.accuracy(opt, images, labels), "flops_removed": flops_removed(opt)}
    candidates = {"unmodified": lambda: model(images), **{s: (lambda p=p: p(images)) for s, p in programs.items()}}
    times = round_robin(candidates, args.reps * 4)  # one call is ~0.25 s: more rounds for the same noise
    base = times["unmodified"]
    return [{"setting": name, "seconds": t, "speedup": base / t, "top1_drop": base_top1 - rows[name]["top1"],
             **rows[name]} for name, t in times.items()]  # fmt: skip


def tables(result: dict[str, Any]) -> list[Table]:
    vit = Table(title=f"ViT-B/16 224x224, batch {result['args']['batch']}, fp32 CPU: throughput", box=box.SIMPLE_HEAD)
    for col in ("setting", "images/s", "vs eager", "block FLOPs removed", "tokens per block"):
        vit.add_column(col)
    for r in result["vit"]:
        tokens = ",".join(map(str, r.get("tokens") or [])) or "-"
        vit.add_row(r["setting"], f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['flops_removed']:.1%}",
                    tokens)  # fmt: skip
    text = Table(title="all-MiniLM-L6-v2: sentence-embedding cosine vs unmodified", box=box.SIMPLE_HEAD)
    for col in ("texts", "tokens", "setting", "block FLOPs removed", "cosine mean", "cosine min"):
        text.add_column(col)
    for r in result["minilm"]:
        text.add_row(r["set"], r["tokens"], r["setting"], f"{r['flops_removed']:.1%}", f"{r['cosine_mean']:.4f}",
                     f"{r['cosine_min']:.4f}")  # fmt: skip
    dig = Table(title="digits ViT (trained): top-1 on 359 test images, one forward over all", box=box.SIMPLE_HEAD)
    for col in ("setting", "top-1 %", "drop (pts)", "speed vs unmodified", "block FLOPs removed"):
        dig.add_column(col)
    for r in result["digits"]:
        dig.add_row(r["setting"], f"{r['top1']:.2f}", f"{r['top1_drop']:.2f}", f"{r['speedup']:.2f}x",
                    f"{r['flops_removed']:.1%}")  # fmt: skip
    return [vit, text, dig]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for ax, kind in zip(axes[:1], ("vit",)):
        for family, marker in (("token_merge", "o"), ("token_prune", "s")):
            pts = [r for r in result[kind] if r["setting"].startswith(family)]
            ax.plot([r["flops_removed"] for r in pts], [r["speedup"] for r in pts], marker=marker, ls="", label=family)
            for r in pts:
                ax.annotate(r["setting"].split(":", 1)[1], (r["flops_removed"], r["speedup"]), fontsize=7)
        for r in result[kind]:
            if r["setting"] == "torch.compile (unmodified)":
                ax.axhline(r["speedup"], ls="--", color="grey", lw=1, label=r["setting"])
            elif r["setting"].startswith("torch.compile"):
                ax.plot([r["flops_removed"]], [r["speedup"]], marker="*", ms=12, ls="", label=r["setting"])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(xlabel="block FLOPs removed (cost model)", ylabel="throughput vs eager", title="ViT-B/16, CPU")
        ax.legend(fontsize=8)
    ax = axes[1]
    for set_name, marker in (("sentences", "o"), ("paragraphs", "s")):
        pts = [r for r in result["minilm"] if r["set"] == set_name]
        ax.plot([r["flops_removed"] for r in pts], [r["cosine_mean"] for r in pts], marker=marker, ls="",
                label=f"{set_name} (mean)")  # fmt: skip
    ax.axhline(0.97, ls="--", color="grey", lw=1, label="target 0.97")
    ax.axvline(0.30, ls=":", color="grey", lw=1)
    ax.set(xlabel="block FLOPs removed (cost model)", ylabel="embedding cosine vs unmodified", title="all-MiniLM-L6-v2")
    ax.legend(fontsize=8)
    ax = axes[2]
    pts = [r for r in result["digits"] if r["setting"] != "unmodified"]
    ax.plot([r["speedup"] for r in pts], [r["top1"] for r in pts], marker="o", ls="")
    for r in pts:
        ax.annotate(r["setting"].split(":", 1)[1], (r["speedup"], r["top1"]), fontsize=7)
    base = next(r for r in result["digits"] if r["setting"] == "unmodified")
    ax.axhline(base["top1"] - 1, ls="--", color="grey", lw=1, label="1 point below unmodified")
    ax.axvline(1.4, ls=":", color="grey", lw=1)
    ax.set(xlabel="speed vs unmodified", ylabel="top-1 %", title="digits ViT (trained)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timing rounds (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    p.add_argument("--quick", action="store_true", help="smoke run (~2 min): a small ViT, fewer settings")
    p.add_argument("--out", default="benchmarks/out/token_reduction", help="directory for the PNG and JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.reps, args.no_compile = min(args.reps, 2), True
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    result["vit"] = vit_speed(args)
    result["minilm"] = minilm_quality(args)
    result["digits"] = digits_quality(args)
    console = Console(width=160)
    for table in tables(result):
        console.print(table)
    (out / "token_reduction.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "token_reduction.png")
    console.print(f"wrote {out / 'token_reduction.json'} and {out / 'token_reduction.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
