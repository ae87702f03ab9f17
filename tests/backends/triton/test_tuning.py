"""The autotuner and its on-disk cache (txcompile.backends.triton.tuning), on CPU with made-up timings.

Every test points the cache at tmp_path: nothing is written under the real home directory. Device descriptions given
as strings ("gpu-a") count as real GPUs, so the tuner times under the interpreter too; the launcher tests swap the
timing function for one that runs the kernel (interpreted) and makes up a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from txcompile.backends.triton import tuning

CONFIGS = ({"BLOCK_M": 16, "num_warps": 1}, {"BLOCK_M": 32, "num_warps": 2}, {"BLOCK_M": 64, "num_warps": 4})
KEY = {"M": 128, "N": 64, "K": 32}


class Bench:
    """bench(config) -> seconds from a table keyed by BLOCK_M; raises for the BLOCK_Ms in `fail`; counts calls."""

    def __init__(self, seconds: dict[int, float], fail: tuple[int, ...] = ()) -> None:
        self.seconds, self.fail, self.calls = seconds, fail, []

    def __call__(self, config: dict) -> float:
        self.calls.append(config)
        if config["BLOCK_M"] in self.fail:
            raise RuntimeError(f"out of resources: shared memory, required {config['BLOCK_M'] * 4096}")
        return self.seconds[config["BLOCK_M"]]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TXCOMPILE_CACHE_DIR", str(root))
    monkeypatch.delenv("TXCOMPILE_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_switch", True)
    monkeypatch.setattr(tuning, "_decisions", {})
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "kernel_module.py"
    path.write_text("@triton.jit\ndef kernel(): pass\n")
    return path


def _files(cache: Path) -> list[Path]:
    return sorted((cache / "tuning").glob("*")) if (cache / "tuning").exists() else []


def _pick(tuner: tuning.Tuner, bench, **overrides) -> dict:
    args = {"key": KEY, "dtypes": [torch.float16], "device": "gpu-a", "bench": bench, **overrides}
    return tuner.pick(args.pop("configs", CONFIGS), **args)


def test_fastest_config_wins_and_is_saved(cache: Path, source: Path) -> None:
    bench = Bench({16: 3e-5, 32: 1e-5, 64: 2e-5})
    best = _pick(tuning.Tuner("gemm", source), bench)
    assert best == CONFIGS[1]
    assert len(bench.calls) == 3
    (path,) = _files(cache)
    assert path.name.startswith("gemm-") and path.suffix == ".json" and len(path.stem) == len("gemm-") + 24
    record = json.loads(path.read_text())
    assert record["best"] == CONFIGS[1]
    assert [t["seconds"] for t in record["timings"]] == [3e-5, 1e-5, 2e-5]
    parts = record["parts"]
    assert parts["key"] == KEY and parts["dtypes"] == ["torch.float16"] and parts["device"] == "gpu-a"
    assert parts["triton"] == tuning.TRITON_VERSION and len(parts["source"]) == 64
    (decision,) = tuning.tuned()
    assert decision["kernel"] == "gemm" and decision["best"] == CONFIGS[1] and decision["origin"] == "timed"
    assert decision["file"] == str(path)


def test_memory_then_disk_without_timing_again(cache: Path, source: Path) -> None:
    tuner = tuning.Tuner("gemm", source)
    _pick(tuner, Bench({16: 3.0, 32: 1.0, 64: 2.0}))
    again = Bench({16: 1.0, 32: 2.0, 64: 3.0})  # would pick another config if it were asked
    assert _pick(tuner, again) == CONFIGS[1]
    fresh = tuning.Tuner("gemm", source)  # a new process, as far as memory goes
    assert _pick(fresh, again) == CONFIGS[1]
    assert again.calls == []
    assert [d["origin"] for d in tuning.tuned()] == ["disk"]
    assert len(_files(cache)) == 1


def test_returned_config_is_a_copy(source: Path) -> None:
    tuner = tuning.Tuner("gemm", source)
    _pick(tuner, Bench({16: 3.0, 32: 1.0, 64: 2.0}))["BLOCK_M"] = 999
    assert _pick(tuner, Bench({}))["BLOCK_M"] == 32


@pytest.mark.parametrize("change", ["source", "shape", "dtype", "device", "triton", "configs", "kernel"])
def test_every_key_part_gets_its_own_file(
    change: str, cache: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pick(tuning.Tuner("gemm", source), Bench({16: 3.0, 32: 1.0, 64: 2.0}))
    kernel, overrides = "gemm", {}
    if change == "source":
        source.write_text(source.read_text() + "# edited\n")
    elif change == "shape":
        overrides["key"] = {**KEY, "M": 256}
    elif change == "dtype":
        overrides["dtypes"] = [torch.bfloat16]
    elif change == "device":
        overrides["device"] = "gpu-b"
    elif change == "triton":
        monkeypatch.setattr(tuning, "TRITON_VERSION", "0.0.1")
    elif change == "configs":
        overrides["configs"] = CONFIGS[:2]
    else:
        kernel = "other"
    bench = Bench({16: 1.0, 32: 2.0, 64: 3.0})
    assert _pick(tuning.Tuner(kernel, source), bench, **overrides) == CONFIGS[0]
    assert len(bench.calls) == len(overrides.get("configs", CONFIGS))
    assert len(_files(cache)) == 2


def test_failing_configs_are_skipped_and_recorded(cache: Path, source: Path) -> None:
    bench = Bench({16: 3.0, 32: 1.0, 64: 2.0}, fail=(32,))
    assert _pick(tuning.Tuner("gemm", source), bench) == CONFIGS[2]
    record = json.loads(_files(cache)[0].read_text())
    failed = [t for t in record["timings"] if "error" in t]
    assert [t["config"] for t in failed] == [CONFIGS[1]]
    assert "RuntimeError: out of resources" in failed[0]["error"]


def test_a_non_finite_time_counts_as_a_failure(source: Path) -> None:
    bench = Bench({16: float("nan"), 32: 2.0, 64: float("inf")})
    assert _pick(tuning.Tuner("gemm", source), bench) == CONFIGS[1]


def test_all_configs_failing_is_a_clear_error(cache: Path, source: Path) -> None:
    bench = Bench({}, fail=(16, 32, 64))
    with pytest.raises(tuning.TuningError, match=r"gemm: every candidate config failed on gpu-a") as info:
        _pick(tuning.Tuner("gemm", source), bench)
    assert str(info.value).count("out of resources") == 3
    assert _files(cache) == [] and tuning.tuned() == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: "{ not json",
        lambda r: json.dumps(r)[: len(json.dumps(r)) // 2],  # cut short
        lambda r: json.dumps([r]),
        lambda r: json.dumps({**r, "best": {"BLOCK_M": 128, "num_warps": 8}}),
        lambda r: json.dumps({**r, "parts": {**r["parts"], "device": "gpu-z"}}),
        lambda r: json.dumps({**r, "format": 0}),
    ],
    ids=["garbage", "truncated", "not-a-dict", "foreign-best", "other-parts", "old-format"],
)
def test_a_corrupt_or_mismatching_file_is_tuned_again(damage, cache: Path, source: Path) -> None:
    _pick(tuning.Tuner("gemm", source), Bench({16: 3.0, 32: 1.0, 64: 2.0}))
    (path,) = _files(cache)
    path.write_text(damage(json.loads(path.read_text())))
    bench = Bench({16: 1.0, 32: 2.0, 64: 3.0})
    assert _pick(tuning.Tuner("gemm", source), bench) == CONFIGS[0]
    assert len(bench.calls) == 3
    assert json.loads(path.read_text())["best"] == CONFIGS[0]
    assert _files(cache) == [path]


def test_no_temporary_file_is_left_when_saving_fails(
    cache: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src, dst):
        raise OSError("read-only file system")

    monkeypatch.setattr(tuning.os, "replace", refuse)
    with pytest.warns(RuntimeWarning, match="could not save tuning results"):
        best = _pick(tuning.Tuner("gemm", source), Bench({16: 3.0, 32: 1.0, 64: 2.0}))
    assert best == CONFIGS[1]  # the call still gets its config; only the cache entry is lost
    assert _files(cache) == []


def test_untimed_devices_use_the_first_config_and_write_nothing(cache: Path, source: Path) -> None:
    # conftest sets TRITON_INTERPRET=1 without CUDA ("interpreter"); with CUDA a CPU tensor is "cpu". Neither is timed.
    assert tuning.describe_device(torch.device("cpu")) in ("interpreter", "cpu")
    bench = Bench({16: 3.0, 32: 1.0, 64: 2.0})
    tuner = tuning.Tuner("gemm", source)
    for device in (torch.device("cpu"), "interpreter", "cpu"):
        assert _pick(tuner, bench, device=device) == CONFIGS[0]
    assert bench.calls == [] and _files(cache) == [] and tuning.tuned() == []


def test_turned_off_by_env_or_switch(cache: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = Bench({16: 3.0, 32: 1.0, 64: 2.0})
    tuner = tuning.Tuner("gemm", source)
    monkeypatch.setenv("TXCOMPILE_AUTOTUNE", "0")
    assert not tuning.enabled()
    assert _pick(tuner, bench) == CONFIGS[0]
    monkeypatch.setenv("TXCOMPILE_AUTOTUNE", "1")
    with tuning.autotuning(False):
        assert not tuning.enabled()
        assert _pick(tuner, bench) == CONFIGS[0]
    assert tuning.enabled()
    assert bench.calls == [] and _files(cache) == []
    assert tuning.set_enabled(False) is True and tuning.set_enabled(True) is False


def test_a_cuda_graph_capture_uses_what_is_known_and_times_nothing(
    cache: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning, "describe_device", lambda device: "gpu-a")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    bench = Bench({16: 3.0, 32: 1.0, 64: 2.0})
    cuda = torch.device("cuda", 0)
    assert _pick(tuning.Tuner("gemm", source), bench, device=cuda) == CONFIGS[0]
    assert bench.calls == [] and _files(cache) == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _pick(tuning.Tuner("gemm", source), bench, device=cuda) == CONFIGS[1]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _pick(tuning.Tuner("gemm", source), bench, device=cuda) == CONFIGS[1]  # from the file
    assert len(bench.calls) == 3


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TXCOMPILE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("TXCOMPILE_CACHE_DIR")
    assert tuning.cache_root() == tmp_path / "xdg" / "txcompile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_root() == tmp_path / "home" / ".cache" / "txcompile"


def test_compiled_kernels_go_to_the_cache_unless_the_user_chose(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first so that the teardown restores whatever was there, also after the function below sets it.
    monkeypatch.setenv("TRITON_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert tuning.use_disk_cache_for_compiled_kernels() == cache / "triton"
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
    triton = pytest.importorskip("triton")
    if hasattr(triton, "knobs"):  # Triton >= 3.4 reads the variable through its knobs, on every cache lookup
        assert triton.knobs.cache.dir == str(cache / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    assert tuning.use_disk_cache_for_compiled_kernels() == Path("/somewhere/else")
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"


def test_next_power_of_2() -> None:
    assert [tuning.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1, 1, 2, 4, 4, 8, 1024, 1024, 2048,
    ]  # fmt: skip


def test_launch_parameters() -> None:
    blocks, options = tuning.launch_parameters({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}, ("BLOCK_M", "BLOCK_N"))
    assert blocks == {"BLOCK_M": 64, "BLOCK_N": 32} and options == {"num_warps": 4}
    with pytest.raises(ValueError, match="missing BLOCK_N"):
        tuning.launch_parameters({"BLOCK_M": 64}, ("BLOCK_M", "BLOCK_N"))
    with pytest.raises(ValueError, match="unknown BLOCK_Q"):
        tuning.launch_parameters({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_Q": 1}, ("BLOCK_M", "BLOCK_N"))
    with pytest.raises(ValueError, match="config must be a dict"):
        tuning.launch_parameters([64, 64], ("BLOCK_M", "BLOCK_N"))


# --- the launchers ----------------------------------------------------------------------------------------------------

triton = pytest.importorskip("triton")

from txcompile.backends.triton.kernels import _common, attention, int8_gemm, linear_epilogue  # noqa: E402

interpreted = pytest.mark.skipif(not _common.INTERPRET, reason="runs the kernels under TRITON_INTERPRET=1")


@interpreted
def test_the_interpreter_keeps_its_small_tiles() -> None:
    lists = [linear_epilogue._ACT_CONFIGS, linear_epilogue._SWIGLU_CONFIGS, int8_gemm._CONFIGS]
    lists += [attention._candidates(dtype, 256) for dtype in (torch.float16, torch.float32)]
    for configs in lists:
        assert len(configs) == 1
        assert configs[0]["BLOCK_M"] == configs[0]["BLOCK_N"] == 16 and configs[0]["num_warps"] == 1


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> list:
    """Makes the launchers tune under the interpreter: a made-up GPU, and a timer that runs the launch (so every
    candidate really executes) and reports ever shorter times, so the last candidate wins."""
    runs = []

    def seconds(launch) -> float:
        launch()
        runs.append(launch)
        return 1.0 / len(runs)

    monkeypatch.setattr(tuning, "describe_device", lambda device: "fake-gpu")
    monkeypatch.setattr(tuning, "cuda_seconds", seconds)
    return runs


@interpreted
def test_linear_act_tunes_per_bucket(timed: list, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = (
        linear_epilogue._INTERPRETER_CONFIG,
        {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 1, "num_stages": 1},
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 2, "num_stages": 2},
    )
    monkeypatch.setattr(linear_epilogue, "_ACT_CONFIGS", configs)
    monkeypatch.setattr(linear_epilogue, "_ACT_TUNER", tuning.Tuner("linear_act", linear_epilogue.__file__))
    w, b = torch.randn(40, 24), torch.randn(40)
    for m in (5, 7, 8, 9):  # buckets 8, 8, 8, 16
        x = torch.randn(m, 24)
        torch.testing.assert_close(
            linear_epilogue.linear_act(x, w, b, "gelu"), linear_epilogue.linear_act_reference(x, w, b, "gelu")
        )
    assert len(timed) == 6  # three candidates for M <= 8, three for M = 16
    records = sorted((json.loads(p.read_text()) for p in _files(cache)), key=lambda r: r["parts"]["key"]["M"])
    assert [r["parts"]["key"] for r in records] == [
        {"M": 8, "N": 40, "K": 24, "activation": "gelu"},
        {"M": 16, "N": 40, "K": 24, "activation": "gelu"},
    ]
    assert all(r["kernel"] == "linear_act" and r["best"] == configs[2] for r in records)
    assert records[0]["parts"]["dtypes"] == ["torch.float32"] and records[0]["parts"]["device"] == "fake-gpu"


@interpreted
def test_attention_tunes_on_its_key(timed: list, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = (
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1},
        {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
    )
    monkeypatch.setattr(attention, "_candidates", lambda dtype, block_d: configs)
    monkeypatch.setattr(attention, "_TUNER", tuning.Tuner("attention", attention.__file__))
    q, k, v = torch.randn(1, 4, 19, 8), torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    kp = torch.ones(1, 19, dtype=torch.bool)
    kp[0, -3:] = False
    out = attention.attention(q, k, v, key_padding=kp, causal=True)
    torch.testing.assert_close(out, attention.attention_reference(q, k, v, key_padding=kp, causal=True))
    assert len(timed) == 2
    (record,) = (json.loads(p.read_text()) for p in _files(cache))
    assert record["parts"]["key"] == {
        "Tq": 32, "Tk": 32, "D": 8, "causal": True, "bias": "none", "key_padding": True, "kv_group": 2,
    }  # fmt: skip
    assert record["best"] == configs[1]


@interpreted
def test_a_forced_config_skips_the_tuner(timed: list, cache: Path) -> None:
    x_q = torch.randint(-127, 128, (9, 70), dtype=torch.int8)
    w_q = torch.randint(-127, 128, (20, 70), dtype=torch.int8)
    w_scale = torch.rand(20) + 0.5
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
    out = int8_gemm.int8_gemm(x_q, w_q, 0.01, w_scale, config=config)
    torch.testing.assert_close(out, int8_gemm.int8_gemm_reference(x_q, w_q, 0.01, w_scale))

    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = attention.varlen_attention(q, k, v, cu, 7, config={"BLOCK_M": 32, "BLOCK_N": 32})
    torch.testing.assert_close(out, attention.varlen_attention_reference(q, k, v, cu, 7))
    assert timed == [] and _files(cache) == []
    with pytest.raises(ValueError, match="missing BLOCK_K"):
        linear_epilogue.linear_act(torch.randn(3, 8), torch.randn(4, 8), config={"BLOCK_M": 16, "BLOCK_N": 16})
