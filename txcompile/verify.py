"""Numerical comparison of programs: one tolerance table, output comparison, and first-divergence search.

Tolerances are torch.testing's per-dtype defaults (never ad-hoc numbers): an element passes when
|actual - expected| <= atol + rtol * |expected|. The whole-model comparison is what an exact pass is held to; when it
fails, `first_divergence` runs the graphs before and after the pass node by node and names the first node whose value
changed, so the error points at the rewrite that broke, not at the model output.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
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
    # Where in the output the largest violation is ("output.last_hidden_state"), its dtype, and the tolerance.
    worst_output: str
    dtype: str
    rtol: float
    atol: float

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "max_abs": self.max_abs, "max_rel": self.max_rel, "dtype": self.dtype}


def _pairs(expected: Any, actual: Any, path: str = "output") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair the tensors of two outputs by structure: dicts (and HF ModelOutputs) by key, sequences by position."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            raise InputError(
                f"outputs differ in structure at {path}: {type(expected).__name__} vs {type(actual).__name__}"
            )
        return [(path, expected, actual)]
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if set(expected) != set(actual):
            raise InputError(f"outputs differ in structure at {path}: keys {sorted(expected)} vs {sorted(actual)}")
        return [p for k in expected for p in _pairs(expected[k], actual[k], f"{path}.{k}")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            raise InputError(f"outputs differ in structure at {path}: {len(expected)} vs {len(actual)} items")
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in _pairs(e, a, f"{path}[{i}]")]
    if isinstance(expected, (Mapping, list, tuple)) or isinstance(actual, (Mapping, list, tuple)):
        raise InputError(f"outputs differ in structure at {path}: {type(expected).__name__} vs {type(actual).__name__}")
    return []  # non-tensor leaves (None, ints) carry no numbers to compare


def compare(expected: Any, actual: Any, *, scale: float = 1.0) -> Comparison:
    """Compare two programs' outputs tensor by tensor at the dtype tolerance times `scale`.

    NaN and inf must sit at the same positions with the same value; finite values are held to the tolerance.
    Outputs that differ in structure (keys, lengths, container types) raise InputError.
    """
    worst = Comparison(True, 0.0, 0.0, "", "", 0.0, 0.0)
    worst_excess = -math.inf
    for where, e, a in _pairs(expected, actual):
        if e.shape != a.shape:
            return Comparison(False, math.inf, math.inf, where, str(e.dtype).replace("torch.", ""), 0.0, 0.0)
        rtol, atol = tolerance(e.dtype)
        rtol, atol = rtol * scale, atol * scale
        e64, a64 = e.detach().double(), a.detach().to(e.device).double()
        finite = torch.isfinite(e64) & torch.isfinite(a64)
        same_nonfinite = bool(((e64 == a64) | finite | (e64.isnan() & a64.isnan())).all())
        diff = (a64 - e64).abs().where(finite, torch.zeros((), dtype=torch.float64))
        max_abs = float(diff.max()) if diff.numel() else 0.0
        max_rel = float((diff / e64.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
        excess = float((diff - (atol + rtol * e64.abs())).max()) if diff.numel() else -math.inf
        if not same_nonfinite:
            excess, max_abs = math.inf, math.inf
        if excess > worst_excess:
            worst_excess = excess
            worst = Comparison(excess <= 0, max_abs, max_rel, where, str(e.dtype).replace("torch.", ""), rtol, atol)
    return worst


def normwise_error(expected: Any, actual: Any) -> float:
    """The largest max|actual - expected| / max|expected| over the output tensors (0 for empty outputs).

    For comparing two fp16/bf16 implementations of one program (kernels vs ATen): they round at different points,
    so elementwise tolerances near zero are meaningless while the error relative to the output's scale is not.
    """
    worst = 0.0
    for _, e, a in _pairs(expected, actual):
        if e.shape != a.shape:
            return math.inf
        if e.numel() and e.is_floating_point():
            e64, a64 = e.detach().double(), a.detach().to(e.device).double()
            worst = max(worst, float((a64 - e64).abs().max() / e64.abs().max().clamp_min(1e-30)))
    return worst


def output_cosine(expected: Any, actual: Any) -> float:
    """Cosine similarity of all output tensors, flattened and concatenated: the approximate contract's metric."""
    flat = [
        torch.cat([x.detach().double().flatten() for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)])
        for out in (expected, actual)
    ]
    return float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))


