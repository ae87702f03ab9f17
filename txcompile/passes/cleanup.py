"""cleanup: dead code, common subexpressions, identities and constant folding of parameter-only subgraphs.

Before:                                          After:
    w_t   = aten.t(W)            # params only       w_t = get_attr(_txc_fold_t)   # computed once, at rewrite time
    a     = aten.arange(n); b = aten.arange(n)       a = aten.arange(n)            # b -> a
    d     = aten.dropout(x, 0.1, False)              (uses of d read x)
    u     = aten.relu(x)         # no users          (gone)

Contract: exact. Folding evaluates the same ATen ops on the same tensors, once; CSE merges only pure, deterministic
calls with identical arguments; eval-mode dropout is the identity by definition.
Paper: none; this is the standard compiler hygiene every later pass relies on (fewer nodes to match, no dead weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from ..ir import add_tensor, get_tensor, is_op, prune_tensors
from ..pipeline import PassContext, PassResult

aten = torch.ops.aten

# Folding must not turn a cheap broadcast view of a small tensor into a large materialized one.
_MAX_FOLD_GROWTH = 4


def _is_pure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return target.__name__ == "getitem" if hasattr(target, "__name__") else False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    schema = target._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False  # in-place or out= ops
    return not node.is_impure()


def _has_symbolic(value: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value)
    return any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves)


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input a node merely passes through, if it is an identity at inference time."""
    if is_op(node, aten.dropout) and len(node.args) >= 3 and node.args[2] is False:
        return node.args[0]  # type: ignore[return-value]
    if is_op(node, aten.alias):
        return node.args[0]  # type: ignore[return-value]
    if is_op(node, aten.to) and isinstance(node.args[0], fx.Node):
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor):
            if src.dtype == out.dtype and src.device == out.device and not node.kwargs.get("copy", False):
                return node.args[0]
    return None


def remove_identities(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        src = _identity_input(node)
        if src is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            count += 1
    return count


def common_subexpressions(gm: fx.GraphModule) -> int:
    """Merge pure calls with the same target and the same arguments (after earlier merges)."""
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if not _is_pure(node):
            continue
        try:
            key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value))  # same expression over the same symbols
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor literal")
    return value


def fold_constants(gm: fx.GraphModule) -> int:
    """Evaluate nodes whose inputs are all parameters/buffers/literals; store each result as a new buffer."""
    known: dict[fx.Node, torch.Tensor] = {}
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            t = get_tensor(gm, node)
            if t is not None:
                known[node] = t
            continue
        if not _is_pure(node) or not isinstance(node.target, torch._ops.OpOverload):
            continue
        inputs = node.all_input_nodes
        if not inputs or any(n not in known for n in inputs) or _has_symbolic((node.args, node.kwargs)):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: known[n])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        if value.numel() > _MAX_FOLD_GROWTH * max(sum(known[n].numel() for n in inputs), 1):
            continue
        # A view (t, slice, expand) shares storage with a weight that may be pruned next: give it its own.
        storage = value.untyped_storage().data_ptr()
        if any(known[n].untyped_storage().data_ptr() == storage for n in inputs):
            value = value.clone(memory_format=torch.contiguous_format)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(add_tensor(gm, f"fold_{node.name}", value, parameter=False))
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        known[attr] = value
        folded += 1
    return folded


@dataclass(frozen=True)
class Cleanup:
    """Remove dead code and identities, merge common subexpressions, fold parameter-only subgraphs."""

    name: ClassVar[str] = "cleanup"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "dead code, common subexpressions, identities and constant folding"

    fold: bool = True
    cse: bool = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"identities": remove_identities(gm)}
        stats["folded"] = fold_constants(gm) if self.fold else 0
        stats["cse"] = common_subexpressions(gm) if self.cse else 0
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        stats["dead"] = before - len(gm.graph.nodes)
        stats["tensors_dropped"] = prune_tensors(gm)
        return PassResult(gm, any(stats.values()), stats)
