"""Process control against tiny fake servers: SIGKILL escalation, workers left by a crash, a server
started from a worker thread. (``tests/fakes/server.py``; the simulator covers everything else.)"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from vllm_tuner.launch import LocalLauncher, ServerProcess
from vllm_tuner.logparse import LogWatcher
from vllm_tuner.procgroup import reaper_argv
from vllm_tuner.serveconfig import ServeConfig

FAKE = Path(__file__).parent / "fakes" / "server.py"


def fake(tmp_path: Path, mode: str, *, grace_s: float = 3.0) -> ServerProcess:
    return ServerProcess(
        LocalLauncher(f"{sys.executable} {FAKE}"),
        ServeConfig(mode),
        gpu_ids=[0],
        log_path=tmp_path / f"{mode}.log",
        watcher=LogWatcher(),
        grace_s=grace_s,
    )


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def worker_pid(log: Path, within_s: float = 10.0) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = re.search(r"worker pid (\d+)", log.read_text() if log.exists() else "")
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no worker pid in {log}")


def test_stop_escalates_to_sigkill_when_the_server_ignores_sigterm(tmp_path):
    with fake(tmp_path, "stubborn", grace_s=0.5) as proc:
        worker = worker_pid(proc.log_path)
        leader = proc.pid
        started = time.monotonic()
        proc.stop()
        took = time.monotonic() - started
    assert took < 3
    assert gone_within(worker, 2.0), "the worker that ignored SIGTERM survived"
    assert not alive(leader)


def test_a_crashed_server_leaves_no_worker_behind(tmp_path):
    with fake(tmp_path, "crash-leaves-worker") as proc:
        ready = proc.wait_ready(timeout_s=10, stall_s=5)
        worker = worker_pid(proc.log_path)
        assert not ready.ready
        assert ready.diagnosis.category == "engine_core_died_other"
        # the reaper ends vLLM's stragglers as soon as vLLM exits, before the tuner calls stop()
        assert gone_within(worker, 3.0)


def test_a_fatal_line_ends_the_wait_within_a_second_even_if_the_process_lingers(tmp_path):
    with fake(tmp_path, "fatal-then-linger", grace_s=0.5) as proc:
        started = time.monotonic()
        ready = proc.wait_ready(timeout_s=60, stall_s=30)
        took = time.monotonic() - started
        assert proc.returncode is None  # still running: the log alone decided
    assert not ready.ready
    assert ready.diagnosis.category == "engine_core_died_other"
    assert took < 1.5  # ~0.3 s of start-up, then the fatal line, then 0.3 s of silence


def test_a_server_started_from_a_worker_thread_outlives_the_thread(tmp_path):
    # The kernel's parent-death signal follows the thread that forked, so that thread must outlive
    # the reaper's prctl() for this test to mean anything: it waits for the server's first line.
    proc = fake(tmp_path, "idle")

    def start_and_leave() -> None:
        proc.start()
        deadline = time.monotonic() + 10
        while "fake vLLM serving" not in proc.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)

    starter = threading.Thread(target=start_and_leave)
    starter.start()
    starter.join()
    try:
        time.sleep(0.7)  # more than the reaper's parent poll
        assert proc.returncode is None, "the reaper ended the server when the starting thread exited"
        os.killpg(proc.pgid, 0)
    finally:
        proc.stop()
    assert proc.returncode is not None


DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vllm_tuner.launch import LocalLauncher, ServerProcess
    from vllm_tuner.logparse import LogWatcher
    from vllm_tuner.serveconfig import ServeConfig

    class ContainerLikeLauncher(LocalLauncher):  # like docker: something to clean up besides the group
        def cleanup_argv(self, name):
            return ["touch", sys.argv[2]]

    launcher = ContainerLikeLauncher(f"{sys.executable} {sys.argv[1]}")
    with ServerProcess(launcher, ServeConfig("idle"), gpu_ids=[0], log_path=Path(sys.argv[3]),
                       watcher=LogWatcher()) as proc:
        print(proc.pgid, flush=True)
        time.sleep(120)
    """
)


def test_a_killed_tuner_still_gets_its_launchers_cleanup_run(tmp_path):
    marker = tmp_path / "cleaned-up"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(FAKE), str(marker), str(tmp_path / "driver.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pgid = int(driver.stdout.readline())
        log = tmp_path / "driver.log"
        deadline = time.monotonic() + 10
        while "fake vLLM serving" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # the server runs (a reaper whose tuner died first starts nothing)
        os.killpg(pgid, 0)
        driver.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the reaper did not run the launcher's cleanup when the tuner died"
        assert gone_within(pgid, 5.0)
    finally:
        driver.kill()
        driver.wait(10)
        driver.stdout.close()


def test_reaper_argv():
    assert reaper_argv(42, ["vllm", "serve", "m"], ["docker", "rm", "-f", "n 1"]) == [
        sys.executable,
        "-m",
        "vllm_tuner._reaper",
        "42",
        "--cleanup",
        "docker rm -f 'n 1'",
        "--",
        "vllm",
        "serve",
        "m",
    ]
    assert reaper_argv(42, ["vllm"])[3:] == ["42", "--", "vllm"]
    assert reaper_argv(42, ["vllm"], grace_s=2.5)[3:] == ["42", "--grace", "2.5", "--", "vllm"]


def test_reaper_reads_its_options():
    from vllm_tuner._reaper import GRACE_S, ReaperArgs, _parse

    assert _parse(
        ["7", "--grace", "2", "--cleanup", "docker rm -f x", "--", "vllm", "serve", "--", "m"]
    ) == ReaperArgs(7, 2.0, ["docker", "rm", "-f", "x"], ["vllm", "serve", "--", "m"])
    assert _parse(["7", "--", "vllm"]) == ReaperArgs(7, GRACE_S, [], ["vllm"])
    for bad in (
        ["x", "--", "vllm"],
        ["7", "vllm"],
        ["7", "--"],
        ["7", "--grace", "--", "v"],
        ["7", "--who", "1", "--", "v"],
    ):
        assert _parse(bad) is None, bad
