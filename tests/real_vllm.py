"""What the real-vLLM test tier shares: the CPU build of vLLM (``make real-vllm``), a tiny Llama model the
tests write themselves, the installed tuner run as a user runs it, and a check that no process of a
vLLM tree the test started is left behind.

Every process a test starts (the tuner, and so every vLLM it launches) carries a marker in its
environment. vLLM renames its engine and workers (setproctitle), which overwrites what
``/proc/PID/environ`` shows of them, so a watcher also remembers the sessions of the marked session
leaders (the tuner's reaper, a pasted server) and counts every process of those sessions: the check
never confuses another test's or another user's processes with this one's.

The tier sets vLLM's own ``VLLM_CPU_CI_ENV=1`` ("always skips warmup to save CI time", cpu_worker.py):
the CPU worker's warm-up pass (~20 s of each start on two cores) decides nothing the tuner reads besides
a little resident memory, and without it the tier fits CI's 30 minutes. The bench
(scripts/bench_real_cpu.py) and the fixtures' numbers are from starts with the warm-up.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VENV = Path(os.environ.get("VLLM_TUNE_REAL_VLLM") or "/nonexistent")  # set by the Makefile's test targets
# a model without weights or tokenizer: ready in about 30 s on two cores
DUMMY = ("--load-format", "dummy", "--skip-tokenizer-init", "-O0")
MIN_AVAILABLE_GIB = 6.0  # the tiny servers at the tests' fractions, a co-tenant, and the test run beside it
GIB = 1 << 30
MARK = "VLLM_TUNE_TEST_MARK"
TUNER = Path(sys.executable).with_name("vllm-tune")


def tiny_llama(
    folder: Path,
    *,
    max_len: int = 4096,
    layers: int = 2,
    kv_heads: int = 2,
    heads: int = 4,
    head_dim: int | None = None,
) -> Path:
    """A Llama-architecture config vLLM serves with dummy weights (256 hidden, 4 heads of 64 unless
    ``heads``/``head_dim`` say otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        **({"head_dim": head_dim} if head_dim else {}),
        "vocab_size": 2048,
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def node_available_bytes() -> int:
    from vllm_tuner.hostmem import HostNodes

    return HostNodes().memory(0).free


def node_total_bytes() -> int:
    from vllm_tuner.hostmem import HostNodes

    return HostNodes().memory(0).total


# What vLLM 0.32's CPU worker holds besides the KV cache for the tiny models ("X GiB memory was
# consumed by non-kv usages": 0.61-0.66 here), and what the co-tenant test keeps away from vLLM.
NON_KV_GIB = 0.65


def small_fraction(pool_gib: float = 0.5) -> float:
    """The fraction of this node whose KV pool is about ``pool_gib`` (vLLM's worker holds ~NON_KV_GIB
    besides): a small pool starts fast (the CPU backend touches every page of it) whatever the node's size."""
    return round((NON_KV_GIB + pool_gib) / (node_total_bytes() / GIB) + 0.005, 2)


COTENANT_GIB = 4.0


def why_not_runnable() -> str | None:
    """Why the real tier cannot run here, or None."""
    if not os.environ.get("VLLM_TUNE_REAL_VLLM"):
        return (
            "VLLM_TUNE_REAL_VLLM is not set: 'make test' or 'make test-real' installs and names the CPU build"
        )
    if not (VENV / ".vllm-tune-ready").exists():
        return f"no CPU build of vLLM at {VENV}: run 'make real-vllm' (make test does it first)"
    if not TUNER.exists():
        return f"the tuner is not installed beside {sys.executable}: run 'make install'"
    available = node_available_bytes() / GIB
    if available < MIN_AVAILABLE_GIB:
        return f"NUMA node 0 has {available:.1f} GiB available, below the {MIN_AVAILABLE_GIB:.0f} GiB the tier needs"
    return None


@dataclass
class RealVllm:
    """One test's view of real vLLM: run the tuner, start a command, check what is left."""

    home: Path
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    captured: list[Path] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._watch, name="real-vllm-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            self.marked_processes()

    def close(self) -> None:
        self._stop.set()

    @property
    def vllm_cmd(self) -> str:
        return f"{VENV / 'bin' / 'python'} -m vllm.entrypoints.openai.api_server"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env[MARK] = self.mark
        env["VLLM_TUNE_HOME"] = str(self.home)
        env["VLLM_TUNE_VLLM_CMD"] = self.vllm_cmd
        env["VLLM_TUNE_DEVICE"] = "cpu"
        env["VLLM_CPU_CI_ENV"] = "1"  # skip the CPU worker's warm-up (see the module's docstring)
        env["PYTHONFAULTHANDLER"] = "1"  # a tuner that hangs shows its stacks when a test aborts it
        env.update(extra or {})
        return env

    def tune(
        self,
        *args: str,
        timeout_s: float = 540,
        ok: tuple[int, ...] = (0,),
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(TUNER), *args],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        self._capture_logs()
        assert done.returncode in ok, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def start_tuner(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(TUNER), *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def _capture_logs(self) -> None:
        """Every vLLM log the tuner wrote, for diagnose and the fixtures (VLLM_TUNE_CAPTURE_LOGS=DIR)."""
        for log in sorted((self.home / "logs").rglob("*.log")) + sorted(
            (self.home / "deployments").rglob("*.log")
        ):
            if log not in self.captured:
                self.captured.append(log)

    def marked_processes(self) -> list[tuple[int, str]]:
        """(pid, command) of every live process that carries this test's marker or lives in a session
        a marked process leads, zombies aside."""
        found = []
        needle = f"{MARK}={self.mark}".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
                state, sid = fields[0], int(fields[3])  # state ppid pgrp session ...
                marked = needle in Path(f"/proc/{name}/environ").read_bytes()
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if marked and sid == pid:
                self.sessions.add(sid)
            if state != "Z" and (marked or sid in self.sessions):
                found.append((pid, cmd.strip()[:120]))
        return found

    def assert_nothing_left(self, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        while self.marked_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = self.marked_processes()
        for pid, _cmd in left:  # never leave them to the next test, whatever the verdict
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"vLLM processes survived: {left}"

    def wait_for_process(self, pattern: str, timeout_s: float = 120.0) -> int:
        """The pid of the first marked process whose command matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pid, cmd in self.marked_processes():
                if re.search(pattern, cmd):
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"no process like {pattern!r} appeared in {timeout_s:.0f}s")


def start_command(command: str, real: RealVllm, port: int, log: Path) -> subprocess.Popen:
    """Start a printed serve command (``ENV=... python -m ... --flags``) as a user would paste it, on
    ``port``, in its own process group."""
    words = shlex.split(command)
    env = real.env()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    with log.open("w") as out:
        return subprocess.Popen(
            [*words, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode} before it was ready"
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{base_url} was not healthy within {timeout_s:.0f}s")


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
