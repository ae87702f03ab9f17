"""The Triton backend: claim fusable groups of ATen nodes, replace each group by one `txc_triton::` kernel op.

Before (ATen, as captured)                                  After (lowered)
    s = aten.add(x, r)                                          y, s = txc_triton.add_layer_norm(x, r, w, b, eps)
    y = aten.layer_norm(s, [C], w, b, eps)
    h = aten.gelu(aten.linear(y, W1, b1))                       h = txc_triton.linear_act(y, W1, b1, "gelu")
    g = aten.silu(aten.linear(y, Wg)) * aten.linear(y, Wu)      g = txc_triton.linear_swiglu(y, Wg, Wu, None, None)
    p = aten.softmax(aten.add(scores, mask), -1)                p = txc_triton.softmax(scores, mask, 1.0)
    o = aten.scaled_dot_product_attention(q, k, v, mask)        o = txc_triton.attention(q, k, v, mask, False, scale)
    o = txc.varlen_attention(q, k, v, cu, heads, scale)         o = txc_triton.varlen_attention(q, k, v, cu, ...)

Groups are found by walking use-def edges from an anchor (the norm, the activation, the product, the softmax, the
attention); a producer is folded into its consumer's kernel only when the consumer is its one user, except the
residual add, whose sum the add+norm kernel also returns. `supports(node)` answers for any node: `True` when the
backend runs it (in a kernel, or as a view that launches nothing), else the reason it stays ATen. `lower` leaves the
rest as ATen, lists every such node in `Lowered.fallbacks` with that reason, and raises `BackendError` instead with
`strict=True`. The lowered program is checked against the unlowered one on the example inputs at the dtype
tolerance (`tolerance_scale` widens it for deep fp16 models), so a kernel bug cannot pass silently.

Kernels run where Triton can launch them: CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1` (tests). On any
other device every compute node is a fallback with that reason. Plain linears with nothing to fuse stay on ATen's
GEMM (cuBLAS) unless `gemm=triton`. Elementwise chains outside these patterns (embeddings sums, mask arithmetic)
are not fused: there is no generic elementwise code generator yet.

Papers: Dao et al., "FlashAttention" (NeurIPS 2022) and "FlashAttention-2" (2023); Milakov & Gimelshein, "Online
normalizer calculation for softmax" (2018); Zhai et al., "ByteTransformer" (IPDPS 2023).
"""

from __future__ import annotations

import operator
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from ...errors import BackendError
from ...ir import ancestors, copy_graph_module, is_op, op_name, refresh_metadata, tensor_meta
from ...norms import Norm, find_norms
from ...verify import compare, normwise_error, run_program, tolerance
from ..base import Fallback, Lowered
from .ops import OPS, runs_kernels

aten = torch.ops.aten
txc = torch.ops.txc

__all__ = ["TritonBackend"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = {aten.gelu: "gelu", aten.silu: "silu", aten.relu: "relu"}
# Ops that launch no kernel of their own (views, shape arithmetic, identities in eval mode): nothing to lower.
_FREE = (
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand, aten.unsqueeze,
    aten.squeeze, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.alias,
    aten.detach, aten.flatten, aten.unflatten, aten.dropout, aten.sym_size, aten.sym_numel, aten.sym_stride,
    aten._assert_scalar, aten.sym_constrain_range_for_size, aten._assert_tensor_metadata,
)  # fmt: skip
_SHAPE_MATH = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
               operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)  # fmt: skip


_PRIORITY = (
    (aten.scaled_dot_product_attention, txc.varlen_attention),
    (aten.mul,),
    tuple(_ACTIVATIONS),
    (aten.softmax, aten._softmax),
    (aten.layer_norm, aten.rms_norm),
    None,  # written-out RMSNorms, anchored at whatever node carries their output (a mul or a cast)
    (aten.linear,),
)


@dataclass
class _Claim:
    kind: str  # the OPS key; "" for an op that already launches a Triton kernel itself (nothing to replace)
    root: fx.Node  # the node whose value the kernel replaces
    args: tuple[Any, ...]
    outputs: dict[fx.Node, int | None] = field(default_factory=dict)  # replaced nodes -> kernel output index
    folded: set[fx.Node] = field(default_factory=set)  # producers read only by the group: dead once it is replaced

    def __post_init__(self) -> None:
        self.outputs = self.outputs or {self.root: None}


