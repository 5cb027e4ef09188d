"""Shapes real vLLM logs take that a clean fixture does not: wrapped, indented or cut messages, a graph
capture OOM raised from torch's ``capture_end``, startups that never finish, and the traceback vLLM 0.32
prints while it shuts down on SIGTERM.

Wordings are vLLM 0.32's (``vllm/v1/engine/core.py``, ``core_client.py``, ``async_llm.py``,
``entrypoints/launchers``) and torch's (``torch/cuda/graphs.py``).
"""

from __future__ import annotations

import pytest

from vllm_tuner.logparse import LogWatcher, classify

SITE = "/usr/local/lib/python3.12/dist-packages"
API = "(APIServer pid=4120) INFO 11-05 12:18:{s:02d} [{f}] "
CORE = "(EngineCore_DP0 pid=4180) INFO 11-05 12:18:{s:02d} [{f}] "
ERR = "(EngineCore_DP0 pid=4180) ERROR 11-05 12:19:32 [core.py:1501] "
API_ERR = "(APIServer pid=4120) ERROR 11-05 12:30:03 [async_llm.py:906] "

STARTUP = [
    API.format(s=1, f="api_utils.py:327")
    + "vLLM server version 0.32.0, serving model Qwen/Qwen2.5-7B-Instruct",
    API.format(s=2, f="model.py:2152") + "Using max model len 32768",
    CORE.format(s=4, f="core.py:134")
    + "Initializing a V1 LLM engine (v0.32.0) with config: model='Qwen/Qwen2.5-7B'",
]
LOADING = [
    CORE.format(s=5, f="gpu_model_runner.py:4980") + "Starting to load model Qwen/Qwen2.5-7B-Instruct..."
]
PROFILING = [
    CORE.format(s=9, f="default_loader.py:502") + "Loading weights took 3.87 seconds",
    CORE.format(s=10, f="gpu_model_runner.py:5150")
    + "Model loading took 14.25 GiB memory and 4.712093 seconds",
    CORE.format(s=28, f="gpu_worker.py:436") + "Available KV cache memory: 4.39 GiB",
    CORE.format(s=28, f="kv_cache_utils.py:2328")
    + "GPU KV cache size: 82,192 tokens, Maximum concurrency for 32,768 tokens per request: 2.51x",
]
CAPTURE_PROGRESS = (
    "(EngineCore_DP0 pid=4180) Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████▍     "
    "| 30/67 [00:04<00:05,  7.21it/s]"
)
READY = [
    CORE.format(s=40, f="gpu_model_runner.py:6582") + "Graph capturing finished in 9 secs, took 0.58 GiB",
    CORE.format(s=41, f="core.py:403") + "init engine (profile, create kv cache, warmup model) took 35.27 s",
    API.format(s=42, f="entry.py:136") + "Supported tasks: ['generate']",
    API.format(s=42, f="entry.py:140") + "Starting vLLM server on http://0.0.0.0:8000",
    "(APIServer pid=4120) INFO:     Started server process [4120]",
    "(APIServer pid=4120) INFO:     Waiting for application startup.",
    "(APIServer pid=4120) INFO:     Application startup complete.",
    '(APIServer pid=4120) INFO:     127.0.0.1:52718 - "GET /health HTTP/1.1" 200 OK',
]


def _frames(*frames: tuple[str, int, str, str]) -> list[str]:
    lines = []
    for path, number, func, code in frames:
        lines += [f'  File "{path}", line {number}, in {func}', f"    {code}"]
    return lines


