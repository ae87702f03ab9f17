"""Backends, by name. `get_backend("eager")` or a spec with options, parsed like pass specs."""

from __future__ import annotations

from typing import Any

from ..errors import SpecError
from .base import Backend, Fallback, Lowered
from .distributed.backend import DistributedBackend
from .eager import EagerBackend
from .triton.lowering import TritonBackend

ALL_BACKENDS: tuple[type, ...] = (EagerBackend, TritonBackend, DistributedBackend)

__all__ = [
    "ALL_BACKENDS",
    "Backend",
    "DistributedBackend",
    "EagerBackend",
    "Fallback",
    "Lowered",
    "TritonBackend",
    "get_backend",
]


def get_backend(backend: Any) -> Any:
    """A backend object from a name/spec string ("eager") or an object implementing the Backend protocol."""
    if isinstance(backend, Backend) and not isinstance(backend, type):
        return backend
    if not isinstance(backend, str):
        raise SpecError(f"backend must be a name like 'eager' or a Backend object, got {type(backend).__name__}")
    from ..registry import parse_options

    name, _, rest = backend.strip().partition(":")
    classes = {cls.name: cls for cls in ALL_BACKENDS}  # type: ignore[attr-defined]
    if name not in classes:
        raise SpecError(f"unknown backend '{name}'; valid backends: {', '.join(sorted(classes))}")
    return parse_options(classes[name], rest, f"backend '{name}'")
