"""From a scenario and a ``vllm serve`` argv to the simulated engine's inputs, and the oracle.

The simulated executable (``__main__``) and the benchmark's oracle both go through :func:`prepare`, so
what :func:`truth` predicts is what a launch does. Reads the scenario (a dict) and the model's config
(the simulator's own reader in ``server.find_model``); starts nothing, touches no state folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass

from . import groundtruth, hfconfig, steptime
from . import runner as runners
from .groundtruth import LaunchArgs, ModelTruth, Truth
from .scheduler import LoadResult, Scheduler, closed_loop
from .server import (
    KV_DTYPES,
    build_parser,
    config_file_args,
    find_model,
    normalise_argv,
    scenario_model_entry,
)

CONFIG_ERROR = "unsupported_flag_or_arg_error"


@dataclass(frozen=True)
class Prepared:
    """Everything a launch of the simulated engine needs, already validated."""

    model: ModelTruth
    launch: LaunchArgs
    gpus: list[int]
    truth: dict  # the scenario's hidden truths merged with the model's entry
    faults: dict
    timing: dict
    served_name: str
    compiles: bool  # torch.compile runs (not with --enforce-eager or -O0)
    cost: steptime.ModelCost  # what a token costs the model (the step model's input)


class ConfigError(Exception):
    """A launch that vLLM refuses before touching a GPU; ``str()`` is the exception line vLLM prints."""


def parse(argv: list[str]) -> argparse.Namespace:
    """argv after ``serve`` → the parsed flags, as vLLM's FlexibleArgumentParser does.

    Raises ``SystemExit(2)`` (argparse's error, printed on stderr) for unknown flags or bad values."""
    rest = normalise_argv(argv)
    if "--config" in rest:
        i = rest.index("--config")
        rest = config_file_args(rest[i + 1]) + rest[:i] + rest[i + 2 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def validate(args: argparse.Namespace) -> None:
    """The config-time checks vLLM runs in the API server process, before the engine starts."""
    util = args.gpu_memory_utilization
    if not 0 < util <= 1:
        bound, kind = (
            ("greater than 0", "greater_than")
            if util <= 0
            else ("less than or equal to 1", "less_than_equal")
        )
        raise ConfigError(
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig\n"
            f"gpu_memory_utilization\n  Input should be {bound} [type={kind}, input_value={util}, input_type=float]"
        )
    if isinstance(args.hf_overrides, str):
        raise ConfigError(hfconfig.not_a_dict(args.hf_overrides))
    if args.kv_cache_dtype not in KV_DTYPES:
        raise ConfigError(
            f"ValueError: Invalid kv_cache_dtype: {args.kv_cache_dtype!r}. Valid values are: {KV_DTYPES}"
        )
    if (
        args.max_num_batched_tokens is not None
        and args.max_num_seqs is not None
        and args.max_num_batched_tokens < args.max_num_seqs
    ):
        raise ConfigError(
            f"ValueError: max_num_batched_tokens ({args.max_num_batched_tokens}) must be greater "
            f"than or equal to max_num_seqs ({args.max_num_seqs})."
        )


def value_error(config_class: str, message: str) -> ConfigError:
    """A ``ValueError`` raised inside one of vLLM's pydantic config dataclasses, as it prints."""
    return ConfigError(
        f"pydantic_core._pydantic_core.ValidationError: 1 validation error for {config_class}\n"
        f"  Value error, {message} [type=value_error, input_value=ArgsKwargs(()), input_type=ArgsKwargs]"
    )


def resolve_runner(args: argparse.Namespace, config: dict, derived: int) -> runners.Runner:
    """``--runner``/``--convert`` for this model (ModelConfig), then the scheduler's batch check: a
    runner without chunked prefill must fit a whole prompt in one batch (SchedulerConfig)."""
    try:
        runner = runners.resolve(config, args.runner, args.convert)
    except runners.RunnerError as exc:
        raise value_error("ModelConfig", str(exc)) from exc
    max_len = derived if args.max_model_len in (None, -1) else args.max_model_len
    batched = args.max_num_batched_tokens
    if not runner.chunked_prefill and batched is not None and batched < max_len:
        raise value_error(
            "SchedulerConfig",
            f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_len}). This effectively "
            "limits the maximum sequence length to max_num_batched_tokens and makes vLLM reject longer sequences. "
            "Please increase max_num_batched_tokens or decrease max_model_len.",
        )
    return runner


