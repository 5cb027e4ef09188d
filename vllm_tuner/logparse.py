"""Reading vLLM's log: the failure category, the numbers it printed, and the startup phase.

Pure functions over text. One engine serves both uses:

* :class:`LogWatcher` is fed the server's output line by line while it runs. It reports the phase
  (starting → loading → profiling → capturing → serving), every number as it is printed, readiness,
  and a fatal line the moment it arrives, so the tuner reacts to a crash without waiting for a health
  probe to time out.
* :func:`classify` is "feed every line, then :meth:`LogWatcher.finalize`", for a log that is complete
  (or an excerpt a user pasted), so the two can never disagree.

Wordings of the V1 engine (0.18–0.33) and of the older V0 engine are both recognised. A raw
``torch.OutOfMemoryError`` is placed in its phase from the progress lines seen before it and from the
frames of its stack trace (``capture_model`` → graph capture, ``profile_run`` → profiling,
``create_weights`` → weight loading, ``execute_model`` or a started server → runtime); a log that shows its
startup but not its end failed in the last startup phase it reached, never at runtime. vLLM's CPU backend
(its KV cache a share of one NUMA node's memory) is read into the same facts and categories as the GPU
lines it mirrors, with the fact ``platform`` = "cpu". What a server prints after it was stopped by a
signal (the EngineDeadError of vLLM's own shutdown) is how it stopped, not a failure.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .failures import NAMES
from .units import GIB
from .vllmargv import options

# every category a diagnosis can name (declared, with what each means to the tuner, in failures.py)
CATEGORIES: tuple[str, ...] = NAMES

PHASES: tuple[str, ...] = ("starting", "loading", "profiling", "capturing", "serving")

Fact = float | int | str
Facts = dict[str, Fact]


@dataclass(frozen=True)
class Diagnosis:
    """What a log says happened.

    ``phase`` is the furthest startup phase the log reached. ``inferred`` is True when the log holds
    no error message (a truncated excerpt) and the category was deduced from the stack and phase.
    """

    category: str
    facts: Facts = field(default_factory=dict)
    evidence: str = ""
    phase: str = "starting"
    inferred: bool = False

    @property
    def ok(self) -> bool:
        return self.category == "success"


@dataclass(frozen=True)
class Event:
    """One thing the watcher noticed in one line.

    ``kind`` is "phase" (``name`` = the new phase), "fact" (``name`` = key, ``value`` = number),
    "fatal" (``name`` = category; sent again if later lines refine it) or "ready".
    """

    kind: str
    name: str
    value: Fact | None
    line_no: int
    line: str


# --------------------------------------------------------------------------------------------------
# Line prefixes: "(EngineCore_DP0 pid=1) ERROR 11-05 12:19:32 [core.py:708] ", "[rank0]: ", timestamps

_PREFIX = re.compile(
    r"""^\s*(?:
        \[?\d{4}-\d{2}-\d{2}T[\d:.]+Z?\]?           # ISO timestamp (docker, CI)
      | \(?[\w.\-]*(?:\s+rank=\d+)?\s*pid=\d+[^)]*\)  # (APIServer pid=1), (VllmWorker rank=0 pid=2)
      | \[rank\d+\]:                                  # [rank0]:
      | (?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d{2}-\d{2}\s+[\d:.]+\s+(?:\[[^\]]*\]|[\w.]+:\d+\])
      | `+                                           # markdown backticks
    )\s*""",
    re.X,
)


def strip_prefix(line: str) -> str:
    """The message of a log line without vLLM's process, level, time and file prefixes."""
    text = line.rstrip("\r\n")
    while True:
        match = _PREFIX.match(text)
        if not match or match.end() == 0:
            break
        text = text[match.end() :]
    return text.strip().rstrip("`").strip()


# --------------------------------------------------------------------------------------------------
# Numbers


def _number(text: str) -> float | int:
    clean = text.replace(",", "")
    value = float(clean)
    if "." not in clean and "e" not in clean.lower():
        return int(value)
    return value


