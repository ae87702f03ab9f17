"""`txcompile convert --backend distributed:...` + `torchrun -m txcompile.run`, the backend in one process, and the
launch errors (world size, missing or broken shards): clear, on every rank, without a hang."""

from __future__ import annotations

import json
import time

import pytest
import torch

import txcompile as txc
from txcompile import cli
from txcompile.backends.distributed import DistributedError, load
from txcompile.errors import SpecError
from txcompile.models import reference
from txcompile.sources import resolve_model

from .conftest import torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "gpt_tp2_pp2"
    code = cli.main(["convert", "ref:gpt", "--passes", "cleanup", "--backend", "distributed:tp=2,pp=2,microbatches=2",
                     "-o", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_convert_writes_plan_shards_and_launch(converted):
    files = {p.name for p in converted.iterdir()}
    assert {"program.pt2", "plan.json", "manifest.json", "report.txt"} <= files
    assert {f"rank{r:05d}.safetensors" for r in range(4)} <= files
    plan = json.loads((converted / "plan.json").read_text())
    assert (plan["tp"], plan["pp"], plan["world_size"]) == (2, 2, 4)
    assert [s["blocks"] for s in plan["stages"]] == [[0, 1], [1, 2]]
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["backend"] == "distributed" and "torchrun --nproc-per-node=4" in manifest["launch"]
    # The graph file holds no weights; each rank's file holds only its stage's tensors, split ones at 1/tp.
    assert (converted / "program.pt2").stat().st_size < 400_000
    import safetensors.torch

    r0 = safetensors.torch.load_file(str(converted / "rank00000.safetensors"))
    r2 = safetensors.torch.load_file(str(converted / "rank00002.safetensors"))
    assert not set(r0) & {k for k in r2 if ".1." in k or "blocks.1" in k and "blocks.0" not in k}
    full = reference.build("gpt").state_dict()
    q = next(k for k in r0 if k.endswith("attn.q.weight"))
    assert r0[q].shape[0] * 2 == full[q].shape[0]


def test_torchrun_runs_the_artifact_like_the_model(converted, tmp_path):
    outputs = tmp_path / "out.pt"
    proc = torchrun(4, "-m", "txcompile.run", str(converted), "--input", str(converted / "example_inputs.pt"),
                    "-o", str(outputs))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ran" in proc.stdout and proc.stdout.count("wrote") == 1  # rank 0 alone prints and writes
    got = torch.load(outputs)[0]
    source = resolve_model("ref:gpt")
    with torch.no_grad():
        want = source.model(*source.example_inputs) if isinstance(source.example_inputs, tuple) else source.model(
            source.example_inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_world_size_fails_fast_on_every_rank(converted):
    start = time.perf_counter()
    proc = torchrun(2, "-m", "txcompile.run", str(converted), "--input", str(converted / "example_inputs.pt"))
    assert proc.returncode != 0
    assert proc.stderr.count("was converted for 4 processes (tp=2 x pp=2) but this job has 2") == 2
    assert "--nproc-per-node=4" in proc.stderr
    assert time.perf_counter() - start < 120


def test_missing_shard_names_the_file(converted, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    (broken / "rank00003.safetensors").unlink()
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DistributedError, match=r"lacks the shard file\(s\) rank00003.safetensors"):
        load(broken)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="converted for 4 processes"):
        load(converted)


def test_a_rank_that_fails_to_load_fails_every_rank(converted, tmp_path):
    import shutil

    broken = tmp_path / "corrupt"
    shutil.copytree(converted, broken)
    shard = broken / "rank00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = b"\xff" * 8  # same size (the size check passes everywhere), unreadable header: only rank 1 fails
    shard.write_bytes(bytes(data))
    start = time.perf_counter()
    proc = torchrun(4, "-m", "txcompile.run", str(broken), "--input", str(broken / "example_inputs.pt"))
    assert proc.returncode != 0
    # Every rank reports the same failure, naming rank 1, instead of three ranks waiting on it.
    assert proc.stderr.count("failed on 1 of 4 ranks") == 4 and "rank 1:" in proc.stderr
    assert time.perf_counter() - start < 150


def test_backend_outside_torchrun_plans_and_runs_unpartitioned():
    model = reference.build("gpt")
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["cleanup"], example_inputs=inputs, backend="distributed:tp=2,pp=2")
    assert [f.op for f in opt.report.fallbacks] == ["distributed"]
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs) if isinstance(inputs, tuple) else opt(inputs), model(
            *inputs) if isinstance(inputs, tuple) else model(inputs))


def test_tp_that_does_not_divide_the_heads_is_refused_with_the_valid_choices():
    model = reference.build("gpt")
    with pytest.raises(SpecError, match=r"tp=3 does not divide the \d+ attention heads.*Valid tp for this model"):
        txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="distributed:tp=3")
