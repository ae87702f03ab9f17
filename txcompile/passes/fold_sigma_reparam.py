"""fold_sigma_reparam: bake σReparam's (γ/σ)·W into plain weights for inference.

Before:                                        After:
    w = get_attr[W]                                w_hat = get_attr[_txc_W_hat]      # = (γ/σ)·W, computed once
    w_hat = call_module[_txc_sigma.W](w)           y = aten.linear(x, w_hat, b)
    y = aten.linear(x, w_hat, b)

Folds both forms σReparam takes: the `SigmaReparam` submodules that `sigma_reparam` inserts, and the
`txc.sigma_reparam(W, u, v, γ)` op they become in a re-exported (saved) program. The folded value is what an
eval-mode forward computes (σ from the stored u and v, no power iteration). The σReparam state, and raw weights
nothing else reads, are dropped. The result holds no σReparam ops and is no longer trainable in that form.

Contract: exact (the folded weight is bit-for-bit the tensor the eval-mode program computes on every call).
Paper: Zhai et al., "Stabilizing Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from ..ir import add_tensor, get_tensor, is_op, prune_tensors
from ..linears import reparam_source
from ..pipeline import PassContext, PassResult


def _folded(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The eval-mode value of a σReparam node whose inputs are all stored tensors, else None."""
    if reparam_source(gm, node) is None:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        weight = get_tensor(gm, node.args[0])
        training = module.training
        try:
            with torch.no_grad():
                return module.eval()(weight).detach()
        finally:
            module.train(training)
    args = [get_tensor(gm, a) for a in node.args]
    if any(a is None for a in args):
        return None  # u, v or γ computed in the graph: not a stored reparameterization
    with torch.no_grad():
        return torch.ops.txc.sigma_reparam(*args).detach()


@dataclass(frozen=True)
class FoldSigmaReparam:
    """Replace every σReparam'd weight by the plain weight (γ/σ)·W it stands for."""

    name: ClassVar[str] = "fold_sigma_reparam"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "bake σReparam's (γ/σ)·W into plain weights for inference"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = 0
        for node in list(gm.graph.nodes):
            value = _folded(gm, node)
            if value is None:
                continue
            raw = str(node.args[0].target)  # type: ignore[union-attr]
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(add_tensor(gm, f"{raw}_folded", value))
            new.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            folded += 1
        left = sum(1 for n in gm.graph.nodes if is_op(n, torch.ops.txc.sigma_reparam) or reparam_source(gm, n))
        notes = (f"{left} σReparam ops with computed inputs were left unfolded",) if left else ()
        dropped = 0
        if folded:
            gm.delete_all_unused_submodules()
            dropped = prune_tensors(gm)
        return PassResult(gm, bool(folded), {"folded": folded, "tensors_dropped": dropped}, notes)
