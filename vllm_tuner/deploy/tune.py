"""``up --tune``: ``find`` for every instance of a plan, each alone on its GPUs and held to its share.

Only before ``up`` starts anything are the GPUs free of the deployment, so every instance is tuned
then: the always-on ones and every phase's (a later ``up --phase`` starts those with their tuned
numbers, which the state file keeps). Each search is the real :class:`vllm_tuner.find.Finder`, asked
for the instance's needs inside its share:

* ``util_ceiling`` is the plan's ``--gpu-memory-utilization`` for it (its own share of the card);
* the headroom its load probe must leave free is the deployment's headroom **plus what its co-resident
  neighbours hold** on that GPU (their tuned footprint once tuned, the planned one before): a config
  whose peak under load would reach into a neighbour's share fails the probe although the neighbours
  are not running;
* the floor is its ``needs``: ``concurrency`` → find's concurrency at ``min_context`` (most
  ``--max-num-seqs``), ``context`` → find's context keeping ``min_seqs``, ``fixed`` → find's fixed
  targets ``min_context`` x ``min_seqs``; no lossy knob is allowed (the file's ``kv_cache_dtype`` and
  flags are passed as they are);
* its flags, served name and KV cache dtype are passed to every trial.

find's stable winner is then carried into the plan (:func:`apply_tuning`): its ``--max-model-len`` and
``--max-num-seqs``, the KV pool vLLM measured for it (started as ``--kv-cache-memory-bytes``, so the
instance gets that pool without profiling next to its neighbours), the winner's utilization, and its
peak memory under load (less what the GPU held before) as the instance's footprint.

The find runner is injected: ``find_one(target) -> FindResult``; nothing here launches anything itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ..errors import DeployError
from ..units import GIB, MIB
from .plan import (
    BLOCK_TOKENS,
    CONTEXT_STEP,
    CUDA_CONTEXT_BYTES,
    DeploymentPlan,
    Instance,
    ModelCost,
    kv_bytes_for,
    min_context_of,
)

UTIL_FLOOR = 0.01
MAX_FIND_UTIL = 0.98  # find refuses a higher ceiling: vLLM needs some memory outside its budget
FIND_OBJECTIVE = {"concurrency": "concurrency", "context": "context", "fixed": "targets"}
NUMBERS = ("max_model_len", "max_num_seqs", "kv_bytes", "gpu_memory_utilization", "footprint_bytes")


@dataclass(frozen=True)
class TuneTarget:
    """What ``find`` is asked for one instance."""

    instance: Instance
    util_ceiling: float
    neighbours_bytes: int  # what the instances beside it hold on its GPU(s), at most, in any phase
    neighbours: tuple[str, ...]
    headroom_bytes: int  # the deployment's headroom + neighbours_bytes: free under load, or unstable

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def model(self) -> str:
        return self.instance.entry.model

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self.instance.gpu_ids

    @property
    def objective(self) -> str:
        return FIND_OBJECTIVE[self.instance.entry.needs.objective]

    @property
    def min_context(self) -> int:
        return min_context_of(self.instance.entry, self.instance.cost)

    @property
    def min_seqs(self) -> int:
        return self.instance.entry.min_seqs

    @property
    def extra_args(self) -> tuple[str, ...]:
        entry = self.instance.entry
        extra: list[str] = []
        if entry.served_model_name:
            extra += ["--served-model-name", entry.served_model_name]
        if entry.kv_cache_dtype != "auto":
            extra += ["--kv-cache-dtype", entry.kv_cache_dtype]
        return (*extra, *entry.flags)

    def request(self, *, vllm_cmd: str = "vllm", timeouts=None, max_launches: int = 12):
        """The :class:`vllm_tuner.find.FindRequest` for this instance."""
        from ..find import FindRequest
        from ..trial import Timeouts

        fixed = self.objective == "targets"
        return FindRequest(
            model=self.model,
            gpu_ids=self.gpu_ids,
            tensor_parallel_size=self.instance.entry.tensor_parallel_size,
            objective=self.objective,
            min_seqs=self.min_seqs,
            min_context=self.min_context,
            target_context=self.min_context if fixed else None,
            target_seqs=self.min_seqs if fixed else None,
            util_ceiling=self.util_ceiling,
            # find alone on a card gives up below 0.50; a share of a shared card is often smaller, so
            # here only the instance's needs end the search
            util_floor=UTIL_FLOOR,
            headroom_bytes=self.headroom_bytes,
            max_launches=max_launches,
            timeouts=timeouts or Timeouts(),
            extra_args=self.extra_args,
            vllm_cmd=vllm_cmd,
        )

    def share_words(self) -> str:
        beside = f" beside {', '.join(self.neighbours)}" if self.neighbours else ""
        return (
            f"GPU {_ids(self.gpu_ids)}, --gpu-memory-utilization at most {self.util_ceiling:.2f}, "
            f"{self.headroom_bytes / GIB:.1f} GiB kept free under load "
            f"({self.neighbours_bytes / GIB:.1f} GiB{beside} + headroom)"
        )


@dataclass(frozen=True)
class Tuned:
    """find's stable winner for one instance, and the plan's numbers it replaces."""

    max_model_len: int
    max_num_seqs: int
    kv_bytes: int  # the KV pool vLLM measured for the winner, per GPU
    gpu_memory_utilization: float
    footprint_bytes: int  # peak per GPU under the load probe, less what the GPU held before
    weights_bytes: int
    planned: dict = field(default_factory=dict)  # NUMBERS as the plan had them
    launches: int = 0
    run_id: int | None = None
    complete: bool = True
    reason: str = ""

    def as_dict(self) -> dict:
        winner = {k: getattr(self, k) for k in NUMBERS}
        winner["weights_bytes"] = self.weights_bytes
        return {
            "planned": dict(self.planned),
            "winner": winner,
            "launches": self.launches,
            "run_id": self.run_id,
            "complete": self.complete,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Tuned:
        """From :meth:`as_dict` (the state file's ``tuned`` entries)."""
        try:
            winner = data["winner"]
            return cls(
                **{k: winner[k] for k in NUMBERS},
                weights_bytes=winner["weights_bytes"],
                planned=dict(data.get("planned") or {}),
                launches=int(data.get("launches") or 0),
                run_id=data.get("run_id"),
                complete=bool(data.get("complete", True)),
                reason=str(data.get("reason") or ""),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DeployError(
                f"a tuned entry in the deployment's state file is damaged ({exc!r})",
                "'vllm-tune down' then 'vllm-tune up --tune' again",
            ) from exc

    def describe(self, name: str) -> str:
        """One line: what tuning changed for ``name``."""
        p = self.planned
        ctx = _change(p.get("max_model_len"), self.max_model_len, "{}")
        seqs = _change(p.get("max_num_seqs"), self.max_num_seqs, "{}")
        kv = _change(p.get("kv_bytes"), self.kv_bytes, "{:.2f}", scale=GIB)
        util = _change(p.get("gpu_memory_utilization"), self.gpu_memory_utilization, "{:.2f}")
        held = _change(p.get("footprint_bytes"), self.footprint_bytes, "{:.1f}", scale=GIB)
        short = "" if self.complete else ", search cut short"
        run = f", find run {self.run_id}" if self.run_id is not None else ""
        return (
            f"tuned {name}: {ctx} tokens x {seqs} seqs, KV {kv} GiB, util {util}, holds {held} GiB "
            f"under load ({self.launches} launch(es){run}{short})"
        )


FindOne = Callable[[TuneTarget], object]  # -> vllm_tuner.find.FindResult


def tuning_order(plan: DeploymentPlan) -> list[Instance]:
    """Always-on instances in start order, then each phase's."""
    seen: list[Instance] = []
    for phase in plan.phases:
        for inst in plan.resident(phase):
            if inst not in seen:
                seen.append(inst)
    return seen


def target_for(plan: DeploymentPlan, inst: Instance, tuned: Mapping[str, Tuned]) -> TuneTarget:
    """The share ``find`` must stay within for ``inst``: its planned utilization, and room under load
    for everything that shares a GPU with it in any phase it is resident in."""
    worst, names = 0, []
    for phase in plan.phases:
        residents = plan.resident(phase)
        if inst not in residents:
            continue
        for g in inst.gpu_ids:
            beside = [j for j in residents if j is not inst and g in j.gpu_ids]
            held = sum(_footprint(j, tuned) for j in beside)
            if held >= worst:
                worst, names = held, [j.name for j in beside]
    return TuneTarget(
        instance=inst,
        util_ceiling=min(inst.gpu_memory_utilization, MAX_FIND_UTIL),
        neighbours_bytes=worst,
        neighbours=tuple(names),
        headroom_bytes=plan.deployment.headroom_bytes + worst,
    )


def tune_plan(
    plan: DeploymentPlan, find_one: FindOne, *, nvml, note: Callable[[str], None] = lambda _t: None
) -> dict[str, Tuned]:
    """Run ``find_one`` for every instance in :func:`tuning_order`, each alone; raise a
    :class:`DeployError` for the first one with no stable config in its share."""
    order = tuning_order(plan)
    for inst in order:
        if inst.entry.pipeline_parallel_size > 1:
            raise DeployError(
                f"--tune cannot tune {inst.name}: find searches tensor parallelism only, and it has "
                f"pipeline_parallel_size {inst.entry.pipeline_parallel_size}",
                "start it without --tune (or give it a memory: block with measured numbers)",
            )
    tuned: dict[str, Tuned] = {}
    for n, inst in enumerate(order, 1):
        target = target_for(plan, inst, tuned)
        note(f"tuning {inst.name} ({n}/{len(order)}) alone: {target.share_words()}")
        baseline = {g: nvml.memory(g).used for g in inst.gpu_ids}
        result = find_one(target)
        tuned[inst.name] = tuned_from(target, result, baseline)
        note(tuned[inst.name].describe(inst.name))
    check_fits(apply_tuning(plan, tuned))
    return tuned


def tuned_from(target: TuneTarget, result, baseline_used: Mapping[int, int]) -> Tuned:
    """The numbers of find's stable winner, or a refusal that names the instance and what would help."""
    if not getattr(result, "stable", False):
        raise _nothing_stable(target, result)
    inst, winner = target.instance, result.winner
    cfg, facts = winner.config, winner.facts
    if facts.get("available_kv_gib") is not None:
        kv = measured_pool_bytes(
            float(facts["available_kv_gib"]), inst.cost, cfg.max_model_len, cfg.max_num_seqs
        )
    elif facts.get("kv_cache_tokens"):
        kv = int(facts["kv_cache_tokens"]) * inst.cost.kv_bytes_per_token
    else:
        raise DeployError(
            f"find's stable config for {inst.name} did not report its KV cache size",
            f"see {winner.log_path or 'its trial log'}; start without --tune",
        )
    weights = int(float(facts["weights_gib"]) * GIB) if facts.get("weights_gib") else inst.cost.weights_bytes
    peak = dict(getattr(winner.probe, "peak_used_bytes", None) or {})
    measured = [peak[g] - baseline_used.get(g, 0) for g in inst.gpu_ids if g in peak]
    total = _total_of(facts, inst)
    footprint = max(measured) if measured else math.ceil((cfg.gpu_memory_utilization or 0) * total)
    footprint = max(footprint, CUDA_CONTEXT_BYTES + weights + kv)
    return Tuned(
        max_model_len=int(cfg.max_model_len),
        max_num_seqs=int(cfg.max_num_seqs),
        kv_bytes=kv,
        gpu_memory_utilization=float(cfg.gpu_memory_utilization),
        footprint_bytes=int(footprint),
        weights_bytes=weights,
        planned={k: getattr(inst, k) for k in NUMBERS},
        launches=int(getattr(result, "launches", 0) or 0),
        run_id=getattr(result, "run_id", None),
        complete=bool(getattr(result, "complete", True)),
        reason=str(getattr(result, "reason", "") or ""),
    )


def measured_pool_bytes(
    kv_gib: float, cost: ModelCost, max_model_len: int | None, max_num_seqs: int | None
) -> int:
    """The ``--kv-cache-memory-bytes`` for a pool vLLM printed as ``kv_gib`` (two decimals).

    Rounded down to a MiB, but never below what the winner's ``--max-model-len`` x ``--max-num-seqs``
    and vLLM's null block need while the printed value allows that much: a pool printed as 4.00 GiB may
    have been up to 4.005 GiB, and 4.00 GiB exactly holds one 32768-token request of a 128 KiB/token
    model without the null block, so vLLM would refuse the length it just served.
    """
    low = int(kv_gib * GIB) // MIB * MIB
    high = -(-int((kv_gib + 0.005) * GIB) // MIB) * MIB
    if not max_model_len or not max_num_seqs:
        return low
    return max(low, min(kv_bytes_for(cost, int(max_model_len), int(max_num_seqs)), high))


def apply_tuning(plan: DeploymentPlan, tuned: Mapping[str, Tuned | Mapping]) -> DeploymentPlan:
    """``plan`` with each tuned instance's numbers replaced by the winner's (its cost becomes the
    measured one) and every instance's free-at-start recomputed along the start order."""
    if not tuned:
        return plan
    wins = {k: v if isinstance(v, Tuned) else Tuned.from_dict(v) for k, v in tuned.items()}
    instances = []
    for inst in plan.instances:
        t = wins.get(inst.name)
        if t is not None:
            overhead = max(0, t.footprint_bytes - CUDA_CONTEXT_BYTES - t.weights_bytes - t.kv_bytes)
            cost = replace(
                inst.cost, weights_bytes=t.weights_bytes, overhead_bytes=overhead, source="measured"
            )
            inst = replace(
                inst,
                cost=cost,
                kv_bytes=t.kv_bytes,
                max_model_len=t.max_model_len,
                max_num_seqs=t.max_num_seqs,
                gpu_memory_utilization=t.gpu_memory_utilization,
            )
        instances.append(inst)
    out = replace(plan, instances=tuple(instances))
    return replace(out, instances=tuple(_free_at_start(out)))


def check_fits(plan: DeploymentPlan) -> None:
    """Every phase's instances, at their (tuned) footprints, plus the headroom fit on every GPU."""
    for phase in plan.phases:
        for budget in plan.budgets(phase):
            if budget.rows and budget.free_bytes < 0:
                names = ", ".join(r.name for r in budget.rows)
                where = f" in phase {phase!r}" if phase else ""
                raise DeployError(
                    f"after tuning, {names}{where} hold {budget.planned_bytes / GIB:.1f} GiB on GPU "
                    f"{budget.gpu.id}, {-budget.free_bytes / GIB:.1f} GiB more than it has besides the "
                    f"{budget.headroom_bytes / GIB:.1f} GiB headroom",
                    "lower a model's needs or move one to another GPU, then run 'up --tune' again",
                )


# ------------------------------------------------------------------------------------------------ helpers


def _footprint(inst: Instance, tuned: Mapping[str, Tuned]) -> int:
    t = tuned.get(inst.name)
    return t.footprint_bytes if t is not None else inst.footprint_bytes


def _free_at_start(plan: DeploymentPlan) -> list[Instance]:
    """Each instance's least free memory at its startup check, from the (tuned) footprints of the ones
    started before it: the always-on ones, then its phase's."""
    by_id = {g.id: g for g in plan.gpus}
    updated: dict[str, Instance] = {}

    def walk(members: list[Instance], used: dict[int, int]) -> dict[int, int]:
        for inst in sorted(members, key=lambda i: i.start_position):
            free = min(by_id[g].total_bytes - used[g] - CUDA_CONTEXT_BYTES for g in inst.gpu_ids)
            updated[inst.name] = replace(inst, free_at_start_bytes=free)
            for g in inst.gpu_ids:
                used[g] += inst.footprint_bytes
        return used

    always = walk([i for i in plan.instances if i.phase is None], {g: by_id[g].used_bytes for g in by_id})
    for phase in plan.deployment.phases:
        walk([i for i in plan.instances if i.phase == phase], dict(always))
    return [updated.get(i.name, i) for i in plan.instances]


def _total_of(facts: Mapping, inst: Instance) -> int:
    total = facts.get("total_gib")
    return int(float(total) * GIB) if total else inst.footprint_bytes


def _nothing_stable(target: TuneTarget, result) -> DeployError:
    reason = getattr(result, "reason", "") or "no stable config"
    return DeployError(
        f"--tune found nothing stable for {target.name} within its share ({target.share_words()}): {reason}",
        _what_would_help(target, result),
    )


def _what_would_help(target: TuneTarget, result) -> str:
    """Deployment-file changes that would fit, from the largest KV pool a trial booted with, less what
    that trial's peak under load went past the share."""
    inst = target.instance
    booted = [t for t in getattr(result, "trials", None) or [] if t.category == "success"]
    best = max(booted, key=lambda t: int(t.facts.get("kv_cache_tokens") or 0), default=None)
    tokens = int(best.facts.get("kv_cache_tokens") or 0) if best is not None else 0
    over = 0
    if best is not None and best.min_headroom_bytes is not None:
        over = max(0, target.headroom_bytes - best.min_headroom_bytes)
    hints: list[str] = []
    if tokens:
        # vLLM's token count includes the null block its pool keeps back
        usable = tokens - inst.cost.block_tokens - math.ceil(over / max(1, inst.cost.kv_bytes_per_token))
        per_seq = math.ceil(target.min_context / BLOCK_TOKENS) * BLOCK_TOKENS
        seqs = usable // per_seq
        if target.objective != "context" and 1 <= seqs < target.min_seqs:
            hints.append(f"needs.min_seqs {seqs} (at {target.min_context} tokens)")
        context = usable // max(1, target.min_seqs) // CONTEXT_STEP * CONTEXT_STEP
        if 4 * CONTEXT_STEP <= context < target.min_context:
            hints.append(f"needs.min_context {context} (at {target.min_seqs} seqs)")
    elif any(t.category == "oom_weights_load" for t in getattr(result, "trials", None) or []):
        hints.append("a quantized checkpoint or a larger tensor_parallel_size (its weights do not fit)")
    if inst.entry.kv_cache_dtype == "auto":
        hints.append("kv_cache_dtype: fp8 (lossy)")
    hints.append(f"a larger share: fewer or smaller models beside it on GPU {_ids(target.gpu_ids)}")
    past = f"under load it went {over / GIB:.1f} GiB past its share; " if over else ""
    return f"{past}try " + ", or ".join(hints) + "; 'vllm-tune history' lists its trials"


def _change(before, after, fmt: str, *, scale: float | None = None) -> str:
    now = fmt.format(after / scale if scale else after)
    if before is None:
        return now
    was = fmt.format(before / scale if scale else before)
    return now if was == now else f"{was} → {now}"


def _ids(ids) -> str:
    return ",".join(map(str, ids))
