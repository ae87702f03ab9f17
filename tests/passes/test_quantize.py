"""quantize: exact reparameterization on every zoo architecture, real int8 programs on MiniLM and the digits ViT,
outliers, folding, options, the report, and artifacts that run in a fresh process."""

from __future__ import annotations

import warnings

import pytest
import torch

import txcompile as txc
from txcompile.models import digits, hf_zoo, reference
from txcompile.models import minilm as minilm_lib
from txcompile.testing import assert_roundtrip, count_ops


def _record(opt):
    return opt.report.records[-1]


def _calib(name, n=2):
    return [hf_zoo.make_inputs(name, seed=s) for s in range(1, n + 1)]


@pytest.mark.parametrize("name", hf_zoo.names())
def test_reparameterization_alone_is_exact_on_every_zoo_architecture(name):
    model, inputs = hf_zoo.build(name)
    opt = txc.optimize(model, ["quantize:scheme=none"], example_inputs=inputs, calibration_data=_calib(name))
    record = _record(opt)
    assert record.contract == "exact" and record.modified and record.error["ok"]
    assert record.stats["reparameterized"] > 0
    assert float(record.stats["reparam_max_abs"]) <= 1e-5


@pytest.fixture(scope="module")
def minilm_calib(minilm):
    _, tok = minilm
    sents = minilm_lib.CALIBRATION_SENTENCES
    return [minilm_lib.example_inputs(tok, list(sents[i : i + 8])) for i in range(0, len(sents), 8)]


@pytest.fixture(scope="module")
def minilm_w8a8(minilm, minilm_calib):
    model, tok = minilm
    inputs = minilm_lib.example_inputs(tok)
    return txc.optimize(model, ["fuse_qkv", "quantize:measure=false"], example_inputs=inputs,
                        calibration_data=minilm_calib)  # fmt: skip


def _held_out_cosine(model, tok, opt):
    held = list(minilm_lib.HELD_OUT_SENTENCES)
    ref = minilm_lib.encode(model, tok, held)
    return (minilm_lib.encode(opt, tok, held) * ref).sum(1)


def test_minilm_w8a8_runs_integer_linears_and_keeps_its_embeddings(minilm, minilm_w8a8):
    model, tok = minilm
    ops = count_ops(minilm_w8a8.graph_module)
    # Every block linear is an int8 GEMM (q/k/v fused: 4 per block), GELU in their epilogues; the pooler stays float.
    assert ops["txc.int8_linear"] == 24 and ops["txc.quantize_act"] == 24
    assert ops["aten.linear"] == 1 and "aten.gelu" not in ops
    cos = _held_out_cosine(model, tok, minilm_w8a8)
    assert float(cos.mean()) >= 0.99 and float(cos.min()) >= 0.98
    layers = minilm_w8a8.report.quant["layers"]
    assert len(layers) == 24 and all(0 < r["out_err"] < 0.1 and r["act_bits"] == 8 for r in layers)
    assert sum(r["activation"] == "gelu" for r in layers) == 6


def test_minilm_weight_only_int8_is_under_three_tenths_of_the_bytes(minilm, minilm_calib):
    model, tok = minilm
    opt = txc.optimize(model, ["quantize:scheme=w8,measure=false"], example_inputs=minilm_lib.example_inputs(tok),
                       calibration_data=minilm_calib)  # fmt: skip
    layers = opt.report.quant["layers"]
    ratio = sum(r["weight_bytes"] for r in layers) / sum(r["float_weight_bytes"] for r in layers)
    assert ratio <= 0.3
    assert count_ops(opt.graph_module)["txc.weight_only_linear"] == 36
    assert float(_held_out_cosine(model, tok, opt).min()) >= 0.999


def test_digits_w8a8_drops_at_most_half_a_point(tmp_path_factory):
    model = digits.load_or_train(tmp_path_factory.mktemp("digits"), settings=digits.TrainSettings(epochs=4))
    images, labels = digits.load_data("test")
    train, _ = digits.load_data("train")
    base = digits.accuracy(model, images, labels)
    calib = [(train[i : i + 64],) for i in range(0, 256, 64)]
    for spec, budget in (("quantize:measure=false", 0.5), ("quantize:scheme=w4,group_size=32,measure=false", 5.0)):
        opt = txc.optimize(model, [spec], example_inputs=digits.example_inputs(), calibration_data=calib)
        assert base - digits.accuracy(opt, images, labels) <= budget, spec
    assert _record(opt).stats["quantized"] == 6 * len(model.blocks)  # q, k, v, out, up, down


def test_pre_ln_norms_absorb_the_reparameterization():
    model = reference.build("vit")
    inputs = model.example_inputs()
    opt = txc.optimize(model, ["quantize:scheme=none"], example_inputs=inputs)
    stats = _record(opt).stats
    assert stats["folded_into_norm"] == 2 * len(model.blocks) and _record(opt).error["ok"]
    q = txc.optimize(model, ["quantize:measure=false,min_cosine=0.9"], example_inputs=inputs)
    quantizers = [n for n in q.graph_module.graph.nodes if n.target is torch.ops.txc.quantize_act.default]
    folded = [n for n in quantizers if n.args[2] is None]  # no per-channel affine left in the quantizer
    assert len(folded) >= 2 * len(model.blocks)


def _bert_with_outlier_channel():
    model, inputs = hf_zoo.build("bert")
    with torch.no_grad():  # one hidden channel 40x larger than the rest, as in trained BERTs' outlier dims
        model.embeddings.LayerNorm.weight[3] = 40.0
    return model, inputs


