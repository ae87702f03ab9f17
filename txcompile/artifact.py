"""Artifacts: an optimized program written to a directory, and loaded back in any process after `import txcompile`.

    path = txcompile.artifact.save(opt, "out", label="all-MiniLM-L6-v2", example_inputs=inputs, tokenizer=tok)
    program = txcompile.artifact.load("out")      # a LoadedProgram, called like the original model
    program(**inputs); program.manifest["passes"]; program.tokenizer

OUT/ holds
    program.pt2          `torch.export.save` of the rewritten program with dynamic batch/sequence dims; self-contained,
                         so `torch.export.load("OUT/program.pt2")` also works after `import txcompile` (and an import of
                         the module defining its output type, e.g. transformers: manifest "pytree_types", which
                         `load` imports itself)
    weights.safetensors  the same parameters and buffers in an interchange format (tools outside torch.export);
                         tied tensors are stored once, their other names in the metadata key "txcompile.aliases"
    manifest.json        versions, input specs with dynamic dims and range constraints, call spec, backend, passes
                         (contracts, measured errors), and every other file's size and sha256
    report.txt, report.html, example_inputs.pt (when example inputs are given: a dict name -> tensor),
    tokenizer/ (when given), model.onnx (with formats including "onnx"; see `onnx_export`)

Writing is atomic: everything is built in a hidden sibling directory and renamed into place at the end; any failure,
Ctrl-C included, removes it, so OUT is either complete or absent (with force=True the old OUT stays until the new one is
complete). Loading checks the format version and every listed file's size and sha256 before unpickling anything:
hashing costs about 0.13 s per 90 MB (MiniLM's program.pt2) against about 2 s for `torch.export.load`, so it is on by
default; `load(path, verify=False)` checks sizes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import importlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from .ir import copy_graph_module
from .capture import CallSpec, CaptureInfo, InputSpec, _widen, capture_info, eval_mode, normalize_inputs
from .errors import ArtifactError
from .verify import run_program

__all__ = ["FORMAT_VERSION", "save", "load", "LoadedProgram"]

FORMAT_VERSION = 1
# The oldest format this version still reads; raise it when a change makes older artifacts unreadable.
MIN_FORMAT_VERSION = 1

PROGRAM = "program.pt2"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.pt"
TOKENIZER = "tokenizer"
ONNX = "model.onnx"
FORMATS = ("pt2", "onnx")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------- save


def save(
    opt: Any,
    out: str | os.PathLike[str],
    *,
    label: str,
    report_text: str | None = None,
    report_html: str | None = None,
    tokenizer: Any = None,
    formats: Sequence[str] = ("pt2",),
    force: bool = False,
    reference: nn.Module | None = None,
    check_inputs: Any = None,
    example_inputs: Any = None,
    extra_manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Write `opt` (an `OptimizedModule`) as an artifact directory `out`, atomically; return its path.

    Args:
        label: what the model is, for the manifest and reports ("all-MiniLM-L6-v2", "ref:gpt").
        report_text, report_html: the human reports; default `str(opt.report)` and that text as an HTML page.
        tokenizer: saved to `tokenizer/` with `save_pretrained`, and given back by `LoadedProgram.tokenizer`.
        formats: "pt2" (always written) and optionally "onnx".
        force: replace an existing `out` (only once the new artifact is complete).
        reference: the original model, the ground truth of the ONNX check (default: the optimized program).
        check_inputs: inputs for the ONNX check (default: `example_inputs`).
        example_inputs: real inputs to re-export with, saved as `example_inputs.pt` so the artifact can be converted
            again; without them the re-export traces zeros/ones of the captured shapes and no file is written.
        extra_manifest: more JSON-ready keys for the manifest (e.g. measured speed).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ArtifactError(f"unknown artifact format(s) {unknown}; valid formats: {list(FORMATS)}")
    gm, info = _program_of(opt)
    if "onnx" in formats and gm is not getattr(opt, "graph_module", gm):
        raise ArtifactError(
            f"ONNX cannot hold the {getattr(opt.report, 'backend', 'lowered')} backend's kernel ops; convert with "
            "--backend eager for --format onnx (ONNX runtimes bring their own fused kernels)"
        )
    trace_inputs = _program_inputs(info, example_inputs)
    target = Path(out)
    with _atomic_directory(target, force=force) as tmp:
        seconds: dict[str, float] = {}
        with _timed(seconds, "export"):
            ep = _reexport(gm, info, trace_inputs)
        with _timed(seconds, "save_program"):
            torch.export.save(ep, tmp / PROGRAM)
        weights = _write_weights(ep, tmp / WEIGHTS)
        if example_inputs is not None:
            torch.save(_by_name(info, trace_inputs), tmp / EXAMPLES)
        _write_reports(tmp, opt, label, report_text, report_html)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        onnx_check = None
        if "onnx" in formats:
            with _timed(seconds, "onnx"):
                checked = check_inputs if check_inputs is not None else example_inputs
                onnx_check = _write_onnx(ep, tmp / ONNX, opt, info, reference, checked)
        manifest = _manifest(opt, info, ep, label, weights, seconds)
        if onnx_check is not None:
            manifest["onnx"] = onnx_check
        manifest.update(_jsonable(dict(extra_manifest or {})))
        manifest["files"] = _file_table(tmp)  # last: it covers every file written above
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - start


def _program_of(opt: Any) -> tuple[fx.GraphModule, CaptureInfo]:
    gm = getattr(opt, "graph_module", opt)
    lowered = getattr(opt, "program", None)
    if isinstance(lowered, fx.GraphModule):  # a backend's lowered program (Triton kernel ops) is what runs: save it
        gm = lowered
    info = capture_info(gm) if isinstance(gm, fx.GraphModule) else None
    if info is None or info.call is None:
        raise ArtifactError(
            f"cannot save a {type(opt).__name__}: it carries no capture information; save the result of "
            "txcompile.optimize() or txcompile.capture()"
        )
    return gm, info


def _program_inputs(info: CaptureInfo, example_inputs: Any) -> Inputs:
    """(args, kwargs) in the exact form the captured program takes."""
    assert info.call is not None
    if example_inputs is None:
        return _synthesize_inputs(info)
    args, kwargs = normalize_inputs(example_inputs)
    return info.call.adapt(args, kwargs)


def _synthesize_inputs(info: CaptureInfo) -> Inputs:
    # Re-export only needs shapes and dtypes: capture already resolved every data-dependent branch. Ones are valid
    # token ids and mask values; zeros are valid floats.
    assert info.call is not None
    by_name = {s.name: torch.ones(s.shape, dtype=getattr(torch, s.dtype)) for s in info.inputs}
    for spec in info.inputs:
        if by_name[spec.name].is_floating_point():
            by_name[spec.name].zero_()
    args = tuple(by_name.get(n) for n in info.call.positional)
    return args, {k: by_name.get(k) for k in info.call.keywords}


def _by_name(info: CaptureInfo, inputs: Inputs) -> dict[str, Any]:
    # Saved by name so a re-capture of the loaded artifact (LoadedProgram.forward takes *args, **kwargs) can bind them.
    assert info.call is not None
    args, kwargs = inputs
    return {**dict(zip(info.call.positional, args)), **kwargs}


def _reexport(gm: fx.GraphModule, info: CaptureInfo, inputs: Inputs) -> ExportedProgram:
    """Export the rewritten GraphModule again, with the dynamic dims capture declared."""
    assert info.call is not None
    specs = {s.name: s for s in info.inputs}
    shapes = {name: _dim_spec(specs.get(name)) for name in _by_name(info, inputs)}
    args, kwargs = inputs
    args = tuple(_widen_named(a, specs.get(n)) for n, a in zip(info.call.positional, args))
    kwargs = {k: _widen_named(v, specs.get(k)) for k, v in kwargs.items()}
    # Artifacts hold the inference program: stateful ops (σReparam's power iteration) are saved in their eval form.
    try:
        with eval_mode(gm):
            return torch.export.export(gm, args, kwargs or None, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - a rewritten program that no longer exports is the user's to know about
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"the rewritten {info.model} program could not be exported again for saving ({type(e).__name__}: "
            f"{first[:300]}); every op a pass adds must be a torch.library custom op with a fake implementation"
        ) from e


def _dim_spec(spec: InputSpec | None) -> dict[int, Any] | None:
    if spec is None or not spec.dynamic:
        return None
    return {d: Dim.AUTO for d in spec.dynamic}


def _widen_named(value: Any, spec: InputSpec | None) -> Any:
    return _widen(value, spec.dynamic) if isinstance(value, torch.Tensor) and spec is not None else value


def _pytree_types(ep: ExportedProgram) -> list[str]:
    """ "module:qualname" of the non-builtin containers in the program's inputs and outputs (e.g. HF ModelOutputs).

    Deserializing the program needs each registered again, which happens when its module is imported.
    """
    names: set[str] = set()
    stack = [ep.call_spec.in_spec, ep.call_spec.out_spec]
    while stack:
        spec = stack.pop()
        if spec is None or spec.is_leaf():
            continue
        if spec.type.__module__ not in ("builtins", "collections"):
            names.add(f"{spec.type.__module__}:{spec.type.__qualname__}")
        stack.extend(spec.children())
    return sorted(names)


def _write_weights(ep: ExportedProgram, path: Path) -> dict[str, Any]:
    """Save the program's parameters, buffers and tensor constants; return {"tensors": n, "aliases": {alias: name}}."""
    named = dict(ep.state_dict)
    named.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    tensors, aliases = _unique_tensors(named)
    metadata = {"format": "pt", "txcompile.aliases": json.dumps(aliases, sort_keys=True)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return {"tensors": len(named), "aliases": aliases}


def _unique_tensors(named: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store: identical views (tied weights) once, other storage-sharing views as copies.

    safetensors refuses tensors that share memory; a tied weight is recorded as an alias instead of stored twice.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[int] = set()
    for name, tensor in named.items():
        t = tensor.detach()
        storage = t.untyped_storage().data_ptr()
        view = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        shared = storage in seen_storages
        seen_storages.add(storage)
        stored[name] = t.clone().contiguous() if shared else t.contiguous()
    return stored, aliases


def _write_reports(tmp: Path, opt: Any, label: str, text: str | None, page: str | None) -> None:
    report = getattr(opt, "report", None)
    text = text if text is not None else (str(report) if report is not None else f"txcompile artifact: {label}")
    (tmp / "report.txt").write_text(text.rstrip() + "\n", encoding="utf-8")
    (tmp / "report.html").write_text(page if page is not None else _html_page(label, text), encoding="utf-8")


def _html_page(title: str, text: str) -> str:
    """The text report as one self-contained page (used when the caller has no richer HTML)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>txcompile: {html.escape(title)}</title></head>\n"
        f"<body><h1>txcompile: {html.escape(title)}</h1>\n<pre>{html.escape(text)}</pre></body></html>\n"
    )


def _write_onnx(
    ep: ExportedProgram, path: Path, opt: Any, info: CaptureInfo, reference: nn.Module | None, check_inputs: Any
) -> dict[str, Any]:
    from .onnx_export import export_onnx  # onnx, onnxruntime and onnxscript are optional dependencies

    assert info.call is not None
    user_inputs = normalize_inputs(check_inputs) if check_inputs is not None else _synthesize_inputs(info)
    program_inputs = info.call.adapt(*user_inputs)
    ground_truth: Any = reference if reference is not None else opt
    with eval_mode(ground_truth):
        expected = run_program(ground_truth, user_inputs)
    return export_onnx(ep, path, _by_name(info, program_inputs), expected)


def _manifest(
    opt: Any, info: CaptureInfo, ep: ExportedProgram, label: str, weights: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    report = getattr(opt, "report", None)
    call = info.call
    assert call is not None
    return {
        "format_version": FORMAT_VERSION,
        "txcompile_version": _txcompile_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "model": info.model,
        "inputs": [_jsonable(asdict(s)) for s in info.inputs],
        # The saved program's own ranges (re-export may name symbols differently from capture).
        "range_constraints": {str(k): str(v) for k, v in ep.range_constraints.items()},
        "call": {k: list(getattr(call, k)) for k in ("parameters", "positional", "keywords")},
        "backend": getattr(report, "backend", None),
        "capture_error": _jsonable(getattr(report, "capture_error", None)),
        "passes": [_pass_entry(r) for r in getattr(report, "records", [])],
        # early_exit's calibration: criterion, threshold, exit distribution, agreement, expected/measured speedup.
        "early_exit": _jsonable(getattr(report, "early_exit", None)),
        "pytree_types": _pytree_types(ep),
        "weights": weights,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _pass_entry(record: Any) -> dict[str, Any]:
    keys = ("spec", "name", "contract", "modified", "stats", "error", "seconds", "ops_added", "ops_removed", "notes")
    return {k: _jsonable(getattr(record, k, None)) for k in keys}


def _txcompile_version() -> str:
    from . import __version__  # deferred: txcompile/__init__ imports this module before defining __version__

    return __version__


def _jsonable(value: Any) -> Any:
    """Plain JSON values: containers recursively, non-finite floats as strings, anything else by str()."""
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {bytes, sha256}} for every file under `directory` (the manifest is written after)."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        table[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return table


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------- atomic writing


@contextlib.contextmanager
def _atomic_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out` to fill; rename it to `out` on success, remove it on any failure."""
    _refuse_existing(out, force)
    created = _make_parents(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left by an earlier run of this pid that was killed outright
    try:
        tmp.mkdir()
        yield tmp
        _refuse_existing(out, force)  # OUT may have appeared while this one was being written
        _replace(tmp, out)
    except BaseException:  # Ctrl-C too: no half-written directory may survive
        _remove(tmp)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _refuse_existing(out: Path, force: bool) -> None:
    if (out.exists() or out.is_symlink()) and not force:
        raise ArtifactError(
            f"output '{out}' already exists; pass force=True (--force on the command line) to replace it"
        )


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and missing ancestors; return those created, deepest first, to remove after a failure."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _remove(old)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------------------------- load


class LoadedProgram(nn.Module):
    """An artifact loaded back: called like the original model (positional or keyword inputs, as at capture).

    Attributes:
        graph_module: the program from `torch.export.load(OUT/program.pt2).module()`.
        manifest: the parsed manifest.json.
        path: the artifact directory.
        tokenizer: the saved tokenizer (loaded with transformers on first use), or None.
    """

    def __init__(self, graph_module: nn.Module, manifest: dict[str, Any], path: Path):
        super().__init__()
        self.graph_module = graph_module
        self.manifest = manifest
        self.path = path
        call = manifest.get("call")
        self._call = CallSpec(*(tuple(call[k]) for k in ("parameters", "positional", "keywords"))) if call else None
        self._tokenizer: Any = None
        self._tokenizer_loaded = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._call is not None:
            args, kwargs = self._call.adapt(args, kwargs)
        return self.graph_module(*args, **kwargs)

    @property
    def call_spec(self) -> CallSpec | None:
        """How the program binds positional and keyword inputs (the original forward's names)."""
        return self._call

    @property
    def tokenizer(self) -> Any:
        if not self._tokenizer_loaded:
            self._tokenizer = _load_tokenizer(self.path / TOKENIZER)
            self._tokenizer_loaded = True
        return self._tokenizer

    def __repr__(self) -> str:
        passes = ", ".join(p.get("spec", "?") for p in self.manifest.get("passes", [])) or "no passes"
        return f"LoadedProgram({self.manifest.get('label', self.path)!r}, passes=[{passes}], path='{self.path}')"


def load(path: str | os.PathLike[str], *, verify: bool = True) -> LoadedProgram:
    """Load an artifact directory written by `save` (or `txcompile convert`).

    Args:
        verify: check every listed file's sha256 (about 0.13 s per 90 MB); False checks sizes only.

    Raises:
        ArtifactError: the directory or a file is missing, the manifest is unreadable, a checksum does not match,
            or the artifact's format is not one this txcompile reads.
    """
    root = Path(path)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ArtifactError(f"artifact '{root}' {what}; give the directory written by txcompile convert (-o OUT)")
    manifest = _read_manifest(root)
    _check_version(root, manifest)
    _check_files(root, manifest, verify=verify)
    _import_pytree_types(root, manifest)
    return LoadedProgram(_load_program(root), manifest, root)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"'{root}' has no {MANIFEST}, so it is not a txcompile artifact; convert the model again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{path} is not valid JSON ({e}); the artifact is corrupt: convert the model again"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} is not a txcompile manifest (no file table); convert the model again")
    return manifest


def _check_version(root: Path, manifest: Mapping[str, Any]) -> None:
    version = manifest.get("format_version")
    if isinstance(version, int) and MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        return
    made_by = manifest.get("txcompile_version", "unknown")
    raise ArtifactError(
        f"artifact '{root}' was made by txcompile {made_by} (format {version}); this is txcompile "
        f"{_txcompile_version()} (format {FORMAT_VERSION}, reads {MIN_FORMAT_VERSION}..{FORMAT_VERSION}): "
        "convert the model again"
    )


def _check_files(root: Path, manifest: Mapping[str, Any], *, verify: bool) -> None:
    files: Mapping[str, Any] = manifest["files"]
    if PROGRAM not in files:
        raise ArtifactError(
            f"{root / MANIFEST} lists no {PROGRAM}; the artifact is incomplete: convert the model again"
        )
    for name, entry in files.items():
        path = root / name
        if not isinstance(entry, Mapping) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{root / MANIFEST} has a malformed entry for {name}; convert the model again")
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing; copy the whole directory or convert the model again")
        if path.stat().st_size != entry.get("bytes") or (verify and _sha256(path) != entry.get("sha256")):
            raise ArtifactError(
                f"artifact file {path} is corrupt (its size or sha256 differs from the manifest); "
                "copy it again or convert the model again"
            )


def _import_pytree_types(root: Path, manifest: Mapping[str, Any]) -> None:
    """Import the modules defining the program's input/output container types, which registers them with pytree."""
    for qualified in manifest.get("pytree_types", []):
        module = qualified.partition(":")[0]
        if module == "__main__":
            continue  # only the script that saved it could define it; deserialization names the type if absent
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ArtifactError(
                f"artifact '{root}' returns {qualified}, which needs the module {module} ({e}); install the package "
                "that provides it (e.g. transformers) and load again"
            ) from None


def _load_program(root: Path) -> nn.Module:
    path = root / PROGRAM
    try:
        # A plain eval-mode GraphModule, as capture gives: export's own refuses train()/eval().
        return copy_graph_module(torch.export.load(path).module())
    except Exception as e:  # noqa: BLE001 - reported as an artifact problem with what to do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"{path} could not be loaded ({type(e).__name__}: {first[:200]}); if it uses ops from another package, "
            "import that package first, else convert the model again"
        ) from e


def _load_tokenizer(directory: Path) -> Any:
    if not directory.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)  # never a Hub lookup
