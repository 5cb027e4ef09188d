"""The search policy of ``vllm-tune find``: pure decisions, no I/O.

Given what the user asked for and every trial so far, :meth:`Policy.next` says what to launch next
(or that the search is over), and :meth:`Policy.probe_after_boot` says whether a config that just
booted is worth proving under load or should be replaced at once by a better one.

The policy measures, then computes: the first candidate comes from the estimate; every launch that
printed vLLM's own numbers (available KV memory, tokens, "estimated maximum model length is N") is fed
back through ``calibrate`` so the next candidate is computed from measured memory, not stepped to.
Failures move caps (utilization, sequences, batched tokens) by their category, in the guides' knob
order; lossy knobs (eager, fp8 KV, CPU offload) are used only when allowed and only when needed.

Everything here is deterministic given the history, so a resumed search replays to the same point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import failures
from .failures import Response
from .objectives import Objective, Sizing, named
from .objectives.base import UTIL_STEP, round_length
from .serveconfig import ServeConfig
from .units import GIB, MIB
from .vllm_defaults import DEFAULT_UTILIZATION

# rope-scaling comes last: it buys no memory (it costs some), only a context past the model's own length, and
# it changes every request, short ones too; a floor past that length needs it whatever the other knobs do
LOSSY_ORDER = ("eager", "fp8-kv", "offload", "rope-scaling")
LOSSY_COST = {  # what each lossy knob costs, for the line that says what it would buy
    "eager": "no CUDA graphs: slower decoding",
    "fp8-kv": "an fp8 KV cache: some accuracy",
    "offload": "weights read from CPU memory: much slower",
    "rope-scaling": "static YaRN: every request's positions scaled, short ones too",
}
MAX_SEQS = 1024
MIN_BATCHED_TOKENS = 256  # halving --max-num-batched-tokens after a profiling OOM stops here
MEASURED_MARGIN = 0.005  # launches of one config differ a little; stay this far under what vLLM reported
# vLLM's profiled activation peak differs by some MiB between configs: a pool carried to another
# utilization keeps this much back
PROFILE_NOISE_GIB = 48 / 1024
# Before any launch, the estimate of what a GPU holds besides the KV cache (weights, the worker's runtime
# and activations, CUDA graphs) is good to about this fraction: a floor it puts out of reach by less than
# that is launched and measured
ESTIMATE_ERROR = 0.05
# Weights vLLM loaded further than this from the estimate: the estimate is wrong about the model itself
WEIGHTS_TOLERANCE = 0.15


class EstimateView(Protocol):
    """What the policy reads from an estimate (see ``vllm_tuner.estimate.Estimate``)."""

    kv_pool_bytes: int
    kv_bytes_per_token: int
    weights_bytes: int
    non_kv_bytes: int  # weights, non-torch (the worker's runtime) and the activation peak
    cudagraph_bytes: int

    def max_context(self, seqs: int) -> int: ...

    def max_seqs(self, context: int) -> int: ...

    def kv_bytes_for(self, context: int, seqs: int) -> int: ...


EstimateFn = Callable[[ServeConfig, object | None], EstimateView]
CalibrateFn = Callable[[dict[str, Any], ServeConfig], object]


@dataclass(frozen=True)
class Request:
    """What the user asked ``find`` for."""

    objective: str = "context"
    min_seqs: int = 1
    min_context: int | None = None
    target_context: int | None = None
    target_seqs: int | None = None
    allow: frozenset[str] = frozenset()
    util_ceiling: float = 0.95
    util_floor: float = 0.50
    headroom_bytes: int = GIB
    native_max_len: int = 32768
    max_seqs_cap: int = MAX_SEQS  # vLLM's largest default (H100 class); what a search may ask for
    block_size: int = 16
    knob_order: tuple[str, ...] = ("max-num-seqs", "max-model-len", "gpu-memory-utilization", *LOSSY_ORDER)
    offload_flag: str | None = "--cpu-offload-gb"
    near_optimum: float = 0.02  # a booted config within this fraction of the computed best is probed
    device_unit: str = "GPU"  # one device in messages: "GPU", or "NUMA node" on vLLM's CPU backend
    # --kv-cache-memory-bytes skips vLLM's startup check of the fraction on this device
    # (DeviceKind.kv_bytes_skip_free_check): a refusal for free memory is answered with a pool in bytes
    kv_bytes_skip_free_check: bool = False
    # the rope-scaling rung, where a floor is past native_max_len: the --hf-overrides value and its length
    rope_overrides: str | None = None
    rope_max_len: int | None = None

    @property
    def goal(self) -> Objective:
        """The objective this request names (``vllm_tuner.objectives``)."""
        return named(self.objective)

    def floor_context(self) -> int:
        return self.goal.floor(self)[0]

    def floor_seqs(self) -> int:
        return self.goal.floor(self)[1]


@dataclass(frozen=True)
class ProbeSummary:
    ok: bool
    server_died: bool = False
    min_headroom_bytes: int | None = None
    errors: int = 0
    preemptions: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Observation:
    """One finished trial, as the policy sees it."""

    config: ServeConfig
    category: str
    facts: dict[str, Any] = field(default_factory=dict)  # logparse.Facts: a number or a word per key
    probe: ProbeSummary | None = None
    # what a launch measured besides the log's facts (e.g. a probe's throughput), for an objective that
    # ranks results by it (``Objective.rank``)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def booted(self) -> bool:
        return self.category == "success"

    @property
    def stable(self) -> bool:
        return self.booted and self.probe is not None and self.probe.ok

    @property
    def verdict(self) -> str:
        if not self.booted:
            return "failed"
        if self.probe is None:
            return "boots"
        return "stable" if self.probe.ok else "unstable"


@dataclass(frozen=True)
class Launch:
    config: ServeConfig
    reason: str


@dataclass(frozen=True)
class Finish:
    winner: Observation | None
    reason: str
    complete: bool = True
    missing: tuple[str, ...] = ()  # no winner: what each lossy knob not allowed would reach
    gains: tuple[str, ...] = ()  # a winner: what each lossy knob not allowed would add to it


@dataclass
class _Seen:
    """What the walk over the history carries from one launch to the next (``Policy.caps``)."""

    stable: bool = False  # a stable probe so far
    graph_failures: int = 0
    runtime_cap: float | None = None  # the utilization the failures under load allow
    lowest_unstable: float = 1.0
    free_since_stable: float = 1.0  # what a start found free after the last stable probe: the lift's limit


@dataclass
class _Caps:
    """What the history has taught: upper bounds and escalations, derived fresh on every decision."""

    util: float
    seqs: int | None = None
    batched_tokens: int | None = None
    lossy: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    stop: str | None = None
    stop_is_memory: bool = True  # False when no memory knob could have helped (bad flags, a hang, a port)
    # The KV pool the device's free memory has room for, after it refused a launch for free memory where
    # --kv-cache-memory-bytes skips that check: every candidate is then sized in bytes (Policy._in_bytes)
    kv_room: int | None = None


def _floor_to(value: float, step: float) -> float:
    return math.floor(round(value / step, 6)) * step


def _round_util(value: float) -> float:
    return round(_floor_to(value, UTIL_STEP), 2)


class Policy:
    """Decides the next launch. ``estimate(config, calibration)`` and ``calibrate(facts, config)``
    are injected (the real ones live in ``vllm_tuner.estimate``)."""

    def __init__(
        self,
        request: Request,
        base: ServeConfig,
        *,
        estimate: EstimateFn,
        calibrate: CalibrateFn,
        start_util_cap: float | None = None,
    ) -> None:
        self.objective = request.goal  # ValueError for an objective not registered
        self.request = request
        self.base = base
        self._estimate = estimate
        self._calibrate = calibrate
        self._start_util_cap = start_util_cap

    # -- what the history teaches -------------------------------------------------------------
    def caps(self, history: Sequence[Observation]) -> _Caps:
        req = self.request
        util = req.util_ceiling
        if self._start_util_cap is not None:
            util = min(util, self._start_util_cap)
        caps = _Caps(util=_round_util(util))
        seen = _Seen()
        for obs in history:
            seen.stable = seen.stable or obs.stable
            learn = self._LEARN[failures.category(obs.category).response]
            learn(self, caps, seen, obs, history)
        lift = self._util_lift(history)
        runtime_cap = seen.runtime_cap
        if runtime_cap is not None:
            # the step down after a failure under load is conservative; a stable probe's own headroom
            # may show that a higher step holds the headroom too (never the step that failed)
            if lift is not None:
                runtime_cap = max(runtime_cap, min(lift, round(seen.lowest_unstable - UTIL_STEP, 2)))
            caps.util = min(caps.util, runtime_cap)
        elif lift is not None and lift > caps.util and caps.kv_room is None:
            # memory another process held when the search began (or at a failed start) was freed: a
            # stable probe's spare headroom buys the steps back, up to the ceiling, never to a step that
            # failed in any way
            failed = [o.config.gpu_memory_utilization or DEFAULT_UTILIZATION for o in history if not o.stable]
            top = min(
                [
                    req.util_ceiling,
                    seen.free_since_stable,
                    *(round(u - UTIL_STEP, 2) for u in failed if u > caps.util),
                ]
            )
            caps.util = max(caps.util, min(lift, _round_util(top)))
            caps.notes.append(f"a stable probe had room for --gpu-memory-utilization {caps.util:.2f}")
        caps.lossy = self._lossy_needed(history, caps)
        if caps.kv_room is not None and caps.kv_room <= 0:
            caps.stop = caps.stop or (
                f"the {self.request.device_unit}'s free memory leaves no room for a KV pool"
            )
        elif caps.util < self.request.util_floor and caps.kv_room is None:
            caps.stop = caps.stop or (
                f"the usable --gpu-memory-utilization fell below {self.request.util_floor:.2f}"
            )
        return caps

    # one handler per failures.Response: what a launch that ended so teaches the caps
    def _learn_booted(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        if obs.probe and not obs.probe.ok:
            self._learn_headroom(caps, seen, obs, history)

    def _learn_free_memory(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        free, total = obs.facts.get("free_gib"), obs.facts.get("total_gib")
        cap = free / total if free and total else _used_util(obs) - 0.05  # floored to 0.01 below
        caps.util = min(caps.util, _round_util(cap))
        if seen.stable:
            seen.free_since_stable = min(seen.free_since_stable, _round_util(cap))
        caps.notes.append(f"only {free} GiB of {total} GiB was free at startup")
        if self.request.kv_bytes_skip_free_check and free:
            room = self._pool_room(history, obs, int(free * GIB))
            caps.kv_room = room if caps.kv_room is None else min(caps.kv_room, room)

    def _learn_graph_capture(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        used_util = _used_util(obs)
        seen.graph_failures += 1
        caps.util = min(caps.util, round(used_util - UTIL_STEP * seen.graph_failures, 2))
        caps.notes.append(f"{used_util:.2f} failed in CUDA-graph capture")

    def _learn_headroom(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        used_util = _used_util(obs)
        pool = obs.config.kv_cache_memory_bytes
        if caps.kv_room is not None and pool is not None:
            # a pool in bytes: the headroom it lacked comes off the pool itself
            short = self.request.headroom_bytes - (_headroom_seen(obs) or 0)
            caps.kv_room = min(caps.kv_room, pool - max(short, 0) - int(PROFILE_NOISE_GIB * GIB))
            caps.notes.append(
                f"a {pool / GIB:.2f} GiB KV pool was not stable under load ({_probe_words(obs)})"
            )
            return
        after = self._util_after_runtime_failure(obs)
        seen.runtime_cap = after if seen.runtime_cap is None else min(seen.runtime_cap, after)
        seen.lowest_unstable = min(seen.lowest_unstable, used_util)
        caps.notes.append(f"{used_util:.2f} was not stable under load ({_probe_words(obs)})")

    def _learn_batched_tokens(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        cfg = obs.config
        tokens = cfg.max_num_batched_tokens or obs.facts.get("max_num_batched_tokens") or 8192
        if int(tokens) <= MIN_BATCHED_TOKENS:
            caps.stop = (
                f"profiling ran out of memory even at {tokens} batched tokens: the weights and "
                "vLLM's own memory leave no room"
            )
        caps.batched_tokens = max(cfg.max_num_seqs or 1, MIN_BATCHED_TOKENS, int(tokens) // 2)
        caps.notes.append(f"profiling ran out of memory at {tokens} batched tokens")

    def _learn_seqs_limit(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        limit = obs.facts.get("max_num_seqs_limit")
        if limit:
            caps.seqs = min(caps.seqs or limit, int(limit))

    def _learn_pool(self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]) -> None:
        # the pool it printed calibrates the next estimate (_calibration)
        caps.notes.append(f"no memory was left for the KV cache at {_used_util(obs):.2f}")

    def _learn_length(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        pass  # vLLM's estimated maximum model length is read where the length is computed (_measured_context)

    def _learn_retry(
        self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]
    ) -> None:
        if _count(history, obs.category) >= 2:
            caps.stop = failures.category(obs.category).stop_reason(self.request.device_unit)

    def _learn_stop(self, caps: _Caps, seen: _Seen, obs: Observation, history: Sequence[Observation]) -> None:
        category = failures.category(obs.category)
        caps.stop = category.stop_reason(self.request.device_unit)
        caps.stop_is_memory = caps.stop_is_memory and category.memory

    _LEARN: Mapping[Response, Callable[[Policy, _Caps, _Seen, Observation, Sequence[Observation]], None]] = {
        Response.BOOTED: _learn_booted,
        Response.CAP_UTIL_AT_FREE: _learn_free_memory,
        Response.STEP_UTIL_DOWN: _learn_graph_capture,
        Response.LOWER_UTIL_FOR_HEADROOM: _learn_headroom,
        Response.HALVE_BATCHED_TOKENS: _learn_batched_tokens,
        Response.CAP_SEQS_AT_LIMIT: _learn_seqs_limit,
        Response.REMEASURE_POOL: _learn_pool,
        Response.REMEASURE_LENGTH: _learn_length,
        Response.RETRY_ONCE: _learn_retry,
        Response.STOP: _learn_stop,
    }

    def _pool_room(self, history: Sequence[Observation], obs: Observation, free_bytes: int) -> int:
        """The KV pool that ``free_bytes``, found free when ``obs`` was refused, has room for, with the
        probe's headroom kept back. A refusal of a pool in bytes (at KV allocation) counted what was free
        after the worker's own memory; a refusal of a fraction, what was free before it, so the worker's
        non-KV memory (the calibrated estimate's) comes off too."""
        held = 0
        if obs.config.kv_cache_memory_bytes is None:
            est = self._estimate(obs.config, self._calibration(history, obs.config))
            held = est.non_kv_bytes + est.cudagraph_bytes
        return free_bytes - held - self.request.headroom_bytes

    def _in_bytes(self, history: Sequence[Observation], caps: _Caps, cfg: ServeConfig) -> ServeConfig:
        """``cfg`` with its pool in bytes where the caps say so (``_Caps.kv_room``): the bytes the
        (calibrated) estimate says its --max-model-len x --max-num-seqs take, with the block vLLM keeps
        back (its null block), rounded up to a MiB; and no fraction, which vLLM would not use."""
        if caps.kv_room is None:
            return cfg
        plain = cfg.replace(kv_cache_memory_bytes=None)
        est = self._estimate(plain, self._calibration(history, plain))
        need = est.kv_bytes_for(cfg.max_model_len or 0, cfg.max_num_seqs or 1)
        return cfg.replace(kv_cache_memory_bytes=-(-need // MIB) * MIB, gpu_memory_utilization=None)

    def _in_room(self, caps: _Caps, cfg: ServeConfig) -> ServeConfig:
        """``cfg`` with the whole room for its pool, to size a candidate in (``_Caps.kv_room``)."""
        return cfg if caps.kv_room is None else cfg.replace(kv_cache_memory_bytes=max(0, caps.kv_room))

    def _util_after_runtime_failure(self, obs: Observation) -> float:
        used = obs.config.gpu_memory_utilization or DEFAULT_UTILIZATION
        total: float | None = obs.facts.get("total_gib")
        total_bytes = total * GIB if total else None
        need = self.request.headroom_bytes
        seen = obs.probe.min_headroom_bytes if obs.probe else None
        if total_bytes and seen is not None and not (obs.probe and obs.probe.server_died):
            deficit = max(need - seen, 0) + 0.03 * GIB  # headroom moves ~1:1 with util x total
            return round(used - max(UTIL_STEP, math.ceil(deficit / total_bytes * 100) / 100), 2)
        if total_bytes:
            return round(used - max(2 * UTIL_STEP, math.ceil(need / total_bytes * 100) / 100), 2)
        return round(used - 0.03, 2)

    def _util_lift(self, history: Sequence[Observation]) -> float | None:
        """The highest utilization a stable probe's headroom says is still stable: headroom under load
        falls ~1:1 with utilization × the card, so a surplus over the required headroom buys whole
        0.01 steps. None if no stable probe had a surplus of at least one step."""
        best = None
        for obs in history:
            seen = obs.probe.min_headroom_bytes if obs.probe else None
            if not obs.stable or seen is None or not obs.facts.get("total_gib"):
                continue
            step_bytes = UTIL_STEP * obs.facts["total_gib"] * GIB
            steps = math.floor((seen - self.request.headroom_bytes) / step_bytes)
            if steps >= 1:
                lifted = round(
                    (obs.config.gpu_memory_utilization or DEFAULT_UTILIZATION) + steps * UTIL_STEP, 2
                )
                best = lifted if best is None else max(best, lifted)
        return best

    def _lossy_needed(self, history: Sequence[Observation], caps: _Caps) -> tuple[str, ...]:
        """The allowed lossy knobs, added one at a time in the knob order (the guides' ladder: eager,
        then an fp8 KV cache, then offload), up to the first set that reaches the goal. If none does,
        every allowed knob (the most they buy). rope-scaling, where the request needs a length past the
        model's own, is in every set: it buys no memory, only the length."""
        allowed = tuple(k for k in self.lossy_order() if k in self.request.allow and self._has_rung(k))
        needed = tuple(k for k in allowed if k == "rope-scaling")
        memory = tuple(k for k in allowed if k not in needed)
        for size in range(len(memory) + 1):
            chosen = tuple(k for k in allowed if k in needed or k in memory[:size])
            target = self._target(history, caps, chosen)
            if target is not None and self._reaches_goal(*target):
                return chosen
        return allowed

    def ladder(self, skipped: Mapping[str, str] | None = None, device: str = "cuda") -> list[str]:
        """How the search sets each knob, in the order it gives them up, for ``--dry-run``: the
        lossless ones as the objective sets them, then the lossy ones in --knob-order. ``skipped`` names
        the lossy knobs that do nothing on ``device``, with why (``DeviceKind.missing_knobs``): they are
        shown as skipped, allowed or not."""
        req = self.request
        skipped = skipped or {}
        util = (
            f"from {self.caps(()).util:.2f} down by 0.01 on memory failures, to {req.util_floor:.2f} at least"
        )
        steps = self.objective.ladder(req)
        steps.append(f"gpu-memory-utilization: {util}")
        for knob in self.lossy_order():
            if not self._has_rung(knob):
                continue  # rope-scaling: no length past the model's own was asked for
            if knob in skipped:
                steps.append(f"{knob}: skipped on {device} ({skipped[knob]})")
            elif knob in req.allow:
                steps.append(f"{knob}: allowed, used only if needed")
            else:
                steps.append(f"{knob}: only with --allow {knob}")
        if req.kv_bytes_skip_free_check:
            steps.append(
                f"kv-cache-memory-bytes: once a {req.device_unit}'s free memory refuses the fraction, the pool "
                "the goal needs, in bytes (vLLM then skips that startup check)"
            )
        return steps

    def estimate_for(self, config: ServeConfig) -> EstimateView:
        """The estimate of ``config`` before any launch (what ``--dry-run`` shows)."""
        return self._estimate(config, None)

    def estimate_measured(self, history: Sequence[Observation], config: ServeConfig) -> EstimateView:
        """The estimate of ``config`` calibrated on the launches of ``history``."""
        return self._estimate(config, self._calibration(history, config))

    def lossy_order(self) -> list[str]:
        """The lossy knobs in the user's --knob-order (names as in the guides or as in --allow)."""
        alias = {"enforce-eager": "eager", "kv-cache-dtype": "fp8-kv", "fp8": "fp8-kv", "swap": "offload"}
        named = [alias.get(k, k) for k in self.request.knob_order]
        ordered = [k for k in named if k in LOSSY_ORDER]
        return list(dict.fromkeys(ordered + list(LOSSY_ORDER)))

    def _has_rung(self, knob: str) -> bool:
        """rope-scaling is a rung only where the request needs a length past the model's own."""
        return knob != "rope-scaling" or bool(self.request.rope_overrides and self.request.rope_max_len)

    def _ceiling(self, lossy: tuple[str, ...]) -> int:
        """The longest --max-model-len vLLM takes with these lossy knobs."""
        if "rope-scaling" in lossy and self._has_rung("rope-scaling"):
            return self.request.rope_max_len or self.request.native_max_len
        return self.request.native_max_len

    # -- the goal -------------------------------------------------------------------------------
    def _reaches_goal(self, context: int, seqs: int) -> bool:
        return self.objective.reaches_goal(self.request, context, seqs)

    def _meets_floor(self, context: int, seqs: int) -> bool:
        return context >= self.request.floor_context() and seqs >= self.request.floor_seqs()

    def _config(
        self, caps: _Caps, lossy: tuple[str, ...], context: int, seqs: int, offload_gib: float = 0.0
    ) -> ServeConfig:
        cfg = self.base.replace(
            max_model_len=context,
            max_num_seqs=seqs,
            gpu_memory_utilization=caps.util,
            enforce_eager=self.base.enforce_eager or "eager" in lossy,
            kv_cache_dtype="fp8" if "fp8-kv" in lossy else self.base.kv_cache_dtype,
            cpu_offload_gb=offload_gib if "offload" in lossy else self.base.cpu_offload_gb,
        )
        if "rope-scaling" in lossy and self._has_rung("rope-scaling"):
            cfg = cfg.replace(hf_overrides=self.request.rope_overrides)
        if caps.batched_tokens:
            cfg = cfg.replace(max_num_batched_tokens=max(caps.batched_tokens, seqs))
        return cfg

    def _calibration(self, history: Sequence[Observation], cfg: ServeConfig) -> object:
        """Calibrate from the most recent launch that printed the KV pool: one at the same memory
        settings (TP, KV dtype, eager mode and offload) if there is one, else one at the same TP (the
        estimate carries what eager mode, the KV dtype and offload change from the measured terms); else
        from one that got as far as loading the weights. None: nothing measured at this TP."""
        same_tp = [o for o in reversed(history) if o.config.tensor_parallel_size == cfg.tensor_parallel_size]
        pooled = [o for o in same_tp if "available_kv_gib" in o.facts]
        shape = (cfg.kv_cache_dtype, cfg.enforce_eager, cfg.cpu_offload_gb)
        exact = [
            o
            for o in pooled
            if (o.config.kv_cache_dtype, o.config.enforce_eager, o.config.cpu_offload_gb) == shape
        ]
        loaded = [o for o in same_tp if "weights_gib" in o.facts]
        for obs in (*exact, *pooled, *loaded):
            return self._calibrate(obs.facts, obs.config)
        return None

    def _target(
        self, history: Sequence[Observation], caps: _Caps, lossy: tuple[str, ...]
    ) -> tuple[int, int] | None:
        """The (max_model_len, max_num_seqs) the objective wants at these caps, or None if nothing fits."""
        return self._target_at(history, caps, lossy, self._offload_gib(history, caps, lossy))

    def _target_at(
        self, history: Sequence[Observation], caps: _Caps, lossy: tuple[str, ...], offload_gib: float
    ) -> tuple[int, int] | None:
        req = self.request
        ceiling = self._ceiling(lossy)
        if req.floor_context() > ceiling:
            return None  # past the model's length: only the rope-scaling rung reaches it
        probe_cfg = self._in_room(
            caps,
            self._config(
                caps, lossy, self.objective.sizing_length(req, ceiling), req.floor_seqs(), offload_gib
            ),
        )
        sizing = Sizing(
            request=req,
            ceiling=ceiling,
            seq_cap=min(req.max_seqs_cap, caps.seqs or req.max_seqs_cap),
            estimate=self._estimate(probe_cfg, self._calibration(history, probe_cfg)),
            measured_context=lambda seqs: self._measured_context(
                history, probe_cfg.replace(max_num_seqs=seqs), seqs
            ),
        )
        aim = self.objective.aim(sizing)
        if aim is None:
            return None
        context, seqs = aim
        if context < req.block_size or seqs < 1:
            return None
        return context, seqs

    def _measured_context(self, history: Sequence[Observation], cfg: ServeConfig, seqs: int) -> int | None:
        """The longest context for ``seqs`` sequences as vLLM itself reported it ("estimated maximum model
        length is N", or the tokens of a boot), less a small margin for launch-to-launch noise.

        A launch at exactly these memory settings is used as it is. One that differs only in
        ``--gpu-memory-utilization`` is scaled: vLLM's KV pool is the requested fraction of the card less
        what the weights, activations and graphs took, and none of those depends on the fraction, so the
        pool moves by Δutil × the card and the tokens with it. None when no launch measured either."""
        same = (
            "tensor_parallel_size",
            "kv_cache_dtype",
            "enforce_eager",
            "cpu_offload_gb",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_cache_memory_bytes",
        )
        bs = self.request.block_size
        matching = [
            o for o in reversed(history) if all(getattr(o.config, f) == getattr(cfg, f) for f in same)
        ]
        # the latest launch at exactly this utilization first, then the latest at any other
        matching.sort(key=lambda o: o.config.gpu_memory_utilization != cfg.gpu_memory_utilization)
        for obs in matching:
            usable = _usable_tokens(obs, bs)
            if usable is None:
                continue
            shift = (cfg.gpu_memory_utilization or DEFAULT_UTILIZATION) - (
                obs.config.gpu_memory_utilization or DEFAULT_UTILIZATION
            )
            if shift and cfg.kv_cache_memory_bytes is None:
                pool, total = obs.facts.get("available_kv_gib"), obs.facts.get("total_gib")
                moved = (pool or 0) + shift * (total or 0) - PROFILE_NOISE_GIB
                if not pool or not total or moved <= 0:
                    continue
                usable = int(usable * moved / pool)
            return int(usable * (1 - MEASURED_MARGIN)) // seqs // bs * bs
        return None

    def _short_of_floor(self, history: Sequence[Observation], caps: _Caps) -> str:
        """Why nothing meets the floor, with the numbers: what the (measured or estimated) pool holds."""
        req = self.request
        ctx, seqs = req.floor_context(), req.floor_seqs()
        cfg = self._config(caps, caps.lossy, ctx, seqs, self._offload_gib(history, caps, caps.lossy))
        calibration = self._calibration(history, cfg)
        est = self._estimate(self._in_room(caps, cfg), calibration)
        source = "measured" if calibration is not None else "estimated"
        need = seqs * ctx * est.kv_bytes_per_token
        short = (
            f" ({seqs} x {ctx} tokens need {need / GIB:.2f} GiB of KV cache, the pool has "
            f"{est.kv_pool_bytes / GIB:.2f} GiB: {(need - est.kv_pool_bytes) / GIB:.2f} GiB short)"
            if need > est.kv_pool_bytes > 0 and est.max_seqs(ctx) < seqs
            else ""
        )
        where = (
            f"--gpu-memory-utilization {caps.util:.2f}"
            if caps.kv_room is None
            else f"the {self.request.device_unit}'s free memory (a pool in --kv-cache-memory-bytes)"
        )
        return (
            f"nothing meets the requested floor of {seqs} sequence(s) of {ctx} tokens: at "
            f"{where} the {source} KV pool holds {est.max_seqs(ctx)} "
            f"sequence(s) of {ctx} tokens, or {self._round_len(est.max_context(seqs), self._ceiling(caps.lossy))} "
            f"tokens for {seqs}{short}"
        )

    def _floor_within_error(self, history: Sequence[Observation], caps: _Caps) -> Launch | None:
        """The floor itself, when only the estimate puts it out of reach (nothing measured yet at this
        TP) and by less than the estimate's own error: one launch measures what is true."""
        req = self.request
        ctx, seqs = req.floor_context(), req.floor_seqs()
        cfg = self._config(caps, caps.lossy, ctx, seqs, self._offload_gib(history, caps, caps.lossy))
        cfg = self._in_bytes(history, caps, cfg)
        if self._calibration(history, cfg) is not None or any(o.config.key() == cfg.key() for o in history):
            return None
        est = self._estimate(self._in_room(caps, cfg), None)
        need = seqs * ctx * est.kv_bytes_per_token
        short = need - est.kv_pool_bytes
        error = ESTIMATE_ERROR * (est.non_kv_bytes + est.cudagraph_bytes)
        if short <= 0 or short > error:
            return None
        return Launch(
            cfg,
            f"the estimate puts {seqs} x {ctx} tokens {short / GIB:.2f} GiB ({short / need:.1%}) short, within "
            f"its own error ({error / GIB:.2f} GiB): launched to measure",
        )

    def misestimates(self, history: Sequence[Observation]) -> tuple[str, ...]:
        """The launch whose measured weights are furthest from the estimate, when further than
        ``WEIGHTS_TOLERANCE``, in words (the search itself goes by the measurement): an estimate that wrong
        is wrong about the model, and every result built on it says so."""
        worst: tuple[float, float, float] | None = None
        for obs in history:
            loaded = obs.facts.get("weights_gib")
            if not isinstance(loaded, (int, float)):
                continue
            said = self._estimate(obs.config, None).weights_bytes / GIB
            off = abs(loaded - said) / said if said else float(loaded > 0)
            if off > WEIGHTS_TOLERANCE and (worst is None or off > worst[0]):
                worst = (off, float(loaded), said)
        if worst is None:
            return ()
        off, loaded, said = worst
        unit = self.request.device_unit
        return (
            f"vLLM loaded {loaded:.2f} GiB of weights per {unit}, the estimate said {said:.2f} GiB "
            f"({off:.0%} {'more' if loaded > said else 'less'}): the estimate is wrong about this model (its "
            "checkpoint, quantization or architecture); the search went by vLLM's measurements",
        )

    def _round_len(self, context: int, ceiling: int | None = None) -> int:
        return round_length(context, self.request.block_size, ceiling or self.request.native_max_len)

    def _offload_gib(self, history: Sequence[Observation], caps: _Caps, lossy: tuple[str, ...]) -> float:
        """With offload among ``lossy``: the fewest whole GiB of weights per GPU to offload for the goal
        (with the other knobs of ``lossy``), or all of them if no amount reaches it. 0 without."""
        if "offload" not in lossy or not self.request.offload_flag:
            return 0.0
        req = self.request
        probe = self._config(caps, lossy, req.floor_context(), req.floor_seqs())
        weights = self._estimate(probe, self._calibration(history, probe)).weights_bytes
        most = max(1, math.ceil(weights / GIB))

        def enough(gib: int) -> bool:
            target = self._target_at(history, caps, lossy, float(gib))
            return target is not None and self._reaches_goal(*target)

        if not enough(most):
            return float(most)
        low, high = 1, most  # the goal is reached at high; find the least amount that reaches it
        while low < high:
            mid = (low + high) // 2
            if enough(mid):
                high = mid
            else:
                low = mid + 1
        return float(low)

    # -- decisions ------------------------------------------------------------------------------
    def next(self, history: Sequence[Observation]) -> Launch | Finish:
        caps = self.caps(history)
        best = self.best(history)
        if caps.stop:
            # a stop that is not about memory (bad flags, a hang, a taken port): lossy knobs buy nothing
            return self._finish(history, best, caps.stop, suggest=caps.stop_is_memory)
        target = self._target(history, caps, caps.lossy)
        if target is None or not self._meets_floor(*target):
            close = self._floor_within_error(history, caps)
            return close or self._finish(history, best, self._short_of_floor(history, caps))
        context, seqs = target
        cfg = self._config(caps, caps.lossy, context, seqs, self._offload_gib(history, caps, caps.lossy))
        cfg = self._in_bytes(history, caps, cfg)
        seen = {o.config.key(): o for o in history}
        step = 0
        while cfg.key() in seen:
            prior = seen[cfg.key()]
            if prior.stable:
                return self._finish(history, best, "the computed best config is proven stable")
            if (
                failures.category(prior.category).response is Response.RETRY_ONCE
                and _count(history, prior.category) < 2
            ):
                break  # a co-tenant moved memory once: the same launch is worth one retry
            # The model says it fits but it failed before: the objective shrinks it (5% of its knob, a step).
            step += 1
            if step > 20:
                return self._finish(history, best, "no untried config is left below the failures")
            shrunk = self._shrink(cfg, step)
            if shrunk is None:
                return self._finish(history, best, "every config that meets the floor has failed")
            cfg = shrunk
            if not self._meets_floor(cfg.max_model_len or 0, cfg.max_num_seqs or 0):
                return self._finish(history, best, "every config that meets the floor has failed")
            cfg = self._in_bytes(history, caps, cfg)
        if best and not self._better(cfg, best):
            return self._finish(
                history,
                best,
                f"no untried config beats the proven one by more than {self.request.near_optimum:.0%}",
            )
        return Launch(cfg, self._reason(history, caps, cfg))

    def probe_after_boot(
        self, history: Sequence[Observation], config: ServeConfig, facts: dict[str, Any]
    ) -> bool:
        """After ``config`` booted and printed ``facts``: prove it under load, or relaunch at once?"""
        booted = Observation(config, "success", facts)
        caps = self.caps([*history, booted])
        target = self._target([*history, booted], caps, caps.lossy)
        if target is None:
            return True
        context, seqs = target
        have_ctx, have_seqs = config.max_model_len or 0, config.max_num_seqs or 0
        # it booted, so it fits if vLLM says the pool holds max_num_seqs full-length sequences
        holds = float(facts.get("max_concurrency") or 0) >= have_seqs
        fits = holds or (context >= have_ctx and seqs >= have_seqs)
        tol = self.request.near_optimum
        near = have_ctx >= context * (1 - tol) and have_seqs >= math.floor(seqs * (1 - tol))
        return fits and near

    # -- results --------------------------------------------------------------------------------
    def _better(self, cfg: ServeConfig, than: Observation) -> bool:
        """Worth a launch: beats the proven ``than`` on the objective (by more than ``near_optimum``)."""
        return self.objective.beats(cfg, than, self.request.near_optimum)

    def best(self, history: Sequence[Observation]) -> Observation | None:
        stable = [o for o in history if o.stable]
        return max(stable, key=self.objective.rank) if stable else None

    def _finish(
        self, history: Sequence[Observation], best: Observation | None, reason: str, *, suggest: bool = True
    ) -> Finish:
        missing: list[str] = []
        gains: list[str] = []
        if best is None and suggest:
            missing = self.what_would_help(history)
        elif best is not None and self.objective.wants_more:
            gains = self.what_would_help(history, beyond=best)
        return Finish(best, reason, complete=True, missing=tuple(missing), gains=tuple(gains))

    def _shrink(self, cfg: ServeConfig, step: int) -> ServeConfig | None:
        # a config with the YaRN override shrinks from the YaRN length
        yarn = bool(cfg.hf_overrides) and cfg.hf_overrides == self.request.rope_overrides
        return self.objective.shrink(
            self.request, cfg, step, self._ceiling(("rope-scaling",) if yarn else ())
        )

    def what_would_help(self, history: Sequence[Observation], beyond: Observation | None = None) -> list[str]:
        """What each lossy knob not allowed would buy, from the (calibrated) estimate: any change
        from what the allowed knobs reach, or, ``beyond`` a winner, only more than it has."""
        caps = self.caps(history)
        out: list[str] = []
        base_target = self._target(history, caps, caps.lossy)
        for knob in self.lossy_order():
            if knob in caps.lossy or knob in self.request.allow:
                continue
            lossy = (*caps.lossy, knob)
            t = self._target(history, caps, lossy)
            if t is None:
                continue
            if beyond is not None:
                if not self._better(self._config(caps, lossy, *t), beyond):
                    continue
            elif base_target is not None and t == base_target:
                continue
            out.append(
                f"--allow {knob} would reach --max-model-len {t[0]} with --max-num-seqs {t[1]} "
                f"({LOSSY_COST[knob]})"
            )
        return out

    def _reason(self, history: Sequence[Observation], caps: _Caps, cfg: ServeConfig) -> str:
        source = "measured" if self._calibration(history, cfg) is not None else "estimated"
        words = [f"{source} KV pool → --max-model-len {cfg.max_model_len} × {cfg.max_num_seqs} seqs"]
        if caps.kv_room is not None and cfg.kv_cache_memory_bytes is not None:
            words.append(f"--kv-cache-memory-bytes {cfg.kv_cache_memory_bytes} (the fraction was refused)")
        if caps.lossy:
            words.append("using " + ", ".join(caps.lossy))
        if caps.notes:
            words.append(caps.notes[-1])
        return "; ".join(words)


def _usable_tokens(obs: Observation, block_size: int) -> int | None:
    """The tokens of context one sequence could use, as one launch of vLLM reported them."""
    facts = obs.facts
    if failures.category(obs.category).response is Response.REMEASURE_LENGTH and facts.get(
        "estimated_max_model_len"
    ):
        return int(facts["estimated_max_model_len"])
    if obs.booted and facts.get("kv_cache_tokens") and obs.config.max_model_len:
        length = obs.config.max_model_len
        return int(facts["kv_cache_tokens"]) * math.ceil(length / block_size) * block_size // length
    return None


def _used_util(obs: Observation) -> float:
    return obs.config.gpu_memory_utilization or DEFAULT_UTILIZATION


def _headroom_seen(obs: Observation) -> int | None:
    """The least headroom a probe of ``obs`` saw; None where it saw none (or the server died)."""
    if obs.probe is None or obs.probe.server_died:
        return None
    return obs.probe.min_headroom_bytes


def _count(history: Sequence[Observation], category: str) -> int:
    return sum(1 for o in history if o.category == category)


def _probe_words(obs: Observation) -> str:
    if obs.category == "oom_at_runtime":
        return "out of memory at runtime"
    p = obs.probe
    if p is None:
        return "no probe"
    if p.server_died:
        return "server died under load"
    if p.min_headroom_bytes is not None:
        return f"{p.min_headroom_bytes / GIB:.2f} GiB headroom"
    return p.detail or "probe failed"
