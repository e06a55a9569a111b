"""The one parser for durations people type (``--expires=7d``, ``--since=2h``): a whole number and one unit."""

from __future__ import annotations

import datetime as dt
import re

from ussycode.errors import UsageError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})([smhdwy])$")


class DurationError(UsageError, ValueError):
    """A duration that cannot be used (a usage error; also a ValueError for callers that expect one)."""


def parse_duration(text: str, *, shortest: dt.timedelta | None = None,
                   longest: dt.timedelta | None = None) -> dt.timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1y`` → a timedelta; each caller bounds it for its use.

    :raise DurationError: not a number and one unit, or outside [``shortest``, ``longest``].
    """
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if not match:
        raise DurationError(f"invalid duration {text[:40]!r}: use a whole number and a unit, "
                            "like 90s, 30m, 12h, 7d, 2w or 1y")
    value = dt.timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
    if shortest is not None and value < shortest:
        raise DurationError(f"duration {text[:40]!r} is too short; the shortest is {format_duration(shortest)}")
    if longest is not None and value > longest:
        raise DurationError(f"duration {text[:40]!r} is too long; the longest is {format_duration(longest)}")
    return value


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact spelling :func:`parse_duration` reads back (``365d``, ``2w``, ``90s``)."""
    seconds = int(value.total_seconds())
    for unit, size in sorted(UNITS.items(), key=lambda u: -u[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
