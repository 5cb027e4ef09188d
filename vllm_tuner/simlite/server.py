"""The simulated ``vllm`` executable: argument parsing, the startup walk, the HTTP API and load.

Logs use vLLM 0.33's format and messages (see shared/research/vllm-internals.md §3–§5); times are
slept divided by ``$VLLM_TUNE_SIM_TIME_SCALE`` but logged at their realistic values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import yaml

from ..paths import profiles_dir
from . import engine, state
from .engine import GIB, MIB

VERSION = "0.33.0"
KV_DTYPES = ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla", "nvfp4"]
PID = os.getpid()


# -- logging ------------------------------------------------------------------------------------
def log(proc: str, level: str, where: str, message: str) -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    for line in message.splitlines() or [""]:
        print(f"({proc} pid={PID}) {level} {stamp} [{where}] {line}", flush=True)


def api(message: str, where: str = "api_server.py:1") -> None:
    log("APIServer", "INFO", where, message)


def core(message: str, where: str = "core.py:140", level: str = "INFO") -> None:
    log("EngineCore", level, where, message)


def scale() -> float:
    try:
        return max(1e-3, float(os.environ.get(state.SCALE_ENV, "1")))
    except ValueError:
        return 1.0


def nap(seconds: float) -> None:
    time.sleep(max(0.0, seconds) / scale())


# -- arguments ----------------------------------------------------------------------------------
def human_int(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid human-readable integer: {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    mult = {
        "": 1,
        "k": 1000,
        "K": 1024,
        "m": 10**6,
        "M": 1 << 20,
        "g": 10**9,
        "G": 1 << 30,
        "t": 10**12,
        "T": 1 << 40,
    }
    return int(value * mult[unit])


def len_or_auto(text: str) -> int:
    return -1 if text in ("auto", "-1") else human_int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", description="Start the vLLM OpenAI compatible API server.")
    p.add_argument("model_tag", nargs="?", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--max-model-len", type=len_or_auto, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=human_int, default=None)
    p.add_argument("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.92)
    p.add_argument("--kv-cache-memory-bytes", type=human_int, default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cpu-offload-gb", type=float, default=0.0)
    p.add_argument("--kv-offloading-size", type=float, default=None)
    p.add_argument("--kv-offloading-backend", choices=["native", "lmcache"], default="native")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--disable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--optimization-level", type=int, default=2)
    p.add_argument("--max-cudagraph-capture-size", type=int, default=None)
    p.add_argument("--compilation-config", "-cc", default=None)
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--enable-log-requests", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download-dir", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--tool-call-parser", default=None)
    p.add_argument("--enable-auto-tool-choice", action="store_true")
    p.add_argument("--reasoning-parser", default=None)
    p.add_argument("--generation-config", default=None)
    p.add_argument("--device-ids", default=None)
    p.add_argument("--kv-transfer-config", default=None)
    p.add_argument(
        "--performance-mode", choices=["balanced", "interactivity", "throughput"], default="balanced"
    )
    return p


def normalise_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    for word in argv:
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            word = name.replace("_", "-") + eq + value
        elif re.fullmatch(r"-O\d", word):
            out += ["--optimization-level", word[2:]]
            continue
        out.append(word)
    return out


def config_file_args(path: str) -> list[str]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    args: list[str] = []
    for key, value in data.items():
        if key == "model":
            args.insert(0, str(value))
        elif value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


# -- model lookup (the simulator's own, not the tuner's) ------------------------------------------
def find_model(name: str) -> tuple[dict, int | None] | None:
    folder = Path(name)
    if (folder / "config.json").is_file():
        index = folder / "model.safetensors.index.json"
        size = None
        if index.is_file():
            size = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        return json.loads((folder / "config.json").read_text()), size
    hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    snaps = sorted((hub / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    if snaps:
        return json.loads(snaps[-1].read_text()), None
    for path in sorted((profiles_dir() / "models").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        names = {str(data.get("name", "")).lower(), str(data.get("hf_id", "")).lower()}
        names |= {str(a).lower() for a in data.get("aliases", []) or []}
        if name.lower() in names and isinstance(data.get("config"), dict):
            return data["config"], data.get("weights_bytes")
    return None


def model_names(name: str) -> set[str]:
    """Every name a model goes by (short name, HF id, aliases), lower-case, from the bundled profiles."""
    names = {name.lower()}
    for path in sorted((profiles_dir() / "models").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        known = {str(data.get("name", "")).lower(), str(data.get("hf_id", "")).lower()}
        known |= {str(a).lower() for a in data.get("aliases", []) or []}
        if name.lower() in known:
            return names | (known - {""})
    return names


def scenario_model_entry(scenario: dict, name: str) -> dict:
    """The scenario's ``models:`` entry for this model, whichever of its names either side uses."""
    entries = scenario.get("models", {}) or {}
    if name in entries:
        return entries[name]
    names = model_names(name)
    for key, value in entries.items():
        if key.lower() in names:
            return value
    return {}


