"""Parsing of human durations given to vllm-tune (``90s``, ``30m``, ``1h``, ``1h30m``)."""

from __future__ import annotations

import re

from .errors import UsageError

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
