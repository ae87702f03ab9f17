"""Small helpers over the one IR txcompile uses: an ATen-level `torch.fx.GraphModule` from torch.export.

Invariants every pass keeps (checked by `Pipeline` after each pass):
- nodes are ATen `OpOverload`s, `operator.getitem`, `txc` custom ops, or the export scaffolding (`_guards_fn`);
- every tensor-valued node carries a FakeTensor in `node.meta["val"]` with symbolic batch/sequence sizes
  (`refresh_metadata` restores it after a rewrite);
- parameters and buffers are `get_attr` nodes; a pass never writes into an existing tensor, it registers a new one
  (`add_tensor`), so a snapshot taken before a pass stays valid and the user's weights are never touched.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten

__all__ = [
    "op_name",
    "is_op",
    "call_nodes",
    "get_tensor",
    "add_tensor",
    "module_path",
    "common_module_path",
    "tensor_meta",
    "refresh_metadata",
    "copy_graph_module",
    "unwrap",
    "PASSTHROUGH_OPS",
    "prune_tensors",
    "retarget_device",
]


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node does: "aten.linear", "txc.linear_int8", "getitem", "placeholder"."""
    if node.op != "call_function":
        return node.op if node.op != "call_module" else f"module:{node.target}"
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet)  # "aten.linear"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def is_op(node: Any, *packets: Any) -> bool:
    """True if `node` calls one of the given op overload packets (`aten.linear`) or overloads."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    return target in packets or getattr(target, "overloadpacket", None) in packets


def call_nodes(gm: fx.GraphModule, *packets: Any) -> Iterator[fx.Node]:
    """The call_function nodes of `gm` that call one of `packets`, in graph order."""
    return (n for n in gm.graph.nodes if is_op(n, *packets))


def get_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The parameter or buffer behind a `get_attr` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def fresh_name(owner: torch.nn.Module, hint: str, *, prefix: str = "") -> str:
    """An attribute name derived from `hint` ("blocks.0.q.weight" -> "blocks_0_q_weight") that `owner` lacks."""
    base = prefix + ("".join(c if c.isalnum() else "_" for c in hint).strip("_") or "t")
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_tensor(
    gm: fx.GraphModule, hint: str, value: torch.Tensor, *, parameter: bool | None = None, trainable: bool = False
) -> str:
    """Register `value` on `gm` under a fresh top-level name derived from `hint`; return the get_attr target.

    New tensors live at the top level ("_txc_<hint>") so they never collide with the model's own module tree.
    Parameters are frozen unless `trainable` (a pass that adds weights meant to be trained, like qk_norm).
    """
    name = fresh_name(gm, hint, prefix="_txc_")
    value = value.detach()
    if parameter is None:
        parameter = value.is_floating_point()
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=trainable))
    else:
        gm.register_buffer(name, value)
    return name


def module_path(node: fx.Node) -> str:
    """The innermost module (dotted path in the original model) a node came from, "" if unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    if str(path).startswith("_empty_nn_module_stack"):
        return ""
    # export records paths like "L['self'].encoder.layer[0]" in some versions; normalise to "encoder.layer.0".
    path = str(path).replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def common_module_path(nodes: Iterable[fx.Node]) -> str:
    """The deepest module path shared by `nodes` ("encoder.layer.0"); nodes without a path are ignored."""
    paths = [path.split(".") for path in (module_path(n) for n in nodes) if path]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The FakeTensor recorded for a node's value, if it is a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def unwrap(node: Any, skip: Iterable[Any]) -> Any:
    """Follow single-input ops in `skip` (dropout, clone, contiguous, ...) back to the node that produced the value."""
    skip = tuple(skip)
    while isinstance(node, fx.Node) and is_op(node, *skip) and node.args:
        node = node.args[0]
    return node


# Ops that move or relabel data without changing values: analyses look through them.
PASSTHROUGH_OPS = (
    aten.dropout,
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.to,
    aten._to_copy,
    aten.type_as,
    aten.lift_fresh_copy,
)