def _error(model, inputs, opt):
    """Relative L2 error of the last hidden state."""
    with torch.no_grad():
        a, b = model(**inputs).last_hidden_state, opt(**inputs).last_hidden_state
    return float((a - b).norm() / a.norm())


def test_outlier_columns_stay_in_floating_point():
    model, inputs = _bert_with_outlier_channel()
    calib = _calib("bert", 3)
    rtn = txc.optimize(model, ["quantize:method=rtn,measure=false,min_cosine=0"], example_inputs=inputs,
                       calibration_data=calib)  # fmt: skip
    kept = txc.optimize(model, ["quantize:method=rtn,outliers=true,measure=false,min_cosine=0"], example_inputs=inputs,
                        calibration_data=calib)  # fmt: skip
    assert _record(kept).stats["outlier_columns"] >= 1 and "aten.index_select" in count_ops(kept.graph_module)
    assert _error(model, inputs, kept) < 0.7 * _error(model, inputs, rtn)


def test_reparameterization_beats_naive_rounding_on_outlier_channels():
    model, inputs = _bert_with_outlier_channel()
    calib = _calib("bert", 3)
    specs = ["quantize:method=rtn,measure=false,min_cosine=0", "quantize:measure=false,min_cosine=0"]
    rtn, rep = (txc.optimize(model, [s], example_inputs=inputs, calibration_data=calib) for s in specs)
    assert _error(model, inputs, rep) < 0.7 * _error(model, inputs, rtn)
    assert all(r["alpha"] is not None for r in rep.report.quant["layers"])


def test_gelu_moves_into_the_epilogue_unless_asked_not_to():
    model, inputs = hf_zoo.build("bert")
    fused = txc.optimize(model, ["quantize:measure=false"], example_inputs=inputs, calibration_data=_calib("bert"))
    kept = txc.optimize(model, ["quantize:measure=false,fuse_activation=false"], example_inputs=inputs,
                        calibration_data=_calib("bert"))  # fmt: skip
    assert "aten.gelu" not in count_ops(fused.graph_module)
    assert count_ops(kept.graph_module)["aten.gelu"] == len(model.encoder.layer)


@pytest.mark.parametrize(
    "spec",
    ["quantize:outliers=true,outlier_threshold=1.0", "quantize:scheme=w4,group_size=16", "quantize:softmax_bits=6"],
)
def test_quantized_programs_roundtrip_in_a_fresh_process(spec, tmp_path):
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, [spec + ",measure=false,min_cosine=0.9"], example_inputs=inputs,
                       calibration_data=_calib("bert"))  # fmt: skip
    assert_roundtrip(opt, hf_zoo.make_inputs("bert", batch=3, seq=5), tmp_dir=tmp_path)


def test_w4_keeps_int8_where_the_group_does_not_divide_the_inputs():
    # hidden 32, intermediate 64: a group of 64 fits only the MLP's down projection
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, ["quantize:scheme=w4,group_size=64,measure=false"], example_inputs=inputs)
    bits = [r["weight_bits"] for r in opt.report.quant["layers"]]
    assert bits.count(4) == len(model.encoder.layer) and bits.count(8) == len(bits) - bits.count(4)
    assert any("kept int8 weights: group_size=64" in n for n in _record(opt).notes)


def test_softmax_bits_log2_quantize_every_attention_and_report_the_grid():
    model, inputs = hf_zoo.build("bert")
    opt = txc.optimize(model, ["quantize:softmax_bits=4,measure=false"], example_inputs=inputs,
                       calibration_data=_calib("bert"))  # fmt: skip
    ops = count_ops(opt.graph_module)
    assert ops["txc.log2_quantize"] == len(model.encoder.layer) and "aten.scaled_dot_product_attention" not in ops
    soft = opt.report.quant["softmax"]
    assert soft["bits"] == 4 and [b["block"] for b in soft["blocks"]] == [0, 1]
    assert all(0 < b["rel_l1"] < 0.5 and 0.5 < b["row_sum"] < 1.5 for b in soft["blocks"])
    assert "attention probabilities: log2, 4 bits" in str(opt.report)
    # The identity setting is exact only while the probabilities stay in floating point.
    assert (
        txc.optimize(model, ["quantize:scheme=none,softmax_bits=8"], example_inputs=inputs).report.records[-1].contract
        == "approximate"
    )


def test_report_and_measured_speed():
    model, inputs = hf_zoo.build("bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = txc.optimize(model, ["quantize"], example_inputs=inputs)
    speed = opt.report.quant["speed"]
    assert speed["before_ms"] > 0 and speed["after_ms"] > 0 and speed["measured"] > 0 and speed["predicted"] > 0
    text = str(opt.report)
    assert "quantize: scheme=w8a8 method=repquant" in text and "output err" in text and "calibration_data" in text
    slower = speed["measured"] < 1
    assert any("slower" in n for n in _record(opt).notes) == slower
    assert any("slower" in str(w.message) for w in caught) == slower
    assert all(r["float_ms"] > 0 and r["quant_ms"] > 0 for r in opt.report.quant["layers"])


def test_the_users_model_is_untouched():
    model, inputs = hf_zoo.build("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    txc.optimize(model, ["quantize:measure=false"], example_inputs=inputs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("quantize:scheme=w3", "scheme"),
        ("quantize:alpha=2", "alpha"),
        ("quantize:group_size=3", "group_size"),
        ("quantize:outlier_threshold=0", "outlier_threshold"),
        ("quantize:method=gptq", "method"),
        ("quantize:softmax_bits=1", "softmax_bits"),
    ],
)
def test_bad_options_are_spec_errors(spec, match):
    with pytest.raises(txc.SpecError, match=match):
        txc.optimize(torch.nn.Linear(2, 2), [spec], example_inputs=(torch.ones(1, 2),))
