"""The simulated ``vllm``'s parts: log lines, argument parsing, the running engine, the HTTP API and load.

Logs use vLLM 0.33's format and messages (see shared/research/vllm-internals.md §3–§5); times are
slept divided by ``$VLLM_TUNE_SIM_TIME_SCALE`` but logged at their realistic values.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import yaml

from ..paths import profiles_dir
from . import groundtruth, pooling, state
from .groundtruth import GIB, MIB
from .hfconfig import dict_or_str
from .runner import CONVERTS, RUNNERS, Runner
from .scheduler import Scheduler, Seq, Step

VERSION = "0.33.0"
TRACE = "/usr/local/lib/python3.12/dist-packages/vllm"
KV_DTYPES = [
    "auto",
    "float16",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
    "nvfp4_ds_mla",
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
    "octave_k3v4",
    "octave_k3v3",
    "octave_k3v3_compact",
    "ultraquant_4bit",
    "int4_per_token_head",
    "int8_per_token_head",
    "fp8_per_token_head",
    "nvfp4",
    "nvfp4_4over6",
]
PID = os.getpid()


# -- logging ------------------------------------------------------------------------------------
def log(proc: str, level: str, where: str, message: str) -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    for line in message.splitlines() or [""]:
        print(f"({proc} pid={PID}) {level} {stamp} [{where}] {line}", flush=True)


def api(message: str, where: str = "api_server.py:1") -> None:
    log("APIServer", "INFO", where, message)


def core(message: str, where: str = "core.py:140", level: str = "INFO") -> None:
    log("EngineCore", level, where, message)


def scale() -> float:
    try:
        return max(1e-3, float(os.environ.get(state.SCALE_ENV, "1")))
    except ValueError:
        return 1.0


def nap(seconds: float) -> None:
    time.sleep(max(0.0, seconds) / scale())


def size_text(nbytes: int) -> str:
    """PyTorch's format_size: B, KiB, MiB or GiB with two decimals."""
    for unit, scale_ in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if nbytes >= scale_:
            return f"{nbytes / scale_:.2f} {unit}"
    return f"{nbytes} bytes"


def torch_oom(tried: int, total: int, free: int, in_use: int, allocated: int) -> str:
    """The text of PyTorch's ``torch.OutOfMemoryError`` as vLLM's logs show it."""
    reserved = max(0, in_use - allocated) % (256 * MIB)
    return (
        f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {size_text(tried)}. GPU 0 has a total "
        f"capacity of {total / GIB:.2f} GiB of which {size_text(free)} is free. Including non-PyTorch memory, this "
        f"process has {in_use / GIB:.2f} GiB memory in use. Of the allocated memory {allocated / GIB:.2f} GiB is "
        f"allocated by PyTorch, and {size_text(reserved)} is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting PYTORCH_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-alloc-conf)"
    )


