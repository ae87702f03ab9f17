"""The token-reduction benchmark runs end to end (--quick) and writes its tables, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_setting(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "token_reduction.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "token_reduction.json").read_text())
    assert (tmp_path / "token_reduction.png").stat().st_size > 1000
    vit = {r["setting"]: r for r in result["vit"]}
    assert vit["eager (unmodified)"]["speedup"] == 1.0
    assert vit["token_merge:r=0"]["flops_removed"] == 0.0  # the identity removes nothing
    assert 0 < vit["token_merge:r=4"]["flops_removed"] < vit["token_merge:r=8"]["flops_removed"]
    assert all(r["images_per_s"] > 0 for r in result["vit"])
    for row in result["minilm"]:
        assert -1 <= row["cosine_min"] <= row["cosine_mean"] <= 1 and row["flops_removed"] > 0
    digits = {r["setting"]: r for r in result["digits"]}
    assert digits["unmodified"]["top1"] > 90  # the cached model is trained
    assert all(0 <= r["top1"] <= 100 for r in result["digits"])
    assert "all-MiniLM-L6-v2" in done.stdout and "ViT-B/16" in done.stdout
