"""Rules as plain PyTorch functions: `rewrite(gm, rules)` over torch.fx's subgraph rewriter.

A rule has an algebraic name, a pattern and a replacement written as ordinary functions over ATen ops, and an
optional `where` filter that looks at the match (shapes, dtypes, which tensors are parameters) and declines by
returning False. Only the infrastructure raises; a rule whose precondition fails simply does not fire.

    Rule("relu(relu(x)) => relu(x)",
         pattern=lambda x: aten.relu.default(aten.relu.default(x)),
         replacement=lambda x: aten.relu.default(x))

Matching follows use-def edges, not node names, so it works on any captured model. `rewrite` repeats until no rule
fires, bounded by `max_iters`: a rule set that never settles raises instead of hanging.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from .errors import PassError
from .ir import get_tensor, refresh_metadata, tensor_meta

__all__ = ["Rule", "Match", "rewrite"]


@dataclass(frozen=True)
class Match:
    """One match of a rule's pattern, seen through the pattern's argument names."""

    gm: fx.GraphModule
    nodes: dict[str, Any]  # pattern argument name -> graph node (or literal) it matched

    def val(self, name: str) -> torch.Tensor | None:
        """The FakeTensor (shape, dtype) of the value bound to pattern argument `name`."""
        return tensor_meta(self.nodes.get(name))

    def param(self, name: str) -> torch.Tensor | None:
        """The parameter/buffer bound to `name`, or None if it is computed at run time."""
        return get_tensor(self.gm, self.nodes.get(name))


@dataclass(frozen=True)
class Rule:
    """A named rewrite: `pattern` => `replacement`, applied where `where(match)` holds."""

    name: str
    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    where: Callable[[Match], bool] | None = None


def _filter(gm: fx.GraphModule, rule: Rule, names: list[str]) -> Callable[..., bool]:
    def keep(internal_match: Any, original_graph: fx.Graph, pattern_graph: fx.Graph) -> bool:
        if rule.where is None:
            return True
        bound = dict(zip(names, internal_match.placeholder_nodes))
        return bool(rule.where(Match(gm, bound)))

    return keep


def _arg_names(fn: Callable[..., Any]) -> list[str]:
    traced = fx.symbolic_trace(fn)
    return [n.target for n in traced.graph.nodes if n.op == "placeholder"]


def rewrite(gm: fx.GraphModule, rules: Sequence[Rule], *, max_iters: int = 100) -> Counter[str]:
    """Apply `rules` until none fires; return how often each rule fired, keyed by rule name."""
    fired: Counter[str] = Counter()
    for _ in range(max_iters):
        changed = False
        for rule in rules:
            names = _arg_names(rule.pattern)
            replaced = replace_pattern_with_filters(
                gm, rule.pattern, rule.replacement, match_filters=[_filter(gm, rule, names)]
            )
            if replaced:
                fired[rule.name] += len(replaced)
                changed = True
                # Later rules' `where` filters read shapes, including those of nodes this rule just inserted.
                gm.recompile()
                refresh_metadata(gm)
        if not changed:
            return fired
    raise PassError(
        f"rules [{'; '.join(r.name for r in rules)}] still fired after {max_iters} rounds: they rewrite each "
        "other's output forever; make one of them decline on the other's result"
    )