@dataclass(frozen=True)
class TritonBackend:
    """Lower fusable groups to Triton kernels; every other node runs as ATen and is listed with its reason."""

    name: ClassVar[str] = "triton"
    summary: ClassVar[str] = (
        "fused Triton kernels: add+norm, GEMM epilogues, softmax, FlashAttention-2, varlen attention"
    )

    gemm: Literal["aten", "triton"] = "aten"
    verify: bool = True
    tolerance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.gemm not in ("aten", "triton"):
            raise ValueError(f"backend 'triton': gemm must be 'aten' or 'triton', got {self.gemm!r}")
        if not self.tolerance_scale >= 1.0:
            raise ValueError(f"backend 'triton': tolerance_scale must be >= 1, got {self.tolerance_scale!r}")

    # -- claiming ------------------------------------------------------------------------------------------------

    def supports(self, node: fx.Node) -> bool | str:
        """True if the backend runs `node` (inside a kernel, or as a view), else why it stays ATen."""
        if node.op != "call_function" or _is_free(node) or str(node.target).startswith("txc_triton."):
            return True
        claim = self._claim(node)
        if isinstance(claim, _Claim):
            return True
        for user in node.users:  # a producer folded into its consumer's kernel
            c = self._claim(user)
            if isinstance(c, _Claim) and (node in c.outputs or node in c.folded):
                return True
        return claim

    def _claim(self, node: fx.Node) -> _Claim | str:
        if is_op(node, aten.scaled_dot_product_attention):
            return _attention(node)
        if is_op(node, txc.int8_linear, txc.quantize_act):
            # These ops pick their kernel at run time: the Triton int8 GEMM and quantizer on CUDA, oneDNN on CPU.
            val = tensor_meta(node.args[0])
            if isinstance(val, torch.Tensor) and val.device.type == "cuda":
                return _Claim("", node, ())
            return f"{op_name(node)} runs the Triton int8 kernels on CUDA only (oneDNN or the reference here)"
        if is_op(node, txc.varlen_attention):
            return _ready(node, node.args[:3]) or _Claim("varlen_attention", node, tuple(node.args))
        if is_op(node, aten.softmax, aten._softmax):
            return _softmax(node)
        if is_op(node, aten.layer_norm, aten.rms_norm):
            return _norm(node)
        written = _written_rms(node)
        if written is not None:
            return written
        if is_op(node, aten.mul):
            return _swiglu(node)
        if is_op(node, *_ACTIVATIONS):
            return _linear_act(node)
        if is_op(node, aten.linear):
            if self.gemm == "triton":
                return _ready(node, node.args[:2]) or _Claim("linear_act", node, (*_linear_args(node), "none"))
            return "a GEMM with no epilogue to fuse runs on ATen's GEMM (cuBLAS); `gemm=triton` claims it"
        if is_op(node, aten.add, aten.sub, aten.mul, aten.div, aten.where, aten.masked_fill, aten.tanh, aten.exp):
            return f"elementwise {op_name(node)} outside a fused pattern: no generic elementwise fusion yet"
        return f"no Triton kernel for {op_name(node)}"

    # -- lowering ------------------------------------------------------------------------------------------------

    def lower(self, gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False) -> Lowered:
        lowered = copy_graph_module(gm)
        graph = lowered.graph
        kernels: Counter[str] = Counter()
        # Bigger groups first: a SwiGLU's silu(linear) must not be taken alone as a linear+silu epilogue.
        for anchors in _PRIORITY:
            nodes = list(_written_norms(graph)) if anchors is None else [n for n in graph.nodes if is_op(n, *anchors)]
            for node in nodes:
                if getattr(node, "_erased", False) or not node.users:
                    continue  # folded into an earlier kernel, or dead
                claim = self._claim(node)
                if isinstance(claim, _Claim) and claim.kind:  # kind "" = the op already runs a Triton kernel
                    _replace(graph, claim)
                    kernels[claim.kind] += 1
        graph.eliminate_dead_code()
        graph.lint()
        lowered.recompile()
        refresh_metadata(lowered)
        fallbacks = [
            Fallback(n.name, op_name(n), reason)
            for n in graph.nodes
            if n.op == "call_function" and isinstance(reason := self.supports(n), str)
        ]
        if strict and fallbacks:
            listed = "; ".join(f"{f.node} ({f.op}): {f.reason}" for f in fallbacks[:5])
            more = f" and {len(fallbacks) - 5} more" if len(fallbacks) > 5 else ""
            raise BackendError(
                f"backend 'triton' (strict) cannot lower {len(fallbacks)} node(s): {listed}{more}; drop strict=True to "
                "run them as ATen"
            )
        error = self._check(gm, lowered, example_inputs) if self.verify and kernels else None
        return Lowered(program=lowered, fallbacks=fallbacks, kernels=dict(kernels), error=error)

    def _check(self, gm: fx.GraphModule, lowered: fx.GraphModule, example_inputs: Any) -> dict[str, Any]:
        expected, actual = run_program(gm, example_inputs), run_program(lowered, example_inputs)
        result = compare(expected, actual, scale=self.tolerance_scale)
        checked = result.as_dict()
        ok = result.ok
        if not ok and result.dtype in ("float16", "bfloat16"):
            # Kernels and ATen round half precision at different points (P in attention, GEMM reduction order), so
            # the check is the dtype's rtol relative to the output's magnitude rather than elementwise.
            rel = normwise_error(expected, actual)
            ok = rel <= tolerance(getattr(torch, result.dtype))[0] * self.tolerance_scale
            checked.update(ok=ok, normwise=rel)
        if not ok:
            raise BackendError(
                f"backend 'triton': the lowered program disagrees with the unlowered one at {result.worst_output}: "
                f"max abs {result.max_abs:.3g} > tolerance (rtol={result.rtol:g}, atol={result.atol:g}, "
                f"{result.dtype}); this is a kernel bug, please report it (tolerance_scale widens the check)"
            )
        return checked


