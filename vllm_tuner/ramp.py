"""``vllm-tune ramp``: raise ``--gpu-memory-utilization`` step by step, soaking every step under load.

The guides' production practice, automated: start at a safe utilization, keep the server under load
for the soak, and only if it stayed healthy go up one step; stop at the first sign of trouble and fall
back to the last stable step.

The decisions are pure and tested with plain data: :class:`RampPlan` (the grid, :meth:`RampPlan.next`
for the ``linear`` and ``bisect`` strategies, the result) and :func:`judge_step` (a trial outcome and
its soak report → a :class:`StepResult` with a verdict, a failure category and the numbers). The
orchestration (:class:`Ramp`) launches each step through :func:`trial.run_trial`, soaks it with
:mod:`workload`, records it in the store before anything else, and resumes an interrupted ramp at
the step it was in.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .devices import unit_of
from .errors import UsageError
from .hashkey import stable_key
from .probe import PreemptionReading
from .progress import Progress
from .serveconfig import TUNED_FLAGS, ServeConfig
from .trial import (
    PREEMPTIONS,
    SERVER_DIED,
    ProbePlan,
    Timeouts,
    TrialOutcome,
    TrialSetup,
    probe_verdict,
)
from .trialrecord import config_from_record, config_record
from .units import GIB, format_duration
from .vllmargv import options, parse_command, shell_command, without

MAX_CEILING = 0.98
STRATEGIES = ("linear", "bisect")
# Ramp-level failure categories (besides the log categories of docs/architecture.md).
# The server's KV pool holds fewer tokens than the soak load keeps resident.
POOL_TOO_SMALL = "pool_below_load"


# -- the plan (pure) -----------------------------------------------------------------------------
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


# -- one step's verdict (pure) -------------------------------------------------------------------
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

    def as_json(self) -> dict:
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

    def to_record(self) -> dict:
        data = asdict(self)
        data["peak_used_bytes"] = {str(k): v for k, v in self.peak_used_bytes.items()}
        data["headroom_bytes"] = {str(k): v for k, v in self.headroom_bytes.items()}
        return data

    @classmethod
    def from_record(cls, data: dict) -> StepResult:
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
    outcome: TrialOutcome, report, plan: RampPlan, soak_s: float | None, unit: str
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


# -- the flags of the ramped config (pure) -----------------------------------------------------
_FLAG_FIELDS = {flag: name for name, flag in TUNED_FLAGS.items()}
_BOOL_FIELDS = {"enforce_eager"}


def config_from_args(model: str, argv: Sequence[str], **given: object) -> ServeConfig:
    """A :class:`ServeConfig` from vLLM flags: the tuned ones become fields, the rest stays in
    ``extra_args``. ``given`` (from vllm-tune's own options) wins over the argv. The ramp sets
    ``--gpu-memory-utilization`` itself, so it is refused here."""
    fields: dict[str, Any] = {}  # ServeConfig field -> its value, as _convert typed it
    extra: list[str] = []
    words = list(argv)
    at = 0
    for option in options(words):
        extra += words[at : option.start]  # positional words
        at = option.stop
        name = _FLAG_FIELDS.get(option.name) if not option.key else None
        if name is None:
            extra += words[option.start : option.stop]
            continue
        if name == "gpu_memory_utilization":
            raise UsageError(
                "--gpu-memory-utilization is what the ramp sets at every step",
                "drop it and use --start/--step/--ceiling",
            )
        if name in _BOOL_FIELDS:
            fields[name] = True
            continue
        if option.value is None:
            raise UsageError(f"{option.name} needs a value", f"pass e.g. {option.name} 8")
        fields[name] = _convert(name, option.name, option.value)
    extra += words[at:]
    fields.update({k: v for k, v in given.items() if v is not None})
    return ServeConfig(model=model, extra_args=tuple(extra), **fields)


def _convert(name: str, flag: str, value: str) -> object:
    default = ServeConfig.__dataclass_fields__[name].default
    try:
        if name in ("kv_cache_dtype", "load_format", "hf_overrides"):
            return value
        if name in ("cpu_offload_gb", "kv_offloading_size") or isinstance(default, float):
            return float(value)
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} expects a number, got {value!r}", f"pass e.g. {flag} 8") from None


@dataclass(frozen=True)
class FindFlags:
    """What ``--from-find RESULT`` takes from a ``find --json`` file."""

    model: str
    args: tuple[str, ...]  # the serve flags after the model (host/port absent)
    gpu_ids: tuple[int, ...] | None
    vllm_cmd: str | None


def read_find_result(path: Path) -> FindFlags:
    """The model, flags and GPUs of the config a ``vllm-tune find --json`` run returned."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", "pass the file 'find --json' wrote") from exc
    except ValueError:
        raise UsageError(
            f"{path} is not JSON", "pass the output of 'vllm-tune find --json > result.json'"
        ) from None
    command = data.get("command") if isinstance(data, dict) else None
    if not command:
        raise UsageError(f"{path} holds no stable config (no 'command')", "run find until it returns one")
    found = parse_serve_command(command)
    return FindFlags(found.model, _without_utilization(found.args), found.gpu_ids, found.vllm_cmd)


