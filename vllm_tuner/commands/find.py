"""``vllm-tune find``: build the collaborators, run the search, print the result."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import click

from ..errors import UsageError
from ..gpulock import GpuLock, gpu_lock_keys
from ..objectives import BY_FLAG
from ..objectives import named as objective_named
from ..units import GIB, format_duration, parse_duration
from ..vllmargv import options, shell_command
from ._common import (
    device_ids,
    emit_json,
    extra_argument,
    gpu_uuids,
    headroom_option,
    model_and_devices,
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
    "rope-scaling",
)


@click.command(context_settings={"ignore_unknown_options": False})
@target_options(required=True)
@click.option(
    "--objective",
    type=click.Choice(BY_FLAG),
    default="context",
    show_default=True,
    help="Longest --max-model-len keeping --min-seqs, most --max-num-seqs keeping --min-context, or the most "
    "output tokens/s of --workload under --slo (throughput).",
)
@click.option(
    "--workload",
    default=None,
    help="For --objective throughput: a mix (chat, rag, code, agent) or a file of prompt_tokens,output_tokens rows.",
)
@click.option(
    "--slo",
    default=None,
    help='For --objective throughput: latency limits, e.g. "ttft:p95<=2s,itl:p95<=100ms".',
)
@click.option(
    "--max-preemption-rate",
    type=float,
    default=None,
    help="For --objective throughput: preemptions per finished request allowed at saturation [default: 0.05].",
)
@click.option(
    "--level-duration",
    default=None,
    help="For --objective throughput: how long each concurrency level is measured [default: 30s].",
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
@click.option(
    "--allow",
    default="",
    help="Lossy knobs the search may use: eager,fp8-kv,offload,rope-scaling (YaRN for a --context or "
    "--min-context past the model's own length).",
)
@click.option(
    "--util-ceiling",
    type=float,
    default=None,
    help="Never above 0.98 [default: 0.95 on cuda, 0.90 on cpu].",
)
@headroom_option
@click.option(
    "--knob-order",
    default=",".join(KNOBS),
    show_default=True,
    help="Order of the lossy knobs (enforce-eager, kv-cache-dtype, offload) the search adds when allowed and "
    "needed; the lossless ones are computed from the measured KV pool, as --objective says.",
)
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
    workload,
    slo,
    max_preemption_rate,
    level_duration,
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
      vllm-tune find --model qwen2.5-7b --gpus 2 --objective throughput --workload chat --slo "ttft:p95<=2s"
    """
    from ..find import FindRequest, validate_request

    throughput = _throughput_plan(
        objective, workload, slo, max_preemption_rate, level_duration, probe_duration, target_seqs
    )
    if throughput is not None and runtime_args.simulate:  # the sweep's seconds are the simulator's
        throughput = replace(throughput, time_scale=runtime_args.sim_time_scale)
    if throughput is not None:  # --context is the length the workload is served at, not a fixed target
        longest = throughput.traffic.longest
        if target_context is not None and target_context < longest:
            raise UsageError(
                f"--context {target_context} is shorter than the longest request of --workload "
                f"{throughput.traffic.name} ({longest:,} tokens)",
                f"pass --context {longest} or more, or leave it out to serve the workload's longest request",
            )
        min_context, target_context = target_context or longest, None

    # what the command line alone can tell is checked before anything is built, launched or written
    _check_at_least_one(
        tp=tp,
        target_context=target_context,
        target_seqs=target_seqs,
        min_context=min_context,
        min_seqs=min_seqs,
        max_launches=max_launches,
    )
    explicit = click.get_current_context().get_parameter_source
    if target_context is not None and explicit("objective") is click.core.ParameterSource.COMMANDLINE:
        raise UsageError(
            f"--objective {objective} and fixed targets (--context/--seqs) ask for different searches",
            "drop --objective to reach the targets, or drop --context/--seqs to search by the objective",
        )
    if (target_context is None) != (target_seqs is None):
        raise UsageError(
            "fixed targets need both --context and --seqs", "pass e.g. --context 131072 --seqs 8"
        )
    ids = device_ids(gpus, gpu_ids)
    _check_passthrough(extra, dummy_trials=dummy_trials)
    _check_knob_order(knob_order)
    if write_config is not None:
        _check_writable(write_config)
    runtime = runtime_args.build()
    kind = runtime.device
    request_objective = "targets" if target_context else objective
    allowed = _allow(allow)
    _note_missing_knobs(runtime, allowed)
    spec, gpu, nvml = model_and_devices(runtime, model, gpus, ids)
    ids = tuple(gpu.ids)
    tp_size = tp or len(ids)
    _check_heads(spec, tp_size, using_ids=gpu_ids is not None)
    _check_tp_uses_every_gpu(spec, tp_size, ids, gpus_given=gpus is not None, using_ids=gpu_ids is not None)
    if throughput is not None:
        from ..traffic import check_fits_model

        check_fits_model(throughput.traffic, spec.derived_max_model_len, spec.serve_name)
    _check_context_fits_model(spec, target_context=target_context, min_context=min_context, allowed=allowed)
    longest = max(target_context or 0, min_context or 0)
    _check_hf_overrides_passthrough(
        extra, rope_used="rope-scaling" in allowed and longest > spec.derived_max_model_len
    )
    req = FindRequest(
        model=model,
        gpu_ids=ids,
        tensor_parallel_size=tp_size,
        objective=request_objective,
        min_seqs=min_seqs,
        min_context=min_context,
        target_context=target_context,
        target_seqs=target_seqs,
        allow=allowed,
        util_ceiling=kind.util_ceiling if util_ceiling is None else util_ceiling,
        util_floor=kind.util_floor,
        device=kind.name,
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
    validate_request(req)
    if req.util_ceiling < req.util_floor:
        raise UsageError(
            f"--util-ceiling {req.util_ceiling} is below {req.util_floor:.2f}, the utilization floor "
            "where the search gives up",
            f"pass --util-ceiling {req.util_floor:.2f} or more (the ceiling must be at least the floor)",
        )
    from ..find import check_gpus_free, check_weights_fit

    if "offload" not in req.allow or kind.name == "cpu":
        check_weights_fit(spec, gpu.total_bytes, req.tensor_parallel_size, len(ids), kind)
    check_gpus_free(gpu, int(spec.weights_bytes) // req.tensor_parallel_size, gpu_ids=ids, kind=kind)

    vllm_info = None
    if not dry_run:
        from ..launch import detect_vllm

        vllm_info = detect_vllm(runtime.launcher)
        _check_vllm_takes(vllm_info, extra)
    with runtime.open_store() as store:
        finder = runtime_finder(
            req, spec=spec, gpu=gpu, runtime=runtime, nvml=nvml, store=store, vllm_info=vllm_info
        )
        run_dir = finder.log_dir
        if dry_run:
            return _print_dry_run(finder, runtime.json)
        try:
            with GpuLock(gpu_lock_keys(gpu_uuids(nvml, ids))):
                if throughput is not None:
                    from ..throughput import ThroughputSearch

                    result = ThroughputSearch(finder, throughput).run()
                else:
                    result = finder.run()
        finally:
            if nvml is not None:
                nvml.close()
    unwritten = None
    if result.winner is not None:
        path = write_config or (run_dir / "vllm-serve.yaml")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.yaml_text())
            result.config_path = path
        except OSError as exc:  # checked up front; this is a disk that filled or a folder that went away
            unwritten = UsageError(
                f"the config file {path} could not be written ({exc.strerror or exc})",
                "the serve command above is the result; free the disk or choose another --write-config",
            )
    if throughput is not None and result.levels:
        try:
            result.chart_path = run_dir / "throughput-chart.html"
            result.chart_path.write_text(result.chart_html())
        except OSError:  # the chart is for the eye; the result stands without it
            result.chart_path = None
    if runtime.json:
        emit_json(result.as_json())
    elif throughput is not None:
        _print_throughput(result)
    else:
        _print_result(result)
    if unwritten is not None:
        raise unwritten
    if result.winner is None:
        raise click.exceptions.Exit(1)


def _throughput_plan(objective, workload, slo, max_preemption_rate, level_duration, probe_duration, seqs):
    """What --objective throughput measures, from its flags (None for the other objectives, which
    refuse them)."""
    given = [
        name
        for name, value in (
            ("--workload", workload),
            ("--slo", slo),
            ("--max-preemption-rate", max_preemption_rate),
            ("--level-duration", level_duration),
        )
        if value is not None
    ]
    if objective != "throughput":
        if given:
            raise UsageError(
                f"{given[0]} is for --objective throughput", f"add --objective throughput or drop {given[0]}"
            )
        return None
    from ..slo import parse_slo
    from ..throughput import DEFAULT_MAX_PREEMPTION_RATE, ThroughputPlan
    from ..traffic import MIXES, traffic_named

    if workload is None:
        raise UsageError(
            "--objective throughput needs --workload",
            f"pass --workload with a mix ({', '.join(MIXES)}) or a file of prompt_tokens,output_tokens rows",
        )
    if seqs is not None:
        raise UsageError(
            "--seqs cannot be given with --objective throughput: the sweep chooses --max-num-seqs",
            "drop --seqs (--context alone sets the length)",
        )
    rate = DEFAULT_MAX_PREEMPTION_RATE if max_preemption_rate is None else max_preemption_rate
    if rate < 0:
        raise UsageError(
            f"--max-preemption-rate must be 0 or more, got {rate}", "use e.g. --max-preemption-rate 0.05"
        )
    level_s = parse_duration(level_duration, option="--level-duration") if level_duration else 30.0
    if level_s <= 0:
        raise UsageError(
            f"--level-duration must be above zero, got {level_duration}", "use e.g. --level-duration 30s"
        )
    proof_s = parse_duration(probe_duration, option="--probe-duration") if probe_duration else 2 * level_s
    return ThroughputPlan(
        traffic=traffic_named(workload),
        slo=parse_slo(slo),
        level_duration_s=level_s,
        warmup_s=min(5.0, level_s / 4),
        proof_duration_s=proof_s,
        max_preemption_rate=rate,
    )


def _print_throughput(result) -> None:
    from ..slo import seconds_words

    table = result.table()
    if table:
        click.echo("Concurrency sweep (one server):")
        click.echo(
            f"  {'C':>5}  {'out tok/s':>10}  {'req/s':>7}  {'TTFT p50':>9}  {'TTFT p95':>9}  "
            f"{'ITL p50':>8}  {'ITL p95':>8}  {'KV':>4}  {'preempt':>7}"
        )

        def sec(v):
            return seconds_words(v) if v is not None else "-"

        for row in table:
            click.echo(
                f"  {row['concurrency']:>5}  {row['output_tokens_per_s']:>10,.0f}  {row['requests_per_s']:>7.2f}  "
                f"{sec(row['ttft_p50']):>9}  {sec(row['ttft_p95']):>9}  {sec(row['itl_p50']):>8}  "
                f"{sec(row['itl_p95']):>8}  {row['kv_usage']:>4.0%}  {row['preemptions']:>7}"
                + (f"  broke: {'; '.join(row['broken'])}" if row["broken"] else "")
            )
    if result.winner is None:
        click.echo(f"✘ No throughput config: {result.reason}")
        return
    click.echo("✔ Throughput config:")
    for line in result.explanation():
        click.echo(f"  • {line}")
    click.echo("\nServe command:\n  " + result.command())
    if result.config_path:
        run = shell_command(["serve", "--config", str(result.config_path)], vllm_cmd=result.request.vllm_cmd)
        click.echo(f"\nConfig file: {result.config_path}  ({run})")
    if result.chart_path:
        click.echo(f"Chart: {result.chart_path}")


def _show_default(cmd: click.Command, name: str, text: str) -> None:
    """Add ``[default: text]`` to the ``--help`` of an option whose default is worked out later (None on
    the command line, so that it can tell "not given" apart)."""
    for param in cmd.params:
        if param.name == name and isinstance(param, click.Option):
            param.help = f"{(param.help or '').rstrip('.')} [default: {text}]."


_show_default(command, "gpus", "1")


# vLLM flags find sets or steers itself, as (why, fix): passed through after ``--`` they would come
# after the trial's own flags on vLLM's command line and win, so every back-off would be a no-op.
TUNED_PASSTHROUGH = {
    "--max-model-len": ("find tunes it", "use --context (with --seqs) or --min-context"),
    "--max-num-seqs": ("find tunes it", "use --seqs (with --context) or --min-seqs"),
    "--gpu-memory-utilization": ("find tunes it", "cap it with --util-ceiling"),
    "--tensor-parallel-size": ("find sets it", "use find's own -tp, before the --"),
    "--pipeline-parallel-size": (
        "find searches tensor parallelism only",
        "drop it and use -tp with as many GPUs",
    ),
    "--kv-cache-dtype": ("find sets it on its fp8-kv rung", "use --allow fp8-kv"),
    "--enforce-eager": ("find sets it on its eager rung", "use --allow eager"),
    "--no-enforce-eager": ("find sets --enforce-eager on its eager rung", "drop it (no --allow eager)"),
    "--cpu-offload-gb": ("find sets it on its offload rung", "use --allow offload"),
    "--kv-cache-memory-bytes": (
        "it overrides --gpu-memory-utilization, which find tunes",
        "drop it and cap the utilization with --util-ceiling",
    ),
    "--max-num-batched-tokens": (
        "find lowers it itself when profiling runs out of memory",
        "drop it",
    ),
}


def _check_at_least_one(**values: int | None) -> None:
    """Refuse a count below 1 (None: not given)."""
    examples = {
        "tp": ("--tensor-parallel-size", "pass -tp 1 or more, or leave it out for one per GPU"),
        "target_context": ("--context", "pass e.g. --context 32768"),
        "target_seqs": ("--seqs", "pass e.g. --seqs 8"),
        "min_context": ("--min-context", "pass e.g. --min-context 8192"),
        "min_seqs": ("--min-seqs", "use --min-seqs 1 or more"),
        "max_launches": ("--max-launches", "use e.g. --max-launches 12"),
    }
    for name, value in values.items():
        if value is not None and value < 1:
            option, fix = examples[name]
            raise UsageError(f"{option} must be at least 1, got {value}", fix)


def _check_passthrough(extra: Sequence[str], *, dummy_trials: bool) -> None:
    """Refuse a flag after ``--`` that find sets itself (``--flag value`` and ``--flag=value``)."""
    for given in options(extra):
        option, word = given.name, extra[given.start]
        if option == "--load-format":
            # passed through as given, dummy included (a config without weights: scripts/gpu-e2e.sh)
            if dummy_trials:
                raise UsageError(
                    f"{word} after -- overrides the --load-format dummy that --dummy-trials sets",
                    "drop one of them",
                )
            continue
        if option in TUNED_PASSTHROUGH:
            why, fix = TUNED_PASSTHROUGH[option]
            shown = given.written
            named = shown if shown == option else f"{shown} ({option})"
            raise UsageError(f"{named} cannot be passed through after --: {why}", fix)


def _swap_space_replacement(vllm_info) -> str:
    """What replaces --swap-space in find, of what this vLLM accepts: --cpu-offload-gb is find's own
    (its offload rung), --kv-offloading-size may follow the --."""
    ways = []
    if vllm_info.accepts("--cpu-offload-gb"):
        ways.append("use --allow offload (find then offloads weights with --cpu-offload-gb as far as needed)")
    if vllm_info.accepts("--kv-offloading-size"):
        ways.append("pass --kv-offloading-size GIB after -- for a CPU KV cache")
    return ", or ".join(ways) or "drop it"


# What replaces a flag vLLM removed, where find's own options do part of it (``advice.REMOVED_FLAGS``
# says the rest, as ``diagnose`` does): --cpu-offload-gb after -- is refused, find sets it itself.
REMOVED_IN_FIND = {"--swap-space": _swap_space_replacement}


def _check_vllm_takes(vllm_info, extra: Sequence[str]) -> None:
    """A flag after ``--`` that the installed vLLM does not know would fail every launch: refuse it first,
    with its replacement where vLLM removed it."""
    from ..advice import REMOVED_FLAGS

    for given in options(extra):
        option, shown = given.name, given.written
        if not shown.startswith("--") or vllm_info.accepts(option):
            continue
        replacement = (
            REMOVED_IN_FIND[option](vllm_info) if option in REMOVED_IN_FIND else REMOVED_FLAGS.get(option)
        )
        if replacement:
            raise UsageError(
                f"vLLM {vllm_info.version} does not know {shown} (passed after --): vLLM removed it",
                replacement,
            )
        raise UsageError(
            f"vLLM {vllm_info.version} does not know {shown} (passed after --)",
            "check its spelling in 'vllm serve --help=all', or drop it",
        )


def _check_writable(path: Path) -> None:
    """Refuse a --write-config file that could not be written after the search. Folders it has to create
    are created and removed again, the file is probed with a temporary name: nothing is left behind."""
    target = path.absolute()
    folder, missing = target.parent, []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    fix = "choose a path in a folder you can write, e.g. --write-config ./vllm-serve.yaml"
    if not folder.is_dir():
        raise UsageError(f"--write-config {path} cannot be written: {folder} is not a folder", fix)
    created: list[Path] = []
    where = target
    try:
        for d in reversed(missing):
            where = d
            d.mkdir()
            created.append(d)
        where = target
        if target.exists():
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        else:
            where = target.parent
            fd, probe = tempfile.mkstemp(dir=target.parent, prefix=".vllm-tune-", suffix=".probe")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"--write-config {path} cannot be written ({where}: {exc.strerror or exc})", fix
        ) from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _gpus_words(count: int, using_ids: bool) -> str:
    return f"with {count} id(s) in --gpu-ids" if using_ids else f"--gpus {count}"


