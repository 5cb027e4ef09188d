"""The classifier and the live watcher over vLLM 0.33-format logs (tests/data/logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_tuner.logparse import CATEGORIES, LogWatcher, classify, launch_flags, strip_prefix

DATA = Path(__file__).parent / "data" / "logs"

# file stem (= category) -> facts the log prints
EXPECTED: dict[str, dict[str, object]] = {
    "success": {
        "vllm_version": "0.33.0",
        "max_model_len": 32768,
        "weights_gib": 14.25,
        "cudagraph_estimated_gib": 0.62,
        "available_kv_gib": 4.39,
        "kv_cache_tokens": 82192,
        "concurrency_tokens": 32768,
        "max_concurrency": 2.51,
        "cudagraph_gib": 0.58,
        "free_gib": 22.83,
        "total_gib": 23.53,
        "gpu_memory_utilization": 0.9,
        "requested_gib": 21.18,
        "consumed_gib": 14.79,
        "peak_activation_gib": 1.38,
        "kv_cache_memory_fit_bytes": 4595651706,
        "kv_cache_memory_full_bytes": 6367247810,
        "init_seconds": 32.18,
    },
    "kv_cache_insufficient_for_max_len": {
        "available_kv_gib": 2.69,
        "needed_gib": 4.0,
        "estimated_max_model_len": 22032,
        "max_model_len": 32768,
    },
    "no_kv_cache_memory": {"available_kv_gib": -0.35, "weights_gib": 14.25},
    "startup_free_memory_below_utilization": {
        "free_gib": 18.1,
        "total_gib": 23.53,
        "gpu_memory_utilization": 0.9,
        "requested_gib": 21.18,
    },
    "oom_cudagraph_capture": {
        "tried_to_allocate_gib": 20 / 1024,
        "total_gib": 23.53,
        "free_gib": 11.38 / 1024,
    },
    "oom_during_profiling": {"tried_to_allocate_gib": 3.5, "free_gib": 1.21, "process_used_gib": 22.3},
    "oom_weights_load": {"tried_to_allocate_gib": 1.02, "free_gib": 612 / 1024},
    "oom_at_runtime": {"tried_to_allocate_gib": 896 / 1024, "kv_cache_tokens": 82192},
    "mamba_blocks_below_max_num_seqs": {"max_num_seqs": 1024, "max_num_seqs_limit": 868},
    "profiling_memory_changed": {"initial_free_gib": 20.11, "current_free_gib": 22.4},
    "unsupported_flag_or_arg_error": {"unrecognized_arguments": "--swap-space 4"},
    "startup_timeout": {"vllm_version": "0.33.0"},
    "port_in_use": {"vllm_version": "0.33.0"},
    "engine_core_died_other": {"max_model_len": 32768},
}
# The decisive line of each failing log starts with this.
EVIDENCE = {
    "kv_cache_insufficient_for_max_len": "ValueError: To serve at least one request",
    "no_kv_cache_memory": "ValueError: No available memory for the cache blocks",
    "startup_free_memory_below_utilization": "ValueError: Free memory on device cuda:0",
    "oom_cudagraph_capture": "torch.OutOfMemoryError",
    "oom_during_profiling": "torch.OutOfMemoryError",
    "oom_weights_load": "Failed to load model - not enough GPU memory",
    "oom_at_runtime": "torch.OutOfMemoryError",
    "mamba_blocks_below_max_num_seqs": "ValueError: max_num_seqs (1024)",
    "profiling_memory_changed": "AssertionError: Error in memory profiling",
    "unsupported_flag_or_arg_error": "vllm: error: unrecognized arguments",
    "startup_timeout": "TimeoutError: Timed out waiting",
    "port_in_use": "OSError: [Errno 98] Address already in use",
    "engine_core_died_other": "RuntimeError: NCCL error",
}


def _log(name: str) -> str:
    return (DATA / f"{name}.log").read_text()


def test_every_category_has_a_fixture() -> None:
    assert set(EXPECTED) == set(CATEGORIES) - {"unknown"}
    assert {p.stem for p in DATA.glob("*.log")} == set(EXPECTED)


@pytest.mark.parametrize("category", sorted(EXPECTED))
def test_fixture_category_and_facts(category: str) -> None:
    diagnosis = classify(_log(category))
    assert diagnosis.category == category
    assert not diagnosis.inferred
    for key, value in EXPECTED[category].items():
        if isinstance(value, float):
            assert diagnosis.facts[key] == pytest.approx(value, abs=1e-5), key
        else:
            assert diagnosis.facts[key] == value, key
    if category in EVIDENCE:
        assert diagnosis.evidence.startswith(EVIDENCE[category])


@pytest.mark.parametrize("category", sorted(EXPECTED))
def test_watcher_and_classify_agree(category: str) -> None:
    watcher = LogWatcher()
    for line in _log(category).splitlines():
        watcher.feed(line)
    assert watcher.finalize() == classify(_log(category))


def test_phases_advance_and_ready_is_reported_once() -> None:
    watcher = LogWatcher()
    phases, ready = [], []
    for line in _log("success").splitlines():
        for event in watcher.feed(line):
            if event.kind == "phase":
                phases.append(event.name)
            if event.kind == "ready":
                ready.append(event.line_no)
    assert phases == ["loading", "profiling", "capturing", "serving"]
    assert len(ready) == 1 and watcher.ready
    assert watcher.phase == "serving" and watcher.fatal_category is None
    assert watcher.finalize(exit_code=-15).category == "success"  # stopped by the tuner after it was ready


def test_fatal_is_noticed_at_the_fatal_line_and_refined_by_the_root_cause() -> None:
    lines = _log("startup_free_memory_below_utilization").splitlines()
    watcher = LogWatcher()
    fatal: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        fatal += [(number, e.name) for e in watcher.feed(line) if e.kind == "fatal"]
        if "EngineCore failed to start" in line:
            # the death notice comes first: the tuner may start stopping the server now
            assert watcher.fatal_category == "engine_core_died_other"
            assert watcher.phase == "failed"
    root = next(i for i, line in enumerate(lines, 1) if "ValueError: Free memory" in line)
    assert fatal[0][1] == "engine_core_died_other"
    assert (root, "startup_free_memory_below_utilization") in fatal
    assert watcher.fatal_category == "startup_free_memory_below_utilization"


def test_runtime_oom_fatal_arrives_on_its_line() -> None:
    watcher = LogWatcher()
    for line in _log("oom_at_runtime").splitlines():
        events = watcher.feed(line)
        if "torch.OutOfMemoryError" in line:
            assert [e.name for e in events if e.kind == "fatal"] == ["oom_at_runtime"]
            break
    assert watcher.ready and watcher.phase == "failed"


def test_graph_capture_oom_is_placed_by_progress_and_frames() -> None:
    text = _log("oom_cudagraph_capture")
    # without the progress lines the frames alone still say graph capture
    frames_only = "\n".join(line for line in text.splitlines() if "ERROR" in line)
    assert classify(frames_only).category == "oom_cudagraph_capture"
    # without frames, the progress line "Capturing CUDA graphs" decides
    progress_only = "\n".join(line for line in text.splitlines() if " File " not in line)
    assert classify(progress_only).category == "oom_cudagraph_capture"


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ("Starting to load model m...", "oom_weights_load"),
        ("Model loading took 14.25 GiB memory and 5.0 seconds", "oom_during_profiling"),
        ("Compile and warming up model for size 512", "oom_cudagraph_capture"),
        ("Application startup complete.", "oom_at_runtime"),
        ("vLLM server version 0.33.0, serving model m", "oom_weights_load"),
        ("", "oom_at_runtime"),  # a bare OOM line pasted alone: most often a server under load
    ],
)
def test_raw_oom_phase_from_progress(before: str, expected: str) -> None:
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.50 GiB is free."
    diagnosis = classify(f"INFO 11-01 09:43:00 [x.py:1] {before}\n{oom}")
    assert diagnosis.category == expected
    assert diagnosis.facts["tried_to_allocate_gib"] == 2.0


def test_sampler_warmup_wrapper_is_profiling() -> None:
    text = (
        "Compile and warming up model for size 8\n"
        "RuntimeError: CUDA out of memory occurred when warming up sampler with 1024 dummy requests. "
        "Please try lowering `max_num_seqs` or `gpu_memory_utilization` when initializing the engine."
    )
    assert classify(text).category == "oom_during_profiling"


@pytest.mark.parametrize(
    ("line", "category"),
    [
        (
            "vllm serve: error: argument --kv-cache-dtype: invalid choice: 'fp9' (choose from 'auto', 'fp8')",
            "unsupported_flag_or_arg_error",
        ),
        (
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for SchedulerConfig",
            "unsupported_flag_or_arg_error",
        ),
        (
            "ValueError: max_num_batched_tokens (2048) must be greater than or equal to max_num_seqs (4096).",
            "unsupported_flag_or_arg_error",
        ),
        (
            "ValueError: Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token.",
            "no_kv_cache_memory",
        ),
        ("(EngineCore pid=1) RuntimeError: CUDA error: out of memory", "oom_at_runtime"),
    ],
)
def test_one_line_failures(line: str, category: str) -> None:
    assert classify(line).category == category


def test_facts_of_arg_errors() -> None:
    facts = classify(
        "ValueError: max_num_batched_tokens (2048) must be greater than or equal to max_num_seqs (4096)."
    ).facts
    assert facts["max_num_batched_tokens"] == 2048 and facts["max_num_seqs"] == 4096


def test_finalize_without_a_fatal_line() -> None:
    watcher = LogWatcher()
    for line in _log("startup_timeout").splitlines()[:6]:  # still loading, no error yet
        watcher.feed(line)
    assert watcher.fatal_category is None
    assert watcher.finalize(timed_out=True).category == "startup_timeout"
    assert watcher.finalize(exit_code=1).category == "engine_core_died_other"
    assert watcher.finalize().category == "unknown"


def test_exit_after_ready_with_an_error_code_is_a_death() -> None:
    watcher = LogWatcher()
    watcher.feed_text(_log("success"))
    assert watcher.finalize(exit_code=1).category == "engine_core_died_other"


def test_stall_timer_tracks_progress_lines_only() -> None:
    watcher = LogWatcher()
    watcher.feed("INFO 11-01 09:43:00 [x.py:1] Starting to load model m...")
    assert watcher.last_progress_line_no == 1
    watcher.feed("WARNING 11-01 09:43:01 [x.py:1] some unrelated warning")
    assert watcher.last_progress_line_no == 1
    watcher.feed("Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:03<00:03]")
    assert watcher.last_progress_line_no == 3


def test_tail_keeps_the_last_lines() -> None:
    watcher = LogWatcher()
    for index in range(100):
        watcher.feed(f"line {index}")
    assert watcher.tail(3) == ["line 97", "line 98", "line 99"]
    assert len(watcher.tail()) == 40


def test_fact_events_report_numbers_as_they_are_printed() -> None:
    watcher = LogWatcher()
    events = watcher.feed(
        "(EngineCore pid=1) INFO 11-01 09:43:23 [kv_cache_utils.py:1148] GPU KV cache size: "
        "1,234,560 tokens, Maximum concurrency for 32,768 tokens per request: 37.68x"
    )
    facts = {e.name: e.value for e in events if e.kind == "fact"}
    assert facts == {"kv_cache_tokens": 1234560, "concurrency_tokens": 32768, "max_concurrency": 37.68}


def test_strip_prefix() -> None:
    assert strip_prefix(
        "(EngineCore_DP0 pid=1) ERROR 11-05 12:19:32 [core.py:708] EngineCore failed to start."
    ) == ("EngineCore failed to start.")
    assert strip_prefix(
        "2024-06-28T06:11:52.685Z (LLMRayActor pid=2) INFO 06-28 06:11:45 x.py:45] # GPU blocks: 3"
    ) == ("# GPU blocks: 3")
    assert strip_prefix("[rank0]: Traceback (most recent call last):") == "Traceback (most recent call last):"


def test_launch_flags_from_non_default_args_and_commands() -> None:
    assert launch_flags(_log("success")) == {
        "--max-model-len": 32768,
        "--gpu-memory-utilization": 0.9,
        "--max-num-seqs": 256,
    }
    command = (
        "vllm serve Qwen/Qwen2.5-72B --gpu-memory-utilization=0.8 --max-model-len 131072 --enforce-eager"
    )
    assert launch_flags(command) == {
        "--gpu-memory-utilization": 0.8,
        "--max-model-len": 131072,
        "--enforce-eager": True,
    }
    # short forms by their long names, as vLLM reads them
    assert launch_flags(
        "python -m vllm.entrypoints.openai.api_server --model m -tp 2 -O0 --max_num_seqs 4"
    ) == {
        "--tensor-parallel-size": 2,
        "--optimization-level": 0,
        "--max-num-seqs": 4,
    }


def test_the_weights_offload_reads_what_vllm_moved_to_cpu_memory() -> None:
    log = (
        "(Worker_TP0 pid=7) INFO 01-20 10:00:01 [uva.py:69] Total CPU offloaded parameters: 4.37\n"
        "(Worker_TP0 pid=7) INFO 01-20 10:00:09 [model_runner.py:429] Model loading took 23.8496 GiB memory "
        "and 20.000000 seconds\n"
    )
    facts = classify(log).facts
    assert facts["offloaded_gib"] == 4.37 and facts["weights_gib"] == 23.8496
