"""The registered passes. This tuple is the registry: adding a pass is one file plus one line here."""

from __future__ import annotations

from .cleanup import Cleanup
from .fuse_qkv import FuseQKV
from .rmsnorm import RMSNorm

ALL_PASSES = (Cleanup, FuseQKV, RMSNorm)

__all__ = ["ALL_PASSES", "Cleanup", "FuseQKV", "RMSNorm"]
