"""Pass specs: "name:key=value" strings <-> pass dataclasses, and the errors users see when they get one wrong."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

import pytest

import txcompile.registry as registry
from txcompile.errors import SpecError, TxcError
from txcompile.passes import ALL_PASSES, Cleanup, FuseQKV
from txcompile.registry import format_spec, list_passes, parse_spec, resolve_passes, split_pipeline

REAL_NAMES = sorted(cls.name for cls in ALL_PASSES)


# Module-level on purpose: the registry resolves annotations with typing.get_type_hints, which looks names up in the
# defining module's globals, so a class defined inside a test function could not use Literal or `int | None`.
@dataclass(frozen=True)
class Knobs:
    name: ClassVar[str] = "knobs"
    contract: ClassVar[str] = "approximate"
    summary: ClassVar[str] = "one option of every type a spec string can carry"

    r: int = 0
    threshold: float = 0.5
    mode: Literal["mean", "max"] = "mean"
    budget: int | None = None
    label: str = "x"
    strict: bool = False

    def __call__(self, gm: Any, ctx: Any) -> Any:
        raise AssertionError("registry tests never run a pass")


@dataclass(frozen=True)
class Checked:
    name: ClassVar[str] = "checked"
    contract: ClassVar[str] = "exact"
    summary: ClassVar[str] = "validates its option in __post_init__"

    r: int = 0

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"r must be >= 0, got {self.r}")

    def __call__(self, gm: Any, ctx: Any) -> Any:
        raise AssertionError("registry tests never run a pass")


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    types = {cls.name: cls for cls in ALL_PASSES}
    types.update(knobs=Knobs, checked=Checked)
    monkeypatch.setattr(registry, "pass_types", lambda: dict(types))
    return types


def _spec_error(spec: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return str(info.value)


# --- every registered pass -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_PASSES, ids=lambda c: c.name)
def test_every_registered_pass_parses_from_its_bare_name(cls: type) -> None:
    p = parse_spec(cls.name)
    assert type(p) is cls
    assert p == cls()
    assert format_spec(p) == cls.name


def _other_value(tp: Any, default: Any) -> list[Any]:
    """Values different from `default` that a spec string can express for annotation `tp`."""
    origin = get_origin(tp)
    if origin is Literal:
        return [c for c in get_args(tp) if c != default]
    if origin is not None and type(None) in get_args(tp):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return ([None] if default is not None else []) + [v for a in inner for v in _other_value(a, default)]
    if tp is bool:
        return [not default]
    if tp is int:
        return [(default or 0) + 1]
    if tp is float:
        return [(default or 0.0) * 2 + 1, math.inf]
    if tp is str:
        return [f"{default}x"]
    return []


def _canonical_specs() -> list[str]:
    """One canonical spec per (registered pass, option value that is not the default), built from the annotations.

    Generated so that a pass added later is covered without editing this file.
    """
    specs = []
    for cls in ALL_PASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.default is dataclasses.MISSING:
                continue
            for value in _other_value(hints[f.name], f.default):
                try:
                    p = cls(**{f.name: value})
                except (ValueError, TypeError):
                    continue  # the pass's own validation rejects this value; not a registry question
                specs.append(format_spec(p))
    return specs


@pytest.mark.parametrize(
    "spec",
    [
        "cleanup",
        "cleanup:fold=false",
        "cleanup:cse=false",
        "cleanup:fold=false,cse=false",
        "fuse_qkv",
        "fuse_qkv:gated_mlp=true",
    ]
    + _canonical_specs(),
)
def test_canonical_spec_round_trips(spec: str) -> None:
    assert format_spec(parse_spec(spec)) == spec


def test_hand_written_specs_build_the_expected_objects() -> None:
    assert parse_spec("cleanup:fold=false,cse=false") == Cleanup(fold=False, cse=False)
    assert parse_spec("fuse_qkv:gated_mlp=true") == FuseQKV(gated_mlp=True)
    # Whitespace around names, keys and values is not part of the spec.
    assert parse_spec("  cleanup : fold = no , cse=true ") == Cleanup(fold=False)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("cleanup:fold=true", "cleanup"),  # defaults are left out
        ("cleanup:fold=no", "cleanup:fold=false"),
        ("cleanup:cse=0,fold=off", "cleanup:fold=false,cse=false"),  # field order, not the order given
        ("cleanup:", "cleanup"),
    ],
)
def test_non_canonical_specs_format_canonically(spec: str, canonical: str) -> None:
    assert format_spec(parse_spec(spec)) == canonical


# --- option typing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "yes", "1", "on"])
def test_bool_true_spellings(raw: str) -> None:
    assert parse_spec(f"fuse_qkv:gated_mlp={raw}").gated_mlp is True


@pytest.mark.parametrize("raw", ["false", "False", "no", "0", "off"])
def test_bool_false_spellings(raw: str) -> None:
    assert parse_spec(f"cleanup:fold={raw}").fold is False


@pytest.mark.parametrize(("raw", "value"), [("12", 12), ("-3", -3), ("0", 0)])
def test_int_option(toy_registry: dict, raw: str, value: int) -> None:
    r = parse_spec(f"knobs:r={raw}").r
    assert r == value and type(r) is int


@pytest.mark.parametrize(
    ("raw", "value"), [("inf", math.inf), ("-inf", -math.inf), ("1e-3", 1e-3), ("2", 2.0), ("0.25", 0.25)]
)
def test_float_option(toy_registry: dict, raw: str, value: float) -> None:
    t = parse_spec(f"knobs:threshold={raw}").threshold
    assert t == value and type(t) is float


def test_float_option_rejects_nan(toy_registry: dict) -> None:
    msg = _spec_error("knobs:threshold=nan")
    assert "threshold" in msg and "nan" in msg


@pytest.mark.parametrize("raw", ["mean", "max"])
def test_literal_option_accepts_its_choices(toy_registry: dict, raw: str) -> None:
    assert parse_spec(f"knobs:mode={raw}").mode == raw


def test_literal_option_rejects_others_and_lists_choices(toy_registry: dict) -> None:
    msg = _spec_error("knobs:mode=median")
    assert "mode" in msg and "median" in msg and "mean" in msg and "max" in msg


@pytest.mark.parametrize(("raw", "value"), [("none", None), ("None", None), ("null", None), ("5", 5)])
def test_optional_option(toy_registry: dict, raw: str, value: int | None) -> None:
    assert parse_spec(f"knobs:budget={raw}").budget == value


def test_optional_option_error_mentions_both_forms(toy_registry: dict) -> None:
    msg = _spec_error("knobs:budget=five")
    assert "budget" in msg and "integer" in msg and "none" in msg


def test_str_option_is_taken_verbatim(toy_registry: dict) -> None:
    assert parse_spec("knobs:label=Hello").label == "Hello"


def test_all_option_types_round_trip(toy_registry: dict) -> None:
    spec = "knobs:r=3,threshold=inf,mode=max,budget=4,label=hi,strict=true"
    p = parse_spec(spec)
    assert p == Knobs(r=3, threshold=math.inf, mode="max", budget=4, label="hi", strict=True)
    assert format_spec(p) == spec


# --- errors ----------------------------------------------------------------------------------------------------------


def test_spec_error_is_a_txc_value_error() -> None:
    # The CLI turns TxcError into one line; callers catching ValueError keep working.
    assert issubclass(SpecError, TxcError) and issubclass(SpecError, ValueError)


def test_unknown_pass_suggests_close_match_and_lists_valid() -> None:
    msg = _spec_error("fuse_qvk")
    assert "fuse_qvk" in msg
    assert "did you mean 'fuse_qkv'" in msg
    for name in REAL_NAMES:
        assert name in msg


def test_unknown_pass_without_close_match_still_lists_valid() -> None:
    msg = _spec_error("zzzz:r=1")
    assert "did you mean" not in msg
    assert all(name in msg for name in REAL_NAMES)


def test_unknown_key_lists_valid_keys_and_suggests() -> None:
    msg = _spec_error("cleanup:fodl=false")
    assert "fodl" in msg and "did you mean 'fold'" in msg
    assert "fold" in msg and "cse" in msg
    assert "cleanup" in msg


def test_bad_value_names_key_value_and_expected_type() -> None:
    msg = _spec_error("cleanup:fold=maybe")
    assert "fold" in msg and "maybe" in msg and "true or false" in msg


def test_bad_int_value_names_expected_type(toy_registry: dict) -> None:
    msg = _spec_error("knobs:r=1.5")
    assert "r=" in msg and "1.5" in msg and "integer" in msg


def test_duplicate_key() -> None:
    msg = _spec_error("cleanup:fold=true,fold=false")
    assert "fold" in msg and "twice" in msg


def test_key_without_value() -> None:
    msg = _spec_error("cleanup:fold")
    assert "no value" in msg and "fold=VALUE" in msg


@pytest.mark.parametrize("spec", ["", "   ", None, 3])
def test_empty_or_non_string_spec(spec: Any) -> None:
    with pytest.raises(SpecError, match="non-empty string"):
        parse_spec(spec)


def test_post_init_value_error_becomes_spec_error_naming_the_pass(toy_registry: dict) -> None:
    assert parse_spec("checked:r=2") == Checked(r=2)
    msg = _spec_error("checked:r=-1")
    assert "checked" in msg and "r must be >= 0" in msg


# --- split_pipeline --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "specs"),
    [
        ("a:x=1,y=2,b", ["a:x=1,y=2", "b"]),
        ("a,b:x=1", ["a", "b:x=1"]),
        ("cleanup;fuse_qkv", ["cleanup", "fuse_qkv"]),
        ("cleanup  fuse_qkv:gated_mlp=true", ["cleanup", "fuse_qkv:gated_mlp=true"]),
        ("cleanup, fuse_qkv", ["cleanup", "fuse_qkv"]),
        ("a:x=1 ; b:y=2,z=3", ["a:x=1", "b:y=2,z=3"]),
        ("a,x=1", ["a:x=1"]),  # an option continues the pass before it even without a ':'
        ("a:path=c:/tmp", ["a:path=c:/tmp"]),  # ':' inside a value does not start a pass
        ("", []),
        (" ; , ", []),
    ],
)
def test_split_pipeline(text: str, specs: list[str]) -> None:
    assert split_pipeline(text) == specs


# --- resolve_passes --------------------------------------------------------------------------------------------------


def test_resolve_none_is_empty() -> None:
    assert resolve_passes(None) == ()
    assert resolve_passes([]) == ()


def test_resolve_single_pipeline_string() -> None:
    assert resolve_passes("cleanup:fold=false,fuse_qkv:gated_mlp=true") == (
        Cleanup(fold=False),
        FuseQKV(gated_mlp=True),
    )


def test_resolve_mixed_strings_and_objects_keeps_objects() -> None:
    obj = FuseQKV(gated_mlp=True)
    out = resolve_passes(["cleanup;cleanup:cse=false", obj])
    assert out == (Cleanup(), Cleanup(cse=False), obj)
    assert out[2] is obj


def test_resolve_accepts_a_tuple() -> None:
    assert resolve_passes(("cleanup",)) == (Cleanup(),)


@pytest.mark.parametrize(
    ("passes", "type_name"),
    [
        ([42], "int"),
        ([None], "NoneType"),
        (["cleanup", object()], "object"),
        ([lambda gm, ctx: None], "function"),
        (42, "int"),
        ({"cleanup"}, "set"),
    ],
)
def test_resolve_rejects_other_types_naming_them(passes: Any, type_name: str) -> None:
    with pytest.raises(SpecError) as info:
        resolve_passes(passes)
    assert type_name in str(info.value)


def test_resolve_rejects_empty_spec_string() -> None:
    with pytest.raises(SpecError, match="empty pass spec"):
        resolve_passes([" ; "])


def test_resolve_propagates_spec_errors_from_strings() -> None:
    with pytest.raises(SpecError, match="did you mean 'fuse_qkv'"):
        resolve_passes(["cleanup", "fuse_qvk"])


def test_resolve_rejects_a_pass_class() -> None:
    try:
        resolved = resolve_passes([Cleanup])
    except SpecError as e:
        assert "Cleanup" in str(e)
    else:
        raise AssertionError(f"a pass class was accepted as a pass: {resolved}")


# --- list_passes -----------------------------------------------------------------------------------------------------


def test_list_passes_covers_the_registry_sorted() -> None:
    infos = list_passes()
    assert [i.name for i in infos] == REAL_NAMES
    for info in infos:
        assert info.cls in ALL_PASSES and info.cls.name == info.name
        assert info.contract in ("exact", "approximate", "reparameterize", "retrain")
        assert info.summary.strip()


def test_list_passes_cleanup_and_fuse_qkv_options() -> None:
    infos = {i.name: i for i in list_passes()}
    assert [(o.name, o.type, o.default) for o in infos["cleanup"].options] == [
        ("fold", "bool", True),
        ("cse", "bool", True),
    ]
    assert [(o.name, o.type, o.default) for o in infos["fuse_qkv"].options] == [("gated_mlp", "bool", False)]
    assert infos["cleanup"].contract == "exact"


def test_list_passes_type_labels(toy_registry: dict) -> None:
    knobs = next(i for i in list_passes() if i.name == "knobs")
    assert knobs.contract == "approximate"
    assert [(o.name, o.type, o.default) for o in knobs.options] == [
        ("r", "int", 0),
        ("threshold", "float", 0.5),
        ("mode", "mean|max", "mean"),
        ("budget", "int or none", None),
        ("label", "str", "x"),
        ("strict", "bool", False),
    ]


@pytest.mark.parametrize("info", list_passes(), ids=lambda i: i.name)
def test_every_listed_option_can_be_given_in_a_spec(info: registry.PassInfo) -> None:
    # What `txcompile passes` shows must be something the user can type back: each option at its default.
    for opt in info.options:
        if opt.default is None and "none" not in opt.type:
            continue  # a required option: list_passes shows None for "no default"
        raw = str(opt.default).lower() if isinstance(opt.default, bool) else str(opt.default)
        assert parse_spec(f"{info.name}:{opt.name}={raw}") == info.cls()
