"""A small ViT trained on scikit-learn's bundled digits, for measuring what approximate passes cost in accuracy.

Token merging and pruning trade top-1 accuracy for speed; this module gives them a real trained model with a labelled
test split that trains in one to two minutes on 2 CPU cores and needs no download (``sklearn.datasets.load_digits``:
1797 8x8 grayscale images of the digits 0-9).

Data: a fixed permutation (``numpy.random.RandomState(0)``) splits the 1797 images into 1438 for training and 359 for
testing. :func:`preprocess` (the only preprocessing) scales the 0..16 pixel values to about zero mean and unit
variance and upsamples 8x8 to 16x16 bilinearly, so that patches of 2 give 64 patch tokens: enough for merging to
matter.

Architecture (:data:`ARCH`): :class:`txcompile.models.reference.ViT` with 1 channel, image 16, patch 2
(64 patch tokens + CLS = 65), dim 64, 4 heads, depth 4, MLP ratio 2, pre-LN, GELU, SDPA attention; 139k parameters.
Only the initial patch position embeddings differ from the reference (see :func:`build`).

Training (:class:`TrainSettings`): AdamW (lr 5e-3, weight decay 0.05 on matrices), batch 32, 1 epoch of linear
warm-up then cosine decay, 15 epochs, label smoothing 0.1, random shifts of up to 2 pixels (1 original pixel), one
thread. Measured with ``seed=0`` (torch 2.13, CPU): 96.9% top-1 on the test split (348 of 359; 97% on the train
split), in 89-107 s on a 2-core machine that was also running other jobs (load average 3.5-5.5). Everything is
seeded by ``seed`` and the global RNG is never touched, so the same seed and thread count give the same weights.

:func:`load_or_train` trains once and caches the weights (safetensors) with a JSON record of the configuration,
accuracy, versions and the weights' SHA-256 under ``$TXC_CACHE_DIR/digits_vit`` or ``~/.cache/txcompile/digits_vit``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from txcompile.models import reference

__all__ = [
    "ARCH",
    "TrainSettings",
    "accuracy",
    "build",
    "default_cache_dir",
    "example_inputs",
    "load_data",
    "load_or_train",
    "preprocess",
    "shifted",
    "train",
]

log = logging.getLogger(__name__)

ARCH: dict[str, Any] = {
    "image_size": 16,
    "patch_size": 2,
    "channels": 1,
    "num_classes": 10,
    "dim": 64,
    "heads": 4,
    "depth": 4,
    "mlp_ratio": 2.0,
    "norm": "pre",
    "attention": "sdpa",
}

# Bumped whenever preprocessing or the split changes, so cached weights trained on other inputs are not reused.
DATA_VERSION = 1
_UPSAMPLE = 2
_TEST_FRACTION = 0.2
# Mean and std of all 1797 images after dividing by 16, rounded: constants, so neither split depends on the other.
_MEAN, _STD = 0.305, 0.376
_WEIGHTS, _META = "model.safetensors", "meta.json"


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of :func:`train`; part of the cache key of :func:`load_or_train`."""

    epochs: int = 15
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    max_shift: int = 2  # random translation in pixels of the upsampled image; 0 disables augmentation
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainSettings.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainSettings.lr must be positive, got {self.lr!r}")
        if self.max_shift < 0:
            raise ValueError(f"TrainSettings.max_shift must be >= 0, got {self.max_shift!r}")


