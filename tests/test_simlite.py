"""The simulated vLLM's CLI: real flags, real messages, real exit codes, classified like real logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from vllm_tuner.logparse import classify

MODEL = "qwen2.5-7b"


def run_cli(env, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    full = {**os.environ, **env.env}
    return subprocess.run(
        [sys.executable, "-m", "vllm_tuner.simlite", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def serve_until_ready(env, *args: str, stop_at: tuple[str, ...] = ("Application startup complete.",)) -> str:
    """Start the simulated server, read its log until a line holds one of ``stop_at`` (by default: it is
    ready) or it dies, stop it; the log text."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_tuner.simlite", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env.env},
        stdin=subprocess.DEVNULL,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if any(marker in line for marker in stop_at):
                break
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
    return "".join(lines)


def test_version(sim):
    done = run_cli(sim("rtx-4090"), "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == "0.33.0"


def test_serve_help_lists_the_real_flags(sim):
    done = run_cli(sim("rtx-4090"), "serve", "--help")
    assert done.returncode == 0
    for flag in (
        "--max-model-len",
        "--gpu-memory-utilization",
        "--kv-cache-memory-bytes",
        "--cpu-offload-gb",
    ):
        assert flag in done.stdout
    assert "--swap-space" not in done.stdout


@pytest.mark.parametrize("flag", [["--swap-space", "4"], ["--calculate-kv-scales"]])
def test_removed_flags_fail_like_argparse(sim, flag):
    done = run_cli(sim("rtx-4090"), "serve", MODEL, *flag)
    assert done.returncode == 2
    assert f"vllm serve: error: unrecognized arguments: {' '.join(flag)}" in done.stderr
    assert classify(done.stdout + done.stderr).category == "unsupported_flag_or_arg_error"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.5", "Input should be less than or equal to 1 [type=less_than_equal, input_value=1.5"),
        ("0", "Input should be greater than 0 [type=greater_than, input_value=0.0"),
    ],
)
def test_utilization_out_of_range_is_a_validation_error(sim, value, expected):
    done = run_cli(sim("rtx-4090"), "serve", MODEL, "--gpu-memory-utilization", value)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig" in out
    assert expected in out
    assert classify(out).category == "unsupported_flag_or_arg_error"


def test_max_model_len_above_derived_is_the_real_value_error(sim):
    done = run_cli(sim("rtx-4090"), "serve", MODEL, "--max-model-len", "1000000")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert (
        "ValueError: User-specified max_model_len (1000000) is greater than the derived max_model_len "
        "(max_position_embeddings=32768" in out
    )
    diagnosis = classify(out)
    assert diagnosis.category == "unsupported_flag_or_arg_error"
    assert diagnosis.facts.get("derived_max_model_len") == 32768


def fails(name: str, args: list[str], category: str, message: str, scenario: str = "rtx-4090", **overrides):
    """One startup failure: ``serve ARGS`` on ``scenario`` (with ``overrides``) prints ``message``
    and is classified as ``category``."""
    return pytest.param(scenario, overrides, args, category, message, id=name)


FAILURE_FIELDS = ("scenario", "overrides", "args", "category", "message")
FAILURES = [
    fails(
        "weights-oom",
        ["qwen2.5-14b"],
        "oom_weights_load",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate",
    ),
    fails(
        "free-below-utilization",
        [MODEL, "--gpu-memory-utilization", "0.9"],
        "startup_free_memory_below_utilization",
        "on startup is less than desired GPU memory utilization (0.9,",
        foreign=[{"gpu": 0, "gib": 6}],
    ),
    fails(
        "no-kv-memory",
        [MODEL, "--gpu-memory-utilization", "0.5"],
        "no_kv_cache_memory",
        "ValueError: No available memory for the cache blocks.",
    ),
    fails(
        "kv-too-small",
        [MODEL, "--gpu-memory-utilization", "0.68", "--max-model-len", "32768"],
        "kv_cache_insufficient_for_max_len",
        "Based on the available memory, the estimated maximum model length is",
    ),
    fails(
        "graph-capture-edge",
        [MODEL, "--gpu-memory-utilization", "0.98", "--max-model-len", "8192"],
        "oom_cudagraph_capture",
        "in capture_model",
    ),
    fails(
        "profiling-oom",
        [MODEL, "--max-num-batched-tokens", "2000000"],
        "oom_during_profiling",
        "in profile_run",
    ),
]


def failed_start(env, args, category: str, message: str) -> str:
    """Run ``serve ARGS``, check it failed at startup with ``message`` and ``category``; the output."""
    done = run_cli(env, "serve", *args)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert message in out
    assert "RuntimeError: Engine core initialization failed. See root cause above." in out
    assert classify(out).category == category
    return out


@pytest.mark.parametrize(FAILURE_FIELDS, FAILURES)
def test_startup_failures_print_the_real_message_and_exit_non_zero(
    sim, scenario, overrides, args, category, message
):
    out = failed_start(sim(scenario, **overrides), args, category, message)
    diagnosis = classify(out)
    if category == "kv_cache_insufficient_for_max_len":
        assert 0 < diagnosis.facts["estimated_max_model_len"] < 32768
    if category == "oom_weights_load":
        assert "Model loading took" not in out


def test_graph_capture_edge_097_boots(sim):
    """rtx-4090's scenario: 0.98 fails in CUDA-graph capture (above), 0.97 serves."""
    text = serve_until_ready(
        sim("rtx-4090"),
        MODEL,
        "--gpu-memory-utilization",
        "0.97",
        "--max-model-len",
        "8192",
        stop_at=("Application startup complete.", "Error"),
    )
    assert "Application startup complete." in text
    assert "Graph capturing finished" in text
    assert "--kv-cache-memory=" in text