def _without_utilization(args: Sequence[str]) -> tuple[str, ...]:
    """The flags less ``--gpu-memory-utilization`` (find's value; the ramp sets its own)."""
    return tuple(without(args, "--gpu-memory-utilization"))


def parse_serve_command(command: str) -> FindFlags:
    """``ENV=... <vllm cmd> serve MODEL --flags`` (or the server module's ``--model MODEL`` form) → model,
    flags, ``CUDA_VISIBLE_DEVICES``, the vLLM command."""
    found = parse_command(shlex.split(command))
    if found is None or len(found.serve_args) < 2:
        raise UsageError(f"not a vllm serve command: {command[:80]!r}", "pass the output of 'find --json'")
    ids = None
    if found.env.get("CUDA_VISIBLE_DEVICES"):
        try:
            ids = tuple(int(x) for x in found.env["CUDA_VISIBLE_DEVICES"].split(",") if x.strip())
        except ValueError:
            ids = None
    return FindFlags(
        model=found.serve_args[1],
        args=found.serve_args[2:],
        gpu_ids=ids,
        vllm_cmd=shlex.join(found.vllm_words) or None,
    )


# -- orchestration -------------------------------------------------------------------------------
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

    def as_dict(self) -> dict:
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

    def as_json(self) -> dict:
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


LoadRunnerFactory = Callable[[ServeConfig, dict, Callable[[object], None]], Callable]


