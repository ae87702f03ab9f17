"""The LR-sweep experiment runs end to end (--quick) and writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_sweep_writes_every_number(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stability_lr_sweep.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert (tmp_path / "lr_sweep.png").stat().st_size > 1000
    variants = ("baseline", "sigma_reparam", "qk_norm")
    assert set(result["summary"]) == set(variants)
    for variant in variants:
        summary = result["summary"][variant]
        assert summary["lr_sensitivity"] >= 0 and summary["best_loss"] <= summary["loss_init"]
    assert len(result["runs"]) == len(variants) * len(result["args"]["lrs"])
    for run in result["runs"]:  # every run trained and was measured
        assert run["final_val_loss"] is not None and run["attention"]["min_entropy"] is not None, run["variant"]
    assert "LR sensitivity" in done.stdout or "sensitivity" in done.stdout
