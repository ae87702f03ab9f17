"""The Triton backend end to end: which groups it claims, that the lowered program computes what the eager one does
(here under TRITON_INTERPRET=1, on a GPU for real), the fallbacks it lists, strict mode, and artifacts."""

from __future__ import annotations

import pytest
import torch

import txcompile as txc
from txcompile.backends import get_backend
from txcompile.backends.triton import lowering, ops
from txcompile.backends.triton.kernels import linear_epilogue
from txcompile.models import reference
from txcompile.testing import assert_roundtrip, count_ops
from txcompile.verify import compare, valid_tokens_only


def _kernels(opt) -> dict[str, int]:
    return {k.removeprefix("txc_triton."): v for k, v in count_ops(opt.program).items() if k.startswith("txc_triton.")}


def _assert_same(expected, actual, scale: float = 4.0) -> None:
    result = compare(expected, actual, scale=scale)
    assert result.ok, result


# (model kind, config overrides, passes, kernels the lowering must emit for depth-2 models)
CASES = {
    # ViT: the first norm reads x + pos_emb (a broadcast add), the last one the CLS token: both plain LayerNorm.
    "vit pre-LN gelu": ("vit", {}, [], {"add_layer_norm": 3, "layer_norm": 2, "linear_act": 2, "attention": 2}),
    "encoder post-LN relu, padded": (
        "encoder", {"norm": "post", "activation": "relu"}, [], {"linear_act": 2, "attention": 2, "add_layer_norm": 5},
    ),
    # RMSNorm written out as pow/mean/rsqrt/mul is recognised as one norm.
    "gpt rmsnorm swiglu causal": (
        "gpt", {"norm_kind": "rmsnorm", "activation": "swiglu"}, [],
        {"linear_swiglu": 2, "attention": 2, "add_rms_norm": 4, "rms_norm": 1},
    ),
    # fuse_qkv:gated_mlp=true writes one [gate; up] linear and a split: the fused SwiGLU kernel takes it whole.
    "gpt swiglu after fuse_qkv": (
        "gpt", {"activation": "swiglu"}, ["fuse_qkv:gated_mlp=true"], {"linear_swiglu_fused": 2, "attention": 2},
    ),
    "gpt eager attention": ("gpt", {"attention": "eager"}, [], {"softmax": 2, "linear_act": 2, "add_layer_norm": 4}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_reference_models_lower_to_the_expected_kernels_and_match_eager(case):
    kind, overrides, passes, expected_kernels = CASES[case]
    model = reference.build(kind, **overrides)
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["cleanup", *passes], example_inputs=inputs, backend="triton")
    kernels = _kernels(opt)
    for name, n in expected_kernels.items():
        assert kernels.get(name, 0) == n, (name, kernels)
    assert opt.report.kernels == kernels
    assert opt.report.lowering_error is not None and opt.report.lowering_error["ok"]
    with torch.no_grad():
        _assert_same(model(*inputs), opt(*inputs))
    # The unlowered program is left as the passes wrote it: kernels live only in `opt.program`.
    assert not any(k.startswith("txc_triton.") for k in count_ops(opt.graph_module))
    # Every node still in ATen is listed once, with a reason.
    assert all(f.reason for f in opt.report.fallbacks)
    names = [f.node for f in opt.report.fallbacks]
    assert len(names) == len(set(names))
    assert "run as plain ATen" in str(opt.report)


def test_other_batch_and_sequence_sizes_run_through_the_kernels():
    model = reference.build("encoder")
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton")
    other = model.example_inputs(batch=3, seq=7, seed=4)
    with torch.no_grad():
        _assert_same(model(*other), opt(*other))


def test_supports_answers_for_every_node_with_a_reason_for_what_stays_aten():
    model = reference.build("vit")
    gm = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs()).graph_module
    backend = get_backend("triton")
    answers = {n.name: backend.supports(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert all(v is True or (isinstance(v, str) and v) for v in answers.values())
    by_op = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    plain = [k for k, v in by_op.items() if v == "aten.linear.default" and answers[k] is not True]
    assert plain and all("gemm=triton" in answers[k] for k in plain)  # q/k/v/out projections: nothing to fuse
    assert all(answers[k] is True for k, v in by_op.items() if v in ("aten.layer_norm.default", "aten.gelu.default"))
    # With gemm=triton the plain linears become linear_act(..., "none") kernels too.
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton:gemm=triton")
    assert not any(f.op == "aten.linear" for f in opt.report.fallbacks)
    assert _kernels(opt)["linear_act"] == len([v for v in by_op.values() if v == "aten.linear.default"])


def test_strict_raises_naming_the_nodes_it_cannot_lower():
    model = reference.build("vit")
    with pytest.raises(txc.BackendError, match=r"strict\) cannot lower \d+ node\(s\): .*gemm=triton"):
        txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton", strict=True)


def test_without_a_launchable_device_every_compute_node_falls_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(ops, "_interpreting", lambda: False)  # CPU tensors, no interpreter: nothing can launch
    model = reference.build("vit")
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton")
    assert opt.report.kernels == {} and _kernels(opt) == {}
    assert any("need CUDA" in f.reason for f in opt.report.fallbacks)
    with pytest.raises(txc.BackendError, match="need CUDA"):
        txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton", strict=True)


def test_a_wrong_kernel_is_caught_by_the_lowering_check(monkeypatch):
    real = linear_epilogue.linear_act
    monkeypatch.setattr(linear_epilogue, "linear_act", lambda *a, **k: real(*a, **k) * 1.01)
    model = reference.build("vit")
    with pytest.raises(txc.BackendError, match="disagrees with the unlowered one"):
        txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton")


def test_bad_backend_options_are_spec_errors():
    with pytest.raises(txc.SpecError, match="gemm='cutlass': expected one of aten, triton"):
        get_backend("triton:gemm=cutlass")
    with pytest.raises(txc.SpecError, match="tolerance_scale"):
        get_backend("triton:tolerance_scale=0.5")
    assert isinstance(get_backend("triton:gemm=triton"), lowering.TritonBackend)


def test_lowered_program_round_trips_through_the_artifact_at_other_sizes(tmp_path):
    model = reference.build("encoder", activation="swiglu")
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton")
    assert _kernels(opt)["linear_swiglu"] == 2
    assert_roundtrip(opt, model.example_inputs(batch=3, seq=9, seed=1), tmp_dir=tmp_path, atol_scale=4.0)
    with pytest.raises(txc.ArtifactError, match="--backend eager for --format onnx"):
        txc.artifact.save(
            opt, tmp_path / "onnx", label="x", formats=("pt2", "onnx"), example_inputs=model.example_inputs()
        )
    assert not (tmp_path / "onnx").exists()


def test_minilm_end_to_end_with_unpad_claims_varlen_attention(minilm):
    model, tok = minilm
    texts = ["A short one.", "Padding-free execution packs the real tokens of every sequence together."]
    inputs = dict(tok(texts, padding=True, return_tensors="pt"))
    opt = txc.optimize(model, ["cleanup", "unpad"], example_inputs=inputs, backend="triton")
    kernels = _kernels(opt)
    assert kernels["varlen_attention"] == 6 and kernels["linear_act"] == 6, kernels
    assert kernels.get("add_layer_norm", 0) == 12, kernels
    with torch.no_grad():
        expected = valid_tokens_only(model(**inputs), opt.program, ((), inputs))
        actual = valid_tokens_only(opt(**inputs), opt.program, ((), inputs))
    _assert_same(expected, actual, scale=10.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_reference_models(dtype):
    for kind, overrides in (("vit", {}), ("gpt", {"activation": "swiglu", "norm_kind": "rmsnorm"})):
        model = reference.build(kind, **overrides).to("cuda", dtype)
        inputs = tuple(t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in model.example_inputs())
        # The lowering checks itself against the eager program at the dtype tolerance (widened for fp16 depth).
        opt = txc.optimize(model, ["cleanup"], example_inputs=inputs, backend="triton:tolerance_scale=8")
        assert opt.report.kernels and opt.report.lowering_error["ok"]


def test_cli_convert_with_the_triton_backend_saves_the_kernel_program_and_runs_it(tmp_path):
    import json
    import subprocess
    import sys

    def txcompile(*args: str) -> subprocess.CompletedProcess[str]:
        # The child inherits TRITON_INTERPRET=1 from this directory's conftest: the kernels run interpreted.
        return subprocess.run([sys.executable, "-m", "txcompile", *args], capture_output=True, text=True, timeout=600)

    out = tmp_path / "vit-triton"
    done = txcompile("convert", "ref:vit", "--passes", "cleanup", "--backend", "triton", "-o", str(out))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "triton"
    report = (out / "report.txt").read_text()
    assert "kernels: " in report and "attention x2" in report and "run as plain ATen" in report
    program = torch.export.load(out / "program.pt2")
    assert any(str(n.target).startswith("txc_triton.") for n in program.graph.nodes)
    images = tmp_path / "images.pt"
    torch.save(reference.build("vit").example_inputs(batch=3)[0], images)
    ran = txcompile("run", str(out), "--input", str(images), "-o", str(tmp_path / "logits.pt"))
    assert ran.returncode == 0, ran.stderr
    (logits,) = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = reference.build("vit")(torch.load(images))
    _assert_same(expected, logits)


def test_int8_linears_are_left_to_their_own_kernel_choice_and_say_so():
    model = reference.build("vit")
    opt = txc.optimize(
        model, ["cleanup", "quantize:measure=false"], example_inputs=model.example_inputs(), backend="triton"
    )
    int8 = [f for f in opt.report.fallbacks if f.op == "txc.int8_linear"]
    assert int8 and all("CUDA only" in f.reason for f in int8)  # on CUDA they run the Triton int8 GEMM themselves
    assert opt.report.kernels.get("layer_norm", 0) + opt.report.kernels.get("add_layer_norm", 0) >= 1


def test_verify_false_skips_the_lowering_check_too(monkeypatch):
    real = linear_epilogue.linear_act
    monkeypatch.setattr(linear_epilogue, "linear_act", lambda *a, **k: real(*a, **k) * 1.01)
    model = reference.build("vit")
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="triton", verify=False)
    assert opt.report.lowering_error is None and opt.report.kernels["linear_act"] == 2