_UNIT = {"B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
# Older vLLM prints GiB as "GB" and MiB as "MB".
_UNIT.update({"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40})


def _gib(value: str, unit: str | None) -> float:
    size = float(value.replace(",", "")) * _UNIT[(unit or "GiB").upper()]
    return round(size / GIB, 6)


def _ints(*keys: str) -> Callable[[re.Match[str]], Facts]:
    def read(match: re.Match[str]) -> Facts:
        return {k: int(_number(g)) for k, g in zip(keys, match.groups(), strict=True) if k and g is not None}

    return read


def _floats(*keys: str) -> Callable[[re.Match[str]], Facts]:
    def read(match: re.Match[str]) -> Facts:
        return {
            k: float(_number(g)) for k, g in zip(keys, match.groups(), strict=True) if k and g is not None
        }

    return read


def _sized(key: str) -> Callable[[re.Match[str]], Facts]:
    return lambda m: {key: _gib(m.group(1), m.group(2))}


def _oom_capacity(match: re.Match[str]) -> Facts:
    return {
        "total_gib": _gib(match.group(1), match.group(2)),
        "free_gib": _gib(match.group(3), match.group(4)),
    }


def _profiling_change(match: re.Match[str]) -> Facts:
    out: Facts = {}
    for key, value, unit in (
        ("initial_free_gib", match.group(1), match.group(2)),
        ("current_free_gib", match.group(3), match.group(4)),
    ):
        number = float(value.replace(",", ""))
        # V0 printed raw bytes without a unit.
        out[key] = _gib(value, unit) if unit or number < 1e5 else round(number / GIB, 6)
    return out


_V0_PROFILE_KEYS = {
    "total_gpu_memory": "total_gib",
    "peak_torch_memory": "peak_torch_gib",
    "non_torch_memory": "non_torch_gib",
    "kv_cache_size": "available_kv_gib",
    "gpu_memory_utilization": "gpu_memory_utilization",
}


def _kv_refusal(match: re.Match[str]) -> Facts:
    """The CPU backend's refusal to allocate the KV cache: what the node has, what vLLM asked for.

    With ``--kv-cache-memory-bytes`` vLLM prints one number (that size); it needs that much available
    now. Otherwise it prints the KV share and the worker's whole request (``requested`` = the node's
    total x ``--gpu-memory-utilization``); the worker already holds ``requested - kv`` (its non-KV
    usage), so what was free for this worker is what is still available plus what it holds: the
    number the next utilization is computed from, like the free memory of the startup check.
    """
    available, total, kv = (float(_number(g)) for g in match.groups()[:3])
    requested = float(_number(match.group(4))) if match.group(4) else None
    out: Facts = {"platform": "cpu", "total_gib": total, "available_kv_gib": kv}
    if requested is None:
        out["free_gib"] = available
    else:
        consumed = round(requested - kv, 2)
        out.update(requested_gib=requested, consumed_gib=consumed, free_gib=round(available + consumed, 2))
    return out


def _v0_profile(match: re.Match[str]) -> Facts:
    out: Facts = {}
    for key, value in re.findall(r"(\w+)=(-?[\d.]+)", match.group(0)):
        if key in _V0_PROFILE_KEYS:
            out[_V0_PROFILE_KEYS[key]] = float(value)
    return out


_N = r"(-?\d+(?:,\d{3})*(?:\.\d+)?)"  # a number, maybe with thousands separators
_SIZE = r"(-?\d+(?:,\d{3})*(?:\.\d+)?)\s*([KMGT]i?B)"

# (pattern, reader). Each pattern is matched against the current line joined to the two before it,
# so messages that a terminal or a reporter wrapped over lines are still read.
_FACT_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Facts]]] = [
    (re.compile(r"vLLM (?:API )?server version ([0-9][\w.+\-]*)"), lambda m: {"vllm_version": m.group(1)}),
    (re.compile(r"LLM engine \(v([0-9][\w.+\-]*)\)"), lambda m: {"vllm_version": m.group(1)}),
    (re.compile(r"Automatically detected platform (\w+)"), lambda m: {"platform": m.group(1).lower()}),
    (re.compile(r"Using max model len " + _N), _ints("max_model_len")),
    (re.compile(r"LLM engine .*?\bmax_seq_len=(\d+)"), _ints("max_model_len")),
    (
        re.compile(r"Auto-fit max_model_len: reduced from (\d+) to (\d+)"),
        _ints("derived_max_model_len", "max_model_len"),
    ),
    (re.compile(r"Auto-fit max_model_len: full model context length (\d+) fits"), _ints("max_model_len")),
    # weights
    (re.compile(r"Model loading took " + _N + r"\s*(GiB|GB)"), _sized("weights_gib")),
    (re.compile(r"Loading model weights took " + _N + r"\s*(GiB|GB|MiB|MB)"), _sized("weights_gib")),
    (re.compile(r"model weights take " + _N + r"\s*(GiB)"), _sized("weights_gib")),
    (re.compile(r"weights memory: " + _N + r"\s*(GiB)"), _sized("weights_gib")),
    # --cpu-offload-gb: what UVA offload moved to CPU memory (offloader/uva.py, format_gib: GiB)
    (re.compile(r"Total CPU offloaded parameters: " + _N), _floats("offloaded_gib")),
    # V0 profiling summaries
    (re.compile(r"Memory profiling results: (?:\w+=-?[\d.]+(?:GiB)?\s*)+"), _v0_profile),
    (
        re.compile(
            r"total_gpu_memory \(" + _N + r"GiB\) x gpu_memory_utilization \(" + _N + r"\) = " + _N + "GiB"
        ),
        _floats("total_gib", "gpu_memory_utilization", "requested_gib"),
    ),
    (re.compile(r"non_torch_memory takes " + _N + "GiB"), _floats("non_torch_gib")),
    (re.compile(r"activation peak memory takes " + _N + "GiB"), _floats("peak_activation_gib")),
    (re.compile(r"reserved for KV Cache is " + _N + "GiB"), _floats("available_kv_gib")),
    # V1 profiling
    (
        re.compile(
            r"Initial free memory: " + _N + r" GiB; Requested memory: " + _N + r" \(util\), " + _N + " GiB"
        ),
        _floats("free_gib", "gpu_memory_utilization", "requested_gib"),
    ),
    (re.compile(r"total consumed \(from mem_get_info\): " + _N + "GiB"), _floats("consumed_gib")),
    (
        re.compile(r"Initial free memory " + _N + r" GiB, reserved " + _N + r" GiB memory for KV Cache"),
        _floats("free_gib", "available_kv_gib"),
    ),
    (re.compile(r"Estimated CUDA graph memory: " + _N + " GiB"), _floats("cudagraph_estimated_gib")),
    (re.compile(r"Available KV cache memory: " + _N + " GiB"), _floats("available_kv_gib")),
    (
        re.compile(r"current --gpu-memory-utilization=" + _N + " is equivalent"),
        _floats("gpu_memory_utilization"),
    ),
    (re.compile(r"increase --gpu-memory-utilization from " + _N + " to"), _floats("gpu_memory_utilization")),
    # CPU backend: the KV cache is a share of one NUMA node's memory
    (
        re.compile(r"(?:Auto|Explicitly) set \(" + _N + "/" + _N + r"\) GiB for KV cache on node"),
        lambda m: {"platform": "cpu", **_floats("available_kv_gib", "total_gib")(m)},
    ),
    (
        re.compile(r"GiB for KV cache on node \d+, with " + _N + r" GiB requested memory"),
        _floats("requested_gib"),
    ),
    (re.compile(_N + r" GiB memory was consumed by non-kv usages"), _floats("consumed_gib")),
    (
        re.compile(r"Available memory on node \d+ \(" + _N + "/" + _N + r" GiB\) on startup"),
        lambda m: {"platform": "cpu", **_floats("free_gib", "total_gib")(m)},
    ),
    (
        re.compile(
            r"Available memory on node \d+ \("
            + _N
            + "/"
            + _N
            + r" GiB\) on kv cache allocation is less than requested memory for kv \("
            + _N
            + "(?:/"
            + _N
            + r")? GiB\)"
        ),
        _kv_refusal,
    ),
    (re.compile(r"\bCPU KV cache size:"), lambda m: {"platform": "cpu"}),
    # capacity
    (re.compile(r"KV cache size: " + _N + " tokens"), _ints("kv_cache_tokens")),
    (
        re.compile(r"Maximum concurrency for " + _N + r" tokens per request: " + _N + "x"),
        lambda m: {
            "concurrency_tokens": int(_number(m.group(1))),
            "max_concurrency": float(_number(m.group(2))),
        },
    ),
    (
        re.compile(r"maximum number of tokens that can be stored in KV cache \(" + _N + r"\)"),
        _ints("kv_cache_tokens"),
    ),
    (
        re.compile(r"\b(?:GPU|cuda) blocks: " + _N + r"(?:, # CPU blocks: " + _N + ")?"),
        _ints("num_gpu_blocks", "num_cpu_blocks"),
    ),
    # graph capture
    (re.compile(r"Graph capturing finished in \d+ secs?, took " + _N + " GiB"), _floats("cudagraph_gib")),
    (
        re.compile(r"CUDA graph pool memory: " + _N + r" GiB \(actual\), " + _N + r" GiB \(estimated\)"),
        _floats("cudagraph_gib", "cudagraph_estimated_gib"),
    ),
    (
        re.compile(r"Free memory on device[^(]*\(" + _N + "/" + _N + r" GiB\) on startup"),
        _floats("free_gib", "total_gib"),
    ),
    (
        # the requested size may be cut off in a pasted excerpt; the "," shows the fraction is whole
        re.compile(
            r"desired (?:GPU|CPU) memory utilization (?:is )?\(" + _N + r",(?:\s*" + _N + r" GiB\))?", re.I
        ),
        _floats("gpu_memory_utilization", "requested_gib"),
    ),
    (re.compile(r"Actual usage is " + _N + r" GiB for consumed memory"), _floats("consumed_gib")),
    (re.compile(_N + r" GiB for peak activation"), _floats("peak_activation_gib")),
    (re.compile(_N + r" GiB for CUDAGraph memory"), _floats("cudagraph_gib")),
    (
        re.compile(r"--kv-cache-memory=(\d+)`?\s*\([^)]*\) to fit into requested memory"),
        _ints("kv_cache_memory_fit_bytes"),
    ),
    (
        re.compile(r"--kv-cache-memory=(\d+)`?\s*\([^)]*\) to fully utilize"),
        _ints("kv_cache_memory_full_bytes"),
    ),
    (
        re.compile(r"init engine \(profile, create kv cache, warmup model\) took " + _N + " s"),
        _floats("init_seconds"),
    ),
    # failures
    (re.compile(r"max seq len \(" + _N + r"\)"), _ints("max_model_len")),
    (
        re.compile(
            r"\("
            + _N
            + r" GiB KV cache is needed, which is larger than the available KV cache memory \("
            + _N
            + r" GiB\)"
        ),
        _floats("needed_gib", "available_kv_gib"),
    ),
    (re.compile(r"estimated maximum model length is " + _N), _ints("estimated_max_model_len")),
    (
        re.compile(r"max_num_seqs \((\d+)\) exceeds available Mamba cache blocks \((\d+)\)"),
        _ints("max_num_seqs", "max_num_seqs_limit"),
    ),
    (re.compile(r"lower max_num_seqs to at most (\d+)", re.I), _ints("max_num_seqs_limit")),
    (re.compile(r"Tried to allocate " + _SIZE), _sized("tried_to_allocate_gib")),
    (re.compile(r"total capacity of " + _SIZE + r" of which " + _SIZE + " is free"), _oom_capacity),
    (re.compile(r"this process has " + _SIZE + " memory in use"), _sized("process_used_gib")),
    (re.compile(r"allocated memory " + _SIZE + " is allocated by PyTorch"), _sized("torch_allocated_gib")),
    (
        re.compile(r"Initial free memory " + _N + r"\s*(GiB)?, current free memory " + _N + r"\s*(GiB)?"),
        _profiling_change,
    ),
    (re.compile(r"User-specified max_model_len \((\d+)\)"), _ints("max_model_len")),
    (
        re.compile(r"derived max_model_len \(\w+=" + _N),
        lambda m: {"derived_max_model_len": int(float(m.group(1).replace(",", "")))},
    ),
    (
        re.compile(
            r"max_num_batched_tokens \((\d+)\) must be greater than or equal to max_num_seqs \((\d+)\)"
        ),
        _ints("max_num_batched_tokens", "max_num_seqs"),
    ),
    (re.compile(r"compute capability of at least " + _N), _floats("required_compute_capability")),
    (re.compile(r"has compute capability " + _N), _floats("compute_capability")),
    (re.compile(r"unrecognized arguments: (.+?)\s*$"), lambda m: {"unrecognized_arguments": m.group(1)}),
]

