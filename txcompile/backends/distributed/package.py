"""Distributed artifacts: what `txcompile convert --backend distributed:tp=2,pp=2 -o OUT` writes, and loading it on
every rank of a torchrun job.

OUT/ holds
    program.pt2                the program's graph, exported with its weights on the meta device (no data: a few
                               hundred KB whatever the model size); every rank rebuilds its own part from it
    plan.json                  the plan (`Plan.to_dict()`: ranks, stage boundaries, shard shapes and ranges, predicted
                               costs) plus, per rank, the tensors its stage reads and the values it receives and sends
    rank00000.safetensors ...  one file per rank: exactly the tensors its stage reads (its slices of split weights,
                               whole copies of replicated ones); tied names stored once ("txcompile.aliases")
    manifest.json              backend "distributed", its options, the launch command, the input specs and every
                               file's size and sha256
    report.txt, example_inputs.pt (when given), tokenizer/ (when given)

Launch: `torchrun --nproc-per-node=WORLD -m txcompile.run OUT --input FILE` (or `txcompile run` under torchrun).
Writing is atomic (the artifact module's hidden sibling directory, renamed at the end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ... import artifact as _art
from ...errors import ArtifactError
from .backend import DistributedBackend
from .program import DistributedError, RankProgram, agree, build_stage, init_distributed, stage_tensors
from .program import _groups as tp_groups
from .plan import Plan, make_plan
from .plan import _try_tensor as _get

__all__ = ["is_distributed", "load", "save"]

PLAN = "plan.json"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _plan_options(plan: Plan) -> dict[str, Any]:
    return {
        "tp": plan.tp, "pp": plan.pp, "microbatches": plan.microbatches, "schedule": plan.schedule,
        "batch": plan.batch, "seq": plan.seq, "dtype_bytes": plan.dtype_bytes, "training": plan.training,
        "network": plan.network.name, "efficiency": plan.efficiency, "name": plan.model,
    }  # fmt: skip


def _strip_weights(ep: Any) -> None:
    """Put the exported program's parameters and buffers on the meta device (the archive then holds no weight data);
    lifted constants (small tensors built inside forward) keep their values: the graph needs them on every rank."""
    for name, t in list(ep.state_dict.items()):
        meta = torch.empty_like(t, device="meta")
        ep.state_dict[name] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def save(opt: Any, out: str | os.PathLike[str], *, label: str, example_inputs: Any = None, tokenizer: Any = None,
         force: bool = False, report_text: str | None = None) -> Path:  # fmt: skip
    """Write `opt` (optimize(..., backend="distributed:...")) as a distributed artifact; return its path."""
    backend = getattr(opt, "backend", None)
    if not isinstance(backend, DistributedBackend):
        raise ArtifactError("save a program optimized with backend='distributed:tp=N,pp=M' here")
    gm, info = _art._program_of(getattr(opt, "graph_module", opt))
    trace_inputs = _art._program_inputs(info, example_inputs)
    target = Path(out)
    with _art._atomic_directory(target, force=force) as tmp:
        ep = _art._reexport(gm, info, trace_inputs)
        _strip_weights(ep)  # replaces entries of the program's own dict; the model's tensors are untouched
        torch.export.save(ep, tmp / _art.PROGRAM)
        structure = torch.export.load(tmp / _art.PROGRAM).module()
        plan = backend.plan(structure, trace_inputs, name=label)
        ranks = []
        for rank in range(plan.world_size):
            built = build_stage(structure, plan, rank)
            weights = [t for t in built.targets if _is_meta(_get(structure, t))]
            local = stage_tensors(gm, plan, rank, built)
            missing = [t for t in weights if t not in local]
            if missing:
                raise ArtifactError(f"the re-exported program reads {missing[:3]} which the optimized one lacks")
            tensors, aliases = _art._unique_tensors({t: local[t] for t in weights})
            meta = {"format": "pt", "txcompile.aliases": json.dumps(aliases, sort_keys=True), "rank": str(rank)}
            safetensors.torch.save_file(tensors, str(tmp / _rank_file(rank)), metadata=meta)
            ranks.append({"rank": rank, "file": _rank_file(rank), "tensors": built.targets,
                          "receives": built.stage.receives, "sends": built.stage.sends})  # fmt: skip
        data = plan.to_dict()
        data["stage_programs"] = ranks
        data["options"] = _plan_options(plan)
        (tmp / PLAN).write_text(json.dumps(data, indent=1) + "\n")
        if example_inputs is not None:
            torch.save(_art._by_name(info, trace_inputs), tmp / _art.EXAMPLES)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / _art.TOKENIZER))
        launch = f"torchrun --nproc-per-node={plan.world_size} -m txcompile.run {target} --input FILE"
        (tmp / "report.txt").write_text((report_text or str(getattr(opt, "report", ""))) + "\n\n" + plan.report()
                                        + f"\n\nlaunch: {launch}\n")  # fmt: skip
        manifest = _art._manifest(opt, info, ep, label, {"per_rank": [r["file"] for r in ranks]}, {})
        manifest.update({"backend": "distributed", "world_size": plan.world_size, "launch": launch,
                         "distributed": {"tp": plan.tp, "pp": plan.pp, "microbatches": plan.microbatches,
                                         "timeout_s": backend.timeout_s}})  # fmt: skip
        manifest["files"] = _art._file_table(tmp)
        (tmp / _art.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


def is_distributed(path: str | os.PathLike[str]) -> bool:
    try:
        return json.loads((Path(path) / _art.MANIFEST).read_text()).get("backend") == "distributed"
    except (OSError, ValueError):
        return False


def load(path: str | os.PathLike[str], *, outputs: str = "all", timeout_s: float | None = None) -> RankProgram:
    """This rank's program from a distributed artifact (call on every rank of the torchrun job)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact '{root}' does not exist; give the directory written by txcompile convert")
    manifest = _art._read_manifest(root)
    _art._check_version(root, manifest)
    if manifest.get("backend") != "distributed":
        raise ArtifactError(f"'{root}' is not a distributed artifact; load it with txcompile.artifact.load")
    world = int(manifest["world_size"])
    have = int(os.environ.get("WORLD_SIZE", "0")) or (torch.distributed.get_world_size()
                                                      if torch.distributed.is_initialized() else 1)  # fmt: skip
    if have != world:  # every rank sees the same numbers: every rank raises, nobody waits
        raise DistributedError(
            f"'{root}' was converted for {world} processes (tp={manifest['distributed']['tp']} x "
            f"pp={manifest['distributed']['pp']}) but this job has {have}: launch with "
            f"`torchrun --nproc-per-node={world} -m txcompile.run {root} ...`"
        )
    missing = [_rank_file(r) for r in range(world) if not (root / _rank_file(r)).is_file()]
    if missing:
        raise DistributedError(f"'{root}' lacks the shard file(s) {', '.join(missing)}; convert the model again")
    timeout = timeout_s if timeout_s is not None else manifest["distributed"].get("timeout_s")
    init_distributed(timeout)
    rank = torch.distributed.get_rank()
    error, program = None, None
    try:
        _art._check_files(root, manifest, verify=False)
        _art._import_pytree_types(root, manifest)
        structure = torch.export.load(root / _art.PROGRAM).module()
        data = json.loads((root / PLAN).read_text())
        plan = make_plan(structure, **data["options"])
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree()
        error = e
    agree(error, f"loading '{root}'")
    group = tp_groups(plan)
    try:
        built = build_stage(structure, plan, rank, group)
        tensors = safetensors.torch.load_file(str(root / _rank_file(rank)))
        with safetensors.safe_open(str(root / _rank_file(rank)), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("txcompile.aliases", "{}"))
        tensors.update({name: tensors[src] for name, src in aliases.items()})
        absent = [t for t in built.targets if t not in tensors and _is_meta(_get(structure, t))]
        if absent:
            raise DistributedError(f"{_rank_file(rank)} lacks {absent[:3]}; convert the model again")
        program = RankProgram(structure, plan, rank, built, tensors, outputs)
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree()
        error = e
    agree(error, f"building the rank programs of '{root}'")
    assert program is not None
    program.manifest = manifest  # type: ignore[assignment]
    program.tokenizer = _art._load_tokenizer(root / _art.TOKENIZER)  # type: ignore[assignment]
    return program
