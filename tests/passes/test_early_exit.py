"""early_exit: exact at threshold=inf on every zoo architecture, per-row exits that match running each row alone,
calibrated thresholds (reused and learned heads, every criterion), the report, options, and artifacts."""

from __future__ import annotations

import math

import pytest
import torch

import txcompile as txc
from txcompile.errors import PassError, SpecError
from txcompile.models import digits, hf_zoo, reference
from txcompile.models import minilm as minilm_lib
from txcompile.testing import assert_roundtrip
from txcompile.verify import node_values

txo = torch.ops.txc


def _record(opt):
    return opt.report.records[-1]


@pytest.mark.parametrize("name", hf_zoo.names())
def test_threshold_inf_is_exact_on_every_zoo_architecture(name):
    model, inputs = hf_zoo.build(name)
    calib = [hf_zoo.make_inputs(name, seed=1)]
    opt = txc.optimize(model, ["early_exit:threshold=inf,measure=false"], example_inputs=inputs, calibration_data=calib)
    record = _record(opt)
    if name in ("bloom", "opt"):  # ALiBi folds batch x heads; OPT flattens the stream to [B*T, D]
        assert not record.modified and record.notes[0].startswith("no exits:")
        return
    assert record.modified and record.contract == "exact" and record.error["ok"], record.notes
    assert record.error["max_abs"] == 0.0
    assert sum(n.target is txo.exit_partition.default for n in opt.graph_module.graph.nodes) >= 1


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return digits.load_or_train(tmp_path_factory.mktemp("digits"), settings=digits.TrainSettings(epochs=4))


@pytest.fixture(scope="module")
def calib():
    images, _ = digits.load_data("train")
    return [(images[i : i + 128],) for i in range(0, 640, 128)]


def _exits_taken(opt, inputs):
    parts = [n for n in opt.graph_module.graph.nodes if n.target is txo.exit_partition.default]
    values = node_values(opt.graph_module, inputs, {n.name for n in parts})
    return [len(values[n.name][0]) for n in parts]


@pytest.mark.parametrize("heads", ["reuse", "learned"])
def test_mixed_exits_in_one_batch_equal_each_row_run_alone(vit, calib, heads):
    x = digits.load_data("test")[0][:24]
    spec = f"early_exit:heads={heads},target_agreement=0.9,train_steps=60,measure=false"
    opt = txc.optimize(vit, [spec], example_inputs=digits.example_inputs(8), calibration_data=calib)
    taken = _exits_taken(opt, ((x,), {}))
    assert sum(1 for t in taken if t) + (sum(taken) < len(x)) >= 2, f"rows must leave at different exits: {taken}"
    out = opt(x)
    for i in range(len(x)):
        torch.testing.assert_close(out[i : i + 1], opt(x[i : i + 1]), rtol=1e-5, atol=1e-5)


def test_calibrated_thresholds_meet_the_target_and_the_runtime_matches_the_simulation(vit, calib):
    reuse = txc.optimize(vit, ["early_exit"], example_inputs=digits.example_inputs(8), calibration_data=calib)
    spec = "early_exit:heads=learned,train_steps=100"
    learned = txc.optimize(vit, [spec], example_inputs=digits.example_inputs(8), calibration_data=calib)
    for opt in (reuse, learned):
        e = opt.report.early_exit
        assert e["criterion"] == "confidence" and e["metric"] == "top1" and e["agreement"] >= 0.99
        assert e["distribution"] == e["measured_distribution"] and sum(e["distribution"]) == e["rows"]
        assert e["expected_speedup"] > 1.0 and e["measured_speedup"] > 0
        assert "early_exit: criterion=confidence" in str(opt.report)
    # Self-distilled heads agree with the model more often than the model's own head on early streams.
    assert learned.report.early_exit["exit_agreement"][0] > reuse.report.early_exit["exit_agreement"][0]
    adapters = [n for n in learned.graph_module.graph.nodes if n.op == "get_attr" and "exit" in str(n.target)]
    assert len(adapters) == 2 * len(learned.report.early_exit["exit_blocks"])