# -- arguments ----------------------------------------------------------------------------------
def human_int(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid human-readable integer: {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    mult = {
        "": 1,
        "k": 1000,
        "K": 1024,
        "m": 10**6,
        "M": 1 << 20,
        "g": 10**9,
        "G": 1 << 30,
        "t": 10**12,
        "T": 1 << 40,
    }
    return int(value * mult[unit])


def len_or_auto(text: str) -> int:
    return -1 if text in ("auto", "-1") else human_int(text)


class EnableDisable(argparse.Action):
    """vLLM's EnableDisableAction: ``--X`` / ``--no-X``, and ``--disable-Y`` for every ``--enable-Y``."""

    def __init__(self, option_strings, dest, default=None, **kwargs) -> None:
        names = list(option_strings)
        for name in option_strings:
            if name.startswith("--"):
                names.append("--no-" + name[2:])
                if name.startswith("--enable-"):
                    names.append("--disable-" + name[len("--enable-") :])
        super().__init__(names, dest, nargs=0, default=default, **kwargs)
        self.on = set(option_strings)  # the flag and its short form (-ep)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, option_string in self.on)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", description="Start the vLLM OpenAI compatible API server.")

    def flag(name: str, default: bool | None = False, help: str | None = None) -> None:
        p.add_argument(name, action=EnableDisable, default=default, help=help)

    p.add_argument("model_tag", nargs="?", default=None, help="The model tag to serve.")
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None, help="Read CLI options from a config file (YAML).")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", "-ep", action=EnableDisable, default=False)
    p.add_argument("--device-ids", default=None, help="Comma-separated physical GPU device IDs or UUIDs.")
    p.add_argument(
        "--max-model-len", type=len_or_auto, default=None, help="Model context length; -1/auto fits it."
    )
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=human_int, default=None)
    p.add_argument("--max-num-active-seqs", type=int, default=None)
    p.add_argument("--max-num-queued-reqs", type=int, default=None)
    p.add_argument("--max-num-queued-tokens", type=human_int, default=None)
    p.add_argument("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.92)
    p.add_argument("--kv-cache-memory-bytes", type=human_int, default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help=f"Data type for kv cache storage: {KV_DTYPES}")
    flag("--enforce-eager")
    p.add_argument("--cpu-offload-gb", type=float, default=0.0)
    p.add_argument("--cpu-offload-params", nargs="+", default=None)
    p.add_argument("--offload-backend", choices=["auto", "uva", "prefetch"], default="auto")
    p.add_argument("--kv-offloading-size", type=float, default=None)
    p.add_argument("--kv-offloading-backend", choices=["native", "lmcache"], default="native")
    p.add_argument("--block-size", type=int, default=None)
    flag("--enable-prefix-caching", None)
    p.add_argument("--prefix-caching-hash-algo", default="sha256")
    flag("--enable-chunked-prefill", None)
    flag("--disable-hybrid-kv-cache-manager", None)
    p.add_argument("--mamba-cache-dtype", default="auto")
    p.add_argument("--mamba-ssm-cache-dtype", default="auto")
    p.add_argument("--runner", choices=RUNNERS, default="auto", help="The type of model runner to use.")
    p.add_argument("--convert", choices=CONVERTS, default="auto", help="Adapt the model to a pooling task.")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", "-q", default=None)
    flag("--trust-remote-code")
    flag("--skip-tokenizer-init")
    p.add_argument("--optimization-level", "-O", type=int, default=2)
    p.add_argument("--max-cudagraph-capture-size", type=int, default=None)
    p.add_argument("--cudagraph-capture-sizes", type=int, nargs="+", default=None)
    p.add_argument("--compilation-config", "-cc", default=None)
    flag("--disable-log-stats")
    flag("--enable-log-requests")
    flag("--enable-sleep-mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download-dir", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--tool-call-parser", default=None)
    flag("--enable-auto-tool-choice")
    p.add_argument("--reasoning-parser", default=None)
    p.add_argument("--generation-config", default="auto")
    p.add_argument("--kv-transfer-config", default=None)
    p.add_argument(
        "--hf-overrides", type=dict_or_str, default=None, help="JSON: arguments for the HF config."
    )
    p.add_argument("--profiler-config", default=None)
    p.add_argument(
        "--performance-mode", choices=["balanced", "interactivity", "throughput"], default="balanced"
    )
    return p


def normalise_argv(argv: list[str]) -> list[str]:
    """``--a_b`` → ``--a-b``; ``-cc.key=value`` / ``--compilation-config.key=value`` merged into one
    ``--compilation-config`` JSON, as vLLM's FlexibleArgumentParser does."""
    out: list[str] = []
    dotted: dict[str, object] = {}
    for word in argv:
        m = re.fullmatch(r"(?:-cc|--compilation[-_]config)\.([\w.]+)=(.*)", word)
        if m:
            value: object = m.group(2)
            with contextlib.suppress(ValueError):
                value = json.loads(m.group(2))
            dotted[m.group(1)] = value
            continue
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            word = name.replace("_", "-") + eq + value
        out.append(word)
    if dotted:
        out += ["--compilation-config", json.dumps(dotted)]
    return out


def config_file_args(path: str) -> list[str]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    args: list[str] = []
    for key, value in data.items():
        if key == "model":
            args.insert(0, str(value))
        elif value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


# -- model lookup (the simulator's own, not the tuner's) ------------------------------------------
def find_model(name: str) -> tuple[dict, int | None] | None:
    folder = Path(name)
    if (folder / "config.json").is_file():
        index = folder / "model.safetensors.index.json"
        size = None
        if index.is_file():
            size = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        return json.loads((folder / "config.json").read_text()), size
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    snaps = sorted((hub / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    if snaps:
        return json.loads(snaps[-1].read_text()), None
    for path in sorted((profiles_dir() / "models").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        names = {str(data.get("name", "")).lower(), str(data.get("hf_id", "")).lower()}
        names |= {str(a).lower() for a in data.get("aliases", []) or []}
        if name.lower() in names and isinstance(data.get("config"), dict):
            return data["config"], data.get("weights_bytes")
    return None


def model_names(name: str) -> set[str]:
    """Every name a model goes by (short name, HF id, aliases), lower-case, from the bundled profiles."""
    names = {name.lower()}
    for path in sorted((profiles_dir() / "models").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        known = {str(data.get("name", "")).lower(), str(data.get("hf_id", "")).lower()}
        known |= {str(a).lower() for a in data.get("aliases", []) or []}
        if name.lower() in known:
            return names | (known - {""})
    return names


def scenario_model_entry(scenario: dict, name: str) -> dict:
    """The scenario's ``models:`` entry for this model, whichever of its names either side uses."""
    entries = scenario.get("models", {}) or {}
    if name in entries:
        return entries[name]
    names = model_names(name)
    for key, value in entries.items():
        if key.lower() in names:
            return value
    return {}


# -- the server's state -------------------------------------------------------------------------
@dataclass
class PendingCompletion:
    """One HTTP request: the scheduler's sequence and what its handler waits on."""

    prompt_len: int
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    failed: str = ""
    seq: Seq = field(init=False)

    def __post_init__(self) -> None:
        self.seq = Seq(self.prompt_len, self.max_tokens)


def sim_now() -> float:
    """Simulated seconds: the wall clock times the time scale."""
    return time.monotonic() * scale()


class Engine:
    """The engine core's busy loop around the scheduler: each step sleeps its simulated duration, then
    hands its tokens to the waiting handlers (streamed per step, as vLLM's output processor does)."""

    def __init__(
        self,
        boot: groundtruth.Boot,
        scheduler: Scheduler,
        gpus: list[int],
        folder: Path,
        model_name: str,
        util: float,
        *,
        kv_cache_dtype: str = "auto",
        log_stats: bool = True,
        rank: str = "",
    ) -> None:
        self.boot = boot
        self.kv_cache_dtype = kv_cache_dtype
        self.log_stats = log_stats
        self.rank = rank  # "" (one GPU: the worker is the EngineCore) or "Worker_TP0"
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = {name: Histogram(bounds) for name, bounds in HISTOGRAMS.items()}
        self.gpus = gpus
        self.folder = folder
        self.model_name = model_name
        self.util = util
        self.lock = threading.Condition()
        self.scheduler = scheduler  # the launch's pool, batch limits and step model (oracle.scheduler)
        self.requests: dict[Seq, PendingCompletion] = {}
        self.dead = False
        self.kv_usage = 0.0
        self.peak_usage = 0.0  # PyTorch's caching allocator keeps what it reserved: NVML sees the peak
        self.finished = 0
        self.die_at = boot.dies_at_usage()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    def submit(self, req: PendingCompletion) -> None:
        with self.lock:
            req.seq.arrived = sim_now()
            self.requests[req.seq] = req
            self.scheduler.add(req.seq)
            self.lock.notify_all()

    def loop(self) -> None:
        last_mem = 0.0
        while True:
            with self.lock:
                if self.dead:
                    return
                started = time.monotonic()
                step = self.scheduler.step(started * scale())
                if step is None:
                    self.lock.wait(0.05)  # idle until a request arrives
                self.kv_usage = self.scheduler.kv_usage
                risen = self.kv_usage > self.peak_usage
                self.peak_usage = max(self.peak_usage, self.kv_usage)
            # NVML sees an allocation at once: a new peak is written now, not at the next refresh
            if risen or time.monotonic() - last_mem > 0.05:
                self._write_memory()
                last_mem = time.monotonic()
            if self.die_at is not None and self.kv_usage >= self.die_at:
                self._die()
                return
            if step is None:
                continue
            time.sleep(max(0.0, started + step.duration / scale() - time.monotonic()))
            with self.lock:
                self._publish(step)

    def _publish(self, step: Step) -> None:
        """The step's tokens reach their clients, finished requests their handlers; metrics as vLLM keeps them."""
        self.latency["vllm:iteration_tokens_total"].observe(step.scheduled_tokens)
        for seq in step.sampled:
            req = self.requests[seq]
            self.generation_tokens += 1
            if seq.generated == 1 and seq.last_token_at is not None:  # its first token, sampled this step
                self.prompt_tokens += seq.prompt_len
                self.latency["vllm:time_to_first_token_seconds"].observe(seq.last_token_at - seq.arrived)
            elif seq.token_gaps:
                self.latency["vllm:inter_token_latency_seconds"].observe(seq.token_gaps[-1])
            with req.cond:
                req.tokens.append(" tok")
                req.cond.notify_all()
        for seq in step.finished:
            req = self.requests.pop(seq)
            if not seq.max_tokens:  # a pooling request: its prompt is all it had
                self.prompt_tokens += seq.prompt_len
            self.finished += 1
            self.record(seq)
            req.done.set()
            with req.cond:
                req.cond.notify_all()

    def record(self, seq: Seq) -> None:
        """A finished request's histograms, in simulated seconds."""
        end = seq.finished_at if seq.finished_at is not None else sim_now()
        scheduled = seq.scheduled_at if seq.scheduled_at is not None else end
        first = seq.first_token_at if seq.first_token_at is not None else end
        observe = {
            "vllm:e2e_request_latency_seconds": end - seq.arrived,
            "vllm:request_queue_time_seconds": scheduled - seq.arrived,
            "vllm:request_inference_time_seconds": end - scheduled,
            "vllm:request_prefill_time_seconds": first - scheduled,
            "vllm:request_decode_time_seconds": end - first,
            "vllm:request_num_preemptions": seq.preemptions,
        }
        if seq.generated > 1:
            observe["vllm:request_time_per_output_token_seconds"] = (end - first) / (seq.generated - 1)
        for name, value in observe.items():
            self.latency[name].observe(max(0.0, value))

    def _write_memory(self) -> None:
        used = self.boot.used_under_load(self.peak_usage)
        state.write_proc(self.folder, PID, {g: used for g in self.gpus}, "vllm serve")

    def _die(self) -> None:
        """The runtime spike passed the card: vLLM's fatal-error chain, /health 503, then exit 1."""
        with self.lock:
            self.dead = True
        b = self.boot
        in_use = b.capacity_bytes - 150 * MIB
        state.write_proc(self.folder, PID, {g: in_use for g in self.gpus}, "vllm serve")
        oom = torch_oom(
            896 * MIB, b.total_bytes, 150 * MIB, in_use, in_use - b.non_torch_bytes - b.context_bytes
        )
        trace = [
            "Traceback (most recent call last):",
            f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1911, in execute_model',
            f'  File "{TRACE}/v1/worker/gpu/model_runner.py", line 1762, in _model_forward',
            oom,
        ]
        where = "core.py:1010"
        if self.rank:
            for line in ["WorkerProc hit an exception.", *trace]:
                log(self.rank, "ERROR", "multiproc_executor.py:949", line)
            core("EngineCore encountered a fatal error.", where, "ERROR")
            core("Traceback (most recent call last):", where, "ERROR")
            core(f'  File "{TRACE}/v1/engine/core.py", line 950, in run_busy_loop', where, "ERROR")
            core(
                f"RuntimeError: Worker failed with error '{oom.split(': ', 1)[1]}', please check the stack trace "
                "above for the root cause",
                where,
                "ERROR",
            )
        else:
            core("EngineCore encountered a fatal error.", where, "ERROR")
            core(trace[0], where, "ERROR")
            core(f'  File "{TRACE}/v1/engine/core.py", line 950, in run_busy_loop', where, "ERROR")
            for line in trace[1:]:
                core(line, where, "ERROR")
        log("APIServer", "ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.")
        print(
            f"(APIServer pid={PID}) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
            flush=True,
        )
        for req in list(self.requests.values()):
            req.failed = "engine dead"
            req.done.set()
            with req.cond:
                req.cond.notify_all()
        threading.Timer(0.5 / max(1.0, scale() / 20), lambda: os._exit(1)).start()


# vLLM's default bucket families (v1/metrics/buckets.py)
# fmt: off
REQUEST_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0)
ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# fmt: on
HISTOGRAMS = {
    "vllm:iteration_tokens_total": ITERATION_TOKENS,
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": ITL,
    "vllm:request_time_per_output_token_seconds": ITL,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_num_preemptions": (1, 2, 3, 4, 5, 10, 20),
}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one above every bound
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """One value (once per token for the inter-token latency: a bisection, not a scan)."""
        self.total += 1
        self.sum += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """Prometheus' cumulative buckets."""
        out = [f"# TYPE {name} histogram"]
        out += [
            f'{name}_bucket{{{labels},le="{float(b)}"}} {c}'
            for b, c in zip(self.bounds, itertools.accumulate(self.counts), strict=False)
        ]
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.total}']
        out += [f"{name}_count{{{labels}}} {self.total}", f"{name}_sum{{{labels}}} {self.sum:.6f}"]
        return out


# -- HTTP ---------------------------------------------------------------------------------------
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
SCORE_ROUTES = frozenset({"/score", "/v1/score"})
RERANK_ROUTES = frozenset({"/rerank", "/v1/rerank", "/v2/rerank"})


def post_routes(runner: Runner) -> frozenset[str]:
    """The POST routes vLLM registers for this runner's tasks (``register_api_routers``): a pooling
    server has no completion routes, and a generating one no pooling routes."""
    if not runner.pooling:
        return GENERATION_ROUTES
    routes = {"/v1/embeddings"} if runner.task == "embed" else set()
    if runner.scoring:
        routes |= SCORE_ROUTES | RERANK_ROUTES
    return frozenset(routes)


class EngineFailed(Exception):
    """The engine died while a request waited."""


def make_handler(
    eng: Engine, served: str, max_len: int, api_key: str | None, runner: Runner = groundtruth.GENERATE
):
    routes = post_routes(runner)

    def run_prompts(lengths: list[int]) -> None:
        """One engine request per prompt (prefill only), all at once; raises EngineFailed."""
        for n in lengths:
            if n > max_len:
                raise pooling.BadRequest(
                    f"This model's maximum context length is {max_len} tokens. However, your prompt contains {n} "
                    "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                    "length of the input prompt.",
                    "input_tokens",
                )
        reqs = [PendingCompletion(n, 0) for n in lengths]
        for req in reqs:
            eng.submit(req)
        for req in reqs:
            req.done.wait(3600)
            if req.failed:
                raise EngineFailed(req.failed)

    def usage(tokens: int) -> dict:
        return {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }

    def embeddings(body: dict) -> dict:
        items = pooling.embedding_inputs(body)
        size = pooling.embedding_size(body, runner.embedding_size, runner.matryoshka, served)
        encoding = str(body.get("encoding_format") or "float")
        lengths = [pooling.tokens_of(item) for item in items]
        run_prompts(lengths)
        data = []
        for i, item in enumerate(items):
            vector = pooling.embedding(item, runner.embedding_size)[:size]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vector = [v / norm for v in vector]
            data.append({"index": i, "object": "embedding", "embedding": pooling.encode(vector, encoding)})
        return {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": served,
            "data": data,
            "usage": usage(sum(lengths)),
        }

    def scores(pairs: list[tuple]) -> tuple[list[float], int]:
        """A bi-encoder embeds every text and compares; a cross-encoder reads each pair as one prompt."""
        if runner.task == "embed":
            lengths = [pooling.tokens_of(x) for pair in pairs for x in pair]
            run_prompts(lengths)
            size = runner.embedding_size
            values = [
                pooling.cosine(pooling.embedding(q, size), pooling.embedding(d, size)) for q, d in pairs
            ]
        else:
            lengths = [pooling.tokens_of(q) + pooling.tokens_of(d) for q, d in pairs]
            run_prompts(lengths)
            values = [pooling.relevance(q, d) for q, d in pairs]
        return values, sum(lengths)

    def score(body: dict) -> dict:
        values, tokens = scores(pooling.score_pairs(body))
        return {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": served,
            "data": [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)],
            "usage": usage(tokens),
        }

    def rerank(body: dict) -> dict:
        pairs = pooling.rerank_pairs(body)
        values, tokens = scores(pairs)
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": served,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": pooling.rerank_results(pairs, values, int(body.get("top_n") or 0)),
        }

    def pooled(path: str, body: dict) -> dict:
        if path == "/v1/embeddings":
            return embeddings(body)
        return score(body) if path in SCORE_ROUTES else rerank(body)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # TCP_NODELAY, as asyncio sets it for vLLM's server

        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: object, ctype: str = "application/json") -> None:
            data = (
                body
                if isinstance(body, bytes)
                else (json.dumps(body) if ctype == "application/json" else str(body)).encode()
            )
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if (
                api_key
                and self.path.startswith("/v1")
                and self.headers.get("Authorization") != f"Bearer {api_key}"
            ):
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path in ("/health", "/ping"):
                self._send(503 if eng.dead else 200, b"", "text/plain")
            elif path == "/version":
                self._send(200, {"version": VERSION})
            elif path == "/load":
                self._send(200, {"server_load": eng.num_running + eng.num_waiting})
            elif path == "/v1/models":
                if self._authorised():
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {
                                    "id": served,
                                    "object": "model",
                                    "owned_by": "vllm",
                                    "root": eng.model_name,
                                    "max_model_len": max_len,
                                }
                            ],
                        },
                    )
            elif path == "/metrics":
                self._send(200, metrics(eng, served), "text/plain; version=0.0.4")
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, error("Invalid JSON body", "body"))
                return
            if path == "/tokenize":
                from .tokenize import answer

                self._send(*answer(body, served, max_len))
                return
            if path == "/ping":
                self._send(503 if eng.dead else 200, b"", "text/plain")
                return
            if path not in routes:
                self._send(404, {"detail": "Not Found"})
                return
            if not self._authorised():
                return
            if eng.dead:
                self._send(500, error("The server had an error while processing your request.", None, 500))
                return
            if runner.pooling:
                try:
                    self._send(200, pooled(path, body))
                except pooling.BadRequest as exc:
                    self._send(400, error(str(exc), exc.param))
                except EngineFailed:
                    self._send(
                        500, error("The server had an error while processing your request.", None, 500)
                    )
                return
            chat = path.endswith("chat/completions")
            prompt_len = prompt_tokens(body, chat)
            if prompt_len == max_len:
                self._send(
                    400,
                    error(
                        f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens "
                        f"(at least 1) is longer than the maximum model length of {max_len}.",
                        "input_tokens",
                    ),
                )
                return
            if prompt_len > max_len:
                self._send(
                    400,
                    error(
                        f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
                        f"{prompt_len} input tokens, which exceeds this limit even without any output tokens. "
                        "Please reduce the length of the input prompt.",
                        "input_tokens",
                    ),
                )
                return
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            if max_tokens > max_len:
                self._send(
                    400,
                    error(
                        f"max_tokens={max_tokens} cannot be greater than max_model_len={max_len}. "
                        "Please request fewer output tokens.",
                        "max_tokens",
                    ),
                )
                return
            req = PendingCompletion(prompt_len, min(max_tokens, max_len - prompt_len))
            eng.submit(req)
            if body.get("stream"):
                self._stream(req, chat)
            else:
                req.done.wait(3600)
                if req.failed:
                    self._send(
                        500, error("The server had an error while processing your request.", None, 500)
                    )
                    return
                text = "".join(req.tokens)
                choice = {"index": 0, "finish_reason": "length"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                self._send(
                    200,
                    {
                        "id": "cmpl-sim",
                        "object": "chat.completion" if chat else "text_completion",
                        "model": served,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": prompt_len,
                            "completion_tokens": len(req.tokens),
                            "total_tokens": prompt_len + len(req.tokens),
                        },
                    },
                )

        def _stream(self, req: PendingCompletion, chat: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            try:
                while True:
                    with req.cond:
                        while sent >= len(req.tokens) and not req.done.is_set():
                            req.cond.wait(1.0)
                        new, sent = req.tokens[sent:], len(req.tokens)
                    for tok in new:
                        delta = {"delta": {"content": tok}} if chat else {"text": tok}
                        self._chunk(
                            {
                                "id": "cmpl-sim",
                                "object": "chat.completion.chunk" if chat else "text_completion",
                                "choices": [{"index": 0, **delta, "finish_reason": None}],
                            }
                        )
                    if req.done.is_set() and sent >= len(req.tokens):
                        break
                if req.failed:
                    self._chunk(
                        {
                            "error": {
                                "message": "The server had an error while processing your request.",
                                "type": "InternalServerError",
                                "code": 500,
                            }
                        }
                    )
                self._raw(b"data: [DONE]\n\n")
                self._raw(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _chunk(self, obj: dict) -> None:
            self._raw(f"data: {json.dumps(obj)}\n\n".encode())

        def _raw(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


def error(message: str, param: str | None, code: int = 400) -> dict:
    kind = "BadRequestError" if code == 400 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def prompt_tokens(body: dict, chat: bool) -> int:
    if chat:
        return sum(max(1, len(str(m.get("content", ""))) // 4) + 4 for m in body.get("messages", [])) + 2
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, list):
        prompt = "".join(map(str, prompt))
    return pooling.text_tokens(str(prompt))


def metrics(eng: Engine, served: str) -> str:
    """Prometheus text as vLLM's /metrics serves it; the engine metrics vanish with --disable-log-stats."""
    lab = f'engine="0",model_name="{served}"'
    b = eng.boot
    out = [
        "# HELP python_info Python platform information",
        "# TYPE python_info gauge",
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="3",version="3.12.3"} 1.0',
    ]
    if not eng.log_stats:
        return "\n".join(out) + "\n"
    with eng.lock:
        out += [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} {float(eng.num_running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} {float(eng.num_waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} {eng.kv_usage}",
            "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{lab}}} {float(eng.preemptions)}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {float(eng.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {float(eng.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="length"}} {float(eng.finished)}',
        ]
        for name, hist in eng.latency.items():
            out += hist.lines(name, lab)
    out += [
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{b.block_size}",cache_dtype="{eng.kv_cache_dtype}",'
        f'enable_prefix_caching="True",engine="0",gpu_memory_utilization="{eng.util}",'
        f'num_gpu_blocks="{b.num_blocks}",num_gpu_blocks_override="None"}} 1.0',
    ]
    return "\n".join(out) + "\n"
