"""Calibration observers: per-channel statistics over every batch, sampled rows that are real rows, errors."""

from __future__ import annotations

import pytest
import torch

import txcompile as txc
from txcompile.anatomy import anatomy
from txcompile.calibrate import observe
from txcompile.models import reference


def test_statistics_cover_every_batch_and_rows_are_real():
    model = reference.build("encoder")
    gm = txc.capture(model, model.example_inputs())
    lin = anatomy(gm).blocks[0].mlp.fc2
    batches = [(model.example_inputs(batch=b, seq=s, seed=b), {}) for b, s in ((2, 6), (3, 9))]
    stats = observe(gm, [lin.input], batches, max_rows=8, progress=False)[lin.input]

    seen = []
    down = model.blocks[0].mlp.down
    hook = down.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for args, _ in batches:
            model(*args)
    hook.remove()
    every = torch.cat(seen)
    torch.testing.assert_close(stats.lo, every.amin(0))
    torch.testing.assert_close(stats.hi, every.amax(0))
    torch.testing.assert_close(stats.mean.float(), every.mean(0), rtol=1e-5, atol=1e-6)
    assert stats.counts == [12, 27] and stats.rows.shape == (8, every.shape[1])
    # Every sampled row is one of the rows the layer really saw.
    assert bool((torch.cdist(stats.rows, every, compute_mode="donot_use_mm_for_euclid_dist").amin(1) < 1e-5).all())


def test_a_node_that_never_produces_a_float_is_an_error():
    model = reference.build("encoder")
    gm = txc.capture(model, model.example_inputs())
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with pytest.raises(RuntimeError, match=ids.name):
        observe(gm, [ids], [(model.example_inputs(), {})], progress=False)
