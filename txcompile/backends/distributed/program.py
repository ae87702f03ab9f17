"""One rank's program: the tensor-parallel rewrite of the graph, cut to the rank's pipeline stage, with its shards.

Inside a torchrun job (every rank runs the same script):

    gm = txc.capture(model, inputs)
    plan = make_plan(gm, tp=2, pp=2, microbatches=4, batch=8, seq=128)
    program = parallelize(gm, plan)        # joins (or starts) the process group, checks the world size
    out = program(**inputs)                # the model's outputs, on every rank

`build_stage(structure, plan, rank)` is the same without weights or communication: what `convert` uses to decide which
tensors each rank's shard file holds.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from ...anatomy import anatomy
from ...errors import SpecError
from .pipeline import Stage, cat_microbatches, run_pipeline, split_stages
from .plan import Plan
from .plan import _try_tensor as _get
from .tensor_parallel import shard_graph, shard_tensor

__all__ = ["RankProgram", "build_stage", "init_distributed", "parallelize", "stage_tensors"]

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(SpecError):
    """A distributed launch that cannot work: wrong world size, a missing shard, a rank that failed to load."""


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the torchrun job's process group if this process has not (gloo on CPU, nccl on CUDA), with a timeout so
    that a rank that never arrives ends every rank's wait with an error instead of a hang."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise DistributedError(
            "not inside a torchrun job (RANK/WORLD_SIZE are not set): launch with "
            "`torchrun --nproc-per-node=N -m txcompile.run OUT` (N = the plan's world size), or call "
            "torch.distributed.init_process_group yourself first"
        )
    seconds = timeout_s if timeout_s is not None else float(os.environ.get("TXCOMPILE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))


def check_world(plan: Plan) -> int:
    """This process's rank, after checking the job has exactly the plan's ranks (raised on every rank alike)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if world != plan.world_size:
        raise DistributedError(
            f"the plan needs {plan.world_size} processes (tp={plan.tp} x pp={plan.pp}) but this job has {world}: "
            f"launch with `torchrun --nproc-per-node={plan.world_size} ...`"
        )
    return rank


@dataclass
class _Built:
    stage: Stage
    graph: fx.Graph
    targets: list[str]  # get_attr targets the stage reads


def build_stage(structure: fx.GraphModule, plan: Plan, rank: int, group: Any = None) -> _Built:
    """The stage graph of `rank` (tensor-parallel rewrite over `group`, then the pipeline cut); no tensors needed."""
    tp_rank, pp_rank = rank % plan.tp, rank // plan.tp
    if plan.tp > 1:
        graph, env = (tp := shard_graph(structure, plan, tp_rank, group)).graph, tp.env
    else:
        graph = fx.Graph()
        env = {}
        graph.graph_copy(structure.graph, env)
        out = next(n for n in structure.graph.nodes if n.op == "output")
        graph.output(fx.node.map_arg(out.args[0], lambda x: env[x]), type_expr=out.type)
    blocks = anatomy(structure).blocks
    if len(blocks) != plan.n_blocks:
        raise DistributedError(f"the plan has {plan.n_blocks} blocks but the program has {len(blocks)}")
    cuts = [env[blocks[s.blocks[0]].stream_in] for s in plan.stages[1:]]
    stage = split_stages(graph, cuts, env[blocks[0].stream_in])[pp_rank]
    targets = sorted({str(n.target) for n in stage.graph.nodes if n.op == "get_attr"})
    return _Built(stage, stage.graph, targets)


def stage_tensors(structure: fx.GraphModule, plan: Plan, rank: int, built: _Built) -> dict[str, torch.Tensor]:
    """The tensors rank `rank` holds (its shards of the split ones, whole copies of the rest), from `structure`'s real
    weights."""
    out: dict[str, torch.Tensor] = {}
    made: dict[tuple[int, Any], torch.Tensor] = {}  # tied weights (one tensor, several names) stay one tensor
    for t in built.targets:
        full = _get(structure, t)
        if isinstance(full, torch.Tensor):
            shard = plan.shards.get(t)
            key = (id(full), None if shard is None else (shard.dim, shard.parts, shard.pad_to))
            if key not in made:
                local = shard_tensor(full.detach(), shard, rank % plan.tp, plan.tp) if shard else full.detach()
                # A trainable copy of its own: an optimizer step on this rank must not write into the caller's model.
                made[key] = local.clone().requires_grad_() if full.requires_grad else local
            out[t] = made[key]
    return out


