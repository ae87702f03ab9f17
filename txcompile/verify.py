"""Numerical comparison of programs: one tolerance table, output comparison, and first-divergence search.

Tolerances are torch.testing's per-dtype defaults (never ad-hoc numbers): an element passes when
|actual - expected| <= atol + rtol * |expected|. The whole-model comparison is what an exact pass is held to; when it
fails, `first_divergence` runs the graphs before and after the pass node by node and names the first node whose value
changed, so the error points at the rewrite that broke, not at the model output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

from .errors import InputError
from .ir import module_path, op_name

__all__ = ["TOLERANCES", "tolerance", "Comparison", "compare", "first_divergence", "run_program"]

# (rtol, atol) per dtype: torch.testing.assert_close's defaults.
TOLERANCES: Mapping[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing values of `dtype`; integer and bool outputs must match exactly."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass(frozen=True)
class Comparison:
    """The worst disagreement between two programs' outputs."""

    ok: bool
    max_abs: float
    max_rel: float
    # Index of the flattened output with the largest violation, its dtype, and the tolerance it was held to.
    worst_output: int
    dtype: str
    rtol: float
    atol: float

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "max_abs": self.max_abs, "max_rel": self.max_rel, "dtype": self.dtype}


def _leaves(out: Any) -> list[torch.Tensor]:
    # HF ModelOutput objects are registered pytree nodes, so they flatten like the dicts they are.
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def compare(expected: Any, actual: Any, *, scale: float = 1.0) -> Comparison:
    """Compare two programs' outputs leaf by leaf at the dtype tolerance times `scale`."""
    exp, act = _leaves(expected), _leaves(actual)
    if len(exp) != len(act):
        raise InputError(f"outputs differ in structure: {len(exp)} tensors expected, {len(act)} produced")
    worst = Comparison(True, 0.0, 0.0, -1, "", 0.0, 0.0)
    worst_excess = -math.inf
    for i, (e, a) in enumerate(zip(exp, act)):
        if e.shape != a.shape:
            return Comparison(False, math.inf, math.inf, i, str(e.dtype), 0.0, 0.0)
        rtol, atol = tolerance(e.dtype)
        rtol, atol = rtol * scale, atol * scale
        e64, a64 = e.detach().double(), a.detach().to(e.device).double()
        finite = torch.isfinite(e64) & torch.isfinite(a64)
        same_nonfinite = bool(((e64 == a64) | finite).all())
        diff = (a64 - e64).abs().where(finite, torch.zeros((), dtype=torch.float64))
        max_abs = float(diff.max()) if diff.numel() else 0.0
        max_rel = float((diff / e64.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
        excess = float((diff - (atol + rtol * e64.abs())).max()) if diff.numel() else -math.inf
        if not same_nonfinite:
            excess, max_abs = math.inf, math.inf
        if excess > worst_excess:
            worst_excess = excess
            worst = Comparison(excess <= 0, max_abs, max_rel, i, str(e.dtype).replace("torch.", ""), rtol, atol)
    return worst


def run_program(fn: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    """Call a model or GraphModule on (args, kwargs) without autograd."""
    args, kwargs = inputs
    with torch.no_grad():
        return fn(*args, **kwargs)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's tensor value, for node-by-node comparison."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op != "get_attr":
            self.values[n.name] = out.detach()
        return out


def _record(gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> dict[str, torch.Tensor]:
    args, kwargs = inputs
    # The exported module flattens (args, kwargs) with its input spec (dict keys in capture order); the interpreter
    # feeds placeholders directly, so flatten the same way here.
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        import torch.fx._pytree as fx_pytree

        flat = fx_pytree.tree_flatten_spec((args, kwargs), spec)
    else:
        flat = pytree.tree_leaves((args, kwargs))
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*flat)
    return rec.values


def first_divergence(
    before: fx.GraphModule, after: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]
) -> tuple[str, float] | None:
    """The first node of `after` (graph order) present in `before` whose value changed beyond tolerance.

    Returns a description ("view_3 (aten.view in encoder.layer.0.attention.self)") and its max abs error, or None if
    every shared node agrees (then the divergence is in nodes the pass added and the output).
    """
    old = _record(before, inputs)
    new = _record(after, inputs)
    for node in after.graph.nodes:
        a, b = new.get(node.name), old.get(node.name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            continue
        cmp = compare(b, a)
        if not cmp.ok:
            where = module_path(node)
            return f"{node.name} ({op_name(node)}{' in ' + where if where else ''})", cmp.max_abs
    return None