@pytest.mark.parametrize("criterion", ["entropy", "patience", "similarity"])
def test_every_criterion_calibrates(vit, calib, criterion):
    spec = f"early_exit:criterion={criterion},target_agreement=0.98,measure=false"
    opt = txc.optimize(vit, [spec], example_inputs=digits.example_inputs(8), calibration_data=calib)
    e = opt.report.early_exit
    assert e["criterion"] == criterion and e["agreement"] >= 0.98
    if criterion == "patience" and e["threshold"] != math.inf:
        assert float(e["threshold"]).is_integer() and e["distribution"][0] == 0  # needs an exit to agree with


def test_embedding_model_uses_similarity_and_keeps_row_order_with_padding(minilm):
    model, tok = minilm
    sents = minilm_lib.CALIBRATION_SENTENCES
    calib = [minilm_lib.example_inputs(tok, list(sents[i : i + 8])) for i in range(0, 16, 8)]
    inputs = minilm_lib.example_inputs(tok)
    strict = txc.optimize(model, ["early_exit:measure=false"], example_inputs=inputs, calibration_data=calib)
    assert not _record(strict).modified and "left unchanged" in _record(strict).notes[-1]
    assert strict.report.early_exit["criterion"] == "similarity"
    opt = txc.optimize(model, ["early_exit:threshold=0.88"], example_inputs=inputs, calibration_data=calib)
    batch = minilm_lib.example_inputs(tok, list(minilm_lib.HELD_OUT_SENTENCES[:6]))
    taken = _exits_taken(opt, ((), batch))
    assert 0 < sum(taken) < 6, f"the test needs some rows to leave early and some not: {taken}"
    out = opt(**batch)
    for i in range(6):
        alone = opt(**{k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(out.last_hidden_state[i : i + 1], alone.last_hidden_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pooler_output[i : i + 1], alone.pooler_output, rtol=1e-4, atol=1e-4)


def test_logit_criteria_need_a_classifier():
    model = reference.build("encoder", depth=2, vocab_size=40)
    inputs = {"input_ids": torch.randint(0, 40, (2, 5))}
    with pytest.raises(PassError, match="needs class logits"):
        txc.optimize(model, ["early_exit:criterion=confidence"], example_inputs=inputs)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("early_exit:criterion=loss", "expected one of auto, confidence"),
        ("early_exit:threshold=nan", "expected a number, not nan"),
        ("early_exit:criterion=patience,threshold=0.5", "patience threshold"),
        ("early_exit:target_agreement=0", "target_agreement"),
        ("early_exit:holdout=1", "holdout"),
        ("early_exit:train_steps=0", "train_steps"),
    ],
)
def test_bad_options_name_what_is_wrong(spec, message):
    with pytest.raises(SpecError, match=message):
        txc.optimize(reference.build("vit", depth=2), [spec], example_inputs=torch.randn(2, 3, 32, 32))


def test_second_run_declines_and_the_user_model_is_untouched():
    model = reference.build("vit", depth=3, image_size=16, patch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passes = ["early_exit:threshold=inf,measure=false", "early_exit:heads=learned,threshold=inf,measure=false"]
    opt = txc.optimize(model, passes, example_inputs=torch.randn(3, 3, 16, 16))
    assert opt.report.records[0].modified and not opt.report.records[1].modified
    assert "already has exits" in opt.report.records[1].notes[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_staged_program_with_learned_heads_runs_from_an_artifact_in_a_fresh_process(vit, calib):
    spec = "early_exit:heads=learned,threshold=0.6,train_steps=30,measure=false"
    opt = txc.optimize(vit, [spec], example_inputs=digits.example_inputs(8), calibration_data=calib[:2])
    x = digits.load_data("test")[0][:13]
    assert 0 < sum(_exits_taken(opt, ((x,), {}))) < 13
    assert_roundtrip(opt, (x,))
