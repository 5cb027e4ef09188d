"""Plain-text and JSON renderings of a :class:`DeploymentPlan` (pure)."""

from __future__ import annotations

from ..devices import device_kind
from ..units import GIB
from ..vllmargv import shell_command
from .plan import DeploymentPlan, GpuBudget, Instance

RULE = "─"


def gib(value: int | float) -> str:
    return f"{value / GIB:.1f}"


def render_budget(budget: GpuBudget) -> list[str]:
    """One GPU's table, like the guides' "96 GB budget scenarios"."""
    gpu = budget.gpu
    phase = f"  phase {budget.phase}" if budget.phase else ""
    lines = [
        f"GPU {gpu.id}  {gpu.name}  {gib(gpu.total_bytes)} GiB{phase}",
        f"  {'':<18}{'weights':>9}{'overhead':>10}{'KV':>8}{'total':>9}{'util':>7}",
    ]
    for row in budget.rows:
        lines.append(
            f"  {row.name:<18}{gib(row.weights_bytes):>9}{gib(row.overhead_bytes):>10}"
            f"{gib(row.kv_bytes):>8}{gib(row.total_bytes):>9}{row.utilization:>7.2f}"
        )
    if gpu.used_bytes:
        lines.append(f"  {'other processes':<18}{'':>27}{gib(gpu.used_bytes):>9}")
    lines.append(f"  {'headroom':<18}{'':>27}{gib(budget.headroom_bytes):>9}")
    free = budget.free_bytes
    lines.append(f"  {'free':<18}{'':>27}{gib(free):>9}")
    lines.append("  " + RULE * 61)
    mark = "ok" if free >= 0 else "OVER"
    lines.append(f"  {'total':<18}{'':>27}{gib(gpu.total_bytes):>9} GiB  {mark}")
    return lines


def render_instance(inst: Instance, *, vllm_cmd: str = "vllm", device: str = "cuda") -> list[str]:
    gpus = ",".join(map(str, inst.gpu_ids))
    env = device_kind(device).serve_env(inst.gpu_ids, inst.config)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # the plan shows which devices, not allocator settings
    phase = f"  phase {inst.phase}" if inst.phase else ""
    return [
        f"  {inst.start_position}. {inst.name:<14} GPU {gpus:<5} :{inst.port:<6}"
        f"{inst.max_model_len} tokens x {inst.max_num_seqs} seqs  KV {gib(inst.kv_bytes)} GiB "
        f"({inst.kv_tokens:,} tokens)  util {inst.gpu_memory_utilization:.2f} "
        f"(free at its start {gib(inst.free_at_start_bytes)} GiB){phase}",
        "     " + shell_command(inst.serve_args(), env, vllm_cmd=vllm_cmd),
    ]


def render_plan(plan: DeploymentPlan) -> str:
    dep = plan.deployment
    where = " (planned offline)" if plan.offline else ""
    lines = [f"Deployment {dep.name}: {len(dep.models)} model(s) on {len(plan.gpus)} GPU(s){where}", ""]
    for phase in plan.phases:
        for budget in plan.budgets(phase):
            if budget.rows or phase is None:
                lines += render_budget(budget) + [""]
    if plan.instances:
        lines.append("Start order (each waits for the one before to be healthy and its memory to settle):")
        for phase in plan.phases:
            if phase is not None:
                lines.append(f" phase {phase}:")
            for inst in plan.resident(phase):
                if phase is None or inst.phase == phase or phase == plan.phases[0]:
                    lines += render_instance(inst, device=dep.gpus.device)
    if not plan.fits:
        lines += ["", "Does not fit:"] + [f"  - {p}" for p in plan.problems]
        if plan.suggestions:
            lines += ["What would fit:"] + [f"  - {s}" for s in plan.suggestions]
    return "\n".join(lines).rstrip() + "\n"


def plan_json(plan: DeploymentPlan) -> dict:
    return {
        "deployment": plan.deployment.name,
        "fits": plan.fits,
        "offline": plan.offline,
        "problems": list(plan.problems),
        "suggestions": list(plan.suggestions),
        "gpus": [
            {"id": g.id, "name": g.name, "total_bytes": g.total_bytes, "used_bytes": g.used_bytes}
            for g in plan.gpus
        ],
        "budgets": [
            {
                "gpu": b.gpu.id,
                "phase": b.phase,
                "headroom_bytes": b.headroom_bytes,
                "free_bytes": b.free_bytes,
                "rows": [
                    {
                        "name": r.name,
                        "weights_bytes": r.weights_bytes,
                        "overhead_bytes": r.overhead_bytes,
                        "kv_bytes": r.kv_bytes,
                        "total_bytes": r.total_bytes,
                        "utilization": r.utilization,
                    }
                    for r in b.rows
                ],
            }
            for phase in plan.phases
            for b in plan.budgets(phase)
        ],
        "instances": [instance_json(i) for i in plan.instances],
    }


def instance_json(inst: Instance) -> dict:
    return {
        "name": inst.name,
        "model": inst.entry.model,
        "role": inst.entry.role,
        "port": inst.port,
        "phase": inst.phase,
        "gpu_ids": list(inst.gpu_ids),
        "start_position": inst.start_position,
        "weights_bytes": inst.cost.weights_bytes,
        "overhead_bytes": inst.cost.overhead_bytes,
        "kv_bytes": inst.kv_bytes,
        "kv_tokens": inst.kv_tokens,
        "footprint_bytes": inst.footprint_bytes,
        "max_model_len": inst.max_model_len,
        "max_num_seqs": inst.max_num_seqs,
        "gpu_memory_utilization": inst.gpu_memory_utilization,
        "free_at_start_bytes": inst.free_at_start_bytes,
        "cost_source": inst.cost.source,
        "argv": inst.serve_args(),
    }