class Ramp:
    """Runs one ramp. Collaborators are injected: launcher, NVML, store, progress, and ``soak_runner``
    (``(config, facts, on_tick) -> load_runner`` for :func:`trial.run_trial`; the default drives
    :func:`workload.run_workload`)."""

    def __init__(
        self,
        request: RampRequest,
        *,
        env_fingerprint: str,
        launcher,
        nvml,
        store,
        progress: Progress,
        log_dir: Path,
        vocab_size: int = 32000,
        soak_runner: LoadRunnerFactory | None = None,
    ) -> None:
        self.request = request
        self.env_fp = env_fingerprint
        self.launcher = launcher
        self.nvml = nvml
        self.store = store
        self.progress = progress
        self.log_dir = log_dir
        self.vocab_size = vocab_size
        self.trials = TrialSetup(launcher, nvml, request.gpu_ids, progress, request.timeouts, vocab_size)
        self.unit = unit_of(nvml)  # one device in messages: "GPU", "NUMA node"
        self.soak_runner = soak_runner or self._workload_runner
        self._run_id = 0

    def run(self) -> RampResult:
        run_id, steps = self._open_run()
        self._run_id = run_id
        try:
            result = self._loop(run_id, steps)
        except BaseException:
            # Ctrl-C, SIGTERM or a bug: the server is already stopped by run_trial; the step in flight
            # was not recorded, so the same command starts it again.
            self.store.finish_run(run_id, "interrupted", None)
            self.progress.note("interrupted: run the same command again to resume at the step it was in")
            raise
        status = "interrupted" if not result.complete else ("done" if result.last_stable else "failed")
        self.store.finish_run(run_id, status, result.as_json() if result.complete else None)
        return result

    def _loop(self, run_id: int, steps: list[StepResult]) -> RampResult:
        plan = self.request.plan
        launches = 0
        while True:
            decision = plan.next(steps)
            if isinstance(decision, Stop):
                return self._result(run_id, steps, decision.reason, True, launches)
            if self.request.max_launches is not None and launches >= self.request.max_launches:
                reason = f"stopped by the launch budget before {decision.utilization:.2f}"
                return self._result(run_id, steps, reason, False, launches)
            launches += 1
            step = self._launch(decision, len(steps) + 1)
            steps.append(step)
            self.progress.done(_progress_verdict(step), step_words(step, self.unit))

    def _launch(self, decision: NextStep, number: int) -> StepResult:
        cfg = self.request.config.replace(gpu_memory_utilization=decision.utilization)
        what = (
            "boot only" if decision.phase == "edge" else f"soak {format_duration(self.request.plan.soak_s)}"
        )
        self.progress.step(
            f"step {number}: --gpu-memory-utilization {decision.utilization:.2f} ({what})", decision.reason
        )
        log_path = self.log_dir / f"step-{number:02d}-{decision.utilization:.2f}-{decision.phase}.log"
        plan = self.request.plan
        soaking = decision.phase == "soak"
        resident: int | None = None  # the soak load's resident tokens, once the step has booted

        def decide_probe(facts: dict) -> ProbePlan | None:
            if not soaking:
                return None
            nonlocal resident
            work = self._soak_workload(cfg, facts)
            self.progress.note(f"soak load: {work.describe()}")
            resident = work.resident_tokens(_soak_concurrency(cfg, facts))
            pool = int(facts["kv_cache_tokens"]) if "kv_cache_tokens" in facts else None
            if pool_shortfall(pool, resident, plan):
                return None  # the step's line says so at once, instead of thrashing a pool that cannot hold the load
            probe = ProbePlan.worst_case(
                cfg, headroom_bytes=plan.headroom_bytes, duration_s=plan.soak_s, sustained=True
            )
            return ProbePlan(
                probe.concurrency,
                probe.prompt_tokens,
                probe.max_tokens,
                plan.soak_s,
                plan.headroom_bytes,
                plan.max_preemption_rate,
            )

        def soak_load(facts: dict):
            return self.soak_runner(cfg, facts, self._tick)

        outcome = self.trials.run(cfg, log_path=log_path, decide_probe=decide_probe, make_load=soak_load)
        step = judge_step(
            outcome,
            plan,
            decision.phase,
            soak_s=plan.soak_s if soaking else None,
            unit=self.unit,
            resident_tokens=resident,
        )
        self._record(outcome, step)  # recorded before anything else can interrupt
        return step

    def _soak_workload(self, cfg: ServeConfig, facts: dict):
        """The soak load for a booted step (``facts``: what its server printed)."""
        from .workload import default_workload, replay_workload

        r = self.request
        context = int(cfg.max_model_len or facts.get("max_model_len") or 2048)
        concurrency = _soak_concurrency(cfg, facts)
        if r.replay:
            return replay_workload(
                r.replay, concurrency=concurrency, context=context, duration_s=r.plan.soak_s
            )
        return default_workload(
            concurrency=concurrency,
            context=context,
            duration_s=r.plan.soak_s,
            warmup_s=r.warmup_s,
            short_requests=r.short_requests,
        )

    def _workload_runner(self, cfg: ServeConfig, facts: dict, on_tick: Callable[[object], None]) -> Callable:
        from .workload import run_workload

        r = self.request
        work = self._soak_workload(cfg, facts)

        def load(base_url: str, model: str, is_alive: Callable[[], bool]):
            return run_workload(
                base_url,
                work,
                model=model,
                nvml=self.nvml,
                gpu_ids=list(r.gpu_ids),
                is_alive=is_alive,
                vocab_size=self.vocab_size,
                on_tick=on_tick,
            )

        return load

    def _tick(self, tick) -> None:
        extra = (
            f"{format_duration(tick.remaining_s)} left · KV {tick.kv_usage * 100:.0f}% · "
            f"{tick.running} running, {tick.waiting} waiting · preemptions {tick.preemptions} · errors {tick.errors}"
        )
        self.progress.phase("soak", tick.elapsed_s, tick.used_bytes or None, extra)

    # -- store --------------------------------------------------------------------------------
    def _open_run(self) -> tuple[int, list[StepResult]]:
        req_key = f"{self.request.key()}-{self.env_fp}"
        prior = self.store.unfinished_run("ramp", req_key)
        if prior is None:
            return self.store.begin_run("ramp", req_key, self.request.as_dict(), self.env_fp), []
        steps = [_step_from_record(rec) for rec in self.store.trials(prior.id)]
        self.store.resume_run(prior.id)
        self.progress.note(f"resuming ramp run {prior.id}: {len(steps)} step(s) already done")
        return prior.id, steps

    def _record(self, outcome: TrialOutcome, step: StepResult) -> None:
        self.store.record_trial(
            self._run_id,
            config=config_record(outcome.config),
            config_key=outcome.config.key(),
            env_fingerprint=self.env_fp,
            category=step.category,
            verdict=_trial_verdict(step),
            facts=outcome.facts,
            probe={"ramp_step": step.to_record(), "failure": step.failure, "ok": step.passed},
            started_at=outcome.started_at,
            duration_s=outcome.duration_s,
            log_path=str(outcome.log_path) if outcome.log_path else None,
        )

    def _result(
        self, run_id: int, steps: list[StepResult], reason: str, complete: bool, launches: int
    ) -> RampResult:
        env = self.launcher.device.serve_env(self.request.gpu_ids, self.request.config)
        return RampResult(self.request, list(steps), reason, complete, launches, run_id, env)


def _soak_concurrency(cfg: ServeConfig, facts: dict) -> int:
    """Sequences the soak keeps running: ``--max-num-seqs``, else as many full-length ones as vLLM says
    its pool holds (1..64)."""
    return cfg.max_num_seqs or max(1, min(64, int(facts.get("max_concurrency", 1))))


def _step_from_record(rec) -> StepResult:
    data = (rec.probe or {}).get("ramp_step")
    if data:
        return StepResult.from_record(data)
    cfg = config_from_record(ServeConfig(model=rec.config.get("model", "")), rec)
    return StepResult(cfg.gpu_memory_utilization or 0.0, "soak", "fail", rec.category)


def _trial_verdict(step: StepResult) -> str:
    """The store's trial verdict words (stable | boots | unstable | failed)."""
    if step.verdict == "pass":
        return "stable"
    if step.verdict == "boots" or (step.pool_too_small and step.soak_elapsed_s is None):
        return "boots"  # booted; its pool was too small for the soak load, so it was not soaked
    return "failed" if step.soak_elapsed_s is None else "unstable"


def _progress_verdict(step: StepResult) -> str:
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
