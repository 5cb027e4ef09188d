"""What the ramp is asked and how it chooses its next step (pure): :class:`RampRequest`, :class:`RampPlan`
(the grid, :meth:`RampPlan.next` for the ``linear`` and ``bisect`` strategies, the step it recommends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..hashkey import stable_key
from ..serveconfig import ServeConfig
from ..trial import (
    Timeouts,
)
from ..units import GIB

if TYPE_CHECKING:
    from .step import StepResult


MAX_CEILING = 0.98
STRATEGIES = ("linear", "bisect")


@dataclass(frozen=True)
class NextStep:
    utilization: float
    phase: str  # "edge": boot only (bisect) | "soak": boot, then the soak load
    reason: str


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class RampPlan:
    start: float = 0.85
    step: float = 0.01
    ceiling: float = 0.92
    strategy: str = "linear"
    margin: float = 0.0
    soak_s: float = 3600.0
    headroom_bytes: int = GIB
    max_preemption_rate: float | None = 0.0  # per completed request, for the step the ramp chooses

    def validate(self) -> None:
        """One-line :class:`UsageError` for values the ramp cannot use."""
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown --strategy {self.strategy!r}", "use --strategy linear or bisect")
        if not 0 < self.ceiling <= MAX_CEILING:
            raise UsageError(
                f"--ceiling must be in (0, {MAX_CEILING}], got {self.ceiling}",
                "CUDA needs breathing room outside vLLM's budget; use e.g. --ceiling 0.92",
            )
        if not 0 < self.start < self.ceiling:
            raise UsageError(
                f"--start must be above 0 and below --ceiling {self.ceiling}, got {self.start}",
                "use e.g. --start 0.85 --ceiling 0.92",
            )
        if not 0 < self.step <= self.ceiling - self.start + 1e-9:  # 0.21 - 0.2 is 0.0099999…
            raise UsageError(
                f"--step must be above 0 and at most --ceiling − --start "
                f"({self.ceiling - self.start:.2f}), got {self.step}",
                "use e.g. --step 0.01",
            )
        if not 0 <= self.margin < self.start:
            raise UsageError(
                f"--margin must be at least 0 and below --start {self.start}, got {self.margin}",
                "use e.g. --margin 0.01",
            )
        if self.soak_s <= 0:
            raise UsageError(f"--soak must be positive, got {self.soak_s}", "use e.g. --soak 1h")
        if self.headroom_bytes < 0:
            raise UsageError("--headroom cannot be negative", "use e.g. --headroom 1")
        if self.max_preemption_rate is not None and not self.max_preemption_rate >= 0:
            raise UsageError(
                f"--max-preemption-rate must be at least 0, got {self.max_preemption_rate}",
                "use e.g. --max-preemption-rate 0 (none) or 0.05 (one request in twenty)",
            )

    def grid(self) -> tuple[float, ...]:
        """start, start + step, … up to the ceiling (rounded so 0.85 + 0.01 is 0.86)."""
        count = int((self.ceiling - self.start) / self.step + 1e-9) + 1
        return tuple(round(self.start + i * self.step, 4) for i in range(count))

    def index(self, utilization: float) -> int | None:
        for i, u in enumerate(self.grid()):
            if abs(u - utilization) < 1e-6:
                return i
        return None

    def next(self, steps: Sequence[StepResult]) -> NextStep | Stop:
        """The next launch, or why the ramp is over, from the steps done so far."""
        grid = self.grid()
        top = len(grid) - 1
        if self.strategy == "bisect":
            edge = self._edge(steps)
            if isinstance(edge, NextStep | Stop):
                return edge
            top = edge
        indexed = [(self.index(s.utilization), s) for s in steps if s.phase == "soak"]
        soaks = [(i, s) for i, s in indexed if i is not None]
        passed = [i for i, s in soaks if s.passed]
        small = {i: s for i, s in soaks if s.pool_too_small}  # memory to spare: climb
        failed = [(i, s) for i, s in soaks if not s.passed and not s.pool_too_small]
        if passed and failed:
            i, s = min(failed, key=lambda f: f[0])
            return Stop(
                f"{grid[i]:.2f} failed ({s.failure or s.category}): {grid[max(passed)]:.2f} is the last stable step"
            )
        if failed:
            low = min(i for i, _ in failed)
            s = next(s for i, s in failed if i == low)
            below = [i for i in small if i < low]
            if below:  # memory trouble above, a pool too small for the load below: no step holds it
                return Stop(
                    f"{grid[low]:.2f} failed ({s.failure or s.category}) and {grid[max(below)]:.2f} "
                    f"below it is too small for the load ({small[max(below)].failure}): {SMALLER_LOAD}"
                )
            if self.strategy == "linear" or low == 0:
                return Stop(
                    f"{grid[low]:.2f} failed ({s.failure or s.category}) and no lower step is allowed"
                )
            return NextStep(grid[low - 1], "soak", f"{grid[low]:.2f} failed the soak: one step down")
        if passed or small:
            high = max([*passed, *small])
            what = "the startup edge" if top < len(grid) - 1 else f"the ceiling {self.ceiling:.2f}"
            if high >= top and passed:
                return Stop(f"reached {what}: {grid[max(passed)]:.2f} is stable")
            if high >= top:
                return Stop(
                    f"no step up to {what} holds the load: at {grid[high]:.2f}, {small[high].failure}; "
                    f"{SMALLER_LOAD}"
                )
            if high in small:
                why = f"{grid[high]:.2f}'s pool is too small for the load: one step up (a larger pool)"
                return NextStep(grid[high + 1], "soak", why)
            return NextStep(grid[high + 1], "soak", f"{grid[high]:.2f} held the soak: one step up")
        if self.strategy == "bisect":
            first = max(0, top - 1)
            return NextStep(grid[first], "soak", f"just below the startup edge {grid[top]:.2f}")
        return NextStep(grid[0], "soak", "the safe starting point")

    def _edge(self, steps: Sequence[StepResult]) -> int | NextStep | Stop:
        """Bisect boot-only launches over the grid; the highest index that boots, once known."""
        grid = self.grid()
        hi = len(grid)
        for s in steps:
            i = self.index(s.utilization)
            if s.phase == "edge" and i is not None and not s.passed:
                hi = min(hi, i)
        lo = -1
        for s in steps:
            i = self.index(s.utilization)
            if s.phase == "edge" and i is not None and s.passed and i < hi:
                lo = max(lo, i)
        if hi - lo > 1:
            mid = (lo + hi + 1) // 2
            return NextStep(grid[mid], "edge", f"bisecting the startup edge between {_range(grid, lo, hi)}")
        if lo < 0:
            s = next(s for s in steps if s.phase == "edge" and self.index(s.utilization) == 0)
            return Stop(f"not even --start {grid[0]:.2f} boots ({s.failure or s.category})")
        return lo

    def last_stable(self, steps: Sequence[StepResult]) -> StepResult | None:
        """The highest step that held its soak below every step that failed one (a pool too small for
        the load is no failure: the steps above it have larger pools)."""
        failed = [s.utilization for s in steps if s.phase == "soak" and not (s.passed or s.pool_too_small)]
        limit = min(failed) if failed else float("inf")
        passed = [s for s in steps if s.phase == "soak" and s.passed and s.utilization < limit]
        return max(passed, key=lambda s: s.utilization) if passed else None

    def recommended(self, steps: Sequence[StepResult]) -> float | None:
        """The utilization to serve with: the last stable step minus the margin."""
        best = self.last_stable(steps)
        if best is None:
            return None
        return round(max(0.01, best.utilization - self.margin), 4)


SMALLER_LOAD = (
    "lower --max-num-seqs or --max-model-len, raise --ceiling, or accept some preemption with "
    "--max-preemption-rate"
)


def _range(grid: tuple[float, ...], lo: int, hi: int) -> str:
    low = f"{grid[lo]:.2f}" if lo >= 0 else "below the start"
    high = f"{grid[hi]:.2f}" if hi < len(grid) else "the ceiling"
    return f"{low} and {high}"


@dataclass(frozen=True)
class RampRequest:
    model: str
    gpu_ids: tuple[int, ...]
    config: ServeConfig  # every flag but --gpu-memory-utilization
    plan: RampPlan = RampPlan()
    warmup_s: float = 0.0  # the worst case climbs to full concurrency over this part of the soak
    short_requests: bool = True
    replay: tuple[tuple[int, int], ...] = ()  # (prompt, output) lengths to replay instead of the mix
    timeouts: Timeouts = Timeouts()
    max_launches: int | None = None  # stop (resumably) after this many launches
    vllm_cmd: str = "vllm"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpu_ids": list(self.gpu_ids),
            "flags": {k: v for k, v in self.config.flags().items()},
            "extra_args": list(self.config.extra_args),
            "plan": asdict(self.plan),
            "warmup_s": self.warmup_s,
            "short_requests": self.short_requests,
            "replay": stable_key([list(p) for p in self.replay]) if self.replay else None,
        }

    def key(self) -> str:
        return stable_key(self.as_dict())
