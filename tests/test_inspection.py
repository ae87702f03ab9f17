"""`txcompile inspect` output: text tables, a self-contained HTML page rendered by headless Chromium, Graphviz DOT."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pydot
import pytest

import txcompile as txc
from txcompile import cost, inspection
from txcompile.models import minilm as minilm_loader
from txcompile.models import reference

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOT = shutil.which("dot")
TIMEOUT = 60


@pytest.fixture(scope="module")
def minilm_inspected(minilm):
    model, tokenizer = minilm
    inputs = minilm_loader.example_inputs(tokenizer)
    gm = txc.capture(model, inputs)
    return gm, inputs, inspection.build(gm, label="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def optimized():
    model = reference.build("encoder", norm="post")
    opt = txc.optimize(model, passes=["cleanup", "fuse_qkv"], example_inputs=model.example_inputs())
    return opt, inspection.build(opt.graph_module, label="encoder <post-LN> & fused", records=opt.report.records)


def test_build_minilm(minilm_inspected):
    gm, inputs, insp = minilm_inspected
    assert len(insp.blocks) == 6 and len(insp.costs) == 6
    assert insp.example == tuple(inputs["input_ids"].shape)
    assert insp.ops["aten.scaled_dot_product_attention"] == 6
    assert all(b["heads"] == 12 and b["width"] == 384 for b in insp.blocks)
    c = cost.block_costs(gm, txc.anatomy(gm))[0]
    assert insp.costs[0]["flops"] == str(c.flops)
    assert insp.costs[0]["flops_at"] == cost.evaluate(c.flops, *insp.example)
    assert sum(insp.costs[0]["shares"].values()) == insp.costs[0]["flops_at"]
    assert ("final norm", "none") in insp.parts  # post-LN: the last block ends in its own norm


def test_text_has_a_row_per_block(minilm_inspected):
    _, _, insp = minilm_inspected
    text = inspection.render_text(insp)
    for i in range(6):
        row = re.search(rf"^\s*{i}\s+encoder\.layer\.{i}\s+sdpa\s+12\s+separate\s+post\s+gelu\s+no\s+384\s+1,774,464",
                        text, re.M)  # fmt: skip
        assert row, text
    assert re.search(r"aten\.linear\s+37", text)
    assert "1596*B*T**2" in text  # the attention core's T^2 term, per block
    assert "Passes" not in text  # no records given


def test_pass_diff(optimized):
    opt, insp = optimized
    text = inspection.render_text(insp)
    assert re.search(r"fuse_qkv\s+exact\s+yes\s+\d+ ms\s+max abs", text), text
    assert "4 aten.linear" in text and "5 aten.dropout" in text
    page = inspection.render_html(insp)
    passes = re.search(r'<table id="passes">.*?</table>', page, re.S)
    assert passes and passes.group(0).count("<tr>") == 1 + len(opt.report.records)


def test_html_is_self_contained_and_escaped(optimized):
    _, insp = optimized
    page = inspection.render_html(insp)
    for table_id in ("anatomy", "ops", "cost", "passes"):
        assert f'id="{table_id}"' in page
    assert "&lt;post-LN&gt; &amp; fused" in page and "<post-LN>" not in page
    # Nothing to fetch and nothing to run: no scripts, links, images or URLs.
    assert not re.search(r"<script|<link|<img|src=|https?://", page)


def test_dot_is_valid_with_a_cluster_per_block(minilm_inspected):
    gm, _, _ = minilm_inspected
    anat = txc.anatomy(gm)
    text = inspection.render_dot(gm, anat)
    graphs = pydot.graph_from_dot_data(text)
    assert graphs and len(graphs) == 1
    graph = graphs[0]
    clusters = {s.get_name(): s for s in graph.get_subgraphs()}
    assert set(clusters) == {f"cluster_{i}" for i in range(6)}
    for i, block in enumerate(anat.blocks):
        names = {n.get_name() for n in clusters[f"cluster_{i}"].get_nodes()}
        assert f"n_{block.attention.core.name}" in names and f"n_{block.mlp.fc2.node.name}" in names
    ids = re.findall(r"^(\S+) \[label=", text, re.M)
    assert ids and all(re.fullmatch(r"n_[A-Za-z0-9_]+", i) for i in ids)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(ids) == len(calls) + 1 + sum(n.op == "placeholder" for n in gm.graph.nodes)  # + output
    if DOT is None:
        pytest.skip("Graphviz `dot` is not installed; DOT parsed with pydot only (apt-get install graphviz)")
    svg = subprocess.run([DOT, "-Tsvg"], input=text, capture_output=True, text=True, timeout=TIMEOUT)
    assert svg.returncode == 0, svg.stderr
    assert "<svg" in svg.stdout and "cluster_5" in svg.stdout


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium) to render the HTML page")
def test_html_renders_in_headless_chromium(minilm_inspected, tmp_path):
    _, _, insp = minilm_inspected
    page = tmp_path / "inspect.html"
    page.write_text(inspection.render_html(insp), encoding="utf-8")
    shot = tmp_path / "shot.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()], tmp_path / "profile")
    assert shot.is_file(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert struct.unpack(">II", data[16:24]) == (1280, 2000)  # IHDR width, height
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    table = re.search(r'<table id="anatomy">.*?</table>', dom.stdout, re.S)
    assert table, dom.stdout[:2000]
    body = table.group(0).split("<tbody>", 1)[1]
    assert body.count("<tr>") == 6
    for i in range(6):
        assert f"encoder.layer.{i}" in body
