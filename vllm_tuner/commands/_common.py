"""Options and wiring shared by the commands that launch vLLM (find, ramp, up).

This is the composition root: it builds the launcher, the store, NVML access and the progress
reporter from the command line and hands them to the domain code, which never builds its own.
``--simulate`` of find, ramp and up is wired here, as values the runtime carries: a launcher of the
simulated vLLM with the environment it needs (the simulated machine's state folder and time scale) and
the simulated ``pynvml`` module its NVML reads — exactly the seams real vLLM and NVML use, and nothing
of this process (environment, import path, ``sys.modules``) changed. (``estimate --simulate`` and a
simulated deployment's ``status``/``down`` attach in their own commands; nothing below ``commands/``
knows about the simulator.)
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from ..devices import CPU, CUDA, DeviceKind, device_kind, nvml_sees_a_gpu, open_devices
from ..errors import TunerError, UsageError
from ..paths import data_dir, default_db_path
from ..progress import Progress, QuietProgress, TerminalProgress
from ..trial import Timeouts
from ..units import parse_duration

if TYPE_CHECKING:
    from ..launch import DockerLauncher, Launcher, LocalLauncher
    from ..simlite.activate import SimEnvironment

DEFAULT_SIM_TIME_SCALE = 40.0


def option_stack(*decorators):
    """One decorator that applies ``decorators`` as if written top to bottom above a function."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def path_option(*param_decls: str, help: str):
    """A file option (``click.Path``, no directory) that defaults to None."""
    return click.option(
        *param_decls, type=click.Path(dir_okay=False, path_type=Path), default=None, help=help
    )


def target_options(**model_settings):
    """``--model`` (``model_settings``: ``required=True`` or ``default=None``), ``--gpus``, ``--gpu-ids``,
    ``--tensor-parallel-size`` (as ``tp``)."""
    return option_stack(
        click.option(
            "--model", "-m", **model_settings, help="HF id, local model dir, or bundled profile name."
        ),
        click.option("--gpus", type=int, default=None, help="Use the first N GPUs."),
        click.option("--gpu-ids", default=None, help="Use these GPUs, e.g. 0,2."),
        click.option(
            "--tensor-parallel-size", "-tp", "tp", type=int, default=None, help="[default: the GPU count]"
        ),
    )


def _headroom_gib(_ctx, _param, value: object) -> float:
    """GiB from ``1``, ``1.5``, ``1.5GiB`` or ``512MiB``; 0 or more."""
    from ..units import GIB, parse_size

    text = str(value).strip()
    try:
        gib = float(text)
    except ValueError:
        try:
            gib = parse_size(text, bare=GIB) / GIB
        except ValueError:
            raise UsageError(
                f"--headroom takes GiB (1.5) or a size (1.5GiB, 512MiB), got {text!r}",
                "pass e.g. --headroom 1",
            ) from None
    if gib < 0:
        raise UsageError(f"--headroom must be 0 or more GiB, got {text}", "pass e.g. --headroom 1")
    return gib


headroom_option = click.option(
    "--headroom",
    default="1",
    show_default=True,
    callback=_headroom_gib,
    help="Memory that must stay free on every GPU under load: GiB (1.5) or a size (1.5GiB, 512MiB); "
    "a bare number is GiB here, bytes in a deployment file.",
)

timeout_options = option_stack(
    click.option(
        "--trial-timeout", default="30m", show_default=True, help="Longest one vLLM may take to become ready."
    ),
    click.option(
        "--stall-timeout", default="10m", show_default=True, help="No log progress this long = hung."
    ),
)

extra_argument = click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_FLAGS...]")


SIM_MIN_TIMEOUT_S = 30.0


def parse_timeouts(trial_timeout: str, stall_timeout: str) -> Timeouts:
    """The values of :data:`timeout_options` as :class:`~vllm_tuner.trial.Timeouts`."""
    return Timeouts(
        ready_s=parse_duration(trial_timeout, option="--trial-timeout"),
        stall_s=parse_duration(stall_timeout, option="--stall-timeout"),
    )


def serve_vllm_cmd(vllm_cmd: str, *, simulated: bool, docker_image: str | None) -> str:
    """The vLLM command a printed serve command names: plain ``vllm`` inside an image or a simulation."""
    return "vllm" if simulated or docker_image else vllm_cmd


