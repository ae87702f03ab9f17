"""Per-shape autotuning of the Triton kernels, with the results kept on disk.

A launcher that has several candidate configs (plain dicts of block sizes, num_warps and num_stages) asks a
`Tuner` which one to use:

    cfg = TUNER.pick(configs, key={"M": next_power_of_2(m), "N": n, "K": k}, dtypes=[x.dtype], device=x.device,
                     bench=lambda c: cuda_seconds(lambda: launch(c)))

and launches with it (`TUNER.launch(launch, configs, key=..., dtypes=..., device=...)` does both). The decision is
looked up in three places, cheapest first:

1. the tuner's in-memory dict, keyed by the call's (key, dtypes, device, candidates);
2. `cache_root()/tuning/<kernel>-<hash>.json`, where the hash covers everything a timing depends on: the sha256 of
   the kernel module's file (any edit re-tunes), the key (the caller buckets sizes that vary per call, such as the
   token count, so that every batch does not re-tune), the dtypes, the device (name and compute capability), the
   Triton version and the candidate list. The file holds those parts, every candidate's time (or why it failed)
   and the winner, and is only ever replaced whole (written beside itself, then `os.replace`), so a reader never
   sees half of one. A file that does not parse or whose parts differ from the call's is tuned again and replaced;
3. timing every candidate with `bench(config) -> seconds`. A candidate that raises (too much shared memory or too
   many registers for this GPU, a compile error) is recorded as failed and skipped; only when all fail is the call
   an error.

Timing is skipped, and the first candidate used, under the Triton interpreter (its speed says nothing about a GPU's),
with `TXCOMPILE_AUTOTUNE=0` in the environment or inside `autotuning(False)`. Callers therefore put a config that
compiles for every input of the key first. While a CUDA graph is being captured, a decision already made is used
but nothing new is timed, since timing synchronises the device and would break the capture.

Triton keeps compiled kernels in its own cache, already keyed by the kernel source, compile options, target and
Triton version; `use_disk_cache_for_compiled_kernels` only moves that cache under `cache_root()` as well.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "Tuner",
    "TuningError",
    "autotuning",
    "cache_root",
    "cuda_seconds",
    "describe_device",
    "enabled",
    "launch_parameters",
    "next_power_of_2",
    "set_enabled",
    "tuned",
    "use_disk_cache_for_compiled_kernels",
]

try:
    import triton

    TRITON_VERSION = triton.__version__
except ImportError:  # the tuner must import anyway; nothing gets launched without triton
    TRITON_VERSION = "none"

_FORMAT = 1
# Descriptions of devices whose timings would mean nothing for a GPU.
_UNTIMED = ("interpreter", "cpu")
# Launch options that triton takes beside the constexpr block sizes.
_OPTIONS = ("num_warps", "num_stages")

_switch = True
# Every decision made in this process, by digest: what `tuned()` reports.
_decisions: dict[str, dict] = {}


class TuningError(RuntimeError):
    """No candidate config could be run for a kernel."""


def cache_root() -> Path:
    """$TXCOMPILE_CACHE_DIR, else $XDG_CACHE_HOME/txcompile, else ~/.cache/txcompile (read on every call)."""
    if path := os.environ.get("TXCOMPILE_CACHE_DIR"):
        return Path(path)
    if path := os.environ.get("XDG_CACHE_HOME"):
        return Path(path) / "txcompile"
    return Path.home() / ".cache" / "txcompile"


def use_disk_cache_for_compiled_kernels() -> Path:
    """Point Triton's compiled-kernel cache at cache_root()/triton unless the user chose one; returns the one in use.

    Triton reads TRITON_CACHE_DIR each time it opens its cache (`triton.knobs.cache.dir`), so this takes effect
    for every kernel compiled afterwards. A directory set through `triton.knobs` is also in the environment.
    """
    return Path(os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton")))


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): the bucket for a size that changes from call to call."""
    return 1 << max(0, int(n) - 1).bit_length()


def set_enabled(flag: bool) -> bool:
    """Turn timing on or off for the whole process; returns the previous setting."""
    global _switch
    previous, _switch = _switch, bool(flag)
    return previous


@contextlib.contextmanager
def autotuning(flag: bool) -> Iterator[None]:
    """`set_enabled(flag)` for the duration of a `with` block."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def enabled() -> bool:
    """Whether timing may happen: the switch is on and TXCOMPILE_AUTOTUNE is not 0/false/off/no."""
    return _switch and os.environ.get("TXCOMPILE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def describe_device(device: torch.device | str) -> str:
    """What the timings are valid for: "interpreter" under TRITON_INTERPRET, e.g. "NVIDIA H100 80GB HBM3 (sm_90)"
    for a GPU, else the device type.

    A string is taken as a description already and returned unchanged (tests use made-up ones).
    """
    if isinstance(device, str):
        return device
    if _interpreting():
        return "interpreter"
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _interpreting() -> bool:
    from .kernels._common import INTERPRET  # not at the top: _common imports this module

    return INTERPRET


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def cuda_seconds(launch: Callable[[], object]) -> float:
    """The median time of `launch()` on the GPU in seconds (`triton.testing.do_bench`).

    do_bench's first call compiles the kernel, so a config that does not fit raises here and the tuner skips it.
    """
    from triton.testing import do_bench

    return do_bench(launch, return_mode="median") / 1e3


def launch_parameters(config: Mapping, blocks: Sequence[str]) -> tuple[dict, dict]:
    """Split a config into the kernel's constexpr block sizes and triton's launch options (num_warps/num_stages).

    Every name in `blocks` must be there; anything else is an error, so that a mistyped forced config fails loudly.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict like {{{', '.join(f'{b!r}: 64' for b in blocks)}}}, got {config!r}")
    missing = [b for b in blocks if b not in config]
    unknown = [name for name in config if name not in blocks and name not in _OPTIONS]
    if missing or unknown:
        raise ValueError(
            f"config {dict(config)} needs {', '.join(blocks)} and may set {', '.join(_OPTIONS)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(map(str, unknown))}" if unknown else "")
        )
    return {b: config[b] for b in blocks}, {o: config[o] for o in _OPTIONS if o in config}


