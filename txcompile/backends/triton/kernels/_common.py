"""What every kernel module here shares: the optional `triton` import, the interpreter switch, and small pieces used
by several kernels (bf16 rounding that matches the GPU under the interpreter, grouped tile order, argument checks).
"""

from __future__ import annotations

import os

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel modules must import anyway: their launchers raise instead
    triton = None
    tl = None

__all__ = ["INTERPRET", "triton", "tl", "jit", "to_dtype", "grouped_tile", "describe", "launchable"]

# Read once, like triton's own `jit` does when it decides whether to build interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


@jit
def to_dtype(v, dtype: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    if BF16_RNE_BY_HAND and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16 where GPUs round to nearest even (Triton's default for downcasts),
        # which would make interpreted results disagree with the GPU's and torch's. Round by hand: adding 0x7FFF plus
        # the lowest kept bit carries into the kept bits past the halfway point, and on an exact tie only when that
        # bit is odd. (A NaN with an all-ones payload would wrap to zero; nothing here produces one.)
        u = v.to(tl.uint32, bitcast=True)
        u += 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: consecutive programs share the same W column block while it is still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    return pid_m, pid_n


def describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def launchable(t: Tensor, name: str) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} is on {t.device}; Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)")


if triton is not None and not INTERPRET:
    # Before any kernel here is compiled: Triton then keeps the binaries under txcompile's cache directory too.
    from ..tuning import use_disk_cache_for_compiled_kernels

    use_disk_cache_for_compiled_kernels()
