"""The `txcompile` command.

    txcompile passes [--json]
    txcompile inspect [MODEL] [--passes SPEC] [--format text|dot|html] [-o FILE]
    txcompile convert [MODEL] --passes SPEC [--backend NAME] [--verify/--no-verify] [--calib FILE]
                      [--format pt2|onnx] -o OUT [--force]
    txcompile run OUT --input FILE [-o FILE] [--pool mean|none]

MODEL forms are described in `txcompile.sources` (default: minilm, the bundled real all-MiniLM-L6-v2). Any error the
user can fix prints one line on stderr and exits with status 2 (`--debug` keeps the traceback); nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _env
from .errors import InputError, SpecError, TxcError

DEFAULT_PIPELINE = "cleanup,fuse_qkv"


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _timing_inputs(source: Any) -> Any:
    """8 x 128 tokens for text models with a tokenizer (a realistic serving batch), else the example inputs."""
    if source.tokenizer is None or not isinstance(source.example_inputs, dict):
        return source.example_inputs
    from .models.minilm import HELD_OUT_SENTENCES

    enc = source.tokenizer(list(HELD_OUT_SENTENCES[:8]), padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt")  # fmt: skip
    return {k: enc[k] for k in source.example_inputs}


def _speed_table(source: Any, opt: Any) -> tuple[str, dict[str, float]]:
    import torch

    from .capture import eval_mode
    from .report import render_table
    from .timing import median_seconds

    inputs = _timing_inputs(source)
    with eval_mode(source.model):
        base, new = median_seconds([source.model, opt], inputs)
    shape = "x".join(str(s) for s in next(iter(inputs.values() if isinstance(inputs, dict) else inputs)).shape)
    rows = [
        ["original (eager)", f"{base * 1000:.1f} ms", "1.00x"],
        [f"txcompile ({opt.report.backend})", f"{new * 1000:.1f} ms", f"{base / new:.2f}x"],
    ]
    title = f"speed, measured in this run: input {shape}, {torch.get_num_threads()} threads, median of 10"
    return render_table(title, ["program", "latency", "speed vs original"], rows), {
        "original_s": base,
        "txcompile_s": new,
    }


def _optimize(source: Any, passes: str, *, backend: str, verify: bool, calib: Any, console: Any) -> Any:
    from .api import optimize

    with console.status("capturing") as status:
        return optimize(
            source.model, passes, example_inputs=source.example_inputs, calibration_data=calib, backend=backend,
            verify=verify, progress=lambda step: status.update(f"{step} ({source.label})"),
        )  # fmt: skip


def _validate_passes_and_backend(passes: str, backend: str) -> None:
    """Fail on a bad spec before loading anything (a model load can take seconds)."""
    from .backends import get_backend
    from .registry import resolve_passes

    resolve_passes(passes)
    get_backend(backend)


def cmd_passes(args: argparse.Namespace) -> int:
    from .registry import list_passes
    from .report import render_table

    infos = list_passes()
    if args.json:
        data = [
            {
                "name": i.name,
                "contract": i.contract,
                "summary": i.summary,
                "options": [{"name": o.name, "type": o.type, "default": o.default} for o in i.options],
            }
            for i in infos
        ]
        print(json.dumps(data, indent=2, default=str))
        return 0
    rows = [
        [i.name, i.contract, i.summary, ", ".join(f"{o.name}: {o.type} = {o.default}" for o in i.options) or "-"]
        for i in infos
    ]
    print(render_table("txcompile passes", ["pass", "contract", "what it does", "options"], rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import inspection
    from .anatomy import anatomy
    from .capture import capture
    from .sources import resolve_model

    if args.passes:
        _validate_passes_and_backend(args.passes, "eager")
    console = _console()
    with console.status(f"loading {args.model}"):
        source = resolve_model(args.model)
    if args.passes:
        opt = _optimize(source, args.passes, backend="eager", verify=True, calib=None, console=console)
        gm, records = opt.graph_module, opt.report.records
    else:
        with console.status(f"capturing {source.label}"):
            gm, records = capture(source.model, source.example_inputs), None
    if args.format == "dot":
        text = inspection.render_dot(gm, anatomy(gm))
    else:
        insp = inspection.build(gm, label=source.label, records=records)
        text = inspection.render_html(insp) if args.format == "html" else inspection.render_text(insp)
    if args.output:
        _write_text_atomically(Path(args.output), text)
        console.print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _write_text_atomically(path: Path, text: str) -> None:
    if path.is_dir():
        raise InputError(f"-o {path} is a directory; give a file name")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_convert(args: argparse.Namespace) -> int:
    from . import artifact, inspection
    from .report import render_table
    from .sources import read_inputs, resolve_model

    out = Path(args.output)
    _validate_passes_and_backend(args.passes, args.backend)
    if out.exists() and not args.force:
        raise InputError(f"output '{out}' already exists; pass --force to replace it")
    if args.calib and not Path(args.calib).is_file():
        raise InputError(f"--calib file '{args.calib}' does not exist")
    console = _console()
    with console.status(f"loading {args.model}"):
        source = resolve_model(args.model)
    calib = None
    if args.calib:
        keys = list(source.example_inputs) if isinstance(source.example_inputs, dict) else ()
        calib = read_inputs(args.calib, tokenizer=source.tokenizer, keys=keys, what="--calib")
    opt = _optimize(source, args.passes, backend=args.backend, verify=args.verify, calib=calib, console=console)
    if args.backend.strip().startswith("distributed"):
        return _convert_distributed(args, source, opt, out, console)
    with console.status("measuring speed against the original"):
        speed_text, speed = _speed_table(source, opt)
    report_text = f"{opt.report}\n\n{speed_text}"
    insp = inspection.build(opt.graph_module, label=source.label, records=opt.report.records)
    formats = ("pt2", "onnx") if args.format == "onnx" else ("pt2",)
    with console.status(f"writing {out} ({', '.join(formats)})"):
        path = artifact.save(
            opt, out, label=source.label, report_text=report_text, report_html=inspection.render_html(insp),
            tokenizer=source.tokenizer, formats=formats, force=args.force, reference=source.model,
            example_inputs=source.example_inputs, extra_manifest={"speed": speed},
        )  # fmt: skip
    print(report_text)
    manifest = json.loads((path / "manifest.json").read_text())
    rows = [[name, f"{info['bytes'] / 1e6:.1f} MB"] for name, info in sorted(manifest["files"].items())]
    print(render_table(f"wrote {path}", ["file", "size"], rows))
    if "onnx" in manifest:
        print(f"ONNX: onnx.checker passed; onnxruntime vs original max abs error {manifest['onnx']['max_abs']:.2e}")
    return 0


def _convert_distributed(args: argparse.Namespace, source: Any, opt: Any, out: Path, console: Any) -> int:
    from .backends.distributed import package
    from .report import render_table

    if args.format == "onnx":
        raise InputError("--format onnx cannot hold a tensor/pipeline-parallel program; use --backend eager for ONNX")
    with console.status(f"writing {out} (plan, per-rank shards)"):
        path = package.save(opt, out, label=source.label, example_inputs=source.example_inputs,
                            tokenizer=source.tokenizer, force=args.force)  # fmt: skip
    print((path / "report.txt").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    rows = [[name, f"{info['bytes'] / 1e6:.2f} MB"] for name, info in sorted(manifest["files"].items())]
    print(render_table(f"wrote {path}", ["file", "size"], rows))
    print(f"run it with: {manifest['launch']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .artifact import load
    from .capture import normalize_inputs
    from .report import render_table
    from .sources import read_inputs

    from .backends.distributed import package

    distributed = package.is_distributed(args.artifact)
    program = package.load(args.artifact) if distributed else load(args.artifact)
    lead = not distributed or torch.distributed.get_rank() == 0  # one rank prints and writes
    keys = [s["name"] for s in program.manifest.get("inputs", [])]
    batches = read_inputs(args.input, tokenizer=program.tokenizer, keys=keys)
    outputs, rows = [], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            inputs = normalize_inputs(batch, what="--input")
            out = program(*inputs[0], **inputs[1])
            if args.pool == "mean":
                from .models.minilm import mean_pool

                mask = inputs[1].get("attention_mask") if inputs[1] else None
                hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
                out = mean_pool(hidden, mask if mask is not None else torch.ones(hidden.shape[:2]))
            outputs.append(out)
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            rows.append([str(i), ", ".join("x".join(map(str, t.shape)) for t in leaves)])
    if lead:
        print(render_table(f"ran {args.artifact} on {args.input}", ["batch", "output shapes"], rows))
    if args.output and lead:
        _save_outputs(Path(args.output), outputs)
        print(f"wrote {args.output}")
    if distributed:
        torch.distributed.barrier()  # the output is complete before any rank exits
    return 0


def _save_outputs(path: Path, outputs: list[Any]) -> None:
    """Save run outputs atomically: .npy for tensor outputs (concatenated over batches), else .pt."""
    import torch

    if path.suffix == ".npy" and not all(isinstance(o, torch.Tensor) for o in outputs):
        raise InputError("-o .npy needs tensor outputs (use --pool mean, or a .pt file)")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if path.suffix == ".npy":
                import numpy as np

                np.save(f, torch.cat(outputs).numpy(), allow_pickle=False)
            else:
                torch.save([dict(o) if isinstance(o, dict) else o for o in outputs], f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txcompile", description="Verified graph rewrites for PyTorch Transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = (
        "minilm (default), digits, ref:vit|encoder|gpt, hf:NAME, a model or artifact directory, package.module:factory"
    )

    p = sub.add_parser("passes", help="list every pass with its options and contract")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_passes)

    p = sub.add_parser("inspect", help="anatomy, op counts, cost per block, and per-pass diffs")
    p.add_argument("model", nargs="?", default="minilm", help=model_help)
    p.add_argument("--passes", default="", help="run this pipeline first and show what each pass changed")
    p.add_argument("--format", choices=("text", "dot", "html"), default="text")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("convert", help="capture, rewrite, verify, lower and write an artifact directory")
    p.add_argument("model", nargs="?", default="minilm", help=model_help)
    p.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pass pipeline (default: {DEFAULT_PIPELINE})")
    p.add_argument("--backend", default="eager")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="check every pass")
    p.add_argument("--calib", help="calibration inputs: .jsonl/.txt text lines, .pt or .npy")
    p.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="onnx also writes a checked model.onnx")
    p.add_argument("-o", "--output", required=True, help="artifact directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("run", help="load an artifact in this process and run it on inputs from a file")
    p.add_argument("artifact", help="artifact directory written by convert")
    p.add_argument("--input", required=True, help=".jsonl/.txt text lines (tokenized), .pt or .npy tensors")
    p.add_argument("-o", "--output", help="save outputs (.pt, or .npy for tensor outputs)")
    p.add_argument("--pool", choices=("none", "mean"), default="none", help="mean: sentence embeddings")
    p.set_defaults(fn=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # torch's own pytree code warns about its deprecated LeafSpec check when graphs are copied; not actionable here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    args = _parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except TxcError as e:
        if args.debug or _env.debug():
            raise
        print(f"txcompile: error: {' | '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("txcompile: interrupted; nothing was written", file=sys.stderr)
        return 130


__all__ = ["main", "SpecError"]
