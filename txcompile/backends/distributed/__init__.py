"""The distributed backend: Megatron-style tensor parallelism and GPipe/1F1B-style pipeline stages, derived from the
captured graph and run with torch.distributed under torchrun.

- `make_plan(gm, tp=..., pp=..., ...)` (plan.py): the parallel style of every linear, the per-rank shards, the
  pipeline stages, and the predicted per-rank FLOPs, communication and step time (`Plan.report()`, `Plan.to_json()`).
- `parallelize(gm, plan)` (program.py): inside a torchrun job, this rank's program: the tensor-parallel graph rewrite
  (tensor_parallel.py, collectives.py) cut to its pipeline stage (pipeline.py), with its shards; called like the model.
- `backend="distributed:tp=2,pp=2"` (backend.py) in `optimize`; `save`/`load` (package.py) for
  `txcompile convert --backend distributed:...` and `torchrun -m txcompile.run OUT`.
"""

from __future__ import annotations

from .backend import DistributedBackend
from .network import NETWORKS, Network, allgather_time, allreduce_time
from .package import is_distributed, load, save
from .plan import Plan, RankPlan, Shard, Stage, make_plan
from .program import DistributedError, RankProgram, parallelize
from .shallow import capture_shallow, plan_for_hf_config
from .tensor_parallel import shard_graph, shard_tensor

__all__ = [
    "NETWORKS",
    "DistributedBackend",
    "DistributedError",
    "Network",
    "Plan",
    "RankPlan",
    "RankProgram",
    "Shard",
    "Stage",
    "allgather_time",
    "allreduce_time",
    "capture_shallow",
    "is_distributed",
    "load",
    "make_plan",
    "parallelize",
    "plan_for_hf_config",
    "save",
    "shard_graph",
    "shard_tensor",
]
