"""The `distributed` backend: `optimize(model, backend="distributed:tp=2,pp=2")`.

Inside a torchrun job with the plan's world size, `lower` returns this rank's `RankProgram` (checked against the
unpartitioned program on the example inputs, on every rank); anywhere else it plans (so a bad `tp` fails here, with the
valid choices) and runs the program unpartitioned in this process, which is what `txcompile convert` needs before it
writes the per-rank files (`package.save`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import fx

from ..base import Fallback, Lowered
from .plan import Plan, make_plan

__all__ = ["DistributedBackend"]


def _batch_seq(example_inputs: Any) -> tuple[int, int]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim()]
    if not leaves:
        return 1, 1
    shape = leaves[0].shape
    return int(shape[0]), int(shape[1]) if len(shape) > 1 else 1


@dataclass(frozen=True)
class DistributedBackend:
    """tp: tensor-parallel ranks; pp: pipeline stages; microbatches per step (pp > 1); schedule: 1f1b | gpipe (the
    same in a forward-only run; the plan's memory note differs); batch, seq: the step's shape for the plan's cost
    report (0: the example inputs'); network: a `NETWORKS` preset for the report; timeout_s: how long a rank waits for
    the others before failing; verify: check the rank program against the unpartitioned one (inside torchrun)."""

    name: ClassVar[str] = "distributed"
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    batch: int = 0
    seq: int = 0
    network: str = "h100-nvlink"
    timeout_s: float = 300.0
    verify: bool = True

    def supports(self, node: fx.Node) -> bool | str:
        return True

    def plan(self, gm: fx.GraphModule, example_inputs: Any, name: str | None = None) -> Plan:
        batch, seq = _batch_seq(example_inputs)
        batch, seq = self.batch or batch, self.seq or seq
        micro = self.microbatches if self.microbatches <= batch else batch
        return make_plan(gm, tp=self.tp, pp=self.pp, microbatches=micro, schedule=self.schedule,
                         batch=batch - batch % micro, seq=seq, network=self.network, dtype_bytes=4,
                         name=name)  # fmt: skip

    def lower(self, gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False) -> Lowered:
        from ...verify import compare, run_program
        from .program import parallelize

        plan = self.plan(gm, example_inputs)
        in_job = dist.is_initialized() or "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if not in_job:
            why = (f"not inside a torchrun job: runs unpartitioned in this process; `txcompile convert --backend "
                   f"distributed:tp={self.tp},pp={self.pp}` writes the {plan.world_size}-rank program")  # fmt: skip
            lowered = Lowered(gm, [Fallback("*", "distributed", why)])
            lowered.plan = plan  # type: ignore[attr-defined]
            return lowered
        program = parallelize(gm, plan, timeout_s=self.timeout_s)
        error = None
        if self.verify:
            error = compare(run_program(gm, example_inputs), run_program(program, example_inputs)).as_dict()
        lowered = Lowered(program, [], {"tensor_parallel_rank": 1}, error)
        lowered.plan = plan  # type: ignore[attr-defined]
        return lowered