CAPTURE_FRAMES = [
    (
        f"{SITE}/vllm/v1/engine/core.py",
        157,
        "__init__",
        "kv_cache_config = self._initialize_kv_caches(vllm_config)",
    ),
    (
        f"{SITE}/vllm/v1/engine/core.py",
        379,
        "_initialize_kv_caches",
        "self.model_executor.compile_or_warm_up_model()",
    ),
    (f"{SITE}/vllm/v1/executor/abstract.py", 142, "compile_or_warm_up_model", "self.collective_rpc("),
    (
        f"{SITE}/vllm/v1/worker/gpu_worker.py",
        962,
        "compile_or_warm_up_model",
        "self.model_runner.capture_model()",
    ),
    (f"{SITE}/vllm/v1/worker/gpu_model_runner.py", 6560, "capture_model", "self._capture_cudagraphs("),
    (f"{SITE}/vllm/v1/worker/gpu_model_runner.py", 6679, "_capture_cudagraphs", "self._warmup_and_capture("),
    (f"{SITE}/vllm/v1/worker/gpu_model_runner.py", 6624, "_warmup_and_capture", "self._dummy_run("),
    (f"{SITE}/vllm/v1/worker/gpu_model_runner.py", 5830, "_dummy_run", "outputs = self.model("),
    (f"{SITE}/vllm/compilation/cuda_graph.py", 314, "__call__", "with torch.cuda.graph("),
    (f"{SITE}/torch/cuda/graphs.py", 477, "__exit__", "self.cuda_graph.capture_end()"),
    (f"{SITE}/torch/cuda/graphs.py", 169, "capture_end", "super().capture_end()"),
]
CUDA_OOM = [
    "RuntimeError: CUDA error: out of memory",
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect.",
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1",
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
]
INIT_FAILED = [
    "(APIServer pid=4120) RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {}",
]


def _engine_error(body: list[str]) -> list[str]:
    return [
        ERR + line for line in ["EngineCore failed to start.", "Traceback (most recent call last):", *body]
    ]


# --------------------------------------------------------------------------------------------------
# Messages wrapped, indented or cut


def test_a_message_wrapped_by_a_terminal_at_60_columns() -> None:
    text = "\n".join(
        [
            *STARTUP,
            *LOADING,
            *PROFILING,
            ERR + "ValueError: To serve at least one request with the model's",
            "max seq len (32768), (4.0 GiB KV cache is needed, which is",
            "larger than the available KV cache memory (2.69 GiB). Based",
            "on the available memory, the estimated maximum model length",
            "is 22032. Try increasing `gpu_memory_utilization` or",
            "decreasing `max_model_len` when initializing the engine.",
        ]
    )
    diagnosis = classify(text)
    assert diagnosis.category == "kv_cache_insufficient_for_max_len"
    assert diagnosis.evidence.startswith("ValueError: To serve at least one request with the model's max seq")
    assert diagnosis.facts["needed_gib"] == 4.0 and diagnosis.facts["available_kv_gib"] == 2.69
    assert diagnosis.facts["estimated_max_model_len"] == 22032


def test_a_message_with_indented_continuation_lines() -> None:
    text = "\n".join(
        [
            *STARTUP,
            ERR + "ValueError: Free memory on device cuda:0 (18.1/23.53 GiB) on startup is less than",
            ERR + "    desired GPU memory utilization (0.9, 21.18 GiB). Decrease GPU memory utilization",
            ERR + "    or reduce GPU memory used by other processes.",
            *INIT_FAILED,
        ]
    )
    diagnosis = classify(text)
    assert diagnosis.category == "startup_free_memory_below_utilization"
    assert diagnosis.facts == {
        "vllm_version": "0.32.0",
        "max_model_len": 32768,
        "free_gib": 18.1,
        "total_gib": 23.53,
        "gpu_memory_utilization": 0.9,
        "requested_gib": 21.18,
    }


@pytest.mark.parametrize(
    ("cut", "category", "facts"),
    [
        (
            "ValueError: To serve at least one request with the model's max seq len (32768), (4.0 GiB KV cache is nee",
            "kv_cache_insufficient_for_max_len",
            {"max_model_len": 32768},
        ),
        (
            "ValueError: No available memory for the cache blo",
            "no_kv_cache_memory",
            {},
        ),
        (
            "ValueError: Free memory on device cuda:0 (18.1/23.53 GiB) on startup is less than desired GPU mem",
            "startup_free_memory_below_utilization",
            {"free_gib": 18.1, "total_gib": 23.53},
        ),
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1",
            "oom_during_profiling",
            {"tried_to_allocate_gib": 2.0},
        ),
    ],
)
def test_a_message_cut_mid_sentence(cut: str, category: str, facts: dict) -> None:
    diagnosis = classify("\n".join([*STARTUP, *LOADING, *PROFILING[:2], ERR + cut]))
    assert diagnosis.category == category
    for key, value in facts.items():
        assert diagnosis.facts[key] == value
    assert "total_gib" not in diagnosis.facts or "free_gib" in facts  # a number cut short is not read