# -- patterns --------------------------------------------------------------------------------------------------------


def _is_free(node: fx.Node) -> bool:
    return node.target in _SHAPE_MATH or is_op(node, *_FREE)


def _ready(anchor: fx.Node, tensors: Any) -> str | None:
    """Why the kernels cannot take these operands (dtype, device, missing shapes), or None if they can."""
    for t in tensors:
        if t is None:
            continue
        val = tensor_meta(t)
        if not isinstance(val, torch.Tensor):
            return f"{op_name(anchor)}: operand {t} has no recorded tensor metadata"
        if val.dtype not in _FLOATS:
            return f"{op_name(anchor)} on {val.dtype}: the kernels take float32/float16/bfloat16"
        if not runs_kernels(val.device):
            from . import available

            if not available():
                return "the `triton` package is not installed (pip install triton)"
            return f"tensors on {val.device}: Triton kernels need CUDA (or TRITON_INTERPRET=1 for interpreted tests)"
    return None


def _only_user(producer: Any, consumer: fx.Node) -> bool:
    return isinstance(producer, fx.Node) and len(producer.users) == 1 and consumer in producer.users


def _linear_args(linear: fx.Node) -> tuple[Any, Any, Any]:
    x, w = linear.args[0], linear.args[1]
    b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return x, w, b


def _linear_act(act: fx.Node) -> _Claim | str:
    lin = act.args[0]
    if not (is_op(lin, aten.linear) and _only_user(lin, act)):
        return f"{op_name(act)} not fed by a linear of its own: no epilogue to fuse it into"
    approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
    name = _ACTIVATIONS[next(p for p in _ACTIVATIONS if is_op(act, p))]
    if name == "gelu" and approximate == "tanh":
        name = "gelu_tanh"
    x, w, b = _linear_args(lin)
    return _ready(act, (x, w, b)) or _Claim("linear_act", act, (x, w, b, name), folded={lin})


def _swiglu(mul: fx.Node) -> _Claim | str:
    a, b = mul.args[:2]
    for gate, up in ((a, b), (b, a)):
        fused = _fused_gate_up(gate, up, mul)
        if fused is not None:
            return fused
        if not (is_op(gate, aten.silu) and _only_user(gate, mul) and is_op(up, aten.linear) and _only_user(up, mul)):
            continue
        g = gate.args[0]
        if not (is_op(g, aten.linear) and _only_user(g, gate)):
            continue
        (x, wg, bg), (xu, wu, bu) = _linear_args(g), _linear_args(up)
        if x is not xu:
            return "silu(linear) * linear over different inputs is not SwiGLU"
        return _ready(mul, (x, wg, wu, bg, bu)) or _Claim(
            "linear_swiglu", mul, (x, wg, wu, bg, bu), folded={g, gate, up}
        )
    return "elementwise mul outside a fused pattern: no generic elementwise fusion yet"


