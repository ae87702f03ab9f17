"""Pass specs: "name:key=value,key=value" strings <-> pass dataclasses.

The registry is the explicit tuple `txcompile.passes.ALL_PASSES`; nothing registers itself at import time.
Option values are parsed by the type annotation of the dataclass field (int, float, bool, str, Literal[...],
`X | None`), then the pass's own `__post_init__` validates them. Every failure is a `SpecError` that names the
spec, the option and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .errors import SpecError

__all__ = [
    "OptionInfo",
    "PassInfo",
    "pass_types",
    "parse_spec",
    "parse_options",
    "split_pipeline",
    "format_spec",
    "resolve_passes",
    "list_passes",
]


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    help: str


@dataclass(frozen=True)
class PassInfo:
    name: str
    contract: str
    summary: str
    options: tuple[OptionInfo, ...]
    cls: type


def pass_types() -> dict[str, type]:
    from .passes import ALL_PASSES

    return {cls.name: cls for cls in ALL_PASSES}


def _suggest(word: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_label(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(_type_label(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _parse_value(raw: str, tp: Any) -> Any:
    """Parse one option value by its annotation; raise ValueError with the expected form."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if str(c) == raw:
                return c
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    if origin is not None and type(None) in get_args(tp):  # X | None
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse_value(raw, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors) + " or none")
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number (inf allowed)") from None
        if math.isnan(value):
            raise ValueError("expected a number, not nan")
        return value
    if tp is str:
        return raw
    raise ValueError(f"options of type {_type_label(tp)} cannot be given in a spec string")


def parse_spec(spec: str) -> Any:
    """Build the pass that `spec` names: "token_merge:r=8,schedule=constant" -> TokenMerge(r=8, schedule="constant")."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(
            f"a pass spec must be a non-empty string like 'cleanup' or 'fuse_qkv:gated_mlp=true', got {spec!r}"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    types = pass_types()
    if name not in types:
        raise SpecError(f"unknown pass '{name}'{_suggest(name, types)}; valid passes: {', '.join(sorted(types))}")
    return parse_options(types[name], rest, f"pass '{name}'")


def parse_options(cls: type, rest: str, label: str) -> Any:
    """Build `cls` from "key=value,key=value", parsing each value by the dataclass field's annotation."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise SpecError(f"{label}: option '{item}' has no value; write {key}=VALUE")
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise SpecError(f"{label} has no option '{key}'{_suggest(key, fields)}; valid options: {valid}")
        if key in kwargs:
            raise SpecError(f"{label}: option '{key}' is given twice")
        try:
            kwargs[key] = _parse_value(raw.strip(), hints[key])
        except ValueError as e:
            raise SpecError(f"{label}: bad value {key}={raw.strip()!r}: {e}") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise SpecError(f"{label}: {e}") from None


def format_spec(p: Any) -> str:
    """The shortest spec string that builds `p` again (options equal to their defaults are left out)."""
    parts = []
    for f in dataclasses.fields(p):
        if not f.init:
            continue
        value = getattr(p, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if value != default:
            parts.append(f"{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return p.name + (":" + ",".join(parts) if parts else "")


def split_pipeline(text: str) -> list[str]:
    """Split "token_merge:r=8,schedule=constant,cleanup" into one spec per pass.

    A comma-separated item of the form key=value (no ':') continues the options of the pass before it; any other
    item starts a new pass. ';' and whitespace also separate passes.
    """
    specs: list[str] = []
    for chunk in text.replace(";", " ").split():
        for item in filter(None, (s.strip() for s in chunk.split(","))):
            continues = "=" in item and ":" not in item.split("=", 1)[0]
            if continues and specs:
                specs[-1] += ("," if ":" in specs[-1] else ":") + item
            else:
                specs.append(item)
    return specs


def resolve_passes(passes: Sequence[Any] | str | None) -> tuple[Any, ...]:
    """Turn the `passes=` argument (spec strings, pass objects, or one pipeline string) into pass instances."""
    if passes is None:
        return ()
    if isinstance(passes, str):
        passes = [passes]
    if not isinstance(passes, Sequence):
        raise SpecError(f"passes must be a list of pass specs or pass objects, got {type(passes).__name__}")
    from .pipeline import Pass

    out = []
    for p in passes:
        if isinstance(p, str):
            specs = split_pipeline(p)
            if not specs:
                raise SpecError(f"empty pass spec {p!r}; valid passes: {', '.join(sorted(pass_types()))}")
            out.extend(parse_spec(s) for s in specs)
        elif isinstance(p, Pass) and dataclasses.is_dataclass(p) and not isinstance(p, type):
            out.append(p)
        else:
            raise SpecError(
                f"passes must hold spec strings like 'cleanup' or pass objects like FuseQKV(), got {p!r} "
                f"({type(p).__name__})"
            )
    return tuple(out)


def list_passes() -> list[PassInfo]:
    """Every registered pass with its contract, one-line summary and options (type, default, help)."""
    infos = []
    for name, cls in sorted(pass_types().items()):
        hints = _hints(cls)
        options = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default: Any = "(required)"
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            options.append(OptionInfo(f.name, _type_label(hints[f.name]), default, f.metadata.get("help", "")))
        infos.append(PassInfo(name, cls.contract, cls.summary, tuple(options), cls))
    return infos
