"""``find --objective throughput``: memory fit, one sweep launch, one proof launch.

1. The memory fit is find's own search (``Finder.run``) with the ``throughput`` objective: the largest
   stable KV pool at the context the workload's longest request needs.
2. One launch at that utilization and length with a high --max-num-seqs cap (halved while it does not
   boot: memory permitting) and the token budget ``sweep.token_budget`` picks for the workload and the
   SLO, and on that one server a closed-loop sweep of client concurrency (``sweep.next_level``; each
   level measured by ``loadgen.run_level``).
3. One more launch at the chosen --max-num-seqs and the same token budget, proved under the workload at saturation (twice as
   many clients as sequences, so the scheduler always has a queue): alive, no failed request,
   headroom on every device, preemptions per finished request within ``max_preemption_rate``. If it
   does not hold, the next held level below it gets the same proof (once).

A level breaks when it breaks the SLO, loses a request, runs short of headroom or preempts more than
the rate: the sweep never chooses what the proof would refuse.

The sweep and proof launches go to the store as trials of the memory fit's run (``history`` shows
them), each with its levels, under a key of the launch's flags and the plan (workload, SLO, durations):
the same command run again, after an interruption say, reuses a recorded launch instead of relaunching.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .find import Finder, FindResult, trial_json
from .hashkey import stable_key
from .loadgen import LevelReport, run_level
from .objectives.throughput import GOODPUT, THROUGHPUT
from .search import Observation, ProbeSummary
from .serveconfig import ServeConfig
from .slo import Slo
from .sweep import Choice, Level, choose, level_words, next_level, token_budget
from .traffic import Traffic
from .trial import ProbePlan, TrialOutcome, probe_verdict
from .trialrecord import config_from_record, config_record, outcome_from_record, probe_record
from .units import GIB
from .vllmargv import shell_command
from .workload import merge_reports

SWEEP_SEQ_CAP = 256  # the sweep launch's --max-num-seqs: vLLM's default on most GPUs
BOOT_TRIES = 3  # the cap is halved this many times at most while the sweep launch does not boot
DEFAULT_MAX_PREEMPTION_RATE = 0.05  # preemptions per finished request at saturation
SATURATION = 2  # clients per sequence in the proof
LEVELS = "levels"  # the facts key of a recorded sweep or proof launch's measured levels


@dataclass(frozen=True)
class ThroughputPlan:
    traffic: Traffic
    slo: Slo = Slo()
    level_duration_s: float = 30.0
    warmup_s: float = 5.0
    proof_duration_s: float = 60.0
    seq_cap: int = SWEEP_SEQ_CAP
    start: int = 1
    max_preemption_rate: float = DEFAULT_MAX_PREEMPTION_RATE
    # seconds of the server's time per wall second: under --simulate, --sim-time-scale. Durations here,
    # and every latency and rate measured, are in the server's time.
    time_scale: float = 1.0


@dataclass
class ThroughputResult:
    fit: FindResult
    plan: ThroughputPlan
    levels: list[LevelReport] = field(default_factory=list)
    choice: Choice | None = None
    launches: list[TrialOutcome] = field(default_factory=list)  # the sweep's and the proofs'
    proof: LevelReport | None = None
    winner: TrialOutcome | None = None
    reason: str = ""
    judged: list[Level] = field(default_factory=list)  # the levels as the sweep judged them
    config_path: object = None
    chart_path: object = None

    @property
    def request(self):
        return self.fit.request

    def final_config(self) -> ServeConfig | None:
        return self.winner.config.replace(load_format=None) if self.winner is not None else None

    def command(self) -> str | None:
        cfg = self.final_config()
        if cfg is None:
            return None
        return shell_command(cfg.serve_args(), self.fit.env, vllm_cmd=self.request.vllm_cmd)

    def yaml_text(self) -> str | None:
        if self.winner is None:
            return None
        carrier = FindResult(
            self.request,
            self.winner,
            [],
            0,
            self.reason,
            True,
            env=self.fit.env,
            explanation=self.explanation(),
        )
        return carrier.yaml_text()

    def explanation(self) -> list[str]:
        lines = [f"workload {self.plan.traffic.describe()}; SLO {self.plan.slo.words()}"]
        if self.choice is not None:
            lines.append(f"chosen {self.choice.reason}")
        if self.proof is not None and self.winner is not None:
            p = self.proof
            lines.append(
                f"proved at saturation ({p.concurrency} clients): {p.output_tokens_per_s:,.0f} tok/s, "
                f"KV usage up to {p.load.max_kv_usage:.0%}, {p.load.preemptions} preemption(s) "
                f"in {p.load.requests} request(s)"
            )
        lines.append(THROUGHPUT.guarantee)
        lines.append(self.reason)
        return lines

    def chart_html(self) -> str:
        from .throughput_chart import sweep_chart_html

        ttft = [lim.seconds for lim in self.plan.slo.limits if lim.key == "ttft_p95"]
        chosen = self.choice.level.concurrency if self.choice is not None and self.choice.level else None
        return sweep_chart_html(
            self.table(),
            title=f"{self.request.model}: throughput sweep, workload {self.plan.traffic.name}",
            chosen=chosen,
            broken={row["concurrency"]: "; ".join(row["broken"]) for row in self.table() if row["broken"]},
            ttft_limit_s=ttft[0] if ttft else None,
        )

    def table(self) -> list[dict]:
        """A row per measured level, with what broke it (empty: it held)."""
        broken = {lv.concurrency: list(lv.broken) for lv in self.judged}
        return [
            {**lv.row(), "broken": broken.get(lv.concurrency, [])}
            for lv in sorted(self.levels, key=lambda lv: lv.concurrency)
        ]

    def as_json(self) -> dict:
        cfg = self.final_config()
        return {
            "objective": "throughput",
            "command": self.command(),
            "config": cfg.flags() if cfg else {},
            "stable": self.winner is not None,
            "reason": self.reason,
            "workload": self.plan.traffic.describe(),
            "slo": self.plan.slo.words(),
            "table": self.table(),
            "chosen": {
                "concurrency": self.choice.level.concurrency,
                "output_tokens_per_s": round(self.choice.level.output_tokens_per_s, 1),
                "reason": self.choice.reason,
            }
            if self.choice is not None and self.choice.level is not None
            else None,
            "proof": self.proof.row() if self.proof is not None else None,
            "explanation": self.explanation(),
            "config_file": str(self.config_path) if self.config_path else None,
            "chart": str(self.chart_path) if self.chart_path else None,
            "memory_fit": self.fit.as_json(),
            "launches": [trial_json(t) for t in self.launches],
        }


LevelRunner = Callable[..., LevelReport]


class ThroughputSearch:
    """Runs the three stages with a ``Finder`` (its trials, GPUs and progress); ``level_runner``
    measures one level (``loadgen.run_level``)."""

    def __init__(
        self, finder: Finder, plan: ThroughputPlan, *, level_runner: LevelRunner = run_level
    ) -> None:
        self.finder = finder
        self.plan = plan
        self.level_runner = level_runner
        self.numbers = itertools.count()  # every level draws new requests of the workload
        self.unit = finder.request.device_kind.unit
        self.run_id: int | None = None  # the memory fit's stored run: the sweep and proofs are its trials
        self.reused = 0  # launches recorded by an earlier run, not launched again

    def run(self) -> ThroughputResult:
        fit = self.finder.run()
        result = ThroughputResult(fit, self.plan)
        if fit.winner is None:
            result.reason = f"no memory fit: {fit.reason}"
            return result
        self.run_id = fit.run_id
        self._search(result)
        if self.run_id is not None:  # the run's result is the throughput choice (``history`` shows it)
            status = "done" if result.winner is not None else "failed"
            self.finder.store.finish_run(self.run_id, status, result.as_json())
        return result

    def _search(self, result: ThroughputResult) -> None:
        fit = result.fit
        assert fit.winner is not None  # run() returned before without one
        fitted = fit.winner.config
        self._sweep(fitted, result)
        # the proofs run on the sweep's flags (its token budget: the one its levels were measured under;
        # a recorded sweep's, where one was reused)
        fitted = result.launches[-1].config
        result.judged = self._levels(result)
        held = [lv for lv in result.judged if lv.held]
        result.choice = choose(result.judged, cap=self._cap(result))
        if result.choice.level is None:
            result.reason = result.choice.reason
            return
        candidates = [result.choice.level.concurrency] + [
            lv.concurrency
            for lv in sorted(held, key=lambda lv: -lv.concurrency)
            if lv.concurrency < result.choice.level.concurrency
        ][:1]
        for seqs in candidates:
            outcome, proof = self._prove(fitted.replace(max_num_seqs=seqs, load_format=None), result)
            if outcome.verdict == "stable":
                result.winner, result.proof = outcome, proof
                if seqs != candidates[0]:  # the choice fell back: it says so, and why
                    level = next(lv for lv in held if lv.concurrency == seqs)
                    failure = result.launches[-2].probe_failure or result.launches[-2].category.replace(
                        "_", " "
                    )
                    result.choice = Choice(
                        level,
                        f"C={seqs}: {level_words(level)}; C={candidates[0]} did not hold at saturation ({failure})",
                    )
                break
        if result.winner is None:
            result.reason = "the chosen --max-num-seqs did not hold at saturation: " + (
                result.launches[-1].probe_failure or result.launches[-1].category.replace("_", " ")
            )
            return
        best = max(
            (self._observation(t) for t in result.launches if t.verdict == "stable"), key=THROUGHPUT.rank
        )
        result.winner = next(t for t in result.launches if t.config == best.config)
        launched = len(result.launches) - self.reused
        result.reason = f"{fit.launches} launch(es) to fit memory, {launched} to sweep and prove" + (
            f" ({self.reused} more recorded by an earlier run, not launched again)" if self.reused else ""
        )

    # -- the sweep ------------------------------------------------------------------------------
    def _sweep(self, fitted: ServeConfig, result: ThroughputResult) -> None:
        cap = max(fitted.max_num_seqs or 1, self.plan.seq_cap)
        for attempt in range(BOOT_TRIES):
            budget = fitted.max_num_batched_tokens or token_budget(self.plan.traffic, self.plan.slo, cap)
            cfg = fitted.replace(max_num_seqs=cap, max_num_batched_tokens=budget)
            levels: list[LevelReport] = []
            key = self._launch_key(f"sweep{attempt + 1}")
            outcome = self._launch(cfg, key, f"closed-loop concurrency sweep up to {cap}", levels, cap)
            result.launches.append(outcome)
            result.levels = levels
            if outcome.verdict != "failed" or cap <= (fitted.max_num_seqs or 1):
                return
            cap = max(fitted.max_num_seqs or 1, cap // 2)  # memory permitting: a smaller cap boots

    def _launch(
        self, cfg: ServeConfig, key: str, why: str, levels: list[LevelReport], cap: int
    ) -> TrialOutcome:
        finder = self.finder
        if (recorded := self._recorded("sweep", key, cfg, levels)) is not None:
            return recorded
        finder.progress.step(f"sweep: {_flags(cfg)}", why)
        plan = self._probe_plan(cap)

        def load(base_url: str, served: str, is_alive: Callable[[], bool]):
            while (c := next_level(self._as_levels(levels), cap=cap, start=self.plan.start)) is not None:
                level = self._measure(base_url, served, is_alive, c, self.plan.level_duration_s)
                levels.append(level)
                finder.progress.note(f"C={c}: {level_words(self._level(level))}{_broken(self._level(level))}")
                if level.load.server_died:
                    break
            return merge_reports([lv.load for lv in levels])

        log_path = finder.log_dir / f"sweep-{cfg.key()}.log"
        outcome = finder.trials.run(
            cfg, log_path=log_path, decide_probe=lambda facts: plan, make_load=lambda facts: load
        )
        outcome.facts = finder._with_totals(outcome.facts)
        if (
            outcome.verdict == "unstable"
            and levels
            and not outcome.probe_failure.startswith("the server died")
        ):
            # a level short of headroom is a broken level, not a failed sweep
            outcome.verdict, outcome.probe_failure = "stable", ""
        self._record(key, outcome, levels)
        finder.progress.done(outcome.verdict, outcome.probe_failure or outcome.category.replace("_", " "))
        return outcome

    def _measure(self, base_url, served, is_alive, concurrency: int, duration_s: float) -> LevelReport:
        finder = self.finder
        return self.level_runner(
            base_url,
            self.plan.traffic,
            model=served,
            concurrency=concurrency,
            duration_s=duration_s,
            warmup_s=self.plan.warmup_s,
            nvml=finder.nvml,
            gpu_ids=finder.request.gpu_ids,
            is_alive=is_alive,
            numbers=self.numbers,
            vocab_size=finder.trials.vocab_size,
            clock=self._clock,
        )

    def _clock(self) -> float:
        return time.monotonic() * self.plan.time_scale

    # -- the proof ------------------------------------------------------------------------------
    def _prove(self, cfg: ServeConfig, result: ThroughputResult) -> tuple[TrialOutcome, LevelReport | None]:
        finder = self.finder
        seqs = cfg.max_num_seqs or 1
        clients = seqs * SATURATION
        measured: list[LevelReport] = []
        key = self._launch_key("proof", cfg)
        if (recorded := self._recorded("proof", key, cfg, measured)) is not None:
            result.launches.append(recorded)
            return recorded, measured[0] if measured else None
        finder.progress.step(f"proof: {_flags(cfg)}", f"the workload at saturation ({clients} clients)")
        plan = self._probe_plan(clients)

        def load(base_url: str, served: str, is_alive: Callable[[], bool]):
            measured.append(self._measure(base_url, served, is_alive, clients, self.plan.proof_duration_s))
            return measured[0].load

        log_path = finder.log_dir / f"proof-{cfg.key()}.log"
        outcome = finder.trials.run(
            cfg, log_path=log_path, decide_probe=lambda facts: plan, make_load=lambda facts: load
        )
        outcome.facts = finder._with_totals(outcome.facts)
        proof = measured[0] if measured else None
        if outcome.verdict == "stable" and proof is not None:
            rate_broken = self._preemption_rate_broken(proof)
            if rate_broken:
                outcome.verdict, outcome.probe_failure = "unstable", rate_broken
        if proof is not None:
            outcome.facts[GOODPUT] = proof.output_tokens_per_s
        self._record(key, outcome, measured)
        result.launches.append(outcome)
        finder.progress.done(outcome.verdict, outcome.probe_failure or _proof_words(proof))
        return outcome, proof

    # -- the store ------------------------------------------------------------------------------
    def _launch_key(self, what: str, cfg: ServeConfig | None = None) -> str:
        """The store's key of a launch. The same sweep (``sweep1``, or ``sweep2`` after a cap that did
        not boot...) is the same request (model, GPUs, length...) and plan (workload, SLO, durations),
        whatever pool this run's memory fit landed on (a rerun's fit may land 0.01 off): the recorded
        sweep's flags are then used, and the proof follows from them. The same proof is the same flags
        and plan."""
        plan = stable_key(dataclasses.asdict(self.plan))
        flags = cfg.key() if cfg is not None else self.finder.request.key()
        return f"{what}-{flags}-{plan}"

    def _record(self, key: str, outcome: TrialOutcome, levels: list[LevelReport]) -> None:
        """The launch as a trial of the memory fit's run, its levels in its facts."""
        if self.run_id is None:  # a fit that no stored run holds
            return
        self.finder.store.record_trial(
            self.run_id,
            config=config_record(outcome.config),
            config_key=key,
            env_fingerprint=self.finder.env_fingerprint(),
            category=outcome.category,
            verdict=outcome.verdict,
            facts={**outcome.facts, LEVELS: [lv.as_record() for lv in levels]},
            probe=probe_record(outcome),
            started_at=outcome.started_at,
            duration_s=outcome.duration_s,
            log_path=str(outcome.log_path) if outcome.log_path else None,
        )

    def _recorded(
        self, what: str, key: str, cfg: ServeConfig, levels: list[LevelReport]
    ) -> TrialOutcome | None:
        """The same launch recorded by an earlier run (its levels appended to ``levels``), or None."""
        if self.run_id is None:
            return None
        rec = self.finder.store.known_trial(self.finder.env_fingerprint(), key)
        if rec is None:
            return None
        facts = dict(rec.facts)
        levels.extend(LevelReport.from_record(lv) for lv in facts.pop(LEVELS, []))
        cfg = config_from_record(cfg, rec)
        outcome = outcome_from_record(cfg, dataclasses.replace(rec, facts=facts))
        self.reused += 1
        self.finder.progress.step(f"{what}: {_flags(cfg)}", "recorded by an earlier run: not launched again")
        self.finder.progress.done(outcome.verdict, f"{len(levels)} level(s) from run {rec.run_id}")
        return outcome

    def _probe_plan(self, clients: int) -> ProbePlan:
        """The thresholds a trial judges the load by (headroom; preemptions are judged as a rate here),
        with the workload's longest request as the load the progress line shows."""
        longest = self.plan.traffic.longest
        return ProbePlan(clients, max(1, longest - 1), 1, headroom_bytes=self.finder.request.headroom_bytes)

    # -- judging --------------------------------------------------------------------------------
    def _preemption_rate_broken(self, level: LevelReport) -> str:
        reading = level.load.preemption
        if reading.within(self.plan.max_preemption_rate):
            return ""
        return (
            f"preemption rate {reading.rate:.2f} per request ({reading.preemptions} in {reading.requests}), "
            f"limit {self.plan.max_preemption_rate:g}"
        )

    def _level(self, report: LevelReport) -> Level:
        broken = list(self.plan.slo.broken(report.stats))
        memory = probe_verdict(
            report.load,
            headroom_bytes=self.finder.request.headroom_bytes,
            max_preemption_rate=None,
            unit=self.unit,
        )
        if memory.failure:
            broken.append(f"memory ({memory.failure})")
        rate = self._preemption_rate_broken(report)
        if rate:
            broken.append(rate)
        return Level(report.concurrency, report.output_tokens_per_s, tuple(broken), dict(report.stats))

    def _as_levels(self, reports: list[LevelReport]) -> list[Level]:
        return [self._level(r) for r in reports]

    def _levels(self, result: ThroughputResult) -> list[Level]:
        return self._as_levels(result.levels)

    def _cap(self, result: ThroughputResult) -> int:
        """The --max-num-seqs the sweep ran under (the last sweep launch's)."""
        sweeps = [t for t in result.launches if GOODPUT not in t.facts]
        return (sweeps[-1].config.max_num_seqs or 1) if sweeps else self.plan.seq_cap

    def _observation(self, t: TrialOutcome) -> Observation:
        metrics = {GOODPUT: t.facts[GOODPUT]} if GOODPUT in t.facts else {}
        probe = ProbeSummary(ok=t.verdict == "stable", min_headroom_bytes=t.min_headroom_bytes)
        return Observation(t.config, t.category, dict(t.facts), probe, metrics=metrics)


def _flags(cfg: ServeConfig) -> str:
    return " ".join(
        k if v is True else f"{k} {v}"
        for k, v in cfg.flags().items()
        if k not in ("--tensor-parallel-size", "--load-format")
    )


def _broken(level: Level) -> str:
    return f" — breaks the {', '.join(level.broken)}" if level.broken else ""


def _proof_words(proof: LevelReport | None) -> str:
    if proof is None:
        return ""
    head = min(proof.load.headroom_bytes.values()) / GIB if proof.load.headroom_bytes else None
    words = f"{proof.output_tokens_per_s:,.0f} tok/s, {proof.load.preemptions} preemption(s)"
    return words + (f", headroom {head:.2f} GiB" if head is not None else "")