def test_engine_budget_after_external_weights_is_the_startup_check() -> None:
    line = (
        "ValueError: Free memory on device cuda:0 (12.5/23.53 GiB) on startup is less than the engine's budget "
        "after excluding external process's weights (0.9, 14.2 GiB). Decrease GPU memory utilization or "
        "reduce GPU memory used by other processes."
    )
    diagnosis = classify(line)
    assert diagnosis.category == "startup_free_memory_below_utilization"
    assert diagnosis.facts == {"free_gib": 12.5, "total_gib": 23.53}


# --------------------------------------------------------------------------------------------------
# CUDA graph capture OOM raised from torch/cuda/graphs.py


def test_capture_end_oom_in_a_full_log() -> None:
    lines = [
        *STARTUP,
        *LOADING,
        *PROFILING,
        CAPTURE_PROGRESS,
        *_engine_error([*_frames(*CAPTURE_FRAMES), *CUDA_OOM]),
        *INIT_FAILED,
    ]
    watcher = LogWatcher()
    for line in lines:
        events = watcher.feed(line)
        if line.endswith("RuntimeError: CUDA error: out of memory"):
            assert [e.name for e in events if e.kind == "fatal"] == ["oom_cudagraph_capture"]
    diagnosis = watcher.finalize()
    assert diagnosis == classify("\n".join(lines))
    assert diagnosis.category == "oom_cudagraph_capture" and not diagnosis.inferred
    assert diagnosis.evidence == "RuntimeError: CUDA error: out of memory"
    assert diagnosis.phase == "capturing"


def test_capture_end_oom_from_the_stack_alone() -> None:
    """A pasted fragment: the last frames and the error, no progress line, nothing from the startup."""
    fragment = "\n".join(["Traceback (most recent call last):", *_frames(*CAPTURE_FRAMES[-2:]), *CUDA_OOM])
    assert classify(fragment).category == "oom_cudagraph_capture"
    only_torch = "\n".join(["Traceback (most recent call last):", *_frames(CAPTURE_FRAMES[-2]), CUDA_OOM[0]])
    assert classify(only_torch).category == "oom_cudagraph_capture"
    # the same error with no frames at all is still a runtime one (a server under load)
    assert classify(CUDA_OOM[0]).category == "oom_at_runtime"


# --------------------------------------------------------------------------------------------------
# An OOM before "Application startup complete" is a startup OOM of the last phase reached

RUNTIME_FRAMES = [
    (f"{SITE}/vllm/v1/engine/core.py", 1520, "run_busy_loop", "self._process_engine_step()"),
    (
        f"{SITE}/vllm/v1/worker/gpu_model_runner.py",
        4320,
        "execute_model",
        "model_output = self._model_forward(",
    ),
]
TORCH_OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.02 GiB. GPU 0 has a total capacity of "
    "23.53 GiB of which 612.00 MiB is free."
)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (STARTUP, "oom_weights_load"),
        (STARTUP + LOADING, "oom_weights_load"),
        (STARTUP + LOADING + PROFILING[:2], "oom_during_profiling"),
        (STARTUP + LOADING + PROFILING + [CAPTURE_PROGRESS], "oom_cudagraph_capture"),
    ],
    ids=["started", "loading", "profiling", "capturing"],
)
@pytest.mark.parametrize("frames", [[], RUNTIME_FRAMES], ids=["no-frames", "serving-frames"])
def test_oom_before_ready_is_named_by_the_phase(progress: list[str], frames: list, expected: str) -> None:
    text = "\n".join([*progress, *_engine_error([*_frames(*frames), TORCH_OOM]), *INIT_FAILED])
    diagnosis = classify(text)
    assert diagnosis.category == expected
    assert diagnosis.facts["tried_to_allocate_gib"] == 1.02
    # the frames without their error line (a truncated paste) are judged the same way
    truncated = "\n".join([*progress, *_engine_error(_frames(*frames))])
    if frames:
        inferred = classify(truncated)
        assert inferred.category == expected and inferred.inferred


