"""The eager backend: runs the rewritten GraphModule as is. Ground truth for every other backend and for tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx

from .base import Lowered


@dataclass(frozen=True)
class EagerBackend:
    name: ClassVar[str] = "eager"
    summary: ClassVar[str] = "run the rewritten ATen graph with PyTorch eager kernels (the reference)"

    def supports(self, node: fx.Node) -> bool | str:
        return True

    def lower(self, gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False) -> Lowered:
        return Lowered(program=gm)
