"""What the ramp returns and how it says it: :class:`RampResult`, the live view's line per step
(:func:`step_words`) and the final table (:func:`summary_table`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..serveconfig import ServeConfig
from ..units import GIB
from ..vllmargv import shell_command
from .plan import RampRequest
from .step import StepResult


@dataclass
class RampResult:
    request: RampRequest
    steps: list[StepResult]
    reason: str
    complete: bool
    launches: int = 0
    run_id: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    chart_path: Path | None = None

    @property
    def last_stable(self) -> StepResult | None:
        return self.request.plan.last_stable(self.steps)

    @property
    def utilization(self) -> float | None:
        return self.request.plan.recommended(self.steps)

    def final_config(self) -> ServeConfig | None:
        u = self.utilization
        return None if u is None else self.request.config.replace(gpu_memory_utilization=u, load_format=None)

    def command(self) -> str | None:
        cfg = self.final_config()
        return shell_command(cfg.serve_args(), self.env, vllm_cmd=self.request.vllm_cmd) if cfg else None

    def failure(self) -> StepResult | None:
        """The first step with memory trouble (a pool too small for the load is none)."""
        return next(
            (s for s in self.steps if s.phase == "soak" and not s.passed and not s.pool_too_small), None
        )

    def as_json(self) -> dict[str, Any]:
        last = self.last_stable
        failed = self.failure()
        return {
            "command": self.command(),
            "last_stable": last.utilization if last else None,
            "utilization": self.utilization,
            "margin": self.request.plan.margin,
            "complete": self.complete,
            "reason": self.reason,
            "failure_category": failed.category if failed else None,
            "failure": failed.failure if failed else None,
            "strategy": self.request.plan.strategy,
            "soak_s": self.request.plan.soak_s,
            "launches": self.launches,
            "run_id": self.run_id,
            "chart": str(self.chart_path) if self.chart_path else None,
            "steps": [s.as_json() for s in self.steps],
        }


def progress_verdict(step: StepResult) -> str:
    return {"pass": "stable", "boots": "boots", "pool_too_small": "pool too small"}.get(
        step.verdict, "unstable" if step.soak_elapsed_s is not None else "failed"
    )


def step_words(step: StepResult, unit: str = "GPU") -> str:
    """One line about a finished step for the live view."""
    bits = []
    if step.kv_cache_tokens is not None and not (step.pool_too_small and step.soak_elapsed_s is None):
        bits.append(f"{step.kv_cache_tokens:,} KV tokens")
    if step.peak_used_bytes:
        bits.append(
            "peak "
            + " ".join(
                f"{unit.split()[-1]}{g} {b / GIB:.2f} GiB" for g, b in sorted(step.peak_used_bytes.items())
            )
        )
    if step.min_headroom_bytes is not None:
        bits.append(f"headroom {step.min_headroom_bytes / GIB:.2f} GiB")
    if step.latency_p50_s is not None and step.latency_p99_s is not None:
        bits.append(f"p50/p99 {step.latency_p50_s:.2f}/{step.latency_p99_s:.2f} s")
    if step.failure:
        bits.append(step.failure)
    return ", ".join(bits)


def summary_table(steps: Sequence[StepResult], unit: str = "GPU") -> list[str]:
    """The final table: utilization, KV tokens, peak memory, headroom, p50/p99, verdict."""
    head = (
        "util",
        "phase",
        "KV tokens",
        f"peak GiB/{unit.split()[-1]}",
        "headroom GiB",
        "p50/p99 s",
        "verdict",
    )
    rows = [head]
    for s in steps:
        peak = max(s.peak_used_bytes.values()) / GIB if s.peak_used_bytes else None
        rows.append(
            (
                f"{s.utilization:.2f}",
                s.phase,
                f"{s.kv_cache_tokens:,}" if s.kv_cache_tokens is not None else "-",
                f"{peak:.2f}" if peak is not None else "-",
                f"{s.min_headroom_bytes / GIB:.2f}" if s.min_headroom_bytes is not None else "-",
                f"{s.latency_p50_s:.2f}/{s.latency_p99_s:.2f}"
                if s.latency_p50_s is not None and s.latency_p99_s is not None
                else "-",
                _table_verdict(s),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _table_verdict(step: StepResult) -> str:
    if step.passed:
        return step.verdict
    if step.pool_too_small and step.soak_elapsed_s is None:
        return "pool too small: not soaked"
    if step.pool_too_small:
        rate = step.preemption.rate
        return f"pool too small: {'all' if math.isinf(rate) else f'{rate:.2f}'} preemptions/request"
    return f"fail: {step.category.replace('_', ' ')}"
