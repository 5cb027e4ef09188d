"""The state of a running deployment (``data_dir()/deployments/<name>.json``) and process identity.

``down`` signals only a process whose pid, kernel start time and command line all still match what
``up`` recorded, so a recycled pid is never touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DeployError
from ..paths import data_dir


@dataclass
class InstanceState:
    name: str
    pid: int
    pgid: int
    port: int
    gpu_ids: list[int]
    argv: list[str]
    env: dict[str, str]
    log_path: str
    proc_start: str  # /proc/<pid>/stat field 22: start time in clock ticks since boot
    started_at: float
    phase: str | None = None
    model: str = ""
    kv_bytes: int = 0
    footprint_bytes: int = 0
    gpu_memory_utilization: float = 0.0
    ready_s: float = 0.0
    container: str = ""  # the docker container name when started with --docker-image (pid = its client)
    image: str = ""


@dataclass
class ProxyState:
    """The ``vllm-tune proxy`` that ``up --proxy PORT`` started in front of the instances (detached, under
    the reaper like them); identified for ``down`` as an instance is (:func:`is_ours`)."""

    pid: int
    pgid: int
    port: int
    argv: list[str]
    log_path: str
    proc_start: str
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class DeploymentState:
    name: str
    source: str
    started_at: float
    baseline_used: dict[str, int]  # NVML used bytes per GPU id (as str, for JSON) before up started anything
    instances: list[InstanceState] = field(default_factory=list)
    phase: str | None = None
    cooldown_s: float = 0.0
    headroom_bytes: int = 0
    # what 'up --tune' measured per instance (every phase's): re-applied when a phase switch starts one
    tuned: dict[str, dict] = field(default_factory=dict)
    # what the CLI needs to reach the machine it started on again ('up --simulate': the simulated one);
    # opaque here, {} on real GPUs
    attach: dict = field(default_factory=dict)
    device: str = "cuda"  # what its instances run on: status and down read that device's memory
    # the instances the current phase should run (always-on ones too): status names those not running
    planned: list[str] = field(default_factory=list)
    proxy: ProxyState | None = None  # 'up --proxy PORT'; absent from state files written before it

    def source_path(self) -> Path | None:
        """The deployment file it was started from, wherever this runs, or None when it cannot be found.
        ``up`` records it absolute; a state file written before that holds it relative to the folder
        ``up`` ran in, which its live instances still run in (their ``/proc/PID/cwd``), then this one."""
        source = Path(self.source)
        if source.is_absolute():
            return source if source.is_file() else None
        for inst in self.instances:
            if not is_ours(inst):
                continue
            try:
                folder = Path(os.readlink(f"/proc/{inst.pid}/cwd"))
            except OSError:
                continue
            if (folder / source).is_file():
                return folder / source
        return source.absolute() if source.is_file() else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        raw = json.loads(text)
        if "simulation" in raw:  # written before it was named attach
            raw["attach"] = raw.pop("simulation")
        raw["instances"] = [InstanceState(**i) for i in raw.get("instances", [])]
        if raw.get("proxy") is not None:
            raw["proxy"] = ProxyState(**raw["proxy"])
        return cls(**raw)


@dataclass(frozen=True)
class StateFiles:
    """The state files of running deployments, ``<name>.json`` in ``folder``; each deployment's instance
    logs go in ``folder/<name>/``. The CLI's is :func:`deployment_states`; tests hand it a folder."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def log_dir(self, name: str) -> Path:
        return self.folder / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, state: DeploymentState) -> Path:
        path = self.path(state.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, path)
        return path

    def load(self, name: str) -> DeploymentState:
        path = self.path(name)
        try:
            return DeploymentState.from_json(path.read_text())
        except FileNotFoundError as exc:
            known = sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []
            hint = (
                f"running deployments: {', '.join(known)}" if known else "start it with 'vllm-tune up FILE'"
            )
            raise DeployError(f"no running deployment named {name!r} (no {path})", hint) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise DeployError(
                f"the state file {path} is damaged: {exc}", f"remove {path} after checking nvidia-smi"
            ) from exc

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass


def deployment_states() -> StateFiles:
    """The user's running deployments: ``data_dir()/deployments``."""
    return StateFiles(data_dir() / "deployments")


# ------------------------------------------------------------------------------------------ process identity


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [w.decode(errors="replace") for w in raw.split(b"\0") if w]


def is_ours(inst: InstanceState | ProxyState) -> bool:
    """Still the very process ``up`` started: same pid, same start time, same port on its command line."""
    if proc_start_time(inst.pid) != inst.proc_start:
        return False
    cmdline = proc_cmdline(inst.pid)
    # pid + kernel start time already identify one process; the command line (empty for an instant
    # while the kernel is still exec-ing it) guards against a state file edited by hand
    return not cmdline or str(inst.port) in cmdline


def is_alive(inst: InstanceState | ProxyState) -> bool:
    return is_ours(inst) and proc_state(inst.pid) not in (None, "Z", "X")


def session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (the API server, engine core and workers of one instance)."""
    return [pid for pid, fields in _live_stats() if int(fields[3]) == sid]


def descendant_pids(root: int) -> list[int]:
    """``root`` and every live process below it (a container's main process and its workers)."""
    children: dict[int, list[int]] = {}
    alive = set()
    for pid, fields in _live_stats():
        alive.add(pid)
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root] if root in alive else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _live_stats() -> list[tuple[int, list[str]]]:
    """(pid, the /proc/<pid>/stat fields after the command name) of every live process."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 3 and fields[0] not in ("Z", "X"):
            out.append((int(entry.name), fields))
    return out
