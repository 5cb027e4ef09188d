"""The ``find`` loop (:class:`Finder`): plan (the policy over the request) → launch (a trial) → observe
(log facts, probe) → decide (the policy) → record (the store, before anything else) → emit
(:class:`~.result.FindResult`). Every dependency comes in as an argument.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..errors import VllmError
from ..failures import TRANSIENT
from ..progress import Progress
from ..search import (
    Finish,
    Launch,
    Observation,
    Policy,
    ProbeSummary,
    Request,
)
from ..serveconfig import ServeConfig
from ..trial import ProbePlan, TrialOutcome, TrialSetup
from ..trialrecord import (
    config_from_record,
    config_record,
    env_fingerprint,
    outcome_from_record,
    probe_record,
)
from ..units import GIB
from ..vllm_defaults import DEFAULT_BLOCK_SIZE, MLA_BLOCK_SIZE
from .request import LOSSY_FLAGS, REQUIRED_FLAGS, FindRequest, context_guess
from .result import FindResult, UtilizationStep, explain
from .words import flags_words, known_words, outcome_words


class Finder:
    """Runs one search. Collaborators are injected: model spec, GPU target, estimator, vLLM info,
    launcher, NVML, store and progress."""

    def __init__(
        self,
        request: FindRequest,
        *,
        spec,
        gpu,
        estimate_fn,
        calibrate_fn,
        vllm_info,
        launcher,
        nvml,
        store,
        progress: Progress,
        log_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        machine_id: str = "",
    ) -> None:
        self.request = request
        self.machine_id = machine_id
        self.spec = spec
        self.gpu = gpu
        self.vllm_info = vllm_info
        self.launcher = launcher
        self.nvml = nvml
        self.store = store
        self.progress = progress
        self.log_dir = log_dir
        self.clock = clock
        self.trials = TrialSetup(
            launcher,
            nvml,
            request.gpu_ids,
            progress,
            request.timeouts,
            vocab_size=getattr(spec, "vocab_size", 32000) or 32000,
        )
        self.base = ServeConfig(
            model=spec.serve_name,
            tensor_parallel_size=request.tensor_parallel_size,
            extra_args=request.extra_args,
            load_format="dummy" if request.dummy_trials else None,
        )
        kind = request.device_kind
        self.policy = Policy(
            self._policy_request(),
            self.base,
            # no CUDA graphs where the device has none: the estimate of an eager config is the right one
            estimate=lambda cfg, cal: estimate_fn(
                spec,
                gpu.total_bytes,
                cfg.replace(enforce_eager=True) if "eager" in kind.missing_knobs else cfg,
                gpu_name=gpu.name,
                calibration=cal,
                device=kind,
            ),
            calibrate=calibrate_fn,
            start_util_cap=self._free_memory_util_cap(),
        )

    def _policy_request(self) -> Request:
        r = self.request
        allow = set(r.allow)
        info = self.vllm_info
        if info is not None:
            missing = [f for f in REQUIRED_FLAGS if not info.accepts(f)]
            if missing:
                raise VllmError(
                    f"vLLM {info.version} does not accept {', '.join(missing)}",
                    "upgrade vLLM (vllm-tune supports 0.18 and newer) or point --vllm-cmd at a newer install",
                )
            # a lossy rung this vLLM cannot express is dropped from the ladder, never passed
            allow -= {knob for knob, flag in LOSSY_FLAGS.items() if not info.accepts(flag)}
        kind = r.device_kind
        allow -= set(kind.missing_knobs)  # a knob that does nothing on this device is never tried
        rope = self._rope_extension(allow)
        return Request(
            objective=r.objective,
            min_seqs=r.min_seqs,
            min_context=r.min_context,
            target_context=r.target_context,
            target_seqs=r.target_seqs,
            allow=frozenset(allow),
            util_ceiling=r.util_ceiling,
            util_floor=r.util_floor,
            headroom_bytes=r.headroom_bytes,
            native_max_len=self.spec.derived_max_model_len,
            knob_order=r.knob_order or Request.knob_order,
            # set where vLLM has it, allowed or not: what offload would buy is said either way
            offload_flag=LOSSY_FLAGS["offload"]
            if (info is None or info.accepts(LOSSY_FLAGS["offload"])) and "offload" not in kind.missing_knobs
            else None,
            block_size=MLA_BLOCK_SIZE if getattr(self.spec, "is_mla", False) else DEFAULT_BLOCK_SIZE,
            device_unit=kind.unit,
            kv_bytes_skip_free_check=kind.kv_bytes_skip_free_check,
            rope_overrides=rope.flag_value if rope else None,
            rope_max_len=rope.length if rope else None,
        )

    def _rope_extension(self, allow: set[str]):
        """The YaRN override of the rope-scaling rung, where it is allowed and a floor is past the model's
        own length (rope.extension refuses a model whose positions YaRN cannot stretch)."""
        from ..rope import extension

        r = self.request
        longest = max(r.target_context or 0, r.min_context or 0)
        if "rope-scaling" not in allow or longest <= self.spec.derived_max_model_len:
            return None
        return extension(self.spec, longest, option="--context" if r.target_context else "--min-context")

    def _free_memory_util_cap(self) -> float | None:
        """vLLM refuses to start unless util × total is free after its own CUDA context: cap it up front."""
        free = getattr(self.gpu, "free_bytes", None)
        if not free:
            return None
        total = self.gpu.total_bytes
        cap = (min(free) - context_guess(self.request.device_kind)) / total
        return None if cap >= self.request.util_ceiling else round(int(cap * 100) / 100, 2)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> FindResult:
        env_fp = self.env_fingerprint()
        run_id, history, outcomes = self._open_run(env_fp)
        try:
            return self._loop(run_id, env_fp, history, outcomes)
        except BaseException:
            # Ctrl-C, SIGTERM or a bug: the servers are already stopped by their context managers;
            # mark the run so the same command resumes it.
            self.store.finish_run(run_id, "interrupted", None)
            self.progress.note("interrupted: run the same command again to resume where it stopped")
            raise

    def _loop(self, run_id: int, env_fp: str, history: list[Observation], outcomes: list[TrialOutcome]):
        started = self.clock()
        launches = len(outcomes)  # a resumed run's launches count, towards the budget too
        while True:
            decision = self.policy.next(history)
            if isinstance(decision, Finish):
                if self._needs_real_weights(decision, outcomes):
                    launches += 1
                    self._prove_on_real_weights(decision, run_id, env_fp, history, outcomes)
                    continue
                return self._finish(run_id, decision, outcomes, launches)
            if launches >= self.request.max_launches:
                return self._finish(
                    run_id, self._budget_finish(history, "launch budget"), outcomes, launches, complete=False
                )
            if (left_s := self._budget_left(started)) is not None and left_s <= 0:
                return self._finish(
                    run_id, self._budget_finish(history, "time budget"), outcomes, launches, complete=False
                )
            known = self.store.known_trial(env_fp, decision.config.key())
            reused = _known_failure(decision.config, known, self.request.headroom_bytes) if known else None
            if reused is not None:
                self.progress.step(
                    f"skip {flags_words(decision.config)}",
                    f"known from an earlier run ({known_words(reused)}); not launched again",
                )
                history.append(self._observation(reused))
                outcomes.append(reused)
                continue
            launches += 1
            left = self._budget_left(started)
            outcome = self._launch(decision, history, len(outcomes) + 1, within_s=left)
            self._record(run_id, env_fp, outcome)  # recorded before anything else can interrupt
            outcomes.append(outcome)
            self.progress.done(outcome.verdict, outcome_words(outcome))
            for warning in self.policy.misestimates([self._observation(outcome)]):
                self.progress.note(f"warning: {warning}")
            if (
                outcome.category == "startup_timeout"
                and left is not None
                and (self._budget_left(started) or 0.0) <= 0
            ):
                # cut short by the budget: says nothing about the config (and is not reused)
                return self._finish(
                    run_id, self._budget_finish(history, "time budget"), outcomes, launches, complete=False
                )
            history.append(self._observation(outcome))

    def _budget_left(self, started: float) -> float | None:
        """Seconds left of --time-budget (None: no budget)."""
        if not self.request.time_budget_s:
            return None
        return self.request.time_budget_s - (self.clock() - started)

    def _needs_real_weights(self, decision: Finish, outcomes: list[TrialOutcome]) -> bool:
        """With --dummy-trials the winner is proved once more on the real weights before it is returned."""
        if decision.winner is None or decision.winner.config.load_format != "dummy":
            return False
        real = decision.winner.config.replace(load_format=None).key()
        return not any(t.config.key() == real for t in outcomes)

    def _prove_on_real_weights(self, decision: Finish, run_id: int, env_fp: str, history, outcomes) -> None:
        assert decision.winner is not None  # _needs_real_weights found one
        cfg = decision.winner.config.replace(load_format=None)
        plan = self._probe_plan(cfg)
        outcome = self._run(cfg, len(outcomes) + 1, "the winner on the real weights", lambda _facts: plan)
        self._record(run_id, env_fp, outcome)
        outcomes.append(outcome)
        if outcome.verdict != "stable":  # the policy sees it fail and backs off from there
            history.append(self._observation(outcome))
        self.progress.done(outcome.verdict, outcome_words(outcome))

    def _launch(
        self, decision: Launch, history: list[Observation], number: int, within_s: float | None = None
    ) -> TrialOutcome:
        cfg = decision.config

        def decide_probe(facts: dict) -> ProbePlan | None:
            if not self.policy.probe_after_boot(history, cfg, self._with_totals(facts)):
                return None
            return self._probe_plan(cfg)

        return self._run(cfg, number, decision.reason, decide_probe, within_s=within_s)

    def _probe_plan(self, cfg: ServeConfig) -> ProbePlan:
        return ProbePlan.worst_case(
            cfg, headroom_bytes=self.request.headroom_bytes, duration_s=self.request.probe_duration_s
        )

    def _run(
        self, cfg: ServeConfig, number: int, why: str, decide_probe, within_s: float | None = None
    ) -> TrialOutcome:
        self.progress.step(f"trial {number}: {flags_words(cfg)}", why)
        log_path = self.log_dir / f"trial-{number:02d}-{cfg.key()}.log"
        outcome = self.trials.run(cfg, log_path=log_path, decide_probe=decide_probe, within_s=within_s)
        outcome.facts = self._with_totals(outcome.facts)
        return outcome

    def _with_totals(self, facts: dict) -> dict:
        out = dict(facts)
        out.setdefault("total_gib", self.gpu.total_bytes / GIB)
        return out

    def _observation(self, t: TrialOutcome) -> Observation:
        probe = None
        if t.probe is not None or t.verdict == "unstable":
            probe = ProbeSummary(
                ok=t.verdict == "stable",
                server_died=bool(getattr(t.probe, "server_died", False)) or t.category != "success",
                min_headroom_bytes=t.min_headroom_bytes,
                detail=t.probe_failure,
            )
        return Observation(t.config, t.category, dict(t.facts), probe)

    # -- store ----------------------------------------------------------------------------------
    def env_fingerprint(self) -> str:
        return env_fingerprint(self.spec, self.gpu, self.request.gpu_ids, self.vllm_info, self.machine_id)

    def _open_run(self, env_fp: str):
        req_key = f"{self.request.key()}-{env_fp}"
        prior = self.store.unfinished_run("find", req_key)
        history: list[Observation] = []
        outcomes: list[TrialOutcome] = []
        if prior is not None:
            for rec in self.store.trials(prior.id):
                cfg = config_from_record(self.base, rec)
                outcomes.append(outcome_from_record(cfg, rec))
                history.append(self._observation(outcomes[-1]))
            self.store.resume_run(prior.id)
            self.progress.note(f"resuming run {prior.id}: {len(outcomes)} trial(s) already done")
            return prior.id, history, outcomes
        recorded = {**self.request.as_dict(), "gpu_name": getattr(self.gpu, "name", "")}  # for history
        run_id = self.store.begin_run("find", req_key, recorded, env_fp)
        return run_id, history, outcomes

    def _record(self, run_id: int, env_fp: str, t: TrialOutcome) -> None:
        self.store.record_trial(
            run_id,
            config=config_record(t.config),
            config_key=t.config.key(),
            env_fingerprint=env_fp,
            category=t.category,
            verdict=t.verdict,
            facts=t.facts,
            probe=probe_record(t),
            started_at=t.started_at,
            duration_s=t.duration_s,
            log_path=str(t.log_path) if t.log_path else None,
        )

    # -- results --------------------------------------------------------------------------------
    def _budget_finish(self, history: list[Observation], what: str) -> Finish:
        return Finish(self.policy.best(history), f"stopped by the {what}", complete=False)

    def _utilization_step(self, winner: TrialOutcome | None, history) -> UtilizationStep | None:
        if winner is None:
            return None
        per_token = self.policy.estimate_measured(history, winner.config).kv_bytes_per_token
        kind = self.request.device_kind
        return UtilizationStep.of(self.gpu.total_bytes, len(self.request.gpu_ids), per_token, kind.unit)

    def _finish(
        self,
        run_id: int,
        decision: Finish,
        outcomes: list[TrialOutcome],
        launches: int,
        complete: bool = True,
    ) -> FindResult:
        history = [self._observation(t) for t in outcomes]
        winner = None
        if decision.winner is not None:
            keys = {decision.winner.config.key(), decision.winner.config.replace(load_format=None).key()}
            stable = [t for t in outcomes if t.config.key() in keys and t.verdict == "stable"]
            winner = next((t for t in stable if t.config.load_format is None), stable[-1])
        env = self.request.device_kind.serve_env(
            self.request.gpu_ids, winner.config if winner is not None else None
        )
        result = FindResult(
            request=self.request,
            winner=winner,
            trials=outcomes,
            launches=launches,
            reason=decision.reason,
            complete=complete and decision.complete,
            missing=decision.missing,
            gains=decision.gains,
            warnings=self.policy.misestimates(history),
            utilization_step=self._utilization_step(winner, history),
            env=env,
            run_id=run_id,
        )
        result.explanation = explain(result, self.gpu.total_bytes)
        status = "done" if winner is not None else "failed"
        self.store.finish_run(run_id, status, result.as_json())
        return result


def _known_failure(cfg: ServeConfig, rec, headroom_bytes: int) -> TrialOutcome | None:
    """The outcome an earlier trial of the same flags on the same machine says this launch would have,
    when it would fail: a start that failed for a reason of its own, a server that died under the load,
    or one that left less memory under the load than the headroom asked for now, whatever headroom
    that run asked for (a smaller --headroom launches an unstable one again). None: launch it."""
    if rec.category in TRANSIENT:  # says nothing about the config: launch it again
        return None
    known = outcome_from_record(cfg, rec)
    known.duration_s = 0.0  # not launched this time
    if rec.verdict == "failed":
        return known
    probe = rec.probe or {}
    short_of_headroom = "headroom under load" in (probe.get("failure") or "")
    if rec.verdict == "unstable" and not short_of_headroom:
        return known  # it died, or requests failed: no headroom setting changes that
    left = probe.get("min_headroom_bytes")
    if left is None or left >= headroom_bytes:
        return None
    known.verdict = "unstable"
    known.probe_failure = (
        f"{left / GIB:.2f} GiB headroom under load in an earlier run, below the {headroom_bytes / GIB:.2f} GiB "
        "required"
    )
    return known