# -- the server's state -------------------------------------------------------------------------
@dataclass
class Request:
    prompt_len: int
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    generated: int = 0
    blocks: int = 0
    ready_at: float = 0.0
    failed: str = ""


class Engine:
    """A tiny continuous-batching scheduler over the booted KV pool."""

    def __init__(
        self, boot: engine.Boot, timing: dict, gpus: list[int], folder: Path, model_name: str, util: float
    ) -> None:
        self.boot = boot
        self.timing = timing
        self.gpus = gpus
        self.folder = folder
        self.model_name = model_name
        self.util = util
        self.lock = threading.Condition()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.free_blocks = max(0, boot.num_blocks - 1)
        self.preemptions = 0
        self.dead = False
        self.kv_usage = 0.0
        self.peak_usage = 0.0  # PyTorch's caching allocator keeps what it reserved: NVML sees the peak
        self.finished = 0
        self.die_at = boot.dies_at_usage()

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.boot.block_size)

    def submit(self, req: Request) -> None:
        with self.lock:
            self.waiting.append(req)
            self.lock.notify_all()

    def loop(self) -> None:
        step = self.timing["decode_step_s"] / scale()
        last_mem = 0.0
        while True:
            with self.lock:
                if self.dead:
                    return
                self._admit()
                self._decode()
                total = max(1, self.boot.num_blocks - 1)
                self.kv_usage = 1 - self.free_blocks / total
                self.peak_usage = max(self.peak_usage, self.kv_usage)
            if time.monotonic() - last_mem > 0.05:
                self._write_memory()
                last_mem = time.monotonic()
            if self.die_at is not None and self.kv_usage >= self.die_at:
                self._die()
                return
            time.sleep(step)

    def _admit(self) -> None:
        now = time.monotonic()
        while self.waiting and len(self.running) < self.boot.max_num_seqs:
            req = self.waiting[0]
            need = self.blocks_for(req.prompt_len + 1)
            if need > self.free_blocks:
                break
            self.waiting.pop(0)
            req.blocks = need
            self.free_blocks -= need
            req.ready_at = now + req.prompt_len / self.timing["prefill_tokens_per_s"] / scale()
            self.running.append(req)

    def _decode(self) -> None:
        now = time.monotonic()
        for req in list(self.running):
            if req.ready_at > now:
                continue
            need = self.blocks_for(req.prompt_len + req.generated + 1)
            if need > req.blocks:
                if self.free_blocks < need - req.blocks:
                    victim = self.running[-1]
                    self._release(victim)
                    self.running.remove(victim)
                    self.waiting.insert(0, victim)
                    self.preemptions += 1
                    if victim is req:
                        continue
                    if self.free_blocks < need - req.blocks:
                        continue
                self.free_blocks -= need - req.blocks
                req.blocks = need
            req.generated += 1
            with req.cond:
                req.tokens.append(" tok")
                req.cond.notify_all()
            if req.generated >= req.max_tokens:
                self._release(req)
                self.running.remove(req)
                self.finished += 1
                req.done.set()
                with req.cond:
                    req.cond.notify_all()

    def _release(self, req: Request) -> None:
        self.free_blocks += req.blocks
        req.blocks = 0
        req.generated = 0 if req.blocks == 0 and req.generated == 0 else req.generated

    def _write_memory(self) -> None:
        used = self.boot.used_under_load(self.peak_usage)
        state.write_proc(self.folder, PID, {g: used for g in self.gpus}, "vllm serve")

    def _die(self) -> None:
        with self.lock:
            self.dead = True
        b = self.boot
        tried = 896 * MIB
        free = max(0, b.capacity_bytes - b.idle_used_bytes) // 2
        where = "core.py:1010"
        for text in (
            "EngineCore encountered a fatal error.",
            "Traceback (most recent call last):",
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 950, in run_busy_loop',
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu/model_runner.py", line 1911, in execute_model',
            f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {tried / MIB:.2f} MiB. GPU 0 has a total "
            f"capacity of {b.total_bytes / GIB:.2f} GiB of which {free / MIB:.2f} MiB is free. Including non-PyTorch "
            f"memory, this process has {b.idle_used_bytes / GIB:.2f} GiB memory in use.",
        ):
            core(text, where, "ERROR")
        log("APIServer", "ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.")
        print(
            f"(APIServer pid={PID}) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
            flush=True,
        )
        for req in self.running + self.waiting:
            req.failed = "engine dead"
            req.done.set()
            with req.cond:
                req.cond.notify_all()
        threading.Timer(0.5 / max(1.0, scale() / 20), lambda: os._exit(1)).start()


