"""Padding-free execution (ByteTransformer): the ops an `unpad` rewrite inserts.

B sequences padded to T tokens, N = the number of real tokens in the batch:
- `txc::unpad_index(valid [B, T] bool) -> (index [N] int64, cu_seqlens [B + 1] int32)`: the flat positions b*T + t
  of the real tokens, in order, and the prefix sum of the sequences' lengths (FlashAttention's varlen convention).
  Real tokens need not be contiguous: any padding pattern packs. N depends on the data (unbacked under export).
- `txc::unpack_tokens(x [N, *], index [N], valid [B, T]) -> [B, T, *]`: the packed rows put back at their positions,
  zeros at the padding.
- `txc::varlen_attention(q [N, H*D], k [N, H*Dk... same], v [N, H*Dv], cu_seqlens, heads, scale) -> [N, H*Dv]`: each
  sequence's tokens attend to that sequence's tokens only, with no mask and no padding. On CPU it runs one fused SDPA
  call per sequence (so padded keys cost nothing); `backends/triton/kernels/attention.py` has the GPU kernel.
Packing itself is plain ATen: `x.flatten(0, 1).index_select(0, index)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["unpad_index", "unpack_tokens", "varlen_attention"]


@torch.library.custom_op("txc::unpad_index", mutates_args=())
def unpad_index(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(flat positions of the real tokens, int32 prefix sum of the rows' lengths)."""
    if valid.dim() != 2:
        raise ValueError(f"txc::unpad_index: valid must be [batch, tokens], got {tuple(valid.shape)}")
    valid = valid != 0
    lengths = valid.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(valid.shape[0] + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = lengths.cumsum(0)
    return valid.flatten().nonzero().flatten(), cu


@unpad_index.register_fake
def _(valid: Tensor) -> tuple[Tensor, Tensor]:
    total = torch.library.get_ctx().new_dynamic_size()
    return valid.new_empty((total,), dtype=torch.int64), valid.new_empty((valid.shape[0] + 1,), dtype=torch.int32)


@torch.library.custom_op("txc::unpack_tokens", mutates_args=())
def unpack_tokens(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """[B, T, *] with x's rows at `index` and zeros at the padding."""
    batch, tokens = valid.shape
    out = x.new_zeros((batch * tokens, *x.shape[1:]))
    out.index_copy_(0, index, x)
    return out.view(batch, tokens, *x.shape[1:])


@unpack_tokens.register_fake
def _(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    return x.new_empty((valid.shape[0], valid.shape[1], *x.shape[1:]))


@torch.library.custom_op("txc::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, heads: int, scale: float) -> Tensor:
    """Attention within each packed sequence: [N, heads*D] in, [N, heads*Dv] out."""
    if q.dim() != 2 or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"txc::varlen_attention: q, k, v must be [tokens, heads*dim] with the same tokens, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    out = q.new_empty((q.shape[0], v.shape[1]))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue

        def heads_first(t: Tensor) -> Tensor:  # [L, H*D] -> [1, H, L, D]
            return t[start:end].unflatten(1, (heads, -1)).transpose(0, 1)[None]

        o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
        out[start:end] = o[0].transpose(0, 1).flatten(1)
    return out


@varlen_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, heads: int, scale: float) -> Tensor:
    return q.new_empty((q.shape[0], v.shape[1]))
