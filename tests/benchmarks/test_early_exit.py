"""The early-exit benchmark runs end to end (--quick) and writes its tables, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_setting(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "early_exit.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "early_exit.json").read_text())
    assert (tmp_path / "early_exit.png").stat().st_size > 1000
    rows = {r["setting"]: r for r in result["digits"]["rows"]}
    assert rows["full model"]["speedup"] == 1.0 and rows["full model"]["agreement"] == 1.0
    assert rows["full model"]["top1"] > 90  # the cached model is trained
    for r in result["digits"]["rows"]:
        assert sum(r["exits"]) == result["digits"]["images"] and 0 <= r["agreement"] <= 1 and r["speedup"] > 0
    learned = rows["early_exit:heads=learned,target_agreement=0.99"]
    assert learned["changed"] and learned["expected"] > 1.0  # rows do leave early
    for r in result["minilm"]["rows"]:
        assert -1 <= r["cosine_min"] <= r["cosine_mean"] <= 1 + 1e-6
    assert "all-MiniLM-L6-v2" in done.stdout and "digits ViT" in done.stdout
