"""Token merging (ToMe bipartite soft matching): the runtime ops a `token_merge` rewrite inserts into each block.

Ops (shapes: B batch, T tokens entering the block, T' = T - merged_count(T, r, protected), T0 original tokens):
- `txc::bipartite_match(metric [B,T,Ck], valid [B,T] bool, r, protected) -> (dest [B,T] int64, keep [B,T'] int64)`:
  the merge plan of one block. `dest[b, i]` is the output slot that token i ends up in; `keep[b, j]` is the input
  token that owns output slot j (it is its own destination).
- `txc::merge_tokens(x [B,T,*], size [B,T], valid [B,T], dest, keep) -> (x' [B,T',*], size' [B,T'], valid' [B,T'])`:
  applies a plan. Each slot holds the size-weighted mean Σ sᵢxᵢ / Σ sᵢ of the tokens sent to it; a slot that received
  nothing holds its token's value bit for bit. valid'[b, j] = valid[b, keep[b, j]] (the destination's validity).
- `txc::unmerge_tokens(x [B,T,*], source [B,T0]) -> [B,T0,*]`: `out[b, i] = x[b, source[b, i]]`. With `source` the
  map from each original token to the slot holding it, this restores the original token count; the same op composes
  the map across blocks: `source' = unmerge_tokens(dest, source)` (the new slot of each original token).
Proportional attention needs no op: `size_bias(size, valid)` emits plain ATen nodes for the SDPA additive mask.

Before / after (one block; a post-LN block places the merge after its first norm instead)::

    h = x + attn(ln1(x), mask)             h = x + attn(ln1(x), size_bias(size, valid))
                                           dest, keep = txc.bipartite_match(k.mean(1), valid, r, protected)
                                           h, size, valid = txc.merge_tokens(h, size, valid, dest, keep)
                                           source = txc.unmerge_tokens(dest, source)   # if per-token outputs are read
    x = h + mlp(ln2(h))                    x = h + mlp(ln2(h))
    ...                                    ...
    out = head(x)                          out = head(txc.unmerge_tokens(x, source))  # a CLS head reads x[:, 0] as is

`init_token_state` makes the state the first block receives (size 1, all valid, source = identity) and
`token_merge_step` emits the three ops above. Both helpers and `size_bias` call ATen/txc overloads only, so a pass can
run them on `torch.fx.Proxy` values to insert ATen-level nodes, or on tensors.

Matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023). Tokens at even positions form set A, odd
positions set B; the first `protected` tokens (CLS, distillation) are in neither role. Every free A token finds its
most cosine-similar free B token (first on ties); the r' A tokens with the highest such similarity (stable sort: lower
position first on ties) merge into their B tokens, several possibly into one. Output order: protected tokens, the
unmerged A tokens, then the B tokens, each group in original order. r' = min(r, free A tokens), and 0 when no free B
token exists (`merged_count`). r <= 0 is exactly the identity.

Padding. Tokens with `valid` False never exchange values with valid ones: only valid x valid pairs are matched, and
merge_tokens averages only tokens whose validity equals their destination's. Padding is not matched: a row whose valid
tokens supply fewer than r' merges drops its last padding tokens instead (into the row's last slot, where they weigh
nothing unless it is padding too), so every row loses exactly r'. Unprotected valid tokens come before padding in the
output, so right padding stays right padding. Guarantee: for a right-padded row with n valid tokens, its first
n' = n - merged_count(n, r, protected) slots (its valid outputs) and `dest[b, :n]` equal those of the same sequence
merged alone (T = n, so r is clamped by n rather than by the batch's T), through any number of blocks, within float
rounding of the similarities. Unmerging gives padding positions arbitrary values: mask them with the original `valid`.
Masks that are not one contiguous span per row are accepted while padding can absorb the shortfall; otherwise the op
raises (CPU) or asserts on the device. On CUDA the sums use atomic scatter_add, so merged values may differ between
runs in the last bits.

Symbolic sizes. Under torch.export / torch.compile, T' = T - r as long as T >= `min_tokens(r, protected)`; the fake
implementation guards on which side of that threshold the example input lies, so an exported program keeps a linear
size (T - r per block) and records the range of T it accepts (nesting the exact clamped expression grows exponentially
with depth). A program exported for T >= threshold accepts shorter batches padded up to the threshold, with unchanged
results on their valid tokens (see Padding).

Not differentiable through the plan or the sizes; merge_tokens and unmerge_tokens are differentiable in x.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "bipartite_match",
    "merge_tokens",
    "unmerge_tokens",
    "merged_count",
    "min_tokens",
    "init_token_state",
    "token_merge_step",
    "size_bias",
]


def min_tokens(r: int, protected: int) -> int:
    """The smallest token count at which a block merges all r tokens (0 for r <= 0)."""
    if r <= 0:
        return 0
    # Free A tokens (T+1)//2 - (protected+1)//2 >= r, and a free token left to merge into: T - protected - 1 >= r.
    return max(2 * r + 2 * ((protected + 1) // 2) - 1, r + protected + 1)


def merged_count(num_tokens: Any, r: int, protected: int) -> Any:
    """r' for a block that sees `num_tokens` tokens: min(r, free A tokens), or 0 when no free B token exists.

    `num_tokens` may be a SymInt; the comparisons then guard on its value, which keeps each block's size linear.
    """
    if r <= 0:
        return 0
    if num_tokens >= min_tokens(r, protected):
        return r
    if num_tokens >= protected + 2:  # free A and free B tokens exist, but fewer than r free A ones
        return (num_tokens + 1) // 2 - (protected + 1) // 2
    return 0


def _check_tokens(op: str, **tensors: Tensor) -> None:
    """Each named tensor must be [B, T, ...] with the B, T of the first one; `valid` must be bool."""
    names = list(tensors)
    ref = tensors[names[0]]
    for name, t in tensors.items():
        need = 3 if name == "metric" else 2
        if t.dim() < need or t.shape[:2] != ref.shape[:2]:
            raise ValueError(
                f"txc::{op}: {name} must be [B, T{', C' if need == 3 else ''}] with the B, T of {names[0]} "
                f"{tuple(ref.shape[:2])}, got {tuple(t.shape)}"
            )
    if "valid" in tensors and tensors["valid"].dtype != torch.bool:
        raise ValueError(f"txc::{op}: valid must be a bool mask (False = padding), got {tensors['valid'].dtype}")


def _check_match_args(metric: Tensor, valid: Tensor, protected: int) -> None:
    _check_tokens("bipartite_match", valid=valid, metric=metric)
    if protected < 0:
        raise ValueError(f"txc::bipartite_match: protected must be >= 0, got {protected}")


@torch.library.custom_op("txc::bipartite_match", mutates_args=())
def bipartite_match(metric: Tensor, valid: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """The merge plan `(dest [B,T], keep [B,T'])` of bipartite soft matching on `metric` [B,T,Ck]."""
    _check_match_args(metric, valid, protected)
    batch, tokens = valid.shape
    dev = valid.device
    pos = torch.arange(tokens, device=dev)
    count = merged_count(tokens, r, protected)
    if count == 0:  # r <= 0, or at most one free token: nothing moves
        ident = pos.expand(batch, tokens)
        return ident.clone(), ident.clone()

    free = pos >= protected
    # Similarities decide a discrete plan: compute them in float32 at least.
    unit = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # [B, A, B-set]
    ok_a, ok_b = valid[:, 0::2] & free[0::2], valid[:, 1::2] & free[1::2]
    scores = scores.masked_fill(~(ok_a[:, :, None] & ok_b[:, None, :]), float("-inf"))
    best, match = scores.max(dim=-1)  # first maximum on ties
    num_a = best.shape[1]
    by_score = torch.argsort(best, dim=1, descending=True, stable=True)
    rank = torch.empty_like(by_score).scatter_(1, by_score, torch.arange(num_a, device=dev).expand(batch, num_a))
    merged_a = (rank < count) & (best > float("-inf"))  # per row min(r', its mergeable valid A tokens)

    # Padding makes up the rest of the row's r' removals, from its last padding token backwards.
    pad = ~valid & free
    extra = count - merged_a.sum(dim=1, keepdim=True)
    from_end = pad.flip(1).cumsum(1).flip(1)  # padding tokens at positions >= i
    dropped = pad & (from_end <= extra)
    short = (pad.sum(dim=1, keepdim=True) < extra).any()
    if short.device.type == "cpu":
        if bool(short):
            raise ValueError(
                f"txc::bipartite_match: a row cannot lose {count} tokens without merging valid tokens into padding; "
                "valid must be one contiguous span per row (right padding)"
            )
    else:
        torch._assert_async(~short, "txc::bipartite_match: valid must be one contiguous span per row")

    # Output order by group: protected, unmerged valid A, valid B, kept padding; removed tokens sort last.
    odd = (pos % 2 == 1).expand(batch, tokens)
    group = torch.where(odd, 2, 1).masked_fill(~valid, 3).masked_fill(~free, 0)
    removed = dropped.clone()
    removed[:, 0::2] |= merged_a
    order = torch.argsort(group.masked_fill(removed, 4), dim=1, stable=True)
    slot = torch.empty_like(order).scatter_(1, order, pos.expand(batch, tokens))
    kept_tokens = tokens - count
    dest = slot.masked_fill(dropped, kept_tokens - 1)  # weight zero there unless it is padding too
    dest[:, 0::2] = torch.where(merged_a, slot.gather(1, 2 * match + 1), dest[:, 0::2])
    return dest, order[:, :kept_tokens].contiguous()


@bipartite_match.register_fake
def _(metric: Tensor, valid: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    _check_match_args(metric, valid, protected)
    batch, tokens = valid.shape
    kept = tokens - merged_count(tokens, r, protected)
    return valid.new_empty((batch, tokens), dtype=torch.int64), valid.new_empty((batch, kept), dtype=torch.int64)


def _weights(size: Tensor, valid: Tensor, dest: Tensor, keep: Tensor, acc: torch.dtype):
    """(contributes [B,T], weight [B,T], total weight [B,T'], contributors [B,T'], valid' [B,T'])."""
    valid_out = valid.gather(1, keep)
    contributes = valid == valid_out.gather(1, dest)
    weight = torch.where(contributes, size.to(acc), 0)
    shape = keep.shape
    total = weight.new_zeros(shape).scatter_add_(1, dest, weight)
    members = torch.zeros(shape, dtype=torch.int32, device=dest.device).scatter_add_(1, dest, contributes.int())
    return contributes, weight, total, members, valid_out


def _rows(flat: Tensor, index: Tensor) -> Tensor:
    """`flat[b, index[b, k]]` for flat [B, T, C] and index [B, K]: whole rows, which index_select copies much faster
    than gather does element by element."""
    batch, tokens, chans = flat.shape
    offsets = torch.arange(batch, device=index.device)[:, None] * tokens
    return flat.reshape(batch * tokens, chans).index_select(0, (index + offsets).reshape(-1)).view(*index.shape, chans)


def _row_offsets(index: Tensor, tokens: int) -> Tensor:
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * tokens).reshape(-1)


@torch.library.custom_op("txc::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, size: Tensor, valid: Tensor, dest: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Apply a plan: `(x', size', valid')`, size-weighted means of the tokens each slot received."""
    _check_tokens("merge_tokens", x=x, size=size, valid=valid, dest=dest)
    batch, tokens = size.shape
    kept = keep.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    contributes, weight, total, members, valid_out = _weights(size, valid, dest, keep, acc)
    flat = x.reshape(batch, tokens, -1)
    chans = flat.shape[2]
    own = _rows(flat, keep)  # a fresh tensor: the merged slots are written into it below
    size_out = torch.where(members > 1, total.to(size.dtype), size.gather(1, keep))
    if kept < tokens:
        # Only the T - T' removed tokens move; every other slot is its own token, untouched. So the means are
        # computed on [B, T - T', C] tensors: each receiving slot becomes (w_own·x_own + Σ w_i·x_i) / Σ w.
        pos = torch.arange(tokens, device=dest.device)
        removed = keep.gather(1, dest) != pos
        gone = torch.argsort(removed.to(torch.int8), dim=1, descending=True, stable=True)[:, : tokens - kept]
        to = dest.gather(1, gone)  # [B, R] the slot each removed token goes to
        w = weight.gather(1, gone)[..., None]
        moved = _rows(flat, gone).to(acc)
        # where, not a product: padding holding inf/nan must not reach valid slots through a zero weight.
        moved = torch.where(contributes.gather(1, gone)[..., None], moved * w, 0)
        slots = _row_offsets(to, kept)
        sums = torch.zeros((batch * kept, chans), dtype=acc, device=x.device).index_add_(
            0, slots, moved.view(-1, chans)
        )
        mine = own.view(-1, chans).index_select(0, slots)
        own_w = weight.gather(1, keep).gather(1, to).reshape(-1, 1)  # a kept token always contributes to its slot
        mean = (mine.to(acc) * own_w + sums.index_select(0, slots)) / total.gather(1, to).reshape(-1, 1)
        # A slot reached only by non-contributing padding keeps its value bit for bit. Several tokens sent to one
        # slot write the same value, so the copy is deterministic.
        mean = torch.where((members.gather(1, to) > 1).reshape(-1, 1), mean.to(x.dtype), mine)
        own.view(-1, chans).index_copy_(0, slots, mean)
    return own.reshape(batch, kept, *x.shape[2:]), size_out, valid_out


