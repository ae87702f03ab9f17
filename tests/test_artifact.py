"""Artifacts: save/load round trips in fresh processes, the manifest, atomic writes, load errors, and ONNX output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from torch import fx

import txcompile as txc
import txcompile.testing
from txcompile import artifact
from txcompile.errors import ArtifactError
from txcompile.models import hf_zoo, reference
from txcompile.models import minilm as minilm_lib
from txcompile.testing import assert_roundtrip
from txcompile.verify import compare

PASSES = ["cleanup", "fuse_qkv"]


@pytest.fixture(scope="module")
def encoder() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], Any]:
    model = reference.build("encoder")
    inputs = model.example_inputs()
    return model, inputs, txc.optimize(model, PASSES, example_inputs=inputs)


@pytest.fixture(scope="module")
def encoder_artifact(encoder: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, inputs, opt = encoder
    return artifact.save(opt, tmp_path_factory.mktemp("encoder") / "out", label="ref:encoder", example_inputs=inputs)


@pytest.fixture(scope="module")
def minilm_opt(minilm: Any) -> Any:
    """MiniLM converted with the issue's pipeline, on the default (calibration) sentences only."""
    model, tokenizer = minilm
    return txc.optimize(model, PASSES, example_inputs=minilm_lib.example_inputs(tokenizer))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", ["encoder", "vit"])
def test_reference_model_roundtrips_in_a_fresh_process_at_other_shapes(kind: str, tmp_path: Path) -> None:
    model = reference.build(kind)  # type: ignore[call-overload]
    opt = txc.optimize(model, PASSES, example_inputs=model.example_inputs())
    other = model.example_inputs(batch=3, seq=5) if kind == "encoder" else model.example_inputs(batch=3)
    assert_roundtrip(opt, other, tmp_dir=tmp_path)


def test_hf_bert_roundtrips_in_a_fresh_process_at_other_shapes(tmp_path: Path) -> None:
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, PASSES, example_inputs=inputs)
    assert_roundtrip(opt, hf_zoo.make_inputs("bert", batch=3, seq=5), tmp_dir=tmp_path)


