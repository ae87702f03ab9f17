"""Token pruning (EViT, Zero-TPrune): the plan op a `token_prune` rewrite inserts, and the scores it ranks tokens by.

Op (B batch, T tokens entering the block, T' = pruned_length(T, keep, protected, fuse)):
- `txc::prune_plan(score [B,T], valid [B,T] bool, keep, protected, fuse)
      -> (dest [B,T] int64, keep [B,T'] int64, merge_valid [B,T] bool, valid_out [B,T'] bool)`:
  a plan in the format of `txc::bipartite_match` (`dest[b, i]`: the output slot token i goes to; `keep[b, j]`: the
  token owning slot j), applied by `txc::merge_tokens(x, size, merge_valid, dest, keep)`, whose validity output is
  replaced by `valid_out`; the unmerge map composes with `txc::unmerge_tokens(dest, source)`, all as in
  ops/token_merge.py. `token_prune_step` emits the three ops.

Per row, the first `protected` tokens (CLS, distillation) stay, plus the ceil(keep·n) highest-scoring of the row's n
valid unprotected tokens (ties: lower position first; padding ranks last). `score` is recomputed attention: EViT's
`attention_probs(..., first_query=True)` or Zero-TPrune's `pagerank`. Slots, per row: protected tokens, kept tokens
(original order), the fused slot (fuse=True, if the row pruned anything), then padding tokens (original order).
- fuse=True (EViT): every pruned token goes to the fused slot, owned by the first pruned token, so merge_tokens gives it
  their size-weighted mean and their total size (proportional attention weighs it by that size); unmerging gives the
  pruned tokens its value. A row that prunes nothing has padding in that slot instead. If no row can prune anything
  (T so small that ceil(keep·(T - protected)) = T - protected), T' = T + 1: the last slot copies a token, receives
  none, and is padding in `valid_out` (the one place it differs from merge_tokens' own validity output).
- fuse=False: pruned tokens vanish. merge_tokens averages only tokens whose validity equals their destination's, so
  `merge_valid` is `valid` with pruned tokens cleared; they are sent to the slot of the nearest kept token before them
  (after them, at the start of a row without protected tokens), which they leave unchanged. Unmerging gives a pruned
  token that kept neighbour's value. With fuse=True, merge_valid = valid.
Padding never reaches a valid slot: padding tokens beyond the row's padding slots go to its last slot, where they weigh
nothing unless it is padding too. Right padding stays right padding; any padding pattern is accepted. A padded row with
n valid tokens gets the same kept tokens, values and sizes in its first slots as the sequence alone (T = n), given the
same scores on its valid tokens, which scores that ignore padding keys (the helpers below) are, within float rounding.

Symbolic sizes. `keep` is read as the nearest fraction num/den with den <= 1000 (>= 0.001), and T' = protected +
(num·(T - protected) + den - 1) // den + fuse: integer arithmetic that stays an expression in a symbolic T under
torch.export (one guard, T > protected), so the exported program runs at other batch sizes and lengths. keep >= 1 is
exactly the identity plan.

Not differentiable through the plan; merge_tokens and unmerge_tokens are differentiable in x.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

__all__ = ["prune_plan", "keep_ratio", "pruned_length", "token_prune_step", "attention_probs", "pagerank"]

MIN_KEEP = 0.001  # the smallest fraction keep_ratio represents


def keep_ratio(keep: float) -> tuple[int, int]:
    """`keep` as (num, den), den <= 1000: 0.7 -> (7, 10), 1/3 -> (1, 3)."""
    frac = Fraction(min(keep, 1.0)).limit_denominator(1000)
    return frac.numerator, frac.denominator


def _kept(free: Any, keep: float) -> Any:
    """ceil(keep · free) for ints, SymInts and int64 tensors alike."""
    num, den = keep_ratio(keep)
    return (free * num + den - 1) // den


def pruned_length(tokens: Any, keep: float, protected: int, fuse: bool) -> Any:
    """T' = protected + ceil(keep · (T - protected)), plus the fused slot when `fuse`. T may be a SymInt."""
    if keep >= 1.0 or tokens <= protected:
        return tokens
    return protected + _kept(tokens - protected, keep) + int(fuse)