# Every fact pattern contains one of these words; a window without any is skipped (the periodic
# stats lines of a busy server are most of a long log).
_FACT_WORDS = (
    "version",
    "max model len",
    "max_seq_len",
    "auto-fit",
    "took",
    "offloaded parameters",
    "weights take",
    "weights memory",
    "memory profiling",
    "total_gpu_memory",
    "takes",
    "reserved for kv",
    "free memory",
    "total consumed",
    "cuda graph",
    "kv cache memory",
    "kv cache size",
    "kv cache is needed",
    "stored in kv cache",
    "gpu-memory-utilization",
    "maximum concurrency",
    "blocks:",
    "desired gpu",
    "desired cpu",
    "platform",
    "kv cache on node",
    "non-kv usages",
    "memory on node",
    "actual usage",
    "gib for",
    "kv-cache-memory",
    "max seq len",
    "estimated maximum",
    "max_num_seqs",
    "tried to allocate",
    "total capacity",
    "this process",
    "allocated memory",
    "max_model_len",
    "max_num_batched_tokens",
    "compute capability",
    "unrecognized arguments",
)
# Every text a fatal pattern matches contains one of these (tests/test_failures.py checks each pattern).
_FATAL_WORDS = (
    "memory",
    "kv cache is needed",
    "less than",
    "errno",
    "address already in use",
    "unrecognized arguments",
    "max seq len",
    "mamba",
    "error",
    "timed out",
    "died",
    "enginecore",
    "workerproc",
    "engine core",
    "frontend process",
    "invalid choice",
    "greater than",
    "auto-fit",
    "compute capability",
    "kv_cache_dtype",
)