def check_max_model_len(args: argparse.Namespace, derived: int, key: str = "max_position_embeddings") -> None:
    max_len = args.max_model_len
    if max_len is not None and max_len != -1 and max_len > derived:
        raise ConfigError(
            f"ValueError: User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
            f"({key}={derived} or model_max_length=None in model's config.json). To allow "
            "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN "
            "must be used with extreme caution."
        )


def select_gpus(args: argparse.Namespace, scenario: dict, visible: str | None) -> list[int]:
    """Physical GPU indices this launch uses: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), then
    ``--device-ids`` (indices into the visible list, or UUIDs), then the first TP×PP of them."""
    gpus = scenario["gpus"]
    by_uuid = {str(g.get("uuid", "")).lower(): i for i, g in enumerate(gpus)}

    def physical(token: str, pool: list[int]) -> int | None:
        token = token.strip()
        if token.lower() in by_uuid:
            return by_uuid[token.lower()]
        if token.lstrip("-").isdigit():
            i = int(token)
            return pool[i] if 0 <= i < len(pool) else None
        return None

    everything = list(range(len(gpus)))
    pool = everything
    if visible is not None:
        pool = []
        for token in visible.split(","):  # CUDA stops at the first invalid entry
            index = physical(token, everything)
            if index is None:
                break
            pool.append(index)
    if args.device_ids:
        pool = [i for i in (physical(t, pool) for t in args.device_ids.split(",")) if i is not None]
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    if len(pool) < world:
        raise ConfigError(
            f"ValueError: World size ({world}) is larger than the number of available GPUs ({len(pool)}) in this node."
        )
    return pool[:world]


def compilation(args: argparse.Namespace) -> tuple[bool, bool]:
    """(torch.compile runs, CUDA graphs are captured) from -O, -cc and --enforce-eager."""
    cc: dict = {}
    if args.compilation_config:
        with contextlib.suppress(ValueError, TypeError):
            cc = dict(json.loads(args.compilation_config))
    mode = str(cc.get("mode", "")).upper()
    graph_mode = str(cc.get("cudagraph_mode", "")).upper()
    compiles = not args.enforce_eager and args.optimization_level != 0 and mode not in ("NONE", "0")
    graphs = not args.enforce_eager and args.optimization_level != 0 and graph_mode != "NONE"
    return compiles, graphs


def prepare(
    args: argparse.Namespace, scenario: dict, visible: str | None = None, platform: str = "cuda"
) -> Prepared:
    """Validated flags + scenario → the engine's inputs. Raises :class:`ConfigError` as vLLM would."""
    validate(args)
    model_name = args.model or args.model_tag
    if not model_name:
        raise ConfigError("ValueError: No model specified: pass it as `vllm serve MODEL` or with --model.")
    found = find_model(model_name)
    if found is None:
        raise ConfigError(
            f"OSError: {model_name} is not a local folder and is not a valid model identifier listed "
            "on 'https://huggingface.co/models'"
        )
    config, weights = found
    config = hfconfig.with_overrides(config, args.hf_overrides)
    try:
        derived, key = hfconfig.derived_max_len(config)
    except KeyError as exc:
        raise ConfigError(f"KeyError: {exc}") from None
    model = dataclasses.replace(groundtruth.model_truth(model_name, config, weights), derived_max_len=derived)
    check_max_model_len(args, derived, key)
    runner = resolve_runner(args, config, derived)
    gpus = select_gpus(args, scenario, visible)
    entry = scenario_model_entry(scenario, model_name)
    truth = {**scenario.get("truth", {}), **{k: v for k, v in entry.items() if k != "faults"}}
    faults = {**scenario.get("faults", {}), **entry.get("faults", {})}
    timing = {**groundtruth.DEFAULT_TIMING, **scenario.get("timing", {})}
    compiles, graphs = compilation(args)
    launch = LaunchArgs(
        tp=args.tensor_parallel_size,
        pp=args.pipeline_parallel_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        cpu_offload_gb=args.cpu_offload_gb,
        block_size=args.block_size,
        cudagraphs=graphs,
        platform=platform,
        max_cudagraph_capture_size=args.max_cudagraph_capture_size,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        performance_mode=args.performance_mode,
        runner=runner,
        expert_parallel=args.enable_expert_parallel,
    )
    served = (args.served_model_name or [model_name])[0]
    return Prepared(model, launch, gpus, truth, faults, timing, served, compiles, steptime.model_cost(config))


def foreign_bytes(scenario: dict, gpu: int) -> int:
    return sum(int(p["bytes"]) for p in scenario.get("foreign", []) if int(p["gpu"]) == gpu)


