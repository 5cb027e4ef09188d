"""Pack a deployment's models onto GPUs and give each instance absolute memory numbers (pure).

For every instance the plan fixes, per GPU it uses:

* ``--kv-cache-memory-bytes``: an absolute KV pool, so an instance never sizes itself from what its
  neighbours happen to leave free (vLLM skips profiling-based sizing when this is set);
* ``--gpu-memory-utilization``: only vLLM's startup check still reads it (``free >= ceil(util x total)``,
  measured after the instance's own CUDA context). The plan sets it to the instance's own share of the
  card, rounded up to 0.01, and checks it against the memory really free at that instance's turn in the
  start order (everything started before it, plus its own context). A share-sized value also lets any
  one instance be restarted while the others keep running.

Packing is first-fit decreasing by fixed cost (CUDA context + weights + overhead + the KV the model's
``needs`` require), honouring pins and TP x PP groups. Spare memory left on a GPU (after the headroom)
goes to the instances whose objective wants it, in proportion to their minimum KV. A deployment with
phases packs each phase against the always-on models; phases never co-reside.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..devices import CUDA
from ..serveconfig import ServeConfig
from ..units import GIB, MIB
from ..vllm_defaults import DEFAULT_BLOCK_SIZE
from .spec import DEFAULT_MIN_CONTEXT, Deployment, ModelEntry

SERVE_HOST = "0.0.0.0"  # what every instance serves on (a container publishes its port there too)
CUDA_CONTEXT_BYTES = CUDA.context_overhead_bytes  # what a vLLM worker holds before its free-memory check
BLOCK_TOKENS = DEFAULT_BLOCK_SIZE  # vLLM's default KV block
CONTEXT_STEP = 256  # planned context lengths are multiples of this
MAX_PLANNED_SEQS = 256  # vLLM's own default ceiling on cards under 70 GiB
UTIL_STEP = 0.01


@dataclass(frozen=True)
class ModelCost:
    """What one instance of a model costs on each GPU it uses (its TP x PP shard)."""

    weights_bytes: int
    overhead_bytes: int  # non-torch growth + activation peak + CUDA graphs
    kv_bytes_per_token: int  # 0 for a model vLLM keeps no KV cache for (a bidirectional encoder)
    max_context: int | None = None  # the model's derived max length
    source: str = "estimate"  # estimate | file (the deployment's memory: block) | measured
    kv_dtype_bytes: int = 2  # bytes per KV element at kv_cache_dtype=auto (for the fp8 suggestion)
    serve_name: str | None = None  # what ``vllm serve`` is given, when it differs from the file's ``model``
    block_tokens: int = BLOCK_TOKENS  # tokens per KV block (vLLM's --block-size; 64 for MLA backends)

    @property
    def block_bytes(self) -> int:
        """One KV block per GPU: vLLM's unit of allocation, and the null block its pool keeps back."""
        return max(1, self.block_tokens) * self.kv_bytes_per_token

    @property
    def fixed_bytes(self) -> int:
        return CUDA_CONTEXT_BYTES + self.weights_bytes + self.overhead_bytes


@dataclass(frozen=True)
class GpuInfo:
    id: int
    name: str
    total_bytes: int
    used_bytes: int = 0  # held by other processes before the deployment starts (NVML); 0 when offline


