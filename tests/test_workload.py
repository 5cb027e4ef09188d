"""The soak workload: the default mix, replay buckets, length files, merging, driving streams."""

from __future__ import annotations

import threading

import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.probe import LoadReport
from vllm_tuner.workload import (
    Stream,
    default_workload,
    merge_reports,
    read_prompt_lengths,
    replay_workload,
    run_workload,
)

GIB = 1 << 30


def test_the_default_mix_climbs_to_the_worst_case_and_adds_short_requests():
    work = default_workload(concurrency=8, context=32768, duration_s=100, warmup_s=40)
    worst = [s for s in work.streams if s.name == "worst case"]
    assert [s.start_s for s in worst] == [0, 10, 20, 30]
    assert sum(s.concurrency for s in worst) == 8
    assert all(s.prompt_tokens + s.max_tokens == 32768 for s in worst)
    (short,) = [s for s in work.streams if s.name == "short"]
    assert short == Stream("short", 2, 512, 128)
    assert work.describe() == "8 × 28672+4096 tokens (worst case) + 2 × 512+128 tokens (short)"


def test_without_warmup_the_worst_case_starts_at_once_and_short_requests_are_optional():
    work = default_workload(concurrency=3, context=1024, duration_s=10, short_requests=False)
    assert work.streams == (Stream("worst case", 3, 896, 128, 0.0),)


def test_replay_shares_concurrency_by_bucket_and_caps_at_the_context():
    lengths = [(100, 50)] * 6 + [(2000, 100)] * 3 + [(90000, 10)]
    work = replay_workload(lengths, concurrency=8, context=32768, duration_s=60)
    assert sum(s.concurrency for s in work.streams) == 8
    assert max(s.prompt_tokens + s.max_tokens for s in work.streams) <= 32768
    assert (
        work.streams[0].prompt_tokens == 100 and work.streams[0].concurrency >= work.streams[-1].concurrency
    )
    with pytest.raises(UsageError):
        replay_workload([], concurrency=1, context=10, duration_s=1)


def test_length_files_in_three_shapes(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text(
        'prompt,output\n# a comment\n1834,256\n\n77\n{"prompt_tokens": 500, "completion_tokens": 20}\n'
    )
    assert read_prompt_lengths(path) == [(1834, 256), (77, 128), (500, 20)]
    path.write_text("12\nabc\n")
    with pytest.raises(UsageError) as info:
        read_prompt_lengths(path)
    assert "line 2" in str(info.value)
    with pytest.raises(UsageError):
        read_prompt_lengths(tmp_path / "missing.txt")


def test_merging_takes_peaks_sums_and_the_slowest_stream():
    a = LoadReport(
        ok=True,
        requests=10,
        peak_used_bytes={0: 20 * GIB},
        headroom_bytes={0: 4 * GIB},
        preemptions=1,
        latency_p50_s=0.2,
        latency_p99_s=0.4,
        max_kv_usage=0.3,
        duration_s=5,
    )
    b = LoadReport(
        ok=False,
        requests=3,
        errors={"http_5xx": 2},
        peak_used_bytes={0: 22 * GIB},
        headroom_bytes={0: 2 * GIB},
        preemptions=0,
        latency_p50_s=1.0,
        latency_p99_s=3.0,
        max_kv_usage=0.7,
        duration_s=6,
        first_error="500",
    )
    m = merge_reports([a, b])
    assert m.requests == 13 and m.errors == {"http_5xx": 2} and not m.ok
    assert m.peak_used_bytes == {0: 22 * GIB} and m.headroom_bytes == {0: 2 * GIB}
    assert (m.preemptions, m.max_kv_usage, m.latency_p50_s, m.latency_p99_s) == (1, 0.7, 1.0, 3.0)
    assert m.first_error == "500" and merge_reports([]).requests == 0


def test_run_workload_drives_every_stream_at_its_time_and_ticks():
    calls: list[tuple[int, int, float]] = []
    lock = threading.Lock()

    def fake_probe(base_url, *, concurrency, prompt_tokens, duration_s, **kw):
        with lock:
            calls.append((concurrency, prompt_tokens, round(duration_s, 1)))
        return LoadReport(
            ok=True, requests=concurrency, peak_used_bytes={0: GIB}, headroom_bytes={0: 9 * GIB}
        )

    ticks = []
    work = default_workload(concurrency=2, context=2048, duration_s=0.6, warmup_s=0.4)
    report = run_workload(
        "http://127.0.0.1:9",
        work,
        model="m",
        nvml=None,
        gpu_ids=[0],
        is_alive=lambda: True,
        on_tick=ticks.append,
        tick_s=0.05,
        probe=fake_probe,
    )
    assert sorted(c[:2] for c in calls) == [(1, 512), (1, 1792), (1, 1792)]
    assert sorted(c[2] for c in calls)[0] < 0.6  # the second worst-case stream joined later
    assert report.requests == 3 and report.ok and ticks and ticks[0].remaining_s <= 0.6


def test_run_workload_skips_streams_after_the_server_died():
    started = []

    def fake_probe(base_url, *, concurrency, **kw):
        started.append(concurrency)
        return LoadReport(ok=False, server_died=True)

    work = default_workload(concurrency=4, context=2048, duration_s=1.0, warmup_s=0.8, short_requests=False)
    report = run_workload(
        "http://127.0.0.1:9",
        work,
        model="m",
        nvml=None,
        gpu_ids=[0],
        is_alive=lambda: not started,
        tick_s=0.05,
        probe=fake_probe,
    )
    assert started == [1] and report.server_died
