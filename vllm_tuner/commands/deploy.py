"""``vllm-tune plan|up|status|down|emit``: several models on shared GPUs, from one deployment file."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import DeployError
from ._common import DEFAULT_SIM_TIME_SCALE, emit_json

FILE = click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def _plan(file: Path, nvml_opener=None):
    from ..deploy.costs import plan_deployment
    from ..deploy.spec import load_deployment

    return plan_deployment(load_deployment(file), nvml_opener=nvml_opener)


def _refuse(plan) -> None:
    if not plan.fits:
        raise DeployError(
            f"deployment {plan.deployment.name!r} does not fit ({len(plan.problems)} problem(s))",
            "see 'Does not fit' and 'What would fit' above",
        )


@click.command()
@FILE
@click.option("--json", "json_", is_flag=True, help="Print the plan as one JSON object.")
def plan_command(file, json_):
    """Plan several models on shared GPUs: placement, KV budgets, start order, memory table.

    \b
    Examples:
      vllm-tune plan profiles/deployments/coder-general-96gb.yaml
      vllm-tune plan profiles/deployments/rag-16gb-phased.yaml --json
    """
    from ..deploy.report import plan_json, render_plan

    plan = _plan(file)
    if json_:
        emit_json(plan_json(plan))
    else:
        click.echo(render_plan(plan), nl=False)
    _refuse(plan)


@click.command()
@FILE
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
def emit_command(file, fmt, out, image, vllm_cmd):
    """Write a deployment as shell, compose, systemd, Kubernetes, Helm, router or Ray files.

    \b
    Examples:
      vllm-tune emit profiles/deployments/coder-general-96gb.yaml --format compose > compose.yaml
      vllm-tune emit deploy.yaml --format kubernetes --out k8s/
      vllm-tune emit deploy.yaml --format litellm      (one endpoint routing by model name)
    """
    from ..deploy.emit import emit

    plan = _plan(file)
    _refuse(plan)
    options: dict[str, object] = {}
    if image and fmt in ("compose", "kubernetes", "helm"):
        options["image"] = image
    if vllm_cmd and fmt in ("shell", "systemd", "ray"):
        options["vllm_cmd"] = vllm_cmd
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


@click.command()
@FILE
@click.option("--phase", default=None, help="Load this phase (a running deployment switches to it).")
@click.option("--no-verify", is_flag=True, help="Skip the simultaneous-load check after start.")
@click.option(
    "--ready-timeout", default="30m", show_default=True, help="Longest one instance may take to be healthy."
)
@click.option("--tune", is_flag=True, help="Run 'find' for each instance within its share first (not yet).")
@click.option(
    "--vllm-cmd", default="vllm", show_default=True, envvar="VLLM_TUNE_VLLM_CMD", help="How to run vLLM."
)
@click.option("--json", "json_", is_flag=True, help="Print one JSON object.")
@click.option(
    "--simulate",
    metavar="SCENARIO",
    default=None,
    help="Simulated GPUs and vLLM (profiles/sim/SCENARIO.yaml).",
)
@click.option("--sim-time-scale", type=float, default=DEFAULT_SIM_TIME_SCALE, show_default=True)
def up_command(file, phase, no_verify, ready_timeout, tune, vllm_cmd, json_, simulate, sim_time_scale):
    """Start a deployment's models one after another and verify them together.

    \b
    Examples:
      vllm-tune up profiles/deployments/coder-general-96gb.yaml
      vllm-tune up rag.yaml --phase rerank        (switch a running phased deployment)
    """
    from ..deploy.spec import load_deployment
    from ..deploy.state import load_state, save_state, state_path
    from ..units import parse_duration

    if tune:
        raise DeployError("--tune is not available yet", "run 'vllm-tune find' per model, then set its needs")
    runner, nvml = _runner(
        vllm_cmd=vllm_cmd,
        simulate=simulate,
        sim_time_scale=sim_time_scale,
        ready_timeout_s=parse_duration(ready_timeout, option="--ready-timeout"),
        verify=not no_verify,
        quiet=json_,
    )
    try:
        deployment = load_deployment(file)
        plan = _plan_live(deployment, nvml)
        if state_path(deployment.name).exists():
            state = load_state(deployment.name)
            if phase is None:
                raise DeployError(
                    f"deployment {deployment.name!r} is already up",
                    "use 'vllm-tune status' to watch it, or 'vllm-tune down' first",
                )
            report = runner.switch_phase(plan, state, phase)
            save_state(report.state)
        else:
            _refuse(plan)
            report = runner.up(plan, phase=phase)
    finally:
        nvml.close()
        runner.http.close()
    _print_up(report, json_)


def _plan_live(deployment, nvml):
    from ..deploy.costs import plan_deployment

    return plan_deployment(deployment, nvml_opener=lambda: _Borrowed(nvml))


class _Borrowed:
    """An NVML session lent to the planner: closing it is the command's job."""

    def __init__(self, nvml) -> None:
        self._nvml = nvml

    def __getattr__(self, name):
        return getattr(self._nvml, name)

    def close(self) -> None:
        pass


