"""``vllm-tune plan|up|status|down|emit``: several models on shared GPUs, from one deployment file."""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import click

from ..errors import DeployError, GpuError, UsageError
from ..vllmargv import parse_command
from ._common import DEFAULT_SIM_TIME_SCALE, build_runtime, emit_json, option_stack, serve_vllm_cmd

FILE = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def _plan(file: Path, device: str | None = None):
    """The plan of ``file`` for ``plan`` and ``emit`` (on ``device`` when given). While that deployment
    runs, its own memory is not another tenant's: it is planned on the GPUs as ``up`` found them."""
    from ..deploy.costs import plan_deployment
    from ..deploy.spec import load_deployment

    deployment = _on_device(load_deployment(file), device)
    try:
        return plan_deployment(deployment, nvml_opener=_as_before_up(deployment.name))
    except GpuError as exc:
        if deployment.gpus.offline or deployment.gpus.device != "cuda":
            raise
        # NVML's own hint names --simulate, an option of find/up/ramp: plan and emit plan offline instead
        offline = (
            f"to plan without GPUs, write gpus.profile (e.g. rtx-pro-6000, from profiles/gpus.yaml) or "
            f"gpus.memory (e.g. 24GiB) with gpus.count in {file}, or plan on this machine's NUMA nodes "
            "with --device cpu"
        )
        fix = offline if not exc.fix or "--simulate" in exc.fix else f"{exc.fix}, or {offline}"
        raise GpuError(exc.problem, fix) from exc


def _as_before_up(name: str):
    """An NVML opener reporting each GPU's used memory as it was before ``up`` started deployment
    ``name``, or None (live NVML) when it is not running."""
    from ..deploy.state import deployment_states

    states = deployment_states()
    if not states.exists(name):
        return None
    try:
        state = states.load(name)
    except DeployError:
        return None
    before = {int(g): used for g, used in state.baseline_used.items()}
    simulation = recorded_simulation(state)

    def opener():
        from ..devices import device_kind, open_devices

        # started with --simulate: its GPUs are that simulated machine's
        nvml_module = _attach(simulation).nvml_module() if simulation else None
        return _Borrowed(open_devices(device_kind(state.device), nvml_module=nvml_module), before, owned=True)

    return opener


def _refuse(plan) -> None:
    if not plan.fits:
        raise DeployError(
            f"deployment {plan.deployment.name!r} does not fit ({len(plan.problems)} problem(s))",
            "see 'Does not fit' and 'What would fit' above",
        )


def _tuned_plan(plan, file: Path):
    """``plan`` with the numbers ``up --tune`` measured, which live in the deployment's state file
    until ``down``."""
    from ..deploy.state import deployment_states
    from ..deploy.tune import apply_tuning

    name = plan.deployment.name
    try:
        state = deployment_states().load(name)
    except DeployError as exc:
        raise DeployError(
            f"--tuned: no running deployment named {name!r}, so no tuned numbers to write",
            f"run 'vllm-tune up {file} --tune' first (its numbers are kept until 'vllm-tune down {name}')",
        ) from exc
    if not state.tuned:
        raise DeployError(
            f"--tuned: deployment {name!r} was started without --tune, so it has no tuned numbers",
            f"run 'vllm-tune down {name}' then 'vllm-tune up {file} --tune'",
        )
    unknown = sorted(set(state.tuned) - {i.name for i in plan.instances})
    if unknown:
        raise DeployError(
            f"--tuned: the running deployment {name!r} has instances this file lacks: {', '.join(unknown)}",
            f"emit from the file it was started with ({state.source})",
        )
    return apply_tuning(plan, state.tuned)


@click.command()
@FILE
@click.option("--json", "json_", is_flag=True, help="Print the plan as one JSON object.")
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default=None,
    help="Plan on GPUs (cuda) or NUMA nodes (cpu) [default: the file's gpus.device, else cuda].",
)
def plan_command(file, json_, device):
    """Plan several models on shared GPUs: placement, KV budgets, start order, memory table.

    \b
    Examples:
      vllm-tune plan profiles/deployments/coder-general-96gb.yaml
      vllm-tune plan profiles/deployments/rag-16gb-phased.yaml --json
    """
    from ..deploy.report import plan_json, render_plan

    plan = _plan(file, device)
    if json_:
        emit_json(plan_json(plan))
    else:
        click.echo(render_plan(plan), nl=False)
    _refuse(plan)


