"""Without a CUDA device the Triton kernels run under the interpreter (CPU tensors, slow, correctness only).

This has to happen here rather than in the test module: `triton.jit` decides interpreted-or-compiled when the kernel
module is imported, and pytest imports this conftest before it imports (collects) any test module in this directory.
"""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tuning results and compiled kernels from test runs go to a scratch directory, not the user's ~/.cache/txcompile.
os.environ.setdefault("TXCOMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="txc-test-cache-"))
