"""Tensor- and pipeline-parallel programs equal the single-process model (gloo, 2 and 4 processes)."""

from __future__ import annotations

import json

import pytest

from .conftest import torchrun, worker

pytestmark = pytest.mark.distributed

MODELS = ("ref_gpt", "gpt2_lm", "llama", "bert")


def _launch(tmp_path, nproc, tp, pp, *flags):
    proc = torchrun(nproc, worker(), str(tmp_path), str(tp), str(pp), *flags, *MODELS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert all(set(r) == set(MODELS) for r in ranks)
    return ranks


def _check_outputs(ranks):
    for rank, results in enumerate(ranks):
        for name, r in results.items():
            assert r["type"] and r["leaves"], (rank, name, r)
            assert r["max_abs"] <= 1e-5 * max(1.0, r["scale"]), (rank, name, r)


def test_tensor_parallel_2_outputs_and_training_gradients(tmp_path):
    ranks = _launch(tmp_path, 2, 2, 1, "--grad")
    _check_outputs(ranks)
    for rank, results in enumerate(ranks):
        for name, r in results.items():
            # Every parameter the rank holds gets the gradient of its slice of the single-process model's parameter.
            assert r["grad_params"] > 10, (rank, name, r)
            assert r["grad_max_abs"] <= 1e-5 * max(1.0, r["grad_scale"]), (rank, name, r)


def test_pipeline_2_stages(tmp_path):
    ranks = _launch(tmp_path, 2, 1, 2)
    _check_outputs(ranks)
    for name in MODELS:
        # Only the residual stream crosses the cut: masks and position tables are recomputed by stage 1.
        assert len(ranks[0][name]["sends"]) == 1 and ranks[0][name]["receives"] == []
        assert ranks[1][name]["receives"] == ranks[0][name]["sends"] and ranks[1][name]["sends"] == []


def test_tensor_2_by_pipeline_2(tmp_path):
    ranks = _launch(tmp_path, 4, 2, 2)
    _check_outputs(ranks)
    for name in MODELS:
        assert ranks[0][name]["sends"] == ranks[1][name]["sends"] == ranks[2][name]["receives"]
