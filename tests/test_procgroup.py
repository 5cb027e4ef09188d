"""The one process-group stack of trials and deployments: a detached group (a deployment's instance)
outlives whoever started it and ends only when signalled; the reaper still cleans up after vLLM; the
release wait over plain readings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from vllm_tuner._reaper import GRACE_S, ReaperArgs, _parse
from vllm_tuner.deploy.state import session_pids
from vllm_tuner.procgroup import (
    RELEASE_TOLERANCE_BYTES,
    cannot_run,
    end_group,
    reap_if_child,
    reaper_argv,
    spawn_detached,
    wait_released,
)

FAKE = Path(__file__).parent / "fakes" / "server.py"
GIB = 1 << 30


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def worker_pid(log: Path) -> int:
    assert wait_for(lambda: log.exists() and "worker pid" in log.read_text(), 10), log
    return int(log.read_text().split("worker pid ")[1].split()[0])


STARTER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from vllm_tuner.procgroup import reaper_argv, spawn_detached
    command = [sys.executable, sys.argv[1], "serve", "stubborn"]
    print(spawn_detached(reaper_argv(None, command, grace_s=0.5), dict(os.environ), Path(sys.argv[2])), flush=True)
    time.sleep(120)
    """
)


def test_a_detached_group_outlives_its_killed_starter_and_ends_when_its_group_is_signalled(tmp_path):
    log = tmp_path / "instance.log"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(FAKE), str(log)], stdout=subprocess.PIPE, text=True
    )
    pgid = None
    try:
        pgid = int(starter.stdout.readline())
        worker = worker_pid(log)
        starter.send_signal(signal.SIGKILL)  # as `up` exits, or is killed
        starter.wait(10)
        time.sleep(1.0)  # twice the reaper's parent poll: a trial's reaper would have ended the group
        assert alive(pgid) and alive(worker), "a detached reaper ended its group when its starter died"
        # what `down` does: the vLLM and its worker ignore SIGTERM; the reaper escalates after its grace
        outcome = end_group(
            pgid, gone=lambda: not session_pids(pgid), grace_s=5.0, kill_wait_s=5.0, poll_s=0.05
        )
        assert outcome == "stopped"  # the reaper's own SIGKILL after 0.5 s, not ours
        assert not alive(worker) and not session_pids(pgid)
    finally:
        starter.kill()
        starter.wait(10)
        starter.stdout.close()
        if pgid is not None and session_pids(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_a_detached_instance_that_crashes_leaves_no_worker_behind(tmp_path):
    log = tmp_path / "instance.log"
    command = [sys.executable, str(FAKE), "serve", "crash-leaves-worker"]
    pid = spawn_detached(reaper_argv(None, command), dict(os.environ), log)
    try:
        worker = worker_pid(log)
        assert wait_for(lambda: not alive(worker), 3.0), "the worker of a crashed instance survived"
        assert wait_for(lambda: not alive(pid), 3.0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1  # vLLM's own exit code
    finally:
        if session_pids(pid):
            os.killpg(pid, signal.SIGKILL)
        reap_if_child(pid)


def test_the_reaper_reads_detached_for_a_group_that_outlives_its_starter():
    assert reaper_argv(None, ["vllm", "serve", "m"], grace_s=30)[3:] == [
        "detached",
        "--grace",
        "30",
        "--",
        "vllm",
        "serve",
        "m",
    ]
    assert _parse(["detached", "--", "vllm"]) == ReaperArgs(None, GRACE_S, [], ["vllm"])
    assert _parse(["7", "--", "vllm"]) == ReaperArgs(7, GRACE_S, [], ["vllm"])
    assert _parse(["detach", "--", "vllm"]) is None


def test_cannot_run_says_why_like_the_os(tmp_path):
    assert cannot_run(sys.executable) is None
    assert cannot_run("no-such-command-here") == os.strerror(2)
    script = tmp_path / "vllm"
    script.write_text("#!/bin/sh\n")
    assert cannot_run(str(script)) == os.strerror(13)  # there, not executable


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_released_until_every_device_is_back_within_the_tolerance():
    t = FakeTime()
    baseline = {0: 2 * GIB, 1: 3 * GIB}

    def read() -> dict[int, int]:  # GPU 1 drains at 1 GiB a second; GPU 0 is back already
        return {0: 2 * GIB + RELEASE_TOLERANCE_BYTES, 1: 3 * GIB + max(0, int((4 - t.now) * GIB))}

    assert wait_released(read, baseline, timeout_s=60, poll_s=0.5, clock=t.clock, sleep=t.sleep) == {}
    assert 3.5 <= t.now <= 4.0


def test_wait_released_says_what_each_device_still_holds_after_the_timeout():
    t = FakeTime()
    held = wait_released(
        lambda: {0: 5 * GIB, 1: GIB}, {0: GIB, 1: GIB}, timeout_s=2, poll_s=0.5, clock=t.clock, sleep=t.sleep
    )
    assert held == {0: 4 * GIB} and 2 < t.now <= 3
    # a reader that cannot read (no NVML right now) has nothing to wait for
    assert wait_released(dict, {0: GIB}, timeout_s=2, poll_s=0.5, clock=t.clock, sleep=t.sleep) == {}
