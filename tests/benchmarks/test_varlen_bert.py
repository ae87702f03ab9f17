"""The varlen BERT benchmark runs end to end (--quick) and reports every setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_compares_unpad_with_padded_eager(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "varlen_bert.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (pt,) = json.loads((tmp_path / "varlen_bert.json").read_text())["points"]
    rows = {r["setting"]: r for r in pt["rows"]}
    assert rows["eager padded"]["speedup"] == 1.0 and rows["txcompile eager + unpad"]["speedup"] > 0
    assert rows["txcompile triton + unpad"]["speedup"] is None  # never estimated
    assert pt["max_abs_err_real_tokens"] < 1e-4 and 0 < pt["real_fraction"] <= 1
