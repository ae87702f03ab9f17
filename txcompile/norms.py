"""Normalization layers as they appear in ATen graphs, under one description.

    y = aten.layer_norm(x, [d], w, b, eps)                                   LayerNorm
    y = aten.rms_norm(x, [d], w, eps)                                        fused RMSNorm
    y = w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))   (casts in between)   RMSNorm written out (Llama, T5)
    y = (1 + w) * (x * rsqrt(mean(x^2) + eps))                               Gemma's RMSNorm
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from .ir import PASSTHROUGH_OPS, get_tensor, is_op, unwrap

aten = torch.ops.aten

__all__ = ["Norm", "find_norms"]

_CASTS = (aten.to, aten._to_copy, aten.type_as, aten.alias)


@dataclass(frozen=True)
class Norm:
    """One normalization over the last dim: `output = norm(input) * weight (+ bias)`."""

    kind: Literal["layernorm", "rmsnorm"]
    input: fx.Node
    output: fx.Node  # the node carrying the normalized, scaled value
    weight: str | None  # get_attr targets
    bias: str | None
    eps: float
    offset: float = 0.0  # Gemma scales by (offset + weight)


def find_norms(gm: fx.GraphModule) -> list[Norm]:
    """Every LayerNorm/RMSNorm in graph order."""
    found = []
    for node in gm.graph.nodes:
        if is_op(node, aten.layer_norm):
            w = node.args[2] if len(node.args) > 2 else None
            b = node.args[3] if len(node.args) > 3 else None
            eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
            found.append(Norm("layernorm", node.args[0], node, _target(w), _target(b), eps))
        elif is_op(node, aten.rms_norm):
            w = node.args[2] if len(node.args) > 2 else None
            eps = node.args[3] if len(node.args) > 3 and node.args[3] is not None else 1e-6
            found.append(Norm("rmsnorm", node.args[0], node, _target(w), None, float(eps)))
        elif is_op(node, aten.rsqrt):
            norm = _written_rms(gm, node)
            if norm is not None:
                found.append(norm)
    return found


def _target(node: object) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _written_rms(gm: fx.GraphModule, rsqrt: fx.Node) -> Norm | None:
    add = rsqrt.args[0]
    if not is_op(add, aten.add) or len(add.args) < 2:
        return None
    mean, eps = (add.args[0], add.args[1]) if isinstance(add.args[0], fx.Node) else (add.args[1], add.args[0])
    if not is_op(mean, aten.mean) or not isinstance(eps, (int, float)):
        return None
    sq = mean.args[0]
    if is_op(sq, aten.pow) and sq.args[1] == 2:
        x = sq.args[0]
    elif is_op(sq, aten.mul) and sq.args[0] is sq.args[1]:
        x = sq.args[0]
    else:
        return None
    source = unwrap(x, _CASTS)
    # The normalized value: x * rsqrt(...) (either operand order), then optional casts and the weight.
    scaled = [u for u in rsqrt.users if is_op(u, aten.mul) and x in u.args]
    if len(scaled) != 1:
        return None
    out = scaled[0]
    while len(out.users) == 1 and is_op(next(iter(out.users)), *_CASTS):
        out = next(iter(out.users))
    weight, offset = None, 0.0
    if len(out.users) == 1:
        user = next(iter(out.users))
        if is_op(user, aten.mul):
            other = user.args[0] if user.args[1] is out else user.args[1]
            t = get_tensor(gm, unwrap(other, _CASTS))
            if t is not None and t.dim() == 1:
                weight, out = str(unwrap(other, _CASTS).target), user  # type: ignore[union-attr]
            elif is_op(other, aten.add) and any(isinstance(a, (int, float)) for a in other.args):
                param = unwrap(next((a for a in other.args if isinstance(a, fx.Node)), None), _CASTS)
                if get_tensor(gm, param) is not None:
                    weight, out = str(param.target), user  # type: ignore[union-attr]
                    offset = float(next(a for a in other.args if isinstance(a, (int, float))))
    while len(out.users) == 1 and is_op(next(iter(out.users)), *_CASTS):
        out = next(iter(out.users))
    return Norm("rmsnorm", unwrap(source, PASSTHROUGH_OPS), out, weight, None, float(eps), offset)
