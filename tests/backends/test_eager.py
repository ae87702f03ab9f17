"""The eager backend (the reference every other backend is checked against) and backend resolution."""

from __future__ import annotations

import pytest

import txcompile as txc
from txcompile.backends import EagerBackend, get_backend
from txcompile.models import reference


def test_eager_claims_every_node_and_runs_the_graph_module_itself():
    model = reference.build("gpt")
    opt = txc.optimize(model, ["cleanup"], example_inputs=model.example_inputs(), backend="eager", strict=True)
    assert opt.report.backend == "eager" and opt.report.fallbacks == []
    backend = get_backend("eager")
    assert all(backend.supports(n) is True for n in opt.graph_module.graph.nodes)
    assert backend.lower(opt.graph_module, None).program is opt.graph_module


def test_backend_objects_pass_through_and_bad_names_list_the_valid_ones():
    eager = EagerBackend()
    assert get_backend(eager) is eager
    with pytest.raises(txc.SpecError, match="valid backends: distributed, eager, triton"):
        get_backend("triton2")
    with pytest.raises(txc.SpecError, match="has no option"):
        get_backend("eager:fast=true")
    with pytest.raises(txc.SpecError, match="backend must be"):
        get_backend(3)