def _check_plan_args(score: Tensor, valid: Tensor, keep: float, protected: int) -> None:
    if score.dim() != 2 or valid.shape != score.shape:
        raise ValueError(
            f"txc::prune_plan: score and valid must both be [B, T], got {tuple(score.shape)} and {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"txc::prune_plan: valid must be a bool mask (False = padding), got {valid.dtype}")
    if not keep >= MIN_KEEP:  # also rejects nan
        raise ValueError(f"txc::prune_plan: keep must be a fraction >= {MIN_KEEP}, got {keep!r}")
    if protected < 0:
        raise ValueError(f"txc::prune_plan: protected must be >= 0, got {protected}")


@torch.library.custom_op("txc::prune_plan", mutates_args=())
def prune_plan(
    score: Tensor, valid: Tensor, keep: float, protected: int, fuse: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pruning plan `(dest [B,T], keep [B,T'], merge_valid [B,T], valid_out [B,T'])` ranking tokens by `score`."""
    _check_plan_args(score, valid, keep, protected)
    batch, tokens = valid.shape
    dev = valid.device
    pos = torch.arange(tokens, device=dev)
    out_len = pruned_length(tokens, keep, protected, fuse)
    if keep >= 1.0 or tokens <= protected:
        ident = pos.expand(batch, tokens)
        return ident.clone(), ident.clone(), valid.clone(), valid.clone()

    free = pos >= protected
    candidate = valid & free
    num_kept = _kept(candidate.sum(1, keepdim=True), keep)
    # Scores decide a discrete plan: rank in float32 at least; nan and -inf rank last among the candidates.
    rated = score.to(torch.promote_types(score.dtype, torch.float32))
    rated = rated.nan_to_num(nan=torch.finfo(rated.dtype).min).masked_fill(~candidate, float("-inf"))
    by_score = torch.argsort(rated, dim=1, descending=True, stable=True)  # stable: lower position first on ties
    rank = torch.empty_like(by_score).scatter_(1, by_score, pos.expand(batch, tokens))
    kept = candidate & (rank < num_kept)
    pruned = candidate & ~kept

    # Output order by group: protected 0, kept 1, the fused slot's owner 2, padding 3; other pruned tokens sort last.
    group = torch.where(kept, 1, 3).masked_fill(pruned, 4)
    if fuse:
        group = group.masked_fill(pruned & (pruned.cumsum(1) == 1), 2)
    group = group.masked_fill(~free, 0)
    order = torch.argsort(group, dim=1, stable=True)
    slot = torch.empty_like(order).scatter_(1, order, pos.expand(batch, tokens))
    # Only pruned tokens and padding that found no padding slot land past T' (pruned_length leaves room for the rest).
    dest = slot.masked_fill(slot >= out_len, out_len - 1)
    if fuse:
        dest = torch.where(pruned, protected + num_kept, dest)
        merge_valid = valid.clone()
    else:
        before = (kept | ~free).cumsum(1) - 1  # slot of the last kept token at or before each position
        dest = torch.where(pruned, before.clamp(min=0), dest)
        merge_valid = valid & ~pruned
    if out_len > tokens:  # no row prunes anything (T is small): the extra slot copies a token and is padding
        order = torch.cat([order, order[:, -1:]], dim=1)
    kept_idx = order[:, :out_len].contiguous()
    valid_out = merge_valid.gather(1, kept_idx)
    valid_out[:, tokens:] = False
    return dest, kept_idx, merge_valid, valid_out


@prune_plan.register_fake
def _(score: Tensor, valid: Tensor, keep: float, protected: int, fuse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_plan_args(score, valid, keep, protected)
    batch, tokens = valid.shape
    out_len = pruned_length(tokens, keep, protected, fuse)
    index = valid.new_empty((batch, tokens), dtype=torch.int64)
    kept_idx = valid.new_empty((batch, out_len), dtype=torch.int64)
    return index, kept_idx, valid.new_empty((batch, tokens)), valid.new_empty((batch, out_len))


# The helpers below call overloads only (no Python on shapes or values), so they run on tensors and on fx Proxies.
_aten, _txc = torch.ops.aten, torch.ops.txc


def token_prune_step(
    x: Any, size: Any, valid: Any, score: Any, keep: float, protected: int, fuse: bool, source: Any = None
) -> tuple[Any, Any, Any, Any]:
    """One block's pruning: `(x', size', valid', source')`; source' is None when `source` is."""
    plan = _txc.prune_plan.default(score, valid, keep, protected, fuse)
    dest, kept, merge_valid = plan[0], plan[1], plan[2]
    merged = _txc.merge_tokens.default(x, size, merge_valid, dest, kept)
    if source is not None:
        source = _txc.unmerge_tokens.default(dest, source)
    return merged[0], merged[1], plan[3], source


def attention_probs(
    q: Any, k: Any, mask: Any, scale: float, *, bool_mask: bool = False, groups: int = 1, first_query: bool = False
) -> Any:
    """softmax(q·kᵀ·scale + mask) averaged over heads, in float32, as SDPA computes it: [B, T, T] (query, key).

    q [B, H, T, D], k [B, H/groups, T, D] (grouped-query attention repeats each key head `groups` times); mask None or
    broadcastable to [B, H, T, T] with at least 2 dims, additive, or `bool_mask` (True = attend). `first_query`: only
    query 0's row, [B, T] (EViT's CLS attention).
    """
    q = _aten._to_copy.default(q, dtype=torch.float32)
    k = _aten._to_copy.default(k, dtype=torch.float32)
    if groups > 1:
        k = _aten.repeat_interleave.self_int(k, groups, 1)
    if first_query:
        q = _aten.slice.Tensor(q, 2, 0, 1)
        if mask is not None:
            mask = _aten.slice.Tensor(mask, -2, 0, 1)
    logits = _aten.mul.Tensor(_aten.matmul.default(q, _aten.transpose.int(k, -2, -1)), scale)
    if mask is not None and bool_mask:
        # Finite, as Hugging Face masks are: a query that sees no key gets a uniform row instead of NaN.
        logits = _aten.where.ScalarOther(mask, logits, torch.finfo(torch.float32).min)
    elif mask is not None:
        logits = _aten.add.Tensor(logits, _aten._to_copy.default(mask, dtype=torch.float32))
    probs = _aten.mean.dim(_aten.softmax.int(logits, -1), [1])
    return _aten.select.int(probs, 1, 0) if first_query else probs


def pagerank(probs: Any, valid: Any, iters: int) -> Any:
    """Zero-TPrune's weighted PageRank [B, T]: s <- Aᵀ s (s_j = Σ_i A[i, j] s_i), `iters` times from uniform on valid.

    A = `probs` [B, T, T]. Its rows sum to 1, so s stays a distribution; padding starts at 0 and stays there as long
    as the attention mask hides padding keys.
    """
    weight = _aten._to_copy.default(valid, dtype=torch.float32)
    s = _aten.div.Tensor(weight, _aten.sum.dim_IntList(weight, [1], True))
    s = _aten.unsqueeze.default(s, 1)  # [B, 1, T]: one row vector per sequence, s <- s A
    for _ in range(iters):
        s = _aten.bmm.default(s, probs)
    return _aten.squeeze.dim(s, 1)