@dataclass(frozen=True)
class Instance:
    """One planned ``vllm serve`` process."""

    entry: ModelEntry
    gpu_ids: tuple[int, ...]
    cost: ModelCost
    kv_bytes: int
    max_model_len: int
    max_num_seqs: int
    gpu_memory_utilization: float
    free_at_start_bytes: int  # the least free memory on its GPUs when its startup check runs
    start_position: int  # 1-based position in the start order of its phase

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def phase(self) -> str | None:
        return self.entry.phase

    @property
    def port(self) -> int:
        return self.entry.port

    @property
    def public_name(self) -> str:
        """The name clients send as ``"model"``: ``served_model_name``, else what vLLM serves."""
        return self.entry.served_model_name or self.cost.serve_name or self.entry.model

    @property
    def footprint_bytes(self) -> int:
        """Bytes this instance holds on each of its GPUs once ready."""
        return self.cost.fixed_bytes + self.kv_bytes

    @property
    def kv_tokens(self) -> int:
        return self.kv_bytes // max(1, self.cost.kv_bytes_per_token)

    @property
    def config(self) -> ServeConfig:
        extra = list(self.entry.flags)
        if self.entry.served_model_name:
            extra = ["--served-model-name", self.entry.served_model_name, *extra]
        return ServeConfig(
            model=self.cost.serve_name or self.entry.model,
            tensor_parallel_size=self.entry.tensor_parallel_size,
            pipeline_parallel_size=self.entry.pipeline_parallel_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_bytes if self.cost.kv_bytes_per_token else None,
            kv_cache_dtype=self.entry.kv_cache_dtype,
            extra_args=tuple(extra),
        )

    def serve_args(self, *, host: str = SERVE_HOST) -> list[str]:
        return [*self.config.serve_args(), "--host", host, "--port", str(self.port)]


@dataclass(frozen=True)
class Refusal:
    """A model the plan could not place, and why (one line, without the model's name)."""

    name: str
    reason: str
    phase: str | None = None

    @property
    def problem(self) -> str:
        where = f" in phase {self.phase!r}" if self.phase is not None else ""
        return f"{self.name}{where}: {self.reason}"


@dataclass(frozen=True)
class DeploymentPlan:
    deployment: Deployment
    gpus: tuple[GpuInfo, ...]
    instances: tuple[Instance, ...]
    refusals: tuple[Refusal, ...] = ()
    suggestions: tuple[str, ...] = ()
    offline: bool = False

    @property
    def fits(self) -> bool:
        return not self.refusals

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(r.problem for r in self.refusals)

    @property
    def unplaced(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.refusals)

    def refusal(self, name: str) -> Refusal | None:
        return next((r for r in self.refusals if r.name == name), None)

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)

    def gpu(self, gpu_id: int) -> GpuInfo:
        return next(g for g in self.gpus if g.id == gpu_id)

    @property
    def phases(self) -> tuple[str | None, ...]:
        return tuple(self.deployment.phases) if self.deployment.phases else (None,)

    def resident(self, phase: str | None) -> list[Instance]:
        """Instances on the GPUs during ``phase``, in start order."""
        chosen = [i for i in self.instances if i.phase is None or i.phase == phase]
        return sorted(chosen, key=lambda i: (i.phase is not None, i.start_position))

    def start_order(self, phase: str | None = None) -> list[Instance]:
        """What ``up`` starts: always-on first, then the first (or given) phase."""
        return self.resident(phase if phase is not None else self.phases[0])

    def budgets(self, phase: str | None = None) -> list[GpuBudget]:
        return [gpu_budget(self, g, phase) for g in self.gpus]


@dataclass(frozen=True)
class BudgetRow:
    name: str
    weights_bytes: int
    overhead_bytes: int  # context + non-torch + activations + graphs
    kv_bytes: int
    utilization: float

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.overhead_bytes + self.kv_bytes


@dataclass(frozen=True)
class GpuBudget:
    """One GPU's memory table for one phase (the guides' "96 GB budget scenarios")."""

    gpu: GpuInfo
    phase: str | None
    rows: tuple[BudgetRow, ...]
    headroom_bytes: int

    @property
    def planned_bytes(self) -> int:
        return sum(r.total_bytes for r in self.rows)

    @property
    def free_bytes(self) -> int:
        return self.gpu.total_bytes - self.gpu.used_bytes - self.planned_bytes - self.headroom_bytes


