"""Metrics parsing and the worst-case load probe against the simulated vLLM."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from vllm_tuner.probe import (
    MetricSample,
    kv_usage_from_metrics,
    metric_samples,
    parse_metrics,
    probe_prompt,
    run_load_probe,
    unique_prompt,
)
from vllm_tuner.serveconfig import ServeConfig

SAMPLE = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:num_requests_waiting{engine="0",model_name="m"} 3
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
vllm:e2e_request_latency_seconds_bucket{le="1.0"} 4
vllm:e2e_request_latency_seconds_sum 12.5
vllm:cache_config_info{block_size="16",gpu_memory_utilization="0.9",num_gpu_blocks="2278"} 1.0
garbage line
vllm:weird{a="b"} NaN
"""


def test_parse_metrics():
    metrics = parse_metrics(SAMPLE)
    assert metrics["vllm:kv_cache_usage_perc"] == pytest.approx(0.75)  # summed over engines
    assert metrics["vllm:num_requests_waiting"] == 3
    assert metrics["vllm:num_preemptions_total"] == 7
    assert metrics["vllm:e2e_request_latency_seconds_sum"] == 12.5
    assert "vllm:e2e_request_latency_seconds_bucket" not in metrics
    assert metrics["num_gpu_blocks"] == 2278
    assert "vllm:cache_config_info" not in metrics


def test_one_reader_of_the_metrics_text_serves_the_probe_and_deploy_status():
    samples = metric_samples(SAMPLE)
    assert samples[0] == MetricSample("vllm:kv_cache_usage_perc", {"engine": "0", "model_name": "m"}, 0.25)
    assert [s.name for s in samples].count("vllm:e2e_request_latency_seconds_bucket") == 1
    assert not any(s.name.startswith(("#", "garbage")) for s in samples)
    assert kv_usage_from_metrics(SAMPLE) == 0.5  # the fullest engine, where parse_metrics sums them
    assert kv_usage_from_metrics("nothing here") is None


def test_every_request_has_its_own_first_block_so_prefix_caching_cannot_share_kv():
    base = probe_prompt(4000, seed=0, vocab_size=32000)
    assert len(base) == 4000 and all(100 <= t < 31900 for t in base)
    prompts = [unique_prompt(base, f"0:1:{n}", vocab_size=32000) for n in range(200)]
    assert all(len(p) == 4000 and p[16:] == base[16:] for p in prompts)
    assert len({tuple(p[:4]) for p in prompts}) == 200  # distinct from the very first tokens
    assert unique_prompt(base, "0:1:7", vocab_size=32000) == prompts[7]  # reproducible
    assert unique_prompt(base, "0:2:7", vocab_size=32000)[:16] != prompts[7][:16]  # another probe run
    assert unique_prompt([5, 6], "a", vocab_size=10) != unique_prompt([5, 6], "b", vocab_size=10)


SERVED = ServeConfig("qwen2.5-7b", max_model_len=2048, max_num_seqs=4)


def _probe_server(proc, nvml, **load) -> object:
    """The load probe against a served simulated vLLM on GPU 0, with ``load``'s shape."""
    return run_load_probe(
        proc.base_url,
        model=proc.served_model_name,
        concurrency=4,
        nvml=nvml,
        gpu_ids=[0],
        is_alive=lambda: proc.returncode is None,
        vocab_size=1000,
        **load,
    )


def test_load_probe_reports_requests_memory_and_kv(sim, sim_server, tmp_path):
    # 1 ms decode steps at this scale: 400 tokens last ~400 ms, so /metrics is sampled mid-flight
    env = sim("rtx-5090", models={"qwen2.5-7b": {"runtime_spike_gib": 0.0}}, timing={"decode_step_s": 0.4})
    with env.open_nvml() as nvml:
        idle = nvml.memory(0).used
        with sim_server(env, SERVED, tmp_path / "probe.log", nvml=nvml) as proc:
            report = _probe_server(proc, nvml, prompt_tokens=1600, max_tokens=400, duration_s=None)
    assert report.ok, report
    assert report.requests == 4
    assert report.errors == {}
    assert not report.server_died
    assert report.peak_used_bytes[0] > idle
    total = 31.36 * (1 << 30)
    assert report.headroom_bytes[0] == pytest.approx(total - report.peak_used_bytes[0], abs=1)
    assert report.max_kv_usage > 0
    assert report.latency_p50_s is not None and report.latency_p99_s >= report.latency_p50_s
    assert report.ttft_p50_s is not None


def test_load_probe_reports_a_server_dying_mid_probe(sim, sim_server, tmp_path):
    env = sim("rtx-5090", models={"qwen2.5-7b": {"runtime_spike_gib": 400}})
    with env.open_nvml() as nvml, sim_server(env, SERVED, tmp_path / "probe.log", nvml=nvml) as proc:
        started = time.monotonic()
        report = _probe_server(proc, nvml, prompt_tokens=2000, max_tokens=40, duration_s=30)
        took = time.monotonic() - started
    assert report.server_died
    assert not report.ok
    assert took < 5  # noticed at once, not at the end of the 30 s probe
    assert proc.watcher.finalize(exit_code=1).category == "oom_at_runtime"


class FakeVllm:
    """An in-process ``httpx.MockTransport`` handler: streamed completions, a preemption counter."""

    def __init__(self, *, preemptions_before: int, status_for: dict[int, int] | None = None) -> None:
        self.preemptions = preemptions_before
        self.status_for = status_for or {}
        self.prompts: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"vllm:num_preemptions_total {self.preemptions}\n")
        body = json.loads(request.content)
        with self.lock:
            number = len(self.prompts)
            self.prompts.append(body["prompt"])
            self.preemptions += 1  # every request is preempted once
        status = self.status_for.get(number, 200)
        if status != 200:
            return httpx.Response(status, text="nope")
        chunks = "".join(f'data: {{"choices":[{{"text":"t{i}"}}]}}\n\n' for i in range(body["max_tokens"]))
        return httpx.Response(200, text=chunks + "data: [DONE]\n\n")


def _probe_fake(fake: FakeVllm, **overrides) -> object:
    args = dict(
        model="m",
        concurrency=3,
        prompt_tokens=64,
        max_tokens=4,
        duration_s=None,
        nvml=None,
        gpu_ids=[0],
        is_alive=lambda: True,
        client=httpx.Client(transport=httpx.MockTransport(fake)),
    )
    args.update(overrides)
    return run_load_probe("http://127.0.0.1:1", **args)


def test_preemptions_count_only_those_during_the_probe_and_prompts_never_repeat():
    fake = FakeVllm(preemptions_before=40)
    report = _probe_fake(fake)
    assert report.ok and report.requests == 3
    assert report.preemptions == 3  # not the 40 from before the probe
    again = _probe_fake(fake)  # a second probe on the same server
    assert again.preemptions == 3
    heads = {tuple(p[:16]) for p in fake.prompts}
    assert len(fake.prompts) == 6 and len(heads) == 6
    assert all(len(p) == 64 for p in fake.prompts)


def test_errors_are_counted_by_kind():
    fake = FakeVllm(preemptions_before=0, status_for={0: 500, 1: 400})
    report = _probe_fake(fake)
    assert not report.ok
    assert report.errors == {"http_5xx": 1, "http_4xx": 1}
    assert report.requests == 1
    assert report.first_error.startswith(("500", "400"))