def test_roundtrip_failure_reports_the_subprocess_error(
    encoder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, inputs, opt = encoder
    monkeypatch.setattr(txcompile.testing, "_ROUNDTRIP_SCRIPT", "import sys; sys.exit('no such op: txc.missing')")
    with pytest.raises(AssertionError, match="(?s)new process failed.*no such op: txc.missing"):
        assert_roundtrip(opt, inputs, tmp_dir=tmp_path)


def test_tied_weights_are_saved_once_and_reload(tmp_path: Path) -> None:
    model = reference.build("gpt")  # lm_head shares the token embedding matrix
    inputs = model.example_inputs()
    opt = txc.optimize(model, PASSES, example_inputs=inputs)
    path = artifact.save(opt, tmp_path / "gpt", label="ref:gpt", example_inputs=inputs)
    with safetensors.safe_open(str(path / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert sum(name.endswith("emb.weight") or name == "lm_head.weight" for name in names) == 2  # tok/lm_head + pos
    other = model.example_inputs(batch=3, seq=7)
    assert compare(opt(*other), artifact.load(path)(*other)).ok


def test_tensors_sharing_memory_are_stored_once_or_copied() -> None:
    weight = torch.randn(4, 3)
    stored, aliases = artifact._unique_tensors({"a": weight, "b": weight, "row": weight[1], "other": torch.ones(2)})
    assert aliases == {"b": "a"} and set(stored) == {"a", "row", "other"}
    assert stored["row"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    safetensors.torch.save(stored)  # safetensors refuses shared memory; this must not raise


# Started before the artifact exists (imports overlap the save); "go" on stdin says it is complete.
_EMBED_SCRIPT = """
import sys, torch
import txcompile.artifact
from txcompile.models import minilm
if sys.stdin.readline().strip() == "go":
    program = txcompile.artifact.load(sys.argv[1])
    torch.save(minilm.encode(program, program.tokenizer, minilm.HELD_OUT_SENTENCES), sys.argv[2])
"""


def test_minilm_artifact_reproduces_sentence_embeddings_in_a_new_process(
    minilm: Any, minilm_opt: Any, tmp_path: Path
) -> None:
    model, tokenizer = minilm
    assert not set(minilm_lib.HELD_OUT_SENTENCES) & set(minilm_lib.CALIBRATION_SENTENCES)  # never seen in conversion
    path, embeddings = tmp_path / "minilm", tmp_path / "emb.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", _EMBED_SCRIPT, str(path), str(embeddings)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        artifact.save(
            minilm_opt, path, label="all-MiniLM-L6-v2", tokenizer=tokenizer,
            example_inputs=minilm_lib.example_inputs(tokenizer),
        )  # fmt: skip
    finally:
        _, stderr = child.communicate("go\n", timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    output_types = json.loads((path / "manifest.json").read_text())["pytree_types"]
    assert output_types == ["transformers.modeling_outputs:BaseModelOutputWithPoolingAndCrossAttentions"]
    loaded = torch.load(embeddings, weights_only=True)
    original = minilm_lib.encode(model, tokenizer, minilm_lib.HELD_OUT_SENTENCES)
    assert loaded.shape == (len(minilm_lib.HELD_OUT_SENTENCES), 384)
    cmp = compare(original, loaded)
    assert cmp.ok, f"max abs {cmp.max_abs:.3g}"


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_records_versions_passes_inputs_and_checksums(encoder_artifact: Path) -> None:
    manifest = json.loads((encoder_artifact / "manifest.json").read_text())
    assert manifest["format_version"] == artifact.FORMAT_VERSION
    assert manifest["txcompile_version"] == txc.__version__
    assert manifest["torch_version"] == torch.__version__
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    assert (manifest["label"], manifest["model"], manifest["backend"]) == ("ref:encoder", "Encoder", "eager")
    assert [(i["name"], i["dtype"], i["dynamic"]) for i in manifest["inputs"]] == [
        ("input_ids", "int64", [0, 1]),
        ("attention_mask", "int64", [0, 1]),
    ]
    assert any("128" in r for r in manifest["range_constraints"].values())  # sequence bounded by the position table
    assert manifest["call"]["positional"] == ["input_ids", "attention_mask"]
    assert [p["spec"] for p in manifest["passes"]] == PASSES
    for entry in manifest["passes"]:
        assert entry["contract"] == "exact" and entry["modified"] is True
        assert entry["error"]["ok"] is True and entry["error"]["max_abs"] <= 1e-5
        assert {"stats", "seconds", "ops_added", "ops_removed", "notes", "name"} <= set(entry)
    assert manifest["capture_error"]["ok"] is True
    assert manifest["pytree_types"] == []  # a plain tensor output needs no extra import to load
    files = manifest["files"]
    expected_files = {"program.pt2", "weights.safetensors", "report.txt", "report.html", "example_inputs.pt"}
    assert set(files) == expected_files == set(_siblings(encoder_artifact)) - {"manifest.json"}
    for name, entry in files.items():
        data = (encoder_artifact / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_reports_and_example_inputs_are_written(encoder: Any, encoder_artifact: Path) -> None:
    model, inputs, opt = encoder
    assert "fuse_qkv" in (encoder_artifact / "report.txt").read_text()
    page = (encoder_artifact / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "fuse_qkv" in page
    examples = torch.load(encoder_artifact / "example_inputs.pt", weights_only=True)
    assert list(examples) == ["input_ids", "attention_mask"] and torch.equal(examples["input_ids"], inputs[0])


def test_given_reports_are_written_verbatim(encoder: Any, tmp_path: Path) -> None:
    _, _, opt = encoder
    path = artifact.save(opt, tmp_path / "out", label="x", report_text="hello <b>", report_html="<html>mine</html>")
    assert (path / "report.txt").read_text() == "hello <b>\n"
    assert (path / "report.html").read_text() == "<html>mine</html>"
    assert not (path / "example_inputs.pt").exists()  # traced on synthesized inputs: nothing real to keep


# ------------------------------------------------------------------------------------------------ loading


def test_loaded_program_is_called_like_the_original(encoder: Any, encoder_artifact: Path) -> None:
    model, _, opt = encoder
    program = artifact.load(encoder_artifact)
    ids, mask = model.example_inputs(batch=1, seq=9)
    assert compare(model(ids, mask), program(ids, mask)).ok
    assert compare(model(ids, mask), program(input_ids=ids, attention_mask=mask)).ok
    assert isinstance(program.graph_module, fx.GraphModule)
    assert program.path == encoder_artifact and program.manifest["label"] == "ref:encoder"
    assert program.tokenizer is None
    assert "fuse_qkv" in repr(program)


def test_tokenizer_is_saved_and_loaded_lazily(encoder: Any, minilm: Any, tmp_path: Path) -> None:
    _, inputs, opt = encoder
    _, tokenizer = minilm
    path = artifact.save(opt, tmp_path / "out", label="x", tokenizer=tokenizer, example_inputs=inputs)
    assert any(name.startswith("tokenizer/") for name in json.loads((path / "manifest.json").read_text())["files"])
    loaded = artifact.load(path).tokenizer
    assert loaded("a cat")["input_ids"] == tokenizer("a cat")["input_ids"]


def _rewrite_manifest(path: Path, **changes: Any) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


LOAD_ERRORS = {
    "missing directory": (lambda p: shutil.rmtree(p), "does not exist"),
    "a file, not a directory": (lambda p: (shutil.rmtree(p), p.write_text("x")), "not a directory"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    "manifest without files": (lambda p: (p / "manifest.json").write_text("[1, 2]"), "not a txcompile manifest"),
    "newer format": (lambda p: _rewrite_manifest(p, format_version=999), r"format 999\).*convert the model again"),
    "older format": (lambda p: _rewrite_manifest(p, format_version=0), r"format 0\).*convert the model again"),
    "missing file": (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    "output type's module missing": (
        lambda p: _rewrite_manifest(p, pytree_types=["no_such_package.outputs:Out"]),
        "needs the module no_such_package.outputs",
    ),
    "corrupt program": (lambda p: _flip_byte(p / "program.pt2"), "program.pt2 is corrupt"),
    "truncated program": (lambda p: _truncate(p / "program.pt2"), "program.pt2 is corrupt"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_name_the_path_and_what_to_do(case: str, encoder_artifact: Path, tmp_path: Path) -> None:
    damage, message = LOAD_ERRORS[case]
    broken = _copy(encoder_artifact, tmp_path / "broken")
    damage(broken)
    with pytest.raises(ArtifactError, match=message) as info:
        artifact.load(broken)
    assert str(broken) in str(info.value)


def test_size_check_still_runs_without_verify(encoder_artifact: Path, tmp_path: Path) -> None:
    broken = _copy(encoder_artifact, tmp_path / "broken")
    _truncate(broken / "program.pt2")
    with pytest.raises(ArtifactError, match="corrupt"):
        artifact.load(broken, verify=False)


# ------------------------------------------------------------------------------------------------ atomic writes


def _boom(exc: BaseException) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc

    return fail


FAILURES = {
    "weights write fails": (safetensors.torch, "save_file", RuntimeError("disk full")),
    "Ctrl-C while saving the program": (torch.export, "save", KeyboardInterrupt()),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_save_leaves_nothing(case: str, encoder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, name, exc = FAILURES[case]
    _, inputs, opt = encoder
    monkeypatch.setattr(module, name, _boom(exc))
    with pytest.raises(type(exc)):
        artifact.save(opt, tmp_path / "new_parent" / "out", label="x", example_inputs=inputs)
    assert _siblings(tmp_path) == []  # no OUT, no temporary sibling, not even the parent it created


def test_existing_output_is_refused_without_force_and_replaced_with_it(encoder: Any, tmp_path: Path) -> None:
    _, inputs, opt = encoder
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ArtifactError, match="already exists.*force=True.*--force"):
        artifact.save(opt, out, label="x", example_inputs=inputs)
    assert _siblings(out) == ["stale.txt"]
    artifact.save(opt, out, label="x", example_inputs=inputs, force=True)
    assert "stale.txt" not in _siblings(out) and "manifest.json" in _siblings(out)
    assert _siblings(tmp_path) == ["out"]


def test_a_failed_forced_save_keeps_the_old_artifact(
    encoder: Any, encoder_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, inputs, opt = encoder
    out = _copy(encoder_artifact, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _boom(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        artifact.save(opt, out, label="x", example_inputs=inputs, force=True)
    assert (out / "manifest.json").read_bytes() == before
    assert _siblings(tmp_path) == ["out"]


def test_bad_requests_are_refused_before_writing(encoder: Any, tmp_path: Path) -> None:
    _, _, opt = encoder
    with pytest.raises(ArtifactError, match="unknown artifact format"):
        artifact.save(opt, tmp_path / "out", label="x", formats=("pt2", "tflite"))
    with pytest.raises(ArtifactError, match="no capture information"):
        artifact.save(torch.nn.Linear(2, 2), tmp_path / "out", label="x")
    assert _siblings(tmp_path) == []


# ------------------------------------------------------------------------------------------------ ONNX


@pytest.mark.slow
def test_minilm_onnx_passes_the_checker_and_matches_onnxruntime(minilm: Any, minilm_opt: Any, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, tokenizer = minilm
    held_out = minilm_lib.example_inputs(tokenizer, minilm_lib.HELD_OUT_SENTENCES[:6])
    path = artifact.save(
        minilm_opt, tmp_path / "minilm", label="all-MiniLM-L6-v2", formats=("pt2", "onnx"), reference=model,
        example_inputs=minilm_lib.example_inputs(tokenizer), check_inputs=held_out,
    )  # fmt: skip
    check = json.loads((path / "manifest.json").read_text())["onnx"]
    assert check["max_abs"] <= 1e-4 and check["opset"] >= 17 and check["onnxruntime_version"] == ort.__version__
    assert all(isinstance(d, str) for d in check["inputs"][0]["shape"])  # batch and sequence stay symbolic
    onnx.checker.check_model(str(path / "model.onnx"))
    # Another batch and length than the check inputs, run here independently of save's own check.
    other = minilm_lib.example_inputs(tokenizer, minilm_lib.HELD_OUT_SENTENCES[6:9])
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden, *_) = session.run(None, {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        expected = model(**other).last_hidden_state
    assert float((torch.from_numpy(hidden) - expected).abs().max()) <= 1e-4


@pytest.mark.slow
def test_onnx_disagreeing_with_the_reference_is_refused_and_nothing_written(encoder: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, inputs, opt = encoder
    other_model = reference.build("encoder", seed=1)  # different weights: the check must catch it
    with pytest.raises(ArtifactError, match="max abs error"):
        artifact.save(opt, tmp_path / "out", label="x", formats=("pt2", "onnx"), reference=other_model,
                      example_inputs=inputs)  # fmt: skip
    assert _siblings(tmp_path) == []
