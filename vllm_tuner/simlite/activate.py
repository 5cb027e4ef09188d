"""Turn a scenario into a simulated machine: a state folder, the vLLM command and the environment it
needs, and the ``pynvml`` that reads the machine's GPUs.

Used by ``--simulate SCENARIO`` and by the tests' ``sim`` fixture; nothing else in the tuner knows. The
machine reaches the tuner only as values handed to it (a launcher's ``command_env``, an NVML module):
this process's environment, import path and ``sys.modules`` stay as they are.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import yaml

from ..deploy.state import proc_start_time
from ..errors import UsageError
from ..paths import profiles_dir
from ..units import GIB
from .state import SCALE_ENV, STATE_ENV, live_procs, pid_alive

SHIM_FILE = Path(__file__).resolve().parent / "nvml_shim" / "pynvml.py"


def load_nvml(state_dir: Path) -> ModuleType:
    """The simulated ``pynvml`` of the machine in ``state_dir``: the shim loaded by its path as a module
    of its own (``sys.modules`` and the import path untouched; two machines, two modules), told its
    state folder."""
    spec = importlib.util.spec_from_file_location(f"vllm_tune_sim_pynvml_{machine_tag(state_dir)}", SHIM_FILE)
    assert spec is not None and spec.loader is not None  # a .py file by its path always has both
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.use_state_dir(Path(state_dir))
    return module


@dataclass
class SimEnvironment:
    state_dir: Path
    vllm_cmd: str
    env: dict[str, str]  # what the simulated vLLM needs in its environment: the state folder, the time scale
    scenario: dict = field(default_factory=dict)

    def nvml_module(self) -> ModuleType:
        """The ``pynvml`` that reads this machine's GPUs (:func:`load_nvml`)."""
        return load_nvml(self.state_dir)

    def open_nvml(self):
        """An open :class:`vllm_tuner.nvml.Nvml` of this machine's GPUs."""
        from ..nvml import open_nvml

        return open_nvml(self.nvml_module())

    def launcher(self):
        """A :class:`vllm_tuner.launch.LocalLauncher` of the simulated vLLM on this machine."""
        from ..launch import LocalLauncher

        return LocalLauncher(self.vllm_cmd, command_env=self.env)


def scenario_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "sim").glob("*.yaml"))


def load_scenario_file(scenario: str | Path) -> dict:
    path = Path(scenario)
    if not path.suffix:
        path = profiles_dir() / "sim" / f"{scenario}.yaml"
    if not path.is_file():
        raise UsageError(
            f"unknown simulation scenario {str(scenario)!r}", f"choose one of: {', '.join(scenario_names())}"
        )
    return yaml.safe_load(path.read_text()) or {}


def machine_tag(state_dir: Path) -> str:
    """Eight hex digits that tell simulated machines apart: from the state folder's real path, so the
    same folder is the same machine (its GPUs keep their UUIDs, two tuners on it share the per-GPU
    lock) and two folders (two homes, two tests) are two machines that never share a lock."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]


def resolve(raw: dict, *, machine: str | None = None) -> dict:
    """GiB in the YAML → bytes; per-GPU lists expanded. A GPU without a ``uuid`` in the scenario
    gets one made from its position and ``machine`` (:func:`machine_tag`; ``0000…`` when None)."""
    out = copy.deepcopy(raw)
    tag = (machine or "00000000")[:8].rjust(8, "0")
    gpus: list[dict] = []
    for i, g in enumerate(raw.get("gpus", [])):
        count = int(g.get("count", 1))
        for _ in range(count):
            gpus.append(
                {
                    "name": g["name"],
                    "total_bytes": int(float(g["total_gib"]) * GIB),
                    "uuid": g.get("uuid")
                    or f"GPU-5{i:03d}{len(gpus):04d}-sim0-4e00-a000-{tag}{len(gpus):04d}",
                }
            )
    out["gpus"] = gpus
    out["foreign"] = [
        {"gpu": int(f["gpu"]), "bytes": int(float(f["gib"]) * GIB), "pid": int(f.get("pid", 4242))}
        for f in raw.get("foreign", [])
    ]
    return out


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _boot(folder: Path, resolved: dict, name: str) -> None:
    """Make ``folder`` the simulated machine of ``resolved``. While simulated servers started on it
    still run (a deployment's, another tuner's) it is the same machine, in use: they keep their
    memory and a scripted co-tenant stays as it is now, and a different scenario is refused. A
    machine nothing runs on starts afresh (the compile-cache markers stay, like a disk cache)."""
    path = folder / "scenario.json"
    running = sorted({*live_procs(folder), *_live_users(folder)}) if path.is_file() else []
    if running:
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if current != json.loads(json.dumps(resolved)):
            pids = ", ".join(map(str, running[:4]))
            raise UsageError(
                f"the simulated machine {folder} is in use (pids {pids}) with another "
                f"version of scenario {name!r}",
                "stop them first ('vllm-tune down NAME' for a deployment), or use another scenario file name",
            )
        return
    shutil.rmtree(folder / "procs", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / "foreign.json").unlink()
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved, indent=1))


def _use(folder: Path) -> None:
    """Mark this process as using the machine (``users/<pid>``): until it exits, another ``create`` of
    the same machine joins it instead of booting it afresh between this process's launches."""
    users = folder / "users"
    users.mkdir(parents=True, exist_ok=True)
    (users / str(os.getpid())).write_text(proc_start_time(os.getpid()) or "")


def _live_users(folder: Path) -> list[int]:
    """Other processes still using the machine (a pid is theirs only while its start time matches)."""
    out = []
    for entry in (folder / "users").glob("*") if (folder / "users").is_dir() else ():
        try:
            pid, started = int(entry.name), entry.read_text()
        except (ValueError, OSError):
            continue
        if pid == os.getpid():
            continue
        if pid_alive(pid) and proc_start_time(pid) == started:
            out.append(pid)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return out


def create(
    scenario: str | Path,
    *,
    state_dir: Path | None = None,
    time_scale: float = 1.0,
    overrides: dict | None = None,
) -> SimEnvironment:
    raw = _merge(load_scenario_file(scenario), copy.deepcopy(overrides or {}))
    folder = (
        Path(state_dir)
        if state_dir
        else Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-tune-sim-{os.getpid()}"
    )
    resolved = resolve(raw, machine=machine_tag(folder))
    _boot(folder, resolved, str(scenario))
    _use(folder)
    env = {STATE_ENV: str(folder), SCALE_ENV: str(time_scale)}
    cmd = f"{shlex.quote(sys.executable)} -m vllm_tuner.simlite"
    return SimEnvironment(state_dir=folder, vllm_cmd=cmd, env=env, scenario=resolved)
