"""Durations for people, for --ttl and lease options."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobplane.durations import format_duration, parse_duration
from blobplane.errors import InvalidDuration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("30m", 1800.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1d12h", 129600.0),
        ("500ms", 0.5),
        ("1m500ms", 60.5),
        ("1.5h", 5400.0),
        ("90", 90.0),
        ("0", 0.0),
        (" 1H ", 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "1x", "-1s", "1e9", "inf", "nan", "30m1h", "1h1h", "1 h x", "9" * 400]
)
def test_what_is_not_a_duration_says_how_to_write_one(text: str) -> None:
    with pytest.raises(InvalidDuration, match=r"'1h30m'.*a bare number means seconds"):
        parse_duration(text)


def test_a_duration_is_a_value_error_too() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(InvalidDuration, match="must be a string"):
        parse_duration(3600)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (59.9, "59s"),
        (60, "1m"),
        (3600, "1h"),
        (3605, "1h"),
        (5400, "1h30m"),
        (86400 * 8 + 3600, "1w1d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1, float("inf"), float("nan")])
def test_format_duration_refuses_what_is_no_duration(seconds: float) -> None:
    with pytest.raises(InvalidDuration):
        format_duration(seconds)


@given(st.integers(0, 10**8))
def test_formatting_then_parsing_never_adds_time(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) <= seconds
