"""Duplicate members and non-finite numbers are refused everywhere egressd reads JSON."""

from __future__ import annotations

import pytest

from egressd import strictjson


@pytest.mark.parametrize(
    "text",
    [
        '{"mode": "report", "mode": "enforce"}',
        '{"a": {"b": 1, "b": 2}}',
        '{"x": NaN}',
        "[Infinity]",
        "-Infinity",
    ],
)
def test_ambiguous_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        strictjson.loads(text)


def test_plain_json_and_utf8_bytes_are_read() -> None:
    assert strictjson.loads(b'{"h\\u00e9": [1, 2.5, null]}') == {"hé": [1, 2.5, None]}
    with pytest.raises(ValueError):
        strictjson.loads(b"\xff")
