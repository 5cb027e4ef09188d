"""Where the plan's inputs come from: per-model costs (estimator or the file) and the GPUs (NVML or offline).

The estimator and model resolver are injected so the planner's tests run on plain data; the defaults
are :func:`vllm_tuner.models.resolve_model` and :func:`vllm_tuner.estimate.estimate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DeployError, TunerError
from ..serveconfig import ServeConfig
from ..units import GIB
from ..vllmargv import switch_of
from .plan import GpuInfo, ModelCost, min_context_of
from .spec import DEFAULT_MIN_CONTEXT, Deployment, GpuSpec, ModelEntry

if TYPE_CHECKING:
    from ..estimate import Estimate
    from ..models import ModelSpec

ResolveFn = Callable[[str], "ModelSpec"]
EstimateFn = Callable[..., "Estimate"]


def model_costs(
    deployment: Deployment,
    gpu_total_bytes: int,
    *,
    gpu_name: str = "",
    resolve: ResolveFn | None = None,
    estimate_fn: EstimateFn | None = None,
) -> dict[str, ModelCost]:
    """Per-GPU cost of every model: its ``memory:`` block when given, else the estimator's breakdown."""
    out: dict[str, ModelCost] = {}
    for entry in deployment.models:
        if entry.memory is not None:
            out[entry.name] = ModelCost(
                entry.memory.weights_bytes,
                entry.memory.overhead_bytes,
                entry.memory.kv_bytes_per_token,
                entry.memory.max_context,
                source="file",
            )
            continue
        out[entry.name] = estimated_cost(
            entry, gpu_total_bytes, gpu_name=gpu_name, resolve=resolve, estimate_fn=estimate_fn
        )
    return out


def estimated_cost(
    entry: ModelEntry,
    gpu_total_bytes: int,
    *,
    gpu_name: str = "",
    resolve: ResolveFn | None = None,
    estimate_fn: EstimateFn | None = None,
) -> ModelCost:
    if resolve is None:
        from ..models import resolve_model

        resolve = resolve_model
    if estimate_fn is None:
        from ..estimate import estimate

        estimate_fn = estimate
    try:
        spec = resolve(entry.model)
    except TunerError as exc:
        raise DeployError(
            f"{entry.name}: {exc.problem}",
            exc.fix or "give the model a memory: block (weights, kv_bytes_per_token)",
        ) from exc
    max_context = int(getattr(spec, "derived_max_model_len", 0) or 0) or None
    probe_cost = ModelCost(0, 0, 1, max_context)
    context = min(min_context_of(entry, probe_cost), max_context or DEFAULT_MIN_CONTEXT * 1024)
    config = ServeConfig(
        model=str(getattr(spec, "serve_name", "") or entry.model),
        tensor_parallel_size=entry.tensor_parallel_size,
        pipeline_parallel_size=entry.pipeline_parallel_size,
        max_model_len=context,
        max_num_seqs=entry.min_seqs,
        kv_cache_dtype=entry.kv_cache_dtype,
        enforce_eager=switch_of(entry.flags, "--enforce-eager") is True,
        extra_args=tuple(entry.flags),  # --runner pooling / --convert change what vLLM budgets
    )
    return cost_of(spec, estimate_fn(spec, gpu_total_bytes, config, gpu_name=gpu_name))


def cost_of(spec: ModelSpec, est: Estimate) -> ModelCost:
    """The plan's per-GPU cost of a model from the estimator's breakdown of one server of it (pure)."""
    return ModelCost(
        weights_bytes=int(est.weights_bytes),
        overhead_bytes=int(est.non_torch_bytes) + int(est.activation_bytes) + int(est.cudagraph_bytes),
        kv_bytes_per_token=int(est.kv_bytes_per_token),  # 0: an encoder's pooling runner keeps no KV cache
        max_context=int(est.derived_max_model_len or 0) or None,  # the length vLLM derives (overrides in)
        source="estimate",
        kv_dtype_bytes=int(getattr(spec, "dtype_bytes", 2) or 2),
        serve_name=str(getattr(spec, "serve_name", "") or "") or None,
    )


def plan_gpus(
    spec: GpuSpec,
    *,
    nvml_opener: Callable[[], object] | None = None,
    profile_lookup: Callable[[str], tuple[str, int]] | None = None,
) -> tuple[list[GpuInfo], bool]:
    """The deployment's GPUs and whether they are planned offline (a profile or a size, no NVML)."""
    ids = list(spec.ids) if spec.ids is not None else list(range(spec.n))
    if spec.memory_bytes is not None:
        return [GpuInfo(i, f"GPU ({spec.memory_bytes / GIB:.1f} GiB)", spec.memory_bytes) for i in ids], True
    if spec.profile is not None:
        name, total = (profile_lookup or gpu_profile)(spec.profile)
        return [GpuInfo(i, name, total) for i in ids], True
    if nvml_opener is None:
        from ..devices import device_kind, open_devices

        nvml = open_devices(device_kind(spec.device))
    else:
        nvml = nvml_opener()
    try:
        count = nvml.device_count()
        missing = [i for i in ids if i >= count]
        if missing:
            raise DeployError(
                f"the deployment wants GPU {missing[0]} but this machine has {count} GPU(s)",
                "lower gpus.count / gpus.ids, or plan offline with gpus.profile",
            )
        out = []
        for i in ids:
            device, memory = nvml.device(i), nvml.memory(i)
            out.append(GpuInfo(i, device.name, device.total, memory.used))
        return out, False
    finally:
        close = getattr(nvml, "close", None)
        if close:
            close()


def gpu_profile(name: str) -> tuple[str, int]:
    """Name and total bytes of a GPU profile, through :mod:`vllm_tuner.gpus`."""
    from ..gpus import resolve_gpus

    try:
        target = resolve_gpus(gpus=1, gpu_ids=None, gpu_name=name, gpu_memory=None)
    except TunerError as exc:
        raise DeployError(
            f"unknown GPU profile {name!r}: {exc.problem}", exc.fix or "write gpus.memory instead"
        ) from exc
    return str(target.name), int(target.total_bytes)


def plan_deployment(
    deployment: Deployment,
    *,
    nvml_opener: Callable[[], object] | None = None,
    resolve: ResolveFn | None = None,
    estimate_fn: EstimateFn | None = None,
):
    """The plan for ``deployment`` on its GPUs (NVML, or offline from gpus.profile / gpus.memory)."""
    from .plan import make_plan

    gpus, offline = plan_gpus(deployment.gpus, nvml_opener=nvml_opener)
    smallest = min(gpus, key=lambda g: g.total_bytes)
    costs = model_costs(
        deployment, smallest.total_bytes, gpu_name=smallest.name, resolve=resolve, estimate_fn=estimate_fn
    )
    return make_plan(deployment, gpus, costs, offline=offline)
