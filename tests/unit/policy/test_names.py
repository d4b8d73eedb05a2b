"""Host name normalisation and the one-label wildcard rule (table: testdata/names.json)."""

from __future__ import annotations

import json
from pathlib import Path

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.errors import EgressdError
from egressd.policy.names import (
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    HostError,
    host_matches,
    is_wildcard,
    normalize_host,
    normalize_host_pattern,
)

TABLE = json.loads((Path(__file__).parent / "testdata" / "names.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("raw", "expected"), TABLE["normalize"])
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", TABLE["invalid"])
def test_invalid_names_raise_host_error(raw: str) -> None:
    with pytest.raises(HostError) as info:
        normalize_host(raw)
    assert info.value.reason == "invalid_host"
    assert isinstance(info.value, EgressdError)


@pytest.mark.parametrize(("raw", "expected"), TABLE["patterns"])
def test_normalize_pattern(raw: str, expected: str) -> None:
    assert normalize_host_pattern(raw) == expected
    assert normalize_host_pattern(expected) == expected


@pytest.mark.parametrize("raw", TABLE["invalid_patterns"])
def test_invalid_patterns(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host_pattern(raw)


@pytest.mark.parametrize(("pattern", "host", "expected"), TABLE["matches"])
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


def test_normalized_forms_in_table_are_fixed_points() -> None:
    for _, expected in TABLE["normalize"]:
        assert normalize_host(expected) == expected


def test_punycode_round_trip() -> None:
    ace = normalize_host("Bücher.Test")
    assert ace == "xn--bcher-kva.test"
    assert idna.decode(ace) == "bücher.test"
    assert normalize_host(idna.decode(ace)) == ace
    assert normalize_host("xn--bcher-kva.test") == normalize_host("bücher.test")


def test_only_one_trailing_dot_is_stripped() -> None:
    assert normalize_host("a.test.") == "a.test"
    with pytest.raises(HostError):
        normalize_host("a.test..")


def test_label_length_boundary() -> None:
    label = "a" * MAX_LABEL_LENGTH
    assert normalize_host(f"{label}.test") == f"{label}.test"
    with pytest.raises(HostError):
        normalize_host(f"{label}a.test")


def test_punycode_label_length_counts_after_conversion() -> None:
    # 60 characters of Unicode become far more than 63 in Punycode.
    with pytest.raises(HostError):
        normalize_host("ü" * 60 + ".test")


def test_name_length_boundary() -> None:
    # 4 labels of 63 + 3 dots = 255; trim to exactly 253 and 254.
    name_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name_253) == MAX_NAME_LENGTH
    assert normalize_host(name_253) == name_253
    assert normalize_host(name_253 + ".") == name_253
    name_254 = ".".join(["a" * 63] * 3 + ["b" * 62])
    with pytest.raises(HostError):
        normalize_host(name_254)


def test_huge_input_is_refused_cheaply() -> None:
    with pytest.raises(HostError):
        normalize_host("\u00ad" * 100_000 + "a.test")


def test_idna_errors_are_translated_and_chained() -> None:
    with pytest.raises(HostError) as info:
        normalize_host("💩.test")
    assert isinstance(info.value.__cause__, idna.IDNAError)


@pytest.mark.parametrize("value", [None, 5, b"api.test", ["api.test"]])
def test_non_strings_are_host_errors(value: object) -> None:
    with pytest.raises(HostError):
        normalize_host(value)  # type: ignore[arg-type]
    with pytest.raises(HostError):
        normalize_host_pattern(value)  # type: ignore[arg-type]


def test_is_wildcard() -> None:
    assert is_wildcard("*.data.allowed.test")
    assert not is_wildcard("data.allowed.test")


@given(st.text(max_size=80))
def test_normalize_raises_only_host_error(text: str) -> None:
    try:
        result = normalize_host(text)
    except HostError:
        return
    # Whatever is accepted is canonical, LDH, and a fixed point.
    assert normalize_host(result) == result
    assert result == result.lower()
    assert result.isascii()
    assert not result.endswith(".")
    assert len(result) <= MAX_NAME_LENGTH


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda label: not label.startswith("xn--")
)
_TLD = st.from_regex(r"[a-z]{2,6}", fullmatch=True)


@given(st.lists(_LABEL, min_size=1, max_size=4), _TLD, _LABEL)
def test_wildcard_matches_exactly_one_label(base: list[str], tld: str, extra: str) -> None:
    suffix = ".".join([*base, tld])
    pattern = normalize_host_pattern("*." + suffix)
    assert host_matches(pattern, f"{extra}.{suffix}")
    assert not host_matches(pattern, suffix)
    assert not host_matches(pattern, f"{extra}.{extra}.{suffix}")
    assert not host_matches(pattern, f"{extra}{suffix}")


@given(st.lists(_LABEL, min_size=0, max_size=3), _TLD)
def test_exact_pattern_matches_only_itself(labels: list[str], tld: str) -> None:
    name = ".".join([*labels, tld])
    assert host_matches(normalize_host_pattern(name), normalize_host(name.upper() + "."))
    assert not host_matches(name, "x." + name)
