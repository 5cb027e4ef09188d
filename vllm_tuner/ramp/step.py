"""One ramp step's verdict (pure): :func:`judge_step` turns a trial outcome and its soak report into a
:class:`StepResult` with a verdict, a failure category and the numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..probe import PreemptionReading
from ..trial import (
    PREEMPTIONS,
    SERVER_DIED,
    TrialOutcome,
    probe_verdict,
)
from ..units import GIB, format_duration
from .plan import RampPlan

# Ramp-level failure categories (besides the log categories of docs/architecture.md).
# The server's KV pool holds fewer tokens than the soak load keeps resident.
POOL_TOO_SMALL = "pool_below_load"


@dataclass
class StepResult:
    utilization: float
    phase: str  # edge | soak
    verdict: str  # pass | fail | pool_too_small (soak), boots | fail (edge)
    category: str  # success, a log category, or one of the ramp's (HEADROOM, POOL_TOO_SMALL, ...)
    failure: str = ""  # the reason in words with its numbers
    kv_cache_tokens: int | None = None
    kv_pool_gib: float | None = None
    peak_used_bytes: dict[int, int] = field(default_factory=dict)
    headroom_bytes: dict[int, int] = field(default_factory=dict)
    max_kv_usage: float | None = None
    preemptions: int | None = None
    requests: int | None = None
    errors: int | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    soak_elapsed_s: float | None = None
    soak_s: float | None = None
    duration_s: float = 0.0
    log_path: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict in ("pass", "boots")

    @property
    def pool_too_small(self) -> bool:
        """Preempted with memory to spare, or a pool below the load: a larger step may hold it."""
        return self.verdict == "pool_too_small"

    @property
    def min_headroom_bytes(self) -> int | None:
        return min(self.headroom_bytes.values()) if self.headroom_bytes else None

    @property
    def preemption(self) -> PreemptionReading:
        return PreemptionReading(self.preemptions or 0, self.requests or 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "utilization": self.utilization,
            "phase": self.phase,
            "verdict": self.verdict,
            "failure_category": None if self.passed else self.category,
            "failure": self.failure or None,
            "kv_cache_tokens": self.kv_cache_tokens,
            "kv_pool_gib": self.kv_pool_gib,
            "peak_memory_gib": {str(g): round(b / GIB, 3) for g, b in sorted(self.peak_used_bytes.items())},
            "headroom_gib": {str(g): round(b / GIB, 3) for g, b in sorted(self.headroom_bytes.items())},
            "max_kv_usage": self.max_kv_usage,
            "preemptions": self.preemptions,
            "preemption_rate": _rate(self.preemption) if self.preemptions is not None else None,
            "requests": self.requests,
            "errors": self.errors,
            "latency_p50_s": _round(self.latency_p50_s),
            "latency_p99_s": _round(self.latency_p99_s),
            "soak_elapsed_s": _round(self.soak_elapsed_s),
            "duration_s": round(self.duration_s, 3),
            "log": self.log_path,
        }

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_used_bytes"] = {str(k): v for k, v in self.peak_used_bytes.items()}
        data["headroom_bytes"] = {str(k): v for k, v in self.headroom_bytes.items()}
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> StepResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["peak_used_bytes"] = {int(k): int(v) for k, v in (data.get("peak_used_bytes") or {}).items()}
        known["headroom_bytes"] = {int(k): int(v) for k, v in (data.get("headroom_bytes") or {}).items()}
        return cls(**known)


def _rate(reading: PreemptionReading) -> float | None:
    """Preemptions per completed request for JSON (None: preemptions and nothing completed)."""
    return None if math.isinf(reading.rate) else round(reading.rate, 4)


def _round(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def judge_step(
    outcome: TrialOutcome,
    plan: RampPlan,
    phase: str,
    *,
    soak_s: float | None = None,
    unit: str = "GPU",
    resident_tokens: int | None = None,
) -> StepResult:
    """A trial outcome (and its soak report, when it got that far) → the step's verdict and numbers.

    A soak passes only if the process stayed alive, the log showed no OOM or engine death, no request
    failed, every device (a ``unit``) kept ``plan.headroom_bytes`` and preemptions stayed within
    ``plan.max_preemption_rate``. Preemptions over the rate with memory to spare, or a pool below the
    ``resident_tokens`` of the soak load (:func:`pool_shortfall`; then it was not soaked), make the
    verdict ``pool_too_small``: the KV pool is too small for the load, and a higher step has a larger one.
    """
    u = outcome.config.gpu_memory_utilization or 0.0
    facts = outcome.facts or {}
    step = StepResult(
        utilization=u,
        phase=phase,
        verdict="fail",
        category=outcome.category,
        kv_cache_tokens=int(facts["kv_cache_tokens"]) if "kv_cache_tokens" in facts else None,
        kv_pool_gib=float(facts["available_kv_gib"]) if "available_kv_gib" in facts else None,
        duration_s=outcome.duration_s,
        log_path=str(outcome.log_path) if outcome.log_path else None,
        soak_s=soak_s,
    )
    if outcome.verdict == "failed":
        step.failure = _startup_words(outcome)
        return step
    if phase == "edge":
        step.verdict, step.category = "boots", "success"
        return step
    report = outcome.probe
    short = pool_shortfall(step.kv_cache_tokens, resident_tokens, plan)
    if report is None and short:
        step.verdict, step.category, step.failure = "pool_too_small", POOL_TOO_SMALL, short
        return step
    if report is None:  # booted but never soaked: nothing proves it
        step.failure = "booted but was not soaked"
        return step
    errors = sum(report.errors.values()) if isinstance(report.errors, dict) else int(report.errors or 0)
    step.peak_used_bytes = dict(report.peak_used_bytes)
    step.headroom_bytes = dict(report.headroom_bytes)
    step.max_kv_usage = round(report.max_kv_usage, 4)
    step.preemptions = report.preemptions
    step.requests = report.requests
    step.errors = errors
    step.latency_p50_s = report.latency_p50_s
    step.latency_p99_s = report.latency_p99_s
    step.soak_elapsed_s = report.duration_s
    category, failure = _soak_failure(outcome, report, plan, soak_s, unit)
    step.category, step.failure = category, failure
    step.verdict = {"success": "pass", PREEMPTIONS: "pool_too_small"}.get(category, "fail")
    return step


def pool_shortfall(pool_tokens: int | None, resident_tokens: int | None, plan: RampPlan) -> str:
    """Why a step's KV pool plainly cannot hold the soak load, or "" when it can (or a number is
    missing, or the plan accepts preemption: then the soak measures the rate)."""
    if pool_tokens is None or not resident_tokens or plan.max_preemption_rate != 0:
        return ""
    if pool_tokens >= resident_tokens:
        return ""
    return f"{pool_tokens:,} KV tokens, below the soak load's {resident_tokens:,} resident tokens: not soaked"


def _soak_failure(
    outcome: TrialOutcome, report: Any, plan: RampPlan, soak_s: float | None, unit: str
) -> tuple[str, str]:
    """A soak fails as a probe does (:func:`trial.probe_verdict`); a death also says when and why."""
    if outcome.category != "success" or report.server_died:
        category = outcome.category if outcome.category != "success" else SERVER_DIED
        when = f"after {format_duration(report.duration_s)}"
        if soak_s:
            when += f" of the {format_duration(soak_s)} soak"
        detail = f": {outcome.evidence.strip()[:160]}" if outcome.evidence else ""
        return category, f"died under load {when} ({category.replace('_', ' ')}){detail}"
    verdict = probe_verdict(
        report, headroom_bytes=plan.headroom_bytes, max_preemption_rate=plan.max_preemption_rate, unit=unit
    )
    return verdict.category, verdict.failure


def _startup_words(outcome: TrialOutcome) -> str:
    words = f"did not start: {outcome.category.replace('_', ' ')}"
    if outcome.evidence:
        words += f" ({outcome.evidence.strip()[:160]})"
    return words
