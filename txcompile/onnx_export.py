"""ONNX output of an artifact: export the saved program, check it with onnx.checker, and run it in onnxruntime.

The exported program already carries the dynamic batch/sequence dims, so the ONNX model keeps them as symbolic axes.
A model is accepted only if onnxruntime reproduces the ground truth (the original model, when the caller has it) on the
check inputs within `ONNX_ATOL`; the result is recorded in the manifest under "onnx".
Needs the optional dependencies onnx, onnxruntime and onnxscript (`pip install txcompile[onnx]`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from .errors import ArtifactError

__all__ = ["ONNX_ATOL", "export_onnx"]

# Absolute error allowed between onnxruntime and the reference: ORT reorders fp32 reductions and fuses kernels, so it
# cannot match at torch.testing's fp32 tolerance; 1e-4 is the usual bar for exporter validation.
ONNX_ATOL = 1e-4


def export_onnx(ep: ExportedProgram, path: Path, inputs: Mapping[str, Any], expected: Any) -> dict[str, Any]:
    """Write `ep` to `path` as one ONNX file and check it; return the check result for the manifest.

    Args:
        inputs: the program's inputs by argument name (the names the ONNX graph's inputs carry).
        expected: the ground-truth outputs on `inputs` (any pytree of tensors, e.g. a Hugging Face ModelOutput).

    Raises:
        ArtifactError: the exporter, onnx.checker or onnxruntime failed, or the error exceeds `ONNX_ATOL`.
    """
    onnx, ort = _import_onnx()
    _export(ep, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - any checker complaint makes the file unusable
        raise ArtifactError(f"the exported ONNX model failed onnx.checker: {_first_line(e)}") from e
    actual = _run_onnxruntime(ort, path, inputs)
    max_abs = _max_abs_error(_tensor_leaves(expected), actual)
    if not max_abs <= ONNX_ATOL:
        raise ArtifactError(
            f"onnxruntime disagrees with the original model: max abs error {max_abs:.3g} > {ONNX_ATOL:g}; "
            "save without the onnx format, or report the op that differs"
        )
    model = onnx.load(str(path), load_external_data=False)
    return {
        "file": path.name,
        "max_abs": max_abs,
        "atol": ONNX_ATOL,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "check_shapes": {name: list(v.shape) for name, v in inputs.items() if isinstance(v, torch.Tensor)},
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it; fail here with the install hint
    except ImportError as e:
        raise ArtifactError(
            f"the onnx format needs {e.name}: pip install 'txcompile[onnx]' (onnx, onnxruntime, onnxscript)"
        ) from None
    return onnx, ort


def _export(ep: ExportedProgram, path: Path) -> None:
    # The exporter prints progress lines to stdout; keep them out of the CLI's output unless it fails.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), _quiet_logger("torch.onnx"):
            torch.onnx.export(ep, (), str(path), dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - reported with the exporter's last words
        tail = log.getvalue().strip().splitlines()[-3:]
        detail = f"; exporter log: {' | '.join(tail)}" if tail else ""
        raise ArtifactError(
            f"torch.onnx.export failed: {_first_line(e)}{detail}; save without the onnx format (pt2 only)"
        ) from e
    if not path.is_file():
        raise ArtifactError(f"torch.onnx.export wrote no file at {path}; save without the onnx format (pt2 only)")


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    # The exporter warns about every optional op library it does not find (torchvision::nms, ...): noise for users.
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_onnxruntime(ort: Any, path: Path, inputs: Mapping[str, Any]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        value = inputs.get(spec.name)
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(
                f"the ONNX model takes an input '{spec.name}' that the check inputs do not provide "
                f"(given: {sorted(inputs)}); give check inputs with that name"
            )
        feeds[spec.name] = value.detach().cpu().numpy()
    try:
        return list(session.run(None, feeds))
    except Exception as e:  # noqa: BLE001 - an ORT kernel failure makes the file unusable
        raise ArtifactError(f"onnxruntime could not run the exported model: {_first_line(e)}") from e


def _tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    # ONNX outputs are the program's output pytree flattened in order; Hugging Face ModelOutputs are pytree nodes.
    return [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _max_abs_error(expected: list[torch.Tensor], actual: list[np.ndarray]) -> float:
    if len(expected) != len(actual):
        raise ArtifactError(
            f"the ONNX model returns {len(actual)} outputs but the original returns {len(expected)} tensors; "
            "save without the onnx format"
        )
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        e64 = e.detach().cpu().double().numpy()
        if e64.shape != a.shape:
            raise ArtifactError(f"ONNX output {i} has shape {list(a.shape)}, the original's has {list(e64.shape)}")
        if e64.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - e64))))
    return worst


def _value_info(value: Any) -> dict[str, Any]:
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__
