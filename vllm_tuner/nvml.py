"""The only place that talks to NVML (``pynvml`` from nvidia-ml-py).

Everything above this module sees plain dataclasses. NVML errors become :class:`GpuError` here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import GpuError


@dataclass(frozen=True)
class GpuMemory:
    index: int
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used: int


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    uuid: str
    total: int


class Nvml:
    """An initialised NVML session. Use :func:`open_nvml`; close it (or use ``with``)."""

    unit = "GPU"  # one device in messages (the NUMA nodes' reader, hostmem.HostNodes, says "NUMA node")
    inspect_with = "nvidia-smi"  # the tool that shows who holds a device's memory

    def __init__(self, module: ModuleType) -> None:
        self._nv = module

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except self._nv.NVMLError:
            pass

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._nv.NVMLError as exc:
            raise GpuError(
                f"NVML call {fn.__name__} failed: {exc}", "check the NVIDIA driver with nvidia-smi"
            ) from exc

    def _handle(self, index: int):
        count = self.device_count()
        if not 0 <= index < count:
            raise GpuError(
                f"GPU {index} does not exist (this machine has {count} GPU(s))",
                f"choose --gpu-ids between 0 and {count - 1}" if count else "run on a machine with a GPU",
            )
        return self._call(self._nv.nvmlDeviceGetHandleByIndex, index)

    def device_count(self) -> int:
        return int(self._call(self._nv.nvmlDeviceGetCount))

    def driver_version(self) -> str:
        return _text(self._call(self._nv.nvmlSystemGetDriverVersion))

    def device(self, index: int) -> GpuDevice:
        h = self._handle(index)
        mem = self._call(self._nv.nvmlDeviceGetMemoryInfo, h)
        return GpuDevice(
            index=index,
            name=_text(self._call(self._nv.nvmlDeviceGetName, h)),
            uuid=_text(self._call(self._nv.nvmlDeviceGetUUID, h)),
            total=int(mem.total),
        )

    def memory(self, index: int) -> GpuMemory:
        mem = self._call(self._nv.nvmlDeviceGetMemoryInfo, self._handle(index))
        return GpuMemory(index=index, total=int(mem.total), used=int(mem.used), free=int(mem.free))

    def processes(self, index: int) -> list[GpuProcess]:
        procs = self._call(self._nv.nvmlDeviceGetComputeRunningProcesses, self._handle(index))
        return [GpuProcess(pid=int(p.pid), used=int(p.usedGpuMemory or 0)) for p in procs]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_nvml(module: ModuleType | None = None) -> Nvml:
    """Initialise NVML through ``module``, a ``pynvml`` (the simulated machine's under ``--simulate``);
    by default the installed one, imported."""
    if module is None:
        try:
            module = importlib.import_module("pynvml")
        except ImportError as exc:
            raise GpuError("pynvml is not installed", "pip install nvidia-ml-py") from exc
    try:
        module.nvmlInit()
    except module.NVMLError as exc:
        raise GpuError(
            f"NVML is not available ({exc})",
            "without an NVIDIA GPU, add --simulate SCENARIO to try the tool (scenarios in profiles/sim/); "
            "'vllm-tune estimate' also takes --gpu NAME or --gpu-memory SIZE",
        ) from exc
    return Nvml(module)
