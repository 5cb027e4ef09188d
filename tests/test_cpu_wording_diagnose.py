"""``vllm-tune diagnose`` on a log of vLLM's CPU backend speaks of NUMA nodes and host memory.

The CPU lines are vLLM 0.32's own, as a real CPU run printed them (trimmed to what the parser reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tuner.advice import advise
from vllm_tuner.cli import main
from vllm_tuner.commands.diagnose import render
from vllm_tuner.logparse import Diagnosis, classify

DATA = Path(__file__).parent / "data" / "logs"

API = "(APIServer pid=18417) INFO 12-03 09:21:25 "
CORE = "(EngineCore pid=18482) INFO 12-03 09:21:34 "
WORKER = "(Worker pid=18564) INFO 12-03 09:21:48 "
CPU_SUCCESS = "\n".join(
    [
        API + "[api_utils.py:347]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.32.0",
        API + "[api_utils.py:286] non-default args: {'max_model_len': 2048, 'gpu_memory_utilization': 0.3}",
        API + "[model.py:2152] Using max model len 2048",
        CORE + "[core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='tiny-llama'",
        WORKER + "[cpu_model_runner.py:68] Starting to load model tiny-llama...",
        WORKER
        + "[cpu_worker.py:260] Auto set (2.06/8.71) GiB for KV cache on node 0, with 2.61 GiB requested "
        "memory for the worker. 0.55 GiB memory was consumed by non-kv usages.",
        CORE + "[kv_cache_utils.py:2327] CPU KV cache size: 2,161,280 tokens, Maximum concurrency for 2,048 "
        "tokens per request: 1055.31x",
        CORE + "[core.py:402] init engine (profile, create kv cache, warmup model) took 8.85 s",
        API + "[entry.py:140] Starting vLLM server on http://127.0.0.1:60293",
        "INFO:     Application startup complete.",
    ]
)
CPU_STARTUP_FREE = "\n".join(
    [
        API + "[__init__.py:291] Automatically detected platform cpu.",
        API + "[model.py:2152] Using max model len 4096",
        "(EngineCore pid=4180) ERROR 06-13 20:03:51 [core.py:1346] EngineCore failed to start.",
        "ValueError: Available memory on node 0 (12.24/13.84 GiB) on startup is less than desired CPU memory "
        "utilization (0.97, 13.42 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the "
        "fraction of CPU memory reserved (despite its name).",
    ]
)
GPU_WORDS = ("GPU total", "GPU free", "GPU blocks")


def _human(text: str) -> str:
    diagnosis = classify(text)
    return render(diagnosis, advise(diagnosis))


def _row(out: str, label: str) -> str:
    """The value of one row of the numbers, or "" when there is none."""
    for line in out.splitlines():
        if line.strip().startswith(label + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def test_a_cpu_success_shows_the_platform_the_node_and_what_was_used_outside_the_kv_cache() -> None:
    out = _human(CPU_SUCCESS)
    assert out.startswith("the server started (success)")
    assert _row(out, "platform").startswith("cpu (vLLM's CPU backend")
    assert _row(out, "NUMA node total") == "8.71 GiB"
    assert _row(out, "consumed by non-KV usage") == "0.55 GiB"
    assert _row(out, "requested") == "2.61 GiB"
    assert not any(word in out for word in GPU_WORDS)


def test_a_cpu_startup_check_names_the_nodes_available_memory() -> None:
    out = _human(CPU_STARTUP_FREE)
    assert "(startup_free_memory_below_utilization)" in out.splitlines()[0]
    assert _row(out, "NUMA node available") == "12.24 GiB"
    assert _row(out, "NUMA node total") == "13.84 GiB"
    assert not any(word in out for word in GPU_WORDS)


def test_cpu_blocks_are_kv_cache_blocks() -> None:
    facts = {"platform": "cpu", "num_gpu_blocks": 4096, "total_gib": 8.0, "free_gib": 6.5}
    out = render(Diagnosis("success", facts), [])
    assert _row(out, "KV cache blocks") == "4,096"
    assert not any(word in out for word in GPU_WORDS)


def test_the_platform_row_follows_the_version_and_consumed_follows_requested() -> None:
    out = _human(CPU_SUCCESS)
    labels = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("    ")]
    assert labels.index("platform") == labels.index("vLLM") + 1
    assert labels.index("consumed by non-KV usage") == labels.index("requested") + 1


def test_the_cli_reads_a_cpu_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cpu.log"
    path.write_text(CPU_SUCCESS + "\n")
    assert main(["diagnose", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NUMA node total:" in out and "GPU total" not in out
    assert main(["diagnose", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["facts"]
    assert facts["platform"] == "cpu" and facts["consumed_gib"] == 0.55


def test_gpu_logs_keep_their_words() -> None:
    out = _human((DATA / "startup_free_memory_below_utilization.log").read_text())
    assert _row(out, "GPU total") == "23.53 GiB" and _row(out, "GPU free") == "18.10 GiB"
    assert "platform" not in out and "NUMA" not in out


def test_a_gpu_log_that_names_its_platform_is_shown_as_before() -> None:
    text = (DATA / "startup_free_memory_below_utilization.log").read_text()
    named = API + "[__init__.py:291] Automatically detected platform cuda.\n" + text
    assert classify(named).facts["platform"] == "cuda"
    assert _human(named) == _human(text)


def test_the_gpu_total_option_says_what_it_is_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--help"]) == 0
    assert "NUMA node" in capsys.readouterr().out
