"""Wall-clock comparisons measured in one run: interleaved rounds, warmed up, median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["median_seconds", "round_robin"]


def round_robin(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument candidate, timed in interleaved rounds so background load hits
    all of them alike."""
    import torch

    # GPU work is asynchronous: without a sync the clock would stop at the last launch, not at the last kernel.
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_seconds(fns: Sequence[Callable[..., Any]], inputs: Any, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Median latency of each fn on `inputs` (a tensor, tuple or dict), timed round-robin."""
    from .capture import normalize_inputs

    args, kwargs = normalize_inputs(inputs)
    calls = {str(i): (lambda fn=fn: fn(*args, **kwargs)) for i, fn in enumerate(fns)}
    return list(round_robin(calls, repeats, warmup).values())