def descendants(*nodes: fx.Node) -> set[fx.Node]:
    """Every node that reads (directly or not) one of `nodes`; the nodes themselves are not included."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def ancestors(*nodes: fx.Node) -> set[fx.Node]:
    """Every node that `nodes` are computed from (directly or not); the nodes themselves are not included."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def refresh_metadata(gm: fx.GraphModule, *, full: bool = False) -> None:
    """Bring `meta["val"]` (FakeTensors with the capture's symbolic sizes) up to date after a rewrite.

    Incremental by default: a node is recomputed when it has no value yet (a node a pass inserted) or when one of
    its inputs was recomputed to a different shape, dtype or device; propagation stops where values stop changing.
    Exact rewrites therefore cost a handful of fake ops, while shape-changing rewrites (token merging) update
    everything downstream. `full=True` recomputes every node.
    Placeholders keep the FakeTensors torch.export gave them, so sizes stay symbolic in batch and sequence length.
    A node whose meta kernel cannot run on symbolic sizes (e.g. `baddbmm` with a broadcast bias) keeps the value
    export recorded for it; if a node inserted downstream of it then fails, the error names it (that kept value is
    out of date, and usually the real cause).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or any(v is None for v in vals):
        return  # not an exported graph (e.g. a test-built fx graph): nothing symbolic to keep
    # FakeTensor logs a traceback at ERROR level for every meta kernel that fails; here that is expected and handled.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        _propagate(gm, mode, full)
    finally:
        fake_log.setLevel(level)


def _same_meta(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.device == b.device
            and len(a.shape) == len(b.shape)
            and all(str(x) == str(y) for x, y in zip(a.shape, b.shape))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor)


def _propagate(gm: fx.GraphModule, mode: Any, full: bool) -> None:
    changed: set[fx.Node] = set()
    stale: dict[fx.Node, Exception] = {}  # nodes whose inputs changed but whose meta kernel failed
    with mode:
        for node in gm.graph.nodes:
            old = node.meta.get("val")
            if node.op == "get_attr":
                t = get_tensor(gm, node)
                if t is not None and (old is None or full or not _same_meta(old, t)):
                    node.meta["val"] = mode.from_tensor(t, static_shapes=True)
                    if old is not None:
                        changed.add(node)
                continue
            if node.op == "output":
                node.meta["val"] = fx.node.map_arg(node.args[0], lambda n: n.meta.get("val"))
                continue
            if node.op not in ("call_function", "call_module") or (node.op == "call_module" and not node.users):
                continue  # a module nobody reads (export's input guards) has no value to keep
            if not (full or old is None or any(i in changed for i in node.all_input_nodes)):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            try:
                if node.op == "call_module":
                    new = _fake_module_call(gm.get_submodule(str(node.target)), mode, args, kwargs)
                else:
                    new = node.target(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - keep the recorded value; see refresh_metadata
                if old is None:
                    err = _stale_error(node, e, stale)
                    if err is e:
                        raise
                    raise err from e
                if any(i in changed for i in node.all_input_nodes):
                    stale[node] = e  # its inputs changed: the kept value may be wrong, say so if it breaks later
                continue
            node.meta["val"] = new
            if old is None or not _same_meta(old, new):
                changed.add(node)


def _stale_error(node: fx.Node, error: Exception, stale: dict[fx.Node, Exception]) -> Exception:
    """The error of a new node's meta kernel, naming the upstream nodes that kept an out-of-date value (their own
    meta kernels failed on the new sizes), which is usually the real cause."""
    above = ancestors(node)
    upstream = [n for n in stale if n in above][:3]
    if not upstream:
        return error
    causes = "; ".join(f"{n.name} ({n.target}): {type(stale[n]).__name__}: {str(stale[n])[:200]}" for n in upstream)
    note = f"{error} [shape metadata could not be recomputed upstream, so these nodes kept out-of-date sizes: {causes}]"
    try:
        return type(error)(note)
    except Exception:  # noqa: BLE001 - an exception type with its own constructor: keep the original
        return error


def _fake_module_call(mod: torch.nn.Module, mode: Any, args: Any, kwargs: Any) -> Any:
    """Run a submodule (a stateful op a pass inserted) on fake inputs, with fake copies of its state."""
    state = {name: mode.from_tensor(t, static_shapes=True) for name, t in mod.state_dict(keep_vars=True).items()}
    return torch.func.functional_call(mod, state, args, kwargs)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a deep copy of `gm`'s graph that shares its (never mutated) tensors.

    Cheap enough to snapshot before every pass: weights are shared, only nodes are copied.
    """
    import copy
    import warnings

    with warnings.catch_warnings():
        # torch's own pytree specs warn about a deprecated isinstance check while being deep-copied.
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
        new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
        for attr in ("_in_spec", "_out_spec", "meta"):
            if hasattr(gm, attr):
                setattr(new, attr, copy.copy(getattr(gm, attr)))
    if isinstance(gm, fx.GraphModule) and type(gm).train is fx.GraphModule.train:
        new.train(gm.training)  # a fresh module starts in training mode; keep the snapshot's mode
    else:
        new.eval()  # export's unlifted modules refuse train()/eval() but were traced (and run) in eval mode
    return new


def retarget_device(gm: fx.GraphModule, device: torch.device) -> int:
    """Point every device constant in `gm`'s calls at `device`; return how many changed.

    torch.export records the capture device in factory calls and copies (`arange(n, device=cpu)`, `mask.to(cpu)`);
    left alone, they pin a program captured on CPU to the CPU after its tensors moved to CUDA.
    """
    changed = 0

    def swap(arg: Any) -> Any:
        nonlocal changed
        if isinstance(arg, torch.device) and arg != device:
            changed += 1
            return device
        return arg

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    if changed:
        gm.recompile()
    return changed


def prune_tensors(gm: fx.GraphModule) -> int:
    """Drop `get_attr` nodes nobody reads and every parameter/buffer no node refers to; return how many tensors.

    Rewrites that replace weights (fusing, folding) leave the old ones behind; this keeps memory and artifacts lean.
    """
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    referenced = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in referenced:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        else:
            continue
        dropped += 1
    return dropped
