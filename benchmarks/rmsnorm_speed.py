"""Claim: the exact `rmsnorm` pass (Pre-LN -> Pre-RMSNorm) makes an eager GPT-2-small faster, output unchanged.

Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers" report 1-10% shorter training and inference time from
replacing each Pre-LN LayerNorm by RMSNorm (one reduction instead of two) after centring the residual stream. Here:

1. Model. `transformers.GPT2LMHeadModel(GPT2Config(...))`, GPT-2-small shape by default (12 layers, 768 dim, 12 heads,
   50257-token vocab, tied LM head), random init (no download), `attn_implementation="sdpa"` as `hf_zoo` builds it.
2. Programs. `optimize(model, BASE)` is the baseline and `optimize(model, BASE + ["rmsnorm"])` the candidate, so the
   ratio isolates the pass. BASE is `--base-passes`, default `cleanup`: on HF GPT-2 `rmsnorm` alone declines (the
   position embedding reaches the residual stream through a no-op `aten.to`, which `cleanup` removes), and the
   script stops with the pass's note if it was not applied.
3. Inference. Median eager latency under `torch.no_grad()` per input shape (`--batch` x `--seq`), the two programs
   called round-robin after warm-up so background load hits both alike; ratio = baseline / rmsnorm (> 1: faster),
   with the spread of the per-round paired ratios. Max abs diff of the logits between the two programs.
4. Training step (`--train-reps`, 0 skips): forward + backward of the next-token loss at the first shape. Every
   floating weight is made trainable in both programs first, because `rmsnorm` registers its centred copies frozen
   and a smaller backward would otherwise look like a speed-up.
5. Norm op alone: `aten.layer_norm(x, w, b)` vs `aten.rms_norm(x, w) + b` (what the pass emits) vs `aten.rms_norm`
   on [B, T, dim], and the norms' share of one profiled forward, so the per-op gain can be set against model time.

CPU timings on a shared machine are noisy; quote absolute times only from a GPU (DESIGN.md "Benchmarks").
Run from the repository root:  python benchmarks/rmsnorm_speed.py [--layers 12 --batch 1 4 --seq 128 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only; nothing may touch the network

import torch
from rich import box
from rich.console import Console
from rich.table import Table

import txcompile

aten = torch.ops.aten
log = Console(stderr=True, highlight=False)  # progress on stderr, results on stdout


def quiet() -> None:
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.dim, n_head=args.heads, use_cache=False,
                                     attn_implementation="sdpa")
    # Built on the device: the captured graph bakes in the device of its arange/full constants.
    return transformers.GPT2LMHeadModel(config).to(args.device).eval(), config.vocab_size


def token_ids(vocab: int, batch: int, seq: int, seed: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def make_programs(model: torch.nn.Module, vocab: int, base: list[str], device: str
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    # A fresh tensor, not a slice: torch.export records guards on a view's base, which later calls would fail.
    example = {"input_ids": token_ids(vocab, 2, 16, 1, device)}
    progs, seconds = {}, {}
    for name, passes in (("baseline", base), ("rmsnorm", [*base, "rmsnorm"])):
        start = time.perf_counter()
        progs[name] = txcompile.optimize(model, passes, example_inputs=example)
        seconds[name] = time.perf_counter() - start
        log.print(f"  optimize({passes}): {seconds[name]:.1f} s")
    record = next(r for r in progs["rmsnorm"].report.records if r.name == "rmsnorm")
    if not record.modified:
        sys.exit(f"rmsnorm was not applied, nothing to measure: {'; '.join(record.notes)} "
                 f"(try --base-passes cleanup)")
    return progs, seconds


def round_robin(fns: dict[str, Callable[[], Any]], warmup: int, reps: int, device: str
                ) -> tuple[dict[str, list[float]], dict]:
    """Seconds per call for each candidate, interleaved, the order flipped every round; each one's last output."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    last: dict[str, Any] = {}
    for i in range(warmup + reps):
        for name, fn in list(fns.items())[:: 1 if i % 2 else -1]:
            sync(device)
            start = time.perf_counter()
            last[name] = fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, last


def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    b, r = times["baseline"], times["rmsnorm"]
    paired = [x / y for x, y in zip(b, r)]  # same round, same background load
    return {
        "baseline_ms": [1000 * t for t in b],
        "rmsnorm_ms": [1000 * t for t in r],
        "baseline_median_ms": 1000 * statistics.median(b),
        "rmsnorm_median_ms": 1000 * statistics.median(r),
        "ratio": statistics.median(b) / statistics.median(r),
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
    }


