"""vLLM's CPU backend (0.32): the KV cache is a share of one NUMA node's memory, and its lines name it so.

The lines are vLLM 0.32's own wording (``vllm/v1/worker/cpu_worker.py``, ``vllm/v1/core/kv_cache_utils.py``);
the numbers are the ones a CPU run printed.
"""

from __future__ import annotations

import pytest

from vllm_tuner.advice import advise
from vllm_tuner.logparse import LogWatcher, classify

API = "(APIServer pid=4120) INFO 06-13 20:03:{s:02d} [{f}] "
CORE = "(EngineCore pid=4180) INFO 06-13 20:03:{s:02d} [{f}] "
CORE_ERR = "(EngineCore pid=4180) ERROR 06-13 20:03:51 [core.py:1346] "

STARTUP = [
    API.format(s=1, f="__init__.py:291") + "Automatically detected platform cpu.",
    API.format(s=2, f="api_utils.py:327")
    + "vLLM server version 0.32.0, serving model Qwen/Qwen2.5-0.5B-Instruct",
    API.format(s=2, f="api_utils.py:286")
    + "non-default args: {'model_tag': 'Qwen/Qwen2.5-0.5B-Instruct', 'max_model_len': 4096, "
    "'gpu_memory_utilization': 0.2}",
    API.format(s=5, f="model.py:2152") + "Using max model len 4096",
    CORE.format(s=9, f="core.py:134")
    + "Initializing a V1 LLM engine (v0.32.0) with config: model='Qwen/Qwen2.5-0.5B-Instruct'",
    CORE.format(s=12, f="cpu_model_runner.py:68") + "Starting to load model Qwen/Qwen2.5-0.5B-Instruct...",
    CORE.format(s=14, f="default_loader.py:502") + "Loading weights took 0.61 seconds",
    CORE.format(s=15, f="cpu_model_runner.py:87") + "Warming up model for the compilation...",
    CORE.format(s=49, f="cpu_model_runner.py:91") + "Warming up done.",
]
WORKER = "(Worker pid=4226) INFO 06-13 20:03:{s:02d} [{f}] "
AUTO_SET = (
    WORKER.format(s=50, f="cpu_worker.py:260")
    + "Auto set (2.16/13.84) GiB for KV cache on node 0, with 2.77 GiB "
    "requested memory for the worker. 0.61 GiB memory was consumed by non-kv usages."
)
KV_SIZE = (
    CORE.format(s=50, f="kv_cache_utils.py:2328")
    + "CPU KV cache size: 2,260,480 tokens, Maximum concurrency for 4,096 tokens per request: 551.88x"
)
READY = [
    CORE.format(s=51, f="core.py:403") + "init engine (profile, create kv cache, warmup model) took 36.12 s",
    API.format(s=52, f="entry.py:136") + "Supported tasks: ['generate']",
    API.format(s=52, f="entry.py:140") + "Starting vLLM server on http://0.0.0.0:8000",
    "(APIServer pid=4120) INFO:     Started server process [4120]",
    "(APIServer pid=4120) INFO:     Waiting for application startup.",
    "(APIServer pid=4120) INFO:     Application startup complete.",
]
DEATH = [
    CORE_ERR + "EngineCore failed to start.",
    CORE_ERR + "Traceback (most recent call last):",
    CORE_ERR
    + '  File "/opt/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py", line 1482, in run_engine_core',
    CORE_ERR + "    engine_core = EngineCoreProc(*args, engine_index=dp_rank, **kwargs)",
]
FAILED_TO_START = (
    "(APIServer pid=4120) RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {}"
)

