"""Plans for models too big for this machine: capture a shallow copy at full width on the meta device, scale its
blocks to the real depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ...errors import SpecError
from .plan import Plan, make_plan

__all__ = ["capture_shallow", "plan_for_hf_config"]


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def capture_shallow(
    config: Any, model_cls: Callable[[Any], torch.nn.Module] | str = "AutoModelForCausalLM", *, layers: int = 2
) -> tuple[fx.GraphModule, int]:
    """Capture a `layers`-block copy of a Hugging Face architecture at full width on the meta device (no weights are
    allocated) and return (graph, the config's real depth)."""
    import copy

    import transformers

    cfg = copy.deepcopy(config)
    key = next((k for k in _DEPTH_KEYS if hasattr(cfg, k)), None)
    if key is None:
        raise SpecError(f"cannot find the number of layers in {type(config).__name__} (looked for {_DEPTH_KEYS})")
    depth = int(getattr(cfg, key))
    setattr(cfg, key, min(layers, depth))
    cfg.use_cache = False
    if hasattr(cfg, "_attn_implementation"):
        cfg._attn_implementation = "sdpa"
    if isinstance(model_cls, str):
        cls = getattr(transformers, model_cls)
        build = cls.from_config if hasattr(cls, "from_config") else cls
    else:
        build = model_cls
    with torch.device("meta"):
        model = build(cfg)
    model.eval()
    from ...capture import capture

    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    return capture(model, {"input_ids": ids}), depth


def plan_for_hf_config(
    config: Any,
    model_cls: Callable[[Any], torch.nn.Module] | str = "AutoModelForCausalLM",
    *,
    name: str | None = None,
    layers: int = 2,
    **plan_options: Any,
) -> Plan:
    """`make_plan` for a Hugging Face config of any size: a `layers`-block copy is captured on the meta device and
    its blocks are scaled to the config's depth (the blocks of these models are identical)."""
    gm, depth = capture_shallow(config, model_cls, layers=layers)
    label = name or getattr(config, "model_type", type(config).__name__)
    return make_plan(gm, depth=depth, name=label, **plan_options)
