"""txc::unpad_index, unpack_tokens and varlen_attention against padded computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import txcompile  # noqa: F401 - registers the ops
from txcompile.ops.unpad import unpack_tokens, unpad_index, varlen_attention


def test_index_and_prefix_sums_follow_any_padding_pattern():
    valid = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    index, cu = unpad_index(valid)
    assert index.tolist() == [0, 1, 5, 7] and cu.tolist() == [0, 2, 4, 4] and cu.dtype == torch.int32
    x = torch.randn(3, 4, 5)
    packed = x.flatten(0, 1).index_select(0, index)
    back = unpack_tokens(packed, index, valid)
    torch.testing.assert_close(back[valid], x[valid])
    assert (back[~valid] == 0).all()


def test_varlen_attention_equals_masked_padded_attention():
    heads, dim = 3, 8
    lengths = [1, 7, 4]
    valid = torch.zeros(3, 7, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
    q, k, v = (torch.randn(3, 7, heads * dim) for _ in range(3))
    index, cu = unpad_index(valid)
    packed = [t.flatten(0, 1).index_select(0, index) for t in (q, k, v)]
    out = unpack_tokens(varlen_attention(*packed, cu, heads, 0.3), index, valid)

    def split(t):
        return t.unflatten(2, (heads, dim)).transpose(1, 2)

    mask = valid[:, None, None, :]
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out[valid], ref.transpose(1, 2).flatten(2)[valid])