def _mentions(window: Iterable[str], words: tuple[str, ...]) -> bool:
    text = " ".join(window).lower()
    return any(word in text for word in words)


# --------------------------------------------------------------------------------------------------
# Fatal lines. "oom" is placed in its phase later; "died" is a death notice whose cause may follow.

_FATAL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"No available memory for the cache"), "no_kv_cache_memory"),
    (re.compile(r"Cannot auto-fit max_model_len"), "no_kv_cache_memory"),
    (
        re.compile(
            r"To serve at least one request with the model's max seq len"
            r"|KV cache is needed, which is larger than the available"
        ),
        "kv_cache_insufficient_for_max_len",
    ),
    (
        re.compile(r"max seq len \([\d,]+\) is larger than the maximum number of tokens"),
        "kv_cache_insufficient_for_max_len",
    ),
    (
        # "Free memory on device cuda:0 (...) on startup is less than desired GPU memory utilization";
        # the CPU backend: "Available memory on node 0 (...) on startup is less than desired CPU ..."
        re.compile(r"on startup is less than (?:desired\b|the engine's budget)"),
        "startup_free_memory_below_utilization",
    ),
    # The CPU backend after loading: the KV share of the request is not available. A share of zero or
    # less means the worker's own usage already fills --gpu-memory-utilization (the budget is too
    # small, as "No available memory for the cache blocks"); a positive one, that the node has less
    # memory available than the budget asks for (as the startup check).
    (
        re.compile(r"on kv cache\s*allocation is less than requested memory for kv \((?:-|0(?:\.0+)?/)"),
        "no_kv_cache_memory",
    ),
    (
        re.compile(r"on kv cache\s*allocation is less than"),
        "startup_free_memory_below_utilization",
    ),
    (re.compile(r"exceeds available Mamba cache blocks"), "mamba_blocks_below_max_num_seqs"),
    (re.compile(r"Error in memory profiling"), "profiling_memory_changed"),
    (re.compile(r"Failed to load model - not enough GPU memory"), "oom_weights_load"),
    (re.compile(r"CUDA out of memory occurred when warming up (?:sampler|pooler)"), "oom_during_profiling"),
    (re.compile(r"Timed out waiting for engine core processes to start"), "startup_timeout"),
    (re.compile(r"\[Errno 98\]|Address already in use"), "port_in_use"),
    (re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory"), "oom"),
    (
        re.compile(
            r"unrecognized arguments:|error: argument |invalid choice:|error: the following arguments are required"
        ),
        "unsupported_flag_or_arg_error",
    ),
    (
        re.compile(r"ValidationError|validation errors? for \w+Config|\bValue error, "),
        "unsupported_flag_or_arg_error",
    ),
    (re.compile(r"greater than the derived max_model_len"), "unsupported_flag_or_arg_error"),
    (re.compile(r"must be greater than or equal to max_num_seqs"), "unsupported_flag_or_arg_error"),
    (re.compile(r"compute capability of at least|Invalid kv_cache_dtype"), "unsupported_flag_or_arg_error"),
    (
        re.compile(
            r"EngineCore failed to start|Engine core initialization failed|WorkerProc failed to start"
            r"|WorkerProc hit an exception|WorkerProc initialization failed|died unexpectedly|EngineDeadError"
            r"|EngineCore encountered (?:a fatal error|an issue)|Error executing method|died with exit code"
            r"|Worker \w+ pid \d+ died|Frontend process failed|engine core exited unexpectedly"
        ),
        "died",
    ),
]

