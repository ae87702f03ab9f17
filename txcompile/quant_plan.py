"""The `quantize` pass's plan and graph surgery: which linears share a quantizer, their reparameterization, the ops
that replace them, and the per-layer measurements for the report. `passes/quantize.py` drives it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .anatomy import Linear, anatomy
from .calibrate import ChannelStats
from .ir import add_tensor, get_tensor, is_op, module_path, tensor_meta
from .norms import Norm
from .ops.quant import pack_int4, weight_levels
from .quantizers import Reparam, clip_scale, identity, linear_error, reparam, weight_int4, weight_int8

aten = torch.ops.aten
txc = torch.ops.txc

__all__ = ["Group", "layer_records", "plan_groups", "remap", "rewrite_groups"]


@dataclass
class Group:
    """Linears reading one input: they share its reparameterization and its activation quantizer."""

    input: fx.Node
    linears: list[Linear]
    scheme: str
    reparam: Reparam | None = None  # None: weight-only scheme, activations untouched
    fold: Norm | None = None  # the LayerNorm the reparameterization folds into
    outlier_cols: Tensor | None = None  # input columns kept in floating point
    act_scale: float | None = None
    act_err: float | None = None  # relative error of the activation quantizer on the calibration rows
    alpha: float | None = None  # the migration strength chosen for the group
    out_err: float | None = None  # the search's estimate of the linears' relative output error
    group_size: int = 128
    levels: int = 127
    fuse: bool = True  # move a following GELU into the int8 GEMM's epilogue
    # Filled by rewrite_groups(quantized=True), per linear: (linear, what it became, float fn, quantized fn).
    done: list[tuple[Linear, dict[str, Any], Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = field(
        default_factory=list
    )


def plan_groups(gm: fx.GraphModule, chosen: list[Linear], stats: dict[fx.Node, ChannelStats], opts: Any) -> list[Group]:
    """One Group per distinct input among `chosen`, with its reparameterization and activation scale."""
    by_input: dict[fx.Node, list[Linear]] = {}
    for lin in chosen:
        by_input.setdefault(lin.input, []).append(lin)
    norms = {n.output: n for n in anatomy(gm).norms}
    levels = weight_levels(_device(gm))
    groups = []
    for x, lins in by_input.items():
        g = Group(x, lins, opts.scheme, group_size=opts.group_size, levels=levels, fuse=opts.fuse_activation)
        if opts.scheme in ("w8a8", "none"):
            st = stats[x]
            keep = None
            if opts.outliers:
                mask = st.absmax >= opts.outlier_threshold
                if bool(mask.any()) and not bool(mask.all()):
                    g.outlier_cols, keep = mask.nonzero().flatten(), ~mask
            weights = [(lin.weight_out_in(gm).detach(), _detach(lin.bias_tensor(gm))) for lin in lins]
            w_absmax = torch.stack([w.float().abs().amax(0) for w, _ in weights]).amax(0)
            rows = st.rows[:SEARCH_ROWS]
            best = None
            for alpha, centered in _candidates(opts):
                rp = (
                    identity(len(st.lo))
                    if alpha is None
                    else reparam(st.lo, st.hi, st.mean, w_absmax, alpha, keep, centered)
                )
                err, _, _ = linear_error(rows, weights, rp, keep, levels, search=opts.method != "rtn")
                if best is None or err < best[0]:
                    best = (err, rp, alpha)
            g.out_err, g.reparam, g.alpha = best
            if not g.reparam.identity:
                g.fold = _foldable(gm, norms.get(x), lins, g.reparam)
            full = g.reparam.apply(st.rows)
            g.act_scale, g.act_err = clip_scale(full if keep is None else full[:, keep], search=opts.method != "rtn")
        groups.append(g)
    return groups


def remap(groups: list[Group], gm: fx.GraphModule) -> list[Group]:
    """The same plan for a copy of the program it was made on (nodes matched by name)."""
    nodes = {n.name: n for n in gm.graph.nodes}

    def swap(obj: Any) -> Any:
        if obj is None:
            return None
        changes = {
            f.name: nodes[getattr(obj, f.name).name]
            for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), fx.Node)
        }
        return dataclasses.replace(obj, **changes)

    return [
        dataclasses.replace(
            g, input=nodes[g.input.name], linears=[swap(lin) for lin in g.linears], fold=swap(g.fold), done=[]
        )
        for g in groups
    ]


SEARCH_ROWS = 1024  # calibration rows the per-group alpha search measures on
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _candidates(opts: Any) -> list[tuple[float | None, bool]]:
    """(alpha, centered) pairs to try per group (the one with least output error wins); (None, _) is no reparam."""
    if opts.method == "rtn":
        return [(None, False)]
    alphas = (opts.alpha,) if opts.alpha is not None else ALPHAS
    shifts = (True, False) if opts.method == "repquant" else (False,)
    return [(a, c) for c in shifts for a in alphas]


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _device(gm: fx.GraphModule) -> torch.device:
    return next((t.device for t in gm.parameters()), torch.device("cpu"))


def _foldable(gm: fx.GraphModule, norm: Norm | None, lins: list[Linear], rp: Reparam) -> Norm | None:
    """The LayerNorm producing the group's input, if only these linears read it and its affine can absorb (m, r)."""
    if norm is None or norm.kind != "layernorm" or norm.weight is None or not is_op(norm.output, aten.layer_norm):
        return None
    if set(norm.output.users) != {lin.node for lin in lins}:
        return None  # post-LN: the normed value is also the residual stream, which must stay as it is
    return norm if norm.bias is not None or not bool(rp.shift.any()) else None


