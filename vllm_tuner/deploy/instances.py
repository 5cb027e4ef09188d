"""The processes of a deployment's instances (and of its proxy): each started detached under the
reaper (the same process-group code as a trial's server, :mod:`vllm_tuner.procgroup`), so it outlives
``up``; found again by its recorded identity (:mod:`.state`), stopped (its process group, or its
container), and the GPU memory it held waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import procgroup
from ..errors import DeployError
from ..procgroup import cannot_run, end_group, reap_if_child, reaper_argv
from ..units import GIB
from .containers import DockerCli
from .state import InstanceState, ProxyState, descendant_pids, is_alive, is_ours, session_pids

Spawn = Callable[[list[str], dict[str, str], Path], int]  # (argv, env, log file) -> pid, in its own session


def start_detached(
    spawn: Spawn, argv: list[str], env: dict[str, str], log_path: Path, *, grace_s: float
) -> int:
    """Start one instance's ``argv`` (``vllm serve ...`` or its ``docker run`` client) through ``spawn``
    under a detached reaper, which gives vLLM ``grace_s`` after SIGTERM; returns the pid (= group id)."""
    why = cannot_run(argv[0], env)
    if why is not None:
        raise DeployError(
            f"cannot start {argv[0]!r}: {why}",
            "install docker, or drop --docker-image to run vLLM locally"
            if argv[0] == "docker"
            else "check --vllm-cmd (e.g. --vllm-cmd /opt/venv/bin/vllm)",
        )
    return spawn(reaper_argv(None, argv, grace_s=grace_s), env, log_path)


@dataclass
class InstanceProcesses:
    """What runs for each recorded instance, as NVML and docker see it, and stopping it."""

    nvml: Any  # an open memory reader (Nvml or HostNodes)
    docker: DockerCli = field(default_factory=DockerCli)
    stop_grace_s: float = 30.0
    poll_s: float = 1.0
    release_timeout_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def used_without(self, leaving: Sequence[InstanceState]) -> dict[int, int]:
        """Per GPU, the used memory expected once ``leaving`` is gone: now minus what NVML says their
        processes hold (their planned footprint when NVML does not report per-process usage). Also
        what a running deployment is re-planned against, its own instances left out."""
        expected: dict[int, int] = {}
        for g in sorted({g for i in leaving for g in i.gpu_ids}):
            held = {p.pid: p.used for p in self.nvml.processes(g)}
            freed = 0
            for inst in leaving:
                if g in inst.gpu_ids:
                    measured = sum(held.get(pid, 0) for pid in self.pids(inst))
                    freed += measured or inst.footprint_bytes
            expected[g] = self.nvml.memory(g).used - freed
        return expected

    def pids(self, inst: InstanceState) -> set[int]:
        """The processes of one instance: its session, and for a container the container's processes
        (which docker starts outside the session of the ``docker run`` client)."""
        pids = set(session_pids(inst.pgid)) if is_ours(inst) else set()
        if inst.container:
            main = self.docker.pid(inst.container)
            if main is not None:
                pids.update(descendant_pids(main))
        return pids

    def alive(self, inst: InstanceState) -> bool:
        """A container is alive while docker runs it (its name is unique to this start); a process
        while its pid, start time and command line still match."""
        if inst.container:
            return self.docker.pid(inst.container) is not None
        return is_alive(inst)

    def stop(self, inst: InstanceState) -> str:
        """End one instance: "stopped", "killed" (SIGKILL after the grace period) or "already gone"."""
        if inst.container:
            return self._stop_container(inst)
        return self.stop_process(inst)

    def _stop_container(self, inst: InstanceState) -> str:
        """``docker stop`` (SIGTERM, SIGKILL after the grace period) and ``docker rm -f`` of exactly the
        name ``up`` recorded; then its ``docker run`` client, which exits with the container."""
        stopped = self.docker.stop(inst.container, self.stop_grace_s)
        self.docker.remove(inst.container)
        client = self.stop_process(inst)
        return "stopped" if stopped else client

    def stop_process(self, inst: InstanceState | ProxyState) -> str:
        """End the process group ``up`` recorded (an instance's, or the proxy's), only while it is still
        that very process: "stopped", "killed" or "already gone"."""
        # a recycled pid, or a process that died (a zombie nobody reaped still matches its identity)
        # leaving nothing of its session behind: nothing to stop
        if not is_ours(inst) or (not is_alive(inst) and not session_pids(inst.pgid)):
            reap_if_child(inst.pid)
            return "already gone"

        def gone() -> bool:
            reap_if_child(inst.pid)
            return not session_pids(inst.pgid)

        outcome = end_group(
            inst.pgid,
            gone=gone,
            grace_s=self.stop_grace_s,
            kill_wait_s=5.0,
            poll_s=min(self.poll_s, 0.2),
            clock=self.clock,
            sleep=self.sleep,
        )
        reap_if_child(inst.pid)
        return outcome

    def wait_released(self, expected: dict[int, int]) -> str:
        """Until each GPU's used memory is back down to ``expected`` (bytes, per GPU id)."""
        high = procgroup.wait_released(
            lambda: {g: self.nvml.memory(g).used for g in expected},
            expected,
            timeout_s=self.release_timeout_s,
            poll_s=self.poll_s,
            clock=self.clock,
            sleep=self.sleep,
        )
        if not high:
            return "released"
        g, extra = next(iter(high.items()))
        return f"GPU {g} still holds {extra / GIB:.2f} GiB more than before"
