"""Triton lowering backend: kernels live in `kernels/`, one file each, in tutorial layout (the `@triton.jit` kernel,
its Python launcher, a plain-torch reference with the same semantics, and a note on memory traffic).

Nothing here imports `triton` at module import time, so `txcompile` keeps working on machines without it; use
`available()` to ask before lowering to these kernels.
"""

from __future__ import annotations

__all__ = ["available"]


def available() -> bool:
    """True when the `triton` package can be imported (it says nothing about whether a GPU is present)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libtriton, ABI mismatch) is as good as none
        return False
    return True
