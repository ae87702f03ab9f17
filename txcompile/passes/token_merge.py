"""token_merge: ToMe bipartite soft matching between attention and MLP of every selected block.

Before (one block):                              After:
    h = x + attn(norm(x), mask)                      h = x + attn(norm(x), bias(size, valid))   # proportional attn
                                                     plan = txc.bipartite_match(mean_heads(k), valid, r, protected)
                                                     h, size, valid, source = txc.merge_tokens(h, size, valid, ...)
    y = h + mlp(norm(h))                             y = h + mlp(norm(h))                       # on T - r tokens
    ...                                              ...
    out = final(y_last)                              out = final(unmerge(y_last, source))       # unmerge=true

Each selected block removes r tokens: its tokens are split alternately into sets A and B, each A token finds its most
similar B token (cosine of the attention keys averaged over heads), and the r most similar pairs are merged by a
size-weighted average. Token sizes (how many input tokens a token stands for) are carried along, and every later
attention adds log(size) to its logits as an SDPA mask (proportional attention), so fused attention stays usable.
Protected tokens (CLS, DeiT's distillation token; detected, or `protected=N`) never merge. With a padding mask (text
models), padding never merges with real tokens and the mask follows the merges. `unmerge=true` gives every input token
the value of the token it ended in, so per-token outputs (last_hidden_state, mean pooling) keep their shape; it is
skipped, with the source tracking that feeds it, when the outputs read only the protected tokens (a CLS head).

Options: `r` tokens per block, `schedule` constant or decreasing (2r at the first block down to 0 at the last, the
same total), `flops` (a target fraction of the token-layer FLOPs to remove at the captured length: picks r), `blocks`
("all", "3:", "0,2,4"), `protected`, `unmerge`, `metric` (what similarity is measured on: `keys` averaged over heads
as in ToMe; `keys_concat`, all heads' keys side by side, which kept all-MiniLM-L6-v2's sentence embeddings closer in
our measurements, see benchmarks/token_reduction.py; or `hidden`, the residual stream), `min_cosine` (the budget
verification holds the output to), `auto` (pick the largest r that keeps `min_cosine` on the example inputs and
calibration data, by bisection; `schedule` and `blocks` still apply, `r` and `flops` are ignored).

Contract: approximate (identity at r=0). Metric: cosine similarity of the outputs to the original's >= min_cosine.
Paper: Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023); proportional attention from the same paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from ..anatomy import Anatomy, Block, anatomy
from ..cost import example_shape
from ..ir import copy_graph_module, tensor_meta
from ..ops.token_merge import merged_count, token_merge_step
from ..pipeline import PassContext, PassResult
from ..qk import locate_qk
from ..verify import output_cosine, run_program
from ..tokens import (
    Decline,
    TokenReducer,
    reduce_tokens,
    token_shares,
)

aten = torch.ops.aten


def schedule(r: int, kind: str, count: int) -> list[int]:
    """Tokens removed by each of `count` selected blocks: constant r, or decreasing from 2r to 0 (the same total)."""
    if kind == "constant" or count <= 1:
        return [r] * count
    return [round(2 * r * (count - 1 - i) / (count - 1)) for i in range(count)]


def r_for_flops(fraction: float, blocks: list[Block], chosen: list[int], tokens: int, protected: int, kind: str) -> int:
    """The smallest r whose schedule removes at least `fraction` of the linear layers' token FLOPs at `tokens`."""

    def removed(r: int) -> float:
        rs = dict(zip(chosen, schedule(r, kind, len(chosen))))
        t, full, kept = tokens, 0.0, 0.0
        for b in blocks:
            att, mlp = token_shares(b)
            full += (att + mlp) * tokens
            after = t - merged_count(t, rs.get(b.index, 0), protected)
            kept += att * t + mlp * after
            t = after
        return 1 - kept / full

    for r in range(tokens):
        if removed(r) >= fraction:
            return r
    raise Decline(f"no r removes {fraction:.0%} of the token FLOPs at {tokens} tokens")


def _metric(kind: str, key: Any, stream: Any) -> Any:
    """The [B, T, C] features whose cosine similarity decides the matching, from the SDPA key [B, H, T, Dh]."""
    if kind == "keys":  # ToMe: keys averaged over heads
        return aten.mean.dim(key, [1])
    if kind == "keys_concat":  # every head's key side by side: the heads' similarities summed, not their keys
        return aten.flatten.using_ints(aten.transpose.int(key, 1, 2), 2)
    return stream