_OOM_WRAPPERS = {"oom_weights_load", "oom_during_profiling"}

_PHASE_WORDS = {
    "starting": "while starting",
    "loading": "while loading the weights",
    "profiling": "while profiling memory",
    "capturing": "while capturing CUDA graphs",
    "serving": "after startup",
}

_OOM_CATEGORY = {
    "loading": "oom_weights_load",
    "profiling": "oom_during_profiling",
    "capturing": "oom_cudagraph_capture",
    "serving": "oom_at_runtime",
}

# --------------------------------------------------------------------------------------------------
# Progress: lines that start a phase, and lines that only show the startup is moving.

_PHASE_MARKERS: list[tuple[str, re.Pattern[str]]] = [
    (
        "serving",
        re.compile(
            r"Starting vLLM (?:API )?server\b|^Supported tasks|Available routes are|Application startup complete"
            r"|Uvicorn running on|Started server process|Avg prompt throughput"
        ),
    ),
    (
        "capturing",
        re.compile(
            r"Compile and warming up model|Capturing CUDA graph|Capturing cudagraphs|Graph capturing finished"
            r"|CUDA graph pool memory|init engine \(profile"
        ),
    ),
    (
        "profiling",
        re.compile(
            r"Model loading took|Loading model weights took|Memory profiling|Dynamo bytecode transform"
            r"|torch\.compile take|Compiling a graph|Directly load the compiled graph|Profiling CUDA graph memory"
            r"|Estimated CUDA graph memory|Available KV cache memory|KV cache size:|(?:GPU|cuda) blocks:"
            r"|Maximum concurrency for|the current vLLM instance can use|model weights take"
            r"|GiB for KV cache on node|Warming up model for the compilation|Warming up done"
        ),
    ),
    (
        "loading",
        re.compile(
            r"Starting to load model|Loading safetensors checkpoint shards|Loading weights took|Loading pt checkpoint"
        ),
    ),
    (
        "starting",
        re.compile(
            r"vLLM (?:API )?server version|non-default args|Initializing (?:a V1 |an )?LLM engine|Using max model len"
        ),
    ),
]
_READY = re.compile(r"Application startup complete|Starting vLLM (?:API )?server\b|Uvicorn running on")
_PROGRESS_ONLY = re.compile(r"\d+%\||Compiling a graph|Loading safetensors|Capturing CUDA graph")
# A stop asked for by a signal: vLLM's SIGTERM/SIGINT handler of the API server (0.2x+), the interrupt
# it raises when the signal comes before uvicorn runs, a Ctrl-C. What a server prints after this
# (an EngineDeadError traceback from its output handler, "EngineCore failed to start") is how it
# stops, not why it failed.
_STOP = re.compile(
    r"\[shutdown\] API server: shutdown triggered|^KeyboardInterrupt(?::\s*terminated)?$"
    r"|Received KeyboardInterrupt, shutting down"
)
# Shutdown lines that are a stop only when nothing failed before them, once the server is up: the
# engine core also gets SIGTERM from its own front end when that one fails, and uvicorn shuts down
# after an engine death too.
_STOP_AFTER_READY = re.compile(
    r"\[shutdown\] EngineCore: trigger received signal=|^(?:INFO:\s+)?Shutting down\s*$"
)

# --------------------------------------------------------------------------------------------------
# Stack frames: where in vLLM a crash happened.

