"""HTTP probes of a running vLLM: ``/metrics`` parsing and the worst-case load probe.

The load probe sends ``concurrency`` streamed ``/v1/completions`` whose prompts are token-id lists (no
tokenizer needed) long enough to fill ``max_model_len``, while sampling NVML per GPU and ``/metrics``.
It is bounded in requests and time and stops as soon as the server dies.

Every request's prompt starts with tokens of its own: vLLM's prefix cache (on by default) would
otherwise share KV blocks between identical prompts and the probe would hold far less KV than the
worst case it claims to test.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from .errors import GpuError

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class MetricSample:
    """One sample line of Prometheus text: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


def metric_samples(text: str) -> list[MetricSample]:
    """Every sample of a ``/metrics`` page, in order (comments and unreadable lines skipped): the
    one reader of vLLM's Prometheus text."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append(MetricSample(m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{name: value}`` summed over label sets (histogram buckets skipped);
    ``num_gpu_blocks`` is read from ``vllm:cache_config_info``'s labels."""
    out: dict[str, float] = {}
    for sample in metric_samples(text):
        if sample.name.endswith("_bucket"):
            continue
        if sample.name == "vllm:cache_config_info":
            blocks = sample.labels.get("num_gpu_blocks", "")
            if blocks.isdigit():
                out["num_gpu_blocks"] = float(blocks)
            continue
        out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def kv_usage_from_metrics(text: str) -> float | None:
    """``vllm:kv_cache_usage_perc`` (0..1) of the fullest engine, None when the page has none."""
    values = [s.value for s in metric_samples(text) if s.name == "vllm:kv_cache_usage_perc"]
    return max(values) if values else None


@dataclass(frozen=True)
class PreemptionReading:
    """Preemptions a server made against the requests it completed in the same span: the one reading
    of preemption under load (find's probe, ramp's soak, ``status``).

    The rate is per completed request, not per second: it has no unit of time, so a 30 s probe, an
    hour's soak, the simulator's scaled clock and a server's whole life read the same, and it says what
    it costs: 0.05 is one request in twenty recomputing its prefill (vLLM V1 preempts by recompute).
    Preemptions with nothing completed read as an infinite rate."""

    preemptions: int = 0
    requests: int = 0  # completed in the same span

    @property
    def rate(self) -> float:
        if self.requests:
            return self.preemptions / self.requests
        return math.inf if self.preemptions else 0.0

    def within(self, max_rate: float | None) -> bool:
        """At or under ``max_rate`` preemptions per completed request (None: any rate)."""
        return max_rate is None or self.rate <= max_rate + 1e-12

    def words(self) -> str:
        """``153 preemptions in 40 completed requests (3.83 per request)``."""
        rate = "none completed" if math.isinf(self.rate) else f"{self.rate:.2f} per request"
        return f"{self.preemptions:,} preemption(s) in {self.requests:,} completed request(s) ({rate})"


def preemptions_from_metrics(text: str) -> PreemptionReading | None:
    """A server's preemptions against its completed requests since it started (``vllm:num_preemptions_total``
    and ``vllm:request_success_total``, summed over engines and finish reasons); None without them."""
    metrics = parse_metrics(text)
    if "vllm:num_preemptions_total" not in metrics:
        return None
    return PreemptionReading(
        int(metrics["vllm:num_preemptions_total"]), int(metrics.get("vllm:request_success_total", 0))
    )


@dataclass
class LoadReport:
    ok: bool = False
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    server_died: bool = False
    peak_used_bytes: dict[int, int] = field(default_factory=dict)
    headroom_bytes: dict[int, int] = field(default_factory=dict)
    max_kv_usage: float = 0.0
    preemptions: int = 0
    max_waiting: int = 0
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    duration_s: float = 0.0
    first_error: str = ""

    @property
    def preemption(self) -> PreemptionReading:
        """Its preemptions against the requests it completed."""
        return PreemptionReading(self.preemptions or 0, self.requests or 0)


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors: dict[str, int] = {}
        self.first_error = ""
        self.requests = 0

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.first_error = self.first_error or detail[:300]