def inference(progs: dict[str, Any], vocab: int, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    ids = token_ids(vocab, batch, seq, 2, args.device)
    fns = {name: (lambda p=p: logits_of(p(input_ids=ids))) for name, p in progs.items()}
    with torch.no_grad():
        times, last = round_robin(fns, args.warmup, args.reps, args.device)
    result = {"shape": [batch, seq], **summarize(times)}
    result["max_abs_diff"] = float((last["baseline"] - last["rmsnorm"]).abs().max())
    result["max_abs_logit"] = float(last["baseline"].abs().max())
    return result


def training(progs: dict[str, Any], vocab: int, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    ids = token_ids(vocab, batch, seq, 3, args.device)
    for p in progs.values():
        p.train()
        for w in p.parameters():
            if w.is_floating_point():
                w.requires_grad_(True)

    def step(p: Any) -> float:
        logits = logits_of(p(input_ids=ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        # Free the gradients (0.5-0.7 GB for GPT-2 small) inside the step: kept across the other program's step, they
        # made whichever program ran second pay ~10% in page faults.
        p.zero_grad(set_to_none=True)
        return float(loss)

    times, last = round_robin({n: (lambda p=p: step(p)) for n, p in progs.items()}, 1, args.train_reps, args.device)
    for p in progs.values():
        p.zero_grad(set_to_none=True)
        p.eval()
    return {"shape": [batch, seq], **summarize(times), "loss_diff": abs(last["baseline"] - last["rmsnorm"])}


def norm_ops(batch: int, seq: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    """Per-call microseconds of the norm alone; blocks of calls, round-robin, median over blocks.

    With --compile-norms each function is also timed through torch.compile, i.e. as one fused kernel: that separates
    the arithmetic saving (one reduction, not two) from how well the eager kernels are implemented.
    """
    x = torch.randn(batch, seq, dim, device=args.device)
    w, b = torch.randn(dim, device=args.device), torch.randn(dim, device=args.device)

    def ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return aten.layer_norm(x, [dim], w, b, 1e-5)

    def rms_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return aten.rms_norm(x, [dim], w, 1e-5) + b

    def rms(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return aten.rms_norm(x, [dim], w, 1e-5)

    fns: dict[str, Callable[..., torch.Tensor]] = {"layer_norm": ln, "rms_norm + bias": rms_bias, "rms_norm": rms}
    if args.compile_norms:
        fns.update({f"compiled {k}": torch.compile(f, dynamic=False) for k, f in list(fns.items())})
    inner = 20
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for i in range(args.norm_reps + 1):
            for name, fn in fns.items():
                sync(args.device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn(x, w, b)
                sync(args.device)
                if i:  # the first block is warm-up (and compiles)
                    times[name].append((time.perf_counter() - start) / inner)
    us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    ratios = {"layer_norm / (rms_norm + bias)": us["layer_norm"] / us["rms_norm + bias"],
              "layer_norm / rms_norm": us["layer_norm"] / us["rms_norm"]}
    if args.compile_norms:
        ratios["compiled: layer_norm / (rms_norm + bias)"] = us["compiled layer_norm"] / us["compiled rms_norm + bias"]
    return {"shape": [batch, seq, dim], "us": us, "ratios": ratios}


def norm_share(progs: dict[str, Any], vocab: int, batch: int, seq: int, device: str) -> dict[str, Any]:
    """Fraction of one profiled forward spent in norm ops (total time incl. their children), per program.

    On CPU the rms_norm program's bias add is a separate aten.add and is not counted; on CUDA device time is used.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    ids = token_ids(vocab, batch, seq, 4, device)
    norm_names = {"aten::layer_norm", "aten::rms_norm"}
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, p in progs.items():
            p(input_ids=ids)  # warm
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                sync(device)
                start = time.perf_counter()
                p(input_ids=ids)
                sync(device)
                wall = time.perf_counter() - start
            events = [e for e in prof.key_averages() if e.key in norm_names]
            norm_us = sum(getattr(e, "device_time_total" if cuda else "cpu_time_total") for e in events)
            out[name] = {"calls": sum(e.count for e in events), "norm_ms": norm_us / 1000, "forward_ms": wall * 1000,
                         "share": norm_us / 1e6 / wall}
    return out


# --------------------------------------------------------------------------------------------------------------------


def speed_table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("shape", "baseline median", "rmsnorm median", "baseline / rmsnorm", "paired ratios (min..max)",
                "max abs diff"):
        t.add_column(col)
    for r in rows:
        diff = f"{r['max_abs_diff']:.2e} (|logit| max {r['max_abs_logit']:.1f})" if "max_abs_diff" in r \
            else f"loss diff {r['loss_diff']:.1e}"
        t.add_row(f"{r['shape'][0]}x{r['shape'][1]}, {len(r['baseline_ms'])} reps",
                  f"{r['baseline_median_ms']:.1f} ms", f"{r['rmsnorm_median_ms']:.1f} ms", f"{r['ratio']:.3f}",
                  f"{r['paired_ratio_min']:.3f} .. {r['paired_ratio_max']:.3f}", diff)
    return t


def norm_table(ops: dict[str, Any], share: dict[str, Any], layers: int) -> Table:
    b, s, d = ops["shape"]
    t = Table(title=f"Norm op alone on [{b}, {s}, {d}] (median per call) and norms' share of one profiled forward",
              title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("measurement", "value", "note"):
        t.add_column(col)
    for name, us in ops["us"].items():
        label = name if name.startswith("compiled") else f"aten.{name}"
        t.add_row(label, f"{us:.1f} us", "what rmsnorm emits" if name == "rms_norm + bias" else "")
    notes = {"layer_norm / (rms_norm + bias)": "per-op gain the pass gets (> 1: faster)",
             "layer_norm / rms_norm": "if the bias add were fused into the norm",
             "compiled: layer_norm / (rms_norm + bias)": "each side one fused kernel (torch.compile)"}
    for name, ratio in ops["ratios"].items():
        t.add_row(name, f"{ratio:.3f}", notes[name])
    t.add_section()
    for name, r in share.items():
        t.add_row(f"{name}: norm ops in forward", f"{100 * r['share']:.1f}% ({r['norm_ms']:.1f} ms)",
                  f"{r['calls']} calls ({2 * layers + 1} expected) of a {r['forward_ms']:.0f} ms forward")
    return t


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (default 12, GPT-2 small)")
    p.add_argument("--dim", type=int, default=768, help="hidden size (default 768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to time (default 1 4)")
    p.add_argument("--seq", type=int, nargs="+", default=[128], help="sequence lengths to time (default 128)")
    # Even counts: the call order flips every round, so each program runs first equally often.
    p.add_argument("--reps", type=int, default=4, help="timed forward calls per program and shape (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per program and shape first (default 1)")
    p.add_argument("--train-reps", type=int, default=4,
                   help="timed forward+backward steps at the first shape (default 4; 0 skips)")
    p.add_argument("--norm-reps", type=int, default=30, help="blocks of 20 norm calls per op (default 30)")
    p.add_argument("--base-passes", default="cleanup",
                   help="comma-separated passes both programs get before rmsnorm (default cleanup; '' for none)")
    p.add_argument("--compile-norms", action="store_true",
                   help="also time the norm ops through torch.compile (fused kernels; ~30 s of compiling on CPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    # 2 OpenMP threads on 2 cores shared with other jobs stall on each other's barriers (seen: 9x slower, and a 100x
    # slower layer_norm in some rounds), which swamps a few-percent effect. One thread keeps the ratio meaningful.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write all numbers as JSON to OUT")
    args = p.parse_args(argv)
    if min(args.batch + args.seq + [args.reps, args.layers]) < 1 or args.train_reps < 0 or args.warmup < 0:
        p.error("sizes and --reps must be >= 1; --train-reps and --warmup >= 0")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    base = [s for s in args.base_passes.split(",") if s]
    shapes = [(b, s) for b in args.batch for s in args.seq]
    log.print(f"[1/5] GPT-2 config: {args.layers} layers, dim {args.dim}, {args.heads} heads (random init)")
    model, vocab = build_model(args)
    log.print("[2/5] optimize: baseline and rmsnorm")
    progs, opt_s = make_programs(model, vocab, base, args.device)
    del model  # the programs own their weights
    log.print("[3/5] inference latency, round-robin")
    infer = []
    for b, s in shapes:
        infer.append(inference(progs, vocab, b, s, args))
        log.print(f"  {b}x{s}: ratio {infer[-1]['ratio']:.3f}")
    train = None
    if args.train_reps:
        log.print(f"[4/5] training step (forward + backward) at {shapes[0][0]}x{shapes[0][1]}")
        train = training(progs, vocab, *shapes[0], args)
    log.print("[5/5] norm op alone and norms' share of the forward")
    ops = norm_ops(*shapes[0], args.dim, args)
    share = norm_share(progs, vocab, *shapes[0], args.device)
    loadavg = (load_start, os.getloadavg()[0])
    total = time.perf_counter() - start

    out = Console(highlight=False, width=150)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out.print(f"device: {where} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores) | torch "
              f"threads: {torch.get_num_threads()} | torch {torch.__version__} | txcompile {txcompile.__version__} | "
              f"load avg start/end {loadavg[0]:.2f}/{loadavg[1]:.2f}")
    names = f"optimize({base}) vs optimize({[*base, 'rmsnorm']})"
    out.print(speed_table(infer, f"Inference, torch.no_grad: {names} (ratio > 1: rmsnorm faster)"))
    if train is not None:
        out.print(speed_table([train], "Training step (forward + backward, all weights trainable)"))
    out.print(norm_table(ops, share, args.layers))
    out.print(str(progs["rmsnorm"].report))
    out.print(f"paper: 1-10% faster (ratio 1.01-1.10); optimize {opt_s['baseline']:.1f} s / {opt_s['rmsnorm']:.1f} s; "
              f"benchmark total {total:.0f} s")
    if args.json:
        results = {
            "env": {"device": where, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "txcompile": txcompile.__version__, "loadavg_start_end": list(loadavg)},
            "model": {"family": "GPT2LMHeadModel", "layers": args.layers, "dim": args.dim, "heads": args.heads,
                      "vocab": vocab, "attn_implementation": "sdpa", "seed": args.seed},
            "passes": {"baseline": base, "rmsnorm": [*base, "rmsnorm"]},
            "optimize_s": opt_s,
            "inference": infer,
            "training": train,
            "norm_ops": ops,
            "norm_share": share,
            "total_s": total,
        }
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
        out.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
