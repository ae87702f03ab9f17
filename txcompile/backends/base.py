"""The backend protocol: claim nodes with `supports`, lower what was claimed, run the rest as ATen, visibly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import fx

__all__ = ["Backend", "Fallback", "Lowered"]


@dataclass(frozen=True)
class Fallback:
    """A node the backend did not claim, left to run as plain ATen, and why."""

    node: str
    op: str
    reason: str


@dataclass
class Lowered:
    """A lowered program: call it like the model. `fallbacks` lists every node that runs as plain ATen."""

    program: Callable[..., Any]
    fallbacks: list[Fallback] = field(default_factory=list)
    kernels: dict[str, int] = field(default_factory=dict)  # fused kernel -> how many nodes groups it replaced
    error: dict[str, Any] | None = None  # the lowered program vs the unlowered one on the example inputs


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]

    def supports(self, node: fx.Node) -> bool | str:
        """True if the backend claims `node`, else the reason it does not."""
        ...

    def lower(self, gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False) -> Lowered:
        """Lower the claimed nodes; with `strict`, raise BackendError instead of falling back."""
        ...
