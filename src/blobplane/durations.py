"""Durations for people: parse "1h30m" into 5400.0 seconds and print 5400 back as "1h30m"."""

from __future__ import annotations

import itertools
import math
import re

from blobplane.errors import InvalidDuration

__all__ = ["format_duration", "parse_duration"]

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_PLAIN = re.compile(r"\d+(?:\.\d+)?")
_COMPOUND = re.compile(rf"(?:{_PART.pattern})+")


def parse_duration(text: str) -> float:
    """'45s' -> 45.0, '30m' -> 1800.0, '1h30m' -> 5400.0, '500ms' -> 0.5, '90' -> 90.0 (seconds).

    Units: ms, s, m, h, d, w (case-insensitive); parts may be combined from the
    largest down ("1d12h"). A bare number is seconds.
    """
    if not isinstance(text, str):
        raise InvalidDuration(f"a duration must be a string like '1h' or '30m', got {text!r}")
    compact = text.strip().lower().replace(" ", "")
    seconds = math.inf
    if _PLAIN.fullmatch(compact):
        seconds = float(compact)
    elif _COMPOUND.fullmatch(compact):
        parts = _PART.findall(compact)
        # "30m1h" or "1h1h" is more likely a typo than a wish to add them up.
        if all(_UNITS[a] > _UNITS[b] for (_, a), (_, b) in itertools.pairwise(parts)):
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if math.isfinite(seconds):
        return seconds
    raise InvalidDuration(
        f"{text!r} is not a duration; write a number with a unit, largest first: "
        "'45s', '30m', '1h', '1h30m', '2d', '500ms' (a bare number means seconds)"
    )


def format_duration(seconds: float) -> str:
    """5400 -> '1h30m', 45 -> '45s', 0.25 -> '250ms': the two largest units, rounded down."""
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidDuration(f"cannot format {seconds!r} as a duration")
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    counts: list[tuple[int, str]] = []
    rest = int(seconds)
    for unit in ("w", "d", "h", "m", "s"):
        count, rest = divmod(rest, int(_UNITS[unit]))
        counts.append((count, unit))
    first = next(index for index, (count, _) in enumerate(counts) if count)
    shown = [part for part in counts[first : first + 2] if part[0]]
    return "".join(f"{count}{unit}" for count, unit in shown)
