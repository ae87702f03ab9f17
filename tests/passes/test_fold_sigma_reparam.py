"""fold_sigma_reparam: exact after training, on re-captured and loaded programs; leaves no σReparam state behind."""

from __future__ import annotations

import torch

import txcompile as txc
from txcompile.models import reference
from txcompile.ops import SigmaReparamWeight
from txcompile.passes import FoldSigmaReparam
from txcompile.pipeline import PassContext, Pipeline
from txcompile.testing import assert_equivalent, assert_roundtrip, count_ops


def _trained_gpt():
    torch.manual_seed(0)
    model = reference.build("gpt", depth=2)
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=model.example_inputs())
    opt.train()
    optim = torch.optim.AdamW(opt.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 13), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(opt(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model, opt.eval()


def test_folds_a_trained_program_exactly():
    model, opt = _trained_gpt()
    x = model.example_inputs(batch=3, seq=9)
    expected = opt(*x)
    gm, (record,) = Pipeline((FoldSigmaReparam(),)).run(opt.graph_module, PassContext())
    assert record.modified and record.stats["folded"] == 13
    assert torch.equal(gm(*x), expected)  # the folded weight is the very tensor eval mode computes
    assert not any(isinstance(m, SigmaReparamWeight) for m in gm.modules())
    assert not any(name.endswith(("gamma", ".u", ".v")) for name, _ in gm.state_dict().items())
    # The snapshot the pipeline started from still trains: folding did not touch it.
    assert any(isinstance(m, SigmaReparamWeight) for m in opt.graph_module.modules())


def test_folds_the_op_form_of_a_recaptured_program():
    model, opt = _trained_gpt()
    x = model.example_inputs()
    # Capturing the trained program turns its σReparam modules into txc.sigma_reparam ops on stored tensors.
    folded = txc.optimize(opt, ["fold_sigma_reparam"], example_inputs=x)
    assert count_ops(txc.capture(opt, x))["txc.sigma_reparam"] == 13
    assert folded.report.records[0].stats["folded"] == 13
    assert count_ops(folded.graph_module)["txc.sigma_reparam"] == 0
    assert_equivalent(opt, folded, model.example_inputs(batch=2, seq=5))


def test_folds_a_loaded_artifact(tmp_path):
    model, opt = _trained_gpt()
    x = model.example_inputs()
    txc.artifact.save(opt, tmp_path / "reparam", label="test", example_inputs=x)
    loaded = txc.load(tmp_path / "reparam")
    folded = txc.optimize(loaded, ["fold_sigma_reparam"], example_inputs=x)
    assert folded.report.records[0].stats["folded"] == 13
    assert_equivalent(opt, folded, model.example_inputs(batch=3, seq=11))
    assert_roundtrip(folded, model.example_inputs(batch=2, seq=7), tmp_dir=tmp_path)


def test_nothing_to_fold():
    model = reference.build("encoder")
    opt = txc.optimize(model, ["fold_sigma_reparam"], example_inputs=model.example_inputs())
    record = opt.report.records[0]
    assert not record.modified and record.stats["folded"] == 0
