"""sigma_reparam: every selected linear's weight W becomes (γ / σ(W)) · W, trainable (σReparam).

Before:                                   After:
    w = get_attr[W]                           w = get_attr[W]
    y = aten.linear(x, w, b)                  w_hat = call_module[_txc_sigma.W](w)      # SigmaReparamWeight: γ, u, v
                                              y = aten.linear(x, w_hat, b)

σ(W) is the spectral norm, estimated by power iteration with persistent singular-vector buffers u and v (from an
exact SVD at insertion). γ is a learnable scalar initialised to σ(W), so γ/σ = 1 and the program computes exactly
what it computed before. `train()` on the program makes every forward run `iters` power-iteration steps (the paper's
reference implementation runs one per training step); `eval()` forwards only read u and v. γ appears in
`.parameters()`, and gradients flow to γ and W through σ (u and v are constants to autograd, as in the paper).

Options: `linears` picks the linears: `all` (every linear site, LM head included), `attention` (q/k/v/qkv and the
output projection) or `mlp` (the feed-forward projections); `iters` is power-iteration steps per training forward.
A weight shared by several selected linears gets one σReparam state; linears already reparameterized are skipped.
Run `fold_sigma_reparam` before deploying: it bakes (γ/σ)·W into plain weights.

Contract: reparameterize (the same function at insertion; a new trainable parameterization).
Paper: Zhai et al., "Stabilizing Transformer Training by Preventing Attention Entropy Collapse" (ICML 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from ..anatomy import Anatomy, Linear, anatomy
from ..ir import fresh_name, get_tensor, is_op
from ..ops import SigmaReparamWeight
from ..pipeline import PassContext, PassResult

aten = torch.ops.aten
_CONTAINER = "_txc_sigma"


def select_linears(anat: Anatomy, which: str) -> list[Linear]:
    """The linears `which` ("all", "attention", "mlp") names, each once, in graph order."""
    if which == "all":
        lins = list(anat.linears)
    elif which == "attention":
        lins = [lin for b in anat.blocks for lin in (*b.attention.projections, b.attention.out)]
    else:
        lins = [lin for b in anat.blocks if b.mlp is not None for lin in b.mlp.linears]
    unique = {lin.node: lin for lin in lins}
    return list(unique.values())


def _weight_site(lin: Linear) -> tuple[fx.Node, fx.Node]:
    """(the node that reads the weight's get_attr, that get_attr node) for one linear."""
    for arg in lin.node.all_input_nodes:
        if arg.op == "get_attr" and str(arg.target) == lin.weight:
            return lin.node, arg
        # x @ W.t(): the transpose reads the weight.
        if is_op(arg, aten.t, aten.transpose, aten.permute, aten.numpy_T):
            src = arg.args[0]
            if isinstance(src, fx.Node) and src.op == "get_attr" and str(src.target) == lin.weight:
                return arg, src
    raise ValueError(f"cannot find where {lin.node.name} reads its weight {lin.weight}")


@dataclass(frozen=True)
class SigmaReparam:
    """Reparameterize linear weights as (γ/σ(W))·W with power-iteration σ and a learnable γ (function unchanged)."""

    name: ClassVar[str] = "sigma_reparam"
    contract: ClassVar[str] = "reparameterize"
    summary: ClassVar[str] = "W -> (γ/σ(W))·W with power-iteration σ, γ learnable (= σ at insertion), for training"

    linears: Literal["all", "attention", "mlp"] = "all"
    iters: int = 1

    def __post_init__(self) -> None:
        if self.linears not in ("all", "attention", "mlp"):
            raise ValueError(f"sigma_reparam: linears must be all, attention or mlp, got {self.linears!r}")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise ValueError(f"sigma_reparam: iters must be an integer >= 0, got {self.iters!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        chosen = select_linears(anat, self.linears)
        notes: list[str] = []
        fresh = [lin for lin in chosen if lin.reparam is None]
        if len(fresh) < len(chosen):
            notes.append(f"{len(chosen) - len(fresh)} linears already reparameterized: left as they are")
        if not chosen:
            notes.append(f"no {self.linears} linears found")
        if not hasattr(gm, _CONTAINER):
            gm.add_module(_CONTAINER, torch.nn.Module())
        container = getattr(gm, _CONTAINER)
        reparam_of: dict[fx.Node, fx.Node] = {}  # weight get_attr -> its call_module node
        sigmas = []
        for lin in fresh:
            reader, w_node = _weight_site(lin)
            if w_node not in reparam_of:
                key = fresh_name(container, lin.weight)
                module = SigmaReparamWeight(get_tensor(gm, w_node), self.iters).train(gm.training)
                container.add_module(key, module)
                sigmas.append(float(module.gamma.detach()))
                with gm.graph.inserting_after(w_node):
                    node = gm.graph.call_module(f"{_CONTAINER}.{key}", (w_node,))
                node.meta["nn_module_stack"] = dict(lin.node.meta.get("nn_module_stack", {}))
                reparam_of[w_node] = node
            reader.replace_input_with(w_node, reparam_of[w_node])
        stats = {"linears": len(fresh), "weights": len(reparam_of)}
        if sigmas:
            stats.update(sigma_min=round(min(sigmas), 4), sigma_max=round(max(sigmas), 4))
        return PassResult(gm, bool(fresh), stats, tuple(notes))
