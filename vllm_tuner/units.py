"""Units of vllm-tune: the byte units, and parsing of the sizes (``32GiB``, ``512MiB``) and durations
(``90s``, ``30m``, ``1h30m``) a user gives it."""

from __future__ import annotations

import re

from .errors import UsageError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
# K, M, G, T alone are binary, as vLLM reads them; KB, MB, GB, TB are decimal
_SIZE_UNITS = {"b": 1}
for _prefix, _binary, _decimal in (
    ("k", KIB, 10**3),
    ("m", MIB, 10**6),
    ("g", GIB, 10**9),
    ("t", TIB, 10**12),
):
    _SIZE_UNITS.update(
        {_prefix: _binary, _prefix + "i": _binary, _prefix + "ib": _binary, _prefix + "b": _decimal}
    )


def parse_size(value: object, *, bare: int) -> int:
    """Bytes in ``96GiB``, ``1.5 GiB``, ``32G`` (= GiB, as vLLM reads it), ``24GB`` (10^9) or ``512MiB``.

    A number without a unit counts ``bare`` bytes a unit: each caller says what its users write (GiB on
    the command line, bytes in a deployment file). ValueError when ``value`` is no size or is negative.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(value)
        return int(value * bare)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(value)
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * (_SIZE_UNITS[unit] if unit else bare))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)?", re.IGNORECASE)
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(text: str, *, option: str = "duration") -> float:
    """Seconds in ``text``: a plain number is seconds; units h, m, s, ms may be chained (``1h30m``)."""
    raw = str(text).strip()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(raw):
        if match.start() != pos or not match.group(0):
            break
        total += float(match.group(1)) * _SECONDS[(match.group(2) or "").lower() or None]
        pos = match.end()
    if not raw or pos != len(raw) or total <= 0:
        raise UsageError(
            f"{option} must be a positive duration like 90s, 30m or 1h, got {text!r}",
            f"pass e.g. {option} 30m",
        )
    return total


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 90:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
