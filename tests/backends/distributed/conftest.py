"""Multi-process helpers: torchrun launches bounded in time, on CPU with the gloo backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str, timeout: float = 420, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc-per-node=nproc ARGS` (a free port each time); fail the test on timeout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TXCOMPILE_DIST_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {timeout} s (a hang): {' '.join(cmd)}\n{(e.stderr or '')[-3000:]}")


def worker() -> str:
    return str(HERE / "_worker.py")
