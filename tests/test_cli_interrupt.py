"""Ctrl-C and SIGTERM at the CLI's boundary: the unwinding of find and ramp is bounded.

Each case runs in a process of its own (signal handlers and ``os._exit`` belong to a process), whose
"stop" hangs after the signal, as a deadlocked cleanup would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from vllm_tuner import cli
    cli.INTERRUPT_DEADLINE_S = 1.0
    cli.install_interrupt_handlers(bounded=sys.argv[1] == "bounded")
    try:
        print("ready", flush=True)
        time.sleep(30)
    except (KeyboardInterrupt, cli.Terminated):
        print("stopping", flush=True)
        time.sleep(8)  # a stop that does not end
        print("stopped", flush=True)
    """
)


def run_and_signal(tmp_path: Path, mode: str, sig: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "VLLM_TUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    signalled = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - signalled


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_hangs_past_the_deadline_exits_130_and_keeps_every_threads_stack(tmp_path, sig):
    done, took = run_and_signal(tmp_path, "bounded", sig)
    assert done.returncode == 130 and took < 6, (took, done.stderr)
    assert "stopping" in done.stdout and "stopped" not in done.stdout
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("vllm-tune: interrupted; stopping took over 1s, so the tuner exits now")
    crash = Path(line.rsplit("(stacks in ", 1)[1].rstrip(")"))
    assert crash.parent == tmp_path / "home" / "crashes"
    assert 'File "<string>", line 11 in <module>' in crash.read_text()  # the hung stop's own line


def test_an_unbounded_command_keeps_stopping_as_long_as_its_stop_takes(tmp_path):
    done, took = run_and_signal(tmp_path, "unbounded", signal.SIGINT)
    assert done.returncode == 0 and took >= 8
    assert done.stdout.endswith("stopped\n")