def run_load_probe(
    base_url: str,
    *,
    model: str,
    concurrency: int,
    prompt_tokens: int,
    max_tokens: int,
    duration_s: float | None,
    nvml,
    gpu_ids: Sequence[int],
    is_alive: Callable[[], bool],
    client: httpx.Client | None = None,
    api_key: str | None = None,
    sample_interval_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    vocab_size: int = 32000,
    request_timeout_s: float = 600.0,
    seed: int = 0,
    on_sample: Callable[[float, dict[int, int], int], None] | None = None,
) -> LoadReport:
    """Drive the worst case the config promises and report memory, errors and latency.
    ``on_sample(elapsed_s, peak_used_bytes_per_gpu, requests_done)``, if given, hears how it goes
    about twice a second."""
    own_client = client is None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = client or httpx.Client(
        timeout=httpx.Timeout(request_timeout_s, connect=5.0),
        limits=httpx.Limits(max_connections=concurrency + 4),
    )
    tally = _Tally()
    stop = threading.Event()
    start = clock()
    deadline = start + duration_s if duration_s else None
    base = probe_prompt(prompt_tokens, seed=seed, vocab_size=vocab_size)
    # unique across requests, and across probes run side by side or one after another on one server
    run_tag = f"{seed}:{os.getpid()}:{next(_PROBE_RUNS)}"
    numbers = itertools.count()
    report = LoadReport()
    preemptions_before = _preemptions(client, base_url)

    def worker() -> None:
        first = True
        while not stop.is_set() and (first or (deadline is not None and clock() < deadline)):
            first = False
            body = {
                "model": model,
                "prompt": unique_prompt(base, f"{run_tag}:{next(numbers)}", vocab_size=vocab_size),
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            _one_request(client, f"{base_url}/v1/completions", body, headers, tally, clock)
            if not is_alive():
                stop.set()

    def sampler() -> None:
        told, tell = start, on_sample
        while not stop.is_set():
            _sample(report, nvml, gpu_ids, client, base_url, preemptions_before)
            if tell is not None and clock() - told >= 0.5:
                told = clock()
                try:  # progress is for the eye: it must never stop the memory sampling
                    tell(told - start, dict(report.peak_used_bytes), tally.requests)
                except Exception:  # noqa: BLE001
                    tell = None
            if not is_alive():
                report.server_died = True
                stop.set()
                return
            stop.wait(sample_interval_s)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    watch = threading.Thread(target=sampler, daemon=True)
    try:
        watch.start()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
                if not is_alive():
                    report.server_died = True
                    stop.set()
        _sample(report, nvml, gpu_ids, client, base_url, preemptions_before)
    finally:
        stop.set()
        watch.join(5.0)
        if own_client:
            client.close()
    if not is_alive():
        report.server_died = True
    report.requests = tally.requests
    report.errors = dict(tally.errors)
    report.first_error = tally.first_error
    if tally.latencies:
        report.latency_p50_s = statistics.median(tally.latencies)
        report.latency_p99_s = _percentile(tally.latencies, 0.99)
    if tally.ttfts:
        report.ttft_p50_s = statistics.median(tally.ttfts)
    report.duration_s = clock() - start
    report.ok = not report.server_died and not report.errors
    return report


UNIQUE_HEAD_TOKENS = 16
_PROBE_RUNS = itertools.count()


def _token_range(vocab_size: int) -> tuple[int, int]:
    """Ordinary token ids: clear of the special ids at both ends of the vocabulary."""
    low = min(100, vocab_size // 4)
    return low, max(low + 1, vocab_size - low)


def probe_prompt(length: int, *, seed: int, vocab_size: int) -> list[int]:
    """A random token-id prompt of ``length`` tokens."""
    rng = random.Random(seed)
    low, high = _token_range(vocab_size)
    return [rng.randrange(low, high) for _ in range(length)]


def unique_prompt(base: Sequence[int], tag: str, *, vocab_size: int) -> list[int]:
    """``base`` with its first tokens drawn for ``tag`` (one request) alone. The first KV block then
    differs between requests, and with it every block hash chained after it: no prefix-cache hits."""
    rng = random.Random(tag)
    low, high = _token_range(vocab_size)
    head = min(UNIQUE_HEAD_TOKENS, len(base))
    return [rng.randrange(low, high) for _ in range(head)] + list(base[head:])


def _one_request(client: httpx.Client, url: str, body: dict, headers: dict, tally: _Tally, clock) -> None:
    began = clock()
    first_token: float | None = None
    try:
        with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                resp.read()
                kind = "http_5xx" if resp.status_code >= 500 else "http_4xx"
                tally.error(kind, f"{resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if line.startswith("data:") and first_token is None and "[DONE]" not in line:
                    first_token = clock()
    except httpx.TimeoutException as exc:
        tally.error("timeout", repr(exc))
        return
    except httpx.HTTPError as exc:
        tally.error("connection", repr(exc))
        return
    with tally.lock:
        tally.requests += 1
        tally.latencies.append(clock() - began)
        if first_token is not None:
            tally.ttfts.append(first_token - began)


def _metrics(client: httpx.Client, base_url: str) -> dict[str, float] | None:
    try:
        resp = client.get(f"{base_url}/metrics", timeout=2.0)
    except httpx.HTTPError:
        return None
    return parse_metrics(resp.text) if resp.status_code == 200 else None


def _preemptions(client: httpx.Client, base_url: str) -> int:
    """The server's preemption counter now (it counts since the server started)."""
    return int((_metrics(client, base_url) or {}).get("vllm:num_preemptions_total", 0))


def _sample(
    report: LoadReport,
    nvml,
    gpu_ids: Sequence[int],
    client: httpx.Client,
    base_url: str,
    preemptions_before: int,
) -> None:
    if nvml is not None:
        for i in gpu_ids:
            try:
                mem = nvml.memory(i)
            except GpuError:
                continue
            if mem.used > report.peak_used_bytes.get(i, -1):
                report.peak_used_bytes[i] = mem.used
                report.headroom_bytes[i] = mem.total - mem.used
    metrics = _metrics(client, base_url)
    if metrics is None:
        return
    report.max_kv_usage = max(report.max_kv_usage, metrics.get("vllm:kv_cache_usage_perc", 0.0))
    during = int(metrics.get("vllm:num_preemptions_total", 0)) - preemptions_before
    report.preemptions = max(report.preemptions, during)
    report.max_waiting = max(report.max_waiting, int(metrics.get("vllm:num_requests_waiting", 0)))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[k]
