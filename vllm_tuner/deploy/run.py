"""``up``, phase switches and ``down`` of a planned deployment: :class:`Runner`, the flow that starts,
verifies, switches and stops its instances (their processes: :mod:`.instances`; ``status``: :mod:`.status`).

The instances must outlive the CLI, so each is spawned detached in its own session (``setsid``),
under a detached reaper (:mod:`vllm_tuner.procgroup`, the same process-group code as a trial's
server), logging to a file, and recorded in the state file. ``up`` starts them one after another: each only once
the previous answers ``/health`` and its GPU memory has settled, and only if the memory free at that
moment passes vLLM's startup check for the planned utilization. Every collaborator comes in as an
argument: ``states`` (:class:`.state.StateFiles`: the state file, the logs' folder), ``spawn`` (argv,
env, log) -> pid, ``nvml`` (:class:`vllm_tuner.nvml.Nvml`), ``http`` (an ``httpx.Client``), ``docker`` (:class:`vllm_tuner.deploy.containers.DockerCli`), ``clock``/``sleep``.

With ``Settings.docker_image`` each instance is a container of that image instead: the detached process
is its ``docker run`` client (which logs the container's output and exits with it), the container has a
name unique to that start, and stopping it is ``docker stop`` + ``docker rm -f`` of that name only.
"""

from __future__ import annotations

import math
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..devices import CUDA, DeviceKind
from ..errors import DeployError, TunerError
from ..procgroup import spawn_detached
from ..units import GIB, MIB
from ..vllmargv import vllm_argv, with_value
from .containers import DockerCli, container_name, instance_run_argv
from .instances import InstanceProcesses, Spawn, start_detached
from .plan import CUDA_CONTEXT_BYTES, SERVE_HOST, DeploymentPlan, Instance, passes_startup_check
from .state import (
    DeploymentState,
    InstanceState,
    ProxyState,
    StateFiles,
    is_alive,
    proc_start_time,
)
from .status import StatusReport, deployment_status, http_status

SETTLE_TOLERANCE_BYTES = 64 * MIB

BindCheck = Callable[[str, int], str | None]  # (host, port) -> why it cannot be bound, or None


