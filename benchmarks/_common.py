"""What benchmark scripts share: the machine record, the `--out` directory, atomic JSON writes and the consoles.

A benchmark's JSON should say on its own where its numbers come from: `machine(device)` records the device (GPU name,
compute capability and memory, or the CPU thread count), the platform and the torch / triton / CUDA versions.
`write_json` writes to a temporary file next to the target and renames it over the target, so an interrupted run
never leaves a truncated JSON behind. Progress goes to `log` (stderr); result tables to `console()` (stdout).

Imported by path from the scripts in this directory (`from _common import ...`): benchmarks/ is not a package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

__all__ = ["add_out_argument", "console", "log", "machine", "out_dir", "package_version", "write_json"]

log = Console(stderr=True, highlight=False)  # progress on stderr, results on stdout


def console(width: int = 160) -> Console:
    """The stdout console for result tables, wide enough that a table is not wrapped on a narrow terminal."""
    return Console(width=width)


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """`--out DIR`, by default benchmarks/out/<name> (relative to the working directory: run from the repo root)."""
    parser.add_argument(
        "--out", default=f"benchmarks/out/{name}", help="directory for the JSON and plot (default: %(default)s)"
    )


def out_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, created with its parents if missing."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def package_version(*names: str) -> str | None:
    """The installed version of the first distribution found among `names` (without importing it), else None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine(device: Any = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: device, platform, library versions and torch's thread count."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton", "pytorch-triton"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        info["device"] = f"CPU ({torch.get_num_threads()} threads)"
    return info


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically (temporary file in the same directory, then a rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a result file is meant to be read by others
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