def _fused_gate_up(gate: Any, up: Any, mul: fx.Node) -> _Claim | str | None:
    """silu(h[..., :N]) * h[..., N:] with h = linear(x, [Wg; Wu]) (fuse_qkv:gated_mlp=true), or None."""
    if not (is_op(gate, aten.silu) and _only_user(gate, mul) and _only_user(up, mul)):
        return None
    g = gate.args[0]
    if not (g.target is operator.getitem and up.target is operator.getitem and _only_user(g, gate)):
        return None
    split = g.args[0]
    if up.args[0] is not split or (g.args[1], up.args[1]) != (0, 1) or not is_op(split, aten.split_with_sizes):
        return None
    lin = split.args[0]
    sizes, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    val = tensor_meta(lin)
    if not (is_op(lin, aten.linear) and _only_user(lin, split) and isinstance(val, torch.Tensor)):
        return None
    if len(sizes) != 2 or sizes[0] != sizes[1] or dim not in (-1, val.dim() - 1) or len(split.users) != 2:
        return None
    x, w, bias = _linear_args(lin)
    return _ready(mul, (x, w, bias)) or _Claim(
        "linear_swiglu_fused", mul, (x, w, bias), folded={lin, split, g, gate, up}
    )


def _softmax(node: fx.Node) -> _Claim | str:
    x, dim = node.args[0], node.args[1]
    val = tensor_meta(node)
    if not isinstance(val, torch.Tensor) or dim not in (-1, val.dim() - 1):
        return "softmax over a dim other than the last"
    if is_op(node, aten._softmax) and node.args[2] and tensor_meta(x).dtype != torch.float32:
        return "softmax with half_to_float: the kernel returns the input dtype"
    bias, folded = None, set()
    # Fold `scores + bias` when the add is the softmax's own input and does not change the dtype.
    if is_op(x, aten.add) and _only_user(x, node) and len(x.args) == 2 and not x.kwargs:
        s, m = x.args
        sv, mv = tensor_meta(s), tensor_meta(m)
        if (
            isinstance(sv, torch.Tensor)
            and isinstance(mv, torch.Tensor)
            and sv.dtype == val.dtype == tensor_meta(x).dtype
        ):
            if tuple(sv.shape) == tuple(val.shape) and mv.dtype in _FLOATS:
                x, bias, folded = s, m, {x}
    return _ready(node, (x, bias)) or _Claim("softmax", node, (x, bias, 1.0), folded=folded)


def _attention(node: fx.Node) -> _Claim | str:
    bound = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    if bound is None:
        return "attention call whose arguments do not match SDPA's schema"
    kw = bound.kwargs
    q, k, v, mask = kw["query"], kw["key"], kw["value"], kw.get("attn_mask")
    if kw.get("dropout_p", 0.0) != 0.0:
        return "attention with dropout: the kernel is inference-only"
    qv, kv, vv = (tensor_meta(t) for t in (q, k, v))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
        return "attention on other than [B, H, T, D] operands"
    if qv.shape[-1] > 256 or kv.shape[-1] != qv.shape[-1] or vv.shape != kv.shape:
        dims = f"q {qv.shape[-1]}, k {kv.shape[-1]}, v {vv.shape[-1]}"
        return f"attention with head dims {dims}: the kernel needs one head dim <= 256"
    causal = bool(kw.get("is_causal", False))
    if causal and qv.shape[-2] != kv.shape[-2]:
        # SDPA aligns the causal diagonal top-left, the kernel bottom-right (FlashAttention 2.1+): same when Tq == Tk.
        return "causal attention with a query length that may differ from the key length"
    if causal and mask is not None:
        return "attention with both is_causal and a mask"
    scale = kw.get("scale")
    scale = float(scale) if scale is not None else float(qv.shape[-1]) ** -0.5
    return _ready(node, (q, k, v, mask)) or _Claim("attention", node, (q, k, v, mask, causal, scale))


def _norm(node: fx.Node) -> _Claim | str:
    rms = is_op(node, aten.rms_norm)
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = None if rms else (node.args[3] if len(node.args) > 3 else None)
    eps = node.args[3 if rms else 4] if len(node.args) > (3 if rms else 4) else (None if rms else 1e-5)
    val = tensor_meta(x)
    if not isinstance(val, torch.Tensor) or len(shape) != 1:
        return "a norm over more than the last dim"
    if eps is None:
        eps = torch.finfo(val.dtype).eps  # aten.rms_norm's default
    for p in (w, b):
        pv = tensor_meta(p)
        if p is not None and (not isinstance(pv, torch.Tensor) or pv.dtype != val.dtype):
            return "a norm whose weight has another dtype than its input"
    return _norm_claim(node, "rms_norm" if rms else "layer_norm", x, w, b, float(eps))


