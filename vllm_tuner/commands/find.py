"""``vllm-tune find``: build the collaborators, run the search, print the result."""

from __future__ import annotations

import click

from ..errors import UsageError
from ..gpulock import GpuLock, gpu_lock_keys
from ..search import GIB, LOSSY_ORDER
from ..units import format_duration, parse_duration
from ._common import (
    emit_json,
    extra_argument,
    find_run_dir,
    gpu_uuids,
    headroom_option,
    path_option,
    runtime_finder,
    runtime_options,
    target_options,
    timeout_options,
)

KNOBS = (
    "max-num-seqs",
    "max-model-len",
    "gpu-memory-utilization",
    "enforce-eager",
    "kv-cache-dtype",
    "offload",
)


@click.command(context_settings={"ignore_unknown_options": False})
@target_options(required=True)
@click.option(
    "--objective",
    type=click.Choice(["context", "concurrency"]),
    default="context",
    show_default=True,
    help="Longest --max-model-len keeping --min-seqs, or most --max-num-seqs keeping --min-context.",
)
@click.option("--min-seqs", type=int, default=1, show_default=True)
@click.option(
    "--min-context", type=int, default=None, help="Context floor (tokens) [default: 8192 for concurrency]."
)
@click.option(
    "--context", "target_context", type=int, default=None, help="Fixed target context (with --seqs)."
)
@click.option(
    "--seqs", "target_seqs", type=int, default=None, help="Fixed target concurrency (with --context)."
)
@click.option("--allow", default="", help="Lossy knobs the search may use: eager,fp8-kv,offload.")
@click.option("--util-ceiling", type=float, default=0.95, show_default=True, help="Never above 0.98.")
@headroom_option
@click.option("--knob-order", default=",".join(KNOBS), show_default=True, help="Back-off order of the knobs.")
@click.option("--max-launches", type=int, default=12, show_default=True)
@click.option("--time-budget", default=None, help="Stop after this long, e.g. 2h.")
@timeout_options
@click.option(
    "--probe-duration", default=None, help="Keep the load probe running this long [default: one wave]."
)
@click.option(
    "--dummy-trials",
    is_flag=True,
    help="Trials use --load-format dummy; the winner is re-proved on real weights.",
)
@path_option(
    "--write-config",
    help="Where to write the YAML for 'vllm serve --config' [default: next to the trial logs].",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the estimate, first candidate and ladder; launch nothing."
)
@runtime_options
@extra_argument
def command(
    model,
    gpus,
    gpu_ids,
    tp,
    objective,
    min_seqs,
    min_context,
    target_context,
    target_seqs,
    allow,
    util_ceiling,
    headroom,
    knob_order,
    max_launches,
    time_budget,
    trial_timeout,
    stall_timeout,
    probe_duration,
    dummy_trials,
    write_config,
    dry_run,
    extra,
    runtime_args,
):
    """Launch vLLM with candidate flags and return the largest stable config.

    \b
    Examples:
      vllm-tune find --model qwen2.5-7b --gpus 2 --simulate rtx-5090
      vllm-tune find --model Qwen/Qwen2.5-32B-Instruct-AWQ --gpus 1 --objective concurrency --min-context 16384
      vllm-tune find --model zai-org/GLM-4.7-Flash --gpus 2 --context 131072 --seqs 4 --allow fp8-kv \\
          -- --trust-remote-code --tool-call-parser glm47
    """
    from ..find import FindRequest, validate_request

    runtime = runtime_args.build()
    if (target_context is None) != (target_seqs is None):
        raise UsageError(
            "fixed targets need both --context and --seqs", "pass e.g. --context 131072 --seqs 8"
        )
    request_objective = "targets" if target_context else objective
    ids = _gpu_ids(gpus, gpu_ids)
    spec, gpu, nvml = _model_and_gpus(runtime, model, gpus, ids)
    ids = tuple(gpu.ids)
    req = FindRequest(
        model=model,
        gpu_ids=ids,
        tensor_parallel_size=tp or len(ids),
        objective=request_objective,
        min_seqs=min_seqs,
        min_context=min_context,
        target_context=target_context,
        target_seqs=target_seqs,
        allow=_allow(allow),
        util_ceiling=util_ceiling,
        headroom_bytes=int(headroom * GIB),
        max_launches=max_launches,
        time_budget_s=parse_duration(time_budget, option="--time-budget") if time_budget else None,
        timeouts=runtime_args.timeouts(trial_timeout, stall_timeout),
        probe_duration_s=parse_duration(probe_duration, option="--probe-duration")
        if probe_duration
        else None,
        dummy_trials=dummy_trials,
        extra_args=tuple(extra),
        vllm_cmd=runtime_args.serve_vllm_cmd,
        knob_order=tuple(k.strip() for k in knob_order.split(",") if k.strip()),
    )
    _check_knob_order(knob_order)
    validate_request(req)
    if req.tensor_parallel_size > len(ids):
        raise UsageError(
            f"--tensor-parallel-size {req.tensor_parallel_size} needs that many GPUs, "
            f"but only {len(ids)} were given",
            "raise --gpus or lower --tensor-parallel-size",
        )
    from ..find import check_gpus_free, check_weights_fit

    if "offload" not in req.allow:
        check_weights_fit(spec, gpu.total_bytes, req.tensor_parallel_size, len(ids))
    check_gpus_free(gpu, int(spec.weights_bytes) // req.tensor_parallel_size, gpu_ids=ids)

    vllm_info = None
    if not dry_run:
        from ..launch import detect_vllm

        vllm_info = detect_vllm(runtime.launcher)
    run_dir = find_run_dir(runtime, req)
    with runtime.open_store() as store:
        finder = runtime_finder(
            req, spec=spec, gpu=gpu, runtime=runtime, nvml=nvml, store=store, vllm_info=vllm_info
        )
        if dry_run:
            return _print_dry_run(finder, runtime.json)
        try:
            with GpuLock(gpu_lock_keys(gpu_uuids(nvml, ids))):
                result = finder.run()
        finally:
            if nvml is not None:
                nvml.close()
    if result.winner is not None:
        path = write_config or (run_dir / "vllm-serve.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.yaml_text())
        result.config_path = path
    if runtime.json:
        emit_json(result.as_json())
    else:
        _print_result(result)
    if result.winner is None:
        raise click.exceptions.Exit(1)


def _gpu_ids(gpus: int | None, gpu_ids: str | None) -> list[int] | None:
    if gpus is not None and gpu_ids:
        raise UsageError("--gpus and --gpu-ids cannot be combined", "use one of them")
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}", "pass e.g. --gpus 1")
    if not gpu_ids:
        return None
    try:
        return [int(x) for x in gpu_ids.split(",") if x.strip()]
    except ValueError:
        raise UsageError(
            f"--gpu-ids must be comma-separated integers, got {gpu_ids!r}", "pass e.g. --gpu-ids 0,2"
        ) from None


def _model_and_gpus(runtime, model: str, gpus: int | None, ids: list[int] | None):
    from ..gpus import resolve_gpus
    from ..models import resolve_model

    spec = resolve_model(model)
    nvml = runtime.open_nvml()
    gpu = resolve_gpus(
        gpus=gpus if ids is None else None,
        gpu_ids=ids,
        gpu_name=None,
        gpu_memory=None,
        nvml_opener=lambda: nvml,
    )
    return spec, gpu, nvml


def _allow(text: str) -> frozenset[str]:
    return frozenset(x.strip() for x in text.split(",") if x.strip())


def _check_knob_order(text: str) -> None:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in KNOBS and n not in ("swap", "fp8-kv", "eager")]
    if unknown:
        raise UsageError(
            f"unknown knob(s) in --knob-order: {', '.join(unknown)}", f"use names from {', '.join(KNOBS)}"
        )


