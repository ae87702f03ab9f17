"""Capture a model as an ATen-level `torch.fx.GraphModule` with torch.export.

    gm = txc.capture(model, (x,))                                   # positional tensors
    gm = txc.capture(model, {"input_ids": ids, "attention_mask": m})  # Hugging Face keyword tensors

What capture takes care of so passes never see it:
- eval mode and `use_cache=False` for the duration of the trace (HF cache objects in outputs break torch.export),
  restored afterwards;
- dynamic batch and sequence dims (`Dim.AUTO`; export proves the ranges), widening size-1 example dims for the trace
  because export specializes sizes 0 and 1;
- weights cloned into the captured module, so nothing done to it (training included) ever touches the user's model;
- FakeTensor `val` metadata on every node, parameters included.
Failures raise `CaptureError` naming the model, the failing op or source line, and a hint.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from .errors import CaptureError, InputError
from .ir import copy_graph_module, refresh_metadata

__all__ = ["capture", "normalize_inputs", "CaptureInfo", "CallSpec", "capture_info", "eval_mode"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic: tuple[int, ...]  # dims declared dynamic


@dataclass(frozen=True)
class CallSpec:
    """How the captured program is called: which inputs were positional, which keyword, and the forward's names.

    The exported program only accepts the exact form it was traced with; `adapt` maps any call the original
    `forward` would accept (positional or keyword) onto that form.
    """

    parameters: tuple[str, ...]  # forward's parameter names, in order
    positional: tuple[str, ...]
    keywords: tuple[str, ...]

    def adapt(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) == len(self.positional) and set(kwargs) == set(self.keywords):
            return args, kwargs
        if len(args) > len(self.parameters):
            raise InputError(f"got {len(args)} positional inputs; forward takes {len(self.parameters)}")
        given = dict(zip(self.parameters, args))
        for key, value in kwargs.items():
            if key in given:
                raise InputError(f"input '{key}' given both by position and by keyword")
            given[key] = value
        wanted = self.positional + self.keywords
        missing = [n for n in wanted if given.get(n) is None]
        if missing:
            raise InputError(f"missing input(s) {missing}: the program was captured with {list(wanted)}")
        extra = [n for n, v in given.items() if n not in wanted and v is not None]
        if extra:
            raise InputError(
                f"input(s) {extra} were not part of the example inputs at capture; capture again with them "
                f"(captured: {list(wanted)})"
            )
        return tuple(given[n] for n in self.positional), {k: given[k] for k in self.keywords}


@dataclass
class CaptureInfo:
    """What capture did, kept in `gm.meta["txcompile"]` for reports and artifacts."""

    model: str
    inputs: tuple[InputSpec, ...]
    range_constraints: dict[str, str]
    seconds: float
    dynamic: bool
    call: CallSpec | None = None
    warnings: list[str] = field(default_factory=list)


def capture_info(gm: fx.GraphModule) -> CaptureInfo | None:
    return gm.meta.get("txcompile") if hasattr(gm, "meta") else None


def normalize_inputs(example_inputs: Any, *, what: str = "example_inputs") -> Inputs:
    """Accept a tensor, a tuple/list of positional tensors, or a dict of keyword tensors; return (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise InputError(f"{what}: dict keys must be argument names (str), got {bad[0]!r}")
        kwargs = dict(example_inputs)
        _check_leaves(kwargs, what)
        return (), kwargs
    if isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
        if len(args) == 2 and isinstance(args[0], (tuple, list)) and isinstance(args[1], Mapping):
            kwargs = dict(args[1])
            _check_leaves((args[0], kwargs), what)
            return tuple(args[0]), kwargs  # already (args, kwargs)
        _check_leaves(args, what)
        return args, {}
    if example_inputs is None:
        raise InputError(f"{what} is required: pass a tensor, a tuple of tensors, or a dict of keyword tensors")
    raise InputError(
        f"{what} must be a tensor, a tuple/list of tensors, or a dict of keyword tensors, "
        f"got {type(example_inputs).__name__}"
    )


def _check_leaves(obj: Any, what: str) -> None:
    leaves = torch.utils._pytree.tree_leaves(obj)
    if not leaves:
        raise InputError(f"{what} holds no tensors; give at least one example input tensor")
    for leaf in leaves:
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            raise InputError(
                f"{what} holds a {type(leaf).__name__}; only tensors (and plain numbers) can be example inputs. "
                "Tokenize text first (e.g. tokenizer(..., return_tensors='pt'))"
            )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode with caching off for a trace or a reference run, then restore every flag."""
    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    if config is not None:
        for key, value in (("use_cache", False),):
            if hasattr(config, key):
                saved[key] = getattr(config, key)
                setattr(config, key, value)
    try:
        # Flags, not model.eval(): export's unlifted modules refuse train()/eval() but are traced in eval mode anyway.
        for m in modes:
            m.training = False
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for key, value in saved.items():
            setattr(config, key, value)


def _dynamic_dims(t: torch.Tensor) -> tuple[int, ...]:
    """Which dims of an example tensor are batch/sequence: dim 0 always; dim 1 for token-like inputs.

    Token ids, masks and [B, T, D] activations have a sequence dim; images [B, C, H, W] and [B, F] features do not.
    """
    if t.dim() == 0:
        return ()
    if t.dim() >= 2 and (not t.is_floating_point() or t.dim() == 3):
        return (0, 1)
    return (0,)


def _widen(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # torch.export specializes dims of size 0/1; trace with 2 instead (repeating the data keeps masks valid).
    for d in dims:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def _call_spec(model: nn.Module, inputs: Inputs) -> tuple[CallSpec, Inputs]:
    """How `model` is called with `inputs`, and the inputs in the form to export them with."""
    args, kwargs = inputs
    wrapped = getattr(model, "call_spec", None)
    if isinstance(wrapped, CallSpec):
        # A captured program (OptimizedModule, LoadedProgram): its graph is exported in the form it was captured in.
        return wrapped, wrapped.adapt(args, kwargs)
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError as e:
        raise InputError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = tuple(n for n, p in signature.parameters.items() if p.kind in plain)
    positional = tuple(list(bound)[: len(args)])
    if len(positional) != len(args):  # forward(*args): no names to bind by
        raise InputError(f"{type(model).__name__}.forward takes *args; give example inputs as keyword tensors")
    return CallSpec(parameters, positional, tuple(kwargs)), inputs


def _plan(call: CallSpec, inputs: Inputs, dynamic: bool) -> tuple[Inputs, Any, tuple[InputSpec, ...]]:
    """Widened example inputs, the export `dynamic_shapes` spec (keyed by argument name), and input specs."""
    args, kwargs = inputs
    specs: list[InputSpec] = []
    shapes: dict[str, Any] = {}

    def one(name: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            shapes[name] = None
            return t
        if t._is_view():
            t = t.clone()  # export guards a view's base sizes: later calls with other shapes would then fail
        dims = _dynamic_dims(t) if dynamic else ()
        specs.append(InputSpec(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), dims))
        shapes[name] = {d: Dim.AUTO for d in dims} or None
        return _widen(t, dims)

    new_args = tuple(one(name, a) for name, a in zip(call.positional, args))
    new_kwargs = {k: one(k, v) for k, v in kwargs.items()}
    return (new_args, new_kwargs), (shapes if dynamic else None), tuple(specs)


def _user_frame(exc: BaseException) -> str:
    """The deepest traceback frame outside torch and txcompile: usually the model's own source line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        if "/torch/" not in path and "/txcompile/" not in path and "/site-packages/torch" not in path:
            return f"{f.filename}:{f.lineno} ({f.line})"
    return ""


def _hint(message: str) -> str:
    m = message.lower()
    if "data-dependent" in m or "data dependent" in m or "guardondatadependent" in m:
        return "the model branches on tensor values (e.g. .item() or `if x.sum() > 0`); make that control flow static"
    if "pytree" in m or "not a known type" in m:
        return (
            "an input or output type is not a pytree; return tensors/dicts/tuples (for HF models set use_cache=False)"
        )
    if "constraint" in m or "specializ" in m or "dynamic" in m:
        return "a dynamic batch/sequence dim was specialized; call capture(..., dynamic=False) or pass dynamic_shapes="
    if "unsupported" in m or "not implemented" in m:
        return "an op in the model has no ATen/export support; wrap it in a torch.library custom op"
    return "run torch.export.export on the model directly for the full trace, or report the op to txcompile"


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> fx.GraphModule:
    """Capture `model` as an ATen-level GraphModule that runs on other batch sizes and sequence lengths.

    Args:
        model: any `nn.Module`; it is never modified.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors.
        dynamic: declare batch (and sequence, for token-like inputs) dims dynamic.
        dynamic_shapes: an explicit torch.export `dynamic_shapes` spec; overrides `dynamic`.
        strict: use torch.export's strict (Dynamo) mode.

    Returns:
        A `torch.fx.GraphModule` called like the model; `gm.meta["txcompile"]` holds a `CaptureInfo`.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    name = type(model).__name__
    call, inputs = _call_spec(model, inputs)
    # Wrappers of a captured program take *args, **kwargs, which export cannot give dynamic shapes by name: export
    # the program itself (the wrapper only binds inputs).
    program = model.graph_module if isinstance(getattr(model, "call_spec", None), CallSpec) else model
    (args, kwargs), auto_shapes, specs = _plan(call, inputs, dynamic)
    shapes = dynamic_shapes if dynamic_shapes is not None else auto_shapes
    warnings: list[str] = []
    start = time.perf_counter()
    with eval_mode(program):
        try:
            ep = torch.export.export(program, args, kwargs or None, dynamic_shapes=shapes, strict=strict)
        except Exception as e:  # noqa: BLE001 - translated into CaptureError below
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = _user_frame(e)
            raise CaptureError(
                f"could not capture {name}: {type(e).__name__}: {first[:300]}"
                + (f"\n  at {where}" if where else "")
                + f"\n  hint: {_hint(str(e))}"
            ) from e
    # A plain GraphModule instead of export's unlifted module, whose train()/eval() raise: reparameterized programs
    # (sigma_reparam, qk_norm) are trained. It was traced in eval mode, so it comes out in eval mode, and train()
    # only switches txcompile's own stateful ops (dropout is not brought back).
    gm = copy_graph_module(ep.module())
    gm.eval()
    _own_weights(gm)
    _drop_dtype_asserts(gm)
    refresh_metadata(gm)  # export filled every call's value; this adds the parameters' (cheap, no propagation)
    ranges = {str(k): str(v) for k, v in ep.range_constraints.items()}
    if dynamic and not ranges and any(s.dynamic for s in specs):
        warnings.append("no dim stayed dynamic: the model specializes batch and sequence sizes")
    seconds = time.perf_counter() - start
    gm.meta["txcompile"] = CaptureInfo(name, specs, ranges, seconds, dynamic, call, warnings)
    return gm


def _drop_dtype_asserts(gm: fx.GraphModule) -> None:
    """Remove export's `_assert_tensor_metadata` checks.

    They re-check dtypes export already proved, and as extra users of values they hide the single-consumer chains
    (norm -> cast -> scale) that analyses and rewrites look for. Removing them does not change what is computed.
    """
    target = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and getattr(node.target, "overloadpacket", None) is target and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _own_weights(gm: fx.GraphModule) -> None:
    """Give the captured module its own copies of every parameter and buffer.

    `ExportedProgram.module()` shares the model's Parameter objects; without copies, training or editing the captured
    program would silently change the user's model.
    """
    copies: dict[int, torch.Tensor] = {}  # tied weights (GPT's embedding and LM head) stay one tensor

    def own(t: torch.Tensor, make: Any) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = make(t.detach().clone())
        return copies[id(t)]

    for mod in gm.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[pname] = own(p, lambda c, p=p: nn.Parameter(c, requires_grad=p.requires_grad))
        for bname, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[bname] = own(b, lambda c: c)
    # Tensor constants (lifted literals) are plain attributes on the module.
    for attr, value in list(vars(gm).items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            setattr(gm, attr, value.clone())