def step_model(prepared: Prepared, boot: groundtruth.Boot, gpu_name: str) -> steptime.StepModel:
    """How long a step of this launch takes on its GPUs, with the scenario's hidden efficiencies."""
    return steptime.step_model(
        prepared.cost,
        steptime.hardware_of(gpu_name, steptime.load_gpu_specs()),
        prepared.truth,
        weights_bytes=boot.weights_bytes,
        kv_bytes_per_token=boot.kv_bytes_per_token,
        tp=prepared.launch.tp,
        pp=prepared.launch.pp,
    )


def scheduler(prepared: Prepared, boot: groundtruth.Boot, gpu_name: str) -> Scheduler:
    """The scheduler a launch serves with: its pool, its batch limits, its step model."""
    return Scheduler(
        num_blocks=boot.num_blocks,
        block_size=boot.block_size,
        max_num_seqs=boot.max_num_seqs,
        max_num_batched_tokens=boot.max_num_batched_tokens,
        step_time=step_model(prepared, boot, gpu_name).seconds,
        chunked_prefill=prepared.launch.runner.chunked_prefill,
        keeps_kv_cache=bool(boot.kv_bytes_per_token),
    )


def _prepare(scenario: dict, serve_args: list[str], gpu_ids: list[int]) -> tuple[dict, Prepared | None]:
    """The resolved scenario and the launch's inputs; None for a launch vLLM refuses."""
    from .activate import resolve  # local: activate imports the tuner's error tree

    if scenario.get("gpus") and "total_bytes" not in scenario["gpus"][0]:
        scenario = resolve(scenario)
    argv = list(serve_args)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parse(argv)
        return scenario, prepare(args, scenario, ",".join(str(i) for i in gpu_ids))
    except (SystemExit, ConfigError):
        return scenario, None


def load(
    scenario: dict,
    serve_args: list[str],
    gpu_ids: list[int],
    *,
    clients: int,
    requests: list[tuple[int, int]],
    seconds: float = 120.0,
    warmup: float = 20.0,
) -> LoadResult | None:
    """The oracle of serving: ``clients`` closed-loop clients sending ``requests`` (``(prompt, output)``
    tokens, in turn) to ``vllm serve <serve_args>`` for ``seconds`` simulated seconds, with the engine's
    own scheduler and step model (no server, no sleeping). None when the launch does not boot."""
    scenario, prepared = _prepare(scenario, serve_args, gpu_ids)
    if prepared is None or prepared.faults.get("hang"):
        return None
    gpu = scenario["gpus"][prepared.gpus[0]]
    others = max(foreign_bytes(scenario, g) for g in prepared.gpus)
    boot = groundtruth.boot(
        prepared.model,
        prepared.launch,
        total_bytes=int(gpu["total_bytes"]),
        others_bytes=others,
        gpu_name=str(gpu["name"]),
        truth=prepared.truth,
    )
    if boot.category != "success":
        return None
    sched = scheduler(prepared, boot, str(gpu["name"]))
    return closed_loop(sched, clients, requests, seconds=seconds, warmup=warmup)


def truth(scenario: dict, serve_args: list[str], gpu_ids: list[int]) -> Truth:
    """The oracle: what ``vllm serve <serve_args>`` does on ``gpu_ids`` of this scenario, and whether it
    survives its worst case (``max_num_seqs`` sequences of ``max_model_len`` tokens at once).

    ``scenario`` is a resolved scenario (``activate.create(...).scenario``) or the raw YAML mapping;
    ``serve_args`` may start with ``serve``; ``gpu_ids`` play the part of ``CUDA_VISIBLE_DEVICES``.
    Memory held by other simulated servers is not counted, only the scenario's foreign processes.
    Faults that fire once (a co-tenant releasing memory during profiling) are taken as already past."""
    scenario, prepared = _prepare(scenario, serve_args, gpu_ids)
    if prepared is None:
        return Truth(False, CONFIG_ERROR, 0, 0.0, 0, False, 0)
    if prepared.faults.get("hang"):
        return Truth(False, "startup_timeout", 0, 0.0, 0, False, 0)
    gpu = scenario["gpus"][prepared.gpus[0]]
    others = max(foreign_bytes(scenario, g) for g in prepared.gpus)
    return groundtruth.truth(
        prepared.model,
        prepared.launch,
        total_bytes=int(gpu["total_bytes"]),
        others_bytes=others,
        gpu_name=str(gpu["name"]),
        truth_overrides=prepared.truth,
    )
