"""Linear layers as they appear in ATen graphs, under one description.

    y = aten.linear(x, W, b)                          W: [out, in]   (nn.Linear)
    y = view(aten.addmm(b, view(x, [-1, in]), W), ..)  W: [in, out]   (GPT-2's Conv1D)
    y = aten.matmul(x, W) / aten.mm(x, W)             W: [in, out]
    y = aten.matmul(x, aten.t(W))                     W: [out, in]   (also numpy_T / permute(W, [1, 0]))

`Linear.weight_out_in(gm)` gives the weight as [out, in] whatever the layout, so passes that fuse, scale or shard
linears are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from .ir import get_tensor, is_op, tensor_meta

aten = torch.ops.aten

__all__ = ["Linear", "find_linears", "reparam_source"]


@dataclass(frozen=True)
class Linear:
    """One linear site: `output = input @ W^T + b` over the last dim of `input`."""

    node: fx.Node  # the matmul-like node
    input: fx.Node  # the activation, in its original (unflattened) layout
    output: fx.Node  # the result, in the input's layout (the view after addmm, else `node`)
    weight: str  # get_attr target
    bias: str | None
    in_features: int
    out_features: int
    layout: Literal["out_in", "in_out"]  # how `weight` is stored
    kind: Literal["linear", "addmm", "matmul"]
    # Set when the linear reads a reparameterized `weight` (σReparam: the node computing (γ/σ)·W). Passes that write
    # new weights must leave such linears alone: `weight` is the raw matrix, not what the linear multiplies by.
    reparam: fx.Node | None = None

    def weight_out_in(self, gm: fx.GraphModule) -> torch.Tensor:
        w = _resolve(gm, self.weight)
        return w if self.layout == "out_in" else w.t()

    def bias_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return None if self.bias is None else _resolve(gm, self.bias)

    @property
    def dtype(self) -> torch.dtype | None:
        val = tensor_meta(self.node)
        return None if val is None else val.dtype


def _resolve(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _param_2d(gm: fx.GraphModule, node: object) -> fx.Node | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = get_tensor(gm, node)
        if t is not None and t.dim() == 2:
            return node
    return None


def reparam_source(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The raw weight's get_attr when `node` reparameterizes it (a σReparam module or op), else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    if node.op == "call_module":
        if not getattr(gm.get_submodule(str(node.target)), "weight_reparameterization", False):
            return None
    elif not is_op(node, torch.ops.txc.sigma_reparam):
        return None
    return _param_2d(gm, node.args[0])


def _weight_2d(gm: fx.GraphModule, node: object) -> tuple[fx.Node | None, fx.Node | None]:
    """(the weight's get_attr, the reparameterizing node or None) for a linear's weight argument."""
    raw = reparam_source(gm, node)
    if raw is not None:
        return raw, node  # type: ignore[return-value]
    return _param_2d(gm, node), None


def _param_1d(gm: fx.GraphModule, node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = get_tensor(gm, node)
        if t is not None and t.dim() == 1:
            return str(node.target)
    return None


def find_linears(gm: fx.GraphModule) -> list[Linear]:
    """Every linear site in graph order."""
    found = []
    for node in gm.graph.nodes:
        lin = _as_linear(gm, node)
        if lin is not None:
            found.append(lin)
    return found


def _as_linear(gm: fx.GraphModule, node: fx.Node) -> Linear | None:
    if is_op(node, aten.linear):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wn, rp = _weight_2d(gm, w)
        if wn is None or not isinstance(x, fx.Node):
            return None
        out_f, in_f = get_tensor(gm, wn).shape  # type: ignore[union-attr]
        bias = _param_1d(gm, b) if b is not None else None
        if b is not None and bias is None:
            return None  # a computed bias is not a plain linear layer
        return Linear(node, x, node, str(wn.target), bias, in_f, out_f, "out_in", "linear", rp)
    if is_op(node, aten.addmm):
        b, x2d, w = node.args[:3]
        (wn, rp), bias = _weight_2d(gm, w), _param_1d(gm, b)
        if wn is None or bias is None or not isinstance(x2d, fx.Node):
            return None
        in_f, out_f = get_tensor(gm, wn).shape  # type: ignore[union-attr]
        x = x2d.args[0] if is_op(x2d, aten.view, aten.reshape, aten._unsafe_view) else x2d
        users = list(node.users)
        out = users[0] if len(users) == 1 and is_op(users[0], aten.view, aten.reshape, aten._unsafe_view) else node
        return Linear(node, x, out, str(wn.target), bias, in_f, out_f, "in_out", "addmm", rp)  # type: ignore[arg-type]
    if is_op(node, aten.matmul, aten.mm):
        x, w = node.args[:2]
        layout: Literal["out_in", "in_out"] = "in_out"
        if is_op(w, aten.t) or (is_op(w, aten.transpose) and _is_last_two(w)) or _is_2d_permute(w):
            w, layout = w.args[0], "out_in"  # type: ignore[union-attr]
        wn, rp = _weight_2d(gm, w)
        if wn is None or not isinstance(x, fx.Node):
            return None
        shape = get_tensor(gm, wn).shape  # type: ignore[union-attr]
        in_f, out_f = (shape[1], shape[0]) if layout == "out_in" else (shape[0], shape[1])
        return Linear(node, x, node, str(wn.target), None, in_f, out_f, layout, "matmul", rp)
    return None


def _is_2d_permute(node: object) -> bool:
    if is_op(node, aten.numpy_T):  # `W.T` in model code
        return True
    return is_op(node, aten.permute) and list(node.args[1]) == [1, 0]  # type: ignore[union-attr]


def _is_last_two(node: fx.Node) -> bool:
    dims = sorted(int(d) % 2 for d in node.args[1:3]) if len(node.args) >= 3 else []
    return dims == [0, 1]
