"""Claim: `sigma_reparam` and `qk_norm` make a small GPT less sensitive to the learning rate without warm-up (CPU).

The protocol of Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities", at CPU
scale: train one small model at log-spaced learning rates and compare final losses. At high LRs the attention logits
grow until the softmax saturates (entropy collapse) and the loss spikes or plateaus; qk-layernorm (Dehghani et al.
2023) and σReparam (Zhai et al. 2023) are mitigations. Each run:

- builds the same-seed `txcompile.models.reference` GPT (pre-LN, SDPA, untied head), rewrites it with
  `txcompile.optimize(model, passes)`, passes [] (baseline), ["sigma_reparam"] or ["qk_norm"], and trains the returned
  `OptimizedModule`: the rewritten graph itself is what is trained;
- learns characters of real English (stdlib docstrings, or `--text FILE`; the last 10% held out), same batches in the
  same order in every run, with AdamW(betas=(0.9, 0.95)) and weight decay 0 (`--weight-decay`; the paper's 1e-4 is
  LR-independent, torch's AdamW multiplies it by the LR, so 0 keeps the LR the only knob); no warm-up: cosine decay
  from the peak LR at step 0 to 0 at the end (`--warmup N`: the paper's linear warm-up, its first mitigation); no
  gradient clipping and no z-loss (`--z-loss 1e-4`: the paper's fix for output-logit divergence), so nothing masks
  the instabilities;
- stops at the first non-finite training loss (diverged); a finite loss far above the start is kept and shown with its
  peak;
- records `txcompile.analysis.attention_entropy` (minimum head entropy, max |attention logit|) on a fixed held-out batch
  every `--log-every` steps and at the end (for a diverged run: on its last logged finite weights).

LR sensitivity is the paper's exact form E_lr[min(loss(lr), loss_init) - min_lr loss(lr)], with loss_init the
variant's held-out loss at initialisation; a diverged run counts as loss_init. Lower is more stable.

Run from the repository root:  python benchmarks/stability_lr_sweep.py [--quick] [--variants baseline,qk_norm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import txcompile
from txcompile.models import reference

VARIANTS = {"baseline": [], "sigma_reparam": ["sigma_reparam"], "qk_norm": ["qk_norm"]}
# Modules whose import has side effects (opens a browser, prints, starts Tk) or that are test suites.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "readline", "ensurepip",
        "venv", "lib2to3", "pydoc_data", "webbrowser", "pty", "tty", "curses"}
log = Console(stderr=True, highlight=False)


def dump_stdlib_docs(path: str) -> None:
    """Write the docstrings of the stdlib's public modules, classes, functions and methods to `path`, deduplicated.

    Runs in a child process (see `corpus`), so nothing the imports do can touch the benchmark process.
    """
    import importlib
    import inspect

    warnings.simplefilter("ignore")
    docs: dict[str, None] = {}  # insertion-ordered set
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific modules (winreg, msvcrt, ...) and broken optional deps
            continue
        objs = [module]
        public = getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]
        for attr in sorted(set(map(str, public))):
            obj = getattr(module, attr, None)
            if inspect.isclass(obj):
                objs.append(obj)
                objs += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isroutine(v)]
            elif inspect.isroutine(obj):
                objs.append(obj)
        for doc in map(inspect.getdoc, objs):
            if doc:
                docs.setdefault(doc.strip())
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs))


def corpus(text_file: str | None) -> tuple[str, str]:
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            return f.read(), text_file
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "docs.txt")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--dump-corpus", path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        if proc.returncode != 0:
            sys.exit(f"collecting the stdlib docstrings failed:\n{proc.stderr[-2000:]}\n(use --text FILE instead)")
        with open(path, encoding="utf-8") as f:
            return f.read(), f"stdlib docstrings (Python {sys.version.split()[0]})"


def encode(text: str, cap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, validation ids, vocab size): the cap-1 most frequent training chars, every other char -> id 0."""
    split = int(0.9 * len(text))
    counts = Counter(text[:split])
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: cap - 1]
    ids = {c: i + 1 for i, c in enumerate(chars)}
    data = torch.tensor([ids.get(c, 0) for c in text], dtype=torch.long)
    return data[:split], data[split:], len(chars) + 1


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = data[starts[:, None] + torch.arange(seq + 1)]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def make_program(variant: str, vocab: int, args: argparse.Namespace) -> Any:
    # Untied head: PyTorch's N(0, 1) embedding init tied to the head would start the loss far above log(vocab).
    model = reference.build("gpt", seed=args.seed, dim=args.dim, heads=args.heads, depth=args.depth,
                            vocab_size=vocab, max_len=args.seq, tie_weights=False)
    # A fresh (2, 16) tensor: batch and length stay dynamic, and export guards no view's base.
    example = (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    return txcompile.optimize(model, VARIANTS[variant], example_inputs=example)


@torch.no_grad()
def val_loss(program: Any, val: tuple[torch.Tensor, torch.Tensor], batch: int) -> float:
    x, y = val
    total = 0.0
    for i in range(0, len(x), batch):
        logits = program(x[i:i + batch])
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum"))
    return total / y.numel()


def attention(program: Any, probe: torch.Tensor) -> dict[str, Any]:
    try:
        stats = txcompile.analysis.attention_entropy(program, probe)
    except txcompile.TxcError as e:  # reported, not fatal: one unsupported graph must not lose a 15-minute sweep
        return {"min_entropy": math.nan, "max_logit": math.nan, "error": str(e).splitlines()[0]}
    return {"min_entropy": stats.min_entropy, "max_logit": float(stats.max_logit.nan_to_num(nan=0.0).max()),
            "entropy": stats.entropy.tolist(), "max_logit_per_head": stats.max_logit.tolist()}


def train_one(variant: str, lr: float, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    program = make_program(variant, data["vocab"], args)
    optimize_s = time.perf_counter() - start
    loss_init = val_loss(program, data["val"], args.batch)
    program.train()
    params = [p for p in program.parameters() if p.requires_grad]
    # Decay matrices only (when --weight-decay > 0), the usual GPT practice: gains, biases and σReparam's γ are scales.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / (args.warmup + 1)) * 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)  # same batches, same order, in every run
    curve: list[dict[str, Any]] = []
    snapshot = {k: v.clone() for k, v in program.state_dict().items()}
    diverged_at, window = None, []
    train_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = windows(data["train"], torch.randint(0, len(data["train"]) - args.seq - 1, (args.batch,), generator=gen),
                       args.seq)
        logits = program(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        total = loss + args.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean() if args.z_loss else loss
        if not torch.isfinite(total):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        window.append(float(loss))
        if step % args.log_every == 0 or step == args.steps:
            att = attention(program, data["probe"])
            curve.append({"step": step, "train_loss": sum(window) / len(window), "min_entropy": att["min_entropy"],
                          "max_logit": att["max_logit"]})
            window = []
            if math.isfinite(curve[-1]["train_loss"]):
                snapshot = {k: v.clone() for k, v in program.state_dict().items()}
    step_s = (time.perf_counter() - train_start) / max(1, (diverged_at or args.steps + 1) - 1)
    if diverged_at is not None:
        # Weights are non-finite now; the attention statistics describe the last logged finite weights.
        program.load_state_dict(snapshot)
    program.eval()
    final = math.nan if diverged_at is not None else val_loss(program, data["val"], args.batch)
    if not math.isfinite(final) and diverged_at is None:
        diverged_at = args.steps  # finite training loss, non-finite validation loss: diverged all the same
    att = attention(program, data["probe"])
    return {"variant": variant, "lr": lr, "loss_init": loss_init, "final_val_loss": final, "diverged_at": diverged_at,
            "attention": att, "curve": curve, "optimize_s": optimize_s, "step_s": step_s,
            "attention_at_step": curve[-1]["step"] if diverged_at is not None and curve else args.steps,
            "peak_train_loss": max((c["train_loss"] for c in curve), default=math.nan),
            "wall_s": time.perf_counter() - start}


def sensitivity(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Wortsman et al.'s LR sensitivity E_lr[min(loss(lr), loss_init) - min_lr loss(lr)], diverged = loss_init."""
    init = runs[0]["loss_init"]
    eff = [init if r["diverged_at"] is not None else min(r["final_val_loss"], init) for r in runs]
    best = min(eff)
    return {"loss_init": init, "best_loss": best, "best_lr": runs[eff.index(best)]["lr"],
            "lr_sensitivity": sum(e - best for e in eff) / len(eff), "effective_losses": eff,
            "diverged": sum(r["diverged_at"] is not None for r in runs)}


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def fmt(x: float, spec: str = ".3f") -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return format(x, ".3g" if abs(x) >= 1e4 else spec)


def tables(runs: list[dict[str, Any]], summary: dict[str, Any], variants: list[str], lrs: list[float]) -> list[Table]:
    t = Table(title="Final validation loss | min attention entropy (nats) | max |attention logit|, per LR",
              title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("lr")
    for v in variants:
        t.add_column(f"{v} loss", justify="right")
        t.add_column("min H", justify="right")
        t.add_column("max logit", justify="right")
    for lr in lrs:
        row = [f"{lr:.2g}"]
        for v in variants:
            r = next(r for r in runs if r["variant"] == v and r["lr"] == lr)
            mark = "*" if r["diverged_at"] is not None else ""  # statistics taken before the divergence
            loss = f"diverged@{r['diverged_at']}" if r["diverged_at"] is not None else fmt(r["final_val_loss"])
            if r["diverged_at"] is None and r["peak_train_loss"] > r["loss_init"]:  # a loss spike it came back from
                loss += f" (peak {r['peak_train_loss']:.3g})"
            row += [loss, fmt(r["attention"]["min_entropy"]) + mark, fmt(r["attention"]["max_logit"], ".1f") + mark]
        t.add_row(*row)
    title = "LR sensitivity (Wortsman et al.): E_lr[min(loss, loss_init) - min_lr loss]; lower is more stable"
    s = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("variant", "loss at init", "best loss", "best lr", "LR sensitivity", "diverged runs",
                "vs baseline"):
        s.add_column(col)
    base = summary.get("baseline", {}).get("lr_sensitivity")
    for v in variants:
        m = summary[v]
        ratio = f"{m['lr_sensitivity'] / base:.2f}x" if base and v != "baseline" else "-"
        s.add_row(v, fmt(m["loss_init"]), fmt(m["best_loss"]), f"{m['best_lr']:.2g}", fmt(m["lr_sensitivity"]),
                  f"{m['diverged']}/{len(lrs)}", ratio)
    return [t, s]


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], variants: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["lr"])
        line, = ax.plot([r["lr"] for r in rs], summary[v]["effective_losses"], marker="o",
                        label=f"{v} (LR sensitivity {summary[v]['lr_sensitivity']:.3f})")
        div = [r for r in rs if r["diverged_at"] is not None]
        ax.scatter([r["lr"] for r in div], [r["loss_init"] for r in div], marker="x", s=90, color=line.get_color())
        ax2.plot([r["lr"] for r in rs], [r["attention"]["max_logit"] for r in rs], marker="o", label=v)
        ax2.scatter([r["lr"] for r in div], [r["attention"]["max_logit"] for r in div], marker="x", s=90,
                    color=line.get_color())
    ax.axhline(runs[0]["loss_init"], ls="--", color="grey", lw=1, label="loss at init (x: diverged)")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="min(final held-out loss, loss at init), nats/char",
           title=title)
    ax2.set(xscale="log", yscale="log", xlabel="peak learning rate", title="attention-logit growth",
            ylabel="max |attention logit| at end (x: before divergence)")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--lrs", default=",".join(f"{10 ** (-4 + 4 * i / 6):.2g}" for i in range(7)),
                   help="comma-separated peak learning rates (default: 7 log-spaced from 1e-4 to 1)")
    # Sized for <= 15 min on 2 shared cores: ~0.2 s per step on one thread, 21 runs x 150 steps. Depth 2 already shows
    # attention-logit growth and entropy collapse at lr >= 1e-2; deeper models only buy fewer steps in the budget.
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq", type=int, default=64, help="characters per training sequence")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW (LR-coupled) decay on matrices (default 0)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0: none)")
    p.add_argument("--z-loss", type=float, default=0.0, help="z-loss coefficient (default 0: off; the paper: 1e-4)")
    p.add_argument("--vocab", type=int, default=96, help="vocabulary cap; rarer characters share one id")
    p.add_argument("--val-windows", type=int, default=256, help="held-out windows of --seq chars for the val loss")
    p.add_argument("--log-every", type=int, default=25, help="steps between progress lines and attention stats")
    p.add_argument("--text", metavar="FILE", help="train on this UTF-8 text instead of the stdlib docstrings")
    p.add_argument("--seed", type=int, default=0)
    # 2 OpenMP threads on 2 cores shared with other jobs stall on each other's barriers: measured 9x slower per step.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run (~1 min): 2 LRs, dim 64, 30 steps")
    p.add_argument("--out", default="benchmarks/out/stability_lr_sweep", help="directory for the PNG and JSON")
    p.add_argument("--dump-corpus", help=argparse.SUPPRESS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # smaller defaults; explicit options still win
        p.set_defaults(lrs="1e-3,1e-1", dim=64, steps=30, batch=16, val_windows=64, log_every=15)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.lrs = sorted(float(x) for x in args.lrs.split(","))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dump_corpus:
        dump_stdlib_docs(args.dump_corpus)
        return 0
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    text, source = corpus(args.text)
    train, val, vocab = encode(text, args.vocab)
    log.print(f"corpus: {source}, {len(text):,} chars ({len(train):,} train / {len(val):,} held out), vocab {vocab}")
    starts = torch.linspace(0, len(val) - args.seq - 2, args.val_windows).long()  # evenly spread, fixed
    vx, vy = windows(val, starts, args.seq)
    data = {"train": train, "val": (vx, vy), "vocab": vocab, "probe": vx[:16].clone()}
    runs = []
    n = len(args.lrs) * len(args.variants)
    for lr in args.lrs:  # LR-major: an interrupted sweep still compares every variant on the LRs it finished
        for v in args.variants:
            r = train_one(v, lr, data, args)
            runs.append(r)
            end = f"diverged at step {r['diverged_at']}" if r["diverged_at"] else f"val {r['final_val_loss']:.3f}"
            curve = " ".join(f"{c['train_loss']:.2f}" for c in r["curve"])
            log.print(f"[{len(runs)}/{n}] {v:13s} lr {lr:.2g}: {end}, init {r['loss_init']:.2f}, min H "
                      f"{fmt(r['attention']['min_entropy'])}, max logit {fmt(r['attention']['max_logit'], '.1f')}; "
                      f"{r['wall_s']:.0f} s ({r['optimize_s']:.1f} s optimize, {1000 * r['step_s']:.0f} ms/step); "
                      f"train loss every {args.log_every}: {curve}")
            if "error" in r["attention"]:
                log.print(f"  attention_entropy failed: {r['attention']['error']}")
    summary = {v: sensitivity(sorted((r for r in runs if r["variant"] == v), key=lambda r: r["lr"]))
               for v in args.variants}
    total = time.perf_counter() - start
    out = Console(highlight=False, width=160)
    model = f"GPT dim {args.dim}, depth {args.depth}, {args.heads} heads, seq {args.seq}, batch {args.batch}, " \
            f"{args.steps} steps"
    out.print(f"{model}; AdamW(0.9, 0.95), wd {args.weight_decay}, cosine, warm-up {args.warmup or 'none'}, no "
              f"clipping, z-loss {args.z_loss or 'off'}; corpus {source} ({len(text):,} chars), vocab {vocab}; torch "
              f"threads {torch.get_num_threads()}")
    for table in tables(runs, summary, args.variants, args.lrs):
        out.print(table)
    out.print(f"*: the run diverged; its attention statistics are from the last logged finite weights. (peak x): the "
              f"training loss averaged over {args.log_every} steps rose to x, above the loss at init.")
    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "lr_sweep.png"), os.path.join(args.out, "lr_sweep.json")
    plot(runs, summary, args.variants, png, model)
    with open(js, "w") as f:
        json.dump(finite_or_none({"args": {k: v for k, v in vars(args).items() if k != "dump_corpus"}, "corpus": source,
                   "corpus_chars": len(text), "vocab": vocab, "runs": runs, "summary": summary, "total_s": total,
                   "torch": torch.__version__, "txcompile": txcompile.__version__}), f, indent=1)
    out.print(f"wrote {png} and {js}; sweep total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
