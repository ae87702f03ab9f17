"""txcompile: verified, compiler-style graph transformations for PyTorch Transformers.

    import txcompile as txc
    opt = txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=inputs)
    y = opt(**inputs)
    print(opt.report)
"""

from __future__ import annotations

from . import ops  # noqa: F401 - registers the txc:: custom ops, which loading saved programs needs
from . import analysis, exits
from .anatomy import Anatomy, anatomy
from .api import OptimizedModule, optimize
from .artifact import LoadedProgram, load
from .capture import capture
from .errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    InputError,
    PassError,
    SpecError,
    TxcError,
    VerificationError,
)
from .pipeline import Pass, PassContext, PassResult, Pipeline, count_ops
from .registry import list_passes, parse_spec
from .rewrite import Rule, rewrite

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "OptimizedModule",
    "capture",
    "load",
    "LoadedProgram",
    "anatomy",
    "Anatomy",
    "analysis",
    "exits",
    "list_passes",
    "parse_spec",
    "Pass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "Rule",
    "rewrite",
    "count_ops",
    "TxcError",
    "InputError",
    "SpecError",
    "CaptureError",
    "PassError",
    "VerificationError",
    "BackendError",
    "ArtifactError",
    "__version__",
]