def rewrite_groups(gm: fx.GraphModule, groups: list[Group], *, quantized: bool) -> None:
    """Replace every planned linear: by its reparameterized float form (`quantized=False`, the exactness check) or by
    the quantized ops."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved: dict[fx.Node, fx.Node] = {}  # a replaced linear's output (or fused GELU) -> what computes it now
    for g in groups:
        src = moved.get(g.input, g.input)
        first = min((lin.node for lin in g.linears), key=order.__getitem__)
        with gm.graph.inserting_before(first):
            mul, add = _reparam_input(gm, g, torch.float32 if quantized else torch.float64)
            x = src
            x_q = None
            if quantized and g.scheme == "w8a8":
                scale = _const(gm, "act_scale", torch.tensor(g.act_scale, dtype=torch.float32))
                x_q = gm.graph.call_function(txc.quantize_act.default, (src, scale, mul, add))
            elif not quantized:
                # The float form checks the algebra, so it runs in float64: rounding neither hides nor fakes an error.
                x = gm.graph.call_function(aten._to_copy.default, (src,), {"dtype": torch.float64})
                x = gm.graph.call_function(aten.mul.Tensor, (x, mul)) if mul is not None else x
                x = gm.graph.call_function(aten.add.Tensor, (x, add)) if add is not None else x
        for lin in g.linears:
            with gm.graph.inserting_before(lin.node):
                out = _replace_linear(gm, g, lin, src, x, x_q, quantized)
            moved[_redirect(lin, out)] = out
    gm.graph.eliminate_dead_code()


def _const(gm: fx.GraphModule, hint: str, value: Tensor) -> fx.Node:
    return gm.graph.get_attr(add_tensor(gm, hint, value, parameter=False))


def _reparam_input(gm: fx.GraphModule, g: Group, dtype: torch.dtype) -> tuple[fx.Node | None, fx.Node | None]:
    """Fold the group's (m, r) into its LayerNorm, or make the per-channel (mul, add) the quantizer applies."""
    rp = g.reparam
    if rp is None or rp.identity:
        return None, None
    if g.fold is not None:
        ln = g.fold.output
        gamma = get_tensor(gm, ln.args[2])
        beta = get_tensor(gm, ln.args[3]) if len(ln.args) > 3 else None
        new_gamma = (gamma.double() / rp.ratio).to(gamma.dtype)
        new_beta = ((0 if beta is None else beta.double()) - rp.shift) / rp.ratio
        args = list(ln.args) + [None] * (5 - len(ln.args))
        with gm.graph.inserting_before(ln):
            args[2] = gm.graph.get_attr(add_tensor(gm, "ln_weight", new_gamma))
            args[3] = gm.graph.get_attr(add_tensor(gm, "ln_bias", new_beta.to(gamma.dtype)))
        args[4] = args[4] if args[4] is not None else 1e-5
        ln.args = tuple(args)
        return None, None
    mul = _const(gm, "act_mul", (1 / rp.ratio).to(dtype))
    add = _const(gm, "act_add", (-rp.shift / rp.ratio).to(dtype)) if bool(rp.shift.any()) else None
    return mul, add


def _redirect(lin: Linear, out: fx.Node) -> fx.Node:
    """Point the users of `lin`'s result (or of the GELU now computed in its epilogue) at `out`; return that node."""
    target = lin.output
    if out.target is txc.int8_linear.default and out.args[5] != "none":
        target = next(iter(lin.output.users))
    target.replace_all_uses_with(out)
    return target