def test_hang_never_becomes_ready(sim):
    env = sim("hang")
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_cli(env, "serve", MODEL, timeout=2.0)
    out = (caught.value.stdout or b"").decode()
    assert "Model loading took" in out
    assert "Application startup complete." not in out


def test_no_simulated_state_fails_like_a_machine_without_a_driver(sim):
    env = sim("rtx-4090")
    bare = {k: v for k, v in env.env.items() if k != "VLLM_TUNE_SIM_STATE"}
    full = {k: v for k, v in os.environ.items() if k != "VLLM_TUNE_SIM_STATE"}
    done = subprocess.run(
        [sys.executable, "-m", "vllm_tuner.simlite", "serve", MODEL],
        capture_output=True,
        text=True,
        env={**full, **bare},
        timeout=20,
    )
    assert done.returncode != 0
    assert "Failed to infer device type" in done.stdout + done.stderr


MORE_FAILURES = [
    fails(
        "tp2-no-kv-memory",
        ["qwen2.5-14b", "-tp", "2", "--gpu-memory-utilization", "0.6"],
        "no_kv_cache_memory",
        "WorkerProc hit an exception.",
        scenario="rtx-3090",
    ),
    fails(
        "tp2-busy-second-gpu",
        [MODEL, "-tp", "2", "--gpu-memory-utilization", "0.9"],
        "startup_free_memory_below_utilization",
        "Exception: WorkerProc initialization failed due to an exception in a background process.",
        scenario="shared-3090",
    ),
    fails(
        "kv-bytes-too-large",
        [MODEL, "--kv-cache-memory-bytes", "20G", "--max-model-len", "4096"],
        "oom_during_profiling",
        "in initialize_kv_cache",
    ),
    fails(
        "auto-fit-nothing",
        [MODEL, "--max-model-len", "auto", "--gpu-memory-utilization", "0.55"],
        "no_kv_cache_memory",
        "Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token.",
    ),
    fails(
        "cotenant-release",
        [MODEL, "--max-model-len", "4096", "--gpu-memory-utilization", "0.7"],
        "profiling_memory_changed",
        "AssertionError: Error in memory profiling. Initial free memory",
        scenario="cotenant-release",
    ),
]


@pytest.mark.parametrize(FAILURE_FIELDS, MORE_FAILURES)
def test_more_startup_failures(sim, scenario, overrides, args, category, message):
    out = failed_start(sim(scenario, **overrides), args, category, message)
    assert "EngineCore failed to start." in out
    if "-tp" in args:
        assert "(Worker_TP0 pid=" in out


def test_cotenant_release_fires_once_then_the_launch_boots(sim):
    env = sim("cotenant-release")
    args = [MODEL, "--max-model-len", "4096", "--gpu-memory-utilization", "0.7"]
    first = run_cli(env, "serve", *args)
    assert "Error in memory profiling" in first.stdout
    text = serve_until_ready(env, *args)
    assert "Application startup complete." in text and "Error in memory profiling" not in text


def test_auto_fit_logs_the_fitted_length(sim):
    text = serve_until_ready(
        sim("rtx-4090"), MODEL, "--max-model-len", "auto", "--gpu-memory-utilization", "0.68"
    )
    assert "Auto-fit max_model_len: reduced from 32768 to " in text
    diagnosis = classify(text)
    assert diagnosis.category == "success"
    assert 0 < diagnosis.facts["max_model_len"] < 32768


def test_startup_log_order_and_realistic_times(sim):
    text = serve_until_ready(sim("slow-start", time_scale=2000), MODEL, "--max-model-len", "8192")
    order = [
        "vLLM server version 0.33.0, serving model qwen2.5-7b",
        "non-default args:",
        "Using max model len 8192",
        "Initializing a V1 LLM engine",
        "Loading safetensors checkpoint shards: 100% Completed",
        "Model loading took ",
        "torch.compile took",
        "Available KV cache memory: ",
        "CUDA graph memory profiling is enabled",
        "GPU KV cache size: ",
        "Graph capturing finished in ",
        "CUDA graph pool memory: ",
        "--kv-cache-memory=",
        "init engine (profile, create kv cache, warmup model) took",
        "Starting vLLM server on http://0.0.0.0:0",
        "Application startup complete.",
    ]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "GiB memory and 300.000000 seconds" in text  # slow start: logged at realistic seconds
    assert re.search(
        r"GPU KV cache size: \d{1,3}(,\d{3})+ tokens, Maximum concurrency for 8,192 tokens", text
    )
    assert re.search(
        r"^\(EngineCore pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[gpu_worker\.py:773\] ", text, re.M
    )
    second = serve_until_ready(sim("slow-start", time_scale=2000), MODEL, "--max-model-len", "8192")
    assert "Dynamo bytecode transform time" in second  # a fresh state folder compiles again


def test_compile_cache_is_reused_until_a_compile_key_changes(sim):
    env = sim("rtx-4090")
    first = serve_until_ready(env, MODEL, "--max-model-len", "8192")
    again = serve_until_ready(env, MODEL, "--max-model-len", "8192", "--gpu-memory-utilization", "0.9")
    other = serve_until_ready(env, MODEL, "--max-model-len", "4096")
    assert "Dynamo bytecode transform time" in first
    assert "Directly load the compiled graph(s)" in again
    assert "Dynamo bytecode transform time" in other
