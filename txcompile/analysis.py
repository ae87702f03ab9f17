"""Attention diagnostics per layer and head: entropy, logit growth, and the norm of the bilinear logit map.

    stats = txc.analysis.attention_entropy(opt, batch)   # opt: txc.optimize(...) or txc.capture(...) result
    stats.entropy            # [layers, heads] mean attention entropy, nats
    run.log(stats.as_dict())                             # JSON-able, for any experiment logger
    print(stats)

σReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse") tracks the
entropy of every head's attention rows and bounds it below by a quantity that decreases in σ(W_Q W_K^T)·||X||², the
spectral norm of the logit map; "Small-scale proxies for large-scale Transformer training instabilities" (Wortsman
et al. 2023) tracks the growth of the largest attention logit. This module measures all of them from one run of a
captured program, so it can be called every few hundred steps as a training callback.

What is measured, for each attention core `anatomy` finds (SDPA or eager matmul + softmax):
- `entropy`: -Σ_k p log p per query row, averaged over the batch and the valid query rows. A row is valid when at
  least one key is unmasked and, if the inputs hold a 2D `attention_mask` matching the core's [batch, queries], its
  query is not padding.
- `max_logit`: max |logit| over valid entries; a logit is the softmax input (q·k scaled, plus any additive bias).
- `logit_norm`: the spectral norm of each sample's [queries, keys] logit matrix with masked entries zeroed, averaged
  over the batch.
- `weight_norm`: σ(scale · W_Q,h^T W_K,h), the norm of the map (x, y) -> logit, from the q/k projection weights the
  program actually multiplied by (so reparameterized weights count). With RoPE this is the map at relative distance 0.
An entry is masked when the additive mask part of its logit is below -1e3 (every mask in use: -inf, finfo.min,
-1e4, -1e9; boolean masks and is_causal count exactly). For eager attention the mask part is what remains of the
softmax input after the fitted factor times q·k; that factor is exact when the core only scales and masks.
Dropout inside the core is ignored: the statistics describe the distribution attention samples from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .anatomy import Attention, anatomy
from .capture import CallSpec, capture, capture_info, eval_mode, normalize_inputs
from .errors import InputError
from .ir import is_op
from .linears import Linear
from .verify import flatten_inputs

aten = torch.ops.aten

__all__ = ["AttentionStats", "attention_entropy"]

_MASKED_BELOW = -1e3  # an additive mask part below this hides the entry (see the module docstring)
_SCALING = (aten.mul, aten.div)
_PATH_LIMIT = 128


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class AttentionStats:
    """Attention statistics of one forward pass; tensors are [layers, heads] (float64, NaN where undefined)."""

    layers: tuple[str, ...]  # the attention's module path per layer ("blocks.0.attn"), or "block <i>"
    entropy: torch.Tensor  # nats; log(keys) is the uniform maximum
    max_logit: torch.Tensor
    logit_norm: torch.Tensor
    weight_norm: torch.Tensor | None  # None when no layer's q/k projections were identified

    @property
    def min_entropy(self) -> float:
        """The lowest head entropy in the model: the entropy-collapse signal."""
        finite = self.entropy[~self.entropy.isnan()]
        return float(finite.min()) if finite.numel() else math.nan

    @property
    def mean_entropy(self) -> torch.Tensor:
        """[layers]: entropy averaged over each layer's heads."""
        return self.entropy.nanmean(dim=1)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and floats (NaN as None), ready for json.dumps or an experiment logger."""

        def rows(t: torch.Tensor | None) -> list[list[float | None]] | None:
            return None if t is None else [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

        return {
            "layers": list(self.layers),
            "entropy": rows(self.entropy),
            "max_logit": rows(self.max_logit),
            "logit_norm": rows(self.logit_norm),
            "weight_norm": rows(self.weight_norm),
            "min_entropy": _json_float(self.min_entropy),
            "mean_entropy": [_json_float(x) for x in self.mean_entropy.tolist()],
            "max_logit_overall": _json_float(float(self.max_logit.nan_to_num(nan=0.0).max())),
        }

    def __str__(self) -> str:
        from .report import render_table

        def fmt(x: float) -> str:
            return "-" if math.isnan(x) else f"{x:.3f}"

        rows = []
        for i, layer in enumerate(self.layers):
            e = self.entropy[i]
            w = "-" if self.weight_norm is None else fmt(float(self.weight_norm[i].nan_to_num(nan=-math.inf).max()))
            rows.append([layer, fmt(float(e.nanmean())), f"{fmt(float(e.nan_to_num(nan=math.inf).min()))} "
                         f"(h{int(e.nan_to_num(nan=math.inf).argmin())})", fmt(float(self.max_logit[i].max())),
                         fmt(float(self.logit_norm[i].max())), w])  # fmt: skip
        layers, heads = self.entropy.shape
        title = f"attention entropy: {layers} layers x {heads} heads (nats; min {fmt(self.min_entropy)})"
        header = ["layer", "entropy mean", "entropy min (head)", "max |logit|", "logit norm (max)", "weight norm (max)"]
        return render_table(title, header, rows)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


def attention_entropy(model: Any, inputs: Any) -> AttentionStats:
    """Attention entropy, max |logit|, logit-matrix and logit-map spectral norms per layer and head.

    Args:
        model: a captured program (`txc.capture(...)`), an `OptimizedModule` (its `.graph_module` is used) or a
            loaded artifact; these share their live weights, so as a training callback pass the program you train.
            A plain `nn.Module` is captured first, which clones its weights: the statistics then describe the weights
            at call time, and every call captures again (seconds, not milliseconds).
        inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors, as for the model.

    Returns:
        `AttentionStats`; see the module docstring for what is averaged and which entries are masked.

    The program runs once in eval mode (restored afterwards; σReparam's power iteration does not step) under no_grad.
    """
    gm, call, name = _program(model, inputs)
    args, kwargs = normalize_inputs(inputs, what="inputs")
    if call is not None:
        args, kwargs = call.adapt(args, kwargs)
    anat = anatomy(gm)
    if not anat.blocks:
        notes = "; ".join(anat.notes)
        raise InputError(
            f"attention_entropy: found no attention in {name}: expected aten.scaled_dot_product_attention or "
            f"softmax(q @ k^T) @ v fed by q/k/v linear projections in a program from txc.capture or txc.optimize"
            + (f" ({notes})" if notes else "")
        )
    named = dict(zip(call.positional, args)) if call is not None else {}
    named.update(kwargs)
    keep = named.get("attention_mask")
    keep = keep != 0 if isinstance(keep, torch.Tensor) and keep.dim() == 2 else None
    probe = _Probe(gm, [b.attention for b in anat.blocks], keep)
    with torch.no_grad(), eval_mode(gm):
        probe.run(*flatten_inputs(gm, (args, kwargs)))
    heads = max((r["entropy"].numel() for r in probe.results if r), default=0)

    def stack(key: str) -> torch.Tensor:
        out = torch.full((len(probe.results), heads), math.nan, dtype=torch.float64)
        for i, r in enumerate(probe.results):
            if r.get(key) is not None:
                out[i, : r[key].numel()] = r[key]
        return out

    layers = tuple(b.path or f"block {b.index}" for b in anat.blocks)
    weight_norm = stack("weight_norm") if any(r.get("weight_norm") is not None for r in probe.results) else None
    return AttentionStats(layers, stack("entropy"), stack("max_logit"), stack("logit_norm"), weight_norm)


def _program(model: Any, inputs: Any) -> tuple[fx.GraphModule, CallSpec | None, str]:
    """(graph module, how it is called, a name for errors) for every kind of model the function accepts."""
    gm = model if isinstance(model, fx.GraphModule) else getattr(model, "graph_module", None)
    if isinstance(gm, fx.GraphModule):
        info = capture_info(gm)
        call = info.call if info is not None else getattr(model, "_call", None)
        return gm, call, info.model if info is not None else type(model).__name__
    if not isinstance(model, nn.Module):
        raise InputError(
            f"attention_entropy: model must be a torch.nn.Module, a captured GraphModule or an OptimizedModule, "
            f"got {type(model).__name__}"
        )
    gm = capture(model, inputs)
    info = capture_info(gm)
    return gm, info.call if info is not None else None, type(model).__name__


class _Probe(fx.Interpreter):
    """Runs the program and, at each attention core, reduces its logits and probabilities to per-head statistics.

    Only small per-head results outlive a core: the [B, H, Tq, Tk] tensors are freed before the next layer runs.
    """

    def __init__(self, gm: fx.GraphModule, attentions: list[Attention], query_keep: torch.Tensor | None):
        super().__init__(gm)
        self.attentions = attentions
        self.query_keep = query_keep
        self.results: list[dict[str, Any]] = [{} for _ in attentions]
        self.cores = {a.core: i for i, a in enumerate(attentions)}
        self.scores = {a.scores: i for i, a in enumerate(attentions) if a.scores is not None}
        self.linears: dict[fx.Node, Linear] = {
            lin.node: lin for a in attentions for lin in (a.q, a.k, a.qkv) if lin is not None
        }
        # Batch size per attention, read where its input is produced (it may be freed before the core runs).
        self.inputs = {a.input: i for i, a in enumerate(attentions)}
        self.batch: dict[int, int] = {}
        self.weights: dict[fx.Node, torch.Tensor] = {}  # linear node -> its weight as [out, in], until the core
        self.raw_scores: dict[int, tuple[torch.Tensor, int]] = {}  # eager: (q @ k^T, head dim), until softmax
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.inputs and isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.batch[self.inputs[n]] = out.shape[0]
        if n in self.linears:
            self.weights[n] = self._weight(self.linears[n])
        if n in self.scores:
            a, b = self.fetch_args_kwargs_from_env(n)[0][-2:]
            # The product alone: baddbmm's bias and alpha belong to the logits, not to q·k.
            raw = out if is_op(n, aten.matmul, aten.bmm) else torch.matmul(a, b)
            self.raw_scores[self.scores[n]] = raw, a.shape[-1]
        if n in self.cores:
            i = self.cores[n]
            self.results[i] = self._core(i, n, out)
        return out

    def _weight(self, lin: Linear) -> torch.Tensor:
        arg = lin.node.args[2] if lin.kind == "addmm" else lin.node.args[1]
        w = self.env[arg] if isinstance(arg, fx.Node) else arg
        # aten.linear takes [out, in]; addmm and matmul multiply x by their argument, which is then [in, out].
        return w.detach() if lin.kind == "linear" else w.detach().t()

    def _core(self, i: int, n: fx.Node, out: Any) -> dict[str, Any]:
        att = self.attentions[i]
        batch = self.batch.get(i, 1)
        if att.kind == "sdpa":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bound = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
            head_dim = bound["query"].shape[-1]
            raw, mask_part = _sdpa_scores(**{k: v for k, v in bound.items() if k not in ("value", "dropout_p")})
            scale = bound.get("scale") or 1.0 / math.sqrt(head_dim)
            logits = raw * scale + mask_part
            probs = torch.softmax(logits, dim=-1)
            q_node, k_node = n.args[0], n.args[1]
        else:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1)
            logits = self.env[n.args[0]].movedim(dim, -1).float()
            probs = out.movedim(dim, -1).float()
            raw, head_dim = self.raw_scores.pop(i)
            raw = raw.float().reshape(logits.shape) if raw.numel() == logits.numel() else None
            scale, mask_part = _fit_scale(logits, raw)
            q_node, k_node = att.scores.args[-2], att.scores.args[-1]  # type: ignore[union-attr]
        logits, probs, mask_part = (_as_bhqk(t, batch) for t in (logits, probs, mask_part.expand_as(logits)))
        stats = _summarize(logits, probs, mask_part > _MASKED_BELOW, self.query_keep)
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)  # q·k is zero everywhere: the factor cannot be read off the data
        scale *= _path_factor(q_node, att.qkv or att.q, self.order) * _path_factor(k_node, att.qkv or att.k, self.order)
        stats["weight_norm"] = self._weight_norm(att, logits.shape[1], head_dim, scale)
        return stats

    def _weight_norm(self, att: Attention, heads: int, head_dim: int, scale: float) -> torch.Tensor | None:
        if att.qkv is not None:
            w = self.weights.pop(att.qkv.node, None)
            if w is None or not _ordered_split(att.qkv):
                return None  # per-head interleaved q/k/v (GPT-NeoX style) cannot be split in thirds
            kv_rows = (w.shape[0] - heads * head_dim) // 2
            wq, wk = w[: heads * head_dim], w[heads * head_dim : heads * head_dim + kv_rows]
        else:
            wq = self.weights.pop(att.q.node, None) if att.q is not None else None
            wk = self.weights.pop(att.k.node, None) if att.k is not None else None
            if wq is None or wk is None:
                return None
        return _bilinear_norms(wq, wk, heads, head_dim, scale)


def _sdpa_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q @ k^T, the additive mask part) as aten.scaled_dot_product_attention forms them: softmax(raw·scale + mask).

    Boolean masks keep True entries; is_causal keeps key <= query (top-left aligned); fewer key heads than query heads
    (grouped-query attention) are repeated per group.
    """
    del scale, enable_gqa  # the scale is applied by the caller; GQA is recognised from the shapes
    q, k = query.float(), key.float()
    if k.dim() >= 3 and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    raw = q @ k.transpose(-2, -1)
    mask = torch.zeros((), dtype=raw.dtype, device=raw.device)
    if attn_mask is not None:
        mask = (
            torch.zeros(attn_mask.shape, dtype=raw.dtype, device=raw.device).masked_fill(~attn_mask, -math.inf)
            if attn_mask.dtype == torch.bool
            else attn_mask.to(raw.dtype)
        )
    if is_causal:
        length, keys = raw.shape[-2:]
        causal = torch.ones(length, keys, dtype=torch.bool, device=raw.device).tril()
        mask = mask + torch.zeros(length, keys, dtype=raw.dtype, device=raw.device).masked_fill(~causal, -math.inf)
    return raw, mask


def _fit_scale(logits: torch.Tensor, raw: torch.Tensor | None) -> tuple[float | None, torch.Tensor]:
    """Eager attention: the factor c with logits = c·(q·k) + mask, least squares over unmasked entries; and the mask.

    Exact when the core scales and masks (HF eager, GPT-2's division by a tensor, GPT-J's scale buffer); position
    biases (ALiBi, relative positions) end up in the mask part, as in SDPA's float masks.
    """
    fit = logits > _MASKED_BELOW
    if raw is None:
        return None, torch.where(fit, 0.0, -math.inf).to(logits.dtype)
    fit &= raw.isfinite()
    raw64, logits64 = raw.double()[fit], logits.double()[fit]
    denom = float((raw64 * raw64).sum())
    scale = float((logits64 * raw64).sum()) / denom if denom > 0 else None
    return scale, logits - (scale or 0.0) * raw


def _as_bhqk(t: torch.Tensor, batch: int) -> torch.Tensor:
    """View attention-shaped values as [batch, heads, queries, keys] ([B*H, T, T] and [T, T] cores included)."""
    if t.dim() == 4:
        return t
    lead = math.prod(t.shape[:-2])
    b = batch if batch and lead % batch == 0 else 1
    return t.reshape(b, lead // b, *t.shape[-2:])


def _summarize(
    logits: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor, query_keep: torch.Tensor | None
) -> dict[str, Any]:
    batch, _, queries, _ = logits.shape
    rows = valid.any(dim=-1)  # [B, H, Tq]: queries that see at least one key
    if query_keep is not None and tuple(query_keep.shape) == (batch, queries):
        rows = rows & query_keep.to(rows.device)[:, None, :]
    valid = valid & rows[..., None]
    row_entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    row_entropy = torch.where(rows, row_entropy, 0.0).double()
    count = rows.sum(dim=(0, 2)).double()
    entropy = row_entropy.sum(dim=(0, 2)) / count  # NaN for a head without valid rows
    magnitude = torch.where(valid, logits.abs(), 0.0)
    zeroed = torch.where(valid, logits, 0.0)
    return {
        "entropy": entropy.cpu(),
        "max_logit": magnitude.amax(dim=(0, 2, 3)).double().cpu(),
        "logit_norm": torch.linalg.matrix_norm(zeroed, ord=2).double().mean(dim=0).cpu(),
    }


def _bilinear_norms(wq: torch.Tensor, wk: torch.Tensor, heads: int, head_dim: int, scale: float) -> torch.Tensor | None:
    """σ(scale · W_Q,h^T W_K,h) per query head h; query head h reads key head h // (heads / key heads)."""
    if wq.shape[0] != heads * head_dim or wk.shape[0] % head_dim or wk.shape[1] != wq.shape[1]:
        return None
    kv_heads = wk.shape[0] // head_dim
    if kv_heads == 0 or heads % kv_heads:
        return None
    d = wq.shape[1]
    q_h = wq.double().reshape(heads, head_dim, d).transpose(1, 2)  # [H, D, Dh]: W_Q,h^T
    k_h = wk.double().reshape(kv_heads, head_dim, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=0)
    # W_Q,h^T W_K,h = (Q1 R1)(Q2 R2)^T with orthonormal Q1, Q2: its singular values are R1 R2^T's (Dh x Dh, cheap).
    r_q, r_k = torch.linalg.qr(q_h, mode="r").R, torch.linalg.qr(k_h, mode="r").R
    return (abs(scale) * torch.linalg.matrix_norm(r_q @ r_k.transpose(1, 2), ord=2)).cpu()


def _path_factor(start: Any, lin: Linear | None, order: dict[fx.Node, int]) -> float:
    """Product of the constant factors (`x * 0.125`, `x / 8`) between a projection's output and a core operand.

    Only nodes that depend on the projection count, so RoPE's cos/sin tables (and their scalings) are left out.
    """
    if lin is None or not isinstance(start, fx.Node):
        return 1.0
    stops = {lin.output, lin.node}
    first = order.get(lin.node, 0)
    reaches: dict[fx.Node, bool] = {}

    def reach(node: fx.Node, depth: int = 0) -> bool:
        if node in stops:
            return True
        # Nodes before the projection cannot depend on it; the depth bound keeps the walk local to the attention.
        if node in reaches or depth > _PATH_LIMIT or node.op != "call_function" or order.get(node, 0) < first:
            return reaches.get(node, False)
        reaches[node] = any(reach(a, depth + 1) for a in node.all_input_nodes)
        return reaches[node]

    reach(start)
    factor = 1.0
    for node, on_path in reaches.items():
        if not (on_path and is_op(node, *_SCALING) and len(node.args) == 2):
            continue
        x, c = node.args
        if isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(x, fx.Node):
            factor = factor * c if is_op(node, aten.mul) else factor / c
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and is_op(node, aten.mul):
            factor *= x
    return factor


def _ordered_split(lin: Linear) -> bool:
    """True when a fused projection's output is cut into [q | k | v] along its last dim (chunk, split or slices)."""
    val = lin.output.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    for user in lin.output.users:
        if is_op(user, aten.chunk, aten.split, aten.split_with_sizes):
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
        elif is_op(user, aten.slice, aten.narrow):
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        else:
            continue
        if isinstance(dim, int) and dim % val.dim() == val.dim() - 1:
            return True
    return False
