"""``status`` of a running deployment: each instance's process, ``/health`` and KV-cache use, the
proxy ``up --proxy`` started (its process and ``/health``), each GPU's memory against what the plan puts
there and its alert level; rendered as a table or a dict.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..probe import PreemptionReading, kv_usage_from_metrics, preemptions_from_metrics
from ..procgroup import RELEASE_TOLERANCE_BYTES
from ..units import GIB
from .instances import InstanceProcesses
from .state import DeploymentState, is_alive

ALERT_LEVELS = ((0.95, "critical"), (0.90, "major"), (0.80, "warning"))


def deployment_status(state: DeploymentState, *, nvml, http, processes: InstanceProcesses) -> StatusReport:
    """Each instance's process, ``/health`` and KV use, and each GPU's memory against the plan."""
    rows = []
    per_pid: dict[int, dict[int, int]] = {}
    gpus = sorted({g for i in state.instances for g in i.gpu_ids})
    for g in gpus:
        per_pid[g] = {p.pid: p.used for p in nvml.processes(g)}
    for inst in state.instances:
        alive = processes.alive(inst)
        health = http_status(http, f"http://127.0.0.1:{inst.port}/health") if alive else None
        pids = processes.pids(inst) if alive else set()
        used = {g: sum(v for pid, v in per_pid[g].items() if pid in pids) for g in inst.gpu_ids}
        metrics = _metrics_text(http, inst.port) if health == 200 else None
        kv = kv_usage_from_metrics(metrics) if metrics is not None else None
        preemption = preemptions_from_metrics(metrics) if metrics is not None else None
        rows.append(
            InstanceStatus(
                inst.name,
                inst.port,
                inst.gpu_ids,
                alive,
                health,
                used,
                kv,
                inst.footprint_bytes,
                inst.phase,
                preemption=preemption,
            )
        )
    recorded = {i.name for i in state.instances}
    for name in state.planned:  # what should run and was never started (a failed switch and rollback)
        if name not in recorded:
            rows.append(InstanceStatus(name, None, [], False, None, {}, None, 0, state.phase, started=False))
    cards = []
    for g in gpus:
        mem = nvml.memory(g)
        # what the plan itself puts on the card: what was there before 'up', and each instance's footprint
        planned = state.baseline_used.get(str(g), 0) + sum(
            i.footprint_bytes for i in state.instances if g in i.gpu_ids
        )
        as_planned = mem.used <= planned + RELEASE_TOLERANCE_BYTES
        cards.append(GpuStatus(g, mem.total, mem.used, alert_level(mem.used / mem.total), as_planned))
    proxy = None
    if state.proxy is not None:
        alive = is_alive(state.proxy)
        health = http_status(http, f"{state.proxy.url}/health") if alive else None
        proxy = ProxyStatus(state.proxy.url, state.proxy.port, alive, health)
    return StatusReport(state.name, state.phase, rows, cards, proxy)


@dataclass
class InstanceStatus:
    name: str
    port: int | None  # None: not started
    gpu_ids: list[int]
    alive: bool
    health: int | None  # HTTP status of /health, None if unreachable or the process is gone
    used_bytes: dict[int, int]  # NVML per-process usage of its session, per GPU
    kv_usage: float | None  # vllm:kv_cache_usage_perc (0..1)
    planned_bytes: int
    phase: str | None = None
    started: bool = True  # False: its phase should run it, and no process of it was started
    preemption: PreemptionReading | None = None  # since the server started, from its /metrics

    @property
    def state(self) -> str:
        if not self.started:
            return "not running"
        if not self.alive:
            return "dead"
        return "healthy" if self.health == 200 else f"unhealthy ({self.health or 'no answer'})"


@dataclass
class ProxyStatus:
    url: str
    port: int
    alive: bool
    health: int | None  # HTTP status of its /health (200: every upstream healthy), None if no answer

    @property
    def state(self) -> str:
        if not self.alive:
            return "dead"
        return "healthy" if self.health == 200 else f"unhealthy ({self.health or 'no answer'})"


@dataclass
class GpuStatus:
    id: int
    total_bytes: int
    used_bytes: int
    alert: str  # "" | warning | major | critical
    as_planned: bool = False  # no more than the plan puts there: an alert says the plan fills the card

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass
class StatusReport:
    name: str
    phase: str | None
    instances: list[InstanceStatus]
    gpus: list[GpuStatus]
    proxy: ProxyStatus | None = None

    @property
    def healthy(self) -> bool:
        """Every instance that should run answers /health, and so does its proxy if it has one; a
        deployment that runs nothing is not healthy."""
        proxy_ok = self.proxy is None or self.proxy.state == "healthy"
        return bool(self.instances) and all(i.state == "healthy" for i in self.instances) and proxy_ok

    def as_dict(self) -> dict:
        return {
            "deployment": self.name,
            "phase": self.phase,
            "healthy": self.healthy,
            "instances": [
                {
                    "name": i.name,
                    "state": i.state,
                    "port": i.port,
                    "gpu_ids": i.gpu_ids,
                    "used_bytes": {str(k): v for k, v in i.used_bytes.items()},
                    "planned_bytes": i.planned_bytes,
                    "kv_usage": i.kv_usage,
                    "preemptions": i.preemption.preemptions if i.preemption else None,
                    "completed_requests": i.preemption.requests if i.preemption else None,
                    "preemption_rate": _rate(i.preemption),
                    "phase": i.phase,
                }
                for i in self.instances
            ],
            "gpus": [
                {
                    "id": g.id,
                    "total_bytes": g.total_bytes,
                    "used_bytes": g.used_bytes,
                    "fraction": round(g.fraction, 4),
                    "alert": g.alert,
                    "as_planned": g.as_planned,
                }
                for g in self.gpus
            ],
            "proxy": None
            if self.proxy is None
            else {"url": f"{self.proxy.url}/v1", "port": self.proxy.port, "state": self.proxy.state},
        }

    def render(self) -> str:
        phase = f"  phase {self.phase}" if self.phase else ""
        lines = [
            f"Deployment {self.name}{phase}: {'healthy' if self.healthy else 'NOT healthy'}",
            "",
            f"  {'instance':<16}{'state':<20}{'port':>6}  {'GPU':<5}{'used GiB':>9}{'planned':>9}{'KV use':>8}",
        ]
        for i in self.instances:
            used = sum(i.used_bytes.values()) / GIB
            kv = f"{i.kv_usage * 100:.0f}%" if i.kv_usage is not None else "-"
            port = i.port if i.port is not None else "-"
            gpus = ",".join(map(str, i.gpu_ids)) or "-"
            lines.append(
                f"  {i.name:<16}{i.state:<20}{port:>6}  {gpus:<5}{used:>9.1f}{i.planned_bytes / GIB:>9.1f}{kv:>8}"
            )
        if self.proxy is not None:
            lines.append(f"  {'proxy':<16}{self.proxy.state:<20}{self.proxy.port:>6}  {self.proxy.url}/v1")
        for i in self.instances:  # vLLM preempts when the KV pool runs short: the traffic outgrows it
            if i.preemption is not None and i.preemption.preemptions:
                lines.append(f"  {i.name}: {i.preemption.words()}: its KV pool is too small for this traffic")
        lines.append("")
        for g in self.gpus:
            alert = f"  ALERT {g.alert}" if g.alert else ""
            if g.alert and g.as_planned:
                alert += " (as planned: the plan fills the card)"
            lines.append(
                f"  GPU {g.id}: {g.used_bytes / GIB:.1f} / {g.total_bytes / GIB:.1f} GiB "
                f"({g.fraction * 100:.0f}%){alert}"
            )
        return "\n".join(lines) + "\n"


def alert_level(fraction: float) -> str:
    """``critical`` at 95% of the card, ``major`` at 90%, ``warning`` at 80%, else ""."""
    for threshold, level in ALERT_LEVELS:
        if fraction >= threshold:
            return level
    return ""


def _metrics_text(http, port: int) -> str | None:
    try:
        response = http.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0)
    except Exception:
        return None
    return response.text if response.status_code == 200 else None


def _rate(reading: PreemptionReading | None) -> float | None:
    if reading is None or reading.rate == float("inf"):
        return None
    return round(reading.rate, 4)


def http_status(http, url: str) -> int | None:
    try:
        return http.get(url, timeout=5.0).status_code
    except Exception:  # connection refused while booting, timeouts: "no answer"
        return None
