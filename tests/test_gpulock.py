"""Per-GPU locks between two tuner processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vllm_tuner.errors import LaunchError
from vllm_tuner.gpulock import GpuLock, gpu_lock_keys, lock_dir

HOLDER = textwrap.dedent(
    """
    import sys
    from vllm_tuner.gpulock import GpuLock
    with GpuLock(sys.argv[1:]):
        print("held", flush=True)
        sys.stdin.readline()
    """
)


@pytest.fixture
def holder():
    procs = []

    def start(*keys: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *keys],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_keys_prefer_the_uuid():
    assert gpu_lock_keys([(0, "GPU-abc"), (1, None)]) == ["GPU-abc", "gpu1"]


def test_second_tuner_is_refused_naming_the_gpu_and_holder(holder):
    other = holder("GPU-aaaa", "gpu1")
    with pytest.raises(LaunchError) as caught:
        GpuLock(["gpu1"]).acquire()
    message = str(caught.value)
    assert "GPU gpu1 is in use by another vllm-tune" in message
    assert f"pid {other.pid}" in message
    with GpuLock(["gpu2"]):  # other GPUs stay free
        assert (lock_dir() / "gpu2.lock").read_text() == str(os.getpid())


def test_all_or_none(holder):
    holder("gpu3")
    lock = GpuLock(["gpu0", "gpu3"])
    with pytest.raises(LaunchError):
        lock.acquire()
    with GpuLock(["gpu0"]):  # gpu0 was given back when gpu3 failed
        pass


def test_lock_is_freed_when_the_holder_dies(holder):
    other = holder("gpu4")
    other.kill()
    other.wait(10)
    with GpuLock(["gpu4"]):
        pass


def test_released_after_the_block():
    with GpuLock(["gpu5"]):
        pass
    with GpuLock(["gpu5"]):
        pass
    assert (lock_dir() / "gpu5.lock").read_text() == ""


def test_waiting_takes_the_lock_once_the_holder_finishes(holder):
    other = holder("gpu6")
    threading.Timer(0.4, lambda: (other.stdin.write("done\n"), other.stdin.flush())).start()
    started = time.monotonic()
    with GpuLock(["gpu6"], wait_s=10):
        waited = time.monotonic() - started
    assert 0.3 < waited < 5


def test_waiting_gives_up_after_the_timeout(holder):
    other = holder("gpu7")
    started = time.monotonic()
    with pytest.raises(LaunchError, match=f"pid {other.pid}\\) after waiting 0.5s"):
        GpuLock(["gpu7"], wait_s=0.5).acquire()
    assert time.monotonic() - started < 2
