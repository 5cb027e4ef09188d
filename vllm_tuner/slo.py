"""Latency SLOs of ``find --objective throughput`` (pure).

``--slo "ttft:p95<=2s,itl:p95<=100ms"``: comma-separated limits, each ``METRIC:pNN OP VALUE`` with
METRIC one of ttft (time to first token), itl (inter-token latency: a request's mean gap between
streamed tokens) and e2e (the whole request), pNN one of p50/p90/p95/p99, OP ``<=`` or ``<`` and
VALUE a number of seconds with ``s`` or ``ms``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UsageError

METRICS = {"ttft": "TTFT", "itl": "ITL", "e2e": "e2e latency"}
PERCENTILES = (50, 90, 95, 99)
FORM = 'METRIC:pNN<=VALUE, e.g. --slo "ttft:p95<=2s,itl:p95<=100ms" (ttft/itl/e2e, p50/p90/p95/p99, <= or <, s or ms)'
_LIMIT = re.compile(r"^(ttft|itl|e2e):p(50|90|95|99)\s*(<=|<)\s*([0-9]*\.?[0-9]+)\s*(ms|s)$")


@dataclass(frozen=True)
class Limit:
    metric: str  # ttft | itl | e2e
    percentile: int
    strict: bool  # "<" rather than "<="
    seconds: float

    @property
    def key(self) -> str:
        """The statistic it reads, e.g. ``ttft_p95``."""
        return f"{self.metric}_p{self.percentile}"

    def holds(self, value: float) -> bool:
        return value < self.seconds if self.strict else value <= self.seconds

    def words(self) -> str:
        return f"p{self.percentile} {METRICS[self.metric]} {'<' if self.strict else '≤'} {seconds_words(self.seconds)}"


@dataclass(frozen=True)
class Slo:
    limits: tuple[Limit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.limits)

    def broken(self, stats: Mapping[str, float | None]) -> list[str]:
        """What ``stats`` (``ttft_p95`` → seconds, ...) breaks, in words; [] when every limit holds.
        A statistic that was not measured (no request finished) breaks its limit."""
        out = []
        for limit in self.limits:
            value = stats.get(limit.key)
            if value is None:
                out.append(f"{METRICS[limit.metric]} SLO (no request finished)")
            elif not limit.holds(value):
                out.append(
                    f"{METRICS[limit.metric]} SLO (p{limit.percentile} {seconds_words(value)}, "
                    f"limit {seconds_words(limit.seconds)})"
                )
        return out

    def words(self) -> str:
        return ", ".join(limit.words() for limit in self.limits) or "none"


def parse_slo(text: str | None) -> Slo:
    """``--slo`` → :class:`Slo` (an empty one for None or ""); a UsageError that shows the form."""
    if not text or not text.strip():
        return Slo()
    limits = []
    for part in text.split(","):
        m = _LIMIT.match(part.strip().lower())
        if not m:
            raise UsageError(f"--slo cannot read {part.strip()!r}", f"write {FORM}")
        metric, pct, op, number, unit = m.groups()
        seconds = float(number) / (1000 if unit == "ms" else 1)
        if seconds <= 0:
            raise UsageError(f"--slo limit {part.strip()!r} is not above zero", f"write {FORM}")
        limits.append(Limit(metric, int(pct), op == "<", seconds))
    return Slo(tuple(limits))


def seconds_words(seconds: float) -> str:
    """2.0 → "2 s", 0.1 → "100 ms", 1.734 → "1.73 s"."""
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"
