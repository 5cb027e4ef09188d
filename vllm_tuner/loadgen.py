"""A closed loop of C clients on a running server: what one concurrency level of the sweep measures.

Each client sends a streamed ``/v1/completions`` (token-id prompt of the workload's next request,
``ignore_eos`` so it decodes its full output), waits for it to finish and sends the next: at most C
sequences run at once, as ``--max-num-seqs C`` would allow. A level runs ``warmup_s`` (not measured:
the first prefills land together), then a window of ``duration_s``; then no request starts and those
in flight finish.

Per request it records TTFT, ITL (the mean gap between its streamed tokens after the first) and
end-to-end latency; the level reports output tokens/s and requests/s over the window (tokens that
streamed inside it, requests that finished inside it), percentiles of the three latencies over the
requests that started in it, and what the server showed meanwhile (KV usage, preemptions, memory)
in a ``probe.LoadReport`` that ``trial.probe_verdict`` judges as it judges any load.

:func:`summarize` is pure; :func:`run_level` drives the clients.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from .probe import LoadReport, _percentile, _preemptions, _sample, probe_prompt, unique_prompt
from .traffic import Traffic

PERCENTILES = (50, 90, 95, 99)
_RUNS = itertools.count()


@dataclass(frozen=True)
class RequestRecord:
    """One finished request: when it started, its first and last token (absolute clock), its tokens
    and how many of them streamed inside the level's window."""

    started: float
    first_token: float | None
    finished: float
    output_tokens: int
    tokens_in_window: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def itl_s(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finished - self.started


@dataclass
class LevelReport:
    concurrency: int
    window_s: float
    output_tokens_per_s: float
    requests_per_s: float
    stats: dict[str, float | None]  # ttft_p50 .. e2e_p99, seconds (None: no request to measure)
    measured_requests: int
    load: LoadReport = field(default_factory=LoadReport)

    def as_record(self) -> dict:
        """What the store keeps of the level (JSON): enough to judge it and show its row again."""
        load = self.load
        return {
            "concurrency": self.concurrency,
            "window_s": self.window_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "stats": dict(self.stats),
            "measured_requests": self.measured_requests,
            "load": {
                "ok": load.ok,
                "requests": load.requests,
                "errors": dict(load.errors),
                "server_died": load.server_died,
                "peak_used_bytes": {str(k): v for k, v in load.peak_used_bytes.items()},
                "headroom_bytes": {str(k): v for k, v in load.headroom_bytes.items()},
                "max_kv_usage": load.max_kv_usage,
                "preemptions": load.preemptions,
                "first_error": load.first_error,
            },
        }

    @classmethod
    def from_record(cls, rec: dict) -> LevelReport:
        """The level :meth:`as_record` kept."""
        load = dict(rec.get("load") or {})
        for key in ("peak_used_bytes", "headroom_bytes"):
            load[key] = {int(k): v for k, v in (load.get(key) or {}).items()}
        return cls(
            rec["concurrency"],
            rec["window_s"],
            rec["output_tokens_per_s"],
            rec["requests_per_s"],
            dict(rec["stats"]),
            rec["measured_requests"],
            LoadReport(**load),
        )

    def row(self) -> dict:
        """The table row (and ``--json``'s)."""
        return {
            "concurrency": self.concurrency,
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 3),
            **{k: None if v is None else round(v, 4) for k, v in self.stats.items()},
            "kv_usage": round(self.load.max_kv_usage, 3),
            "preemptions": self.load.preemptions,
            "requests": self.measured_requests,
            "errors": sum(self.load.errors.values()),
        }


def summarize(
    records: Sequence[RequestRecord], *, concurrency: int, window_start: float, window_end: float
) -> LevelReport:
    """Throughput over ``[window_start, window_end]`` and latency percentiles of the requests that
    started inside it."""
    window = max(1e-9, window_end - window_start)
    tokens = sum(r.tokens_in_window for r in records)
    done = sum(1 for r in records if window_start <= r.finished <= window_end)
    measured = [r for r in records if window_start <= r.started <= window_end]
    stats: dict[str, float | None] = {}
    for name, values in (
        ("ttft", [r.ttft_s for r in measured if r.ttft_s is not None]),
        ("itl", [r.itl_s for r in measured if r.itl_s is not None]),
        ("e2e", [r.e2e_s for r in measured]),
    ):
        for p in PERCENTILES:
            stats[f"{name}_p{p}"] = _percentile(values, p / 100) if values else None
    return LevelReport(concurrency, window, tokens / window, done / window, stats, len(measured))


