"""qk_norm: a trainable LayerNorm on queries and keys, per head, right before the q·k dot product (QK-layernorm).

Before:                                          After:
    q = rope(heads(linear(x, Wq)))                   q = rope(heads(linear(x, Wq)))
    k = rope(heads(linear(x, Wk)))                   k = rope(heads(linear(x, Wk)))
                                                     q = aten.layer_norm(q, [d_head], w_q, b_q, eps)
                                                     k = aten.layer_norm(k, [d_head], w_k, b_k, eps)
    a = sdpa(q, k, v)                                a = sdpa(q, k, v)
      | softmax(q @ transpose(k) * s + mask) @ v       | softmax(q @ transpose(k) * s + mask) @ v

Normalizing q and k bounds the attention logits, which otherwise grow with the q/k weights at high learning rates
until the softmax saturates (attention-entropy collapse). Each block gets its own w_q, b_q, w_k, b_k of shape
[d_head], shared across heads, initialised to 1 and 0 and registered trainable (`affine=false`: no parameters).

Where the norm goes: on the exact tensors that meet in the dot product, so after RoPE and, for grouped-query
attention, after the key heads are repeated (the same result as before repeating, at Hq/Hkv times the cost). In eager
attention the scalar scalings of q and k and the transpose that makes k^T are walked back, so the norm reads q and k
themselves and the softmax scale still applies after it.
Declines per block, with a note: k^T is not a transpose of k, q and k are one tensor, or q or k is already normalized
per head (Qwen3/OLMo-style q/k norms, or a second run of this pass).

Contract: retrain (the function changes on purpose; verification records the cosine to the original, no budget).
Paper: Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters" (2023); Wortsman et al.,
"Small-scale proxies for large-scale Transformer training instabilities" (2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from ..anatomy import anatomy
from ..ir import add_tensor, tensor_meta
from ..norms import find_norms
from ..pipeline import PassContext, PassResult
from ..qk import locate_qk

aten = torch.ops.aten


def _normalized(node: fx.Node, stops: set[fx.Node], norm_outputs: set[fx.Node], limit: int = 64) -> bool:
    """Whether a per-head norm sits between the projections (`stops`) and `node`."""
    dh = tensor_meta(node).shape[-1]  # type: ignore[union-attr]
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        if n in seen or n in stops or n.op != "call_function":
            continue
        seen.add(n)
        val = tensor_meta(n)
        if n in norm_outputs and val is not None and val.shape[-1] == dh:
            return True
        frontier.extend(n.all_input_nodes)
    return False


@dataclass(frozen=True)
class QKNorm:
    """LayerNorm queries and keys per head before the attention dot product, with trainable weight and bias."""

    name: ClassVar[str] = "qk_norm"
    contract: ClassVar[str] = "retrain"
    summary: ClassVar[str] = "QK-layernorm: per-head LayerNorm on q and k before q·k, trainable (for retraining)"

    eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon"})
    affine: bool = field(default=True, metadata={"help": "learnable weight and bias of shape [head_dim]"})

    def __post_init__(self) -> None:
        if not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be a positive finite number, got {self.eps}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        anat = anatomy(gm)
        notes = [f"left alone: {note}" for note in anat.notes]
        norm_outputs = {n.output for n in find_norms(gm)}
        done = 0
        for block in anat.blocks:
            edges = locate_qk(block.attention)
            if isinstance(edges, tuple):
                stops = {lin.output for lin in block.attention.projections}
                which = [name for name, edge in zip("qk", edges) if _normalized(edge[0], stops, norm_outputs)]
                if which:
                    edges = f"{' and '.join(which)} already normalized per head"
            if isinstance(edges, str):
                notes.append(f"block {block.index}: {edges}")
                continue
            for name, edge in zip("qk", edges):
                self._normalize(gm, *edge, f"block{block.index}_{name}_norm")
            done += 1
        if not done:
            why = "no attention blocks found" if not anat.blocks else "no block's q and k could be normalized"
            notes.insert(0, f"qk_norm not applied: {why}")
        stats = {"attentions": done, "layernorms_added": 2 * done, "parameters_added": 4 * done if self.affine else 0}
        return PassResult(gm, bool(done), stats, tuple(notes))

    def _normalize(self, gm: fx.GraphModule, x: fx.Node, user: fx.Node, index: int, hint: str) -> None:
        """Make `user.args[index]` layer_norm(x) instead of x; every other reader of x keeps the raw value."""
        val = tensor_meta(x)
        assert val is not None
        dh = int(val.shape[-1])
        graph = gm.graph
        stack = x.meta.get("nn_module_stack")
        with graph.inserting_before(user):
            w = b = None
            if self.affine:
                like = dict(dtype=val.dtype, device=val.device)
                w = graph.get_attr(add_tensor(gm, f"{hint}_weight", torch.ones(dh, **like), trainable=True))
                b = graph.get_attr(add_tensor(gm, f"{hint}_bias", torch.zeros(dh, **like), trainable=True))
            ln = graph.call_function(aten.layer_norm.default, (x, [dh], w, b, self.eps))
        for node in (w, b, ln):
            if node is not None and stack:
                node.meta["nn_module_stack"] = dict(stack)
        user.update_arg(index, ln)