_FRAME = re.compile(r'^File "([^"]+)", line \d+, in (\S+)')
_METHOD = re.compile(r"Error executing method '?(\w+)")
_FRAME_HINTS: dict[str, str] = {
    "_dummy_sampler_run": "sampler_warmup",
    "_dummy_pooler_run": "sampler_warmup",
    "raise_if_cache_size_invalid": "kv_check",
    "check_enough_kv_cache_memory": "kv_check",
    "_check_enough_kv_cache_memory": "kv_check",
    "initialize_cache": "kv_check",
    "capture_model": "capture",
    "_capture_cudagraphs": "capture",
    "capture_graphs": "capture",
    "profile_cudagraph_memory": "capture",
    "capture_begin": "capture",  # torch/cuda/graphs.py: the graph's own allocations
    "capture_end": "capture",
    "compile_or_warm_up_model": "compile_warmup",
    "_compile_or_warm_up_model": "compile_warmup",
    "profile_run": "profile",
    "determine_available_memory": "profile",
    "determine_num_available_blocks": "profile",
    "load_model": "load",
    "load_weights": "load",
    "create_weights": "load",
    "make_layers": "load",
    "initialize_model": "load",
    "_initialize_model": "load",
    "get_model": "load",
    "weight_loader": "load",
    "process_weights_after_loading": "load",
    "execute_model": "runtime",
    "sample_tokens": "runtime",
    "step_with_batch_queue": "runtime",
    "run_busy_loop": "runtime",
}
# Most specific first: a crash in graph capture also shows the warm-up frames around it, and V0's
# profile run calls execute_model.
_HINT_PHASE: tuple[tuple[str, str], ...] = (
    ("sampler_warmup", "profiling"),
    ("capture", "capturing"),
    ("compile_warmup", "capturing"),
    ("profile", "profiling"),
    ("load", "loading"),
    ("runtime", "serving"),
    ("model_forward", "profiling"),
)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception))(?::\s*(.*))?$")
_WRAPPER = re.compile(
    r"See root cause above|See stack trace|WorkerProc initialization failed|EngineDeadError"
    r"|EngineCore encountered|Engine core initialization failed|Frontend process failed"
)
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")

_WINDOW = 3  # lines joined for matching wrapped messages


