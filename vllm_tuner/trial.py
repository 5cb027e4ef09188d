"""One trial: launch vLLM with a config, watch it boot, optionally prove it under load, stop it.

Shared by ``find``, ``ramp`` and ``up --verify``. The server is always stopped (and its GPU memory seen
released) before this returns, whatever happened — including Ctrl-C.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .devices import unit_of
from .progress import Progress
from .serveconfig import ServeConfig
from .units import GIB
from .vllm_defaults import DEFAULT_BATCHED_TOKENS

if TYPE_CHECKING:
    from .probe import LoadReport

# (base_url, served_model_name, is_alive) -> probe.LoadReport
LoadRunner = Callable[[str, str, Callable[[], bool]], "LoadReport"]
# the booted server's facts -> the load that replaces the worst-case probe (ramp's soak)
LoadFactory = Callable[[dict], LoadRunner]


@dataclass(frozen=True)
class ProbePlan:
    """The load a booted config must survive: ``concurrency`` streams of ``prompt_tokens`` + ``max_tokens``."""

    concurrency: int
    prompt_tokens: int
    max_tokens: int
    duration_s: float | None = None
    headroom_bytes: int = GIB
    max_preemption_rate: float | None = None  # preemptions per completed request (None: any)

    @classmethod
    def worst_case(
        cls,
        config: ServeConfig,
        *,
        headroom_bytes: int,
        duration_s: float | None = None,
        max_tokens: int | None = None,
        sustained: bool = False,
    ) -> ProbePlan:
        """``max_num_seqs`` requests that together fill ``max_model_len`` each, decoding just long enough
        that the first request is still generating when the last prefill lands, so every sequence holds
        its full KV at once — the promise being tested (see :func:`overlap_decode_tokens`).

        ``sustained`` is for a soak that repeats the requests for a while: each then decodes an eighth
        of the context (64..4096 tokens), so the full KV is held most of the time, not for an instant."""
        context = config.max_model_len or 2048
        concurrency = config.max_num_seqs or 1
        if max_tokens is None and sustained:
            max_tokens = min(MAX_DECODE_TOKENS, max(MIN_DECODE_TOKENS, context // 8))
        elif max_tokens is None:
            max_tokens = overlap_decode_tokens(
                concurrency, context, config.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
            )
        max_tokens = max(1, min(max_tokens, context // 2))
        return cls(
            concurrency=concurrency,
            prompt_tokens=max(1, context - max_tokens),
            max_tokens=max_tokens,
            duration_s=duration_s,
            headroom_bytes=headroom_bytes,
        )


# DEFAULT_BATCHED_TOKENS: vLLM's smallest default --max-num-batched-tokens for `vllm serve`; the smaller
# budget means more scheduler steps to prefill, so it errs long.
OVERLAP_MARGIN = 1.25  # decode this much longer than the prefills take, plus a fixed tail
OVERLAP_TAIL_TOKENS = 32
MIN_DECODE_TOKENS, MAX_DECODE_TOKENS = 64, 4096


def overlap_decode_tokens(concurrency: int, context: int, batched_tokens: int) -> int:
    """How many tokens each probe request decodes so that all ``concurrency`` prompts are resident at once.

    vLLM's scheduler (chunked prefill) spends at most ``batched_tokens`` per step on prefill and gives every
    running request one decode token per step, so the last of ``concurrency`` prompts of ``context`` tokens
    lands after about ``concurrency × context / batched_tokens`` steps: the first request must still be
    decoding then. A longer decode proves nothing more about memory and costs a decode step per token.
    """
    steps = math.ceil(concurrency * context / max(1, batched_tokens))
    wanted = math.ceil(steps * OVERLAP_MARGIN) + OVERLAP_TAIL_TOKENS
    return max(MIN_DECODE_TOKENS, min(MAX_DECODE_TOKENS, wanted))


@dataclass(frozen=True)
class Timeouts:
    ready_s: float = 1800.0  # a first torch.compile of a big model can take many minutes
    stall_s: float = 600.0  # no log progress for this long while not ready = hung


@dataclass
class TrialOutcome:
    config: ServeConfig
    category: str
    verdict: str  # stable | boots | unstable | failed
    facts: dict = field(default_factory=dict)
    probe: LoadReport | None = None
    started_at: float = 0.0
    duration_s: float = 0.0
    log_path: Path | None = None
    evidence: str = ""
    probe_failure: str = ""
    probe_plan: ProbePlan | None = None  # the load it was put under, if any

    @property
    def min_headroom_bytes(self) -> int | None:
        if self.probe is None or not getattr(self.probe, "headroom_bytes", None):
            return None
        return min(self.probe.headroom_bytes.values())


def run_trial(
    config: ServeConfig,
    *,
    launcher,
    nvml,
    gpu_ids: list[int],
    log_path: Path,
    progress: Progress,
    timeouts: Timeouts,
    decide_probe: Callable[[dict], ProbePlan | None],
    vocab_size: int = 32000,
    wall_clock: Callable[[], float] = time.time,
    make_load: LoadFactory | None = None,
) -> TrialOutcome:
    """Launch, observe, maybe probe, stop. ``decide_probe(facts)`` sees vLLM's numbers after boot.

    ``make_load(facts)`` gives a ``load_runner(base_url, served_model_name, is_alive)`` that replaces the
    worst-case probe with another load sized from those numbers (``ramp``'s soak); the plan's thresholds
    still judge its report.
    """
    from .launch import ServerProcess
    from .logparse import LogWatcher

    started = wall_clock()
    watcher = LogWatcher()

    def on_progress(phase: str, elapsed_s: float, used: dict[int, int] | None) -> None:
        progress.phase(phase, elapsed_s, used)

    with ServerProcess(
        launcher, config, gpu_ids=gpu_ids, log_path=log_path, watcher=watcher, nvml=nvml
    ) as server:
        ready = server.wait_ready(
            timeout_s=timeouts.ready_s, stall_s=timeouts.stall_s, on_progress=on_progress
        )
        if not ready.ready:
            diag = ready.diagnosis
            assert diag is not None  # a server that is not ready says why
            return TrialOutcome(
                config,
                diag.category,
                "failed",
                dict(diag.facts),
                None,
                started,
                wall_clock() - started,
                log_path,
                diag.evidence,
            )
        progress.phase("serving", wall_clock() - started, server.used_memory(), "ready")
        facts = dict(watcher.facts)
        plan = decide_probe(facts)
        if plan is None:
            return TrialOutcome(
                config, "success", "boots", facts, None, started, wall_clock() - started, log_path
            )
        load_runner = make_load(facts) if make_load is not None else None
        load = f"{plan.concurrency} × {plan.prompt_tokens + plan.max_tokens} tokens"
        progress.phase("probing", 0.0, server.used_memory(), load)

        def on_sample(elapsed_s: float, peak: dict[int, int], done: int) -> None:
            progress.phase("probing", elapsed_s, peak, f"{load}, {done} done, peak memory")

        if load_runner is not None:
            report = load_runner(server.base_url, server.served_model_name, _alive_check(server, watcher))
        else:
            report = _probe(
                server, watcher, plan, nvml=nvml, gpu_ids=gpu_ids, vocab_size=vocab_size, on_sample=on_sample
            )
        facts = dict(watcher.facts)
        if watcher.fatal_category:
            category = watcher.fatal_category
            return TrialOutcome(
                config,
                category,
                "unstable",
                facts,
                report,
                started,
                wall_clock() - started,
                log_path,
                _evidence(watcher),
                "the server died under load",
                plan,
            )
        failure = judge_probe(report, plan, unit_of(nvml))
        verdict = "unstable" if failure else "stable"
        return TrialOutcome(
            config,
            "success",
            verdict,
            facts,
            report,
            started,
            wall_clock() - started,
            log_path,
            "",
            failure,
            plan,
        )


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search or ramp shares: how vLLM is launched and watched, on which GPUs,
    within which limits. :meth:`run` makes the log's folder and runs one :func:`run_trial`."""

    launcher: object
    nvml: object
    gpu_ids: tuple[int, ...]
    progress: Progress
    timeouts: Timeouts
    vocab_size: int = 32000

    def run(
        self,
        config: ServeConfig,
        *,
        log_path: Path,
        decide_probe: Callable[[dict], ProbePlan | None],
        make_load: LoadFactory | None = None,
        within_s: float | None = None,
    ) -> TrialOutcome:
        """``within_s``: what is left of a time budget; the wait for readiness ends there at the latest."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timeouts = self.timeouts
        if within_s is not None and within_s < timeouts.ready_s:
            timeouts = replace(timeouts, ready_s=max(1.0, within_s))
        return run_trial(
            config,
            launcher=self.launcher,
            nvml=self.nvml,
            gpu_ids=list(self.gpu_ids),
            log_path=log_path,
            progress=self.progress,
            timeouts=timeouts,
            decide_probe=decide_probe,
            vocab_size=self.vocab_size,
            make_load=make_load,
        )


def _alive_check(server, watcher) -> Callable[[], bool]:
    def alive() -> bool:
        return server.returncode is None and watcher.fatal_category is None

    return alive


def _probe(
    server, watcher, plan: ProbePlan, *, nvml, gpu_ids: list[int], vocab_size: int, on_sample=None
) -> LoadReport:
    from .probe import run_load_probe

    alive = _alive_check(server, watcher)
    return run_load_probe(
        server.base_url,
        model=server.served_model_name,
        concurrency=plan.concurrency,
        prompt_tokens=plan.prompt_tokens,
        max_tokens=plan.max_tokens,
        duration_s=plan.duration_s,
        nvml=nvml,
        gpu_ids=gpu_ids,
        is_alive=alive,
        vocab_size=vocab_size,
        on_sample=on_sample,
    )


# What a load can show besides a clean pass; a probe (find) and a soak (ramp) are judged the same way.
SERVER_DIED = "server_died_under_load"
REQUEST_ERRORS = "request_errors"
HEADROOM = "headroom_below_minimum"
PREEMPTIONS = "preemptions_over_limit"


@dataclass(frozen=True)
class ProbeVerdict:
    """How a config held under a load: ``category`` ("success" or one of the four above) and, when it
    did not hold, the words that say why."""

    category: str = "success"
    failure: str = ""


def probe_verdict(
    report, *, headroom_bytes: int, max_preemption_rate: float | None, unit: str = "GPU"
) -> ProbeVerdict:
    """Alive, no failed request, ``headroom_bytes`` left on every device (a ``unit``: "GPU", "NUMA
    node") and preemptions within ``max_preemption_rate`` per completed request (None: any), in that
    order: memory trouble wins, so :data:`PREEMPTIONS` means preemption with memory to spare — the KV
    pool is too small for the load (:class:`probe.PreemptionReading`)."""
    if report.server_died:
        return ProbeVerdict(SERVER_DIED, "the server died under load")
    errors = report.errors if isinstance(report.errors, dict) else {}
    failed = sum(errors.values()) if errors else int(report.errors or 0)
    if failed:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(errors.items()))
        return ProbeVerdict(
            REQUEST_ERRORS, f"{failed} request(s) failed under load" + (f" ({kinds})" if kinds else "")
        )
    if report.headroom_bytes:
        worst_device, worst = min(report.headroom_bytes.items(), key=lambda kv: kv[1])
        if worst < headroom_bytes:
            return ProbeVerdict(
                HEADROOM,
                f"{unit} {worst_device} had {worst / GIB:.2f} GiB headroom under load, "
                f"below the {headroom_bytes / GIB:.2f} GiB required",
            )
    reading = report.preemption
    if not reading.within(max_preemption_rate):
        return ProbeVerdict(
            PREEMPTIONS, f"{reading.words()} under load, limit {max_preemption_rate:g} per request"
        )
    return ProbeVerdict()


def judge_probe(report, plan: ProbePlan, unit: str = "GPU") -> str:
    """Why a load probe failed, or "" if the config held (:func:`probe_verdict`'s words)."""
    return probe_verdict(
        report, headroom_bytes=plan.headroom_bytes, max_preemption_rate=plan.max_preemption_rate, unit=unit
    ).failure


def _evidence(watcher) -> str:
    tail = watcher.tail(5)
    return tail[-1] if tail else ""