def preprocess(images: Tensor | np.ndarray) -> Tensor:
    """Raw digits ``[N, 8, 8]`` with values 0..16 -> normalised float32 ``[N, 1, 16, 16]`` model inputs."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)[:, None]
    x = (x / 16.0 - _MEAN) / _STD
    return F.interpolate(x, scale_factor=_UPSAMPLE, mode="bilinear", align_corners=False)


def load_data(split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """``(images [N, 1, 16, 16] float32, labels [N] int64)`` of the fixed train (1438) or test (359) split."""
    if split not in ("train", "test"):
        raise ValueError(f"load_data: split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the digits data set comes from scikit-learn, which is not installed; "
            "install it with `pip install scikit-learn` (or the txcompile[bench] extra)"
        ) from exc
    digits = load_digits()
    # RandomState (not default_rng) because numpy guarantees its stream stays the same across versions.
    order = np.random.RandomState(0).permutation(len(digits.target))
    n_test = round(_TEST_FRACTION * len(order))
    index = order[:n_test] if split == "test" else order[n_test:]
    return preprocess(digits.images[index]), torch.as_tensor(digits.target[index], dtype=torch.int64)


def _sincos_2d(grid: int, dim: int) -> Tensor:
    """``[grid * grid, dim]`` fixed 2-D sine-cosine position code (rows in the first half, columns in the second)."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    angles = [coord.flatten()[:, None] * omega[None] for coord in (rows, cols)]
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return F.pad(code, (0, dim - code.shape[1]))  # dims not divisible by 4 get zero columns


def build(*, seed: int = 0, **overrides: Any) -> reference.ViT:
    """The untrained digits ViT (:data:`ARCH`, with ``overrides`` replacing entries), seeded, in eval mode.

    The patch position embeddings start from a 2-D sine-cosine code instead of the reference's N(0, 0.02): with
    2x2 patches of a 16x16 image a patch embedding carries little more than one pixel's value, and positions that
    small made the model learn much slower (88% instead of 94% test top-1 after 6 epochs of an otherwise equal
    recipe). They stay learnable, and the graph is unchanged.
    """
    model = reference.build("vit", seed=seed, **{**ARCH, **overrides})
    with torch.no_grad():
        num_patches, dim = model.pos_emb.shape[1] - 1, model.pos_emb.shape[2]
        model.pos_emb[0, 1:] = _sincos_2d(math.isqrt(num_patches), dim)
    return model


def example_inputs(batch: int = 8) -> tuple[Tensor]:
    """``(images [batch, 1, 16, 16],)``: the first ``batch`` real test images, for capture and calibration."""
    images, _ = load_data("test")
    if not 1 <= batch <= len(images):
        raise ValueError(f"example_inputs: batch must be in [1, {len(images)}], got {batch}")
    return (images[:batch].clone(),)


def accuracy(
    model_or_callable: nn.Module | Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy in percent of ``model_or_callable(images_batch) -> logits`` over ``images``."""
    if batch_size < 1:
        raise ValueError(f"accuracy: batch_size must be positive, got {batch_size}")
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"accuracy: need as many labels as images (> 0), got {len(images)} and {len(labels)}")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model_or_callable(images[start : start + batch_size])
            correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / len(labels)


def shifted(images: Tensor, *, seed: int = 0) -> Tensor:
    """``images`` under the training augmentation (each moved by up to one original pixel, seeded): unlabelled data
    that looks more like unseen images to the trained model than its own training images do, for calibration."""
    return _shift(images, TrainSettings().max_shift, torch.Generator().manual_seed(seed))


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in ``[-max_shift, max_shift]^2``, filling with background."""
    n, _, h, w = images.shape
    background = (0.0 - _MEAN) / _STD
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    model: nn.Module | None = None,
    *,
    settings: TrainSettings | None = None,
    threads: int | None = 1,
    **changes: Any,
) -> nn.Module:
    """Train ``model`` (default: ``build(seed=settings.seed)``) on the train split; returns it in eval mode.

    ``changes`` replace fields of ``settings`` (``train(epochs=3)``). Shuffling and augmentation draw from a
    generator seeded with ``settings.seed``; the global RNG is left alone. ``threads`` sets torch's intra-op
    threads for the duration (None: leave them). The default of 1 makes the weights independent of the machine's
    core count (reduction order) and is the faster choice on busy machines: with one of 2 cores taken by other
    work, 2 threads ran an epoch in 30 s against 5.5 s for 1 thread, as these matrices are too small to split.
    """
    settings = replace(settings if settings is not None else TrainSettings(), **changes)
    if model is None:
        model = build(seed=settings.seed)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _fit(model, settings)
    finally:
        torch.set_num_threads(previous)
    return model.eval()