def cannot_bind(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound on ``host`` right now (None when it can), binding as vLLM's server
    does (``SO_REUSEADDR``: a port in TIME_WAIT is no obstacle, one another process listens on is)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


VERIFY_PROMPT = list(range(100, 132))  # 32 token ids, inside any vocabulary


@dataclass
class Settings:
    vllm_cmd: str = "vllm"
    env: dict[str, str] = field(default_factory=dict)  # added to every instance (simulator, HF_HOME, ...)
    ready_timeout_s: float = 1800.0
    proxy_ready_timeout_s: float = 60.0  # 'up --proxy': its /health once the instances are healthy
    settle_timeout_s: float = 120.0
    poll_s: float = 1.0
    release_timeout_s: float = 120.0
    stop_grace_s: float = 30.0
    verify: bool = True
    log_dir: Path | None = None
    docker_image: str | None = None  # start containers of this image instead of local `vllm serve`
    hf_cache: Path | None = None  # mounted into every container (the host's HF hub cache)
    attach: dict = field(default_factory=dict)  # recorded as it is in the state file (DeploymentState.attach)
    device: DeviceKind = CUDA  # what the instances run on (recorded in the state file)


@dataclass
class UpReport:
    state: DeploymentState
    started: list[str]
    verified: dict[str, str]  # name -> "" ok, or what failed under simultaneous load
    switch_s: float | None = None


@dataclass(frozen=True)
class StopReport:
    """What :meth:`Runner.stop_all` did: how each instance ended, by name in stop order ("stopped",
    "already gone", ...), whether the GPU memory came back ("released", or what is still held), and how
    the proxy ended (None when ``up`` started none)."""

    instances: dict[str, str]
    released: str
    proxy: str | None = None


class Runner:
    """Starts, watches and stops one deployment's instances."""

    def __init__(
        self,
        *,
        nvml,
        http,
        states: StateFiles,
        spawn: Spawn = spawn_detached,
        docker: DockerCli | None = None,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        note: Callable[[str], None] = lambda _t: None,
        bind_check: BindCheck = cannot_bind,
    ) -> None:
        self.nvml = nvml
        self.http = http
        self.states = states
        self.spawn = spawn
        self.bind_check = bind_check
        self.docker = docker or DockerCli()
        self.settings = settings or Settings()
        self.clock, self.wall_clock, self.sleep, self.note = clock, wall_clock, sleep, note

    # -------------------------------------------------------------------------------------------- up

    def up(
        self,
        plan: DeploymentPlan,
        *,
        phase: str | None = None,
        tuned: dict[str, dict] | None = None,
        proxy_port: int | None = None,
    ) -> UpReport:
        """Start the plan's instances (always-on, then ``phase`` or the first one) one after another,
        then (``proxy_port``) ``vllm-tune proxy`` in front of them. ``tuned`` (what ``up --tune``
        measured, by instance) is recorded in the state file."""
        if not plan.fits:
            raise DeployError(
                f"deployment {plan.deployment.name!r} does not fit: {plan.problems[0]}",
                "run 'vllm-tune plan FILE' to see what would fit",
            )
        dep = plan.deployment
        dep.check_phase(phase)
        self.check_ports(plan, plan.instances, proxy_port=proxy_port)
        gpu_ids = sorted({g for i in plan.instances for g in i.gpu_ids})
        state = DeploymentState(
            dep.name,
            dep.source,
            self.wall_clock(),
            {str(g): self.nvml.memory(g).used for g in gpu_ids},
            phase=phase or (dep.phases[0] if dep.phases else None),
            cooldown_s=dep.cooldown_s,
            headroom_bytes=dep.headroom_bytes,
            tuned=dict(tuned or {}),
            attach=dict(self.settings.attach),
            device=self.settings.device.name,
        )
        order = plan.start_order(state.phase)
        state.planned = [i.name for i in order]
        started: list[str] = []
        try:
            for inst in order:
                state.instances.append(self._start_one(plan, inst, state))
                self.states.save(state)
                started.append(inst.name)
            verified = self.verify(state) if self.settings.verify else {}
            if proxy_port is not None:
                self._start_proxy(state, proxy_port)
        except BaseException:
            self.note("stopping what this 'up' started")
            self.stop_all(state)
            self.states.remove(dep.name)
            raise
        return UpReport(state, started, verified)

    def check_ports(
        self, plan: DeploymentPlan, instances: Sequence[Instance], *, proxy_port: int | None = None
    ) -> None:
        """Before anything starts (and before tuning): every instance's port, and the proxy's, must be
        free on the host it will serve on; a port another process holds would only show once the
        instances before it had started, as a failed start."""
        if proxy_port is not None:
            clash = next((i.name for i in plan.instances if i.port == proxy_port), None)
            why = f"{clash} serves on it" if clash else self.bind_check(SERVE_HOST, proxy_port)
            if why is not None:
                raise DeployError(
                    f"--proxy port {proxy_port} cannot be bound on {SERVE_HOST} ({why}); nothing was started",
                    f"choose another --proxy port, or stop what holds port {proxy_port}",
                )
        for inst in instances:
            why = self.bind_check(SERVE_HOST, inst.port)
            if why is not None:
                raise DeployError(
                    f"port {inst.port} of {inst.name} cannot be bound on {SERVE_HOST} ({why}); nothing was started",
                    f"change {inst.name}'s port: in {plan.deployment.source}, or stop what holds port {inst.port}",
                )

    def _start_one(
        self, plan: DeploymentPlan, inst: Instance, state: DeploymentState | None = None
    ) -> InstanceState:
        util = self._checked_utilization(plan, inst, state)
        serve = with_value(inst.serve_args(), "--gpu-memory-utilization", f"{util:.2f}")
        env = {**os.environ, **self.settings.env, **dict(inst.entry.env)}
        recorded = [*self.settings.env, *dict(inst.entry.env)]
        container = ""
        if self.settings.docker_image:
            container = container_name(plan.deployment.name, inst.name)
            argv = instance_run_argv(
                serve,
                image=self.settings.docker_image,
                name=container,
                port=inst.port,
                gpu_ids=inst.gpu_ids,
                deployment=plan.deployment.name,
                instance=inst.name,
                hf_cache=self.settings.hf_cache,
                env_keys=recorded,
            )
        else:
            argv = vllm_argv(shlex.split(self.settings.vllm_cmd), serve)
            device_env = self.settings.device.serve_env(inst.gpu_ids, inst.config)
            env.update(device_env)
            recorded[:0] = list(device_env)
        log_dir = self.settings.log_dir or self.states.log_dir(plan.deployment.name)
        log_path = log_dir / f"{inst.name}.log"
        where = f" in container {container}" if container else ""
        self.note(f"starting {inst.name} on GPU {','.join(map(str, inst.gpu_ids))} port {inst.port}{where}")
        started = self.clock()
        pid = start_detached(self.spawn, argv, env, log_path, grace_s=self.settings.stop_grace_s)
        record = InstanceState(
            name=inst.name,
            pid=pid,
            pgid=pid,
            port=inst.port,
            gpu_ids=list(inst.gpu_ids),
            argv=argv,
            env={k: env[k] for k in recorded},
            log_path=str(log_path),
            proc_start=proc_start_time(pid) or "",
            started_at=self.wall_clock(),
            phase=inst.phase,
            model=inst.public_name,
            kv_bytes=inst.kv_bytes,
            footprint_bytes=inst.footprint_bytes,
            gpu_memory_utilization=util,
            container=container,
            image=self.settings.docker_image or "",
        )
        try:
            self._wait_healthy(record)
            self._wait_settled(record)
        except BaseException:
            self.processes.stop(record)
            raise
        record.ready_s = round(self.clock() - started, 3)
        self.note(f"{inst.name} is healthy after {record.ready_s:.1f}s")
        return record

    def _start_proxy(self, state: DeploymentState, port: int) -> None:
        """``vllm-tune proxy NAME --port PORT`` (this interpreter), detached under the reaper as the
        instances are, recorded in the state file once it answers ``/health``. It reads the instances
        from the state file, so it follows a phase switch."""
        argv = [
            sys.executable,
            "-m",
            "vllm_tuner",
            "proxy",
            state.name,
            "--host",
            SERVE_HOST,
            "--port",
            str(port),
        ]
        log_dir = self.settings.log_dir or self.states.log_dir(state.name)
        log_path = log_dir / "proxy.log"
        self.note(f"starting the proxy on port {port}")
        pid = start_detached(self.spawn, argv, dict(os.environ), log_path, grace_s=self.settings.stop_grace_s)
        state.proxy = ProxyState(
            pid=pid,
            pgid=pid,
            port=port,
            argv=argv,
            log_path=str(log_path),
            proc_start=proc_start_time(pid) or "",
            started_at=self.wall_clock(),
        )
        self.states.save(state)  # recorded before waiting: a failure below stops it with the instances
        deadline = self.clock() + self.settings.proxy_ready_timeout_s
        while http_status(self.http, f"{state.proxy.url}/health") != 200:
            if not is_alive(state.proxy):
                raise DeployError(
                    f"the proxy exited while starting: {_last_line(log_path)}", f"see {log_path}"
                )
            if self.clock() > deadline:
                raise DeployError(
                    f"the proxy did not answer /health within {self.settings.proxy_ready_timeout_s:.0f}s",
                    f"see {log_path}",
                )
            self.sleep(min(self.settings.poll_s, 0.2))
        self.note(f"the proxy answers on {state.proxy.url}/v1")

    def _checked_utilization(
        self, plan: DeploymentPlan, inst: Instance, state: DeploymentState | None = None
    ) -> float:
        """The planned utilization if the memory free right now passes vLLM's check, else a lower one
        that still covers the instance's own share, else a refusal with the numbers and their cause:
        an instance this deployment started holding more than planned, or other processes."""
        util = inst.gpu_memory_utilization
        own = inst.footprint_bytes - CUDA_CONTEXT_BYTES
        for g in inst.gpu_ids:
            mem = self.nvml.memory(g)
            free_at_check = mem.free - CUDA_CONTEXT_BYTES
            if passes_startup_check(util, mem.total, free_at_check):
                continue
            lower = math.floor(free_at_check / mem.total * 100) / 100
            if lower * mem.total < own:
                short = (
                    f"GPU {g} has {mem.free / GIB:.1f} GiB free before starting {inst.name}, which needs "
                    f"{inst.footprint_bytes / GIB:.1f} GiB (the plan expected "
                    f"{inst.free_at_start_bytes / GIB + CUDA_CONTEXT_BYTES / GIB:.1f} GiB free)"
                )
                raise self._short_of_memory(plan, state, g, mem, short)
            util = min(util, lower)
        return util

    def _short_of_memory(
        self, plan: DeploymentPlan, state: DeploymentState | None, g: int, mem, short: str
    ) -> DeployError:
        """Why GPU ``g`` has less free than planned, each cause with its size, the largest one's fix first:
        a smaller card than the plan's, the instances this deployment already started there holding more
        than planned (NVML's per-process usage of each against its planned footprint), other processes
        (beyond what the plan counted before ``up``, or since ``up`` began)."""
        source = plan.deployment.source
        free_fix = "free the GPU (nvidia-smi shows who holds it) or lower this model's needs"
        if state is None:
            return DeployError(short, free_fix)
        causes: list[tuple[int, str, str]] = []  # (bytes, what, fix)
        card = plan.gpu(g)
        smaller = card.total_bytes - mem.total
        if smaller > SETTLE_TOLERANCE_BYTES:
            causes.append(
                (
                    smaller,
                    f"the plan is for a {card.total_bytes / GIB:.1f} GiB GPU ({card.name}) but GPU {g} has "
                    f"{mem.total / GIB:.1f} GiB",
                    f"plan for this GPU: drop gpus.profile / gpus.memory from {source}"
                    if plan.offline
                    else f"run 'vllm-tune plan {source}' again on this machine",
                )
            )
        held = {p.pid: p.used for p in self.nvml.processes(g)}
        over: list[tuple[InstanceState, int]] = []
        ours_bytes = 0
        for inst in (i for i in state.instances if g in i.gpu_ids):
            measured = sum(held.get(pid, 0) for pid in self.processes.pids(inst))
            ours_bytes += measured or inst.footprint_bytes
            if measured - inst.footprint_bytes > SETTLE_TOLERANCE_BYTES:
                over.append((inst, measured))
        if over:
            names = ", ".join(inst.name for inst, _ in over)
            tuned = [inst.name for inst, _ in over if inst.name in state.tuned]
            fix = (
                f"{', '.join(tuned)} grew past what 'up --tune' measured: raise headroom in {source}, "
                f"or lower {names}'s needs"
                if tuned
                else f"the plan's numbers are estimates: run 'vllm-tune up {source} --tune' to measure each "
                f"model within its share and start it with what was measured, or lower {names}'s needs"
            )
            for inst, measured in over:
                causes.append(
                    (
                        measured - inst.footprint_bytes,
                        f"{inst.name} took {(measured - inst.footprint_bytes) / GIB:.1f} GiB more than the plan "
                        f"(it holds {measured / GIB:.1f} GiB, planned {inst.footprint_bytes / GIB:.1f} GiB)",
                        fix,
                    )
                )
        before = state.baseline_used.get(str(g), 0)
        earlier = before - card.used_bytes
        if earlier > SETTLE_TOLERANCE_BYTES:
            causes.append(
                (
                    earlier,
                    f"other processes held {earlier / GIB:.1f} GiB more when 'up' began than the plan counted "
                    "(nvidia-smi shows who)",
                    free_fix,
                )
            )
        since = mem.used - before - ours_bytes
        if since > SETTLE_TOLERANCE_BYTES:
            causes.append(
                (
                    since,
                    f"other processes took {since / GIB:.1f} GiB since 'up' began (nvidia-smi shows who)",
                    free_fix,
                )
            )
        if not causes:
            return DeployError(short, free_fix)
        causes.sort(key=lambda c: -c[0])
        return DeployError(f"{short}: {'; '.join(c[1] for c in causes)}", causes[0][2])

    def _wait_healthy(self, inst: InstanceState) -> None:
        deadline = self.clock() + self.settings.ready_timeout_s
        url = f"http://127.0.0.1:{inst.port}/health"
        while True:
            if not is_alive(inst):
                raise DeployError(
                    f"{inst.name} exited while starting: {_log_cause(inst.log_path)}",
                    f"see {inst.log_path}; 'vllm-tune diagnose {inst.log_path}' explains it",
                )
            if http_status(self.http, url) == 200:
                return
            if self.clock() > deadline:
                raise DeployError(
                    f"{inst.name} did not answer /health within {self.settings.ready_timeout_s:.0f}s",
                    f"see {inst.log_path}; raise --ready-timeout for a slow first compile",
                )
            self.sleep(self.settings.poll_s)

    def _wait_settled(self, inst: InstanceState) -> None:
        """Until two readings of its GPUs' used memory in a row agree (the next instance then measures
        a stable free value, and this one's profiler never sees a neighbour's memory move)."""
        deadline = self.clock() + self.settings.settle_timeout_s
        last = None
        while self.clock() <= deadline:
            now = [self.nvml.memory(g).used for g in inst.gpu_ids]
            if last is not None and all(
                abs(a - b) <= SETTLE_TOLERANCE_BYTES for a, b in zip(now, last, strict=True)
            ):
                return
            last = now
            self.sleep(self.settings.poll_s)
        self.note(
            f"{inst.name}: GPU memory still moving after {self.settings.settle_timeout_s:.0f}s; going on"
        )

    # ------------------------------------------------------------------------------------------ verify

    def verify(
        self, state: DeploymentState, *, requests_each: int = 2, max_tokens: int = 16
    ) -> dict[str, str]:
        """Load every instance at once (short requests in parallel); all must answer and stay up."""
        results: dict[str, str] = {}
        lock = threading.Lock()

        def hit(inst: InstanceState) -> None:
            failure = ""
            for _ in range(requests_each):
                code = self._answer(inst, max_tokens)
                if code != 200:
                    failure = f"HTTP {code}" if code else "no answer"
            with lock:
                results[inst.name] = failure

        threads = []
        for inst in state.instances:
            threads += [threading.Thread(target=hit, args=(inst,), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.settings.ready_timeout_s)
        for inst in state.instances:
            if not is_alive(inst):
                results[inst.name] = "died under simultaneous load"
        bad = {k: v for k, v in results.items() if v}
        if bad:
            name, why = next(iter(bad.items()))
            raise DeployError(
                f"{name} failed under simultaneous load: {why}",
                "run 'vllm-tune plan' with more headroom, or lower that model's needs",
            )
        return results

    def _answer(self, inst: InstanceState, max_tokens: int) -> int | None:
        """HTTP status of one short request the instance serves: a completion, else (a pooling model:
        vLLM registers no completion route for it) an embedding, else (a classifier) ``/health``."""
        base = f"http://127.0.0.1:{inst.port}"
        # token ids: answered with or without a tokenizer (--skip-tokenizer-init)
        for route, body in (
            ("/v1/completions", {"model": inst.model, "prompt": VERIFY_PROMPT, "max_tokens": max_tokens}),
            ("/v1/embeddings", {"model": inst.model, "input": VERIFY_PROMPT}),
        ):
            try:
                response = self.http.post(base + route, json=body, timeout=120.0)
            except Exception:
                return None
            if not _no_such_route(response):
                return response.status_code
        return http_status(self.http, base + "/health")

    # ------------------------------------------------------------------------------------------- phases

    def switch_phase(self, plan: DeploymentPlan, state: DeploymentState, phase: str) -> UpReport:
        """Unload the current phase, wait for its memory, cool down, load ``phase``; time the switch.

        When ``phase`` does not start, what it started is stopped and the phase before it is loaded
        again (after the same cooldown): the DeployError says which phase runs now. The state file
        says at every step what should run and what does, so ``status`` never reports a phase as
        healthy that is not running."""
        plan.deployment.check_phase(phase)
        running = {i.name for i in state.instances}
        self.check_ports(plan, [i for i in plan.resident(phase) if i.name not in running])  # before unloading
        began = self.clock()
        previous = state.phase
        self._unload(state, [i for i in state.instances if i.phase is not None and i.phase != phase])
        try:
            started = self._load(plan, state, phase)
        except Exception as exc:  # Ctrl-C is not rolled back: the state file already tells what runs
            raise self._roll_back(plan, state, phase, previous, exc) from exc
        return UpReport(state, started, {}, switch_s=round(self.clock() - began, 3))

    def _unload(self, state: DeploymentState, leaving: Sequence[InstanceState]) -> None:
        """Stop ``leaving`` and wait until their memory is released."""
        expected = self.processes.used_without(leaving)
        for inst in reversed(leaving):
            self.processes.stop(inst)
        self.processes.wait_released(expected)
        state.instances = [i for i in state.instances if i not in leaving]
        self.states.save(state)

    def _load(self, plan: DeploymentPlan, state: DeploymentState, phase: str | None) -> list[str]:
        """Cool down, then start what ``phase`` has that is not running; the state names it first."""
        state.phase = phase
        state.planned = [i.name for i in plan.resident(phase)]
        self.states.save(state)
        if state.cooldown_s:
            self.sleep(state.cooldown_s)
        present = {i.name for i in state.instances}
        started = []
        for inst in plan.resident(phase):
            if inst.name not in present:
                state.instances.append(self._start_one(plan, inst, state))
                started.append(inst.name)
                self.states.save(state)
        return started

    def _roll_back(
        self, plan: DeploymentPlan, state: DeploymentState, failed: str, previous: str | None, exc: Exception
    ) -> DeployError:
        """Phase ``failed`` did not start: stop what it started, load ``previous`` again; the error to raise."""
        why = exc.problem if isinstance(exc, TunerError) else f"{type(exc).__name__}: {exc}"
        where = exc.fix if isinstance(exc, TunerError) and exc.fix else "see the instance logs"
        self.note(f"phase {failed} did not start; loading phase {previous} again")
        self._unload(state, [i for i in state.instances if i.phase == failed])
        try:
            self._load(plan, state, previous)
        except Exception as again:
            why_again = again.problem if isinstance(again, TunerError) else f"{type(again).__name__}: {again}"
            name = plan.deployment.name
            return DeployError(
                f"phase {failed} did not start ({why}), and phase {previous} did not start again ({why_again}): "
                f"phase {previous} is not running",
                f"{where}; 'vllm-tune status {name}' shows what runs, 'vllm-tune up "
                f"{plan.deployment.source} --phase {previous}' starts what is missing",
            )
        back = ", ".join(state.planned) or "nothing"
        return DeployError(
            f"phase {failed} did not start: {why}; phase {previous} runs again ({back})", where
        )

    # --------------------------------------------------------------------------------------------- down

    def used_without(self, leaving: Sequence[InstanceState]) -> dict[int, int]:
        """Per GPU, the used memory expected once ``leaving`` is gone (what a running deployment is
        re-planned against, its own instances left out)."""
        return self.processes.used_without(leaving)

    def stop_proxy(self, state: DeploymentState) -> str | None:
        """Stop the proxy ``up --proxy`` recorded (never a process whose identity changed); None when
        there is none."""
        if state.proxy is None:
            return None
        return self.processes.stop_process(state.proxy)

    def stop_all(self, state: DeploymentState) -> StopReport:
        """Stop the proxy, then every instance ``up`` recorded (never a process whose identity changed);
        wait for release."""
        proxy = self.stop_proxy(state)
        instances = {inst.name: self.processes.stop(inst) for inst in reversed(state.instances)}
        gpus = {g for i in state.instances for g in i.gpu_ids}
        released = self.processes.wait_released({g: state.baseline_used.get(str(g), 0) for g in gpus})
        return StopReport(instances=instances, released=released, proxy=proxy)

    # ------------------------------------------------------------------------------------------- status

    def status(self, state: DeploymentState) -> StatusReport:
        return deployment_status(state, nvml=self.nvml, http=self.http, processes=self.processes)

    @property
    def processes(self) -> InstanceProcesses:
        """The instances' processes, stopped and waited for as ``settings`` says now."""
        return InstanceProcesses(
            nvml=self.nvml,
            docker=self.docker,
            stop_grace_s=self.settings.stop_grace_s,
            poll_s=self.settings.poll_s,
            release_timeout_s=self.settings.release_timeout_s,
            clock=self.clock,
            sleep=self.sleep,
        )


def _no_such_route(response) -> bool:
    """FastAPI's answer for a route the server did not register (vLLM registers routes by task)."""
    if response.status_code != 404:
        return False
    try:
        return response.json() == {"detail": "Not Found"}
    except ValueError:
        return False


def _last_line(log_path: Path) -> str:
    """The last non-empty line of a log (a CLI's one-line error), or "no log"."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def _log_cause(log_path: str) -> str:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "no log"
    try:
        from ..logparse import classify

        diag = classify(text)
        evidence = getattr(diag, "evidence", "") or ""
        return f"{diag.category}" + (f" ({evidence.strip()[:200]})" if evidence else "")
    except Exception:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else "empty log"