def _deployment_file(target: str) -> Path:
    """A deployment file given as itself, or as the name of a running deployment (the file it was
    started from)."""
    path = Path(target)
    if path.is_file():
        return path
    from ..deploy.state import deployment_states

    states = deployment_states()
    if states.exists(target):
        state = states.load(target)
        found = state.source_path()
        if found is not None:
            return found
        hint = "pass the deployment file itself: 'vllm-tune emit FILE' (FILE as given to 'vllm-tune up')"
        if not Path(state.source).is_absolute():  # an older 'up' recorded the path as it was typed
            raise DeployError(
                f"deployment {target!r} was started from {state.source}, a path relative to the folder 'up' "
                "ran in, and it is not here nor where its instances run",
                f"run this in that folder, or {hint}",
            )
        raise DeployError(f"deployment {target!r} was started from {state.source}, which is gone", hint)
    raise UsageError(
        f"{target!r} is neither a deployment file nor a running deployment",
        "pass a deployment file (e.g. profiles/deployments/coder-general-96gb.yaml) or the name of one 'up' started",
    )


@click.command()
@click.argument("target", metavar="FILE|NAME")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["shell", "compose", "systemd", "kubernetes", "helm", "litellm", "router", "ray"]),
    default="shell",
    show_default=True,
    help="What to write.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the file(s) into this folder instead of printing them.",
)
@click.option("--image", default=None, help="Container image (compose, kubernetes, helm).")
@click.option("--vllm-cmd", default=None, help="How the script or unit runs vLLM (shell, systemd, ray).")
@click.option(
    "--tuned",
    is_flag=True,
    help="Write the numbers 'up --tune' measured (read from the running deployment's state).",
)
@click.option(
    "--proxy",
    "proxy_port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Also write 'vllm-tune proxy' on PORT in front of the models, started after them (compose, systemd).",
)
def emit_command(target, fmt, out, image, vllm_cmd, tuned, proxy_port):
    """Write a deployment as shell, compose, systemd, Kubernetes, Helm, router or Ray files.

    \b
    Examples:
      vllm-tune emit profiles/deployments/coder-general-96gb.yaml --format compose > compose.yaml
      vllm-tune emit deploy.yaml --format kubernetes --out k8s/
      vllm-tune emit deploy.yaml --format litellm      (one endpoint routing by model name)
      vllm-tune emit deploy.yaml --tuned --format compose   (after 'vllm-tune up deploy.yaml --tune')
      vllm-tune emit coder-general-96gb --tuned              (a running deployment, by name)
      vllm-tune emit deploy.yaml --format systemd --proxy 9000   (one endpoint for all models too)
    """
    from ..deploy.emit import PROXY_FORMATS, emit

    if proxy_port is not None and fmt not in PROXY_FORMATS:
        raise UsageError(
            f"--proxy is written by --format {' and '.join(PROXY_FORMATS)}, not {fmt}",
            f"use --format compose or systemd, or drop --proxy and run 'vllm-tune proxy' next to the {fmt} files",
        )
    file = _deployment_file(target)
    plan = _plan(file)
    _refuse(plan)
    if proxy_port is not None:
        _check_emitted_proxy(plan, proxy_port)
    if tuned:
        plan = _tuned_plan(plan, file)
    options: dict[str, object] = {}
    if image and fmt in ("compose", "kubernetes", "helm"):
        options["image"] = image
    if vllm_cmd and fmt in ("shell", "systemd", "ray"):
        options["vllm_cmd"] = vllm_cmd
    if proxy_port is not None:
        options["proxy_port"] = proxy_port
    files = emit(plan, fmt, **options)
    if out is None:
        for name, text in files.items():
            if len(files) > 1:
                click.echo(f"# ===== {name}")
            click.echo(text, nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
        click.echo(f"wrote {path}", err=True)


def _check_emitted_proxy(plan, port: int) -> None:
    """The emitted proxy starts once with fixed upstreams: a phased deployment's servers come and go,
    and its port must not be a model's."""
    name = plan.deployment.name
    if plan.deployment.phases:
        raise UsageError(
            f"--proxy: deployment {name!r} has phases, whose servers come and go; an emitted proxy starts "
            "with fixed upstreams",
            "drop --proxy and run 'vllm-tune proxy URL...' for the phase that runs, or "
            f"'vllm-tune up {_arg(plan.deployment.source)} --proxy {port}', whose proxy follows phase switches",
        )
    clash = next((i.name for i in plan.instances if i.port == port), None)
    if clash:
        raise UsageError(f"--proxy port {port} is {clash}'s port", "choose another --proxy port")


@click.command()
@FILE
@click.option("--phase", default=None, help="Load this phase (a running deployment switches to it).")
@click.option("--no-verify", is_flag=True, help="Skip the simultaneous-load check after start.")
@click.option(
    "--ready-timeout", default="30m", show_default=True, help="Longest one instance may take to be healthy."
)
@click.option("--tune", is_flag=True, help="Run 'find' for each instance within its share first.")
@click.option(
    "--max-launches",
    type=int,
    default=12,
    show_default=True,
    help="With --tune: the most vLLM launches 'find' may use per instance.",
)
@click.option(
    "--vllm-cmd", default="vllm", show_default=True, envvar="VLLM_TUNE_VLLM_CMD", help="How to run vLLM."
)
@click.option(
    "--docker-image",
    default=None,
    metavar="IMAGE",
    help="Start each instance as a container of this image (vllm/vllm-openai:TAG).",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --tune: SQLite file for the trials [default: the user's data directory].",
)
@click.option("--json", "json_", is_flag=True, help="Print one JSON object.")
@click.option(
    "--simulate",
    metavar="SCENARIO",
    default=None,
    help="Simulated GPUs and vLLM (profiles/sim/SCENARIO.yaml).",
)
@click.option("--sim-time-scale", type=float, default=DEFAULT_SIM_TIME_SCALE, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default=None,
    help="What the models run on [default: the file's gpus.device, else cuda].",
)
@click.option(
    "--proxy",
    "proxy_port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Also start 'vllm-tune proxy' on PORT in front of the models ('down' stops it).",
)
def up_command(
    file,
    phase,
    no_verify,
    ready_timeout,
    tune,
    max_launches,
    vllm_cmd,
    docker_image,
    db,
    json_,
    simulate,
    sim_time_scale,
    device,
    proxy_port,
):
    """Start a deployment's models one after another and verify them together.

    \b
    Examples:
      vllm-tune up profiles/deployments/coder-general-96gb.yaml
      vllm-tune up deploy.yaml --proxy 9000         (one endpoint for all models on port 9000)
      vllm-tune up deploy.yaml --tune               (run 'find' per instance within its share first)
      vllm-tune up deploy.yaml --docker-image vllm/vllm-openai:v0.33.0
      vllm-tune up rag.yaml --phase rerank        (switch a running phased deployment)
    """
    from ..deploy.spec import load_deployment
    from ..deploy.state import deployment_states
    from ..deploy.tune import apply_tuning, tune_plan
    from ..units import parse_duration

    ready_timeout_s = parse_duration(ready_timeout, option="--ready-timeout")
    if max_launches < 1:
        raise UsageError(
            f"--max-launches must be at least 1, got {max_launches}", "use e.g. --max-launches 12"
        )
    deployment = _on_device(load_deployment(file), device)
    deployment.check_phase(phase)  # before anything (tuning takes minutes)
    # the state records where the file is, absolute: 'emit NAME' and the hints work from any folder
    deployment = replace(deployment, source=os.path.abspath(file))
    states = deployment_states()
    running = states.load(deployment.name) if states.exists(deployment.name) else None
    attach: dict | None = None
    if running is not None:
        again = _sim_flag(recorded_simulation(running))
        if tune:
            raise DeployError(
                f"--tune needs the GPUs to itself, but deployment {deployment.name!r} is already up",
                f"'vllm-tune down {deployment.name}' first, then 'vllm-tune up {_arg(file)} --tune{again}'",
            )
        if proxy_port is not None:
            raise DeployError(
                f"--proxy starts with the deployment, but deployment {deployment.name!r} is already up",
                f"'vllm-tune down {deployment.name}' first, then 'vllm-tune up {_arg(file)} --proxy {proxy_port}{again}'"
                if running.proxy is None
                else f"its proxy already serves {running.proxy.url}/v1: drop --proxy",
            )
        if phase is None:
            raise DeployError(
                f"deployment {deployment.name!r} is already up",
                f"'vllm-tune status {deployment.name}' to watch it, or 'vllm-tune down {deployment.name}' first",
            )
        attach = _simulation_of(running, simulate)  # a phase switch starts on the same (simulated) GPUs
        if docker_image is None:  # ... and as containers of the same image when it was started so
            docker_image = next((i.image for i in running.instances if i.image), None)
    with _session(
        vllm_cmd=vllm_cmd,
        docker_image=docker_image,
        db=db,
        simulate=simulate,
        attach=attach,
        sim_time_scale=sim_time_scale,
        ready_timeout_s=ready_timeout_s,
        verify=not no_verify,
        quiet=json_,
        device=running.device if running is not None else deployment.gpus.device,
    ) as session:
        if docker_image:
            session.runtime.launcher.check()  # one line when docker is missing, before anything runs
        if running is not None:
            # re-planned with the deployment's own running instances left out of the GPUs' used memory
            own_left_out = session.runner.used_without(running.instances)
            plan = _refuse_live(_plan_live(deployment, session.nvml, used=own_left_out))
            report = session.runner.switch_phase(apply_tuning(plan, running.tuned), running, phase)
            states.save(report.state)
        else:
            plan = _refuse_live(_plan_live(deployment, session.nvml))
            # before --tune's minutes, not after them
            session.runner.check_ports(plan, plan.instances, proxy_port=proxy_port)
            tuned: dict[str, dict] = {}
            if tune:
                find_one = _find_one(
                    session,
                    vllm_cmd=vllm_cmd,
                    ready_timeout_s=ready_timeout_s,
                    max_launches=max_launches,
                )
                tuned = {
                    name: t.as_dict()
                    for name, t in tune_plan(
                        plan, find_one, nvml=session.nvml, note=session.runner.note
                    ).items()
                }
                plan = apply_tuning(plan, tuned)
            report = session.runner.up(plan, phase=phase, tuned=tuned, proxy_port=proxy_port)
    _print_up(report, json_)


def _on_device(deployment, device: str | None):
    """``deployment`` on ``--device`` when given (it wins over the file's ``gpus.device``)."""
    if device is None or device == deployment.gpus.device:
        return deployment
    from dataclasses import replace

    return replace(deployment, gpus=replace(deployment.gpus, device=device))


def _arg(value) -> str:
    """``value`` as one shell word, for a hint the user can paste."""
    return shlex.quote(str(value))


def _sim_flag(simulation: dict) -> str:
    """`` --simulate SCENARIO`` for a hint that starts a simulated deployment again; "" on real GPUs."""
    return f" --simulate {_arg(simulation['scenario'])}" if simulation else ""


# what --simulate gave a deployment's servers (PYTHONPATH too, in state files of older versions)
SIM_ENV_KEYS = ("VLLM_TUNE_SIM_STATE", "VLLM_TUNE_SIM_TIME_SCALE", "PYTHONPATH")


def recorded_simulation(state) -> dict:
    """The simulation a deployment runs on, ``{"scenario", "state_dir", "vllm_cmd", "env"}`` ({} for real
    GPUs), as ``up --simulate`` recorded it in the state (``attach``): ``status``, ``down`` and a phase
    switch must read that simulated machine. A state file written before it was recorded still names it
    in its instances' environment (the simulator's state folder)."""
    if state.attach:
        return state.attach
    for inst in state.instances:
        folder = inst.env.get(SIM_ENV_KEYS[0])
        if folder:
            command = parse_command(inst.argv)
            return {
                "scenario": Path(folder).name,  # --simulate keeps its state in data_dir()/sim/<scenario>
                "state_dir": folder,
                "vllm_cmd": shlex.join(command.vllm_words if command else inst.argv),
                "env": {k: inst.env[k] for k in SIM_ENV_KEYS if k in inst.env},
            }
    return {}


def _simulation_of(state, simulate: str | None) -> dict:
    """The simulation a running deployment was started on ({} for real GPUs): what ``status``, ``down``
    and ``up --phase`` read and start on. ``--simulate`` may only repeat it."""
    recorded = recorded_simulation(state)
    if simulate is None:
        return recorded
    if not recorded:
        raise DeployError(
            f"deployment {state.name!r} runs on real GPUs (it was started without --simulate), "
            f"not on --simulate {simulate}",
            "drop --simulate",
        )
    if Path(simulate).stem != recorded["scenario"]:
        raise DeployError(
            f"deployment {state.name!r} was started with --simulate {recorded['scenario']}, not {simulate}",
            "drop --simulate: the deployment's own simulation is used",
        )
    return recorded


def _attach(simulation: dict):
    """The simulated machine a running deployment was started on, as it is now (its servers' memory
    included): not a fresh one from the scenario file."""
    from ..simlite.activate import SimEnvironment
    from ..simlite.state import load_scenario

    folder = Path(simulation["state_dir"])
    if not (folder / "scenario.json").is_file():
        raise DeployError(
            f"the simulated machine this deployment was started on is gone (no {folder / 'scenario.json'})",
            "its servers cannot be read; stop them by their pids in the state file and remove that file",
        )
    return SimEnvironment(
        state_dir=folder,
        vllm_cmd=simulation["vllm_cmd"],
        env=dict(simulation["env"]),
        scenario=load_scenario(folder),
    )


def _find_one(session, *, vllm_cmd: str, ready_timeout_s: float, max_launches: int):
    """``target -> FindResult``: one instance's search, built as 'vllm-tune find' builds it (the same
    launcher, NVML, store, progress, trial log folder, machine fingerprint and GPU lock), so its trials
    land in the usual store and a failure known from an earlier search is not launched again."""

    from ..errors import TunerError
    from ..gpulock import GpuLock, gpu_lock_keys
    from ..gpus import resolve_gpus
    from ..launch import detect_vllm
    from ..models import resolve_model
    from ..trial import Timeouts
    from ._common import gpu_uuids, runtime_finder

    runtime, nvml = session.runtime, session.nvml
    docker = session.runner.settings.docker_image
    shown_cmd = serve_vllm_cmd(vllm_cmd, simulated=bool(runtime.simulated), docker_image=docker)
    detected: list = []

    def find_one(target):
        ids = list(target.gpu_ids)
        try:
            spec = resolve_model(target.model)
        except TunerError as exc:
            raise DeployError(f"--tune {target.name}: {exc.problem}", exc.fix) from exc
        gpu = resolve_gpus(gpus=None, gpu_ids=ids, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nvml)
        if not detected:
            detected.append(detect_vllm(runtime.launcher))
        request = target.request(
            vllm_cmd=shown_cmd, timeouts=Timeouts(ready_s=ready_timeout_s), max_launches=max_launches
        )
        with runtime.open_store() as store:
            finder = runtime_finder(
                request, spec=spec, gpu=gpu, runtime=runtime, nvml=nvml, store=store, vllm_info=detected[0]
            )
            with GpuLock(gpu_lock_keys(gpu_uuids(nvml, ids))):
                return finder.run()

    return find_one


def _plan_live(deployment, nvml, *, used: dict[int, int] | None = None):
    """The plan against live NVML; ``used`` (bytes per GPU id) replaces NVML's used memory."""
    from ..deploy.costs import plan_deployment

    return plan_deployment(deployment, nvml_opener=lambda: _Borrowed(nvml, used))


def _refuse_live(plan):
    """``up`` prints no plan: the first problem goes into the one error line."""
    if not plan.fits:
        raise DeployError(
            f"deployment {plan.deployment.name!r} does not fit: {plan.problems[0]}",
            f"run 'vllm-tune plan {_arg(plan.deployment.source)}' to see what would fit",
        )
    return plan


class _Borrowed:
    """An NVML session lent to the planner (closing it is the command's job unless ``owned``),
    optionally reporting other used memory per GPU."""

    def __init__(self, nvml, used: dict[int, int] | None = None, *, owned: bool = False) -> None:
        self._nvml = nvml
        self._used = used or {}
        self._owned = owned

    def __getattr__(self, name):
        return getattr(self._nvml, name)

    def memory(self, index: int):
        from dataclasses import replace

        mem = self._nvml.memory(index)
        if index not in self._used:
            return mem
        used = max(0, self._used[index])
        return replace(mem, used=used, free=mem.total - used)

    def close(self) -> None:
        if self._owned:
            self._nvml.close()


def _print_up(report, json_: bool) -> None:
    from ..deploy.tune import Tuned

    state = report.state
    tuned = {name: Tuned.from_dict(t) for name, t in state.tuned.items()}
    if json_:
        emit_json(
            {
                "deployment": state.name,
                "phase": state.phase,
                "started": report.started,
                "switch_s": report.switch_s,
                "verified": report.verified,
                "instances": [
                    {
                        "name": i.name,
                        "pid": i.pid,
                        "port": i.port,
                        "gpu_ids": i.gpu_ids,
                        "log": i.log_path,
                        "ready_s": i.ready_s,
                        "container": i.container or None,
                        "command": i.argv,
                        "tuned": state.tuned.get(i.name),
                    }
                    for i in state.instances
                ],
                "tuned": state.tuned,  # every tuned instance, those of phases not loaded now too
                "proxy": None
                if state.proxy is None
                else {"url": f"{state.proxy.url}/v1", "pid": state.proxy.pid, "log": state.proxy.log_path},
            }
        )
        return
    if report.switch_s is None:  # a phase switch re-applies the tuning of the first 'up'; not news
        for name, t in tuned.items():
            click.echo(t.describe(name))
    for inst in state.instances:
        where = f"container {inst.container}" if inst.container else f"pid {inst.pid:<8}"
        click.echo(
            f"{inst.name:<16} {where} http://127.0.0.1:{inst.port}  GPU "
            f"{','.join(map(str, inst.gpu_ids))}  ready in {inst.ready_s:.1f}s  log {inst.log_path}"
        )
    if state.proxy is not None:
        click.echo(f"{'proxy':<16} pid {state.proxy.pid:<8} {state.proxy.url}/v1  log {state.proxy.log_path}")
    if report.switch_s is not None:
        click.echo(f"switched to phase {state.phase} in {report.switch_s:.1f}s")
    if report.verified:
        click.echo(f"verified under simultaneous load: {', '.join(report.verified)}")
    click.echo(f"'vllm-tune status {state.name}' to watch, 'vllm-tune down {state.name}' to stop")


@dataclass
class _Session:
    runtime: object  # commands._common.Runtime: launcher, store, progress, simulator
    runner: object  # deploy.run.Runner
    nvml: object


@contextmanager
def _session(
    *,
    simulate: str | None,
    sim_time_scale: float,
    attach: dict | None = None,
    vllm_cmd: str = "vllm",
    docker_image: str | None = None,
    db: Path | None = None,
    ready_timeout_s: float = 1800.0,
    verify: bool = True,
    quiet: bool = True,
    device: str = "cuda",
) -> Iterator[_Session]:
    """The runtime ``find`` uses (launcher, store, progress, ``--simulate``), NVML and a Runner for
    ``up``, ``status`` and ``down``; NVML and the HTTP client are closed on the way out. ``attach`` (a
    running deployment's recorded simulation) reads and starts on that simulated machine instead of
    ``--simulate``'s fresh one."""
    import httpx

    from ..deploy.run import Runner, Settings
    from ..deploy.state import deployment_states

    runtime = build_runtime(
        vllm_cmd=vllm_cmd,
        docker_image=docker_image,
        db=db,
        json_=quiet,
        simulate=None if attach else simulate,
        sim_time_scale=sim_time_scale,
        device=device,
    )
    if attach:
        from dataclasses import replace

        sim = _attach(attach)
        runtime = replace(runtime, launcher=sim.launcher(), simulated=sim, nvml_module=sim.nvml_module())
        simulation = attach
    else:
        sim = runtime.simulated
        simulation = (
            {
                "scenario": Path(simulate).stem,
                "state_dir": str(sim.state_dir),
                "vllm_cmd": sim.vllm_cmd,
                "env": dict(sim.env),
            }
            if sim and simulate
            else {}
        )
    settings = Settings(
        vllm_cmd=sim.vllm_cmd if sim else vllm_cmd,
        env=dict(runtime.launcher.command_env),
        ready_timeout_s=ready_timeout_s,
        verify=verify,
        docker_image=docker_image,
        hf_cache=getattr(runtime.launcher, "hf_cache", None) if docker_image else None,
        attach=simulation,
        device=runtime.device,
    )
    note = (lambda _t: None) if quiet else (lambda t: click.echo(t, err=True))
    nvml = runtime.open_nvml()
    try:
        with httpx.Client() as http:
            runner = Runner(nvml=nvml, http=http, states=deployment_states(), settings=settings, note=note)
            yield _Session(runtime, runner, nvml)
    finally:
        nvml.close()


def _source(state) -> str:
    """The deployment file a state was started from, for a hint ("FILE" when it is not there any more)."""
    found = state.source_path()
    return _arg(found) if found is not None else "FILE"


_running_deployment_options = option_stack(
    click.argument("target", metavar="NAME|FILE"),
    click.option("--json", "json_", is_flag=True, help="Print one JSON object."),
    click.option(
        "--simulate",
        metavar="SCENARIO",
        default=None,
        help="Not needed: a deployment started with --simulate is read on its own simulation.",
    ),
    click.option("--sim-time-scale", type=float, default=DEFAULT_SIM_TIME_SCALE, hidden=True),
)


def _state_name(target: str) -> str:
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from ..deploy.spec import load_deployment

        return load_deployment(path).name
    return target


@click.command()
@_running_deployment_options
def status_command(target, json_, simulate, sim_time_scale):
    """Health, memory per instance and GPU, KV usage and alerts of a running deployment.

    \b
    Examples:
      vllm-tune status coder-general-96gb
      vllm-tune status profiles/deployments/coder-general-96gb.yaml --json
    """
    from ..deploy.state import deployment_states

    state = deployment_states().load(_state_name(target))
    attach = _simulation_of(state, simulate)
    with _session(
        simulate=None, attach=attach, sim_time_scale=sim_time_scale, device=state.device
    ) as session:
        report = session.runner.status(state)
    if json_:
        emit_json(report.as_dict())
    else:
        click.echo(report.render(), nl=False)
    if not report.healthy:
        raise DeployError(
            f"deployment {state.name!r} is not healthy",
            f"see the instance logs; 'vllm-tune down {state.name}' then "
            f"'vllm-tune up {_source(state)}{_sim_flag(attach)}' restarts it",
        )


@click.command()
@_running_deployment_options
def down_command(target, json_, simulate, sim_time_scale):
    """Stop what 'vllm-tune up' started (only those processes): its proxy, then its models; wait for
    GPU memory release.

    \b
    Example:
      vllm-tune down coder-general-96gb
    """
    from ..deploy.state import deployment_states

    states = deployment_states()
    state = states.load(_state_name(target))
    attach = _simulation_of(state, simulate)
    with _session(
        simulate=None, attach=attach, sim_time_scale=sim_time_scale, device=state.device
    ) as session:
        stopped = session.runner.stop_all(state)
    states.remove(state.name)
    if json_:
        emit_json(
            {
                "deployment": state.name,
                "proxy": stopped.proxy,
                "instances": stopped.instances,
                "gpu_memory": stopped.released,
            }
        )
        return
    if stopped.proxy is not None:
        click.echo(f"proxy: {stopped.proxy}")
    for name, what in stopped.instances.items():
        click.echo(f"{name}: {what}")
    click.echo(f"GPU memory: {stopped.released}")
