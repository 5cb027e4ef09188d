"""Process groups of vLLM servers, for trials and deployments alike: start one under the reaper in
its own session, end it (SIGTERM, a grace period, SIGKILL), collect its exit status, and wait until
the devices' memory is back where it was.

Every server runs under ``vllm_tuner._reaper``, which leads the group vLLM and its workers inherit and
kills what vLLM leaves behind when it exits. A trial's reaper watches the tuner (``parent_pid``) and ends
the group if the tuner dies, even by SIGKILL; a deployment's reaper is detached (``parent_pid=None``):
its instances outlive the ``up`` that started them and end only when ``down`` signals their group.
The tuner only ever signals process groups it started.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# what a device may still hold over its expected usage once a server is gone (the driver's rounding,
# a neighbour's allocator noise): below it, the memory counts as released
RELEASE_TOLERANCE_BYTES = 256 << 20


def reaper_argv(
    parent_pid: int | None,
    command: Sequence[str],
    cleanup: Sequence[str] = (),
    *,
    grace_s: float | None = None,
) -> list[str]:
    """``python -m vllm_tuner._reaper PARENT|detached [--grace S] [--cleanup CMD] -- COMMAND...``:
    ``parent_pid`` None for a group that outlives the process starting it."""
    options = ["--grace", f"{grace_s:g}"] if grace_s is not None else []
    options += ["--cleanup", shlex.join(cleanup)] if cleanup else []
    parent = "detached" if parent_pid is None else str(parent_pid)
    return [sys.executable, "-m", "vllm_tuner._reaper", parent, *options, "--", *command]


def cannot_run(word: str, env: Mapping[str, str] | None = None) -> str | None:
    """Why ``word`` (a command's first word) cannot be started, as the OS would say it; None when it can.
    Asked before the reaper starts it, since the reaper itself always starts."""
    path = (env or os.environ).get("PATH", os.defpath)
    if shutil.which(word, path=path) is not None:
        return None
    exists = (
        Path(word).exists()
        if os.sep in word
        else any((Path(d or ".") / word).exists() for d in path.split(os.pathsep))
    )
    return os.strerror(errno.EACCES if exists else errno.ENOENT)


def spawn_detached(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start ``argv`` in its own session, stdout+stderr appended to ``log_path``, nothing tied to this
    process; returns its pid (= its group and session id)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_if_child(pid: int) -> None:
    """Collect ``pid``'s exit status if it is this process's child and has exited (a deployment
    stopped by the ``up`` that started it); otherwise nothing."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_until(
    done: Callable[[], bool],
    timeout_s: float,
    *,
    poll_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Ask ``done()`` every ``poll_s`` until it says yes (True) or ``timeout_s`` has passed (False)."""
    deadline = clock() + timeout_s
    while True:
        if done():
            return True
        if clock() > deadline:
            return False
        sleep(poll_s)


def end_group(
    pgid: int,
    *,
    gone: Callable[[], bool],
    grace_s: float,
    kill_wait_s: float,
    poll_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """SIGTERM to group ``pgid``, up to ``grace_s`` for ``gone()``, else SIGKILL and up to
    ``kill_wait_s`` more; ``"stopped"`` or ``"killed"``. ``gone`` is the caller's notion of ended:
    the group's leader exited (a trial, which keeps its pid unreaped so the group id cannot be reused
    meanwhile) or its session is empty (a deployment, whose identity was checked before)."""
    signal_group(pgid, signal.SIGTERM)
    if wait_until(gone, grace_s, poll_s=poll_s, clock=clock, sleep=sleep):
        return "stopped"
    signal_group(pgid, signal.SIGKILL)
    wait_until(gone, kill_wait_s, poll_s=poll_s, clock=clock, sleep=sleep)
    return "killed"


def wait_released(
    read_used: Callable[[], Mapping[int, int]],
    expected: Mapping[int, int],
    *,
    timeout_s: float,
    poll_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[int, int]:
    """Until every device ``read_used()`` reports (used bytes by device id) is within
    :data:`RELEASE_TOLERANCE_BYTES` of ``expected``, or ``timeout_s``. Returns what each device still
    holds beyond that after the timeout, {} once released (also when nothing can be read)."""
    high: dict[int, int] = {}

    def released() -> bool:
        nonlocal high
        over = {g: used - expected.get(g, 0) for g, used in read_used().items()}
        high = {g: extra for g, extra in over.items() if extra > RELEASE_TOLERANCE_BYTES}
        return not high

    return {} if wait_until(released, timeout_s, poll_s=poll_s, clock=clock, sleep=sleep) else high