def _fit(model: nn.Module, settings: TrainSettings) -> None:
    images, labels = load_data("train")
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, round(settings.warmup_epochs * steps_per_epoch))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norm scales
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, total, warmup))
    model.train()
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for first in range(0, len(images), settings.batch_size):
            index = order[first : first + settings.batch_size]
            batch = images[index]
            if settings.max_shift:
                batch = _shift(batch, settings.max_shift, generator)
            loss = F.cross_entropy(model(batch), labels[index], label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach()) * len(index)
        log.debug("digits ViT epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, settings.epochs, running / len(images),
                  time.perf_counter() - start)


def default_cache_dir() -> Path:
    """``$TXC_CACHE_DIR/digits_vit`` if that variable is set, else ``~/.cache/txcompile/digits_vit``."""
    root = os.environ.get("TXC_CACHE_DIR", "")
    return Path(root) / "digits_vit" if root else Path.home() / ".cache" / "txcompile" / "digits_vit"


def _cache_key(arch: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    # A JSON round trip so the key compares equal to the one read back (tuples become lists, and so on).
    return json.loads(json.dumps({"data_version": DATA_VERSION, "arch": arch, "train": asdict(settings)}))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same directory and ``os.replace`` it: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a cache may be shared, and its files are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(directory: Path, key: dict[str, Any], arch: dict[str, Any]) -> reference.ViT | None:
    """The cached model if ``directory`` holds one trained with ``key`` whose weights are intact; else None (logged)."""
    from safetensors.torch import load_file

    weights, meta_path = directory / _WEIGHTS, directory / _META
    if not meta_path.exists():
        if weights.exists():
            log.warning("digits ViT: cache in %s is incomplete (%s without %s); retraining", directory, _WEIGHTS, _META)
        else:
            log.info("digits ViT: no cached model in %s; training one", directory)
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            log.warning("digits ViT: cache in %s was trained with another configuration; retraining", directory)
            return None
        if _sha256(weights) != meta.get("sha256"):
            raise ValueError(f"{weights.name} does not match the SHA-256 recorded in {meta_path.name}")
        model = build(seed=key["train"]["seed"], **arch)
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is retrained, never used
        log.warning("digits ViT: cache in %s is unreadable or corrupt (%s: %s); retraining",
                    directory, type(exc).__name__, exc)
        return None
    log.info("digits ViT: loaded from %s (test top-1 %.2f%%)", directory, meta.get("accuracy", float("nan")))
    return model.eval()


def load_or_train(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    settings: TrainSettings | None = None,
    retrain: bool = False,
    threads: int | None = 1,
    **arch_overrides: Any,
) -> reference.ViT:
    """The trained digits ViT, from ``cache_dir`` (default :func:`default_cache_dir`) or trained and cached there.

    A cache is used only if its recorded configuration (architecture, :class:`TrainSettings`, data version) equals
    the requested one and the weights match their recorded SHA-256; otherwise the model is retrained (with a log
    message saying why) and the cache overwritten. Both files are written atomically and the old JSON record is
    removed before and the new one written after the weights, so an interrupted run leaves either the previous
    complete cache or weights without a record, which are retrained. ``retrain=True``
    ignores any cache; ``threads`` goes to :func:`train`.
    """
    settings = settings if settings is not None else TrainSettings()
    arch = {**ARCH, **arch_overrides}
    key = _cache_key(arch, settings)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not retrain:
        cached = _load_cached(directory, key, arch)
        if cached is not None:
            return cached

    from safetensors.torch import save_file

    import txcompile

    start = time.perf_counter()
    model = train(build(seed=settings.seed, **arch), settings=settings, threads=threads)
    seconds = time.perf_counter() - start
    top1 = accuracy(model, *load_data("test"))
    log.info("digits ViT: trained in %.1f s, test top-1 %.2f%%; caching in %s", seconds, top1, directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The record goes first and comes back last: weights without a record are never taken for a finished cache.
    (directory / _META).unlink(missing_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    _atomic_write(directory / _WEIGHTS, lambda tmp: save_file(state, tmp))
    meta = {
        "key": key,
        "accuracy": top1,
        "train_seconds": round(seconds, 2),
        "seed": settings.seed,
        "sha256": _sha256(directory / _WEIGHTS),
        "txcompile": txcompile.__version__,
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
    }
    _atomic_write(directory / _META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return model
