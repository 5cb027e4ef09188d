"""One ramp step as the store keeps it, both ways: :func:`step_record` (a step and its trial → the
store's trial row) and :func:`step_from_record` (a stored row → the step, when a ramp resumes). The
flags go through :mod:`vllm_tuner.trialrecord` as find's do; the step's own numbers ride in the
probe's ``ramp_step`` (:meth:`StepResult.to_record`). Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..serveconfig import ServeConfig
from ..trial import TrialOutcome
from ..trialrecord import config_from_record, config_record
from .step import StepResult

if TYPE_CHECKING:
    from ..store import TrialRecord


def step_record(outcome: TrialOutcome, step: StepResult, env_fingerprint: str) -> dict[str, Any]:
    """The keyword arguments of ``store.record_trial`` for one finished step."""
    return {
        "config": config_record(outcome.config),
        "config_key": outcome.config.key(),
        "env_fingerprint": env_fingerprint,
        "category": step.category,
        "verdict": trial_verdict(step),
        "facts": outcome.facts,
        "probe": {"ramp_step": step.to_record(), "failure": step.failure, "ok": step.passed},
        "started_at": outcome.started_at,
        "duration_s": outcome.duration_s,
        "log_path": str(outcome.log_path) if outcome.log_path else None,
    }


def step_from_record(rec: TrialRecord) -> StepResult:
    """The step a stored trial was (a row without its ``ramp_step`` reads as a failed soak)."""
    data = (rec.probe or {}).get("ramp_step")
    if data:
        return StepResult.from_record(data)
    cfg = config_from_record(ServeConfig(model=rec.config.get("model", "")), rec)
    return StepResult(cfg.gpu_memory_utilization or 0.0, "soak", "fail", rec.category)


def trial_verdict(step: StepResult) -> str:
    """The store's trial verdict words (stable | boots | unstable | failed)."""
    if step.verdict == "pass":
        return "stable"
    if step.verdict == "boots" or (step.pool_too_small and step.soak_elapsed_s is None):
        return "boots"  # booted; its pool was too small for the soak load, so it was not soaked
    return "failed" if step.soak_elapsed_s is None else "unstable"