def _check_heads(spec, tp: int, *, using_ids: bool) -> None:
    """vLLM refuses a tensor-parallel size it cannot shard the attention heads over; so does find, up front."""
    if spec.shards_over(tp):
        return
    heads, kv = spec.num_attention_heads, max(spec.kv_heads(), default=0)
    sizes = spec.tp_sizes(up_to=max(tp, 8))
    nearest = max(d for d in sizes if d <= tp)
    what = f"{heads} attention heads" if heads % tp else f"{kv} KV heads (split evenly, or each copied whole)"
    raise UsageError(
        f"tensor parallel size {tp} cannot shard the {what} of {spec.serve_name}, and vLLM refuses that",
        f"pick -tp from {', '.join(map(str, sizes))} with as many GPUs, e.g. -tp {nearest} {_gpus_words(nearest, using_ids)}",
    )


def _check_context_fits_model(
    spec, *, target_context: int | None, min_context: int | None, allowed: frozenset[str]
) -> None:
    """vLLM refuses a --max-model-len above the model's own maximum: a floor above it is out of reach
    whatever the memory, unless --allow rope-scaling stretches the model's positions with YaRN (refused
    here too where its RoPE cannot take YaRN)."""
    from ..rope import extension

    limit = spec.derived_max_model_len
    for option, value in (("--context", target_context), ("--min-context", min_context)):
        if not (value and limit and value > limit):
            continue
        ext = extension(spec, value, option=option)  # a UsageError where YaRN cannot serve it
        if "rope-scaling" not in allowed:
            raise UsageError(
                f"{option} {value} is longer than {spec.serve_name} takes ({limit} tokens, from its config), "
                "and vLLM refuses that",
                f"use {option} {limit} or less, or --allow rope-scaling for {ext.words} ({ext.cost})",
            )


