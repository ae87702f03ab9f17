"""Where queries and keys meet: the q and k tensors (per head, before the softmax scale) of one attention.

    (q, k) edges = locate_qk(attention)     # or a string saying why they cannot be found

An edge is (tensor, the node reading it on the way to the dot product, argument index), so a rewrite can put
something between q or k and the product (qk_norm's norms) or read k itself (token merging's similarity metric).
For SDPA these are its first two arguments; for eager attention the q @ k^T product is walked back through the
softmax scale (scalar multiplies/divides) and the transpose that makes k^T.
"""

from __future__ import annotations

import torch
from torch import fx

from .anatomy import Attention
from .ir import is_op, op_name, tensor_meta

__all__ = ["Edge", "locate_qk"]

aten = torch.ops.aten

# Where q or k enters the dot product: the tensor to normalize, the node reading it there, and which argument.
Edge = tuple[fx.Node, fx.Node, int]


def _is_scalar(x: object) -> bool:
    if isinstance(x, (int, float)):
        return True
    val = tensor_meta(x)
    return val is not None and val.numel() == 1


def _strip_scales(user: fx.Node, index: int) -> Edge:
    """Walk back from `user.args[index]` through multiplications and divisions by scalars (the softmax scale)."""
    node = user.args[index]
    while is_op(node, aten.mul, aten.div) and len(node.args) == 2:  # type: ignore[union-attr]
        a, b = node.args  # type: ignore[union-attr]
        if isinstance(a, fx.Node) and _is_scalar(b):
            node, user, index = a, node, 0  # type: ignore[assignment]
        elif is_op(node, aten.mul) and isinstance(b, fx.Node) and _is_scalar(a):
            node, user, index = b, node, 1  # type: ignore[assignment]
        else:
            break
    return node, user, index  # type: ignore[return-value]


def _untranspose(node: fx.Node) -> fx.Node | None:
    """x if `node` swaps the last two dims of x (k^T from k), else None."""
    val = tensor_meta(node)
    if val is None or not isinstance(node.args[0], fx.Node):
        return None
    n = val.dim()
    if is_op(node, aten.t):
        return node.args[0]
    if is_op(node, aten.transpose) and {int(d) % n for d in node.args[1:3]} == {n - 2, n - 1}:  # type: ignore[call-overload]
        return node.args[0]
    if is_op(node, aten.permute) and [int(d) % n for d in node.args[1]] == [*range(n - 2), n - 1, n - 2]:  # type: ignore[union-attr]
        return node.args[0]
    return None


def locate_qk(att: Attention) -> tuple[Edge, Edge] | str:
    """The edges carrying q and k into the dot product, or why they cannot be found."""
    if att.kind == "sdpa":
        q, k = _strip_scales(att.core, 0), _strip_scales(att.core, 1)
    else:
        if att.scores is None:
            return "no q @ k^T product found"
        scores, last = att.scores, len(att.scores.args) - 1  # matmul/bmm (q, kT); baddbmm (bias, q, kT)
        q = _strip_scales(scores, last - 1)
        kt = _strip_scales(scores, last)[0]
        if _untranspose(kt) is None:
            return f"k^T reaches the scores through {kt.name} ({op_name(kt)}), not a transpose of k"
        k = _strip_scales(kt, 0)
    vq, vk = tensor_meta(q[0]), tensor_meta(k[0])
    if vq is None or vk is None:
        return "no shape metadata on q or k"
    if q[0] is k[0]:
        return "q and k are the same tensor"
    if vq.shape[-1] != vk.shape[-1]:
        return f"q and k differ in head size ({vq.shape[-1]} vs {vk.shape[-1]})"
    return q, k
