"""Checks for your own pytest suite: what did a pipeline do to my model, and is it still the same function?

    from txcompile.testing import assert_ops, assert_equivalent

    def test_qkv_is_fused():
        opt = txc.optimize(model, ["cleanup", "fuse_qkv"], example_inputs=inputs)
        assert_ops(opt.graph_module, expect={"aten.split_with_sizes": 6}, forbid=["aten.dropout"])
        assert_equivalent(model, opt, other_inputs)

`assert_roundtrip(opt, inputs)` saves an optimized program as an artifact, loads it in a fresh Python process that only
does `import txcompile`, and checks it computes what `opt` computes: the test that a pass's new ops persist.

Op keys are the short names `count_ops` prints ("aten.linear"), or the ops themselves (`torch.ops.aten.linear`).
Failures print a table of the graph (op, module path, shape, dtype) so the pytest report shows what is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .capture import eval_mode, normalize_inputs
from .ir import module_path, op_name
from .pipeline import count_ops
from .report import render_table
from .verify import compare, run_program

__all__ = ["count_ops", "assert_ops", "assert_equivalent", "assert_roundtrip", "graph_table"]


def _key(op: Any) -> str:
    if isinstance(op, str):
        return op
    packet = getattr(op, "overloadpacket", op)
    return str(packet)


def _graph_of(obj: Any) -> fx.GraphModule:
    gm = getattr(obj, "graph_module", obj)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a GraphModule or an OptimizedModule, got {type(obj).__name__}")
    return gm


def graph_table(gm: Any, *, ops_only: bool = True, limit: int | None = None) -> str:
    """The graph as a table: node, op, module path, shape, dtype. Prints readably in a pytest failure."""
    gm = _graph_of(gm)
    rows = []
    for node in gm.graph.nodes:
        if ops_only and node.op not in ("call_function", "call_method", "placeholder", "output"):
            continue
        val = node.meta.get("val")
        shape = "x".join(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else ""
        dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else ""
        rows.append([node.name, op_name(node), module_path(node), shape, dtype])
    more = ""
    if limit is not None and len(rows) > limit:
        more = f"\n... {len(rows) - limit} more nodes"
        rows = rows[:limit]
    return render_table(f"{len(gm.graph.nodes)} nodes", ["node", "op", "module", "shape", "dtype"], rows) + more


def assert_ops(
    gm: Any,
    expect: Mapping[Any, int] | None = None,
    forbid: Iterable[Any] = (),
) -> Counter[str]:
    """Assert exact counts for the ops in `expect` and the absence of the ops in `forbid`; return all counts."""
    counts = count_ops(_graph_of(gm))
    problems = []
    for op, n in (expect or {}).items():
        got = counts.get(_key(op), 0)
        if got != n:
            problems.append(f"expected {n} x {_key(op)}, found {got}")
    for op in forbid:
        got = counts.get(_key(op), 0)
        if got:
            problems.append(f"expected no {_key(op)}, found {got}")
    if problems:
        table = render_table("op counts", ["op", "count"], [[k, str(v)] for k, v in sorted(counts.items())])
        raise AssertionError("; ".join(problems) + "\n" + table)
    return counts


def assert_equivalent(original: nn.Module, optimized: Any, inputs: Any, *, scale: float = 1.0) -> None:
    """Assert `optimized` computes what `original` computes on `inputs`, at the per-dtype tolerance x `scale`.

    `inputs` takes the same forms as `example_inputs`: a tensor, a tuple of tensors, or a dict of keyword tensors.
    """
    args = normalize_inputs(inputs, what="inputs")
    with eval_mode(original):
        expected = run_program(original, args)
    actual = run_program(optimized, args)
    cmp = compare(expected, actual, scale=scale)
    if not cmp.ok:
        raise AssertionError(
            f"outputs differ: max abs {cmp.max_abs:.3g}, max rel {cmp.max_rel:.3g} at output {cmp.worst_output} "
            f"({cmp.dtype}; rtol={cmp.rtol:g}, atol={cmp.atol:g})"
        )


# Run in the fresh process. It starts while the parent is still saving, and imports torch's export deserializer (most of
# a load's time) meanwhile; the parent's "go" line on stdin says the artifact (argv[1]) and inputs (argv[2]) are ready.
_ROUNDTRIP_SCRIPT = """
import sys
import torch
try:
    import torch._export.serde.serialize  # private module: only a head start, so its absence is no error
except ImportError:
    pass
import txcompile.artifact

if sys.stdin.readline().strip() != "go":
    sys.exit(0)  # the parent failed before the artifact was complete
program = txcompile.artifact.load(sys.argv[1])
args, kwargs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    outputs = program(*args, **kwargs)
torch.save(outputs, sys.argv[3])
"""


def assert_roundtrip(
    opt: Any, inputs: Any, *, tmp_dir: str | os.PathLike[str] | None = None, atol_scale: float = 1.0
) -> None:
    """Assert that `opt` saved as an artifact and loaded in a new process computes what `opt` computes here.

    The new process knows nothing but `import txcompile`, so every op a pass introduced must be a registered custom op
    with a fake implementation. `inputs` takes the forms of `example_inputs` and may have other batch and sequence
    sizes than the capture. Outputs are compared at the per-dtype tolerance times `atol_scale`.
    """
    from . import artifact  # deferred: most users of this module never write artifacts

    args = normalize_inputs(inputs, what="inputs")
    expected = run_program(opt, args)
    with tempfile.TemporaryDirectory(prefix="txc-roundtrip-", dir=tmp_dir) as work:
        root = Path(work)
        paths = (root / "artifact", root / "inputs.pt", root / "outputs.pt")
        child = _start_fresh_process(*paths)
        try:
            artifact.save(opt, paths[0], label="roundtrip", example_inputs=inputs)
            torch.save(args, paths[1])
        except BaseException:
            child.kill()
            child.communicate()
            raise
        _finish_fresh_process(child)
        # Written a moment ago by our own subprocess; outputs may be Hugging Face ModelOutputs, not plain tensors.
        actual = torch.load(paths[2], weights_only=False)
    cmp = compare(expected, actual, scale=atol_scale)
    if not cmp.ok:
        raise AssertionError(
            f"the artifact loaded in a new process differs from the optimized program: max abs {cmp.max_abs:.3g}, "
            f"max rel {cmp.max_rel:.3g} at output {cmp.worst_output} "
            f"({cmp.dtype}; rtol={cmp.rtol:g}, atol={cmp.atol:g})"
        )


def _start_fresh_process(artifact_dir: Path, inputs_path: Path, outputs_path: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    # The subprocess must import this very txcompile, even when it is not the installed one.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-c", _ROUNDTRIP_SCRIPT, str(artifact_dir), str(inputs_path), str(outputs_path)]
    pipe = subprocess.PIPE
    return subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env)


def _finish_fresh_process(child: subprocess.Popen[str]) -> None:
    try:
        _, stderr = child.communicate("go\n", timeout=600)
    except subprocess.TimeoutExpired:
        child.kill()
        _, stderr = child.communicate()
    if child.returncode != 0:
        tail = stderr.strip()[-3000:]
        raise AssertionError(
            f"loading and running the artifact in a new process failed (exit {child.returncode}):\n{tail}"
        )