def run_level(
    base_url: str,
    traffic: Traffic,
    *,
    model: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    nvml,
    gpu_ids: Sequence[int],
    is_alive: Callable[[], bool],
    numbers: Iterator[int] | None = None,
    client: httpx.Client | None = None,
    vocab_size: int = 32000,
    request_timeout_s: float = 600.0,
    sample_interval_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> LevelReport:
    """Run ``concurrency`` clients for ``warmup_s`` + ``duration_s``, let the requests in flight
    finish, and report the level. ``numbers`` numbers the workload's requests (share one across
    levels so that each level draws new ones)."""
    numbers = numbers if numbers is not None else itertools.count()
    own_client = client is None
    client = client or httpx.Client(
        timeout=httpx.Timeout(request_timeout_s, connect=5.0),
        limits=httpx.Limits(max_connections=concurrency + 4),
    )
    longest_prompt = max(1, traffic.longest)
    base = probe_prompt(longest_prompt, seed=traffic.seed, vocab_size=vocab_size)
    run_tag = f"{os.getpid()}:{next(_RUNS)}"
    start = clock()
    window_start, window_end = start + warmup_s, start + warmup_s + duration_s
    records: list[RequestRecord] = []
    lock = threading.Lock()
    stop = threading.Event()
    report = LoadReport()
    errors: dict[str, int] = {}
    first_error: list[str] = []
    preemptions_before = _preemptions(client, base_url)

    def error(kind: str, detail: str) -> None:
        with lock:
            errors[kind] = errors.get(kind, 0) + 1
            if not first_error:
                first_error.append(detail[:300])

    def one(n: int) -> None:
        prompt_tokens, output_tokens = traffic.draw(n)
        body = {
            "model": model,
            "prompt": unique_prompt(base[:prompt_tokens], f"{run_tag}:{n}", vocab_size=vocab_size),
            "max_tokens": output_tokens,
            "stream": True,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        began = clock()
        first: float | None = None
        last = began
        count = in_window = 0
        try:
            with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    kind = "http_5xx" if resp.status_code >= 500 else "http_4xx"
                    error(kind, f"{resp.status_code}: {resp.text[:200]}")
                    return
                for line in resp.iter_lines():
                    if not line.startswith("data:") or "[DONE]" in line:
                        continue
                    if line.replace(" ", "").startswith('data:{"error"'):
                        error("stream_error", line)
                        return
                    last = clock()
                    first = first if first is not None else last
                    count += 1
                    in_window += window_start <= last <= window_end
        except httpx.TimeoutException as exc:
            error("timeout", repr(exc))
            return
        except httpx.HTTPError as exc:
            error("connection", repr(exc))
            return
        with lock:
            records.append(RequestRecord(began, first, last, count, in_window))

    def client_loop() -> None:
        while not stop.is_set() and clock() < window_end:
            one(next(numbers))
            if not is_alive():
                stop.set()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            _sample(report, nvml, gpu_ids, client, base_url, preemptions_before)
            if not is_alive():
                report.server_died = True
                stop.set()
            for t in threads:
                t.join(sample_interval_s / max(1, len(threads)))
        _sample(report, nvml, gpu_ids, client, base_url, preemptions_before)
    finally:
        stop.set()
        for t in threads:
            t.join(5.0)
        if own_client:
            client.close()
    level = summarize(records, concurrency=concurrency, window_start=window_start, window_end=window_end)
    report.server_died = report.server_died or not is_alive()
    report.requests = len(records)
    report.errors = dict(errors)
    report.first_error = first_error[0] if first_error else ""
    report.latency_p50_s = level.stats.get("e2e_p50")
    report.latency_p99_s = level.stats.get("e2e_p99")
    report.ttft_p50_s = level.stats.get("ttft_p50")
    report.duration_s = clock() - start
    report.ok = not report.server_died and not report.errors
    level.load = report
    return level