def gpu_budget(plan: DeploymentPlan, gpu: GpuInfo, phase: str | None) -> GpuBudget:
    rows = []
    for inst in plan.resident(phase):
        if gpu.id not in inst.gpu_ids:
            continue
        rows.append(
            BudgetRow(
                inst.name,
                inst.cost.weights_bytes,
                CUDA_CONTEXT_BYTES + inst.cost.overhead_bytes,
                inst.kv_bytes,
                inst.gpu_memory_utilization,
            )
        )
    return GpuBudget(gpu, phase, tuple(rows), plan.deployment.headroom_bytes)


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class _Placed:
    entry: ModelEntry
    cost: ModelCost
    gpu_ids: tuple[int, ...]
    context: int
    seqs: int
    kv_bytes: int
    extra_kv: int = 0


@dataclass
class _Packing:
    placed: dict[str, _Placed] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)


def make_plan(
    deployment: Deployment, gpus: Sequence[GpuInfo], costs: Mapping[str, ModelCost], *, offline: bool = False
) -> DeploymentPlan:
    """Pack ``deployment`` onto ``gpus`` given each model's per-GPU ``costs``; never raises for "does not fit"."""
    packing = _Packing()
    capacity = {g.id: g.total_bytes - g.used_bytes - deployment.headroom_bytes for g in gpus}
    always = [m for m in deployment.models if m.phase is None]
    base_load = _pack(always, gpus, costs, {g.id: 0 for g in gpus}, capacity, packing, deployment)
    phase_loads: dict[str | None, dict[int, int]] = {}
    for phase in deployment.phases or (None,):
        if phase is None:
            phase_loads[None] = base_load
            continue
        members = [m for m in deployment.models if m.phase == phase]
        phase_loads[phase] = _pack(members, gpus, costs, dict(base_load), capacity, packing, deployment)
    _share_spare(packing, deployment, capacity, phase_loads)
    instances = _order_and_utilize(packing, deployment, gpus)
    return DeploymentPlan(
        deployment,
        tuple(gpus),
        tuple(instances),
        tuple(packing.refusals),
        tuple(packing.suggestions),
        offline,
    )


def min_context_of(entry: ModelEntry, cost: ModelCost) -> int:
    wanted = entry.needs.min_context or DEFAULT_MIN_CONTEXT
    if entry.needs.min_context is None and cost.max_context:
        wanted = min(wanted, cost.max_context)
    return wanted


def request_kv_bytes(cost: ModelCost, context: int) -> int:
    """KV bytes per GPU one request of ``context`` tokens takes: whole blocks."""
    block = max(1, cost.block_tokens)
    return math.ceil(context / block) * cost.block_bytes


def kv_bytes_for(cost: ModelCost, context: int, seqs: int) -> int:
    """The ``--kv-cache-memory-bytes`` that holds ``seqs`` requests of ``context`` tokens at once.

    Whole blocks per request, plus the null block vLLM's ``BlockPool`` keeps back (block 0, never
    allocated): vLLM checks a request of ``--max-model-len`` against the pool less that block
    (``check_enough_kv_cache_memory``), so a pool of exactly one request's blocks refuses to start
    ("the estimated maximum model length is" one block short). Rounded up to a MiB.
    """
    return _ceil(request_kv_bytes(cost, context) * seqs + cost.block_bytes, MIB)


def seqs_within(cost: ModelCost, kv_bytes: int, context: int) -> int:
    """How many requests of ``context`` tokens a pool of ``kv_bytes`` holds at once (null block kept)."""
    return max(0, kv_bytes - cost.block_bytes) // max(1, request_kv_bytes(cost, context))


def context_within(cost: ModelCost, kv_bytes: int, seqs: int, step: int = CONTEXT_STEP) -> int:
    """The longest context (a multiple of ``step``) of which ``seqs`` requests a pool of ``kv_bytes`` holds."""
    if not cost.kv_bytes_per_token:  # no KV cache: the model's own maximum
        return cost.max_context or DEFAULT_MIN_CONTEXT
    blocks = max(0, kv_bytes - cost.block_bytes) // cost.block_bytes // max(1, seqs)
    return _floor(blocks * max(1, cost.block_tokens), step)


