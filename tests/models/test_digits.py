"""Tests for the digits ViT in ``txcompile.models.digits``: data, training, the weight cache and capture."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import txcompile as txc

pytest.importorskip("sklearn")
from txcompile.models import digits  # noqa: E402 - after the skip: load_data needs scikit-learn

# A few seconds of training instead of a minute: no augmentation and small batches converge fastest
# (about 91% test top-1 with seed 0; the full recipe reaches about 97%).
QUICK = digits.TrainSettings(epochs=3, batch_size=16, max_shift=0)
# Just enough training to exercise the cache code with real weights.
TINY = digits.TrainSettings(epochs=1, batch_size=64, max_shift=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """(model trained with QUICK, its cache dir), trained once per session."""
    cache = tmp_path_factory.mktemp("digits_cache")
    return digits.load_or_train(cache, settings=QUICK), cache


@pytest.fixture(scope="session")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return digits.load_data("test")


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("load_or_train trained although a valid cache was present")


def test_data_shapes_split_and_determinism() -> None:
    train_x, train_y = digits.load_data("train")
    test_x, test_y = digits.load_data("test")
    assert train_x.shape == (1438, 1, 16, 16) and test_x.shape == (359, 1, 16, 16)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(test_y.tolist()) == set(range(10))
    # Normalised to roughly zero mean and unit variance.
    assert abs(float(train_x.mean())) < 0.1 and 0.7 < float(train_x.std()) < 1.1
    again_x, again_y = digits.load_data("test")
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)
    with pytest.raises(ValueError, match="split"):
        digits.load_data("val")  # type: ignore[arg-type]


def test_build_is_seeded_and_shaped() -> None:
    a, b, c = digits.build(seed=0), digits.build(seed=0), digits.build(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)
    (images,) = digits.example_inputs(batch=8)
    with torch.no_grad():
        assert a(images).shape == (8, 10)
    assert digits.build(depth=2).config.depth == 2


def test_quick_training_beats_chance(trained, test_split) -> None:
    model, cache = trained
    top1 = digits.accuracy(model, *test_split)
    assert top1 > 80.0, f"3 quick epochs gave {top1:.1f}% test top-1 (chance is 10%)"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["accuracy"] == pytest.approx(top1)
    assert meta["seed"] == 0 and meta["key"]["train"]["epochs"] == QUICK.epochs
    assert {"txcompile", "torch", "sha256", "train_seconds"} <= meta.keys()


def test_cache_round_trip(trained, test_split, monkeypatch) -> None:
    model, cache = trained
    monkeypatch.setattr(digits, "train", _no_training)
    loaded = digits.load_or_train(cache, settings=QUICK)
    images = test_split[0][:32]
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert not loaded.training


def test_other_config_is_retrained(trained, tmp_path, monkeypatch, caplog) -> None:
    _, cache = trained
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    calls = []
    monkeypatch.setattr(digits, "train", lambda model, **kw: calls.append(kw) or model.eval())
    with caplog.at_level(logging.INFO, logger=digits.__name__):
        digits.load_or_train(tmp_path, settings=QUICK, depth=2)
    assert len(calls) == 1 and "another configuration" in caplog.text
    # The retrained model replaced the cache, so asking again loads it.
    monkeypatch.setattr(digits, "train", _no_training)
    assert digits.load_or_train(tmp_path, settings=QUICK, depth=2).config.depth == 2


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """(model trained with TINY, its cache dir)."""
    cache = tmp_path_factory.mktemp("digits_tiny")
    return digits.load_or_train(cache, settings=TINY), cache


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_meta"])
def test_damaged_cache_is_retrained(tiny, tmp_path, monkeypatch, caplog, damage: str) -> None:
    model, cache = tiny
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip_byte":
        data[-5] ^= 0xFF  # inside the tensor data: safetensors itself still parses the file
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (tmp_path / "meta.json").unlink()  # as if interrupted between writing the weights and the record
    if damage != "flip_byte":  # one real retraining (below) is enough; the others only check detection
        monkeypatch.setattr(digits, "train", lambda model, **kw: model.eval())
    with caplog.at_level(logging.WARNING, logger=digits.__name__):
        retrained = digits.load_or_train(tmp_path, settings=TINY)
    assert "retraining" in caplog.text
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"
    if damage == "flip_byte":
        # Same seed and settings: retraining reproduces the weights exactly.
        for (name, a), b in zip(model.state_dict().items(), retrained.state_dict().values()):
            assert torch.equal(a, b), name


def test_interrupted_write_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "meta.json"
    target.write_text("old")

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        digits._atomic_write(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_capture_anatomy_and_other_batch(trained, test_split) -> None:
    model, _ = trained
    gm = txc.capture(model, digits.example_inputs(batch=8))
    anat = txc.anatomy(gm)
    assert len(anat.blocks) == model.config.depth == digits.ARCH["depth"]
    assert anat.norm_position == "pre" and anat.attention_kind is not None
    images, labels = test_split
    with torch.no_grad():
        assert_close(gm(images[:5]), model(images[:5]), rtol=1e-4, atol=1e-5)
    assert digits.accuracy(gm, images, labels, batch_size=100) == digits.accuracy(model, images, labels)