class LogWatcher:
    """Incremental reader of one vLLM server's output. Feed it lines; read its state at any time."""

    def __init__(self, tail_lines: int = 200) -> None:
        self.facts: Facts = {}
        self.ready = False
        self.fatal_category: str | None = None
        self.last_progress_line_no = 0
        self.line_no = 0
        self._phase = "starting"
        self._saw_start = False
        self._tail: deque[str] = deque(maxlen=max(tail_lines, 40))
        self._window: deque[str] = deque(maxlen=_WINDOW)
        self._fatal_evidence = ""
        self._evidence_from_numbers = False
        self._decisive: str | None = None  # a root cause, not only a death notice
        self._oom_phase: str | None = None
        self._death_line = ""
        self._hints: set[str] = set()
        self._root_error = ""
        self._traceback_seen = False
        self._error_after_traceback = False
        self._last_progress = ""
        self._stop_line = ""  # the line that shows the server was stopped by a signal
        self._failed_before_stop = False

    # -- state --------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """ "starting", "loading", "profiling", "capturing", "serving", or "failed" after a fatal line."""
        return "failed" if self.fatal_category else self._phase

    @property
    def progress_phase(self) -> str:
        """The furthest startup phase reached, even after a failure."""
        return self._phase

    def tail(self, n: int = 40) -> list[str]:
        return list(self._tail)[-n:] if n > 0 else []

    # -- input --------------------------------------------------------------------------------

    def feed(self, line: str) -> list[Event]:
        """Read one line of output; returns what it changed."""
        self.line_no += 1
        raw = line.rstrip("\r\n")
        self._tail.append(raw)
        text = strip_prefix(raw)
        self._window.append(text)
        if not text:
            return []
        events: list[Event] = []
        progressed = self._read_phase(text, events)
        progressed |= self._read_facts(events)
        if not self._stop_line:
            self._read_stop(text)
        if not self._stop_line:
            self._read_stack(text)
            self._read_fatal(text, events)
        if not self.ready and _READY.search(text):
            self.ready = True
            events.append(self._event("ready", "ready", None))
        if progressed or _PROGRESS_ONLY.search(text):
            self.last_progress_line_no = self.line_no
            self._last_progress = text.split("\r")[-1].strip()[:200]
        return events

    def feed_text(self, text: str) -> list[Event]:
        events: list[Event] = []
        for line in text.splitlines():
            events += self.feed(line)
        return events

    def finalize(self, exit_code: int | None = None, timed_out: bool = False) -> Diagnosis:
        """The verdict once the process is gone (or, for a pasted log, once the text ends).

        ``exit_code`` is the server's exit status if the caller knows it; ``timed_out`` says the caller
        gave up waiting for readiness. A server that was ready and then stopped by the caller (exit code
        0 or a negative signal number, or any exit code once its log shows the signal) is a success.
        """
        category, evidence, inferred = self._verdict(exit_code, timed_out)
        return Diagnosis(category, dict(self.facts), evidence, self._phase, inferred)

    # -- readers ------------------------------------------------------------------------------

    def _event(self, kind: str, name: str, value: Fact | None) -> Event:
        return Event(kind, name, value, self.line_no, self._window[-1] if self._window else "")

    def _read_phase(self, text: str, events: list[Event]) -> bool:
        for phase, pattern in _PHASE_MARKERS:
            if pattern.search(text):
                if phase == "starting":
                    self._saw_start = True
                if PHASES.index(phase) > PHASES.index(self._phase):
                    self._phase = phase
                    events.append(self._event("phase", phase, None))
                return True
        return False

    def _matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        """Matches that end in the current line, searched over the last few lines joined."""
        joined = " ".join(self._window)
        start = len(joined) - len(self._window[-1])
        return [m for m in pattern.finditer(joined) if m.end() > start]

    def _read_facts(self, events: list[Event]) -> bool:
        found = False
        if not _mentions(self._window, _FACT_WORDS):
            return found
        for pattern, read in _FACT_RULES:
            for match in self._matches(pattern):
                for key, value in read(match).items():
                    found = True
                    if self.facts.get(key) != value:
                        self.facts[key] = value
                        events.append(self._event("fact", key, value))
        return found

    def _read_stop(self, text: str) -> None:
        failed = bool(self._decisive or self._death_line) or (not self.ready and bool(self._root_error))
        if _STOP.search(text) or (self.ready and not failed and _STOP_AFTER_READY.search(text)):
            self._stop_line = text
            self._failed_before_stop = failed

    def _read_stack(self, text: str) -> None:
        if _TRACEBACK.search(text):
            self._traceback_seen = True
            return
        frame = _FRAME.match(text)
        if frame:
            self._traceback_seen = True
            path, func = frame.groups()
            hint = _FRAME_HINTS.get(func)
            if hint is None and path.replace("\\", "/").endswith("torch/cuda/graphs.py"):
                hint = "capture"
            if hint is None and func == "forward" and "/models/" in path:
                hint = "model_forward"
            if hint:
                self._add_hint(hint)
            return
        method = _METHOD.search(text)
        if method and method.group(1) in _FRAME_HINTS:
            self._add_hint(_FRAME_HINTS[method.group(1)])
        if "Failed to create" in text and "weights" in text:
            self._add_hint("load")
        error = _EXCEPTION.match(text)
        if error and not _WRAPPER.search(text):
            self._error_after_traceback = True
            if not self._root_error:
                self._root_error = text

    def _add_hint(self, hint: str) -> None:
        self._hints.add(hint)

    def _read_fatal(self, text: str, events: list[Event]) -> None:
        if _mentions(self._window, _FATAL_WORDS):
            for pattern, category in _FATAL_RULES:
                if self._matches(pattern):
                    self._note_fatal(category, pattern, text)
                    break
        if self._decisive is None and (
            self.facts.get("num_gpu_blocks") == 0 or _negative(self.facts.get("available_kv_gib"))
        ):
            self._decisive = "no_kv_cache_memory"
            self._fatal_evidence = text
            self._evidence_from_numbers = True
        self._update_fatal(events)

    def _note_fatal(self, category: str, pattern: re.Pattern[str], text: str) -> None:
        if category == "died":
            self._death_line = self._death_line or text
        elif category == "unsupported_flag_or_arg_error" and self.ready:
            return  # a request's validation error while serving is not a launch failure
        elif self._decisive is None:
            self._decisive = category
            self._fatal_evidence = self._evidence(pattern)
            if category == "oom":
                self._oom_phase = self._phase
        elif self._decisive == "oom" and category in _OOM_WRAPPERS:
            self._decisive = category  # vLLM's own wording for the raw OOM seen just before
        elif self._evidence_from_numbers:
            # the error line beats the number behind it, in its wording and in its category
            self._decisive = category
            self._fatal_evidence = self._evidence(pattern)
            self._evidence_from_numbers = False
            if category == "oom":
                self._oom_phase = self._phase

    def _evidence(self, pattern: re.Pattern[str]) -> str:
        """The line the decisive match starts on, with the lines it wraps onto."""
        lines = list(self._window)
        match = self._matches(pattern)[-1]
        offset = 0
        for index, line in enumerate(lines):
            if match.start() < offset + len(line) + 1:
                return " ".join(lines[index:])
            offset += len(line) + 1
        return lines[-1]

    def _update_fatal(self, events: list[Event]) -> None:
        category = self._current_category()
        if category and category != self.fatal_category:
            self.fatal_category = category
            events.append(self._event("fatal", category, None))

    def _current_category(self) -> str | None:
        if self._decisive == "oom":
            return self._oom_category()
        if self._decisive:
            return self._decisive
        if self._death_line:
            return "engine_core_died_other"
        return None

    def _hint_phase(self) -> str | None:
        for hint, phase in _HINT_PHASE:
            if hint in self._hints:
                return phase
        return None

    def _oom_category(self) -> str:
        return _OOM_CATEGORY[self._crash_phase(self._oom_phase or self._phase) or "serving"]

    def _shows_startup(self) -> bool:
        return self._saw_start or self._phase != "starting"

    def _crash_phase(self, phase: str) -> str | None:
        """The phase a crash seen at progress ``phase`` happened in, with the stack's word for it.

        A log that shows its startup but not its end failed in a startup phase: a frame of the serving
        loop there (``execute_model`` is also V0's profile run) does not make it a runtime failure.
        None for a fragment that shows neither its startup nor where it crashed.
        """
        if phase == "serving":
            return phase
        hinted = self._hint_phase()
        if hinted and not (hinted == "serving" and self._shows_startup()):
            phase = hinted
        if phase == "starting":
            # Nothing before the crash: a full log is still loading weights; a pasted fragment that
            # shows no startup at all is most often a server that ran out of memory under load.
            return "loading" if self._saw_start else None
        return phase

    def _where(self) -> str:
        """Where the startup was, for an evidence line: the phase and the last progress line."""
        if not self._shows_startup():
            return ""
        words = f" {_PHASE_WORDS[self._phase]}"
        if self._phase == "capturing" and self.facts.get("platform") == "cpu":
            words = " while warming up the engine"  # the CPU backend captures no CUDA graphs
        if self._last_progress:
            words += f" (last progress: {self._last_progress})"
        return words

    def _verdict(self, exit_code: int | None, timed_out: bool) -> tuple[str, str, bool]:
        category = self._current_category()
        if category and category != "engine_core_died_other":
            return category, self._fatal_evidence, False
        stopped = bool(self._stop_line) and not self._failed_before_stop
        # A stack trace without a death notice is a crash only if the process is gone: one that was
        # still running at the timeout printed it and went on (or hung).
        crashed = not stopped and (
            category is not None or (self._traceback_seen and not self.ready and not timed_out)
        )
        if timed_out and not self.ready and not crashed:
            error = f"; the last error printed: {self._root_error}" if self._root_error else ""
            return "startup_timeout", f"no fatal line before the startup timeout{self._where()}{error}", False
        if crashed:
            if self._root_error:
                return "engine_core_died_other", self._root_error, False
            guess = self._infer_from_stack()
            if guess:
                return guess, self._death_line or "a stack trace without its error message", True
            return (
                "engine_core_died_other",
                self._death_line or "a stack trace without its error message",
                False,
            )
        if self.ready:
            if stopped:
                return "success", f"the server started, then was stopped ({self._stop_line})", False
            if exit_code is not None and exit_code > 0:
                return (
                    "engine_core_died_other",
                    f"the server exited with code {exit_code} after startup",
                    False,
                )
            return "success", "the server reported that startup completed", False
        if exit_code is not None:
            return (
                "engine_core_died_other",
                f"the server exited with code {exit_code} before it was ready{self._where()}",
                False,
            )
        if stopped:
            return "unknown", f"the server was stopped{self._where()} ({self._stop_line})", False
        if self._root_error:
            return "engine_core_died_other", self._root_error, False
        return "unknown", f"the log ends{self._where()}" if self._shows_startup() else "", False

    def _infer_from_stack(self) -> str | None:
        """A crash whose error line is missing (a truncated paste): judge by where it happened."""
        if "kv_check" in self._hints:
            if self.facts.get("num_gpu_blocks") == 0:
                return "no_kv_cache_memory"
            return "kv_cache_insufficient_for_max_len"
        if self._phase == "starting" and not self._hint_phase():
            return None
        phase = self._crash_phase(self._phase)
        return _OOM_CATEGORY[phase] if phase else None


