"""Passes, their contracts, and the pipeline that runs them with checks after every step.

A pass is a frozen dataclass whose fields are its options. Calling it with `(gm, ctx)` rewrites `gm` (in place or
into a new module) and returns a `PassResult`. The pipeline snapshots the graph before each pass (weights shared,
never written), runs it, lints, refreshes the FakeTensor metadata, verifies, and records what happened; an exception
inside a pass becomes a `PassError` naming the pass and the passes before it, and the snapshot is what remains.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from torch import fx

from .errors import PassError, TxcError
from .ir import copy_graph_module, op_name, refresh_metadata

__all__ = ["Contract", "Pass", "PassResult", "PassContext", "PassRecord", "Pipeline", "count_ops"]

# exact: same function. approximate: changes it within a measured budget, exact at its identity setting.
# reparameterize: same function at insertion, new trainable parameterization (sigma_reparam).
# retrain: changes the function on purpose, for a model that is trained after the rewrite (qk_norm); verification
# records the drift (cosine vs the original) but holds it to no budget.
Contract = Literal["exact", "approximate", "reparameterize", "retrain"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the rewritten module, whether it changed anything, and counters for the report."""

    gm: fx.GraphModule
    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
    # Why the pass left something alone ("block 3: post-LN, equivalence does not hold"); shown in the report.
    notes: tuple[str, ...] = ()


@dataclass
class PassContext:
    """What passes may read besides the graph. Passed explicitly; there is no global pass state."""

    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
    calibration_data: Sequence[Any] | None = None
    # Free-form per-run scratch space for passes that cooperate (e.g. calibration statistics), keyed by pass name.
    scratch: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """The pass protocol. Options are dataclass fields; `name` is the registry key and the module name.

    Approximate passes may also define:
    - `is_identity(self) -> bool`: True at the setting that must be exact (r=0, threshold=inf, 16-bit);
      verification then holds the pass to the exact contract;
    - `check_quality(self, measured: dict) -> str | None`: given the measured error (max_abs, cosine vs the
      original), the reason the pass's declared budget was exceeded, or None.
    """

    name: ClassVar[str]
    contract: ClassVar[Contract]
    summary: ClassVar[str]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...


def is_identity(p: Pass) -> bool:
    """Whether an approximate pass is at its identity setting (r=0, threshold=inf, ...), where it must be exact."""
    fn = getattr(p, "is_identity", None)
    return bool(fn()) if callable(fn) else False


def effective_contract(p: Pass) -> Contract:
    """The contract verification holds `p` to: approximate passes at their identity setting must be exact."""
    if p.contract == "approximate" and is_identity(p):
        return "exact"
    return p.contract


def count_ops(gm: fx.GraphModule) -> Counter[str]:
    """How many times each op occurs in `gm`, keyed by `op_name` ("aten.linear": 12). Scaffolding is left out.

    Stateful ops a pass inserted as submodules count by class ("module:SigmaReparamWeight": 12).
    """

    def key(n: fx.Node) -> str:
        if n.op == "call_module":
            return f"module:{type(gm.get_submodule(str(n.target))).__name__}"
        return op_name(n)

    # A module nobody reads (export's input guards) is scaffolding, not an op.
    ops = ("call_function", "call_method")
    calls = (n for n in gm.graph.nodes if n.op in ops or (n.op == "call_module" and n.users))
    return Counter(key(n) for n in calls)


@dataclass
class PassRecord:
    """One row of the report: what a pass did and what it cost."""

    name: str
    spec: str
    contract: Contract
    modified: bool
    seconds: float
    stats: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    ops_added: Mapping[str, int] = field(default_factory=dict)
    ops_removed: Mapping[str, int] = field(default_factory=dict)
    # Filled by verification: {"max_abs": .., "max_rel": .., "ok": .., "metric": ..}.
    error: Mapping[str, Any] | None = None
    iteration: int = 0


# Called after each pass with (pass, gm_before, gm_after); returns the measured error or raises VerificationError.
Verifier = Callable[[Pass, fx.GraphModule, fx.GraphModule], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes run up to `max_iters` times, until a round changes nothing (a bounded fixpoint).

    With `max_iters > 1`, a last round that still changes the graph is an error, not a silent stop: a pass that never
    settles is a bug in that pass.
    """

    passes: tuple[Pass, ...]
    max_iters: int = 1

    def __post_init__(self) -> None:
        if self.max_iters < 1:
            raise ValueError(f"Pipeline.max_iters must be >= 1, got {self.max_iters}")

    def run(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        *,
        verify: Verifier | None = None,
        on_record: Callable[[PassRecord], None] | None = None,
        on_start: Callable[[Pass], None] | None = None,
    ) -> tuple[fx.GraphModule, list[PassRecord]]:
        records: list[PassRecord] = []
        done: list[str] = []
        for iteration in range(self.max_iters):
            changed = False
            for p in self.passes:
                if on_start is not None:
                    on_start(p)
                gm, record = self._run_one(p, gm, ctx, done, verify, iteration)
                done.append(spec_of(p))
                records.append(record)
                if on_record is not None:
                    on_record(record)
                changed |= record.modified
            if not changed:
                break
            if iteration == self.max_iters - 1 and self.max_iters > 1:
                raise PassError(
                    f"the pipeline [{', '.join(spec_of(p) for p in self.passes)}] still changed the graph after "
                    f"{self.max_iters} rounds; a pass that never settles is a bug: report it with this pass list"
                )
        return gm, records

    def _run_one(
        self,
        p: Pass,
        gm: fx.GraphModule,
        ctx: PassContext,
        done: list[str],
        verify: Verifier | None,
        iteration: int,
    ) -> tuple[fx.GraphModule, PassRecord]:
        # The pass edits a copy (weights shared, never written), so the graph it was given is the snapshot: on
        # failure it is what remains, and verification compares against it.
        before = gm
        work = copy_graph_module(gm)
        ops_before = count_ops(gm)
        start = time.perf_counter()
        try:
            result = p(work, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass returned {type(result).__name__}, expected PassResult")
            out = result.gm
            out.graph.lint()
            out.recompile()
            if result.modified:
                refresh_metadata(out)
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            after = f" after [{', '.join(done)}]" if done else " (the first pass)"
            detail = str(e) if isinstance(e, TxcError) else f"{type(e).__name__}: {e}"
            raise PassError(f"pass '{spec_of(p)}'{after} failed: {detail}") from e
        seconds = time.perf_counter() - start
        ops_after = count_ops(out)
        record = PassRecord(
            name=p.name,
            spec=spec_of(p),
            contract=effective_contract(p),
            modified=result.modified,
            seconds=seconds,
            stats=dict(result.stats),
            notes=result.notes,
            ops_added=dict(ops_after - ops_before),
            ops_removed=dict(ops_before - ops_after),
            iteration=iteration,
        )
        if verify is not None and result.modified:
            record.error = verify(p, before, out)
        _dump(out, record, len(done))
        return out, record


def _dump(gm: fx.GraphModule, record: PassRecord, index: int) -> None:
    """TXC_DUMP_DIR: write the graph after each pass as readable Python, to diff what each pass did."""
    from . import _env

    folder = _env.dump_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{index + 1:02d}_{record.name}.py"
    (folder / name).write_text(f"# after pass {record.spec} (modified={record.modified})\n{gm.code}")


def spec_of(p: Pass) -> str:
    """The spec string that builds `p` again ("token_merge:r=8"); only options that differ from their defaults."""
    from .registry import format_spec

    return format_spec(p)