def _check_hf_overrides_passthrough(extra: Sequence[str], *, rope_used: bool) -> None:
    """An --hf-overrides after -- that moves the model's length or RoPE would change what vLLM takes behind
    find's back; any one would replace the rope-scaling rung's own (vLLM keeps the last)."""
    from ..models import MAX_LEN_KEYS
    from ..rope import ROPE_KEYS, SUB_CONFIGS, parse_hf_overrides

    for given in options(extra):
        if given.name != "--hf-overrides":
            continue
        if given.key:  # --hf-overrides.rope_scaling.factor 4: one key of the JSON, as vLLM nests it
            overrides: dict = {}
            *path, last = given.key.split(".")
            node = overrides
            for part in path:
                node = node.setdefault(part, {})
            node[last] = given.value
        else:
            overrides = parse_hf_overrides(given.value or "", "--hf-overrides after --")
        if rope_used:
            raise UsageError(
                "--hf-overrides after -- would replace the YaRN override --allow rope-scaling passes (vLLM keeps "
                "the last --hf-overrides)",
                "drop it, or serve the model at its own length without --allow rope-scaling",
            )
        scopes = [overrides, *(v for k, v in overrides.items() if k in SUB_CONFIGS and isinstance(v, dict))]
        moved = sorted({k for scope in scopes for k in scope if k in (*ROPE_KEYS, *MAX_LEN_KEYS)})
        if moved:
            raise UsageError(
                f"--hf-overrides after -- sets {', '.join(moved)}: find sizes the context from the model's "
                "own length and sets RoPE scaling itself",
                "drop those keys and use --allow rope-scaling with --context or --min-context past the "
                "model's length",
            )