def _negative(value: Fact | None) -> bool:
    """A KV cache size below zero. Zero is not proof: vLLM prints sizes rounded to 0.01 GiB, and a KV
    cache of a few MiB (the CPU backend's "Explicitly set (0.0/13.84) GiB") still holds short requests."""
    return isinstance(value, (int, float)) and value < 0


def classify(text: str) -> Diagnosis:
    """Classify a complete log (or an excerpt): feed every line, then finalize with no exit status."""
    watcher = LogWatcher()
    watcher.feed_text(text)
    return watcher.finalize()


def classify_lines(lines: Iterable[str]) -> Diagnosis:
    watcher = LogWatcher()
    for line in lines:
        watcher.feed(line)
    return watcher.finalize()


# --------------------------------------------------------------------------------------------------
# The flags a log shows it was started with.

_NON_DEFAULT = re.compile(r"non-default args: (\{.*\})")
_COMMAND = re.compile(
    r"(?:^|\s)(?:vllm serve|vllm\.entrypoints\.openai\.api_server|vllm\.entrypoints\.api_server)\s(.*)$"
)
_SKIP_ARGS = {"model", "model_tag", "host", "port", "served_model_name"}


def launch_flags(text: str) -> dict[str, object]:
    """The vLLM flags a log shows: the "non-default args" line, else an echoed ``vllm serve`` command.

    Keys are flags (``--max-model-len``); values are parsed (ints, floats, True for switches).
    """
    for line in text.splitlines():
        match = _NON_DEFAULT.search(strip_prefix(line))
        if match:
            try:
                args = ast.literal_eval(match.group(1))
            except (ValueError, SyntaxError):
                continue
            if isinstance(args, dict):
                return {"--" + str(k).replace("_", "-"): v for k, v in args.items() if k not in _SKIP_ARGS}
    for line in text.splitlines():
        match = _COMMAND.search(strip_prefix(line))
        if match:
            return _command_flags(match.group(1))
    return {}


def _command_flags(command: str) -> dict[str, object]:
    flags: dict[str, object] = {}
    for option in options(command.replace("\\", " ").split()):
        if option.key or not option.name.startswith("--") or option.name[2:].replace("-", "_") in _SKIP_ARGS:
            continue
        flags[option.name] = True if option.value is None else _literal(option.value)
    return flags


def _literal(value: str) -> object:
    value = value.strip("'\"")
    try:
        return _number(value)
    except ValueError:
        return value
