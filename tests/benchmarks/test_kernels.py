"""The per-kernel microbenchmark runs end to end on a CPU (--quick) and reports every kernel, with the Triton column
marked as not measured rather than estimated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"add_layer_norm", "add_rms_norm", "softmax", "linear_act", "linear_swiglu", "linear_swiglu_fused",
           "attention", "varlen_attention", "int8_gemm"}  # fmt: skip


def test_quick_cpu_run_times_eager_and_never_the_triton_kernels(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--quick", "--no-compile", "--device", "cpu",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["device"].startswith("CPU")
    assert "triton" in result["machine"] and result["settings"]["device_type"] == "cpu"
    assert result["settings"]["torch.compile"] is None and result["args"]["no_compile"]
    rows = result["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        eager, compiled, triton = (r["impls"][name] for name in ("eager", "torch.compile", "triton"))
        assert r["status"] == "ok" and r["dtype"] == "fp32", r
        assert eager["ms"] > 0 and eager["speedup"] == 1.0 and eager["max_abs_err"] == 0.0
        assert eager["throughput"] is None  # GB/s and TFLOP/s are CUDA-only
        assert compiled["ms"] is None and compiled["note"] == "skipped (--no-compile)"
        assert triton["ms"] is None and triton["speedup"] is None  # never timed under the interpreter, never estimated
        assert triton["note"] == "not measured: needs a CUDA GPU"
        assert r["work"] > 0 and r["metric"] in ("GB/s", "TFLOP/s")
    (varlen,) = (r for r in rows if r["kernel"] == "varlen_attention")
    assert 0.2 < varlen["real_fraction"] < 1
    assert "not measured: needs a CUDA GPU" in done.stdout and "add_layer_norm" in done.stdout
    assert not list(tmp_path.glob(".kernels.json.*"))  # the atomic write left no temporary file behind


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/kernels.py imported in-process (it is a script, not a package module)."""
    import importlib.util

    # The script puts benchmarks/ on sys.path for its _common import: on a copy, restored after the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    fresh = "_common" not in sys.modules
    spec.loader.exec_module(module)
    yield module
    if fresh:
        sys.modules.pop("_common", None)


def test_correctness_check_passes_rounding_and_fails_wrong_results(bench):
    ref = torch.randn(64, 128).to(torch.bfloat16)
    one_ulp = (ref.float() * (1 + 2**-8)).to(torch.bfloat16)  # what a fused kernel's single rounding can change
    assert bench.compare(one_ulp, ref, "bf16")[1]
    wrong = ref.clone()
    wrong[3, 5] += 1.0
    err, ok = bench.compare((ref, wrong), (ref, ref), "bf16")  # add+norm style tuples: every output is checked
    assert not ok and err >= 0.99
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not bench.compare(nan, ref, "bf16")[1]
    assert bench.compare(ref[:, :64], ref, "bf16") == (float("inf"), False)