def need_bytes(entry: ModelEntry, cost: ModelCost) -> int:
    """What ``entry`` takes on each of its GPUs at its needs: CUDA context, weights, overhead and the KV
    of ``min_seqs`` requests of its minimum context."""
    return cost.fixed_bytes + kv_bytes_for(cost, min_context_of(entry, cost), entry.min_seqs)


def _pack(
    members: list[ModelEntry],
    gpus: Sequence[GpuInfo],
    costs: Mapping[str, ModelCost],
    load: dict[int, int],
    capacity: dict[int, int],
    packing: _Packing,
    deployment: Deployment,
) -> dict[int, int]:
    ordered = sorted(
        members, key=lambda m: (m.gpus is None, -need_bytes(m, costs[m.name]) * m.world_size, m.name)
    )
    for position, entry in enumerate(ordered):
        cost = costs[entry.name]
        context = min_context_of(entry, cost)
        if cost.max_context and context > cost.max_context:
            packing.refusals.append(
                Refusal(
                    entry.name,
                    f"a context of {context} tokens is above the model's maximum context {cost.max_context}",
                    entry.phase,
                )
            )
            packing.suggestions.append(f"{entry.name}: set needs.min_context to at most {cost.max_context}")
            continue
        need = need_bytes(entry, cost)
        group = _first_fit(entry, need, gpus, load, capacity)
        if group is None:
            # on a single GPU group, the models still to be placed share the same room
            single = len(gpus) == entry.world_size
            later = sum(need_bytes(m, costs[m.name]) for m in ordered[position + 1 :]) if single else 0
            _refuse(entry, cost, need, gpus, load, capacity, packing, deployment, later)
            continue
        for g in group:
            load[g] += need
        packing.placed[entry.name] = _Placed(
            entry, cost, group, context, entry.min_seqs, kv_bytes_for(cost, context, entry.min_seqs)
        )
    return load


def _candidate_groups(entry: ModelEntry, gpus: Sequence[GpuInfo]) -> list[tuple[int, ...]]:
    if entry.gpus is not None:
        return [entry.gpus]
    ids = [g.id for g in gpus]
    n = entry.world_size
    aligned = [tuple(ids[i : i + n]) for i in range(0, len(ids) - n + 1, n)]
    rest = [c for c in itertools.combinations(ids, n) if c not in aligned]
    return aligned + rest


def _first_fit(
    entry: ModelEntry, need: int, gpus: Sequence[GpuInfo], load: dict[int, int], capacity: dict[int, int]
) -> tuple[int, ...] | None:
    for group in _candidate_groups(entry, gpus):
        if all(capacity[g] - load[g] >= need for g in group):
            return group
    return None


def _best_room(
    entry: ModelEntry, gpus: Sequence[GpuInfo], load: dict[int, int], capacity: dict[int, int]
) -> tuple[int, tuple[int, ...]]:
    best: tuple[int, tuple[int, ...]] = (-(1 << 62), ())
    for group in _candidate_groups(entry, gpus):
        room = min(capacity[g] - load[g] for g in group)
        if room > best[0]:
            best = (room, group)
    return best


