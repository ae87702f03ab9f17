"""Wall-clock comparisons measured in one run: round-robin, warmed up, median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["median_seconds"]


def median_seconds(fns: Sequence[Callable[..., Any]], inputs: Any, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Median latency of each fn on `inputs` (a tensor, tuple or dict), timed round-robin so background load hits all
    of them alike."""
    from .capture import normalize_inputs

    args, kwargs = normalize_inputs(inputs)
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(warmup):
                fn(*args, **kwargs)
        for _ in range(repeats):
            for fn, bucket in zip(fns, times):
                start = time.perf_counter()
                fn(*args, **kwargs)
                bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
