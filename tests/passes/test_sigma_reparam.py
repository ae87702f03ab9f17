"""sigma_reparam: exact at insertion everywhere; trainable (γ, W move; σ tracks the true norm); train/eval; options."""

from __future__ import annotations

import pytest
import torch

import txcompile as txc
from txcompile.models import hf_zoo, reference
from txcompile.ops import SigmaReparamWeight
from txcompile.testing import assert_equivalent, assert_roundtrip


def _states(opt) -> dict[str, SigmaReparamWeight]:
    return {n: m for n, m in opt.named_modules() if isinstance(m, SigmaReparamWeight)}


@pytest.mark.parametrize("name", hf_zoo.names())
def test_exact_at_insertion_and_folded_on_hugging_face(name):
    model, inputs = hf_zoo.build(name)
    # optimize() holds both passes to their contracts (exact at insertion, exact fold) on the example inputs.
    opt = txc.optimize(model, ["sigma_reparam", "fold_sigma_reparam"], example_inputs=inputs)
    insert, fold = opt.report.records
    assert insert.modified and insert.contract == "reparameterize"
    assert insert.error["step_max_abs"] == 0.0  # γ/σ is exactly 1: not merely close
    assert insert.ops_added == {"module:SigmaReparamWeight": insert.stats["weights"]}
    assert fold.stats["folded"] == insert.stats["weights"] and fold.error["step_max_abs"] == 0.0
    assert insert.stats["linears"] == len(txc.anatomy(opt.graph_module).linears)
    assert not _reparam_nodes(opt.graph_module)
    assert_equivalent(model, opt, hf_zoo.make_inputs(name, batch=3, seq=7))


def test_exact_on_minilm_real_weights(minilm):
    from txcompile.models import minilm as loader

    model, tokenizer = minilm
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=loader.example_inputs(tokenizer))
    # q, k, v, out, fc1, fc2 per layer, and BERT's pooler.
    assert opt.report.records[-1].stats["linears"] == 6 * 6 + 1
    held_out = loader.example_inputs(tokenizer, loader.HELD_OUT_SENTENCES[:6])
    assert_equivalent(model, opt, held_out)
    gm = opt.graph_module
    for node in _reparam_nodes(gm):
        true = torch.linalg.matrix_norm(txc.ir.get_tensor(gm, node.args[0]).detach().double(), ord=2)
        assert float(gm.get_submodule(node.target).gamma.detach()) == pytest.approx(float(true), rel=1e-5)


@pytest.mark.parametrize(("which", "per_block"), [("attention", 4), ("mlp", 2), ("all", 6)])
def test_linear_selection(which, per_block):
    model = reference.build("gpt", depth=3)
    opt = txc.optimize(model, [f"sigma_reparam:linears={which}"], example_inputs=model.example_inputs())
    head = 1 if which == "all" else 0
    assert opt.report.records[-1].stats["linears"] == 3 * per_block + head


def _reparam_nodes(gm):
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    return [n for n in calls if isinstance(gm.get_submodule(n.target), SigmaReparamWeight)]


def _train(opt, loss_fn, lr: float, steps: int) -> None:
    opt.train()
    optim = torch.optim.AdamW(opt.parameters(), lr=lr)
    for _ in range(steps):
        loss = loss_fn(opt)
        optim.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in opt.parameters() if p.requires_grad)
        optim.step()
    opt.eval()


def test_training_moves_gamma_and_weights():
    torch.manual_seed(0)
    model = reference.build("gpt", dim=64, heads=4, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=model.example_inputs())
    states = _states(opt)
    params = dict(opt.named_parameters())
    assert sum(n.endswith(".gamma") for n in params) == len(states) == 13
    start = {n: p.detach().clone() for n, p in params.items()}
    ids = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(1))

    def lm_loss(m):
        return torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    first = float(lm_loss(opt).detach())
    _train(opt, lm_loss, lr=1e-3, steps=5)
    assert not opt.training and not opt.graph_module.training
    assert all(not torch.equal(p.detach(), start[n]) for n, p in params.items()), "every γ and weight moves"
    assert float(lm_loss(opt).detach()) < first
    # The user's model is untouched by training the optimized program.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_power_iteration_sigma_tracks_the_true_norm_while_fine_tuning(minilm):
    from txcompile.models import minilm as loader

    model, tokenizer = minilm
    inputs = loader.example_inputs(tokenizer)
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=inputs, verify=False)
    gammas = {n: float(m.gamma.detach()) for n, m in _states(opt).items()}
    _train(opt, lambda m: sum(out.pow(2).mean() for out in m(**inputs)[:2]), lr=1e-4, steps=5)
    gm = opt.graph_module
    assert all(float(m.gamma.detach()) != gammas[n] for n, m in _states(opt).items())
    for node in _reparam_nodes(gm):
        w = txc.ir.get_tensor(gm, node.args[0])
        true = float(torch.linalg.matrix_norm(w.detach().double(), ord=2))
        assert float(gm.get_submodule(node.target).sigma(w)) == pytest.approx(true, rel=0.01), node.target


def test_eval_forwards_leave_the_state_alone():
    model = reference.build("encoder")
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=model.example_inputs())
    assert not opt.training and not opt.graph_module.training
    state = {k: v.clone() for k, v in opt.state_dict().items()}
    first = _reparam_nodes(opt.graph_module)[0]
    changed = f"graph_module.{first.args[0].target}"
    with torch.no_grad():
        opt.get_parameter(changed).mul_(torch.linspace(0.5, 2.0, opt.get_parameter(changed).shape[1]))
    opt(*model.example_inputs())
    assert all(torch.equal(v, state[k]) for k, v in opt.state_dict().items() if k != changed)
    opt.train()
    opt(*model.example_inputs())
    vectors = {k: v for k, v in opt.state_dict().items() if k.endswith((".u", ".v"))}
    moved = {k: float((v - state[k]).abs().max()) for k, v in vectors.items()}
    # The changed weight's vectors move; for the others the SVD's vectors are a fixpoint (up to rounding).
    mine = f"graph_module.{first.target}"
    assert min(d for k, d in moved.items() if k.startswith(mine + ".")) > 1e-2
    assert max(d for k, d in moved.items() if not k.startswith(mine + ".")) < 1e-4


def test_idempotent_and_other_passes_leave_reparameterized_linears_alone():
    model = reference.build("gpt")
    passes = ["sigma_reparam", "sigma_reparam", "fuse_qkv", "rmsnorm"]
    opt = txc.optimize(model, passes, example_inputs=model.example_inputs())
    second, fuse, rms = opt.report.records[1:]
    assert not second.modified and "already reparameterized" in second.notes[0]
    assert not fuse.modified and "fold_sigma_reparam" in " ".join(fuse.notes)
    assert not rms.modified and "fold_sigma_reparam" in " ".join(rms.notes)


def test_bad_options_are_spec_errors():
    with pytest.raises(txc.SpecError, match="linears"):
        txc.parse_spec("sigma_reparam:linears=heads")
    with pytest.raises(txc.SpecError, match="iters"):
        txc.parse_spec("sigma_reparam:iters=-1")


def test_round_trips_through_an_artifact(tmp_path):
    model, inputs = hf_zoo.build("llama")
    opt = txc.optimize(model, ["sigma_reparam"], example_inputs=inputs)
    assert_roundtrip(opt, hf_zoo.make_inputs("llama", batch=3, seq=5), tmp_dir=tmp_path)
