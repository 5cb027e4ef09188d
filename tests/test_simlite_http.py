"""The simulated vLLM once serving: HTTP API, simulated NVML, death under load."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from vllm_tuner.logparse import classify
from vllm_tuner.probe import parse_metrics
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite.activate import create, load_nvml

MODEL = "qwen2.5-7b"
GIB = 1 << 30


@pytest.fixture
def booted(sim_server, tmp_path: Path):
    """``with booted(env, *extra, max_model_len=4096, nvml=None, wait=True, wait_release=True) as server``:
    :func:`conftest.sim_server` serving ``MODEL``, its log at ``tmp_path / "server.log"``."""

    def serve(env, *extra: str, max_model_len: int = 4096, **options):
        config = ServeConfig(MODEL, max_model_len=max_model_len, extra_args=tuple(extra))
        return sim_server(env, config, tmp_path / "server.log", **options)

    return serve


def test_endpoints_answer_like_vllm(sim, booted):
    env = sim("rtx-5090")
    with booted(env, "--served-model-name", "chat") as server:
        url = server.base_url
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ping").status_code == 200
        assert httpx.get(f"{url}/version").json() == {"version": "0.33.0"}
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["id"] == "chat" and models[0]["max_model_len"] == 4096
        metrics = parse_metrics(httpx.get(f"{url}/metrics").text)
        for key in (
            "vllm:kv_cache_usage_perc",
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:num_preemptions_total",
            "num_gpu_blocks",
        ):
            assert key in metrics
        assert metrics["num_gpu_blocks"] > 0

        done = httpx.post(f"{url}/v1/completions", json={"model": "chat", "prompt": "hello", "max_tokens": 5})
        assert done.status_code == 200
        assert done.json()["usage"]["completion_tokens"] == 5
        ids = httpx.post(
            f"{url}/v1/completions", json={"model": "chat", "prompt": list(range(100, 400)), "max_tokens": 3}
        ).json()
        assert ids["usage"]["prompt_tokens"] == 300
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        ).json()
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"]["role"] == "assistant"

        for path, body in (
            ("/v1/completions", {"prompt": "x", "max_tokens": 4, "stream": True}),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True},
            ),
        ):
            with httpx.stream("POST", f"{url}{path}", json={"model": "chat", **body}) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                events = [line for line in resp.iter_lines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]"
            assert len(events) == 5
            json.loads(events[0][5:])

        too_long = httpx.post(
            f"{url}/v1/completions", json={"model": "chat", "prompt": [7] * 5000, "max_tokens": 4}
        )
        assert too_long.status_code == 400
        err = too_long.json()["error"]
        assert err["type"] == "BadRequestError" and err["code"] == 400
        assert "maximum context length is 4096 tokens" in err["message"]
        assert "5000 input tokens" in err["message"]


def test_api_key_is_required_on_v1(sim, booted):
    env = sim("rtx-5090")
    with booted(env, "--api-key", "s3cret") as server:
        url = server.base_url
        assert httpx.get(f"{url}/v1/models").status_code == 401
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open, as in vLLM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_nvml_sees_memory_appear_and_disappear(sim, booted, sig):
    env = sim("rtx-5090")
    with env.open_nvml() as nvml:
        before = nvml.memory(0).used
        assert nvml.device_count() == 2
        assert nvml.device(0).name == "NVIDIA GeForce RTX 5090"
        with booted(env, nvml=nvml):
            serving = nvml.memory(0).used
            assert serving - before > 10 * GIB  # weights + KV pool
            assert nvml.memory(1).used == before  # CUDA_VISIBLE_DEVICES=0 only
            pids = [p.pid for p in nvml.processes(0)]
            assert len(pids) == 1
            os.kill(pids[0], sig)  # the vLLM process itself, not the reaper
            deadline = time.monotonic() + 5
            while nvml.memory(0).used != before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert nvml.memory(0).used == before
            assert nvml.processes(0) == []


def test_foreign_memory_is_visible(sim):
    env = sim("rtx-5090", foreign=[{"gpu": 1, "gib": 3, "pid": 777}])
    with env.open_nvml() as nvml:
        assert nvml.memory(1).used == 3 * GIB
        assert [(p.pid, p.used) for p in nvml.processes(1)] == [(777, 3 * GIB)]
        assert nvml.memory(0).used == 0


def test_shim_without_state_is_a_machine_without_a_driver(tmp_path):
    module = load_nvml(tmp_path / "no-machine")  # no scenario.json there
    with pytest.raises(module.NVMLError) as caught:
        module.nvmlInit()
    assert "NVML Shared Library Not Found" in str(caught.value)
    with pytest.raises(module.NVMLError):
        module.nvmlDeviceGetCount()


def test_each_machine_has_its_own_nvml_and_this_process_is_untouched(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_TUNE_SIM_STATE", raising=False)
    before = (dict(os.environ), list(sys.path), sys.modules.get("pynvml"))
    one = create("rtx-5090", state_dir=tmp_path / "one", overrides={"foreign": [{"gpu": 1, "gib": 3}]})
    two = create("rtx-4090", state_dir=tmp_path / "two")
    with one.open_nvml() as first, two.open_nvml() as second:
        assert (first.device_count(), first.memory(1).used) == (2, 3 * GIB)
        assert second.device_count() == 1 and "4090" in second.device(0).name
    assert (dict(os.environ), list(sys.path), sys.modules.get("pynvml")) == before


def test_runtime_spike_kills_the_server_under_load(sim, booted, tmp_path):
    env = sim("rtx-5090", models={"Qwen/Qwen2.5-7B-Instruct": {"runtime_spike_gib": 400}})
    with booted(env, "--max-num-seqs", "8", "--gpu-memory-utilization", "0.9", wait_release=False) as server:
        url = server.base_url
        body = {"model": MODEL, "prompt": [5] * 3000, "max_tokens": 1000}
        with httpx.Client(timeout=10) as client:
            try:
                client.post(f"{url}/v1/completions", json=body)
            except httpx.HTTPError:
                pass
            deadline = time.monotonic() + 5
            health = 200
            while time.monotonic() < deadline and health == 200:
                try:
                    health = client.get(f"{url}/health").status_code
                except httpx.HTTPError:
                    health = -1  # connection refused: the process already exited
                time.sleep(0.02)
        assert health in (503, -1)
        deadline = time.monotonic() + 5
        while server.returncode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.returncode not in (None, 0)
    text = (tmp_path / "server.log").read_text()
    assert "in execute_model" in text
    assert "EngineDeadError" in text
    assert classify(text).category == "oom_at_runtime"


def test_metrics_histograms_and_prompt_at_the_limit(sim, booted):
    env = sim("rtx-5090")
    with booted(env, max_model_len=1024) as server:
        url = server.base_url
        ok = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": [1] * 1000, "max_tokens": 500}
        )
        assert ok.status_code == 200
        assert ok.json()["usage"]["completion_tokens"] == 24  # max_tokens clamped to max_model_len - prompt
        at_limit = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [1] * 1024})
        assert at_limit.status_code == 400
        assert "The decoder prompt (length 1024) plus the number of requested output tokens" in at_limit.text
        text = httpx.get(f"{url}/metrics").text
        assert 'vllm:e2e_request_latency_seconds_count{engine="0",model_name="qwen2.5-7b"} 1' in text
        assert "vllm:time_to_first_token_seconds_bucket{" in text
        assert 'vllm:generation_tokens_total{engine="0",model_name="qwen2.5-7b"} 24.0' in text
        assert 'cache_dtype="auto"' in text


def test_disable_log_stats_removes_the_engine_metrics(sim, booted):
    env = sim("rtx-5090")
    with booted(env, "--disable-log-stats") as server:
        text = httpx.get(f"{server.base_url}/metrics").text
        assert "vllm:kv_cache_usage_perc" not in text
        assert "vllm:num_requests_running" not in text


def test_memory_rises_through_the_startup_phases(sim, booted, tmp_path):
    """A tuner sampling NVML while vLLM starts sees context, then weights, then the KV pool."""
    env = sim("rtx-5090", time_scale=40.0)
    seen: list[int] = []
    with env.open_nvml() as nvml, booted(env, nvml=nvml, wait=False):
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and "Application startup complete." not in (tmp_path / "server.log").read_text()
        ):
            used = nvml.memory(0).used
            if not seen or used != seen[-1]:
                seen.append(used)
            time.sleep(0.01)
        seen.append(nvml.memory(0).used)
    distinct = sorted(set(seen))
    assert len(distinct) >= 4, distinct  # nothing, context, weight shards..., KV pool
    assert seen == sorted(seen)  # it only grows while starting
    assert seen[-1] > 20 * GIB


def test_tokens_stream_one_per_step_and_latency_lands_in_vllm_histograms(sim, booted):
    instant_boot = {
        k: 0.001 for k in ("load_s", "compile_s", "compile_cached_s", "profile_s", "capture_s", "server_s")
    }
    env = sim("rtx-5090", time_scale=1.0, timing=instant_boot)  # serving in real time
    with booted(env, "--load-format", "dummy") as server:
        url = server.base_url
        body = {"model": MODEL, "prompt": [1] * 3000, "max_tokens": 40, "stream": True}
        started = time.monotonic()
        arrivals = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
        metrics = parse_metrics(httpx.get(f"{url}/metrics").text)
    ttft = arrivals[0] - started
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert len(arrivals) == 40
    # 3000 prompt tokens at the 5090's compute take two budget-sized steps; a decode step reads the weights
    assert 0.2 < ttft < 2.0
    assert 0.005 < gaps[len(gaps) // 2] < 0.1 < ttft
    assert metrics["vllm:time_to_first_token_seconds_count"] == 1
    assert 0.2 < metrics["vllm:time_to_first_token_seconds_sum"] <= ttft  # the engine's view starts later
    assert metrics["vllm:inter_token_latency_seconds_count"] == 39
    assert metrics["vllm:request_time_per_output_token_seconds_count"] == 1
    assert metrics["vllm:iteration_tokens_total_sum"] == 3000 + 39
    assert metrics["vllm:prompt_tokens_total"] == 3000 and metrics["vllm:generation_tokens_total"] == 40