def _root(structure: fx.GraphModule, built: _Built, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    params: dict[int, torch.nn.Parameter] = {}
    for t in built.targets:
        value = tensors.get(t)
        if value is None:
            value = _get(structure, t)  # constants of the graph, and the subgraphs of higher-order ops
            if value is None or (isinstance(value, torch.Tensor) and value.is_meta):
                raise DistributedError(f"this rank's shard has no tensor {t!r}; convert the model again")
        *path, leaf = t.split(".")
        owner = root
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if id(value) not in params:
                params[id(value)] = torch.nn.Parameter(value.detach(), requires_grad=True)
            owner.register_parameter(leaf, params[id(value)])
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
    return root


class RankProgram(torch.nn.Module):
    """This rank's part of the model; called like the model on every rank (same inputs), returns the full outputs.

    `stage` is the rank's GraphModule (parameters: its shards, e.g. for an optimizer). With pp > 1 the last stage's
    outputs are broadcast to every rank (`outputs="last"`: other ranks return None).
    """

    def __init__(self, structure: fx.GraphModule, plan: Plan, rank: int, built: _Built,
                 tensors: Mapping[str, torch.Tensor], outputs: str = "all") -> None:  # fmt: skip
        super().__init__()
        self.plan, self.rank = plan, rank
        self.tp_rank, self.pp_rank = rank % plan.tp, rank // plan.tp
        self.stage = fx.GraphModule(_root(structure, built, tensors), built.graph)
        self.stage.eval()
        self.receives, self.sends = built.stage.receives, built.stage.sends
        self._codegen = structure.graph._codegen
        self._signature = inspect.signature(structure.forward)
        self.outputs = outputs
        params = [p for p in self.stage.parameters()]
        self.device = params[0].device if params else torch.device("cpu")

    def _flat(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise SpecError(f"inputs do not match the captured program's signature {self._signature}: {e}") from None
        bound.apply_defaults()
        ordered = list(bound.arguments.values())
        if hasattr(self._codegen, "pytree_info") and self._codegen.pytree_info is not None:
            return list(self._codegen.process_inputs(*ordered))
        return ordered

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat(args, kwargs)
        pp, tp = self.plan.pp, self.plan.tp
        prev = (self.pp_rank - 1) * tp + self.tp_rank if self.pp_rank > 0 else None
        nxt = (self.pp_rank + 1) * tp + self.tp_rank if self.pp_rank < pp - 1 else None
        count = self.plan.microbatches if pp > 1 else 1
        results = run_pipeline(self.stage, self.pp_rank, pp, flat, count, prev, nxt, self.device)
        out = None
        if results is not None:
            out = cat_microbatches(results)
            if hasattr(self._codegen, "pytree_info") and self._codegen.pytree_info is not None:
                out = self._codegen.process_outputs(out)
        if pp > 1 and self.outputs == "all":
            box = [out]
            dist.broadcast_object_list(box, src=(pp - 1) * tp)
            out = box[0]
        return out


def _groups(plan: Plan) -> Any:
    """This rank's tensor-parallel group; every rank creates every group, in the same order (torch.distributed's
    rule)."""
    if plan.tp == 1 or plan.pp == 1:
        return None
    mine = None
    for s in range(plan.pp):
        g = dist.new_group(list(range(s * plan.tp, (s + 1) * plan.tp)))
        if dist.get_rank() // plan.tp == s:
            mine = g
    return mine


def agree(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed `what`; all raise the same DistributedError (nobody is left waiting
    in a later collective)."""
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(box) if m is not None]
    if failed:
        lines = "\n".join(f"  rank {r}: {m}" for r, m in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {len(box)} ranks:\n{lines}") from error


def parallelize(gm: fx.GraphModule, plan: Plan, *, outputs: str = "all", timeout_s: float | None = None) -> RankProgram:
    """This rank's program for `plan`, with its shards cut from `gm`'s weights (Python API inside torchrun)."""
    check_world(plan)
    init_distributed(timeout_s)
    rank = check_world(plan)
    group = _groups(plan)
    error, program = None, None
    try:
        built = build_stage(gm, plan, rank, group)
        program = RankProgram(gm, plan, rank, built, stage_tensors(gm, plan, rank, built), outputs)
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree()
        error = e
    agree(error, "building the rank programs")
    assert program is not None
    return program
