"""The quantization benchmark runs end to end (--quick) and writes its tables, JSON and plot with sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_scheme(tmp_path):
    json_path = tmp_path / "result" / "q.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quantize.py"), "--quick", "--out", str(tmp_path),
           "--json", str(json_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(json_path.read_text())
    assert (tmp_path / "quantize.png").stat().st_size > 1000
    assert result["machine"]["capability"] and result["machine"]["threads"] >= 1

    text = {r["setting"]: r for r in result["minilm"]}
    assert set(text) == {"fp32 eager", "txcompile fp32", "torch.ao dynamic int8", "w8a8 repquant", "w8"}
    base = text["fp32 eager"]
    assert base["speedup"] == 1.0 and base["weight_ratio"] == 1.0 and base["cosine_min"] > 0.99999
    assert text["txcompile fp32"]["cosine_min"] > 0.9999  # fuse_qkv is exact
    for name in ("w8a8 repquant", "w8"):
        row = text[name]
        assert 0.9 < row["cosine_min"] <= row["cosine_mean"] <= 1.0 + 1e-6, (name, row)
        assert row["layers"] == 24, (name, row["layers"])  # 6 blocks x (fused qkv, out, up, down)
        assert row["weight_ratio"] <= 0.3 and row["float_weight_bytes"] == base["float_weight_bytes"], (name, row)
    assert text["w8"]["cosine_min"] > text["w8a8 repquant"]["cosine_min"] - 0.01  # weight-only loses the least
    ao = text["torch.ao dynamic int8"]
    if "error" not in ao:  # PyTorch's own int8: reported, or the reason it is missing
        assert 0.8 < ao["cosine_min"] <= 1.0 + 1e-6 and ao["weight_ratio"] <= 0.3
    for row in result["minilm"]:
        if "error" not in row:
            assert row["latency_ms"] > 0 and row["speedup"] > 0, row

    dig = {r["setting"]: r for r in result["digits"]}
    assert set(dig) == {"fp32", "w8a8 repquant", "w8"}
    assert dig["fp32"]["top1"] > 90  # the cached model is trained
    for name in ("w8a8 repquant", "w8"):
        assert dig[name]["top1_drop"] <= 1.0, (name, dig[name])  # at most 3 of 359 images
        assert dig[name]["top1_drop"] == dig["fp32"]["top1"] - dig[name]["top1"]
        assert dig[name]["weight_ratio"] <= 0.3
    assert "all-MiniLM-L6-v2" in done.stdout and "digits ViT" in done.stdout and "w8a8 repquant" in done.stdout
