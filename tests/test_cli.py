"""The txcompile command, run as users run it: a subprocess per call.

Every error case must exit with status 2, print exactly one line on stderr naming what was wrong, show no traceback,
and write nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def txcompile(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txcompile", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("txcompile: error:") and fragment in lines[-1], result.stderr
    assert sum(line.startswith("txcompile: error:") for line in lines) == 1


BAD_MODEL = textwrap.dedent(
    """
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not capturable
                return x * 2
            return x

    def factory():
        return Branchy(), (torch.randn(2, 3),)
    """
)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "gpt"
    result = txcompile("convert", "ref:gpt", "--passes", "cleanup,fuse_qkv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["convert", "no_such_model", "-o", "{out}"], "unknown model 'no_such_model'"),
        (["convert", "ref:gpt", "--passes", "nope", "-o", "{out}"], "unknown pass 'nope'"),
        (["convert", "ref:gpt", "--passes", "fuse_qkv:gated=1", "-o", "{out}"], "has no option 'gated'"),
        (["convert", "ref:gpt", "--passes", "cleanup:fold=maybe", "-o", "{out}"], "bad value fold='maybe'"),
        (["convert", "ref:gpt", "--backend", "tpu", "-o", "{out}"], "unknown backend 'tpu'"),
        (["convert", "ref:gpt", "--calib", "{tmp}/missing.jsonl", "-o", "{out}"], "does not exist"),
        (["convert", "{tmp}/bad_model.py:factory", "-o", "{out}"], "could not capture Branchy"),
        (["convert", "{tmp}/bad_model.py:nothing", "-o", "{out}"], "has no function 'nothing'"),
        (["inspect", "hf:no_such_arch"], "unknown Hugging Face zoo model"),
        (["run", "{tmp}/missing_artifact", "--input", "{tmp}/in.jsonl"], "missing_artifact"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path: Path, args: list[str], fragment: str) -> None:
    (tmp_path / "bad_model.py").write_text(BAD_MODEL)
    (tmp_path / "in.jsonl").write_text('"hello"\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    result = txcompile(*[a.format(out=out, tmp=tmp_path) for a in args])
    assert_clean_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary leftovers


def test_existing_output_is_refused_without_force(small_artifact: Path) -> None:
    stamp = (small_artifact / "manifest.json").stat().st_mtime_ns
    result = txcompile("convert", "ref:gpt", "-o", str(small_artifact))
    assert_clean_error(result, "already exists")
    assert (small_artifact / "manifest.json").stat().st_mtime_ns == stamp


def test_incompatible_and_corrupt_artifacts(small_artifact: Path, tmp_path: Path) -> None:
    import shutil

    inputs = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 100, (2, 9)), inputs)
    future = tmp_path / "future"
    shutil.copytree(small_artifact, future)
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 999
    (future / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(txcompile("run", str(future), "--input", str(inputs)), "convert the model again")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(small_artifact, corrupt)
    (corrupt / "manifest.json").write_text("{not json")
    assert_clean_error(txcompile("run", str(corrupt), "--input", str(inputs)), "manifest")

    bad_input = tmp_path / "bad.pt"
    bad_input.write_bytes(b"definitely not a torch file")
    assert_clean_error(txcompile("run", str(small_artifact), "--input", str(bad_input)), "not a readable torch file")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = txcompile("--debug", "convert", "ref:gpt", "--passes", "nope", "-o", str(tmp_path / "x"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_passes_lists_every_pass_as_table_and_json() -> None:
    table = txcompile("passes")
    assert table.returncode == 0 and "fuse_qkv" in table.stdout and "exact" in table.stdout
    data = json.loads(txcompile("passes", "--json").stdout)
    assert {p["name"] for p in data} >= {"cleanup", "fuse_qkv"}
    assert all({"name", "contract", "summary", "options"} <= set(p) for p in data)


def test_run_on_tensor_inputs(small_artifact: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "ids.npy"
    import numpy as np

    np.save(inputs, np.random.randint(0, 100, size=(3, 11)))
    result = txcompile("run", str(small_artifact), "--input", str(inputs), "-o", str(tmp_path / "out.pt"))
    assert result.returncode == 0, result.stderr
    (logits,) = torch.load(tmp_path / "out.pt")
    assert logits.shape[:2] == (3, 11)


def test_inspect_formats(tmp_path: Path) -> None:
    text = txcompile("inspect", "ref:encoder", "--passes", "cleanup,fuse_qkv")
    assert text.returncode == 0, text.stderr
    assert "fuse_qkv" in text.stdout
    html = tmp_path / "page.html"
    assert txcompile("inspect", "ref:encoder", "--format", "html", "-o", str(html)).returncode == 0
    assert 'id="anatomy"' in html.read_text()
    dot = tmp_path / "graph.dot"
    assert txcompile("inspect", "ref:vit", "--format", "dot", "-o", str(dot)).returncode == 0
    assert dot.read_text().lstrip().startswith(("digraph", "strict digraph"))


def test_convert_minilm_then_load_and_run_in_new_processes(tmp_path: Path) -> None:
    """Done-when of issue 3: the artifact reproduces the original's sentence embeddings on unseen sentences."""
    from txcompile.models import minilm

    out = tmp_path / "out"
    result = txcompile("convert", "minilm", "--passes", "cleanup,fuse_qkv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "fuse_qkv" in result.stdout and "speed" in result.stdout
    assert {"program.pt2", "weights.safetensors", "manifest.json", "report.html", "report.txt"} <= {
        p.name for p in out.iterdir()
    }
    model, tokenizer = minilm.load_minilm()
    sentences = list(minilm.HELD_OUT_SENTENCES)
    assert not set(sentences) & set(minilm.CALIBRATION_SENTENCES)
    expected = minilm.encode(model, tokenizer, sentences)

    script = textwrap.dedent(
        f"""
        import torch, txcompile as txc
        from txcompile.models import minilm
        program = txc.load({str(out)!r})
        emb = minilm.encode(program, program.tokenizer, {sentences!r})
        torch.save(emb, {str(tmp_path / 'emb_api.pt')!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    torch.testing.assert_close(torch.load(tmp_path / "emb_api.pt"), expected)

    lines = tmp_path / "held_out.jsonl"
    lines.write_text("\n".join(json.dumps(s) for s in sentences))
    result = txcompile("run", str(out), "--input", str(lines), "--pool", "mean", "-o", str(tmp_path / "emb.npy"))
    assert result.returncode == 0, result.stderr
    import numpy as np

    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "emb.npy")), expected)


def test_convert_early_exit_with_calibration_saves_thresholds_and_runs(tmp_path: Path) -> None:
    """The staged program and its calibrated threshold land in the artifact; `run` executes it in a new process."""
    from txcompile.models import reference

    images = reference.build("vit").example_inputs()[0]
    calib = tmp_path / "calib.pt"
    torch.save([torch.randn(16, *images.shape[1:]) for _ in range(3)], calib)
    out = tmp_path / "vit-ee"
    spec = "early_exit:heads=learned,train_steps=20,target_agreement=0.5"
    result = txcompile("convert", "ref:vit", "--passes", spec, "--calib", str(calib), "-o", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    ee = manifest["early_exit"]
    assert ee["criterion"] == "confidence" and ee["heads"] == "learned" and sum(ee["distribution"]) == ee["rows"]
    assert manifest["passes"][-1]["stats"]["threshold"] == (
        "inf" if ee["threshold"] == "inf" else f"{float(ee['threshold']):.4g}"
    )
    assert "early_exit: criterion=confidence" in (out / "report.txt").read_text()
    inputs = tmp_path / "images.pt"
    torch.save(torch.randn(5, *images.shape[1:]), inputs)
    ran = txcompile("run", str(out), "--input", str(inputs), "-o", str(tmp_path / "logits.pt"))
    assert ran.returncode == 0, ran.stderr
    (logits,) = torch.load(tmp_path / "logits.pt")
    assert logits.shape[0] == 5