def _print_dry_run(finder, json_: bool) -> None:
    from ..search import Launch

    first = finder.policy.next([])
    ladder = ["max-num-seqs", "max-model-len", "gpu-memory-utilization (0.01 steps, bisected at the edge)"]
    ladder += [f"{k} (only with --allow {k})" for k in LOSSY_ORDER]
    plan = {
        "model": finder.spec.serve_name,
        "gpus": list(finder.request.gpu_ids),
        "gpu_total_gib": round(finder.gpu.total_bytes / GIB, 2),
        "first_candidate": first.config.flags() if isinstance(first, Launch) else None,
        "reason": first.reason,
        "ladder": ladder,
    }
    if json_:
        emit_json(plan)
        return
    click.echo(f"Model {plan['model']} on GPU(s) {plan['gpus']} ({plan['gpu_total_gib']} GiB each)")
    if isinstance(first, Launch):
        flags = " ".join(f"{k} {v}" if v is not True else k for k, v in first.config.flags().items())
        click.echo(f"First candidate: {flags}\n  ({first.reason})")
    else:
        click.echo(f"Nothing to launch: {first.reason}")
        for line in first.missing:
            click.echo(f"  {line}")
    click.echo("Back-off ladder: " + " → ".join(ladder))
    click.echo("Dry run: nothing was launched.")


def _print_result(result) -> None:
    elapsed = sum(t.duration_s for t in result.trials)
    if result.winner is None:
        click.echo(
            f"✘ No stable config: {result.reason} ({result.launches} launch(es), {format_duration(elapsed)})"
        )
        for line in result.missing:
            click.echo(f"  {line}")
        return
    status = "Stable config" if result.complete else "Best stable config so far (search cut short)"
    click.echo(f"✔ {status} after {result.launches} launch(es), {format_duration(elapsed)}:")
    for line in result.explanation:
        click.echo(f"  • {line}")
    click.echo("\nServe command:\n  " + result.command())
    if result.config_path:
        click.echo(f"\nConfig file: {result.config_path}  (vllm serve --config {result.config_path})")