def _check_tp_uses_every_gpu(spec, tp: int, ids: Sequence[int], *, gpus_given: bool, using_ids: bool) -> None:
    """find runs one vLLM with pipeline parallel size 1, so its tensor-parallel size is the GPU count."""
    n = len(ids)
    if tp == n:
        return
    given = "given" if gpus_given or using_ids else "given (--gpus defaults to 1)"
    if tp > n:
        problem = (
            f"--tensor-parallel-size {tp} needs {tp} GPUs, but {n} {'was' if n == 1 else 'were'} {given}"
        )
    else:
        problem = (
            f"--tensor-parallel-size {tp} uses {tp} of the {n} GPUs given and vLLM would leave "
            f"{n - tp} idle (find needs tensor parallel size = GPU count)"
        )
    if using_ids and tp < n:
        gpus_fix = "--gpu-ids " + ",".join(str(i) for i in ids[:tp])
    else:
        gpus_fix = _gpus_words(tp, using_ids)
    fix = f"pass {gpus_fix}"
    if spec.shards_over(n):
        fix += f", or -tp {n}"
    raise UsageError(problem, fix)


def _note_missing_knobs(runtime, allowed: frozenset[str]) -> None:
    """Say once, before the search, which allowed lossy knobs do nothing on this device."""
    for knob in sorted(allowed & set(runtime.device.missing_knobs)):
        runtime.progress.note(
            f"--allow {knob} is skipped on --device {runtime.device.name}: {runtime.device.missing_knobs[knob]}"
        )


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

    kind = finder.request.device_kind
    first = finder.policy.next([])
    # the lossy knobs the device lacks are never tried (the Finder drops them): say so, and why
    ladder = finder.policy.ladder(kind.missing_knobs, kind.name)
    estimate = None
    if isinstance(first, Launch):
        est = finder.policy.estimate_for(first.config)
        estimate = {
            "weights_gib": round(est.weights_bytes / GIB, 2),
            "cudagraph_gib": round(est.cudagraph_bytes / GIB, 2),
            "kv_pool_gib": round(est.kv_pool_bytes / GIB, 2),
            "kv_tokens": int(est.kv_pool_bytes // max(1, est.kv_bytes_per_token)),
        }
    plan = {
        "model": finder.spec.serve_name,
        "device": kind.name,
        "gpus": list(finder.request.gpu_ids),
        "gpu_total_gib": round(finder.gpu.total_bytes / GIB, 2),
        "first_candidate": first.config.flags() if isinstance(first, Launch) else None,
        "estimate_per_gpu": estimate,
        "reason": first.reason,
        "ladder": ladder,
    }
    if json_:
        emit_json(plan)
        return
    unit = kind.unit
    click.echo(f"Model {plan['model']} on {unit}(s) {plan['gpus']} ({plan['gpu_total_gib']} GiB each)")
    if isinstance(first, Launch) and estimate is not None:
        flags = " ".join(f"{k} {v}" if v is not True else k for k, v in first.config.flags().items())
        click.echo(f"First candidate: {flags}\n  ({first.reason})")
        # no CUDA graphs where the device has none (the estimate of such a device is an eager one)
        graphs = "" if "eager" in kind.missing_knobs else f"CUDA graphs {estimate['cudagraph_gib']} GiB, "
        click.echo(
            f"Its estimate per {unit}: weights {estimate['weights_gib']} GiB, {graphs}"
            f"KV pool {estimate['kv_pool_gib']} GiB ({estimate['kv_tokens']:,} tokens)"
        )
    else:
        click.echo(f"Nothing to launch: {first.reason}")
        for line in first.missing:
            click.echo(f"  {line}")
    click.echo("How each knob is set, in the order it is given up:")
    for step in ladder:
        click.echo(f"  {step}")
    click.echo("Dry run: nothing was launched.")


def _print_result(result) -> None:
    elapsed = sum(t.duration_s for t in result.trials)
    if result.winner is None:
        click.echo(
            f"✘ No stable config: {result.reason} ({result.launches} launch(es), {format_duration(elapsed)})"
        )
        for line in [f"warning: {w}" for w in result.warnings] + list(result.missing):
            click.echo(f"  {line}")
        return
    status = "Stable config" if result.complete else "Best stable config so far (search cut short)"
    click.echo(f"✔ {status} after {result.launches} launch(es), {format_duration(elapsed)}:")
    for line in result.explanation:
        click.echo(f"  • {line}")
    click.echo(f"  • guarantee: {objective_named(result.request.objective).guarantee}")
    click.echo("\nServe command:\n  " + result.command())
    if result.config_path:
        run = shell_command(["serve", "--config", str(result.config_path)], vllm_cmd=result.request.vllm_cmd)
        click.echo(f"\nConfig file: {result.config_path}  ({run})")
