"""The registered passes. This tuple is the registry: adding a pass is one file plus one line here."""

from __future__ import annotations

from .cleanup import Cleanup
from .early_exit import EarlyExit
from .fold_sigma_reparam import FoldSigmaReparam
from .fuse_qkv import FuseQKV
from .qk_norm import QKNorm
from .quantize import Quantize
from .rmsnorm import RMSNorm
from .sigma_reparam import SigmaReparam
from .token_merge import TokenMerge
from .token_prune import TokenPrune
from .unpad import UnPad

ALL_PASSES = (
    Cleanup, FuseQKV, RMSNorm, SigmaReparam, FoldSigmaReparam, QKNorm, TokenMerge, TokenPrune, Quantize, EarlyExit,
    UnPad,
)  # fmt: skip

__all__ = [
    "ALL_PASSES",
    "Cleanup",
    "FuseQKV",
    "RMSNorm",
    "SigmaReparam",
    "FoldSigmaReparam",
    "QKNorm",
    "TokenMerge",
    "TokenPrune",
    "Quantize",
    "EarlyExit",
    "UnPad",
]
