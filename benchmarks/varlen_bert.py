"""Claim: padding-free execution (`unpad`) makes a BERT encoder on variable-length batches faster than padded eager.

ByteTransformer's set-up: a BERT-base config (12 layers, hidden 768, 12 heads; random weights; fp32 on CPU, fp16 on
CUDA by default), sequence lengths drawn uniformly from [0.2, 1.0] x max length (mean 60% of max), right padding.
Compared in one run, as ratios to eager padded (`attn_implementation="eager"`): eager with SDPA, `torch.compile` of
the SDPA model (padded), txcompile's eager backend after `unpad` (token-wise ops on the real tokens only, attention
per sequence) and, on a CUDA GPU, txcompile's Triton backend after `unpad` (fused add+LayerNorm, GELU epilogues and
the varlen attention kernel). Without a GPU the Triton row says "not measured"; it is never estimated.
Targets: CPU eager+unpad >= 1.4x eager padded at batch 16, max length 256; GPU fp16 triton+unpad >= 2x eager padded
and faster than torch.compile padded at batch 16, max length 512.

Timing: warm-up, then round-robin rounds (`--reps`), median. `--grid` runs ByteTransformer's batch {1, 8, 16} x max
length {128, 256, 512} grid (slow on a CPU). Writes varlen_bert.json to --out.

Run from the repository root:  python benchmarks/varlen_bert.py [--batch 16 --max-len 256] [--grid] [--no-compile]
[--device cuda --dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich import box
from rich.console import Console
from rich.table import Table

import txcompile as txc
from txcompile.timing import round_robin

log = Console(stderr=True, highlight=False)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bert(attn: str, small: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(attn_implementation=attn, **({"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads":
                                                    2, "intermediate_size": 512} if small else {}))  # fmt: skip
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=True).eval().to(device, dtype)


def batch_of(batch: int, max_len: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in _batch(batch, max_len, seed).items()}


def _batch(batch: int, max_len: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, round(0.2 * max_len)), max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len  # the batch is padded to max_len, as a serving system pads to its bucket
    ids = torch.randint(1000, 30000, (batch, max_len), generator=gen)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def point(args: argparse.Namespace, batch: int, max_len: int) -> dict[str, Any]:
    dev, dtype = args.device, DTYPES[args.dtype]
    inputs = batch_of(batch, max_len, seed=batch * 1000 + max_len, device=dev)
    eager, sdpa = bert("eager", args.quick, dev, dtype), bert("sdpa", args.quick, dev, dtype)
    sdpa.load_state_dict(eager.state_dict())
    log.print(f"batch {batch}, max {max_len}: optimize unpad")
    example = batch_of(4, 16, seed=0, device=dev)
    unpad = txc.optimize(sdpa, ["unpad"], example_inputs=example)
    assert unpad.report.records[-1].modified, unpad.report.records[-1].notes
    candidates = {"eager padded": lambda: eager(**inputs), "eager SDPA padded": lambda: sdpa(**inputs),
                  "txcompile eager + unpad": lambda: unpad(**inputs)}  # fmt: skip
    triton_note, kernels = "not measured: needs a CUDA GPU", None
    if dev == "cuda":
        # The lowering checks itself against the unlowered program on `example`; fp16 is held normwise.
        lowered = txc.optimize(sdpa, ["unpad"], example_inputs=example, backend="triton:tolerance_scale=4")
        kernels = lowered.report.kernels
        candidates["txcompile triton + unpad"] = lambda: lowered(**inputs)
    compile_s = None
    if not args.no_compile:
        compiled = torch.compile(sdpa, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(**inputs)
        compile_s = time.perf_counter() - start
        candidates["torch.compile padded"] = lambda: compiled(**inputs)
    real = inputs["attention_mask"].bool()
    errors = {}
    with torch.no_grad():
        ref = eager(**inputs).last_hidden_state[real].float()
        for name in ("txcompile eager + unpad", "txcompile triton + unpad"):
            if name in candidates:
                errors[name] = float((candidates[name]().last_hidden_state[real].float() - ref).abs().max())
    log.print(f"batch {batch}, max {max_len}: timing {len(candidates)} candidates x {args.reps} rounds")
    times = round_robin(candidates, args.reps)
    base = times["eager padded"]
    rows = [{"setting": k, "ms": t * 1e3, "speedup": base / t} for k, t in times.items()]
    if "txcompile triton + unpad" not in times:
        rows.append({"setting": "txcompile triton + unpad", "ms": None, "speedup": None, "note": triton_note})
    return {"batch": batch, "max_len": max_len, "real_fraction": float(real.float().mean()), "rows": rows,
            "max_abs_err_real_tokens": errors["txcompile eager + unpad"], "errors_real_tokens": errors,
            "triton_kernels": kernels, "compile_s": compile_s}  # fmt: skip


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"BERT-{'tiny' if result['args']['quick'] else 'base'} {result['args']['dtype']} on "
              f"{result['machine']['device']}, "
              "variable lengths (mean 60% of max), right padding", box=box.SIMPLE_HEAD)  # fmt: skip
    for col in ("batch", "max len", "real tokens", "setting", "ms", "vs eager padded"):
        t.add_column(col)
    for p in result["points"]:
        for r in p["rows"]:
            ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
            sp = r.get("note", "-") if r["speedup"] is None else f"{r['speedup']:.2f}x"
            t.add_row(str(p["batch"]), str(p["max_len"]), f"{p['real_fraction']:.0%}", r["setting"], ms, sp)
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--grid", action="store_true", help="ByteTransformer's batch x max-length grid")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--quick", action="store_true", help="smoke run: a 2-layer BERT, small batch, no compile")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=(*DTYPES, "auto"), default="auto", help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default="benchmarks/out/varlen_bert")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "fp16" if args.device == "cuda" else "fp32"
    if args.quick:
        args.batch, args.max_len, args.reps, args.no_compile = 4, 32, 2, True
    warnings.filterwarnings("ignore")
    grid = [(b, n) for n in (128, 256, 512) for b in (1, 8, 16)] if args.grid else [(args.batch, args.max_len)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result: dict[str, Any] = {"args": vars(args), "machine": {"platform": platform.platform(), "device": device,
                                                              "torch": torch.__version__}}  # fmt: skip
    with torch.no_grad():
        result["points"] = [point(args, b, n) for b, n in grid]
    console = Console(width=150)
    console.print(table(result))
    for pt in result["points"]:
        where = f"batch {pt['batch']}, max {pt['max_len']}"
        errs = ", ".join(f"{k} {v:.2e}" for k, v in pt["errors_real_tokens"].items())
        console.print(
            f"{where}: max abs difference to eager padded on the real tokens: {errs}; "
            f"torch.compile first call {pt['compile_s'] or 0:.1f} s"
        )
        if pt["triton_kernels"]:
            console.print(f"{where}: triton kernels {pt['triton_kernels']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "varlen_bert.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
