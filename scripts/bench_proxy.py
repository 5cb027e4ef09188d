"""What ``vllm-tune proxy`` adds to a request's latency: the same requests straight to two simulated vLLM
servers and through the proxy in front of them (run as a user runs it), p50 and p95 of each.

    .venv/bin/python scripts/bench_proxy.py [--requests 200] [--time-scale 400] [--out bench-results/proxy.json]

Three kinds of request, direct and proxied in turn so that load and drift hit both alike:
- ``chat``: a short chat, not streamed (``max_tokens`` 1): the proxy counts it with the server's
  ``/tokenize`` (one more request), then relays it;
- ``stream``: the same chat streamed, timed to its first SSE event;
- ``completion``: a ``/v1/completions`` (relayed without counting).
Then 50 concurrent streamed chats through the proxy across both servers: errors and streams that did not
end with their own length counted. Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_tuner.launch import ServerProcess  # noqa: E402
from vllm_tuner.logparse import LogWatcher  # noqa: E402
from vllm_tuner.serveconfig import ServeConfig  # noqa: E402
from vllm_tuner.simlite.activate import create  # noqa: E402

MODELS = (("chat", 4096), ("coder", 8192))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache? " * 4}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(urls: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_tuner", "proxy", *urls, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the proxy did not answer /health within 30 s")
        time.sleep(0.1)


def timed(kind: str, client: httpx.Client, base: str) -> float:
    """Seconds one request of ``kind`` takes (to the first event for a stream)."""
    started = time.perf_counter()
    if kind == "chat":
        reply = client.post(
            f"{base}/v1/chat/completions", json={"model": "chat", "messages": CHAT, "max_tokens": 1}
        )
        reply.raise_for_status()
    elif kind == "completion":
        reply = client.post(
            f"{base}/v1/completions", json={"model": "coder", "prompt": "def f(x):", "max_tokens": 1}
        )
        reply.raise_for_status()
    else:
        body = {"model": "chat", "messages": CHAT, "max_tokens": 4, "stream": True}
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as streamed:
            streamed.raise_for_status()
            lines = streamed.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    elapsed = time.perf_counter() - started
                    break
            for _ in lines:  # the rest, untimed
                pass
        return elapsed
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


async def concurrent_streams(proxy: str, count: int) -> tuple[int, int, float]:
    """(errors, streams that did not end with their own length, seconds) of ``count`` streamed chats."""

    async def one(client: httpx.AsyncClient, n: int) -> str:
        body = {
            "model": MODELS[n % 2][0],
            "messages": [{"role": "user", "content": f"request {n}"}],
            "max_tokens": 5 + n,
            "stream": True,
        }
        try:
            async with client.stream("POST", f"{proxy}/v1/chat/completions", json=body) as streamed:
                if streamed.status_code != 200:
                    return "error"
                events = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
        except httpx.HTTPError:
            return "error"
        ok = events and events[-1] == "data: [DONE]" and len(events) - 1 == 5 + n
        return "ok" if ok else "mixed"

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count * 2)) as client:
        results = await asyncio.gather(*(one(client, n) for n in range(count)))
    return results.count("error"), results.count("mixed"), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="of each kind, direct and proxied each")
    parser.add_argument("--time-scale", type=float, default=400.0)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "proxy.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        env = create("rtx-5090", state_dir=Path(tmp) / "sim", time_scale=args.time_scale)
        urls = []
        for gpu, (name, max_len) in enumerate(MODELS):
            config = ServeConfig(
                "qwen2.5-7b", max_model_len=max_len, extra_args=("--served-model-name", name)
            )
            server = ServerProcess(
                env.launcher(),
                config,
                gpu_ids=[gpu],
                log_path=Path(tmp) / f"{name}.log",
                watcher=LogWatcher(),
                grace_s=3.0,
                release_timeout_s=10.0,
            )
            stack.enter_context(server)
            if not server.wait_ready(timeout_s=60, stall_s=30).ready:
                raise SystemExit(f"the simulated {name} server did not start")
            urls.append(server.base_url)
        proc, proxy = start_proxy(urls, Path(tmp) / "proxy.log")
        stack.callback(lambda: (proc.send_signal(signal.SIGTERM), proc.wait(20)))
        direct = {"chat": urls[0], "stream": urls[0], "completion": urls[1]}
        samples: dict[tuple[str, str], list[float]] = {}
        with httpx.Client(timeout=30) as straight, httpx.Client(timeout=30) as through:
            for kind in ("chat", "stream", "completion"):
                for _ in range(5):  # warm the connections and the proxy's count cache
                    timed(kind, straight, direct[kind]), timed(kind, through, proxy)
                for _ in range(args.requests):
                    samples.setdefault((kind, "direct"), []).append(timed(kind, straight, direct[kind]))
                    samples.setdefault((kind, "proxy"), []).append(timed(kind, through, proxy))
        errors, mixed, seconds = asyncio.run(concurrent_streams(proxy, 50))

    rows = {
        f"{kind} {path}": {
            "n": len(v),
            "p50_ms": percentile(v, 50) * 1000,
            "p95_ms": percentile(v, 95) * 1000,
        }
        for (kind, path), v in samples.items()
    }
    print(f"{'request':<11} {'path':<7} {'n':>4} {'p50 ms':>8} {'p95 ms':>8}")
    for name, row in rows.items():
        kind, path = name.split()
        print(f"{kind:<11} {path:<7} {row['n']:>4} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f}")
    print()
    added = {}
    for kind in ("chat", "stream", "completion"):
        d, p = rows[f"{kind} direct"], rows[f"{kind} proxy"]
        added[kind] = {"p50_ms": p["p50_ms"] - d["p50_ms"], "p95_ms": p["p95_ms"] - d["p95_ms"]}
        what = {"chat": "counted, relayed", "stream": "first event", "completion": "relayed"}[kind]
        print(
            f"added by the proxy, {kind} ({what}): p50 {added[kind]['p50_ms']:+.2f} ms, p95 {added[kind]['p95_ms']:+.2f} ms"
        )
    print(
        f"50 concurrent streamed chats through the proxy: {errors} errors, {mixed} mixed-up streams, {seconds:.2f} s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "added": added,
                "concurrent": {"errors": errors, "mixed": mixed, "seconds": seconds},
            },
            indent=2,
        )
    )
    return 1 if errors or mixed else 0


if __name__ == "__main__":
    sys.exit(main())