def test_the_same_oom_after_ready_is_a_runtime_one() -> None:
    text = "\n".join(
        [
            *STARTUP,
            *LOADING,
            *PROFILING,
            *READY,
            ERR + "EngineCore encountered a fatal error.",
            ERR + "Traceback (most recent call last):",
            *[ERR + line for line in _frames(*RUNTIME_FRAMES)],
            ERR + TORCH_OOM,
        ]
    )
    assert classify(text).category == "oom_at_runtime"


# --------------------------------------------------------------------------------------------------
# A startup that ends, or is given up on, during graph capture

CAPTURING = [
    *STARTUP,
    *LOADING,
    *PROFILING,
    CORE.format(s=29, f="gpu_worker.py:955") + "Compile and warming up model for size 512",
    CAPTURE_PROGRESS,
]

# What 0.32 prints when SIGTERM reaches it before uvicorn runs: the API server's init handler raises
# KeyboardInterrupt("terminated") (entrypoints/launchers/api_server/entry.py), the engine core logs it.
SIGTERM_DURING_STARTUP = [
    CORE.format(s=59, f="core.py:1455") + "[shutdown] EngineCore: trigger received signal=SIGTERM",
    "(APIServer pid=4120) Traceback (most recent call last):",
    *[
        "(APIServer pid=4120) " + line
        for line in _frames(
            ("/usr/local/bin/vllm", 10, "<module>", "sys.exit(main())"),
            (f"{SITE}/vllm/entrypoints/cli/main.py", 73, "main", "args.dispatch_function(args)"),
            (
                f"{SITE}/vllm/v1/engine/utils.py",
                1004,
                "wait_for_engine_startup",
                "events = poller.poll(5000)",
            ),
            (
                f"{SITE}/vllm/entrypoints/launchers/api_server/entry.py",
                172,
                "_interrupt_init",
                'raise KeyboardInterrupt("terminated")',
            ),
        )
    ],
    "(APIServer pid=4120) KeyboardInterrupt: terminated",
]


def test_a_log_that_ends_during_graph_capture_says_so() -> None:
    diagnosis = classify("\n".join(CAPTURING))
    assert diagnosis.category == "unknown" and diagnosis.phase == "capturing"
    assert "capturing CUDA graphs" in diagnosis.evidence
    assert "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%" in diagnosis.evidence


def test_a_timeout_during_graph_capture_says_so() -> None:
    watcher = LogWatcher()
    watcher.feed_text("\n".join(CAPTURING))
    diagnosis = watcher.finalize(timed_out=True)
    assert diagnosis.category == "startup_timeout" and diagnosis.phase == "capturing"
    assert diagnosis.evidence.startswith(
        "no fatal line before the startup timeout while capturing CUDA graphs"
    )
    assert "30/67" in diagnosis.evidence


def test_the_stop_after_a_timeout_is_not_a_crash() -> None:
    """The tuner gives up, sends SIGTERM, then finalizes: the interrupt's traceback is how it stopped."""
    watcher = LogWatcher()
    events = watcher.feed_text("\n".join([*CAPTURING, *SIGTERM_DURING_STARTUP]))
    assert not [e for e in events if e.kind == "fatal"]
    diagnosis = watcher.finalize(timed_out=True)
    assert diagnosis.category == "startup_timeout" and not diagnosis.inferred
    assert "capturing CUDA graphs" in diagnosis.evidence
    pasted = classify("\n".join([*CAPTURING, *SIGTERM_DURING_STARTUP]))
    assert pasted.category == "unknown" and pasted.phase == "capturing"
    assert "stopped while capturing CUDA graphs" in pasted.evidence


