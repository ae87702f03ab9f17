"""Megatron-LM's tensor-parallel communication, as autograd-aware functions over torch.distributed collectives.

    copy_to(x)            forward: x                       backward: all-reduce(grad)    ("f": where a replicated
                                                                                          value enters split work)
    reduce_from(x)        forward: all-reduce(x)           backward: grad                ("g": after a row-parallel
                                                                                          linear's partial sums)
    gather_from(x, d, n)  forward: all-gather along d,     backward: this rank's slice of grad
                          trimmed to n (padded vocab)
    vocab_embedding       the rows this rank holds looked up, the others zero, then reduce_from

Every rank computes the same loss from replicated values, so the gradient of a replicated value is the same on every
rank: `reduce_from`'s backward passes it through and `copy_to`'s sums the partial input gradients of the ranks' split
work (Shoeybi et al. 2019, section 3). The rewritten graphs call these with the tensor-parallel group's registry key (a
string, so GraphModule code generation can print it).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["copy_to", "gather_from", "reduce_from", "register_group", "vocab_embedding"]

_GROUPS: dict[str, Any] = {}
_KEYS = itertools.count()


def register_group(group: Any) -> str:
    """A key for `group` (a ProcessGroup, or None for the default group) that rewritten graphs pass around."""
    for key, known in _GROUPS.items():
        if known is group:
            return key
    key = f"tp{next(_KEYS)}"
    _GROUPS[key] = group
    return key


def _group(key: str) -> Any:
    return _GROUPS[key]


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=_group(key))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_group(ctx.key))
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, full: int, key: str) -> torch.Tensor:
        group = _group(key)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dim = dim % x.dim()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        ctx.dim, ctx.local, ctx.rank, ctx.world = dim, x.shape[dim], rank, world
        return torch.cat(parts, dim).narrow(dim, 0, full)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        padded = ctx.local * ctx.world
        if grad.shape[ctx.dim] < padded:
            pad = list(grad.shape)
            pad[ctx.dim] = padded - grad.shape[ctx.dim]
            grad = torch.cat([grad, grad.new_zeros(pad)], ctx.dim)
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local).contiguous(), None, None, None


def reduce_from(x: torch.Tensor, key: str) -> torch.Tensor:
    return _Reduce.apply(x, key)


def copy_to(x: torch.Tensor, key: str) -> torch.Tensor:
    return _Copy.apply(x, key)


def gather_from(x: torch.Tensor, dim: int, full: int, key: str) -> torch.Tensor:
    return _Gather.apply(x, dim, full, key)


def vocab_embedding(table: torch.Tensor, ids: torch.Tensor, start: int, key: str, *rest: Any) -> torch.Tensor:
    """aten.embedding over a table holding rows [start, start + len(table)) of the vocabulary: ids outside it look up
    row 0 and are zeroed, and the ranks' partial lookups are summed."""
    local = ids - start
    outside = (local < 0) | (local >= table.shape[0])
    rest_list = list(rest)
    if rest_list and rest_list[0] >= 0:  # padding_idx is a global row: local to the rank holding it, else none
        rest_list[0] = rest_list[0] - start if 0 <= rest_list[0] - start < table.shape[0] else -1
    out = torch.ops.aten.embedding(table, local.masked_fill(outside, 0), *rest_list)
    return reduce_from(out.masked_fill(outside.unsqueeze(-1), 0), key)
