"""`optimize()`: capture, run the verified pass pipeline, lower to a backend; and the module it returns."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import fx, nn

from .backends import get_backend
from .capture import CallSpec, capture, capture_info, eval_mode, normalize_inputs
from .cost import token_summary
from .errors import InputError, VerificationError
from .ir import retarget_device
from .pipeline import Pass, PassContext, Pipeline, effective_contract, spec_of
from .registry import resolve_passes
from .report import Report
from .verify import compare, first_divergence, output_cosine, run_program, valid_tokens_only

__all__ = ["optimize", "OptimizedModule"]


class OptimizedModule(nn.Module):
    """The result of `optimize()`: called like the original model.

    Attributes:
        graph_module: the rewritten ATen-level `torch.fx.GraphModule` (inspect it, test it, re-export it).
        report: what each pass did, its time and its measured error (`print(opt.report)`).
    """

    def __init__(self, graph_module: fx.GraphModule, program: Any, report: Report, backend: Any):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.backend = backend
        # A backend that returns the graph module itself needs no separate attribute (and no double registration).
        self._program = None if program is graph_module else program
        self.train(graph_module.training)  # captured programs come out in eval mode; keep one mode throughout

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> OptimizedModule:
        """`.to(device)`, `.cuda()`, `.cpu()`: the tensors move, and so do the devices the captured graph names."""
        super()._apply(fn, recurse)
        devices = {t.device for t in (*self.parameters(), *self.buffers())}
        if len(devices) == 1:  # a model spread over devices keeps its graph's devices as they are
            (device,) = devices
            for module in self.modules():
                if isinstance(module, fx.GraphModule):
                    retarget_device(module, device)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        info = capture_info(self.graph_module)
        if info is not None and info.call is not None:
            args, kwargs = info.call.adapt(args, kwargs)
        return self.program(*args, **kwargs)

    @property
    def program(self) -> Any:
        """What the backend lowered `graph_module` to: the same module for eager, a GraphModule with `txc_triton::`
        kernel ops for triton. It is what runs, and what `txcompile convert` saves."""
        return self.graph_module if self._program is None else self._program

    @property
    def call_spec(self) -> CallSpec | None:
        """How the program binds positional and keyword inputs (the original forward's names)."""
        info = capture_info(self.graph_module)
        return None if info is None else info.call

    def __repr__(self) -> str:
        passes = ", ".join(r.spec for r in self.report.records) or "no passes"
        return f"OptimizedModule({self.report.model}, passes=[{passes}], backend={self.report.backend})"


class _Verifier:
    """Checks each pass against its contract, on the example inputs, as the pipeline runs."""

    def __init__(self, reference: Any, inputs: Any, captured_output: Any):
        self.reference = reference
        self.inputs = inputs
        self.previous = captured_output

    def __call__(self, p: Pass, before: fx.GraphModule, after: fx.GraphModule) -> dict[str, Any]:
        out = run_program(after, self.inputs)
        # A program that leaves padded positions unspecified (unpad) is compared on the real tokens only.
        out, previous, reference = (valid_tokens_only(x, after, self.inputs) for x in (out, self.previous,
                                                                                     self.reference))  # fmt: skip
        step = compare(previous, out)
        total = compare(reference, out)
        contract = effective_contract(p)
        result: dict[str, Any] = {"ok": step.ok, "max_abs": total.max_abs, "max_rel": total.max_rel}
        result["step_max_abs"] = step.max_abs
        if contract in ("exact", "reparameterize") and not step.ok:
            where = first_divergence(before, after, self.inputs)
            node = where[0] if where else None
            hint = f"; first diverging node: {node} (max abs {where[1]:.3g})" if where else ""
            raise VerificationError(
                f"pass '{spec_of(p)}' is declared {contract} but changed the output on the example inputs: max abs "
                f"error {step.max_abs:.3g} > tolerance (rtol={step.rtol:g}, atol={step.atol:g}, {step.dtype}) at "
                f"output {step.worst_output}{hint}",
                pass_name=p.name,
                node=node,
                max_abs=step.max_abs,
            )
        if contract == "retrain":
            result["cosine"] = output_cosine(reference, out)
        if contract == "approximate":
            result["cosine"] = output_cosine(reference, out)
            check = getattr(p, "check_quality", None)
            problem = check(result) if callable(check) else None
            if problem:
                raise VerificationError(f"pass '{spec_of(p)}' exceeded its budget: {problem}", pass_name=p.name)
        self.previous = out
        return result


def optimize(
    model: nn.Module,
    passes: Sequence[str | Pass] | str = (),
    *,
    example_inputs: Any,
    calibration_data: Iterable[Any] | None = None,
    backend: Any = "eager",
    verify: bool = True,
    strict: bool = False,
    dynamic: bool = True,
    max_iters: int = 1,
    progress: Callable[[str], None] | None = None,
) -> OptimizedModule:
    """Capture `model`, rewrite it with `passes`, check every rewrite, and lower it to `backend`.

    Args:
        model: the trained `nn.Module`; never modified.
        passes: pass specs ("cleanup", "fuse_qkv:gated_mlp=true") or pass objects, run in order.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors (HF style).
        calibration_data: example inputs for passes that calibrate (quantization, early exit thresholds).
        backend: "eager" (the reference), "triton" (fused Triton kernels, options as in "triton:gemm=triton"), or a
            Backend object.
        verify: compare the program with the original after every pass; exact passes must stay within the
            per-dtype tolerance, else `VerificationError` names the pass and the first diverging node. A backend
            that checks its lowering (triton) skips that check too when this is False.
        strict: make backend fallbacks to plain ATen an error.
        dynamic: keep batch and sequence dims dynamic in the captured program.
        max_iters: rounds of the pass list (a bounded fixpoint).
        progress: called with the name of each step as it starts ("capture", "pass fuse_qkv", ...), for UIs.

    Returns:
        An `OptimizedModule` with `.graph_module` and `.report`.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    pass_list = resolve_passes(passes)  # bad specs fail here, before any work
    be = get_backend(backend)
    if not verify and getattr(be, "verify", False) is True and dataclasses.is_dataclass(be):
        be = dataclasses.replace(be, verify=False)  # verify=False also skips the backend's check of its lowering
    calib = list(calibration_data) if calibration_data is not None else None
    if calib is not None:
        calib = [normalize_inputs(c, what="calibration_data item") for c in calib]
    step = progress or (lambda _name: None)
    start = time.perf_counter()
    report = Report(model=type(model).__name__, backend=be.name)
    reference = None
    if verify:
        with eval_mode(model):
            reference = run_program(model, inputs)
    step("capture")
    gm = capture(model, inputs, dynamic=dynamic)
    captured = gm
    report.capture = capture_info(gm)
    report.seconds["capture"] = time.perf_counter() - start
    verifier = None
    if verify:
        captured_out = run_program(gm, inputs)
        report.capture_error = compare(reference, captured_out).as_dict()
        verifier = _Verifier(reference, inputs, captured_out)
    ctx = PassContext(example_inputs=inputs, calibration_data=calib)
    t = time.perf_counter()
    gm, records = Pipeline(pass_list, max_iters=max_iters).run(
        gm, ctx, verify=verifier, on_start=lambda p: step(f"pass {spec_of(p)}")
    )
    report.records = records
    reducing = {p.name for p in pass_list if getattr(p, "reduces_tokens", False)}
    if any(r.modified and r.name in reducing for r in records):
        report.tokens = token_summary(captured, gm)
    report.quant = ctx.scratch.get("quantize")
    report.early_exit = ctx.scratch.get("early_exit")
    report.seconds["passes"] = time.perf_counter() - t
    t = time.perf_counter()
    step(f"lower to {be.name}")
    lowered = be.lower(gm, inputs, strict=strict)
    report.fallbacks = list(lowered.fallbacks)
    report.kernels = dict(lowered.kernels)
    report.lowering_error = lowered.error
    report.seconds["lower"] = time.perf_counter() - t
    report.seconds["total"] = time.perf_counter() - start
    return OptimizedModule(gm, lowered.program, report, be)
