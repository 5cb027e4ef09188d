"""``vllm-tune ramp``: build the collaborators, run the ramp, print the table, the chart and the command."""

from __future__ import annotations

from pathlib import Path

import click

from ..devices import unit_of
from ..errors import UsageError
from ..gpulock import GpuLock, gpu_lock_keys
from ..units import GIB, format_duration, parse_duration
from ..vllmargv import has
from ._common import (
    device_ids,
    emit_json,
    extra_argument,
    gpu_uuids,
    headroom_option,
    machine_id,
    model_and_devices,
    path_option,
    runtime_options,
    target_options,
    timeout_options,
)


@click.command(context_settings={"ignore_unknown_options": False})
@target_options(default=None)
@click.option("--max-model-len", type=int, default=None, help="Context length to serve (else after --).")
@click.option("--max-num-seqs", type=int, default=None, help="Concurrent sequences to serve (else after --).")
@path_option(
    "--from-find",
    "from_find",
    help="Take the model, flags and GPUs from a 'vllm-tune find --json' output file.",
)
@click.option(
    "--start", type=float, default=None, help="First utilization [default: 0.85 on cuda, 0.20 on cpu]."
)
@click.option("--step", type=float, default=0.01, show_default=True, help="Raise by this much per step.")
@click.option(
    "--ceiling",
    type=float,
    default=None,
    help="Highest utilization (≤ 0.98) [default: 0.92 on cuda, 0.60 on cpu].",
)
@click.option("--soak", default="1h", show_default=True, help="How long each step stays under load.")
@click.option(
    "--warmup",
    default=None,
    help="The worst case climbs to full concurrency over this part of the soak [default: a quarter].",
)
@click.option(
    "--strategy",
    type=click.Choice(["linear", "bisect"]),
    default="linear",
    show_default=True,
    help="linear: the guides' one step at a time; bisect: find the startup edge first, soak below it.",
)
@click.option(
    "--margin", type=float, default=0.0, show_default=True, help="Serve this far below the last stable step."
)
@headroom_option
@click.option(
    "--max-preemption-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Preemptions per completed request the chosen step may show under load; a step over it with "
    "memory to spare has a pool too small for the load, and the ramp climbs.",
)
@click.option(
    "--max-preemptions", type=int, default=None, hidden=True, help="Deprecated: --max-preemption-rate."
)
@path_option(
    "--workload-file",
    help="Replay these request lengths (one 'PROMPT[,OUTPUT]' a line) instead of the default mix.",
)
@click.option("--no-short", is_flag=True, help="Soak with the worst case only, without the short requests.")
@click.option(
    "--max-launches", type=int, default=None, help="Stop after this many launches; rerun to resume."
)
@timeout_options
@path_option("--chart", "chart_path", help="Where to write the HTML chart [default: next to the step logs].")
@runtime_options
@extra_argument
def command(
    model,
    gpus,
    gpu_ids,
    tp,
    max_model_len,
    max_num_seqs,
    from_find,
    start,
    step,
    ceiling,
    soak,
    warmup,
    strategy,
    margin,
    headroom,
    max_preemption_rate,
    max_preemptions,
    workload_file,
    no_short,
    max_launches,
    trial_timeout,
    stall_timeout,
    chart_path,
    extra,
    runtime_args,
):
    """Raise --gpu-memory-utilization one step at a time, soaking every step under load.

    \b
    Each step restarts vLLM with the next utilization and the other flags unchanged, waits until it
    is ready and keeps it under load for the soak. The first step that dies, fails requests or leaves
    less than --headroom free on a GPU ends the ramp; the last stable step is the answer. A step that
    preempts with memory to spare, or whose KV pool is below the soak load, is too small for the load:
    the ramp climbs to a larger pool (the answer must be within --max-preemption-rate).

    \b
    Examples:
      vllm-tune ramp --model qwen2.5-7b --gpus 2 --max-model-len 32768 --max-num-seqs 4 --simulate rtx-5090
      vllm-tune find --model M --gpus 1 --json > found.json && vllm-tune ramp --from-find found.json --soak 2h
      vllm-tune ramp --model M --gpus 1 --strategy bisect --ceiling 0.95 -- --max-model-len 16384 --trust-remote-code
    """
    from ..ramp import RampPlan, RampRequest, config_from_args, read_find_result

    runtime = runtime_args.build()
    kind = runtime.device
    plan = RampPlan(
        start=kind.ramp_start if start is None else start,
        step=step,
        ceiling=kind.ramp_ceiling if ceiling is None else ceiling,
        strategy=strategy,
        margin=margin,
        soak_s=parse_duration(soak, option="--soak"),
        headroom_bytes=int(headroom * GIB),
        max_preemption_rate=_preemption_rate(max_preemption_rate, max_preemptions),
    )
    plan.validate()
    if max_launches is not None and max_launches < 1:
        raise UsageError(
            f"--max-launches must be at least 1, got {max_launches}", "use e.g. --max-launches 3"
        )
    found = read_find_result(from_find) if from_find else None
    if found is None and not model:
        raise UsageError("ramp needs a model", "pass --model M, or --from-find RESULT.json")
    args = list(found.args) if found else []
    model = model or found.model
    if found and gpus is None and not gpu_ids and found.gpu_ids:
        gpu_ids = ",".join(str(i) for i in found.gpu_ids)
    warmup_s = parse_duration(warmup, option="--warmup") if warmup else plan.soak_s / 4
    replay = ()
    if workload_file:
        from ..workload import read_prompt_lengths

        replay = tuple(read_prompt_lengths(workload_file))

    if runtime.simulated is not None:  # simulated hours pass as fast as the simulated vLLM's
        plan = RampPlan(**{**plan.__dict__, "soak_s": plan.soak_s / runtime_args.sim_time_scale})
        warmup_s /= runtime_args.sim_time_scale
    ids = device_ids(gpus, gpu_ids)
    spec, gpu, nvml = model_and_devices(runtime, model, gpus, ids)
    ids = tuple(gpu.ids)
    config = config_from_args(
        spec.serve_name,
        [*args, *extra],
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        tensor_parallel_size=tp,
    )
    if (
        config.tensor_parallel_size == 1
        and tp is None
        and len(ids) > 1
        and not has(args, "--tensor-parallel-size")
    ):
        config = config.replace(tensor_parallel_size=len(ids))
    if config.tensor_parallel_size * config.pipeline_parallel_size > len(ids):
        raise UsageError(
            f"--tensor-parallel-size {config.tensor_parallel_size} needs that many GPUs, but only {len(ids)} were given",
            "raise --gpus or lower --tensor-parallel-size",
        )
    request = RampRequest(
        model=spec.serve_name,
        gpu_ids=ids,
        config=config,
        plan=plan,
        warmup_s=warmup_s,
        short_requests=not no_short,
        replay=replay,
        timeouts=runtime_args.timeouts(trial_timeout, stall_timeout),
        max_launches=max_launches,
        vllm_cmd=runtime_args.serve_vllm_cmd,
    )
    unit = unit_of(nvml)  # one device in messages: "GPU", "NUMA node"
    result = _run(runtime, request, spec, gpu, nvml)
    run_dir = runtime.log_root / f"ramp-{request.key()}"
    result.chart_path = _write_chart(result, chart_path or run_dir / "ramp-chart.html", gpu.total_bytes, unit)
    if runtime.json:
        emit_json(result.as_json())
    else:
        _print_result(result, unit)
    if result.last_stable is None and result.complete:
        raise click.exceptions.Exit(1)