def _written_rms(node: fx.Node) -> _Claim | str | None:
    """RMSNorm spelled out as pow/mean/rsqrt/mul (Llama, T5) ending at `node`; None if it ends elsewhere."""
    norm = _written_norms(node.graph).get(node)
    if norm is None:
        return None
    if norm.offset:
        return "RMSNorm scaled by (offset + weight) (Gemma): no kernel for the offset form"
    xv, out = tensor_meta(norm.input), tensor_meta(node)
    if not (isinstance(xv, torch.Tensor) and isinstance(out, torch.Tensor) and xv.dtype == out.dtype):
        return "written-out RMSNorm whose output dtype differs from its input's"
    w = next((n for n in node.graph.nodes if n.op == "get_attr" and n.target == norm.weight), None)
    if norm.weight is not None and (w is None or getattr(tensor_meta(w), "dtype", None) != xv.dtype):
        return "written-out RMSNorm whose weight has another dtype than its input"
    claim = _norm_claim(node, "rms_norm", norm.input, w, None, norm.eps)
    if isinstance(claim, _Claim):
        internal = ancestors(node) - ancestors(norm.input) - {norm.input, node}
        claim.folded |= {n for n in internal if n.op == "call_function"}
    return claim


def _written_norms(graph: fx.Graph) -> dict[fx.Node, Norm]:
    """The graph's written-out RMSNorms by output node, found once per graph and kept while their nodes live."""
    cached = _WRITTEN.get(graph)
    if cached is None or any(getattr(n, "_erased", False) for n in cached):
        found = find_norms(graph.owning_module) if graph.owning_module is not None else []
        cached = {n.output: n for n in found if n.kind == "rmsnorm" and not is_op(n.output, aten.rms_norm)}
        _WRITTEN[graph] = cached
    return cached


def _norm_claim(node: fx.Node, kind: str, x: Any, w: Any, b: Any, eps: float) -> _Claim | str:
    val = tensor_meta(x)
    why = _ready(node, (x, w, b))
    if why:
        return why
    args = (w, eps) if kind == "rms_norm" else (w, b, eps)
    if is_op(x, aten.add) and len(x.args) == 2 and not x.kwargs and all(isinstance(a, fx.Node) for a in x.args):
        a, r = x.args
        av, rv = tensor_meta(a), tensor_meta(r)
        if all(isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(val.shape) and t.dtype == val.dtype
               for t in (av, rv)):  # fmt: skip
            return _Claim(f"add_{kind}", node, (a, r, *args), {node: 0, x: 1})
    return _Claim(kind, node, (x, *args))


_WRITTEN: weakref.WeakKeyDictionary[fx.Graph, dict[fx.Node, Norm]] = weakref.WeakKeyDictionary()


def _replace(graph: fx.Graph, claim: _Claim) -> None:
    """Put the kernel op where the first replaced node was and route the replaced values' users to its outputs."""
    # Every operand of the group is defined before the group's first node, and every user of a replaced value comes
    # after it, so that position is valid for all of them (a residual sum can be read before its norm runs).
    replaced = set(claim.outputs)
    first = next(n for n in graph.nodes if n in replaced)
    with graph.inserting_before(first):
        op = graph.call_function(OPS[claim.kind], claim.args)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for arg in op.all_input_nodes:
        if arg.op == "get_attr" and order[arg] > order[op]:
            op.prepend(arg)  # a weight fetched between the group's first and last node: fetch it before the kernel
    # Later claims read shapes and dtypes off the values this one produces, before metadata is refreshed.
    op.meta.update(claim.root.meta)
    op.meta["txc_triton"] = claim.kind
    last = op
    for node, index in claim.outputs.items():
        if index is None:
            node.replace_all_uses_with(op)
            continue
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (op, index))
        last.meta.update(node.meta)
        node.replace_all_uses_with(last)
    if any(i is not None for i in claim.outputs.values()):
        op.meta["val"] = tuple(n.meta.get("val") for n in sorted(claim.outputs, key=lambda n: claim.outputs[n]))
    for node in claim.outputs:
        graph.erase_node(node)