@dataclass(frozen=True)
class RuntimeArgs:
    """The values of :func:`runtime_options`; :meth:`build` turns them into a :class:`Runtime`."""

    vllm_cmd: str
    docker_image: str | None
    db: Path | None
    json_: bool
    simulate: str | None
    sim_time_scale: float
    device: str | None = None

    def build(self) -> Runtime:
        return build_runtime(**asdict(self))  # the fields are build_runtime's keywords

    def timeouts(self, trial_timeout: str, stall_timeout: str) -> Timeouts:
        """:func:`parse_timeouts`; under ``--simulate`` the *default* timeouts are simulated time, so they
        shrink with ``--sim-time-scale`` (never below :data:`SIM_MIN_TIMEOUT_S`): a simulated hang ends in
        seconds, not in ten minutes. A timeout the user typed is kept as it is."""
        parsed = parse_timeouts(trial_timeout, stall_timeout)
        if not self.simulate:
            return parsed
        ctx = click.get_current_context(silent=True)

        def scaled(name: str, seconds: float) -> float:
            typed = ctx is not None and ctx.get_parameter_source(name) != ParameterSource.DEFAULT
            return seconds if typed else max(SIM_MIN_TIMEOUT_S, seconds / max(1.0, self.sim_time_scale))

        return Timeouts(
            ready_s=scaled("trial_timeout", parsed.ready_s), stall_s=scaled("stall_timeout", parsed.stall_s)
        )

    @property
    def serve_vllm_cmd(self) -> str:
        return serve_vllm_cmd(self.vllm_cmd, simulated=bool(self.simulate), docker_image=self.docker_image)


