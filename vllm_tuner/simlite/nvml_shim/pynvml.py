"""Simulated NVML: a drop-in ``pynvml`` backed by the simulator's state folder.

Loaded by its path as a module of its own (:func:`vllm_tuner.simlite.activate.load_nvml`), never as the
process's ``pynvml``, and told its machine (:func:`use_state_dir`); handed to :class:`vllm_tuner.nvml.Nvml`
it answers for the scenario's GPUs. Without a state folder it fails like a machine without an NVIDIA
driver.
"""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error {self.value}")


class NVMLError_Uninitialized(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_UNINITIALIZED)


class NVMLError_InvalidArgument(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_INVALID_ARGUMENT)


class NVMLError_DriverNotLoaded(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_DRIVER_NOT_LOADED)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_LIBRARY_NOT_FOUND)


c_nvmlMemory_t = namedtuple("c_nvmlMemory_t", "total free used")
c_nvmlProcessInfo_t = namedtuple("c_nvmlProcessInfo_t", "pid usedGpuMemory")
_initialised = False
STATE_DIR: Path | None = None  # the simulated machine's state folder: use_state_dir()'s


def use_state_dir(folder: Path) -> None:
    """Answer for the simulated machine in ``folder`` (called by whoever loads this module)."""
    global STATE_DIR
    STATE_DIR = Path(folder)


def _folder() -> Path:
    if STATE_DIR is None or not (Path(STATE_DIR) / "scenario.json").is_file():
        raise NVMLError_LibraryNotFound()
    return Path(STATE_DIR)


def _scenario() -> dict:
    return json.loads((_folder() / "scenario.json").read_text())


def _live() -> dict[int, dict[int, int]]:
    # the simulator's state module, imported lazily so this file stays importable on its own
    from vllm_tuner.simlite.state import live_procs

    return live_procs(_folder())


def _foreign(scenario: dict) -> list[dict]:
    from vllm_tuner.simlite.state import foreign

    return foreign(_folder(), scenario)


def nvmlInit() -> None:
    global _initialised
    _folder()
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _initialised = False


def _check() -> None:
    if not _initialised:
        raise NVMLError_Uninitialized()


def nvmlSystemGetDriverVersion() -> str:
    _check()
    return str(_scenario().get("driver", "580.95.05"))


def nvmlDeviceGetCount() -> int:
    _check()
    return len(_scenario()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _check()
    if not 0 <= int(index) < nvmlDeviceGetCount():
        raise NVMLError_InvalidArgument()
    return int(index)


def nvmlDeviceGetName(handle: int) -> str:
    return _scenario()["gpus"][handle]["name"]


def nvmlDeviceGetUUID(handle: int) -> str:
    gpu = _scenario()["gpus"][handle]
    return gpu.get("uuid") or f"GPU-sim0000-{handle:04d}-0000-0000-{abs(hash(gpu['name'])) % 10**12:012d}"


def nvmlDeviceGetMemoryInfo(handle: int):
    scenario = _scenario()
    total = int(scenario["gpus"][handle]["total_bytes"])
    used = sum(int(p["bytes"]) for p in _foreign(scenario) if int(p["gpu"]) == handle)
    used += sum(g.get(handle, 0) for g in _live().values())
    used = min(used, total)
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: int):
    scenario = _scenario()
    out = [
        c_nvmlProcessInfo_t(int(p.get("pid", 1)), int(p["bytes"]))
        for p in _foreign(scenario)
        if int(p["gpu"]) == handle
    ]
    out += [c_nvmlProcessInfo_t(pid, g[handle]) for pid, g in _live().items() if g.get(handle)]
    return out
