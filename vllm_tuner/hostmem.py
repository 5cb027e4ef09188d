"""Host memory per NUMA node, read the way vLLM's CPU backend reads it.

vLLM on the CPU budgets a NUMA node's RAM as it budgets a GPU's memory: ``--gpu-memory-utilization``
is a fraction of the node's ``MemTotal``, and its startup check compares that with the node's available
memory, ``MemFree + Active(file) + Inactive(file) + SReclaimable`` from
``/sys/devices/system/node/nodeN/meminfo``, both clamped to the cgroup memory limit where one is set
(``vllm/utils/cpu_resource_utils.py``, ``get_memory_node_info``). Without NUMA nodes in sysfs it uses
the whole machine's numbers (psutil's ``virtual_memory``; here ``/proc/meminfo``, the same source).

:class:`HostNodes` answers the same questions as :class:`vllm_tuner.nvml.Nvml` (count, device, memory,
processes, driver) so everything above the device seam works on a node as on a GPU. The files it reads
live under ``root`` (``/``), so tests hand it a folder of their own.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from .errors import GpuError
from .nvml import GpuDevice, GpuMemory, GpuProcess

_NODE_DIR = re.compile(r"^node(\d+)$")
_MEMINFO_LINE = re.compile(r"^(?:Node \d+ )?([\w()]+):\s+(\d+)(?: kB)?$")
_UNLIMITED = 1 << 62  # cgroup v1's "no limit" is a number near PAGE_COUNTER_MAX


class HostNodes:
    """The NUMA nodes of this machine as devices (index = node id). Same interface as ``Nvml``."""

    unit = "NUMA node"
    inspect_with = "numastat -p or ps"

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    def __enter__(self) -> HostNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    # -- nodes --------------------------------------------------------------------------------
    def node_ids(self) -> list[int]:
        """The NUMA nodes with memory, in order; ``[0]`` where sysfs shows none (one node: the machine)."""
        folder = self.root / "sys/devices/system/node"
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            return [0]
        ids = sorted(int(m.group(1)) for n in names if (m := _NODE_DIR.match(n)))
        with_memory = [i for i in ids if self._node_meminfo_path(i).exists()]
        return with_memory or [0]

    def device_count(self) -> int:
        return len(self.node_ids())

    def driver_version(self) -> str:
        """What stands for the driver in a fingerprint: the kernel that manages the memory."""
        return f"linux {platform.release()}"

    def _check(self, index: int) -> None:
        ids = self.node_ids()
        if index not in ids:
            raise GpuError(
                f"NUMA node {index} does not exist (this machine has {len(ids)} node(s): "
                f"{', '.join(map(str, ids))})",
                f"choose --gpu-ids from {', '.join(map(str, ids))} (on --device cpu they name NUMA nodes)",
            )

    def device(self, index: int) -> GpuDevice:
        self._check(index)
        mem = self.memory(index)
        return GpuDevice(
            index=index,
            name=f"{_cpu_model(self.root)} (NUMA node {index})",
            uuid=self._uuid(index),
            total=mem.total,
        )

    def _uuid(self, index: int) -> str:
        """Stable per machine and node: the machine id where there is one, else the host name."""
        machine = _read(self.root / "etc/machine-id").strip() or platform.node()
        return f"numa-{machine}-node{index}"

    def memory(self, index: int) -> GpuMemory:
        """Total and available as vLLM computes them; used = total - available."""
        self._check(index)
        info = self._meminfo(index)
        total = info["MemTotal"]
        available = info["MemFree"] + info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
        available += info.get("SReclaimable", 0)
        limit = self._cgroup_limit()
        if limit is not None and limit < total:
            total = limit
            available = max(0, min(available, limit - (self._cgroup_usage() or 0)))
        available = min(available, total)
        return GpuMemory(index=index, total=total, used=total - available, free=available)

    def processes(self, index: int) -> list[GpuProcess]:
        """Processes whose memory lives on this node, with their resident bytes there. With one node
        that is every process; with several, the node's share from ``numa_maps`` (for processes of
        64 MiB or more, which is every vLLM)."""
        self._check(index)
        single = self.device_count() == 1
        out = []
        for pid, rss in _resident(self.root):
            if single:
                out.append(GpuProcess(pid=pid, used=rss))
                continue
            on_node = _node_share(self.root, pid, index)
            if on_node:
                out.append(GpuProcess(pid=pid, used=on_node))
        return out

    # -- files --------------------------------------------------------------------------------
    def _node_meminfo_path(self, index: int) -> Path:
        return self.root / f"sys/devices/system/node/node{index}/meminfo"

    def _meminfo(self, index: int) -> dict[str, int]:
        path = self._node_meminfo_path(index)
        if not path.exists():  # no NUMA in sysfs: the machine's numbers, as vLLM's psutil fallback
            path = self.root / "proc/meminfo"
        values = {}
        for line in _read(path).splitlines():
            match = _MEMINFO_LINE.match(line.strip())
            if match:
                values[match.group(1)] = int(match.group(2)) * 1024
        if "MemTotal" not in values or "MemFree" not in values:
            raise GpuError(
                f"cannot read the memory of NUMA node {index} from {path}",
                "run on Linux with /sys and /proc mounted, or use --device cuda on a GPU machine",
            )
        return values

    def _cgroup_limit(self) -> int | None:
        v2 = _read_int(self.root / "sys/fs/cgroup/memory.max")
        if v2 is not None:
            return v2
        v1 = _read_int(self.root / "sys/fs/cgroup/memory/memory.limit_in_bytes")
        return v1 if v1 is not None and v1 < _UNLIMITED else None

    def _cgroup_usage(self) -> int | None:
        if _read_int(self.root / "sys/fs/cgroup/memory.max") is not None:
            return _read_int(self.root / "sys/fs/cgroup/memory.current")
        return _read_int(self.root / "sys/fs/cgroup/memory/memory.usage_in_bytes")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None  # "max" (cgroup v2, no limit) is not a number


def _cpu_model(root: Path) -> str:
    for line in _read(root / "proc/cpuinfo").splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return f"{platform.machine() or 'CPU'} CPU"


_MIN_LISTED = 64 << 20


def _resident(root: Path) -> list[tuple[int, int]]:
    """(pid, resident bytes) of every process of 64 MiB or more this user can read."""
    out: list[tuple[int, int]] = []
    try:
        entries = os.listdir(root / "proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        for line in _read(root / "proc" / name / "status").splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                if rss >= _MIN_LISTED:
                    out.append((int(name), rss))
                break
    return out


_NODE_PAGES = re.compile(r"\bN(\d+)=(\d+)")
_PAGE_SIZE = re.compile(r"\bkernelpagesize_kB=(\d+)")


def _node_share(root: Path, pid: int, node: int) -> int:
    """Bytes of ``pid``'s mapped pages on ``node``, from ``/proc/PID/numa_maps``."""
    total = 0
    for line in _read(root / "proc" / str(pid) / "numa_maps").splitlines():
        size = _PAGE_SIZE.search(line)
        page = int(size.group(1)) * 1024 if size else 4096
        for n, pages in _NODE_PAGES.findall(line):
            if int(n) == node:
                total += int(pages) * page
    return total
