"""The distributed backend, first increment: the tensor/pipeline-parallel plan and its predicted cost.

`make_plan(gm, tp=..., pp=..., ...)` decides the parallel style of every linear, the per-rank shards and the
pipeline stages, and predicts per-rank FLOPs, communication and the step time (`Plan.report()`, `Plan.to_json()`).
Execution on torch.distributed comes later; this backend is not registered in `txcompile.backends` yet.
"""

from __future__ import annotations

from .network import NETWORKS, Network, allgather_time, allreduce_time
from .plan import Plan, RankPlan, Shard, Stage, make_plan
from .shallow import capture_shallow, plan_for_hf_config

__all__ = [
    "NETWORKS",
    "Network",
    "Plan",
    "RankPlan",
    "Shard",
    "Stage",
    "allgather_time",
    "allreduce_time",
    "capture_shallow",
    "make_plan",
    "plan_for_hf_config",
]