@merge_tokens.register_fake
def _(x: Tensor, size: Tensor, valid: Tensor, dest: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_tokens("merge_tokens", x=x, size=size, valid=valid, dest=dest)
    batch, kept = keep.shape
    return x.new_empty((batch, kept, *x.shape[2:])), size.new_empty((batch, kept)), valid.new_empty((batch, kept))


def _merge_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's callback signature
    x, size, valid, dest, keep = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.save_for_backward(size, valid, dest, keep)


def _merge_backward(ctx, grad_x: Tensor | None, grad_size: Tensor | None, grad_valid: Tensor | None):  # noqa: ANN001, ANN202
    # x'_j = Σ_{i→j} wᵢxᵢ / Σ wᵢ (a slot with one contributor has w/Σw = 1), so dx_i = w_i / W_dest(i) · dx'_dest(i).
    if grad_x is None:
        return None, None, None, None, None
    size, valid, dest, keep = ctx.saved_tensors
    batch, tokens = dest.shape
    acc = torch.promote_types(ctx.x_dtype, torch.float32)
    _, weight, total, _, _ = _weights(size, valid, dest, keep, acc)
    coef = weight / total.gather(1, dest)
    flat = grad_x.reshape(batch, keep.shape[1], -1)
    grad = flat.gather(1, dest[..., None].expand(batch, tokens, flat.shape[2])) * coef[..., None]
    return grad.to(ctx.x_dtype).reshape(ctx.x_shape), None, None, None, None


merge_tokens.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("txc::unmerge_tokens", mutates_args=())
def unmerge_tokens(x: Tensor, source: Tensor) -> Tensor:
    """`out[b, i] = x[b, source[b, i]]`: per-slot values back to the original tokens (or a composed source map)."""
    if x.dim() < 2 or source.dim() != 2 or source.shape[0] != x.shape[0]:
        raise ValueError(
            "txc::unmerge_tokens: x must be [B, T, ...] and source [B, T0], "
            f"got {tuple(x.shape)} and {tuple(source.shape)}"
        )
    batch, tokens = source.shape
    out = _rows(x.reshape(x.shape[0], x.shape[1], -1), source)
    return out.reshape(batch, tokens, *x.shape[2:])


@unmerge_tokens.register_fake
def _(x: Tensor, source: Tensor) -> Tensor:
    return x.new_empty((source.shape[0], source.shape[1], *x.shape[2:]))


def _unmerge_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, source = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(source)


def _unmerge_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    (source,) = ctx.saved_tensors
    batch, tokens = source.shape
    flat = grad.reshape(batch, tokens, -1)
    out = flat.new_zeros((batch, ctx.x_shape[1], flat.shape[2]))
    out.scatter_add_(1, source[..., None].expand(batch, tokens, flat.shape[2]), flat)
    return out.reshape(ctx.x_shape), None


unmerge_tokens.register_autograd(_unmerge_backward, setup_context=_unmerge_setup)


# The helpers below call overloads only (no Python on shapes or values), so they run on tensors and on fx Proxies.
_aten, _txc = torch.ops.aten, torch.ops.txc


def init_token_state(x: Any, valid: Any = None, track_source: bool = True) -> tuple[Any, Any, Any]:
    """`(size, valid, source)` for tokens `x` [B, T, C] that no block has merged: size 1 (float32), all valid unless
    `valid` [B, T] bool is given, and source[b, i] = i (None without `track_source`)."""
    plane = _aten.select.int(x, -1, 0)  # [B, T]
    size = _aten.ones_like.default(plane, dtype=torch.float32)
    if valid is None:
        valid = _aten.ones_like.default(plane, dtype=torch.bool)
    if not track_source:
        return size, valid, None
    ones = _aten.ones_like.default(plane, dtype=torch.int64)
    source = _aten.sub.Tensor(_aten.cumsum.default(ones, 1), 1)  # arange(T) per row without a symbolic size
    return size, valid, source


def token_merge_step(
    x: Any, size: Any, valid: Any, metric: Any, r: int, protected: int, source: Any = None
) -> tuple[Any, Any, Any, Any]:
    """One block's merge: `(x', size', valid', source')`; source' is None when `source` is."""
    plan = _txc.bipartite_match.default(metric, valid, r, protected)
    dest, keep = plan[0], plan[1]
    merged = _txc.merge_tokens.default(x, size, valid, dest, keep)
    if source is not None:
        source = _txc.unmerge_tokens.default(dest, source)
    return merged[0], merged[1], merged[2], source


def size_bias(size: Any, valid: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Proportional attention: the SDPA additive mask [B, 1, 1, T] = log(size) on valid keys, dtype's min elsewhere.

    dtype should be the attention's dtype. A finite minimum (not -inf) keeps rows without valid keys free of NaN, as
    Hugging Face masks do.
    """
    bias = _aten.log.default(_aten._to_copy.default(size, dtype=dtype))
    bias = _aten.masked_fill.Scalar(bias, _aten.logical_not.default(valid), torch.finfo(dtype).min)
    return _aten.unsqueeze.default(_aten.unsqueeze.default(bias, 1), 1)