@dataclass(frozen=True)
class TokenMerge(TokenReducer):
    """ToMe: merge the r most similar token pairs between attention and MLP of each block (bipartite matching)."""

    name: ClassVar[str] = "token_merge"
    contract: ClassVar[str] = "approximate"
    count_stat: ClassVar[str] = "merged_blocks"
    summary: ClassVar[str] = "ToMe bipartite soft matching: r tokens merged per block, proportional attention"

    r: int = 8
    schedule: Literal["constant", "decreasing"] = "constant"
    flops: float | None = None
    blocks: str = "all"
    protected: int | None = None
    unmerge: bool = True
    metric: Literal["keys", "keys_concat", "hidden"] = "keys"
    auto: bool = False
    min_cosine: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"token_merge: r must be an integer >= 0, got {self.r!r}")
        if self.flops is not None and not 0.0 <= self.flops < 1.0:
            raise ValueError(f"token_merge: flops must be a fraction in [0, 1), got {self.flops!r}")
        self._check_shared_options()

    def is_identity(self) -> bool:
        return not self.auto and ((self.r == 0 and self.flops is None) or self.flops == 0.0)

    def _reduce(
        self, gm: fx.GraphModule, ctx: PassContext, anat: Anatomy, chosen: list[int], padding: fx.Node | None,
        protected: int,
    ) -> PassResult:  # fmt: skip
        tokens = tensor_meta(anat.blocks[0].stream_in)
        assert tokens is not None  # check_reducible saw it
        r = self.r
        seq = example_shape(gm, anat)[1] if isinstance(tokens.shape[1], torch.SymInt) else int(tokens.shape[1])
        if self.auto:
            r = self._largest_r(gm, ctx, chosen, padding, protected, seq)
            if r == 0:
                raise Decline(f"even r=1 falls below min_cosine={self.min_cosine} on the example inputs")
        elif self.flops is not None:
            r = r_for_flops(self.flops, list(anat.blocks), chosen, seq, protected, self.schedule)
        per_block = dict(zip(chosen, schedule(r, self.schedule, len(chosen))))
        return self._insert(gm, anat, per_block, padding, protected)

    def _largest_r(
        self, gm: fx.GraphModule, ctx: PassContext, chosen: list[int], padding: fx.Node | None, protected: int, seq: int
    ) -> int:
        """auto: the largest r whose program keeps the output cosine >= min_cosine on the example inputs (and the
        calibration data, if any), by bisection: the quality falls as r grows."""
        batches = [ctx.example_inputs, *(ctx.calibration_data or ())]
        reference = [run_program(gm, b) for b in batches]

        def holds(r: int) -> bool:
            trial = copy_graph_module(gm)
            pad = next(n for n in trial.graph.nodes if n.name == padding.name) if padding is not None else None
            per_block = dict(zip(chosen, schedule(r, self.schedule, len(chosen))))
            self._insert(trial, anatomy(trial), per_block, pad, protected)
            trial.recompile()
            outputs = (run_program(trial, b) for b in batches)
            return all(output_cosine(ref, out) >= self.min_cosine for ref, out in zip(reference, outputs))

        lo, hi = 0, max(1, (seq - protected) // 2)  # r = lo holds; beyond hi a block has nothing left to merge
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if holds(mid) else (lo, mid - 1)
        return lo

    def _insert(
        self, gm: fx.GraphModule, anat: Anatomy, per_block: dict[int, int], padding: fx.Node | None, protected: int
    ) -> PassResult:
        def check(block: Block, reduced_before: bool) -> Any:
            edges = locate_qk(block.attention)
            return edges if isinstance(edges, str) else (edges[1][0], per_block[block.index])

        def step(plan: Any, proxy: Any, point: Any, state: tuple[Any, Any, Any]) -> tuple[Any, Any, Any, Any]:
            key, r = plan
            metric = _metric(self.metric, proxy(key), point)
            return token_merge_step(point, state[0], state[1], metric, r, protected, state[2])

        chosen = [i for i, r in per_block.items() if r > 0]
        merged, notes, unmerged = reduce_tokens(gm, anat, chosen, padding, protected, self.unmerge, check, step)
        if not merged:
            return PassResult(gm, False, {"merged_blocks": 0}, tuple(notes))
        stats = {"merged_blocks": merged, "r": max(per_block.values()), "protected": protected,
                 "padding_aware": padding is not None, "unmerged": unmerged}  # fmt: skip
        return PassResult(gm, True, stats, tuple(notes))