def _activation(lin: Linear) -> str:
    users = list(lin.output.users)
    if len(users) != 1 or not is_op(users[0], aten.gelu):
        return "none"
    approx = users[0].kwargs.get("approximate", users[0].args[1] if len(users[0].args) > 1 else "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx, "none")


def _replace_linear(
    gm: fx.GraphModule, g: Group, lin: Linear, src: fx.Node, x: fx.Node, x_q: fx.Node | None, quantized: bool
) -> fx.Node:
    graph = gm.graph
    w, b = lin.weight_out_in(gm).detach(), lin.bias_tensor(gm)
    b = None if b is None else b.detach()
    rp = g.reparam
    w_r, b_r = (w, b) if rp is None else (rp.weight(w), rp.bias(w, b))
    dtype = tensor_meta(lin.node).dtype if tensor_meta(lin.node) is not None else w.dtype
    if not quantized:
        b64 = None if b_r is None else _const(gm, "bias", _bias64(rp, w, b))
        y = graph.call_function(aten.linear.default, (x, _const(gm, "weight", w.double() * rp.ratio), b64))
        return graph.call_function(aten._to_copy.default, (y,), {"dtype": dtype})
    bias = None if b_r is None else _const(gm, "bias", b_r.float())
    info: dict[str, Any] = {"layer": module_path(lin.node) or lin.weight.removeprefix("_txc_"), "scheme": g.scheme}
    if g.scheme == "w8a8":
        cols = g.outlier_cols
        w_int = w_r if cols is None else w_r.index_fill(1, cols, 0.0)
        q, s = weight_int8(w_int, g.levels)
        act = _activation(lin) if cols is None and g.fuse else "none"
        out = graph.call_function(
            txc.int8_linear.default,
            (x_q, x_q.args[1], _const(gm, "weight_q", q), _const(gm, "weight_scale", s), bias, act, dtype),
        )
        if cols is not None:
            picked = graph.call_function(aten.index_select.default, (src, -1, _const(gm, "outlier_cols", cols)))
            extra = graph.call_function(
                aten.linear.default, (picked, _const(gm, "outlier_weight", w[:, cols].contiguous()))
            )
            out = graph.call_function(aten.add.Tensor, (out, extra))
        info.update(
            weight_bits=8 if g.levels == 127 else 7,
            act_bits=8,
            activation=act,
            outliers=0 if cols is None else len(cols),
        )
    else:
        bits = 4 if g.scheme == "w4" and w.shape[1] % g.group_size == 0 else 8
        if bits == 4:
            q, s = weight_int4(w, g.group_size)
            q = pack_int4(q)
        else:
            q, s = weight_int8(w)
        out = graph.call_function(
            txc.weight_only_linear.default,
            (x, _const(gm, "weight_q", q), _const(gm, "weight_scale", s), bias, bits, g.group_size if bits == 4 else 0),
        )
        info.update(weight_bits=bits, act_bits=None, activation="none", outliers=0)
    info["weight_bytes"] = q.numel() * q.element_size() + s.numel() * s.element_size()
    info["float_weight_bytes"] = w.numel() * w.element_size()
    g.done.append((lin, info, _float_fn(w, b, info["activation"]), _quant_fn(out, gm)))
    return out


def _bias64(rp: Reparam, w: Tensor, b: Tensor | None) -> Tensor:
    moved = w.double() @ rp.shift
    return moved if b is None else b.double() + moved


def _float_fn(w: Tensor, b: Tensor | None, act: str) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        y = torch.nn.functional.linear(x.to(w.dtype), w, b)
        return torch.nn.functional.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none") if act != "none" else y

    return fn


def _quant_fn(out: fx.Node, gm: fx.GraphModule) -> Callable[[Tensor], Tensor]:
    """Run the nodes that replaced one linear on raw input rows (the group's input), as the program would."""

    def value(a: Any, x: Tensor, memo: dict) -> Any:
        if isinstance(a, fx.Node):
            if a not in memo:
                memo[a] = get_tensor(gm, a) if a.op == "get_attr" else None
            if memo[a] is None:
                args = [value(v, x, memo) for v in a.args]
                memo[a] = a.target(*args, **a.kwargs)
            return memo[a]
        return a

    def fn(x: Tensor) -> Tensor:
        return value(out, x, {_group_input(out): x})

    return fn


def _group_input(out: fx.Node) -> fx.Node:
    node = out
    while node.target is not txc.quantize_act.default and node.target is not txc.weight_only_linear.default:
        node = node.args[0]
    return node.args[0]


def layer_records(
    gm: fx.GraphModule, groups: list[Group], stats: dict[fx.Node, ChannelStats], measure: bool
) -> list[dict[str, Any]]:
    """Per quantized linear: what it became, its calibration error and measured output error on the calibration rows,
    and (with `measure`) the float and quantized kernels' times at the example inputs' row count."""
    records = []
    for g in groups:
        st = stats.get(g.input)
        rows = None if st is None else st.rows
        timing_rows = None
        if rows is not None and g.fold is not None:  # the quantizer now reads the folded norm's output
            rows = g.reparam.apply(rows)
        for lin, info, ref, quant in g.done:
            rec = dict(
                info,
                fold="norm" if g.fold else ("quantizer" if g.reparam is not None and not g.reparam.identity else "-"),
                act_scale=g.act_scale,
                calib_err=g.act_err,
                alpha=g.alpha,
                search_err=g.out_err,
            )
            if rows is not None:
                with torch.no_grad():
                    y, y_q = ref(rows), quant(rows).float()
                rec["out_err"] = float((y_q - y).norm() / y.norm().clamp_min(1e-12))
                if measure:
                    timing_rows = _tile(rows, st.counts[0]) if timing_rows is None else timing_rows
                    rec["float_ms"], rec["quant_ms"] = (_time(f, timing_rows) * 1000 for f in (ref, quant))
            records.append(rec)
    return records


def _tile(rows: Tensor, n: int) -> Tensor:
    reps = -(-n // max(rows.shape[0], 1))
    return rows.repeat(reps, 1)[:n].contiguous()


def _time(fn: Callable[[Tensor], Tensor], x: Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