def _preemption_rate(rate: float, old_count: int | None) -> float:
    """``--max-preemptions`` (a count, deprecated) still works for 0, which is rate 0; a count above
    0 has no rate it equals, so it is refused with the flag that replaces it."""
    if old_count is None:
        return rate
    if old_count == 0:
        click.echo("note: --max-preemptions is deprecated; it is --max-preemption-rate 0", err=True)
        return 0.0
    raise UsageError(
        "--max-preemptions (a count) is replaced by --max-preemption-rate (preemptions per completed request)",
        "use e.g. --max-preemption-rate 0.05 (one request in twenty)",
    )


def _run(runtime, request, spec, gpu, nvml):
    from ..launch import detect_vllm
    from ..ramp import Ramp
    from ..trialrecord import env_fingerprint

    vllm_info = detect_vllm(runtime.launcher)
    try:
        with runtime.open_store() as store:
            ramp = Ramp(
                request,
                env_fingerprint=env_fingerprint(
                    spec, gpu, request.gpu_ids, vllm_info, machine_id=machine_id(nvml, request.gpu_ids)
                ),
                launcher=runtime.launcher,
                nvml=nvml,
                store=store,
                progress=runtime.progress,
                log_dir=runtime.log_root / f"ramp-{request.key()}",
                vocab_size=getattr(spec, "vocab_size", 32000) or 32000,
            )
            with GpuLock(gpu_lock_keys(gpu_uuids(nvml, request.gpu_ids))):  # one tuner per GPU at a time
                return ramp.run()
    finally:
        if nvml is not None:
            nvml.close()


def _write_chart(result, path: Path, total_bytes: int, unit: str) -> Path | None:
    from ..chart import ChartPoint, ramp_chart_html

    points = [
        ChartPoint(
            s.utilization,
            s.kv_cache_tokens,
            max(s.peak_used_bytes.values()) / GIB if s.peak_used_bytes else None,
            s.passed,
            s.failure,
        )
        for s in result.steps
        if s.phase == "soak"
    ]
    if not points:
        return None
    ids = ",".join(map(str, result.request.gpu_ids))
    title = f"vllm-tune ramp: {result.request.model} on {unit}(s) {ids}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ramp_chart_html(points, title=title, capacity_gib=total_bytes / GIB, unit=unit))
    return path


def _print_result(result, unit: str) -> None:
    from ..ramp import summary_table

    if result.steps:
        click.echo("")
        for line in summary_table(result.steps, unit):
            click.echo("  " + line)
        click.echo("")
    elapsed = sum(s.duration_s for s in result.steps)
    last = result.last_stable
    if last is None:
        words = "Ramp cut short" if not result.complete else "No stable step"
        click.echo(f"✘ {words}: {result.reason} ({result.launches} launch(es), {format_duration(elapsed)})")
        if not result.complete:
            click.echo("  Run the same command again to resume.")
        return
    status = (
        "Last stable step" if result.complete else "Last stable step so far (ramp cut short; rerun to resume)"
    )
    margin = (
        f", served at {result.utilization:.2f} (margin {result.request.plan.margin:.2f})"
        if result.request.plan.margin
        else ""
    )
    click.echo(f"✔ {status}: --gpu-memory-utilization {last.utilization:.2f}{margin}")
    click.echo(
        f"  {result.reason} ({result.launches} launch(es) this run, {format_duration(elapsed)} in all)"
    )
    if result.chart_path:
        click.echo(f"\nChart: {result.chart_path}")
    click.echo("\nServe command:\n  " + result.command())
