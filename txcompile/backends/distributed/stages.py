"""Pipeline stages: contiguous runs of blocks that minimise the slowest stage's cost."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["partition"]


def partition(block_cost: Sequence[float], first: float, last: float, pp: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges for `pp` stages minimising the largest stage cost, `first` added to stage 0
    and `last` to the last stage (dynamic programme, O(pp * n^2))."""
    n = len(block_cost)
    prefix = [0.0]
    for c in block_cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest possible max stage cost putting blocks [0, j) into k stages.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                cost = prefix[j] - prefix[i] + (first if i == 0 else 0.0) + (last if j == n else 0.0)
                value = max(best[k - 1][i], cost)
                if value < best[k][j] - 1e-18:
                    best[k][j], cut[k][j] = value, i
    ranges, j = [], n
    for k in range(pp, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]
