"""``python -m vllm_tuner.simlite`` / ``vllm-tune-sim``: behaves like vLLM 0.33's ``vllm`` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from http.server import ThreadingHTTPServer

from . import engine, state
from .engine import GIB, LaunchArgs
from .server import (
    PID,
    VERSION,
    Engine,
    api,
    build_parser,
    config_file_args,
    core,
    find_model,
    log,
    make_handler,
    nap,
    normalise_argv,
    scenario_model_entry,
)

TRACE = "/usr/local/lib/python3.12/dist-packages/vllm"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...")
        return 0
    if argv[0] in ("-v", "--version"):
        print(VERSION)
        return 0
    if argv[0] != "serve":
        print(f"vllm: error: argument subparser: invalid choice: '{argv[0]}'", file=sys.stderr)
        return 2
    rest = normalise_argv(argv[1:])
    parser = build_parser()
    if any(a == "-h" or a.startswith("--help") for a in rest):
        parser.print_help()
        return 0
    if "--config" in rest:
        i = rest.index("--config")
        rest = config_file_args(rest[i + 1]) + rest[:i] + rest[i + 2 :]
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # exit 2, like argparse in vLLM
    return serve(args)


def fail(lines: list[str], exc: str, where: str = "core.py:1584") -> int:
    core("EngineCore failed to start.", where, "ERROR")
    core("Traceback (most recent call last):", where, "ERROR")
    for line in lines:
        core(line, where, "ERROR")
    core(exc, where, "ERROR")
    log(
        "APIServer",
        "ERROR",
        "launcher.py:90",
        "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
    )
    print(
        f"(APIServer pid={PID}) RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {'EngineCore': 1}",
        flush=True,
    )
    return 1


def config_error(message: str) -> int:
    print(f"(APIServer pid={PID}) Traceback (most recent call last):", flush=True)
    print(f"(APIServer pid={PID}) {message}", flush=True)
    return 1


def serve(args) -> int:
    model = args.model or args.model_tag
    if not model:
        return config_error("ValueError: No model specified: pass it as `vllm serve MODEL` or with --model.")
    util = args.gpu_memory_utilization
    if not 0 < util <= 1:
        bound, kind = (
            ("greater than 0", "greater_than")
            if util <= 0
            else ("less than or equal to 1", "less_than_equal")
        )
        return config_error(
            f"pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig\n"
            f"gpu_memory_utilization\n  Input should be {bound} [type={kind}, input_value={util}, "
            "input_type=float]"
        )
    folder = state.state_dir()
    if folder is None or not (folder / "scenario.json").is_file():
        return config_error("RuntimeError: Failed to infer device type (no NVIDIA driver found)")
    scenario = state.load_scenario(folder)
    found = find_model(model)
    if found is None:
        return config_error(
            f"OSError: {model} is not a local folder and is not a valid model identifier listed "
            "on 'https://huggingface.co/models'"
        )
    config, weights = found
    truth_model = engine.model_truth(model, config, weights)
    derived = truth_model.derived_max_len
    max_len = args.max_model_len
    if max_len is not None and max_len > derived and max_len != -1:
        return config_error(
            f"ValueError: User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
            f"(max_position_embeddings={derived} or model_max_length=None in model's config.json). To allow "
            "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN "
            "must be used with extreme caution."
        )
    if max_len == -1:
        max_len = None  # auto-fit: treated as the derived maximum here
    if (
        args.max_num_batched_tokens is not None
        and args.max_num_seqs is not None
        and args.max_num_batched_tokens < args.max_num_seqs
    ):
        return config_error(
            f"ValueError: max_num_batched_tokens ({args.max_num_batched_tokens}) must be greater "
            f"than or equal to max_num_seqs ({args.max_num_seqs})."
        )
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    all_ids = list(range(len(scenario["gpus"])))
    gpus = [int(x) for x in visible.split(",") if x.strip()] if visible else all_ids
    gpus = [g for g in gpus if g in all_ids]
    if len(gpus) < world:
        return config_error(
            f"ValueError: World size ({world}) is larger than the number of available GPUs "
            f"({len(gpus)}) in this node."
        )
    gpus = gpus[:world]
    served = (args.served_model_name or [model])[0]
    non_default = {"model_tag": model, "model": model}
    for key in (
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "kv_cache_dtype",
        "enforce_eager",
        "cpu_offload_gb",
        "kv_cache_memory_bytes",
        "load_format",
    ):
        value = getattr(args, key)
        if value not in (None, False, 0, 0.0, 1, "auto") or (key == "max_model_len" and value):
            non_default[key] = value
    non_default["gpu_memory_utilization"] = util
    api(f"vLLM server version {VERSION}, serving model {model}", "startup.py:88")
    api(f"non-default args: {non_default}", "utils.py:301")
    return walk(args, scenario, folder, truth_model, gpus, served, max_len or derived)


def walk(
    args, scenario: dict, folder, model: engine.ModelTruth, gpus: list[int], served: str, max_len: int
) -> int:
    timing = {**engine.DEFAULT_TIMING, **scenario.get("timing", {})}
    entry = scenario_model_entry(scenario, model.name)
    truth = {**scenario.get("truth", {}), **{k: v for k, v in entry.items() if k != "faults"}}
    faults = {**scenario.get("faults", {}), **entry.get("faults", {})}
    gpu = scenario["gpus"][gpus[0]]
    others = max(state.others_bytes(folder, scenario, g, exclude_pid=PID) for g in gpus)
    launch = LaunchArgs(
        tp=args.tensor_parallel_size,
        pp=args.pipeline_parallel_size,
        max_model_len=max_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        cpu_offload_gb=args.cpu_offload_gb,
        block_size=args.block_size,
    )
    b = engine.boot(
        model, launch, total_bytes=gpu["total_bytes"], others_bytes=others, gpu_name=gpu["name"], truth=truth
    )

    def hold(nbytes: int) -> None:
        state.write_proc(folder, PID, {g: nbytes for g in gpus}, "vllm serve")

    def on_term(_sig, _frame) -> None:
        state.remove_proc(folder, PID)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    api(f"Using max model len {b.max_model_len}", "model.py:2170")
    core(
        f"Initializing a V1 LLM engine (v{VERSION}) with config: model='{model.name}', "
        f"max_seq_len={b.max_model_len}, tensor_parallel_size={launch.tp}, enforce_eager={launch.enforce_eager}"
    )
    hold(b.context_bytes)
    nap(1.0)
    total_gib, free_gib = b.total_bytes / GIB, b.free_at_start / GIB
    if b.category == "startup_free_memory_below_utilization":
        return fail(
            [
                f'  File "{TRACE}/v1/worker/gpu_worker.py", line 268, in init_device',
                f'  File "{TRACE}/v1/worker/utils.py", line 763, in request_memory',
            ],
            f"ValueError: Free memory on device cuda:0 ({free_gib:.2f}/{total_gib:.2f} GiB) on startup is less "
            f"than desired GPU memory utilization ({launch.gpu_memory_utilization}, {b.requested_bytes / GIB:.2f}"
            " GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
        )
    core("Using V2 Model Runner", "gpu_worker.py:240")
    core(f"Starting to load model {model.name}...", "model_runner.py:402")
    load_s = 2.0 if args.load_format == "dummy" else timing["load_s"]
    if faults.get("slow_start_s"):
        load_s += float(faults["slow_start_s"])
    shards = 4
    for done in range(1, shards + 1):  # vLLM's tqdm bar: the log keeps moving during a slow load
        nap(load_s / shards)
        pct = done * 100 // shards
        print(
            f"(EngineCore pid={PID}) Loading safetensors checkpoint shards: {pct:3d}% Completed | "
            f"{done}/{shards} [00:{int(load_s * done / shards) % 60:02d}<00:00, 1.00s/it]",
            flush=True,
        )
    if b.category == "oom_weights_load":
        d = b.fail_detail
        return fail(
            [
                f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 425, in load_model',
                f'  File "{TRACE}/model_executor/model_loader/base_loader.py", line 49, in load_model',
                f'  File "{TRACE}/model_executor/layers/linear.py", line 312, in create_weights',
            ],
            f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {d['tried'] / (1 << 20):.2f} MiB. "
            f"GPU 0 has a total capacity of {total_gib:.2f} GiB of which {d['free'] / (1 << 20):.2f} MiB is free.",
        )
    hold(b.context_bytes + b.weights_bytes)
    core(f"Loading weights took {load_s * 0.8:.2f} seconds", "default_loader.py:262")
    core(
        f"Model loading took {b.weights_bytes / GIB:.4f} GiB memory and {load_s:.6f} seconds",
        "model_runner.py:429",
    )
    if faults.get("hang"):
        core("Waiting for the compile workers...", "backends.py:900")
        while True:
            nap(3600)
    if not launch.enforce_eager:
        key = hashlib.sha256(
            json.dumps([model.name, b.max_model_len, b.max_num_seqs, b.max_num_batched_tokens]).encode()
        ).hexdigest()[:12]
        marker = folder / "compile" / key
        if marker.exists():
            nap(timing["compile_cached_s"])
            core(
                f"Directly load the compiled graph(s) for compile range (1, {b.max_num_batched_tokens}) from the "
                "cache, took 1.20 s",
                "backends.py:262",
            )
            took = timing["compile_cached_s"]
        else:
            nap(timing["compile_s"] * 0.3)
            core(f"Dynamo bytecode transform time: {timing['compile_s'] * 0.3:.2f} s", "backends.py:1188")
            nap(timing["compile_s"] * 0.7)
            core(
                f"Compiling a graph for compile range (1, {b.max_num_batched_tokens}) takes "
                f"{timing['compile_s'] * 0.6:.2f} s",
                "backends.py:302",
            )
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            took = timing["compile_s"]
        core(f"torch.compile took {took:.2f} s in total", "monitor.py:34")
    nap(timing["profile_s"])
    if b.category == "oom_during_profiling":
        d = b.fail_detail
        return fail(
            [
                f'  File "{TRACE}/v1/worker/gpu_worker.py", line 641, in determine_available_memory',
                f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1320, in profile_run',
                f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1290, in _dummy_run',
            ],
            f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {d['tried'] / GIB:.2f} GiB. "
            f"GPU 0 has a total capacity of {total_gib:.2f} GiB of which {d['free'] / (1 << 20):.2f} MiB is free.",
        )
    hold(b.context_bytes + b.weights_bytes + b.non_torch_bytes + b.activation_bytes)
    pool_gib = b.pool_bytes / GIB
    core(f"Available KV cache memory: {pool_gib:.2f} GiB", "gpu_worker.py:773")
    if b.graph_estimate_bytes:
        delta = b.graph_estimate_bytes / b.total_bytes
        u = launch.gpu_memory_utilization
        core(
            f"CUDA graph memory profiling is enabled (default since v0.21.0). The current --gpu-memory-utilization="
            f"{u:.4f} is equivalent to --gpu-memory-utilization={u - delta:.4f} without CUDA graph memory profiling. "
            f"To maintain the same effective KV cache size as before, increase --gpu-memory-utilization to "
            f"{u + delta:.4f}. To disable, set VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0.",
            "gpu_worker.py:790",
        )
    if b.category == "no_kv_cache_memory":
        return fail(
            [
                f'  File "{TRACE}/v1/engine/core.py", line 402, in _initialize_kv_caches',
                f'  File "{TRACE}/v1/core/kv_cache_planning.py", line 688, in _check_enough_kv_cache_memory',
            ],
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
            "when initializing the engine (this flag also controls CPU memory reservation on the CPU backend, "
            "despite its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more "
            "details.",
        )
    if b.category == "kv_cache_insufficient_for_max_len":
        needed = math_ceil_div(b.max_model_len, b.block_size) * b.block_size * b.kv_bytes_per_token / GIB
        return fail(
            [
                f'  File "{TRACE}/v1/engine/core.py", line 402, in _initialize_kv_caches',
                f'  File "{TRACE}/v1/core/kv_cache_planning.py", line 701, in _check_enough_kv_cache_memory',
            ],
            f"ValueError: To serve at least one request with the model's max seq len ({b.max_model_len}), "
            f"({needed:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({pool_gib:.2f} GiB). Based on the available memory, the estimated maximum model length is "
            f"{b.estimated_max_len}. Try increasing `gpu_memory_utilization` (which also controls CPU memory "
            "on the CPU backend) or decreasing `max_model_len` when initializing the engine. See "
            "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        )
    core(
        f"GPU KV cache size: {b.kv_tokens:,} tokens, Maximum concurrency for {b.max_model_len:,} tokens per "
        f"request: {b.max_concurrency:.2f}x",
        "kv_cache_utils.py:1148",
    )
    hold(b.context_bytes + b.weights_bytes + b.non_torch_bytes + b.activation_bytes + b.pool_bytes)
    if not launch.enforce_eager:
        core(f"Compile and warming up model for size {min(512, b.max_num_seqs * 2)}", "gpu_worker.py:955")
        nap(timing["capture_s"])
        if b.category == "oom_cudagraph_capture":
            return fail(
                [
                    f'  File "{TRACE}/v1/worker/gpu_worker.py", line 940, in compile_or_warm_up_model',
                    "    cuda_graph_memory_bytes = self.model_runner.capture_model()",
                    f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1150, in capture_model',
                    f'  File "{TRACE}/v1/worker/gpu/cudagraph_utils.py", line 210, in capture_graph',
                    "    with torch.cuda.graph(graph, pool=pool):",
                ],
                f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                f"capacity of {total_gib:.2f} GiB of which 11.38 MiB is free.",
            )
        actual, est = b.graph_actual_bytes / GIB, b.graph_estimate_bytes / GIB
        core(
            f"Graph capturing finished in {timing['capture_s']:.0f} secs, took {actual:.2f} GiB",
            "model_runner.py:1164",
        )
        core(
            f"CUDA graph pool memory: {actual:.2f} GiB (actual), {est:.2f} GiB (estimated), difference: "
            f"{actual - est:.2f} GiB ({(actual - est) / max(est, 1e-9) * 100:.1f}%).",
            "gpu_worker.py:951",
        )
    hold(b.idle_used_bytes)
    if launch.kv_cache_memory_bytes is None:
        consumed = b.weights_bytes + b.non_torch_bytes
        non_kv = consumed + b.activation_bytes + b.graph_actual_bytes
        fit = b.requested_bytes - non_kv - engine.REDUNDANCY
        full = b.free_at_start - non_kv - engine.REDUNDANCY
        core(
            f"Free memory on device ({free_gib:.2f}/{total_gib:.2f} GiB) on startup. Desired GPU memory utilization "
            f"is ({launch.gpu_memory_utilization}, {b.requested_bytes / GIB:.2f} GiB). Actual usage is "
            f"{consumed / GIB:.2f} GiB for consumed memory (weights + non-torch), {b.activation_bytes / GIB:.2f} GiB "
            f"for peak activation, and {b.graph_actual_bytes / GIB:.2f} GiB for CUDAGraph memory. Replace "
            f"gpu_memory_utilization config with `--kv-cache-memory={fit}` ({fit / GIB:.2f} GiB) to fit into "
            f"requested memory, or `--kv-cache-memory={full}` ({full / GIB:.2f} GiB) to fully utilize gpu memory. "
            f"Current kv cache memory in use is {b.pool_bytes / GIB:.2f} GiB.",
            "gpu_worker.py:1004",
        )
    init_s = timing["load_s"] + timing["profile_s"] + timing["capture_s"]
    core(f"init engine (profile, create kv cache, warmup model) took {init_s:.2f} s", "core.py:396")
    eng = Engine(b, timing, gpus, folder, model.name, launch.gpu_memory_utilization)
    handler = make_handler(eng, served, b.max_model_len, args.api_key)
    try:
        httpd = _Server(
            ("127.0.0.1" if args.host in ("0.0.0.0", "127.0.0.1") else args.host, args.port), handler
        )
    except OSError as exc:
        print(
            f"(APIServer pid={PID}) OSError: [Errno 98] error while attempting to bind on address "
            f"('{args.host}', {args.port}): {exc.strerror}",
            flush=True,
        )
        return 1
    httpd.daemon_threads = True
    api("Supported tasks: ['generate']", "api_server.py:1680")
    api(f"Starting vLLM server on http://{args.host}:{args.port}", "entry.py:139")
    print(f"(APIServer pid={PID}) INFO:     Started server process [{PID}]", flush=True)
    print(f"(APIServer pid={PID}) INFO:     Waiting for application startup.", flush=True)
    print(f"(APIServer pid={PID}) INFO:     Application startup complete.", flush=True)
    threading.Thread(target=eng.loop, daemon=True).start()
    try:
        httpd.serve_forever(poll_interval=0.05)
    finally:
        state.remove_proc(folder, PID)
    return 0


class _Server(ThreadingHTTPServer):
    request_queue_size = 2048  # uvicorn's backlog under vLLM; the stdlib default of 5 resets bursts
    daemon_threads = True


def math_ceil_div(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    sys.exit(main())