def _refuse(
    entry: ModelEntry,
    cost: ModelCost,
    need: int,
    gpus: Sequence[GpuInfo],
    load: dict[int, int],
    capacity: dict[int, int],
    packing: _Packing,
    deployment: Deployment,
    later: int = 0,
) -> None:
    context = min_context_of(entry, cost)
    room, group = _best_room(entry, gpus, load, capacity)
    where = f"GPU {','.join(map(str, group))}" if group else "any GPU"
    kv = need - cost.fixed_bytes
    packing.refusals.append(
        Refusal(
            entry.name,
            f"needs {_gib(need)} GiB per GPU (weights {_gib(cost.weights_bytes)} + overhead "
            f"{_gib(CUDA_CONTEXT_BYTES + cost.overhead_bytes)} + KV {_gib(kv)} for {entry.min_seqs} x {context} "
            f"tokens) but {where} has only {_gib(max(room, 0))} GiB left after the models placed before it "
            f"and {_gib(deployment.headroom_bytes)} GiB headroom",
            entry.phase,
        )
    )
    packing.suggestions += _what_would_fit(entry, cost, context, room - later)


def _what_would_fit(entry: ModelEntry, cost: ModelCost, context: int, room: int) -> list[str]:
    out: list[str] = []
    kv_room = _floor(room - cost.fixed_bytes, MIB)
    if kv_room <= 0:
        out.append(
            f"{entry.name}: its weights and overhead alone need {_gib(cost.fixed_bytes)} GiB but only "
            f"{_gib(max(room, 0))} GiB is left; use a quantized checkpoint, a larger "
            f"tensor_parallel_size, or another GPU"
        )
    else:
        fit_context = context_within(cost, kv_room, entry.min_seqs)
        if fit_context >= 4 * CONTEXT_STEP:
            out.append(f"{entry.name}: fits with needs.min_context {fit_context} at {entry.min_seqs} seqs")
        fit_seqs = seqs_within(cost, kv_room, context)
        if fit_seqs >= 1:
            out.append(f"{entry.name}: fits with needs.min_seqs {fit_seqs} at {context} tokens")
    if entry.kv_cache_dtype == "auto" and cost.kv_dtype_bytes >= 2 and cost.kv_bytes_per_token:
        fp8 = replace(cost, kv_bytes_per_token=max(1, cost.kv_bytes_per_token // cost.kv_dtype_bytes))
        half = cost.fixed_bytes + kv_bytes_for(fp8, context, entry.min_seqs)
        if half <= room:
            out.append(f"{entry.name}: fits with kv_cache_dtype: fp8 (needs {_gib(half)} GiB; lossy)")
    need = cost.fixed_bytes + kv_bytes_for(cost, context, entry.min_seqs)
    out.append(
        f"{entry.name}: fits as asked on a GPU with {_gib(need)} GiB free besides the headroom "
        f"(add a GPU to gpus, or move a model to another one)"
    )
    return out


def _share_spare(
    packing: _Packing,
    deployment: Deployment,
    capacity: dict[int, int],
    phase_loads: dict[str | None, dict[int, int]],
) -> None:
    """Give each GPU's spare memory to the instances that want it, always-on ones first."""
    always = [p for p in packing.placed.values() if p.entry.phase is None]
    worst = {g: max(load[g] for load in phase_loads.values()) for g in capacity}
    _grant(always, {g: capacity[g] - worst[g] for g in capacity})
    granted = {g: sum(p.extra_kv for p in always if g in p.gpu_ids) for g in capacity}
    for phase, load in phase_loads.items():
        if phase is None:
            continue
        members = [p for p in packing.placed.values() if p.entry.phase == phase]
        _grant(members, {g: capacity[g] - load[g] - granted[g] for g in capacity})
    for p in packing.placed.values():
        _derive_limits(p)


def _grant(members: list[_Placed], spare: dict[int, int]) -> None:
    takers = [p for p in members if p.entry.needs.objective != "fixed"]
    weight = {p.entry.name: max(p.kv_bytes, 1) for p in takers}
    for p in takers:
        shares = []
        for g in p.gpu_ids:
            total_w = sum(weight[q.entry.name] for q in takers if g in q.gpu_ids)
            shares.append(max(0, spare[g]) * weight[p.entry.name] // total_w)
        p.extra_kv = min(shares) if shares else 0


def _derive_limits(p: _Placed) -> None:
    """Turn the KV budget into ``--max-model-len`` / ``--max-num-seqs`` for the objective (the budget
    keeps vLLM's null block: see :func:`kv_bytes_for`)."""
    cost, needs = p.cost, p.entry.needs
    budget = _floor(p.kv_bytes + p.extra_kv, MIB)
    if needs.objective == "context":
        context = max(p.context, context_within(cost, budget, p.seqs))
        if cost.max_context:
            context = min(context, cost.max_context)
        p.context = max(context, p.context)
        p.kv_bytes = max(p.kv_bytes, min(budget, kv_bytes_for(cost, p.context, p.seqs)))
    elif needs.objective == "concurrency":
        seqs = seqs_within(cost, budget, p.context)
        p.seqs = max(p.seqs, min(int(seqs), MAX_PLANNED_SEQS))
        p.kv_bytes = max(p.kv_bytes, min(budget, kv_bytes_for(cost, p.context, p.seqs)))


def _order_and_utilize(packing: _Packing, deployment: Deployment, gpus: Sequence[GpuInfo]) -> list[Instance]:
    by_id = {g.id: g for g in gpus}
    instances: list[Instance] = []
    always = _start_sorted([p for p in packing.placed.values() if p.entry.phase is None])
    started_always = _start_sequence(always, by_id, {g: by_id[g].used_bytes for g in by_id}, 1, instances)
    for phase in deployment.phases:
        members = _start_sorted([p for p in packing.placed.values() if p.entry.phase == phase])
        _start_sequence(members, by_id, dict(started_always), len(always) + 1, instances)
    return instances


def _start_sorted(placed: list[_Placed]) -> list[_Placed]:
    """Largest footprint first; ties by name, so the order is stable."""
    return sorted(
        placed, key=lambda p: (-(p.cost.fixed_bytes + p.kv_bytes) * p.entry.world_size, p.entry.name)
    )


def _start_sequence(
    placed: list[_Placed], by_id: dict[int, GpuInfo], used: dict[int, int], first: int, out: list[Instance]
) -> dict[int, int]:
    for offset, p in enumerate(placed):
        totals = [by_id[g].total_bytes for g in p.gpu_ids]
        free_at_check = min(by_id[g].total_bytes - used[g] - CUDA_CONTEXT_BYTES for g in p.gpu_ids)
        own = p.cost.weights_bytes + p.cost.overhead_bytes + p.kv_bytes
        util = startup_utilization(own, min(totals), free_at_check)
        out.append(
            Instance(
                p.entry, p.gpu_ids, p.cost, p.kv_bytes, p.context, p.seqs, util, free_at_check, first + offset
            )
        )
        for g in p.gpu_ids:
            used[g] += p.cost.fixed_bytes + p.kv_bytes
    return used


def startup_utilization(own_bytes: int, total_bytes: int, free_at_check_bytes: int) -> float:
    """The instance's own share of the card, rounded up to 0.01, never above what is free at its start.

    vLLM refuses to start when ``free < ceil(util x total)``; ``free`` is read after the worker's own
    CUDA context exists, so ``free_at_check_bytes`` must already exclude it.
    """
    share = math.ceil(own_bytes / total_bytes / UTIL_STEP - 1e-9) * UTIL_STEP
    ceiling = math.floor(free_at_check_bytes / total_bytes / UTIL_STEP + 1e-9) * UTIL_STEP
    return round(max(UTIL_STEP, min(share, ceiling)), 2)


def passes_startup_check(util: float, total_bytes: int, free_bytes: int) -> bool:
    """vLLM's check in ``request_memory()``: ``free >= ceil(total x util)``."""
    return free_bytes >= math.ceil(total_bytes * util)


def _floor(value: int, step: int) -> int:
    return int(value) // step * step


def _ceil(value: int, step: int) -> int:
    return -(-int(value) // step) * step


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"
