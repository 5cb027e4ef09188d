"""What the proxy's end-to-end tests share: the proxy run as a user runs it (``vllm-tune proxy`` in a
process of its own, stopped by SIGTERM), and a scripted vLLM-like upstream on a thread (uvicorn) that
records what it saw, the client's disconnects included."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vllm_tuner.simlite.tokenize import answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningProxy:
    url: str
    proc: subprocess.Popen
    out: str = ""
    err: str = ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.out, self.err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()
        return self.proc.returncode


@contextlib.contextmanager
def run_proxy(*args: str, timeout_s: float = 30.0):
    """``vllm-tune proxy ARGS --port P`` until it answers ``/health``; stopped when the block ends."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_tuner", "proxy", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    running = RunningProxy(f"http://127.0.0.1:{port}", proc)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                running.stop()
                raise AssertionError(f"the proxy exited with {proc.returncode}: {running.err}")
            try:
                httpx.get(f"{running.url}/health", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield running
    finally:
        running.stop()


@dataclass
class FakeVllm:
    """A vLLM-like server whose chat replies never end: one SSE event every ``tick_s`` while streamed,
    no answer at all otherwise, until the client leaves (``disconnects`` counts those)."""

    name: str = "slow"
    max_len: int = 4096
    tick_s: float = 0.05
    port: int = field(default_factory=free_port)
    disconnects: int = 0
    started: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse(
                {"object": "list", "data": [{"id": self.name, "max_model_len": self.max_len}]}
            )

        async def health(request: Request) -> Response:
            return Response(status_code=200)

        async def tokenize(request: Request) -> Response:
            status, body = answer(await request.json(), self.name, self.max_len)
            return JSONResponse(body, status)

        async def chat(request: Request) -> Response:
            body = await request.json()
            self.started += 1
            if body.get("stream"):
                return StreamingResponse(self._events(), media_type="text/event-stream")
            while not await request.is_disconnected():
                await asyncio.sleep(self.tick_s)
            self.disconnects += 1
            return Response(status_code=499)

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/health", health),
                Route("/tokenize", tokenize, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"]),
            ]
        )

    async def _events(self):
        try:
            n = 0
            while True:
                yield f'data: {{"choices": [{{"index": 0, "delta": {{"content": "t{n}"}}}}]}}\n\n'.encode()
                n += 1
                await asyncio.sleep(self.tick_s)
        finally:  # the client went away: Starlette cancelled the stream
            self.disconnects += 1

    def __enter__(self) -> FakeVllm:
        config = uvicorn.Config(
            self.app(), host="127.0.0.1", port=self.port, log_level="error", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vllm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the fake upstream did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)

    def wait_for(self, predicate, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