# -- HTTP ---------------------------------------------------------------------------------------
def make_handler(eng: Engine, served: str, max_len: int, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: object, ctype: str = "application/json") -> None:
            data = (
                body
                if isinstance(body, bytes)
                else (json.dumps(body) if ctype == "application/json" else str(body)).encode()
            )
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if (
                api_key
                and self.path.startswith("/v1")
                and self.headers.get("Authorization") != f"Bearer {api_key}"
            ):
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path in ("/health", "/ping"):
                self._send(503 if eng.dead else 200, b"", "text/plain")
            elif path == "/version":
                self._send(200, {"version": VERSION})
            elif path == "/load":
                self._send(200, {"server_load": len(eng.running) + len(eng.waiting)})
            elif path == "/v1/models":
                if self._authorised():
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {
                                    "id": served,
                                    "object": "model",
                                    "owned_by": "vllm",
                                    "root": eng.model_name,
                                    "max_model_len": max_len,
                                }
                            ],
                        },
                    )
            elif path == "/metrics":
                self._send(200, metrics(eng, served), "text/plain; version=0.0.4")
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, error("Invalid JSON body", "body"))
                return
            if path == "/ping":
                self._send(503 if eng.dead else 200, b"", "text/plain")
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self._send(404, {"detail": "Not Found"})
                return
            if not self._authorised():
                return
            if eng.dead:
                self._send(500, error("The server had an error while processing your request.", None, 500))
                return
            chat = path.endswith("chat/completions")
            prompt_len = prompt_tokens(body, chat)
            if prompt_len >= max_len:
                self._send(
                    400,
                    error(
                        f"This model's maximum context length is {max_len} tokens. However, your prompt contains "
                        f"{prompt_len} input tokens, which exceeds this limit even without any output tokens. "
                        "Please reduce the length of the input prompt.",
                        "input_tokens",
                    ),
                )
                return
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            if max_tokens > max_len:
                self._send(
                    400,
                    error(
                        f"max_tokens={max_tokens} cannot be greater than max_model_len={max_len}. "
                        "Please request fewer output tokens.",
                        "max_tokens",
                    ),
                )
                return
            req = Request(prompt_len, min(max_tokens, max_len - prompt_len))
            eng.submit(req)
            if body.get("stream"):
                self._stream(req, chat)
            else:
                req.done.wait(3600)
                if req.failed:
                    self._send(
                        500, error("The server had an error while processing your request.", None, 500)
                    )
                    return
                text = "".join(req.tokens)
                choice = {"index": 0, "finish_reason": "length"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                self._send(
                    200,
                    {
                        "id": "cmpl-sim",
                        "object": "chat.completion" if chat else "text_completion",
                        "model": served,
                        "choices": [choice],
                        "usage": {
                            "prompt_tokens": prompt_len,
                            "completion_tokens": len(req.tokens),
                            "total_tokens": prompt_len + len(req.tokens),
                        },
                    },
                )

        def _stream(self, req: Request, chat: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            try:
                while True:
                    with req.cond:
                        while sent >= len(req.tokens) and not req.done.is_set():
                            req.cond.wait(1.0)
                        new, sent = req.tokens[sent:], len(req.tokens)
                    for tok in new:
                        delta = {"delta": {"content": tok}} if chat else {"text": tok}
                        self._chunk(
                            {
                                "id": "cmpl-sim",
                                "object": "chat.completion.chunk" if chat else "text_completion",
                                "choices": [{"index": 0, **delta, "finish_reason": None}],
                            }
                        )
                    if req.done.is_set() and sent >= len(req.tokens):
                        break
                if req.failed:
                    self._chunk(
                        {
                            "error": {
                                "message": "The server had an error while processing your request.",
                                "type": "InternalServerError",
                                "code": 500,
                            }
                        }
                    )
                self._raw(b"data: [DONE]\n\n")
                self._raw(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _chunk(self, obj: dict) -> None:
            self._raw(f"data: {json.dumps(obj)}\n\n".encode())

        def _raw(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


def error(message: str, param: str | None, code: int = 400) -> dict:
    kind = "BadRequestError" if code == 400 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def prompt_tokens(body: dict, chat: bool) -> int:
    if chat:
        return sum(max(1, len(str(m.get("content", ""))) // 4) + 4 for m in body.get("messages", [])) + 2
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, list):
        prompt = "".join(map(str, prompt))
    return max(1, len(str(prompt)) // 4)


def metrics(eng: Engine, served: str) -> str:
    lab = f'engine="0",model_name="{served}"'
    b = eng.boot
    return "\n".join(
        [
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} {eng.kv_usage:.6f}",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} {len(eng.running)}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} {len(eng.waiting)}",
            "# TYPE vllm:num_preemptions_total counter",
            f"vllm:num_preemptions_total{{{lab}}} {eng.preemptions}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="length"}} {eng.finished}',
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{b.block_size}",cache_dtype="auto",'
            f'gpu_memory_utilization="{eng.util}",num_gpu_blocks="{b.num_blocks}"}} 1.0',
            "",
        ]
    )
