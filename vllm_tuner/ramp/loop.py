"""The ramp loop (:class:`Ramp`): plan (:meth:`RampPlan.next`) → launch (a trial through
:class:`trial.TrialSetup`) → observe (the soak under :mod:`workload`) → decide (:func:`judge_step`) →
record (:mod:`.record`: the store, before anything else; an interrupted ramp resumes at the step it was in) → emit
(:class:`~.report.RampResult`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..devices import unit_of
from ..progress import Progress
from ..serveconfig import ServeConfig
from ..trial import (
    ProbePlan,
    TrialOutcome,
    TrialSetup,
)
from ..units import format_duration
from .plan import NextStep, RampRequest, Stop
from .record import step_from_record, step_record
from .report import RampResult, progress_verdict, step_words
from .step import StepResult, judge_step, pool_shortfall

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
            self.progress.done(progress_verdict(step), step_words(step, self.unit))

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
        from ..workload import default_workload, replay_workload

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
        from ..workload import run_workload

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
        steps = [step_from_record(rec) for rec in self.store.trials(prior.id)]
        self.store.resume_run(prior.id)
        self.progress.note(f"resuming ramp run {prior.id}: {len(steps)} step(s) already done")
        return prior.id, steps

    def _record(self, outcome: TrialOutcome, step: StepResult) -> None:
        self.store.record_trial(self._run_id, **step_record(outcome, step, self.env_fp))

    def _result(
        self, run_id: int, steps: list[StepResult], reason: str, complete: bool, launches: int
    ) -> RampResult:
        env = self.launcher.device.serve_env(self.request.gpu_ids, self.request.config)
        return RampResult(self.request, list(steps), reason, complete, launches, run_id, env)


def _soak_concurrency(cfg: ServeConfig, facts: dict) -> int:
    """Sequences the soak keeps running: ``--max-num-seqs``, else as many full-length ones as vLLM says
    its pool holds (1..64)."""
    return cfg.max_num_seqs or max(1, min(64, int(facts.get("max_concurrency", 1))))
