"""``vllm-tune find``: the search loop that returns the largest stable config and a ready serve command.

plan (model, GPUs, estimate, policy) → launch (trial) → observe (log facts, probe) → decide (policy)
→ record (store) → emit (:class:`FindResult`). Every dependency comes in as an argument.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .devices import CUDA, DeviceKind, device_kind
from .errors import GpuError, UsageError, VllmError
from .failures import TRANSIENT
from .hashkey import stable_key
from .objectives.base import UTIL_STEP
from .progress import Progress
from .rope import describe
from .search import (
    LOSSY_COST,
    MAX_SEQS,
    Finish,
    Launch,
    Observation,
    Policy,
    ProbeSummary,
    Request,
)
from .serveconfig import ServeConfig
from .trial import ProbePlan, Timeouts, TrialOutcome, TrialSetup
from .trialrecord import config_from_record, config_record, env_fingerprint, outcome_from_record
from .units import GIB, MIB
from .vllm_defaults import DEFAULT_BLOCK_SIZE, MLA_BLOCK_SIZE
from .vllmargv import shell_command

REQUIRED_FLAGS = ("--max-model-len", "--max-num-seqs", "--gpu-memory-utilization", "--tensor-parallel-size")
# The lossy rungs and the flag each needs. Since vLLM 0.18 there is no --swap-space: the "offload"
# rung is weight offload through --cpu-offload-gb (KV offload to CPU does not shrink the GPU pool).
# rope-scaling is a YaRN override (rope.extension) for a context past the model's own length.
LOSSY_FLAGS = {
    "eager": "--enforce-eager",
    "fp8-kv": "--kv-cache-dtype",
    "offload": "--cpu-offload-gb",
    "rope-scaling": "--hf-overrides",
}


@dataclass(frozen=True)
class FindRequest:
    model: str
    gpu_ids: tuple[int, ...]
    tensor_parallel_size: int
    objective: str = "context"
    knob_order: tuple[str, ...] = ()
    min_seqs: int = 1
    min_context: int | None = None
    target_context: int | None = None
    target_seqs: int | None = None
    allow: frozenset[str] = frozenset()
    util_ceiling: float = 0.95
    util_floor: float = 0.50  # below this the search gives up (a share of a shared card may go lower)
    headroom_bytes: int = GIB
    max_launches: int = 12
    time_budget_s: float | None = None
    timeouts: Timeouts = Timeouts()
    probe_duration_s: float | None = None
    dummy_trials: bool = False
    extra_args: tuple[str, ...] = ()
    vllm_cmd: str = "vllm"
    device: str = "cuda"

    @property
    def device_kind(self) -> DeviceKind:
        return device_kind(self.device)

    def key(self) -> str:
        return stable_key(self.as_dict(), compact=False)

    def as_dict(self) -> dict:
        # a field at its old value is left out, so the keys of earlier runs stay the same
        floor = {} if self.util_floor == 0.50 else {"util_floor": self.util_floor}
        device = {} if self.device == "cuda" else {"device": self.device}
        return {
            **floor,
            **device,
            "model": self.model,
            "gpu_ids": list(self.gpu_ids),
            "tp": self.tensor_parallel_size,
            "objective": self.objective,
            "min_seqs": self.min_seqs,
            "min_context": self.min_context,
            "target_context": self.target_context,
            "target_seqs": self.target_seqs,
            "allow": sorted(self.allow),
            "util_ceiling": self.util_ceiling,
            "headroom_bytes": self.headroom_bytes,
            "dummy_trials": self.dummy_trials,
            "extra_args": list(self.extra_args),
        }


@dataclass
class FindResult:
    request: FindRequest
    winner: TrialOutcome | None
    trials: list[TrialOutcome]
    launches: int
    reason: str
    complete: bool
    missing: tuple[str, ...] = ()
    gains: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what the trials showed the estimate got badly wrong
    utilization_step: UtilizationStep | None = None  # what 0.01 of utilization buys (with a winner)
    explanation: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    run_id: int | None = None

    @property
    def stable(self) -> bool:
        return self.winner is not None and self.winner.verdict == "stable"

    def final_config(self) -> ServeConfig | None:
        if self.winner is None:
            return None
        return self.winner.config.replace(load_format=None)

    def command(self) -> str | None:
        cfg = self.final_config()
        return shell_command(cfg.serve_args(), self.env, vllm_cmd=self.request.vllm_cmd) if cfg else None

    def yaml_text(self) -> str | None:
        cfg = self.final_config()
        if cfg is None:
            return None
        notes = "".join(f"# {line}\n" for line in self.explanation)
        try:
            mapping = cfg.yaml_mapping()
        except ValueError as exc:  # the passed-through flags stay on the command line
            mapping = cfg.yaml_mapping(passed_through=False)
            notes += f"# not in this file ({exc}), so also pass: {shlex.join(cfg.extra_args)}\n"
        run = shell_command(["serve", "--config", "this-file.yaml"], self.env, vllm_cmd=self.request.vllm_cmd)
        return (
            f"# {run}\n# (written by vllm-tune find; the environment is the one the trials ran with)\n{notes}"
            + yaml.safe_dump(mapping, sort_keys=False)
        )

    def as_json(self) -> dict:
        cfg = self.final_config()
        return {
            "command": self.command(),
            "config": {k: v for k, v in cfg.flags().items()} if cfg else {},
            "model": cfg.model if cfg else self.request.model,
            "stable": self.stable,
            "complete": self.complete,
            "reason": self.reason,
            "launches": self.launches,
            "explanation": self.explanation,
            "warnings": list(self.warnings),
            "missing": list(self.missing),
            "lossy_gains": list(self.gains),
            "utilization_step": self.utilization_step.as_json() if self.utilization_step else None,
            "config_file": str(self.config_path) if self.config_path else None,
            "run_id": self.run_id,
            "trials": [trial_json(t) for t in self.trials],
        }


def trial_json(t: TrialOutcome) -> dict:
    probe = t.probe
    return {
        "flags": t.config.flags(),
        "category": t.category,
        "verdict": t.verdict,
        "facts": t.facts,
        "duration_s": round(t.duration_s, 3),
        "min_headroom_gib": round(t.min_headroom_bytes / GIB, 3)
        if t.min_headroom_bytes is not None
        else None,
        "probe_failure": t.probe_failure or None,
        "preemptions": getattr(probe, "preemptions", None),
        "load": {
            "concurrency": t.probe_plan.concurrency,
            "prompt_tokens": t.probe_plan.prompt_tokens,
            "max_tokens": t.probe_plan.max_tokens,
        }
        if t.probe_plan
        else None,
        "log": str(t.log_path) if t.log_path else None,
    }


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
        from .rope import extension

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
                    f"skip {_flags_words(decision.config)}",
                    f"known from an earlier run ({_known_words(reused)}); not launched again",
                )
                history.append(self._observation(reused))
                outcomes.append(reused)
                continue
            launches += 1
            left = self._budget_left(started)
            outcome = self._launch(decision, history, len(outcomes) + 1, within_s=left)
            self._record(run_id, env_fp, outcome)  # recorded before anything else can interrupt
            outcomes.append(outcome)
            self.progress.done(outcome.verdict, _outcome_words(outcome))
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
        self.progress.done(outcome.verdict, _outcome_words(outcome))

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
        self.progress.step(f"trial {number}: {_flags_words(cfg)}", why)
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
        probe = None
        if t.probe is not None:
            p = t.probe
            probe = {
                "ok": t.verdict == "stable",
                "failure": t.probe_failure,
                "min_headroom_bytes": t.min_headroom_bytes,
                "preemptions": getattr(p, "preemptions", None),
                "server_died": getattr(p, "server_died", None),
                "latency_p50_s": getattr(p, "latency_p50_s", None),
                "latency_p99_s": getattr(p, "latency_p99_s", None),
                "peak_used_bytes": {str(k): v for k, v in (getattr(p, "peak_used_bytes", {}) or {}).items()},
            }
        self.store.record_trial(
            run_id,
            config=config_record(t.config),
            config_key=t.config.key(),
            env_fingerprint=env_fp,
            category=t.category,
            verdict=t.verdict,
            facts=t.facts,
            probe=probe,
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


def explain(result: FindResult, total_bytes: int) -> list[str]:
    """Why each knob ended where it did, from the trials' own numbers."""
    lines = [f"warning: {warning}" for warning in result.warnings]
    w = result.winner
    if w is not None:
        cfg, f = w.config, w.facts
        pool, tokens = f.get("available_kv_gib"), f.get("kv_cache_tokens")
        if pool is not None and tokens is not None:
            # a pool given in bytes is known to the byte (vLLM prints two decimals of a GiB)
            size = (
                f"{pool:.2f} GiB"
                if cfg.kv_cache_memory_bytes is None
                else _pool_words(cfg.kv_cache_memory_bytes)
            )
            lines.append(
                f"KV pool {size} holds {int(tokens):,} tokens; --max-model-len {cfg.max_model_len} "
                f"at {cfg.max_num_seqs} sequence(s)"
            )
        if cfg.kv_cache_memory_bytes is not None:
            lines.append(_kv_bytes_words(result, cfg))
        elif result.utilization_step is not None:
            lines.append(result.utilization_step.words())
        util_words = f"{cfg.gpu_memory_utilization or 0:.2f}"
        failed = sorted(
            {
                (t.config.gpu_memory_utilization or 0, t.probe_failure or t.category.replace("_", " "))
                for t in result.trials
                if t.verdict in ("failed", "unstable")
                and (t.config.gpu_memory_utilization or 0) > (cfg.gpu_memory_utilization or 0)
            },
            reverse=True,
        )
        head = (
            f" with {w.min_headroom_bytes / GIB:.2f} GiB headroom under load"
            if w.min_headroom_bytes is not None
            else ""
        )
        if cfg.kv_cache_memory_bytes is not None:
            lines.append(f"the {_pool_words(cfg.kv_cache_memory_bytes)} KV pool stable{head}")
        elif failed:
            u, cat = failed[-1]
            lines.append(f"{u:.2f} failed ({cat}), {util_words} stable{head}")
        else:
            lines.append(f"--gpu-memory-utilization {util_words} stable{head}")
        yarn = describe(cfg.hf_overrides)
        lossy = [
            name
            for name, on in (
                ("--enforce-eager", cfg.enforce_eager),
                ("--kv-cache-dtype fp8", cfg.kv_cache_dtype != "auto"),
                ("--cpu-offload-gb", bool(cfg.cpu_offload_gb)),
                (f"--hf-overrides ({yarn})", bool(yarn)),
            )
            if on
        ]
        if lossy:
            lines.append("lossy knobs used because they were allowed and needed: " + ", ".join(lossy))
        if yarn:
            lines.append(
                f"{yarn} serves a length past the model's own: {LOSSY_COST['rope-scaling']}, which can "
                "degrade short texts (serve short traffic from a server without it)"
            )
    lines.append(f"{result.launches} launch(es); {result.reason}")
    lines.extend(result.missing)
    lines.extend(f"not allowed: {gain}" for gain in result.gains)
    return lines