def _print_up(report, json_: bool) -> None:
    state = report.state
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
                    }
                    for i in state.instances
                ],
            }
        )
        return
    for inst in state.instances:
        click.echo(
            f"{inst.name:<16} pid {inst.pid:<8} http://127.0.0.1:{inst.port}  GPU "
            f"{','.join(map(str, inst.gpu_ids))}  ready in {inst.ready_s:.1f}s  log {inst.log_path}"
        )
    if report.switch_s is not None:
        click.echo(f"switched to phase {state.phase} in {report.switch_s:.1f}s")
    if report.verified:
        click.echo(f"verified under simultaneous load: {', '.join(report.verified)}")
    click.echo(f"'vllm-tune status {state.name}' to watch, 'vllm-tune down {state.name}' to stop")


def _runner(
    *,
    vllm_cmd: str,
    simulate: str | None,
    sim_time_scale: float,
    ready_timeout_s: float = 1800.0,
    verify: bool = True,
    quiet: bool = False,
):
    import httpx

    from ..deploy.run import Runner, Settings
    from ..nvml import open_nvml
    from ..paths import data_dir

    env: dict[str, str] = {}
    if simulate:
        from ..simlite.activate import create

        sim = create(simulate, state_dir=data_dir() / "sim" / Path(simulate).stem, time_scale=sim_time_scale)
        sim.apply()
        vllm_cmd, env = sim.vllm_cmd, dict(sim.env)
    settings = Settings(vllm_cmd=vllm_cmd, env=env, ready_timeout_s=ready_timeout_s, verify=verify)
    note = (lambda _t: None) if quiet else (lambda t: click.echo(t, err=True))
    nvml = open_nvml()
    return Runner(nvml=nvml, http=httpx.Client(), settings=settings, note=note), nvml


def _state_name(target: str) -> str:
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from ..deploy.spec import load_deployment

        return load_deployment(path).name
    return target


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "json_", is_flag=True, help="Print one JSON object.")
@click.option("--simulate", metavar="SCENARIO", default=None, help="Read the simulated GPUs.")
@click.option("--sim-time-scale", type=float, default=DEFAULT_SIM_TIME_SCALE, show_default=True)
def status_command(target, json_, simulate, sim_time_scale):
    """Health, memory per instance and GPU, KV usage and alerts of a running deployment.

    \b
    Examples:
      vllm-tune status coder-general-96gb
      vllm-tune status profiles/deployments/coder-general-96gb.yaml --json
    """
    from ..deploy.state import load_state

    state = load_state(_state_name(target))
    runner, nvml = _runner(vllm_cmd="vllm", simulate=simulate, sim_time_scale=sim_time_scale, quiet=True)
    try:
        report = runner.status(state)
    finally:
        nvml.close()
        runner.http.close()
    if json_:
        emit_json(report.as_dict())
    else:
        click.echo(report.render(), nl=False)
    if not report.healthy:
        raise DeployError(
            f"deployment {state.name!r} is not healthy",
            "see the instance logs; 'vllm-tune down' then 'vllm-tune up' restarts it",
        )


@click.command()
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "json_", is_flag=True, help="Print one JSON object.")
@click.option("--simulate", metavar="SCENARIO", default=None, help="Read the simulated GPUs.")
@click.option("--sim-time-scale", type=float, default=DEFAULT_SIM_TIME_SCALE, show_default=True)
def down_command(target, json_, simulate, sim_time_scale):
    """Stop what 'vllm-tune up' started (only those processes) and wait for GPU memory release.

    \b
    Example:
      vllm-tune down coder-general-96gb
    """
    from ..deploy.state import load_state, remove_state

    state = load_state(_state_name(target))
    runner, nvml = _runner(vllm_cmd="vllm", simulate=simulate, sim_time_scale=sim_time_scale, quiet=True)
    try:
        outcome = runner.stop_all(state)
    finally:
        nvml.close()
        runner.http.close()
    remove_state(state.name)
    if json_:
        emit_json(
            {
                "deployment": state.name,
                "instances": {k: v for k, v in outcome.items() if k != "_released"},
                "gpu_memory": outcome["_released"],
            }
        )
        return
    for name, what in outcome.items():
        if name != "_released":
            click.echo(f"{name}: {what}")
    click.echo(f"GPU memory: {outcome['_released']}")
