"""Calibration: run a captured program over example inputs and observe chosen nodes' values.

For every observed node (a linear's input, a norm's output) `observe` keeps per-channel statistics over all tokens of
all batches (min, max) and a random sample of rows (tokens) for the quantizers' clipping search. Rows are kept raw, so
any per-channel reparameterization can be applied to them afterwards without running the model again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from .verify import flatten_inputs

__all__ = ["ChannelStats", "observe", "progress_bar"]


@dataclass
class ChannelStats:
    """What calibration saw of one node's value [.., C]."""

    lo: Tensor  # [C] per-channel minimum
    hi: Tensor  # [C] per-channel maximum
    total: Tensor  # [C] per-channel sum (float64), for the mean
    rows: Tensor  # [R, C] a sample of rows, float32
    counts: list[int]  # rows seen per batch (the first batch is the example inputs)

    @property
    def mean(self) -> Tensor:
        return self.total / max(sum(self.counts), 1)

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())


class _Observer(fx.Interpreter):
    def __init__(
        self, gm: fx.GraphModule, nodes: set[fx.Node], per_batch: int, gen: torch.Generator, padding: fx.Node | None
    ):
        super().__init__(gm)
        self.nodes, self.per_batch, self.gen, self.padding = nodes, per_batch, gen, padding
        self.valid: Tensor | None = None  # this batch's [B, T] non-padding tokens
        self.stats: dict[fx.Node, ChannelStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n is self.padding:
            self.valid = out != 0
        if n in self.nodes and isinstance(out, Tensor) and out.is_floating_point():
            value = out.detach()
            if self.valid is not None and value.shape[:-1] == self.valid.shape:
                value = value[self.valid]  # padded positions compute junk nobody reads: keep them out of the ranges
            self._see(n, value.reshape(-1, value.shape[-1]).float())
        return out

    def _see(self, n: fx.Node, flat: Tensor) -> None:
        pick = torch.randperm(flat.shape[0], generator=self.gen)[: self.per_batch]
        lo, hi, rows = flat.amin(0), flat.amax(0), flat[pick.to(flat.device)].cpu()
        total = flat.double().sum(0).cpu()
        old = self.stats.get(n)
        if old is None:
            self.stats[n] = ChannelStats(lo.cpu(), hi.cpu(), total, rows, [flat.shape[0]])
        else:
            old.lo, old.hi = torch.minimum(old.lo, lo.cpu()), torch.maximum(old.hi, hi.cpu())
            old.rows, old.total = torch.cat([old.rows, rows]), old.total + total
            old.counts.append(flat.shape[0])


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (stdout belongs to the caller's tables and JSON), shown only on a terminal;
    yields the function that advances it by one step."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not enabled or not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def observe(
    gm: fx.GraphModule,
    nodes: Sequence[fx.Node],
    batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    max_rows: int = 2048,
    progress: bool = True,
    seed: int = 0,
    padding: fx.Node | None = None,
) -> dict[fx.Node, ChannelStats]:
    """Per-channel statistics of each node in `nodes` over `batches` of (args, kwargs), with a progress bar.

    `padding`, the program's [B, T] padding-mask input, restricts token-wise values to the real tokens."""
    gen = torch.Generator().manual_seed(seed)
    obs = _Observer(gm, set(nodes), max(1, max_rows // max(len(batches), 1)), gen, padding)
    with progress_bar("calibrating", len(batches), enabled=progress) as advance, torch.no_grad():
        for batch in batches:
            obs.run(*flatten_inputs(gm, batch))
            advance()
    missing = [n.name for n in nodes if n not in obs.stats]
    if missing:
        raise RuntimeError(f"calibration never saw a float value for: {', '.join(missing)}")
    return obs.stats
