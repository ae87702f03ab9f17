"""Without a CUDA device the Triton kernels run under the interpreter (CPU tensors, slow, correctness only).

This has to happen here rather than in the test module: `triton.jit` decides interpreted-or-compiled when the kernel
module is imported, and pytest imports this conftest before it imports (collects) any test module in this directory.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