STARTUP_FREE = (
    "ValueError: Available memory on node 0 (12.24/13.84 GiB) on startup is less than desired CPU memory "
    "utilization (0.97, 13.42 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the "
    "fraction of CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` "
    "(e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes."
)
KV_NEEDED = (
    "ValueError: To serve at least one request with the model's max seq len (4096), (0.0 GiB KV cache is "
    "needed, which is larger than the available KV cache memory (0.0 GiB). Based on the available memory, "
    "the estimated maximum model length is 896. Try increasing `gpu_memory_utilization` (which also "
    "controls CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. "
    "See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
EXPLICIT_ZERO = (
    CORE.format(s=50, f="cpu_worker.py:232") + "Explicitly set (0.0/13.84) GiB for KV cache on node 0."
)


def _kv_refusal(available: str, kv: str) -> str:
    tail = (
        "Reduce CPU memory used by other processes."
        if "/" in kv
        else "Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other "
        "processes."
    )
    return (
        f"ValueError: Available memory on node 0 ({available}/13.84 GiB) on kv cache allocation is less "
        f"than requested memory for kv ({kv} GiB). {tail}"
    )


def _failing(lines_before: list[str], error: str) -> str:
    return "\n".join([*lines_before, *DEATH, CORE_ERR + error, FAILED_TO_START])


def _facts_equal(facts: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert (
            facts.get(key) == pytest.approx(value) if isinstance(value, float) else facts.get(key) == value
        ), key


def _watch(text: str) -> tuple[LogWatcher, list]:
    watcher = LogWatcher()
    return watcher, watcher.feed_text(text)


# --------------------------------------------------------------------------------------------------
# A CPU server that starts


def test_auto_set_and_cpu_kv_cache_size_are_read_as_the_gpu_numbers() -> None:
    text = "\n".join([*STARTUP, AUTO_SET, KV_SIZE, *READY])
    diagnosis = classify(text)
    assert diagnosis.category == "success" and diagnosis.phase == "serving"
    _facts_equal(
        diagnosis.facts,
        {
            "platform": "cpu",
            "vllm_version": "0.32.0",
            "max_model_len": 4096,
            "available_kv_gib": 2.16,
            "total_gib": 13.84,
            "requested_gib": 2.77,
            "consumed_gib": 0.61,
            "kv_cache_tokens": 2260480,
            "concurrency_tokens": 4096,
            "max_concurrency": 551.88,
            "init_seconds": 36.12,
        },
    )
    assert "free_gib" not in diagnosis.facts  # the Auto set line does not print what was free


def test_cpu_startup_phases() -> None:
    watcher, events = _watch("\n".join([*STARTUP, AUTO_SET, KV_SIZE, *READY]))
    assert [e.name for e in events if e.kind == "phase"] == ["loading", "profiling", "capturing", "serving"]
    # warming up is the CPU's profile run: the Auto set line comes at its end
    watcher = LogWatcher()
    watcher.feed_text("\n".join(STARTUP))
    assert watcher.progress_phase == "profiling"


def test_a_tiny_explicit_kv_cache_printed_as_zero_is_not_a_missing_one() -> None:
    """``--kv-cache-memory-bytes 4000000`` prints "(0.0/13.84)": a few MiB, not none."""
    watcher, events = _watch("\n".join([*STARTUP, EXPLICIT_ZERO]))
    assert watcher.fatal_category is None and not [e for e in events if e.kind == "fatal"]
    assert watcher.facts["available_kv_gib"] == 0.0 and watcher.facts["total_gib"] == 13.84
    started = classify("\n".join([*STARTUP, EXPLICIT_ZERO, KV_SIZE, *READY]))
    assert started.category == "success"


# --------------------------------------------------------------------------------------------------
# Failures, each with its GPU twin's category


def test_startup_free_memory_below_the_fraction() -> None:
    diagnosis = classify(_failing(STARTUP[:5], STARTUP_FREE))
    assert diagnosis.category == "startup_free_memory_below_utilization"
    assert diagnosis.evidence.startswith(
        "ValueError: Available memory on node 0 (12.24/13.84 GiB) on startup"
    )
    _facts_equal(
        diagnosis.facts,
        {"free_gib": 12.24, "total_gib": 13.84, "gpu_memory_utilization": 0.97, "requested_gib": 13.42},
    )
    first = advise(diagnosis)[0]
    # 12.24 / 13.84 = 0.884, less the 0.01 margin: 0.87 of the node fits
    assert first.changes == {"--gpu-memory-utilization": 0.87}
    assert "LOWER" in first.text and "12.24 of 13.84 GiB" in first.text
    assert all("nvidia-smi" not in a.text and "GPU" not in a.text for a in advise(diagnosis))


def test_the_startup_check_fires_on_its_line() -> None:
    watcher = LogWatcher()
    for line in _failing(STARTUP[:5], STARTUP_FREE).splitlines():
        events = watcher.feed(line)
        if "on startup is less than" in line:
            assert [e.name for e in events if e.kind == "fatal"] == ["startup_free_memory_below_utilization"]


def test_kv_needed_with_a_tiny_explicit_kv_cache_is_not_no_kv_memory() -> None:
    diagnosis = classify(_failing([*STARTUP, EXPLICIT_ZERO], KV_NEEDED))
    assert diagnosis.category == "kv_cache_insufficient_for_max_len"
    assert diagnosis.evidence.startswith("ValueError: To serve at least one request")
    _facts_equal(
        diagnosis.facts,
        {"max_model_len": 4096, "estimated_max_model_len": 896, "needed_gib": 0.0, "available_kv_gib": 0.0},
    )
    advice = advise(diagnosis, {"--kv-cache-memory-bytes": 4_000_000})
    assert advice[0].changes == {"--max-model-len": 768}
    # the KV cache is the flag's size, not a share of the node: raise the flag to keep 4096
    # 4,000,000 bytes hold 896 tokens; 4096 tokens need 4096 / 896 of it (17.4 MiB), 2% more, in MiB
    assert advice[1].changes == {"--kv-cache-memory-bytes": 18 * 2**20}
    assert "17.4 MiB" in advice[1].text
    assert not any("--enforce-eager" in a.changes for a in advice)  # no CUDA graphs on the CPU
    assert "0.00 GiB" not in " ".join(a.text for a in advice)


def test_kv_allocation_refused_for_lack_of_available_memory() -> None:
    """Auto mode: the KV share (2.16 GiB of the 2.77 GiB request) is more than the node has available."""
    diagnosis = classify(_failing(STARTUP, _kv_refusal("1.5", "2.16/2.77")))
    assert diagnosis.category == "startup_free_memory_below_utilization"
    assert diagnosis.evidence.startswith("ValueError: Available memory on node 0 (1.5/13.84 GiB) on kv cache")
    # free for this worker = what is available + what it already holds (2.77 - 2.16)
    _facts_equal(
        diagnosis.facts,
        {
            "total_gib": 13.84,
            "requested_gib": 2.77,
            "available_kv_gib": 2.16,
            "consumed_gib": 0.61,
            "free_gib": 2.11,
        },
    )
    first = advise(diagnosis, {"--gpu-memory-utilization": 0.2})[0]
    # 2.11 / 13.84 - 0.01 = 0.142: at 0.14 the request is 1.94 GiB, 1.33 of it for KV, under the 1.5
    assert first.changes == {"--gpu-memory-utilization": 0.14}


def test_kv_allocation_refused_because_the_worker_fills_its_share() -> None:
    """Auto mode, a KV share of zero or less: the model alone fills the fraction; raise it."""
    diagnosis = classify(_failing(STARTUP, _kv_refusal("9.5", "-0.23/1.39")))
    assert diagnosis.category == "no_kv_cache_memory"
    assert diagnosis.evidence.startswith("ValueError: Available memory on node 0 (9.5/13.84 GiB) on kv cache")
    _facts_equal(
        diagnosis.facts,
        {"available_kv_gib": -0.23, "requested_gib": 1.39, "consumed_gib": 1.62, "free_gib": 11.12},
    )
    first = advise(diagnosis)[0]
    # the fraction in use is 1.39 / 13.84 = 0.10; 0.23 GiB short plus 1 GiB of KV cache: + 0.089
    assert "RAISE" in first.text and first.changes == {"--gpu-memory-utilization": 0.19}
    zero = classify(_failing(STARTUP, _kv_refusal("9.5", "0.0/1.39")))
    assert zero.category == "no_kv_cache_memory"


def test_raising_the_fraction_stops_at_what_the_node_has_free() -> None:
    diagnosis = classify(_failing(STARTUP, _kv_refusal("0.3", "-0.5/6.92")))
    assert diagnosis.category == "no_kv_cache_memory"
    first = advise(diagnosis, {"--gpu-memory-utilization": 0.5})[0]
    # 0.5 + 1.5 / 13.84 = 0.61 would be needed; only (0.3 + 7.42) / 13.84 - 0.01 = 0.548 fits
    assert first.changes == {"--gpu-memory-utilization": 0.54}
    assert "7.72" in first.text


def test_kv_allocation_refused_with_an_explicit_size() -> None:
    diagnosis = classify(_failing(STARTUP, _kv_refusal("1.5", "4.0")))
    assert diagnosis.category == "startup_free_memory_below_utilization"
    _facts_equal(diagnosis.facts, {"free_gib": 1.5, "total_gib": 13.84, "available_kv_gib": 4.0})
    assert "requested_gib" not in diagnosis.facts
    first = advise(diagnosis, {"--kv-cache-memory-bytes": 4 * 2**30})[0]
    # what is available less the 1% margin of the node (0.14 GiB), in whole MiB
    assert first.changes == {"--kv-cache-memory-bytes": int((1.5 - 0.1384) * 1024) * 2**20}
    assert "--kv-cache-memory-bytes" in first.text and "LOWER" in first.text


# --------------------------------------------------------------------------------------------------
# The same lines as real logs show them: wrapped, indented, cut


def test_cpu_lines_wrapped_by_a_terminal() -> None:
    wrapped = (
        "(EngineCore pid=4180) ERROR 06-13 20:03:51 [core.py:1346] ValueError: Available memory on node 0\n"
        "(12.24/13.84 GiB) on startup is less than desired CPU memory utilization (0.97,\n"
        "13.42 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the\n"
        "fraction of CPU memory reserved (despite its name)."
    )
    diagnosis = classify(wrapped)
    assert diagnosis.category == "startup_free_memory_below_utilization"
    _facts_equal(
        diagnosis.facts,
        {"free_gib": 12.24, "total_gib": 13.84, "gpu_memory_utilization": 0.97, "requested_gib": 13.42},
    )
    auto_set = (
        "INFO 06-13 20:03:50 [cpu_worker.py:252] Auto set (2.16/13.84) GiB for KV cache on node 0,\n"
        "    with 2.77 GiB requested memory for the worker. 0.61 GiB memory was consumed by\n"
        "    non-kv usages."
    )
    _facts_equal(
        classify(auto_set).facts,
        {"available_kv_gib": 2.16, "total_gib": 13.84, "requested_gib": 2.77, "consumed_gib": 0.61},
    )


def test_cpu_lines_cut_mid_sentence() -> None:
    cut = "ValueError: Available memory on node 0 (12.24/13.84 GiB) on startup is less than desired CPU memory utilization (0.97, 13.4"
    diagnosis = classify(cut)
    assert diagnosis.category == "startup_free_memory_below_utilization"
    _facts_equal(diagnosis.facts, {"free_gib": 12.24, "total_gib": 13.84, "gpu_memory_utilization": 0.97})
    assert "requested_gib" not in diagnosis.facts
    assert advise(diagnosis)[0].changes == {"--gpu-memory-utilization": 0.87}
    # a fraction cut in its middle ("(0.9" of 0.97) is not read as 0.9
    assert "gpu_memory_utilization" not in classify(cut[: cut.index("0.97") + 3]).facts
    refusal = (
        "ValueError: Available memory on node 0 (1.5/13.84 GiB) on kv cache allocation is less than requ"
    )
    assert classify(refusal).category == "startup_free_memory_below_utilization"


def test_a_cpu_startup_given_up_on_after_the_kv_cache_says_where() -> None:
    watcher = LogWatcher()
    watcher.feed_text("\n".join([*STARTUP, AUTO_SET, KV_SIZE, READY[0]]))
    diagnosis = watcher.finalize(timed_out=True)
    assert diagnosis.category == "startup_timeout"
    assert "while warming up the engine" in diagnosis.evidence and "CUDA" not in diagnosis.evidence