def _kv_bytes_words(result: FindResult, cfg: ServeConfig) -> str:
    """Why the winner's pool is in bytes: the fraction a device's free memory refused (the last such
    refusal's numbers), and what the flag does instead."""
    unit = result.request.device_kind.unit
    refused = [t for t in result.trials if t.category == "startup_free_memory_below_utilization"]
    facts = refused[-1].facts if refused else {}
    free, total = facts.get("free_gib"), facts.get("total_gib")
    why = (
        f"the {unit} had only {free} of {total} GiB free for the fraction"
        if free and total
        else "free memory"
    )
    pool = cfg.kv_cache_memory_bytes or 0  # set: this is only said of a pool in bytes
    return (
        f"--kv-cache-memory-bytes {pool} ({_pool_words(pool)}) sizes the "
        f"KV pool for {cfg.max_num_seqs} x {cfg.max_model_len} tokens: {why}, and with the pool in bytes vLLM "
        "skips that startup check (no --gpu-memory-utilization: it would not be used)"
    )


def _pool_words(nbytes: int) -> str:
    """A pool in bytes for people: GiB, or MiB for one under a tenth of a GiB (a tiny model's)."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / MIB:.1f} MiB"


@dataclass(frozen=True)
class UtilizationStep:
    """What one 0.01 of --gpu-memory-utilization buys on this machine: 1% of each device's total memory
    (vLLM's budget is a fraction of the total, device by device) and the KV tokens that holds at the
    winner's bytes per token on one device (the KV cache is split over TP, or, with MLA, whole on each)."""

    bytes_per_device: int
    devices: int
    tokens: int
    unit: str = "GPU"

    @classmethod
    def of(cls, total_bytes: int, devices: int, kv_bytes_per_token: int, unit: str) -> UtilizationStep:
        step = math.ceil(total_bytes * UTIL_STEP)
        return cls(step, devices, step // max(1, kv_bytes_per_token), unit)

    def words(self) -> str:
        per = self.bytes_per_device / GIB
        across = (
            f" ({per * self.devices:.2f} GiB over the {self.devices} {self.unit}s)"
            if self.devices > 1
            else ""
        )
        return (
            f"each 0.01 of --gpu-memory-utilization is {per:.2f} GiB per {self.unit}{across} and holds "
            f"{self.tokens:,} tokens of KV cache"
        )

    def as_json(self) -> dict:
        per = self.bytes_per_device / GIB
        return {
            "gib_per_device": round(per, 3),
            "gib_total": round(per * self.devices, 3),
            "tokens": self.tokens,
        }


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


def _known_words(t: TrialOutcome) -> str:
    if t.verdict == "unstable":
        return f"unstable under load: {t.probe_failure or t.category.replace('_', ' ')}"
    return t.category.replace("_", " ")


def _flags_words(cfg: ServeConfig) -> str:
    return " ".join(
        f"{k}" if v is True else f"{k} {v}"
        for k, v in cfg.flags().items()
        if k not in ("--tensor-parallel-size", "--load-format")
    )


def _outcome_words(t: TrialOutcome) -> str:
    f = t.facts
    if t.verdict in ("stable", "boots", "unstable"):
        bits = []
        if "available_kv_gib" in f:
            bits.append(f"KV {f['available_kv_gib']:.2f} GiB")
        if "kv_cache_tokens" in f:
            bits.append(f"{int(f['kv_cache_tokens']):,} tokens")
        if t.min_headroom_bytes is not None:
            bits.append(f"headroom {t.min_headroom_bytes / GIB:.2f} GiB")
        if t.probe_failure:
            bits.append(t.probe_failure)
        return ", ".join(bits)
    words = t.category.replace("_", " ")
    if t.evidence and t.category in ("unsupported_flag_or_arg_error", "engine_core_died_other", "unknown"):
        words += f" ({t.evidence.strip()[:200]})"
    if "estimated_max_model_len" in f:
        words += f" (vLLM: estimated maximum model length is {int(f['estimated_max_model_len'])})"
    return words


def context_guess(kind: DeviceKind) -> int:
    """What find assumes vLLM holds before its free-memory check: half the device's context overhead,
    optimistic on purpose. A first utilization capped too high fails in seconds and vLLM's error then
    says the exact free memory; a refusal before any launch must not refuse what would start."""
    return kind.context_overhead_bytes // 2


def check_weights_fit(spec, total_bytes: int, tp: int, gpu_count: int, kind: DeviceKind = CUDA) -> None:
    """Refuse before any launch when the weights alone cannot fit, and say what would."""
    # room for non-torch, activation and a little KV
    usable = total_bytes * kind.util_ceiling - context_guess(kind) - GIB
    if kind.name == "cpu" and spec.weights_per_gpu(tp) > usable:
        raise GpuError(
            f"the weights alone need {spec.weights_per_gpu(tp) / GIB:.1f} GiB per NUMA node at TP {tp}, "
            f"more than a node's {total_bytes / GIB:.1f} GiB of RAM can give vLLM",
            "use a machine with more memory per node, more nodes (--gpus N), or a smaller or quantized model",
        )
    if spec.weights_per_gpu(tp) <= usable:
        return
    fits = [t for t in spec.tp_sizes() if t >= tp and spec.weights_per_gpu(t) <= usable]
    more = (
        f"{fits[0]} GPUs like these (--gpus {fits[0]}: TP {fits[0]}, the smallest that fits)"
        if fits
        else "more or larger GPUs"
    )
    raise GpuError(
        f"the weights alone need {spec.weights_per_gpu(tp) / GIB:.1f} GiB per GPU at TP {tp}, "
        f"more than a {total_bytes / GIB:.1f} GiB GPU can give after vLLM's overheads",
        f"use {more}, a quantized checkpoint (AWQ/GPTQ/FP8), or --allow offload",
    )


def check_gpus_free(gpu, weights_per_gpu: int, *, gpu_ids, kind: DeviceKind = CUDA) -> None:
    """Refuse early when other processes hold so much memory that not even the weights fit."""
    free = getattr(gpu, "free_bytes", None)
    if not free:
        return
    for idx, f in zip(gpu_ids, free, strict=False):
        if gpu.total_bytes - f < GIB and not kind.process_bytes:
            continue  # next to nothing held by others: whether the weights fit is not theirs to answer
        if kind.process_bytes and f < weights_per_gpu + kind.process_bytes:
            raise GpuError(
                f"{kind.unit} {idx} has only {f / GIB:.1f} GiB available of {gpu.total_bytes / GIB:.1f} GiB, and "
                f"vLLM needs {(weights_per_gpu + kind.process_bytes) / GIB:.1f} GiB there before any KV cache "
                f"({weights_per_gpu / GIB:.1f} GiB of weights, {kind.process_bytes / GIB:.1f} GiB for its processes)",
                "stop what is using the memory (top, sorted by RES) or choose other nodes with --gpu-ids",
            )
        if f - context_guess(kind) < weights_per_gpu:
            raise GpuError(
                f"GPU {idx} has only {f / GIB:.1f} GiB free of {gpu.total_bytes / GIB:.1f} GiB, "
                f"less than the {weights_per_gpu / GIB:.1f} GiB of weights per GPU",
                "stop what is using it (nvidia-smi) or choose other GPUs with --gpu-ids",
            )


def validate_request(req: FindRequest) -> None:
    if not 0 < req.util_ceiling <= 0.98:
        raise UsageError(
            f"--util-ceiling must be in (0, 0.98], got {req.util_ceiling}",
            "vLLM needs some memory outside its budget; use e.g. --util-ceiling 0.95",
        )
    if req.objective == "targets" and not (req.target_context and req.target_seqs):
        raise UsageError(
            "fixed targets need both --context and --seqs", "pass e.g. --context 131072 --seqs 8"
        )
    if req.min_seqs < 1:
        raise UsageError(f"--min-seqs must be at least 1, got {req.min_seqs}", "use --min-seqs 1 or more")
    for option, seqs in (("--min-seqs", req.min_seqs), ("--seqs", req.target_seqs)):
        if seqs and seqs > MAX_SEQS:
            raise UsageError(
                f"{option} {seqs} is more sequences than find searches (at most {MAX_SEQS}, vLLM's largest default)",
                f"use {option} {MAX_SEQS} or fewer, or run several servers",
            )
    if req.max_launches < 1:
        raise UsageError(
            f"--max-launches must be at least 1, got {req.max_launches}", "use e.g. --max-launches 12"
        )
    unknown = req.allow - set(LOSSY_FLAGS)
    if unknown:
        raise UsageError(
            f"unknown lossy knob(s) in --allow: {', '.join(sorted(unknown))}",
            f"choose from {', '.join(LOSSY_FLAGS)}",
        )
