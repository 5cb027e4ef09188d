"""The soak load of ``vllm-tune ramp``: which requests, how many at once, and driving them.

A :class:`Workload` is a set of :class:`Stream` s, each a fixed number of concurrent request loops of
one prompt length, joining the soak at its own time. The default mix is the worst case the config
promises (``max_num_seqs`` prompts near ``max_model_len``), climbing to full concurrency over the
warm-up, plus a stream of typical short requests. ``--workload-file`` replays the user's own
prompt-length distribution instead, as a few length buckets.

Building a workload is pure; :func:`run_workload` drives each stream with ``probe.run_load_probe`` in
parallel, watches the server once a second for the live view, and merges the reports.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .probe import LoadReport, parse_metrics, run_load_probe
from .serveconfig import ServeConfig
from .trial import ProbePlan

SHORT_PROMPT_TOKENS = 512
SHORT_MAX_TOKENS = 128


@dataclass(frozen=True)
class Stream:
    name: str
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0  # seconds into the soak when this stream joins


@dataclass(frozen=True)
class Workload:
    streams: tuple[Stream, ...]
    duration_s: float

    @property
    def peak_concurrency(self) -> int:
        return sum(s.concurrency for s in self.streams)

    def resident_tokens(self, max_running: int | None = None) -> int:
        """The KV tokens its requests hold when every one that can run at once (at most ``max_running``,
        the server's ``--max-num-seqs``; the longest first) is at full length: a pool below this cannot
        hold the load without preempting."""
        lengths = sorted(
            (s.prompt_tokens + s.max_tokens for s in self.streams for _ in range(s.concurrency)), reverse=True
        )
        return sum(lengths[:max_running] if max_running else lengths)

    def describe(self) -> str:
        groups: dict[tuple[str, int, int], int] = {}
        for s in self.streams:
            key = (s.name, s.prompt_tokens, s.max_tokens)
            groups[key] = groups.get(key, 0) + s.concurrency
        return " + ".join(f"{n} × {p}+{m} tokens ({name})" for (name, p, m), n in groups.items())


def default_workload(
    *,
    concurrency: int,
    context: int,
    duration_s: float,
    warmup_s: float = 0.0,
    short_requests: bool = True,
    stages: int = 4,
) -> Workload:
    """The worst case the config promises, climbing in ``stages`` over ``warmup_s``, plus short requests."""
    concurrency = max(1, concurrency)
    worst = ProbePlan.worst_case(
        ServeConfig("", max_model_len=context, max_num_seqs=concurrency), headroom_bytes=0, sustained=True
    )
    prompt, max_tokens = worst.prompt_tokens, worst.max_tokens  # the worst case, with a decode that holds it
    stages = max(1, min(stages, concurrency)) if warmup_s > 0 else 1
    streams = []
    for i, share in enumerate(_split(concurrency, stages)):
        start = min(warmup_s * i / stages, duration_s)
        streams.append(Stream("worst case", share, prompt, max_tokens, start))
    if short_requests:
        short_prompt = max(1, min(SHORT_PROMPT_TOKENS, context // 4))
        short_max = max(1, min(SHORT_MAX_TOKENS, context // 8))
        streams.append(Stream("short", max(1, concurrency // 4), short_prompt, short_max))
    return Workload(tuple(streams), duration_s)


def replay_workload(
    lengths: Sequence[tuple[int, int]],
    *,
    concurrency: int,
    context: int,
    duration_s: float,
    buckets: int = 4,
) -> Workload:
    """The user's own (prompt, output) lengths as up to ``buckets`` streams, each at its bucket's longest
    request, with concurrency shared by how many requests fall in the bucket."""
    if not lengths:
        raise UsageError("the workload file holds no request lengths", "put one prompt length per line")
    ordered = sorted(lengths)
    concurrency = max(1, concurrency)
    count = max(1, min(buckets, concurrency, len(ordered)))
    edges = [round(len(ordered) * i / count) for i in range(count + 1)]
    parts = [ordered[edges[i] : edges[i + 1]] for i in range(count)]
    shares = _weighted(concurrency, [len(p) for p in parts])
    streams = []
    for part, share in zip(parts, shares, strict=True):
        if not part or share == 0:
            continue
        out = max(1, min(max(o for _, o in part), context // 2))
        prompt = max(1, min(max(p for p, _ in part), context - out))
        streams.append(Stream("replay", share, prompt, out))
    return Workload(tuple(streams), duration_s)


def read_prompt_lengths(path: Path, *, default_output: int = SHORT_MAX_TOKENS) -> list[tuple[int, int]]:
    """(prompt, output) token counts from a file: one request a line, either ``PROMPT[,OUTPUT]``
    (commas, tabs or spaces) or a JSON object with ``prompt_tokens``/``input_tokens`` and optionally
    ``output_tokens``/``completion_tokens``/``max_tokens``. Blank lines, ``#`` comments and a header
    line are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(
            f"cannot read the workload file {path}: {exc.strerror}", "pass a readable file"
        ) from exc
    out: list[tuple[int, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pair = _parse_length_line(line, default_output)
        if pair is None:
            if not out and number == _first_content_line(text):
                continue  # a header
            raise UsageError(
                f"line {number} of {path} is not a request length: {line[:60]!r}",
                "write one prompt token count per line, e.g. 1834 or 1834,256",
            )
        out.append(pair)
    return out


def _first_content_line(text: str) -> int:
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip() and not raw.strip().startswith("#"):
            return number
    return 0


def _parse_length_line(line: str, default_output: int) -> tuple[int, int] | None:
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        prompt = _first_int(obj, ("prompt_tokens", "input_tokens", "prompt_len", "input_len"))
        output = _first_int(obj, ("output_tokens", "completion_tokens", "max_tokens", "output_len"))
        return None if prompt is None else (prompt, output or default_output)
    words = line.replace(",", " ").replace("\t", " ").split()
    try:
        numbers = [int(float(w)) for w in words[:2]]
    except ValueError:
        return None
    if not numbers or numbers[0] < 1:
        return None
    return numbers[0], (numbers[1] if len(numbers) > 1 and numbers[1] > 0 else default_output)


def _first_int(obj: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return int(value)
    return None


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _weighted(total: int, weights: list[int]) -> list[int]:
    """``total`` shared in proportion to ``weights``, every non-empty part getting at least one."""
    whole = sum(weights) or 1
    shares = [max(1, math.floor(total * w / whole)) if w else 0 for w in weights]
    while sum(shares) > total:
        shares[shares.index(max(shares))] -= 1
    i = 0
    while sum(shares) < total:
        order = sorted(range(len(weights)), key=lambda k: -weights[k])
        shares[order[i % len(order)]] += 1
        i += 1
    return shares


# -- merging ----------------------------------------------------------------------------------------
def merge_reports(reports: Sequence[LoadReport]) -> LoadReport:
    """One report for streams that ran side by side on the same server: peaks and maxima of the
    shared gauges, sums of requests and errors, the slowest stream's latencies."""
    out = LoadReport()
    if not reports:
        return out
    for r in reports:
        out.requests += r.requests
        for kind, n in r.errors.items():
            out.errors[kind] = out.errors.get(kind, 0) + n
        out.server_died = out.server_died or r.server_died
        for gpu, used in r.peak_used_bytes.items():
            if used > out.peak_used_bytes.get(gpu, -1):
                out.peak_used_bytes[gpu] = used
        for gpu, free in r.headroom_bytes.items():
            out.headroom_bytes[gpu] = min(free, out.headroom_bytes.get(gpu, free))
        out.max_kv_usage = max(out.max_kv_usage, r.max_kv_usage)
        out.preemptions = max(out.preemptions, r.preemptions)
        out.max_waiting = max(out.max_waiting, r.max_waiting)
        out.latency_p50_s = _max_opt(out.latency_p50_s, r.latency_p50_s)
        out.latency_p99_s = _max_opt(out.latency_p99_s, r.latency_p99_s)
        out.ttft_p50_s = _max_opt(out.ttft_p50_s, r.ttft_p50_s)
        out.duration_s = max(out.duration_s, r.duration_s)
        out.first_error = out.first_error or r.first_error
    out.ok = not out.server_died and not out.errors
    return out


def _max_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# -- driving ----------------------------------------------------------------------------------------
@dataclass
class SoakTick:
    """What the live view shows once a second."""

    elapsed_s: float
    remaining_s: float
    used_bytes: dict[int, int] = field(default_factory=dict)
    kv_usage: float = 0.0
    preemptions: int = 0
    running: int = 0
    waiting: int = 0
    errors: int = 0


ProbeFn = Callable[..., LoadReport]


def run_workload(
    base_url: str,
    workload: Workload,
    *,
    model: str,
    nvml,
    gpu_ids: Sequence[int],
    is_alive: Callable[[], bool],
    vocab_size: int = 32000,
    on_tick: Callable[[SoakTick], None] | None = None,
    tick_s: float = 1.0,
    probe: ProbeFn = run_load_probe,
    clock: Callable[[], float] = time.monotonic,
    client=None,
) -> LoadReport:
    """Run every stream of ``workload`` against ``base_url`` in parallel (each joining at its start time)
    and return the merged report. Stops early when the server dies."""
    import httpx

    errors = _ErrorCount()
    own_client = client is None
    if client is None:
        client = httpx.Client(
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=workload.peak_concurrency + 4 * len(workload.streams) + 8),
            event_hooks={"response": [errors.hook]},
        )
    stop = threading.Event()
    start = clock()
    reports: list[LoadReport] = []
    lock = threading.Lock()
    crash: list[BaseException] = []

    def alive() -> bool:
        return not stop.is_set() and is_alive()

    def drive(stream: Stream) -> None:
        if stream.start_s > 0 and stop.wait(stream.start_s):
            return
        if not is_alive():
            return
        remaining = workload.duration_s - (clock() - start)
        if remaining <= 0:
            return
        try:
            report = probe(
                base_url,
                model=model,
                concurrency=stream.concurrency,
                prompt_tokens=stream.prompt_tokens,
                max_tokens=stream.max_tokens,
                duration_s=remaining,
                nvml=nvml,
                gpu_ids=gpu_ids,
                is_alive=alive,
                client=client,
                vocab_size=vocab_size,
            )
        except BaseException as exc:  # reported by the caller's thread
            crash.append(exc)
            stop.set()
            return
        with lock:
            reports.append(report)

    threads = [threading.Thread(target=drive, args=(s,), daemon=True) for s in workload.streams]
    monitor = _Monitor(base_url, client, nvml, gpu_ids)
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            deadline = time.monotonic() + tick_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            tick = monitor.tick(clock() - start, workload.duration_s, errors.count)
            if on_tick is not None:
                on_tick(tick)
            if not is_alive():
                stop.set()
    finally:
        stop.set()
        for t in threads:
            t.join(10.0)
        if own_client:
            client.close()
    if crash:
        raise crash[0]
    merged = merge_reports(reports)
    for gpu, used in monitor.peak_used.items():
        if used > merged.peak_used_bytes.get(gpu, -1):
            merged.peak_used_bytes[gpu] = used
            merged.headroom_bytes[gpu] = monitor.headroom[gpu]
    if not is_alive():
        merged.server_died = True
        merged.ok = False
    merged.duration_s = clock() - start  # how long the soak ran (until the server died, if it did)
    return merged


class _ErrorCount:
    """Counts error answers to generation requests as they arrive (the probe reports them at the end)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def hook(self, response) -> None:
        if response.status_code >= 400 and "/v1/" in str(response.request.url):
            with self._lock:
                self.count += 1


class _Monitor:
    """Once-a-second samples for the live view: NVML per GPU and the server's gauges."""

    def __init__(self, base_url: str, client, nvml, gpu_ids: Sequence[int]) -> None:
        self.base_url = base_url
        self.client = client
        self.nvml = nvml
        self.gpu_ids = list(gpu_ids)
        self.peak_used: dict[int, int] = {}
        self.headroom: dict[int, int] = {}

    def tick(self, elapsed_s: float, duration_s: float, errors: int) -> SoakTick:
        import httpx

        from .errors import GpuError

        tick = SoakTick(elapsed_s, max(0.0, duration_s - elapsed_s), errors=errors)
        if self.nvml is not None:
            for i in self.gpu_ids:
                try:
                    mem = self.nvml.memory(i)
                except GpuError:
                    continue
                tick.used_bytes[i] = mem.used
                if mem.used > self.peak_used.get(i, -1):
                    self.peak_used[i] = mem.used
                    self.headroom[i] = mem.total - mem.used
        try:
            resp = self.client.get(f"{self.base_url}/metrics", timeout=2.0)
        except httpx.HTTPError:
            return tick
        if resp.status_code == 200:
            m = parse_metrics(resp.text)
            tick.kv_usage = m.get("vllm:kv_cache_usage_perc", 0.0)
            tick.preemptions = int(m.get("vllm:num_preemptions_total", 0))
            tick.running = int(m.get("vllm:num_requests_running", 0))
            tick.waiting = int(m.get("vllm:num_requests_waiting", 0))
        return tick