def test_a_stray_traceback_before_a_timeout_is_not_a_crash() -> None:
    watcher = LogWatcher()
    watcher.feed_text(
        "\n".join(
            [
                *CAPTURING[:-1],
                "Traceback (most recent call last):",
                *_frames((f"{SITE}/vllm/utils/import_utils.py", 88, "_try_import", "import flashinfer")),
                "ModuleNotFoundError: No module named 'flashinfer'",
                CAPTURE_PROGRESS,
            ]
        )
    )
    diagnosis = watcher.finalize(timed_out=True)
    assert diagnosis.category == "startup_timeout"
    assert "ModuleNotFoundError" in diagnosis.evidence


# --------------------------------------------------------------------------------------------------
# SIGTERM after startup: vLLM 0.32's [shutdown] sequence, with the EngineDeadError it prints


def _engine_dead_traceback(prefix: str) -> list[str]:
    return [
        prefix + line
        for line in [
            "AsyncLLM output_handler failed.",
            "Traceback (most recent call last):",
            *_frames(
                (
                    f"{SITE}/vllm/v1/engine/async_llm.py",
                    849,
                    "output_handler",
                    "outputs = await engine_core.get_output_async()",
                ),
                (
                    f"{SITE}/vllm/v1/engine/core_client.py",
                    1235,
                    "get_output_async",
                    "raise self._format_exception(outputs) from None",
                ),
            ),
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for "
            "the root cause.",
        ]
    ]


def _at(s: int, f: str) -> str:
    return f"(APIServer pid=4120) INFO 11-05 12:30:{s:02d} [{f}] "


SIGTERM_AFTER_READY = [
    _at(2, "launcher.py:254") + "[shutdown] API server: shutdown triggered",
    _at(2, "launcher.py:271") + "[shutdown] API server: stopping engine client mode=abort timeout=0s",
    _at(2, "core_client.py:770") + "[shutdown] MPClient: start timeout=0s",
    _at(2, "core_client.py:772") + "[shutdown] MPClient: stopping engine manager",
    CORE.format(s=2, f="core.py:1455") + "[shutdown] EngineCore: trigger received signal=SIGTERM",
    CORE.format(s=2, f="core.py:1636") + "[shutdown] EngineCore: start mode=abort timeout=0s",
    CORE.format(s=2, f="core.py:1645") + "[shutdown] EngineCore: aborting in-flight requests count=3",
    CORE.format(s=2, f="core.py:1667")
    + "[shutdown] EngineCore: request processing complete; starting resource teardown",
    CORE.format(s=3, f="core.py:1499") + "[shutdown] EngineCore: exiting busy loop",
    _at(2, "utils.py:628") + "[shutdown] Process manager: send sigterm to process EngineCore",
    "(APIServer pid=4120) WARNING 11-05 12:30:02 [utils.py:653] [shutdown] Process manager: force killing "
    "remaining process EngineCore pid 4180",
    _at(3, "core_client.py:774") + "[shutdown] MPClient: engine manager stopped",
    _at(3, "core_client.py:775") + "[shutdown] MPClient: cleaning up background resources",
    *_engine_dead_traceback(API_ERR),
    _at(3, "core_client.py:777") + "[shutdown] MPClient: complete",
    _at(3, "launcher.py:279") + "[shutdown] API server: engine client stopped",
    _at(3, "launcher.py:282") + "[shutdown] API server: signalling HTTP server shutdown",
    _at(3, "launcher.py:304") + "[shutdown] API server: shutting down FastAPI HTTP server",
    "INFO:     Shutting down",  # uvicorn's own lines carry no process prefix
    "INFO:     Waiting for application shutdown.",
    "INFO:     Application shutdown complete.",
    "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear "
    "to be 2 leaked shared_memory objects to clean up at shutdown",
]


