"""token_prune: keep the most attended tokens between attention and MLP of selected blocks (EViT, Zero-TPrune).

Before (one selected block):                     After:
    h = x + attn(norm(x), mask)                      h = x + attn(norm(x), bias(size, valid))   # proportional attn
                                                     s = cls_attention(q, k) | pagerank(attention(q, k), valid)
                                                     plan = txc.prune_plan(s, valid, keep, protected, fuse)
                                                     h, size, valid, source = txc.merge_tokens(h, size, ...plan)
    y = h + mlp(norm(h))                             y = h + mlp(norm(h))           # on p + ceil(keep·(T-p)) (+1)
    ...                                              ...
    out = final(y_last)                              out = final(unmerge(y_last, source))       # unmerge=true

Each selected block keeps its protected tokens (CLS, DeiT's distillation token; detected, or `protected=N`) and the
ceil(keep·n) of its n other tokens with the highest score, recomputed from the block's own q and k as the model's
attention computes them (scale, mask, grouped-query heads), averaged over heads: `score=cls`, the attention the CLS
token pays each token (EViT), or `score=pagerank`, weighted PageRank on the attention graph, `iters` iterations from
uniform (Zero-TPrune, training-free). With `fuse=true` (EViT) the pruned tokens are merged into one extra token, their
size-weighted mean; with `fuse=false` they are dropped. Token sizes are carried along and later attentions add
log(size) to their logits (proportional attention, as in token_merge), so the fused token weighs what it stands for.
With a padding mask (text models), padding ranks after every real token and each padded sequence keeps what it would
keep alone. `unmerge=true` restores per-token outputs: a pruned token reads the fused token (fuse) or its nearest
kept neighbour (no fuse). The token count stays a symbolic expression of the input length (see ops/token_prune.py).
Declines (with a note) on causal, eager-attention and parallel blocks, and on graphs whose tokens a token_merge or
token_prune already reduces, so a second round changes nothing.

Options: `keep` (fraction of free tokens kept per selected block, (0, 1]), `blocks` ("3::3": every third block from
the fourth, EViT's placement on 12-block ViTs; "all", "3:", "0,2,4", "start:stop:step"), `score`, `fuse`, `iters`,
`protected`, `unmerge`, `min_cosine` (the budget verification holds the output to).

Contract: approximate (identity at keep=1). Metric: cosine similarity of the outputs to the original's >= min_cosine.
Papers: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"
(EViT, ICLR 2022); Wang et al., "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers" (CVPR 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..anatomy import Anatomy, Block
from ..ir import tensor_meta
from ..ops.token_prune import MIN_KEEP, attention_probs, pagerank, token_prune_step
from ..pipeline import PassContext, PassResult
from ..qk import locate_qk
from ..tokens import (
    TokenReducer,
    attn_mask,
    reduce_tokens,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class TokenPrune(TokenReducer):
    """EViT / Zero-TPrune: keep the top-scoring fraction of tokens between attention and MLP of selected blocks."""

    name: ClassVar[str] = "token_prune"
    contract: ClassVar[str] = "approximate"
    count_stat: ClassVar[str] = "pruned_blocks"
    summary: ClassVar[str] = "EViT/Zero-TPrune token pruning by attention score, pruned tokens fused or dropped"

    keep: float = 0.7
    blocks: str = "3::3"
    score: Literal["cls", "pagerank"] = "cls"
    fuse: bool = True
    iters: int = 20
    protected: int | None = None
    unmerge: bool = True
    min_cosine: float = 0.9

    def __post_init__(self) -> None:
        if not MIN_KEEP <= self.keep <= 1.0:  # also rejects nan
            raise ValueError(f"token_prune: keep must be a fraction in [{MIN_KEEP}, 1], got {self.keep!r}")
        if self.score not in ("cls", "pagerank"):
            raise ValueError(f"token_prune: score must be 'cls' or 'pagerank', got {self.score!r}")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"token_prune: iters must be an integer >= 1, got {self.iters!r}")
        self._check_shared_options()

    def is_identity(self) -> bool:
        return self.keep >= 1.0

    def _reduce(
        self, gm: fx.GraphModule, ctx: PassContext, anat: Anatomy, chosen: list[int], padding: fx.Node | None,
        protected: int,
    ) -> PassResult:  # fmt: skip
        return self._insert(gm, anat, set(chosen), padding, protected)

    def _attention(self, block: Block, mask_is_ours: bool) -> tuple[fx.Node, fx.Node, Any, dict[str, Any]] | str:
        """(q, k, mask, options) to recompute the block's attention probabilities with, or why it cannot be done."""
        core = block.attention.core
        edges = locate_qk(block.attention)
        if isinstance(edges, str):
            return edges
        # SDPA's own operands, not locate_qk's edges (which walk back through scalar scales): the scores must be the
        # probabilities this attention computes.
        q, k = core.args[0], core.args[1]
        vq, vk = tensor_meta(q), tensor_meta(k)
        if vq is None or vk is None or vq.dim() != 4 or vk.dim() != 4 or vq.shape[1] % vk.shape[1]:
            return "q and k are not [batch, heads, tokens, head size] with query heads a multiple of key heads"
        mask = attn_mask(core)
        meta = tensor_meta(mask)
        if mask is not None and not mask_is_ours and (meta is None or meta.dim() < 2):
            return "attention mask without [.., queries, keys] dims"
        scale = core.kwargs.get("scale")
        options = {
            "scale": 1.0 / math.sqrt(int(vq.shape[-1])) if scale is None else float(scale),
            "bool_mask": not mask_is_ours and meta is not None and meta.dtype == torch.bool,
            "groups": int(vq.shape[1]) // int(vk.shape[1]),
            "first_query": self.score == "cls",  # EViT: the attention the CLS token (query 0) pays
        }
        return q, k, mask, options

    def _insert(
        self, gm: fx.GraphModule, anat: Anatomy, chosen: set[int], padding: fx.Node | None, protected: int
    ) -> PassResult:
        def step(plan: Any, proxy: Any, point: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any, Any]:
            q, k, mask, options = plan
            score = attention_probs(proxy(q), proxy(k), proxy(mask), **options)
            if self.score == "pagerank":
                score = pagerank(score, state[1], self.iters)
            return token_prune_step(point, state[0], state[1], score, self.keep, protected, self.fuse, state[2])

        pruned, notes, unmerged = reduce_tokens(
            gm, anat, chosen, padding, protected, self.unmerge, lambda b, before: self._attention(b, before), step
        )
        if not pruned:
            return PassResult(gm, False, {"pruned_blocks": 0}, tuple(notes))
        stats = {"pruned_blocks": pruned, "keep": self.keep, "score": self.score, "fuse": self.fuse,
                 "protected": protected, "padding_aware": padding is not None, "unmerged": unmerged}  # fmt: skip
        return PassResult(gm, True, stats, tuple(notes))