def tuned() -> list[dict]:
    """Every decision made in this process: kernel, key parts, timings, winner ("best"), "origin" (timed or disk)
    and the file it lives in. Copies: changing them changes nothing."""
    return copy.deepcopy(list(_decisions.values()))


class Tuner:
    """Chooses a config per call for one kernel, remembering its choices in memory and on disk (see the module doc).

    `source` is the file of the module that defines the kernel; its bytes are hashed once, here.
    """

    def __init__(self, kernel: str, source: str | os.PathLike) -> None:
        self.kernel = kernel
        self.source = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        self._memo: dict[tuple, dict] = {}
        self._frozen_by_id: dict[int, tuple] = {}

    def pick(
        self,
        configs: Sequence[Mapping],
        *,
        key: Mapping[str, object],
        dtypes: Sequence[torch.dtype | str],
        device: torch.device | str,
        bench: Callable[[dict], float],
    ) -> dict:
        """The config to launch with (a fresh dict). `configs` are the candidates, the first one the default;
        `key` holds the (bucketed) sizes and variant flags, JSON scalars; `bench(config)` runs the kernel with
        `config` and returns its time in seconds."""
        if not configs:
            raise ValueError(f"{self.kernel}: no candidate configs")
        where = describe_device(device)
        if not enabled() or where in _UNTIMED:
            return dict(configs[0])
        dtypes = [str(d) for d in dtypes]
        memo_key = (tuple(key.items()), tuple(dtypes), where, self._frozen(configs))
        if (best := self._memo.get(memo_key)) is not None:
            return dict(best)

        # Through JSON and back: what is compared with a file must look exactly like what the file holds.
        parts = json.loads(json.dumps({
            "source": self.source,
            "key": dict(key),
            "dtypes": dtypes,
            "device": where,
            "triton": TRITON_VERSION,
            "configs": [dict(c) for c in configs],
        }))  # fmt: skip
        digest = hashlib.sha256(json.dumps([self.kernel, parts], sort_keys=True).encode()).hexdigest()
        path = cache_root() / "tuning" / f"{self.kernel}-{digest[:24]}.json"
        record, origin = self._read(path, parts), "disk"
        if record is None:
            if isinstance(device, torch.device) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return dict(configs[0])  # tuned on the next call outside the capture
            record, origin = self._time(parts, bench), "timed"
            _write(path, record)
        self._memo[memo_key] = record["best"]
        _decisions[digest] = {**record, "origin": origin, "file": str(path)}
        return dict(record["best"])

    def launch(
        self,
        launch: Callable[[dict], object],
        configs: Sequence[Mapping],
        *,
        key: Mapping[str, object],
        dtypes: Sequence[torch.dtype | str],
        device: torch.device | str,
        config: Mapping | None = None,
    ) -> None:
        """`launch(config)` with the given config, else with the picked one (candidates timed by `cuda_seconds`)."""
        if config is None:

            def bench(candidate: dict) -> float:
                return cuda_seconds(lambda: launch(candidate))

            config = self.pick(configs, key=key, dtypes=dtypes, device=device, bench=bench)
        launch(dict(config))

    def _frozen(self, configs: Sequence[Mapping]) -> tuple:
        # Launchers pass the same module-level tuple on every call: its hashable form is built once and found again
        # by identity (the reference kept here stops the id from being reused by another object).
        seen = self._frozen_by_id.get(id(configs))
        if seen is None or seen[0] is not configs:
            seen = (configs, tuple(tuple(c.items()) for c in configs))
            self._frozen_by_id[id(configs)] = seen
        return seen[1]

    def _read(self, path: Path, parts: dict) -> dict | None:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # missing, unreadable or not JSON: tune again
            return None
        ok = (
            isinstance(record, dict)
            and record.get("format") == _FORMAT
            and record.get("kernel") == self.kernel
            and record.get("parts") == parts  # the file name holds only part of the hash
            and record.get("best") in parts["configs"]
        )
        return record if ok else None

    def _time(self, parts: dict, bench: Callable[[dict], float]) -> dict:
        timings = []
        for config in parts["configs"]:
            try:
                seconds = float(bench(dict(config)))
                if not math.isfinite(seconds) or seconds < 0:
                    raise ValueError(f"bench returned {seconds} seconds")
                timings.append({"config": config, "seconds": seconds})
            except Exception as e:  # whatever goes wrong with one candidate rules out that candidate only
                timings.append({"config": config, "error": f"{type(e).__name__}: {e}"[:500]})
        ran = [t for t in timings if "seconds" in t]
        if not ran:
            reasons = "\n".join(f"  {t['config']}: {t['error']}" for t in timings)
            raise TuningError(f"{self.kernel}: every candidate config failed on {parts['device']} for "
                              f"key {parts['key']}, dtypes {parts['dtypes']}:\n{reasons}")  # fmt: skip
        best = min(ran, key=lambda t: t["seconds"])["config"]
        return {"format": _FORMAT, "kernel": self.kernel, "parts": parts, "timings": timings, "best": best}


def _write(path: Path, record: dict) -> None:
    """Replace `path` by `record` in one step; a failure costs the cache entry, never the call."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target: os.replace is atomic only within one file system.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them, even after a crash
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not save tuning results to {path}: {e}", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