@pytest.mark.parametrize("exit_code", [None, 0, -15, 1])
def test_sigterm_after_ready_is_a_stop_not_a_death(exit_code: int | None) -> None:
    watcher = LogWatcher()
    watcher.feed_text("\n".join([*STARTUP, *LOADING, *PROFILING, *READY]))
    events = watcher.feed_text("\n".join(SIGTERM_AFTER_READY))
    assert not [e for e in events if e.kind == "fatal"]  # the tuner is not told the server died
    assert watcher.fatal_category is None and watcher.phase == "serving"
    diagnosis = watcher.finalize(exit_code=exit_code)
    assert diagnosis.category == "success", diagnosis.evidence
    assert "stopped" in diagnosis.evidence and "shutdown triggered" in diagnosis.evidence


def test_sigterm_to_the_engine_alone_after_ready_is_a_stop() -> None:
    """`kill <engine pid>`: the engine logs the signal, the front end then finds it gone."""
    lines = [
        CORE.format(s=2, f="core.py:1455") + "[shutdown] EngineCore: trigger received signal=SIGTERM",
        CORE.format(s=3, f="core.py:1499") + "[shutdown] EngineCore: exiting busy loop",
        "(APIServer pid=4120) WARNING 11-05 12:30:03 [core_client.py:818] [shutdown] MPClient: engine core "
        "exited unexpectedly; starting cleanup",
        *_engine_dead_traceback(API_ERR),
    ]
    text = "\n".join([*STARTUP, *PROFILING, *READY, *lines])
    assert classify(text).category == "success"


def test_an_older_uvicorn_shutdown_before_the_engine_dead_error_is_a_stop() -> None:
    lines = [
        "(APIServer pid=4120) INFO:     Shutting down",
        "(APIServer pid=4120) INFO:     Waiting for application shutdown.",
        "(APIServer pid=4120) INFO:     Application shutdown complete.",
        *_engine_dead_traceback(API_ERR),
    ]
    assert classify("\n".join([*STARTUP, *PROFILING, *READY, *lines])).category == "success"


def test_a_death_before_the_stop_is_still_a_death() -> None:
    """The engine died on its own, then the tuner stopped what was left: the death counts."""
    died = [
        "(APIServer pid=4120) WARNING 11-05 12:29:58 [core_client.py:818] [shutdown] MPClient: engine core "
        "exited unexpectedly; starting cleanup",
        *_engine_dead_traceback(API_ERR),
        "(APIServer pid=4120) INFO:     Shutting down",
    ]
    watcher = LogWatcher()
    watcher.feed_text("\n".join([*STARTUP, *PROFILING, *READY]))
    fatal = [e.name for e in watcher.feed_text("\n".join(died)) if e.kind == "fatal"]
    assert fatal == ["engine_core_died_other"]
    watcher.feed_text("\n".join(SIGTERM_AFTER_READY))
    assert watcher.finalize(exit_code=-15).category != "success"
    oom = [
        ERR + "EngineCore encountered a fatal error.",
        ERR + "Traceback (most recent call last):",
        *[ERR + line for line in _frames(*RUNTIME_FRAMES)],
        ERR + TORCH_OOM,
    ]
    text = "\n".join([*STARTUP, *PROFILING, *READY, *oom, *SIGTERM_AFTER_READY])
    assert classify(text).category == "oom_at_runtime"


def test_a_front_end_failure_after_the_engine_is_signalled_still_counts() -> None:
    """Before startup completes the engine's "trigger received signal" can come from its own front end
    shutting it down after a failure; the front end's error printed after it is the cause."""
    lines = [
        *STARTUP,
        *PROFILING,
        CORE.format(s=41, f="core.py:403")
        + "init engine (profile, create kv cache, warmup model) took 35.27 s",
        CORE.format(s=42, f="core.py:1455") + "[shutdown] EngineCore: trigger received signal=SIGTERM",
        "(APIServer pid=4120) Traceback (most recent call last):",
        *[
            "(APIServer pid=4120) " + line
            for line in _frames(("/usr/local/bin/vllm", 10, "<module>", "sys.exit(main())"))
        ],
        "(APIServer pid=4120) OSError: [Errno 98] Address already in use",
    ]
    assert classify("\n".join(lines)).category == "port_in_use"