def cosine_shortfall(measured: Mapping[str, Any], min_cosine: float) -> str | None:
    """An approximate pass's budget check: why the measured output cosine falls below `min_cosine`, else None."""
    cos = measured.get("cosine")
    if cos is not None and cos < min_cosine:
        return f"output cosine similarity {cos:.4f} < min_cosine {min_cosine}"
    return None


def run_program(fn: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    """Call a model or GraphModule on (args, kwargs) without autograd."""
    args, kwargs = inputs
    with torch.no_grad():
        return fn(*args, **kwargs)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's tensor value (or only those of `names`, sizes included), for node-by-node
    comparison."""

    def __init__(self, gm: fx.GraphModule, names: Collection[str] | None = None):
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.names = names

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.names is not None:
            if n.name in self.names:
                self.values[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
        elif isinstance(out, torch.Tensor) and n.op != "get_attr":
            self.values[n.name] = out.detach()
        return out


def flatten_inputs(gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> list[Any]:
    """The placeholder values for (args, kwargs), for running `gm` with an `fx.Interpreter`.

    The exported module flattens (args, kwargs) with its input spec (dict keys in capture order); an interpreter feeds
    placeholders directly, so it must flatten the same way.
    """
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        import torch.fx._pytree as fx_pytree

        return list(fx_pytree.tree_flatten_spec(inputs, spec))
    return pytree.tree_leaves(inputs)


def node_values(
    gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]], names: Collection[str] | None = None
) -> dict[str, Any]:
    """Every node's tensor value (by node name) when `gm` runs on `inputs`, without autograd; with `names`, only
    those nodes' values (whatever they are: sizes too), which keeps memory to what the caller needs."""
    rec = _Recorder(gm, names)
    with torch.no_grad():
        rec.run(*flatten_inputs(gm, inputs))
    return rec.values


def first_divergence(
    before: fx.GraphModule, after: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]]
) -> tuple[str, float] | None:
    """The first node of `after` (graph order) present in `before` whose value changed beyond tolerance.

    Returns a description ("view_3 (aten.view in encoder.layer.0.attention.self)") and its max abs error, or None if
    every shared node agrees (then the divergence is in nodes the pass added and the output).
    """
    old = node_values(before, inputs)
    new = node_values(after, inputs)
    for node in after.graph.nodes:
        a, b = new.get(node.name), old.get(node.name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            continue
        cmp = compare(b, a)
        if not cmp.ok:
            where = module_path(node)
            return f"{node.name} ({op_name(node)}{' in ' + where if where else ''})", cmp.max_abs
    return None


# GraphModule.meta key: the name of the padding-mask input at whose padded positions the outputs are unspecified.
VALID_ONLY = "txc_valid_tokens_only"


def valid_tokens_only(outputs: Any, gm: Any, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    """`outputs` with every [batch, tokens, ...] tensor zeroed at padded tokens, when `gm` says (meta[VALID_ONLY])
    that its values there are unspecified (the unpad pass)."""
    name = getattr(gm, "meta", {}).get(VALID_ONLY)
    if name is None:
        return outputs
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    valid = dict(zip(placeholders, flatten_inputs(gm, inputs))).get(name)
    if not isinstance(valid, torch.Tensor) or valid.dim() != 2:
        return outputs

    def mask(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(valid.shape):
            keep = (valid != 0).reshape(*valid.shape, *([1] * (t.dim() - 2)))
            return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
        return t

    return pytree.tree_map(mask, outputs)
