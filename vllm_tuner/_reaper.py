"""Watchdog that runs one vLLM server and guarantees it dies with the tuner.

    python -m vllm_tuner._reaper PARENT_PID|detached [--grace S] [--cleanup 'docker rm -f NAME'] -- vllm serve ...

The tuner starts this in a new session, so the reaper leads the process group that vLLM and all its
workers inherit. If the tuner disappears (even by SIGKILL), the kernel sends the reaper SIGUSR1
(PR_SET_PDEATHSIG, Linux) or the reaper notices its parent changed; either way it ends the whole group:
SIGTERM, a grace period (``--grace``, default 5 s), the ``--cleanup`` command if one was given (a docker container outlives its
killed ``docker run`` client), then SIGKILL. It never touches any other group. SIGTERM or SIGINT to the
reaper ends the group the same way, and when vLLM exits on its own the reaper kills what it left behind.

``detached`` instead of a parent pid watches no parent: the group outlives whoever started it (a
deployment's instance, which its ``down`` ends by signalling the group).

The death signal fires when the *thread* that started the reaper exits, not only the process, so on
SIGUSR1 the reaper checks that its parent really changed before ending anything: a tuner that starts a
server from a worker thread keeps its server.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

GRACE_S = 5.0
CLEANUP_S = 30.0
PR_SET_PDEATHSIG = 1
DETACHED = "detached"


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent poll below still catches it


@dataclass(frozen=True)
class ReaperArgs:
    parent: int | None  # None: detached, no parent to outlive
    grace_s: float
    cleanup: list[str]
    command: list[str]


def _end_group(child: subprocess.Popen, plan: ReaperArgs) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid = os.getpgid(0)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + plan.grace_s
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    _run_cleanup(plan.cleanup)
    os.killpg(pgid, signal.SIGKILL)  # ends the reaper too


def _run_cleanup(cleanup: list[str]) -> None:
    if not cleanup:
        return
    try:
        subprocess.run(cleanup, stdin=subprocess.DEVNULL, capture_output=True, timeout=CLEANUP_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _kill_stragglers() -> None:
    """vLLM exited on its own: end whatever it left in this group (workers), but not the reaper."""
    me, group = os.getpid(), os.getpgid(0)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def _parse(argv: list[str]) -> ReaperArgs | None:
    """``PARENT_PID|detached [--grace S] [--cleanup CMD] -- COMMAND...``, or None when malformed."""
    if not argv or not (argv[0].isdigit() or argv[0] == DETACHED) or "--" not in argv:
        return None
    split = argv.index("--")
    options, command = argv[1:split], argv[split + 1 :]
    if len(options) % 2 or not command:
        return None
    values = dict(zip(options[::2], options[1::2], strict=True))
    if not set(values) <= {"--grace", "--cleanup"}:
        return None
    try:
        grace = float(values.get("--grace", GRACE_S))
    except ValueError:
        return None
    parent = None if argv[0] == DETACHED else int(argv[0])
    return ReaperArgs(parent, grace, shlex.split(values.get("--cleanup", "")), command)


def main(argv: list[str]) -> int:
    plan = _parse(argv)
    if plan is None:
        print(
            "usage: python -m vllm_tuner._reaper PARENT_PID|detached [--grace S] [--cleanup CMD] -- COMMAND...",
            file=sys.stderr,
        )
        return 2
    parent, command = plan.parent, plan.command
    running: list[subprocess.Popen] = []  # the child, once started

    def end(_sig: int = 0, _frame: object = None) -> None:
        if running:
            _end_group(running[0], plan)
        os.killpg(os.getpgid(0), signal.SIGKILL)  # a child caught half-started by Popen, and us

    def orphaned() -> bool:
        """The process (not just the thread) that started us is gone; never when detached."""
        return parent is not None and os.getppid() != parent

    def on_parent_death(_sig: int, _frame: object) -> None:
        if orphaned():
            end()

    # Python-level handlers reset to the default in the child at exec, so vLLM sees plain signals.
    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    if parent is not None:
        signal.signal(signal.SIGUSR1, on_parent_death)
        _die_with_parent()
    if orphaned():  # the tuner died before we got here
        return 1
    try:
        running.append(subprocess.Popen(command))
    except FileNotFoundError:
        print(f"vllm-tune: command not found: {command[0]}", file=sys.stderr, flush=True)
        return 127
    child = running[0]
    while True:
        try:
            code = child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if orphaned():
                end()
            continue
        _kill_stragglers()
        return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
