"""Run under torchrun by the tests: every rank builds the same models, runs its part and writes what it saw.

torchrun --nproc-per-node=W _worker.py OUT_DIR TP PP [--grad] [models...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import txcompile as txc
from txcompile.backends.distributed import make_plan, parallelize, shard_tensor
from txcompile.models import hf_zoo, reference


def build(name):
    torch.manual_seed(0)
    if name == "ref_gpt":
        model = reference.build("gpt")
        inputs = model.example_inputs()
        return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}
    model, inputs = hf_zoo.build(name)
    return model, (), inputs


def first_float(out):
    leaves = torch.utils._pytree.tree_leaves(out)
    return next(t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


def main() -> None:
    out_dir, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    grad = "--grad" in sys.argv
    names = [a for a in sys.argv[4:] if not a.startswith("--")]
    results = {}
    for name in names:
        model, args, kwargs = build(name)
        gm = txc.capture(model, kwargs or args)
        with torch.no_grad():
            ref = gm(*args, **kwargs)
        plan = make_plan(gm, tp=tp, pp=pp, microbatches=2 if pp > 1 else 1, batch=2, seq=8, training=grad)
        program = parallelize(gm, plan)
        with torch.no_grad():
            out = program(*args, **kwargs)
        pairs = list(zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)))
        entry = {
            "type": type(out).__name__ == type(ref).__name__,
            "leaves": len(pairs) == len(torch.utils._pytree.tree_leaves(ref)),
            "max_abs": max(float((a - b).abs().max()) for a, b in pairs),
            "scale": max(float(a.abs().max()) for a, _ in pairs),
            "receives": program.receives,
            "sends": program.sends,
        }
        if grad:
            params = dict(gm.named_parameters(remove_duplicate=False))
            for p in params.values():
                p.grad = None
            torch.manual_seed(1)
            weights = torch.randn_like(first_float(ref))
            (first_float(gm(*args, **kwargs)) * weights).sum().backward()
            (first_float(program(*args, **kwargs)) * weights).sum().backward()
            worst, scale, checked = 0.0, 0.0, 0
            for target, p in program.stage.named_parameters(remove_duplicate=False):
                full = params[target].grad
                if full is None and p.grad is None:  # not on the loss's path (BERT's pooler)
                    continue
                want = shard_tensor(full, plan.shards[target], program.tp_rank, tp) if target in plan.shards else full
                worst = max(worst, float((p.grad - want).abs().max()))
                scale = max(scale, float(want.abs().max()))
                checked += 1
            entry.update(grad_max_abs=worst, grad_scale=scale, grad_params=checked)
        results[name] = entry
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
