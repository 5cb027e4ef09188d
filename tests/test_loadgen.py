"""The closed-loop load of a throughput sweep: its summary (plain data) and a level on the simulator."""

from __future__ import annotations

import pytest

from vllm_tuner.loadgen import RequestRecord, run_level, summarize
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.traffic import Traffic


def test_summary_counts_the_window_and_measures_requests_started_in_it():
    records = [
        # started in the warm-up: its tokens in the window count, its latency does not
        RequestRecord(started=0.0, first_token=2.0, finished=12.0, output_tokens=11, tokens_in_window=6),
        RequestRecord(started=10.0, first_token=10.5, finished=15.5, output_tokens=11, tokens_in_window=11),
        RequestRecord(started=11.0, first_token=12.0, finished=14.0, output_tokens=5, tokens_in_window=5),
        # started in the window, finished after it (the drain): measured, its late tokens not counted
        RequestRecord(started=19.0, first_token=19.5, finished=23.5, output_tokens=9, tokens_in_window=2),
    ]
    level = summarize(records, concurrency=3, window_start=10.0, window_end=20.0)
    assert level.output_tokens_per_s == pytest.approx((6 + 11 + 5 + 2) / 10)
    assert level.requests_per_s == pytest.approx(3 / 10)  # finished inside the window
    assert level.measured_requests == 3
    assert level.stats["ttft_p50"] == pytest.approx(0.5)
    assert level.stats["ttft_p99"] == pytest.approx(1.0)
    assert level.stats["itl_p50"] == pytest.approx(
        0.5
    )  # (15.5 - 10.5) / 10, (14 - 12) / 4, (23.5 - 19.5) / 8
    assert level.stats["e2e_p95"] == pytest.approx(5.5)
    row = level.row()
    assert row["concurrency"] == 3 and row["output_tokens_per_s"] == 2.4 and row["ttft_p95"] == 1.0


def test_a_level_with_nothing_finished_has_no_latencies():
    level = summarize([], concurrency=8, window_start=0.0, window_end=5.0)
    assert level.output_tokens_per_s == 0 and level.stats["ttft_p95"] is None


def test_a_level_on_the_simulator_measures_throughput_latency_and_kv(sim, sim_server, tmp_path):
    env = sim("rtx-5090", models={"qwen2.5-7b": {"runtime_spike_gib": 0.0}}, timing={"decode_step_s": 0.4})
    traffic = Traffic("rows", rows=((300, 20), (900, 40)))
    cfg = ServeConfig("qwen2.5-7b", max_model_len=2048, max_num_seqs=16)
    with env.open_nvml() as nvml, sim_server(env, cfg, tmp_path / "level.log", nvml=nvml) as proc:
        levels = [
            run_level(
                proc.base_url,
                traffic,
                model=proc.served_model_name,
                concurrency=c,
                duration_s=1.5,
                warmup_s=0.3,
                nvml=nvml,
                gpu_ids=[0],
                is_alive=lambda: proc.returncode is None,
                vocab_size=1000,
            )
            for c in (1, 8)
        ]
    one, eight = levels
    for level in levels:
        assert level.load.ok, level.load
        assert level.measured_requests > 0 and level.stats["ttft_p95"] is not None
        assert level.stats["itl_p50"] > 0 and level.stats["e2e_p99"] >= level.stats["e2e_p50"]
        assert level.load.max_kv_usage > 0 and level.load.peak_used_bytes[0] > 0
    # decode steps are shared by the batch: eight clients stream more tokens than one (how many more
    # is not the simulator's alone at this time scale, where its Python costs more than its steps)
    assert eight.output_tokens_per_s > 1.2 * one.output_tokens_per_s


def test_a_stream_error_object_is_an_error_and_a_token_that_says_error_is_not():
    import json as _json

    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_preemptions_total 0\n")
        body = _json.loads(request.content)
        if body["max_tokens"] == 3:  # the engine failed mid-stream
            text = 'data: {"choices":[{"text":"a"}]}\n\ndata: {"error": {"message": "boom", "code": 500}}\n\n'
        else:
            text = "".join(
                'data: {"choices":[{"text":"\\"error\\""}]}\n\n' for _ in range(body["max_tokens"])
            )
        return httpx.Response(200, text=text + "data: [DONE]\n\n")

    level = run_level(
        "http://fake",
        Traffic("rows", rows=((50, 3), (50, 5))),
        model="m",
        concurrency=2,
        duration_s=0.3,
        warmup_s=0.0,
        nvml=None,
        gpu_ids=[0],
        is_alive=lambda: True,
        client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    assert level.load.errors.get("stream_error", 0) > 0
    assert level.load.requests > 0 and set(level.load.errors) == {"stream_error"}