def runtime_options(func):
    """``--vllm-cmd``, ``--docker-image``, ``--db``, ``--json``, ``--simulate``, ``--sim-time-scale``,
    ``--device``, handed to the command as one ``runtime_args`` (:class:`RuntimeArgs`)."""

    @click.option(
        "--vllm-cmd",
        default="vllm",
        show_default=True,
        envvar="VLLM_TUNE_VLLM_CMD",
        help="How to run vLLM, e.g. 'uv run vllm' or /opt/venv/bin/vllm.",
    )
    @click.option(
        "--docker-image", default=None, help="Run vLLM in this image instead (vllm/vllm-openai:TAG)."
    )
    @path_option("--db", "db", help="SQLite file for trials and runs [default: the user's data directory].")
    @click.option("--json", "json_", is_flag=True, help="Print one JSON object and no progress.")
    @click.option(
        "--simulate",
        "simulate",
        metavar="SCENARIO",
        default=None,
        help="Run against simulated GPUs and a simulated vLLM (profiles/sim/SCENARIO.yaml).",
    )
    @click.option(
        "--sim-time-scale",
        type=float,
        default=DEFAULT_SIM_TIME_SCALE,
        show_default=True,
        help="With --simulate: how much faster than real time the simulated vLLM runs.",
    )
    @click.option(
        "--device",
        type=click.Choice(["cuda", "cpu"]),
        default=None,
        envvar="VLLM_TUNE_DEVICE",
        help="What vLLM runs on: cuda (GPUs), or cpu (vLLM's CPU backend; a 'GPU' is then a NUMA node and "
        "--gpu-memory-utilization a fraction of its RAM) [default: cuda where NVML sees a GPU, else cpu "
        "where vLLM is a CPU build].",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        runtime_args = RuntimeArgs(**{name: kwargs.pop(name) for name in RuntimeArgs.__dataclass_fields__})
        return func(*args, runtime_args=runtime_args, **kwargs)

    return wrapper


@dataclass
class Runtime:
    launcher: Launcher
    db_path: Path
    json: bool
    progress: Progress
    log_root: Path
    simulated: SimEnvironment | None = None  # when --simulate is on
    device: DeviceKind = CUDA
    nvml_module: ModuleType | None = (
        None  # the pynvml NVML reads through (--simulate's); None: the installed one
    )

    def open_store(self):
        from ..store import Store

        return Store.open(self.db_path)

    def open_nvml(self):
        """The memory reader of the runtime's device (NVML, or the NUMA nodes on cpu)."""
        return open_devices(self.device, nvml_module=self.nvml_module)


def build_runtime(
    *,
    vllm_cmd: str,
    docker_image: str | None,
    db: Path | None,
    json_: bool,
    simulate: str | None,
    sim_time_scale: float,
    device: str | None = None,
) -> Runtime:
    from ..launch import DockerLauncher, LocalLauncher

    if sim_time_scale <= 0:
        raise UsageError(
            f"--sim-time-scale must be positive, got {sim_time_scale}", "use e.g. --sim-time-scale 40"
        )
    launcher: LocalLauncher | DockerLauncher
    simulated = None
    nvml_module = None
    if simulate:
        if docker_image:
            raise UsageError("--simulate and --docker-image cannot be combined", "drop one of them")
        from ..simlite.activate import create

        simulated = create(
            simulate, state_dir=data_dir() / "sim" / Path(simulate).stem, time_scale=sim_time_scale
        )
        if device == "cpu":
            raise UsageError(
                "--simulate runs simulated GPUs, not vLLM's CPU backend", "drop --device cpu or --simulate"
            )
        launcher = simulated.launcher()
        nvml_module = simulated.nvml_module()
        kind = CUDA
    elif docker_image:
        if device == "cpu":
            raise UsageError(
                "--docker-image runs the CUDA image vllm/vllm-openai", "drop --device cpu or --docker-image"
            )
        launcher = DockerLauncher(docker_image, hf_cache=_hf_cache())
        kind = CUDA
    else:
        kind = resolve_device(device, vllm_cmd)
        launcher = LocalLauncher(vllm_cmd, device=kind)
    progress: Progress = (
        QuietProgress() if json_ else TerminalProgress(device_label=kind.label, phase_words=kind.phase_words)
    )
    return Runtime(
        launcher=launcher,
        db_path=db or default_db_path(),
        json=json_,
        progress=progress,
        log_root=data_dir() / "logs",
        simulated=simulated,
        device=kind,
        nvml_module=nvml_module,
    )


def resolve_device(requested: str | None, vllm_cmd: str) -> DeviceKind:
    """``--device`` as given; otherwise cuda where NVML sees a GPU, else cpu where the vLLM that
    ``--vllm-cmd`` runs is a CPU build, else cuda (whose NVML error then says what to do)."""
    from ..launch import LocalLauncher, detect_vllm

    if requested is not None:
        return device_kind(requested)
    if nvml_sees_a_gpu():
        return CUDA
    try:
        info = detect_vllm(LocalLauncher(vllm_cmd, device=CPU))
    except TunerError:
        return CUDA
    return CPU if info.build == "cpu" else CUDA


def _hf_cache() -> Path:
    import os

    home = os.environ.get("HF_HOME")
    return Path(home) / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub"


def emit_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def gpu_uuids(nvml, ids) -> list[tuple[int, str | None]]:
    """(index, UUID) per GPU: the keys of the per-GPU lock."""
    return [(i, nvml.device(i).uuid if nvml is not None else None) for i in ids]


def machine_id(nvml, ids) -> str:
    """The driver and GPU UUIDs: part of the fingerprint that decides whether a past failure applies."""
    if nvml is None:
        return ""
    return nvml.driver_version() + "|" + ",".join(uuid or "" for _i, uuid in gpu_uuids(nvml, ids))


def find_run_dir(runtime, request, env_fingerprint: str) -> Path:
    """Where one find request keeps its trial logs and its ``vllm-serve.yaml`` on one machine (the
    fingerprint of its model, GPUs, driver and vLLM): the same request elsewhere gets its own folder."""
    return runtime.log_root / f"find-{request.key()}-{env_fingerprint[:8]}"


def runtime_finder(request, *, spec, gpu, runtime, nvml, store, vllm_info):
    """A :class:`vllm_tuner.find.Finder` wired to a runtime: the real estimator, its launcher and progress,
    the store, and the machine id of the request's GPUs."""
    from ..estimate import Calibration, estimate
    from ..find import Finder
    from ..trialrecord import env_fingerprint

    machine = machine_id(nvml, list(request.gpu_ids))
    fingerprint = env_fingerprint(spec, gpu, request.gpu_ids, vllm_info, machine)
    return Finder(
        request,
        spec=spec,
        gpu=gpu,
        estimate_fn=estimate,
        calibrate_fn=Calibration.from_facts,
        vllm_info=vllm_info,
        launcher=runtime.launcher,
        nvml=nvml,
        store=store,
        progress=runtime.progress,
        log_dir=find_run_dir(runtime, request, fingerprint),
        machine_id=machine,
    )


def device_ids(gpus: int | None, gpu_ids: str | None) -> list[int] | None:
    """The devices ``--gpus N`` / ``--gpu-ids A,B`` name (None: ``--gpus``, or the default), checked."""
    if gpus is not None and gpu_ids:
        raise UsageError("--gpus and --gpu-ids cannot be combined", "use one of them")
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}", "pass e.g. --gpus 1")
    if gpu_ids is None:
        return None
    try:
        ids = [int(x) for x in gpu_ids.split(",") if x.strip()]
    except ValueError:
        raise UsageError(
            f"--gpu-ids must be comma-separated integers, got {gpu_ids!r}", "pass e.g. --gpu-ids 0,2"
        ) from None
    if not ids:
        raise UsageError(f"--gpu-ids names no GPU, got {gpu_ids!r}", "pass e.g. --gpu-ids 0,2")
    return ids


def model_and_devices(runtime, model: str, gpus: int | None, ids: list[int] | None):
    """The model's spec, the target devices and the open memory reader for ``find`` and ``ramp``."""
    from ..gpus import resolve_gpus
    from ..models import resolve_model

    spec = resolve_model(model)
    nvml = runtime.open_nvml()
    gpu = resolve_gpus(
        gpus=gpus if ids is None else None,
        gpu_ids=ids,
        gpu_name=None,
        gpu_memory=None,
        nvml_opener=lambda: nvml,
    )
    return spec, gpu, nvml
