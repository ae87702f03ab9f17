"""Paper plans for models that do not fit here: GPT-2-XL and Llama-7B on 8 H100s (tensor x pipeline parallel).

    python benchmarks/distributed_plan.py [--batch 16 --seq 1024 --microbatches 8 --inference] [--out DIR]

Each model is captured as a 2-block copy at full width on the meta device (no weights allocated) and its blocks are
scaled to the real depth. Prints the assumptions, each plan's report (or the reason a plan is invalid) and writes
one plan JSON per valid plan plus summary.json to benchmarks/out/distributed_plan/. Predictions, not measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import add_out_argument, console, log, machine, out_dir, write_json  # noqa: E402

from txcompile.backends.distributed import NETWORKS, make_plan  # noqa: E402
from txcompile.backends.distributed.shallow import capture_shallow  # noqa: E402
from txcompile.errors import SpecError  # noqa: E402


def models():
    import transformers

    return {
        "gpt2-xl": (
            transformers.GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),
            "GPT2LMHeadModel",
            [(8, 1), (4, 2), (1, 8), (5, 1), (2, 4)],
        ),
        "llama-7b": (
            transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
            "LlamaForCausalLM",
            [(8, 1), (4, 2), (2, 4), (1, 8)],
        ),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=None, help="default: 1024 (GPT-2-XL), 4096 (Llama-7B)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--network", default="h100-nvlink", choices=sorted(NETWORKS))
    parser.add_argument("--efficiency", type=float, default=0.5)
    parser.add_argument("--inference", action="store_true", help="forward only (default: a training step)")
    add_out_argument(parser, "distributed_plan")
    args = parser.parse_args()
    out = out_dir(args.out)
    con = console()
    net = NETWORKS[args.network]
    con.print(f"assumptions (model inputs, not measurements): {net.description}; matmuls at {args.efficiency:.0%} "
              f"of peak; ring all-reduce 2(n-1)/n*bytes*beta + 2(n-1)*alpha; no compute/communication overlap; "
              f"{'inference' if args.inference else 'training step (backward = 2 x forward)'}; 2-byte weights and "
              f"activations; batch {args.batch}, {args.microbatches} microbatches, 1F1B", highlight=False)  # fmt: skip
    summary = {"machine": machine("cpu"), "network": net.to_dict(), "plans": []}
    for name, (config, cls, layouts) in models().items():
        seq = args.seq or (1024 if name == "gpt2-xl" else 4096)
        log.print(f"capturing a 2-block {name} on the meta device")
        gm, depth = capture_shallow(config, cls)
        for tp, pp in layouts:
            entry = {"model": name, "tp": tp, "pp": pp, "seq": seq}
            try:
                plan = make_plan(gm, tp=tp, pp=pp, microbatches=args.microbatches, batch=args.batch, seq=seq,
                                 depth=depth, training=not args.inference, network=net, efficiency=args.efficiency,
                                 name=name)  # fmt: skip
            except SpecError as err:
                con.print(f"\n{name} tp={tp} x pp={pp}: INVALID: {err}", highlight=False)
                summary["plans"].append({**entry, "error": str(err)})
                continue
            con.print("\n" + plan.report(), highlight=False)
            file = out / f"{name}_tp{tp}_pp{pp}.json"
            write_json(file, plan.to_dict())
            summary["plans"].append({**entry, "world_size": plan.world_size, "step_s": plan.step_s,
                                     "bubble": plan.bubble, "file": file.name,
                                     "max_param_bytes": max(r.param_bytes for r in plan.ranks)})  # fmt: skip
    write_json(out / "summary.json", summary)
    log.print(f"wrote {out}")


if __name__ == "__main__":
    main()
