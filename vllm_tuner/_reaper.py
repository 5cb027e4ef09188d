"""Watchdog that runs one vLLM server and guarantees it dies with the tuner.

    python -m vllm_tuner._reaper PARENT_PID -- vllm serve MODEL ...

The tuner starts this in a new session, so the reaper leads the process group that vLLM and all its
workers inherit. If the tuner disappears (even by SIGKILL), the kernel sends the reaper SIGTERM
(PR_SET_PDEATHSIG, Linux) or the reaper notices its parent changed; either way it ends the whole group:
SIGTERM, a grace period, then SIGKILL. It never touches any other group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent poll below still catches it


def _end_group(child: subprocess.Popen) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid = os.getpgid(0)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)  # ends the reaper too


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


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m vllm_tuner._reaper PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    _die_with_parent()
    if os.getppid() != parent:  # the tuner died before we got here
        return 1
    try:
        child = subprocess.Popen(argv[2:])
    except FileNotFoundError:
        print(f"vllm-tune: command not found: {argv[2]}", file=sys.stderr, flush=True)
        return 127

    def on_term(_sig: int, _frame: object) -> None:
        _end_group(child)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        try:
            code = child.wait(timeout=0.5)
            _kill_stragglers()
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                _end_group(child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
