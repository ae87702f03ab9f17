"""Runtime ops that rewrites introduce: `torch.library` custom ops in the `txc` namespace.

Each op has a fake (meta) implementation, so a rewritten program stays an ordinary PyTorch program: it re-exports,
saves as `.pt2`, loads in a new process after `import txcompile`, and compiles with `torch.compile`.
Importing this package registers the ops; `import txcompile` does it.
"""

from __future__ import annotations

from .sigma_reparam import SigmaReparamWeight, power_iteration_, sigma_reparam
from . import token_merge  # noqa: F401 - registers txc::bipartite_match, merge_tokens, unmerge_tokens
from . import token_prune  # noqa: F401 - registers txc::prune_plan
from . import quant  # noqa: F401 - registers txc::quantize_act, int8_linear, weight_only_linear
from . import log2_quant  # noqa: F401 - registers txc::log2_quantize
from . import early_exit  # noqa: F401 - registers txc::exit_* (scores, partition, positions, assemble)
from . import unpad  # noqa: F401 - registers txc::unpad_index, unpack_tokens, varlen_attention

__all__ = ["SigmaReparamWeight", "sigma_reparam", "power_iteration_"]
