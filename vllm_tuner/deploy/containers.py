"""Deployment instances as containers of vLLM's official image (``up --docker-image``).

The ``docker run`` command line is a trial's (:func:`vllm_tuner.vllmargv.docker_run_argv`: ``--gpus
"device=..."``, ``--ipc=host``, the HF cache mounted, ``HF_TOKEN`` passed through, the image's
``vllm serve`` entrypoint given the model and flags) with what ``emit --format compose`` writes (the
port published on every interface, the ``vllm-tune.deployment`` label), so a container serves exactly
what a local ``up`` would. Its name is unique per started instance (``vllm-tune-<deployment>-<instance>-<token>``):
``down`` stops and removes only the names ``up`` recorded, never another container.

:class:`DockerCli` is the only caller of ``docker stop/rm/inspect``; it takes the command runner as an
argument so tests can replace it.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..vllmargv import docker_run_argv

# argv -> (exit code, stdout + stderr)
DockerRun = Callable[[list[str]], tuple[int, str]]


def container_name(deployment: str, instance: str, token: str | None = None) -> str:
    """``vllm-tune-<deployment>-<instance>-<token>``: deployment and instance names are lowercase
    letters, digits and dashes (valid in a container name); the token makes every start unique."""
    return f"vllm-tune-{deployment}-{instance}-{token or secrets.token_hex(4)}"


def instance_run_argv(
    serve_args: Sequence[str],
    *,
    image: str,
    name: str,
    port: int,
    gpu_ids: Sequence[int],
    deployment: str,
    instance: str,
    hf_cache: Path | None = None,
    env_keys: Iterable[str] = (),
) -> list[str]:
    """``docker run`` for one instance. ``serve_args`` is ``["serve", MODEL, flags..., "--host",
    "0.0.0.0", "--port", PORT]`` (as :meth:`Instance.serve_args` builds it). The port is published on every interface, like a local ``up`` serving on 0.0.0.0 and
    compose's ports; the labels name the deployment and the instance; ``HF_TOKEN`` and ``env_keys`` are
    passed by name only, so no secret lands in the command line or the state file."""
    return docker_run_argv(
        serve_args,
        image=image,
        name=name,
        publish=f"{port}:{port}",
        gpu_ids=gpu_ids,
        env_keys=["HF_TOKEN", *env_keys],
        labels=[f"vllm-tune.deployment={deployment}", f"vllm-tune.instance={instance}"],
        hf_cache=hf_cache,
    )


def run_docker(argv: list[str], *, timeout_s: float = 120.0) -> tuple[int, str]:
    """Run a docker CLI command; a missing ``docker`` or a hang is an exit code, never an exception."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
    except OSError as exc:
        return 127, str(exc)
    except subprocess.TimeoutExpired:
        return 124, f"{argv[:2]} did not answer in {timeout_s:.0f}s"
    return done.returncode, (done.stdout or "") + (done.stderr or "")


class DockerCli:
    """``docker stop``, ``docker rm -f`` and ``docker inspect`` of one named container."""

    def __init__(self, run: DockerRun | None = None, *, docker: str = "docker") -> None:
        self._run = run or run_docker
        self.docker = docker

    def stop(self, name: str, grace_s: float) -> bool:
        """SIGTERM, then SIGKILL after ``grace_s``; True when the container was there to stop."""
        code, _out = self._run([self.docker, "stop", "--time", str(max(0, int(grace_s))), name])
        return code == 0

    def remove(self, name: str) -> None:
        """Remove it even if ``--rm`` did not (a daemon restart); a missing name is not an error."""
        self._run([self.docker, "rm", "-f", name])

    def pid(self, name: str) -> int | None:
        """The host pid of the container's main process while it runs, else None."""
        code, out = self._run([self.docker, "inspect", "--format", "{{.State.Pid}}", name])
        if code != 0:
            return None
        try:
            pid = int(out.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None
        return pid if pid > 0 else None
