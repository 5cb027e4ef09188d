"""Per-GPU locks between two tuner processes: machine-wide, whatever their data home or user."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vllm_tuner import gpulock
from vllm_tuner.cli import main
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


@pytest.fixture(autouse=True)
def locks(tmp_path, monkeypatch) -> Path:
    """Every test here has its own machine-wide lock folder (never the real /run/lock or /tmp one)."""
    folder = tmp_path / "machine-locks"
    monkeypatch.setenv("VLLM_TUNE_LOCK_DIR", str(folder))
    return folder


@pytest.fixture
def holder():
    procs = []

    def start(*keys: str, home: Path | None = None) -> subprocess.Popen:
        env = dict(os.environ)
        if home is not None:
            env["VLLM_TUNE_HOME"] = str(home)
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, *keys],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
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


def test_keys_prefer_the_uuid_and_keep_the_index():
    keys = gpu_lock_keys([(0, "GPU-abc"), (1, None)])
    assert keys == ["GPU-abc", "gpu1"]
    assert [k.gpu_index for k in keys] == [0, 1]
    assert [k.label() for k in keys] == ["0 (GPU-abc)", "1"]


def test_the_lock_folder_comes_from_the_environment(locks):
    assert lock_dir() == locks
    with GpuLock(["gpu0"]):
        assert (locks / "gpu0.lock").is_file()


def test_the_default_folder_is_machine_wide_not_per_home(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_TUNE_LOCK_DIR")
    run_lock = tmp_path / "run-lock"
    run_lock.mkdir()
    monkeypatch.setattr(gpulock, "RUN_LOCK", run_lock)
    run_lock.chmod(0o1777)  # Debian, Ubuntu: the FHS folder for locks, everyone's
    assert lock_dir() == run_lock / "vllm-tune"
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "other-home"))
    assert lock_dir() == run_lock / "vllm-tune"
    run_lock.chmod(0o755)  # root's only (Fedora): every user falls back to the same /tmp folder
    assert lock_dir() == Path("/tmp/vllm-tune-locks")
    monkeypatch.setattr(gpulock, "RUN_LOCK", tmp_path / "absent")
    assert lock_dir() == Path("/tmp/vllm-tune-locks")


def test_two_data_homes_on_the_same_gpu_contend(holder, tmp_path, monkeypatch):
    other = holder("GPU-same", home=tmp_path / "home-a")
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "home-b"))
    with pytest.raises(LaunchError) as caught:
        GpuLock(gpu_lock_keys([(2, "GPU-same")])).acquire()
    message = str(caught.value)
    assert "GPU 2 (GPU-same) is in use by another vllm-tune" in message
    assert f"pid {other.pid}, user " in message
    assert len(message.splitlines()) == 1


def test_second_tuner_is_refused_naming_the_gpu_and_holder(holder, locks):
    other = holder("GPU-aaaa", "gpu1")
    with pytest.raises(LaunchError) as caught:
        GpuLock(["gpu1"]).acquire()
    message = str(caught.value)
    assert "GPU gpu1 is in use by another vllm-tune" in message
    assert f"pid {other.pid}" in message
    with GpuLock(["gpu2"]):  # other GPUs stay free
        assert (locks / "gpu2.lock").read_text().split()[0] == str(os.getpid())


def test_folder_1777_and_files_0666_whatever_the_umask(locks):
    old = os.umask(0o077)
    try:
        with GpuLock(["GPU-x"]):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(locks.stat().st_mode) == 0o1777
    assert stat.S_IMODE((locks / "GPU-x.lock").stat().st_mode) == 0o666
    assert [p.name for p in locks.parent.iterdir()] == ["machine-locks"]  # no spare folder left behind


def test_an_existing_folder_is_used_as_it_is(locks):
    locks.mkdir(mode=0o700)
    with GpuLock(["gpu0"]):
        pass
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700  # a folder the user chose is not opened up


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_folder_is_one_line_naming_the_fix(tmp_path, monkeypatch, where):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    folder = blocker if where == "a file" else blocker / "locks"
    monkeypatch.setenv("VLLM_TUNE_LOCK_DIR", str(folder))
    with pytest.raises(LaunchError) as caught:
        GpuLock(["gpu0"]).acquire()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert str(folder) in message and "VLLM_TUNE_LOCK_DIR" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_a_folder_without_write_permission_is_one_line(locks):
    locks.mkdir(mode=0o555)
    try:
        with pytest.raises(
            LaunchError, match="cannot be used \\(owned by .*, mode 0555\\).*VLLM_TUNE_LOCK_DIR"
        ):
            GpuLock(["gpu0"]).acquire()
    finally:
        locks.chmod(0o755)


def test_find_with_an_unusable_lock_folder_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("VLLM_TUNE_LOCK_DIR", str(blocker))
    code = main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--simulate", "rtx-5090"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(blocker) in err and "VLLM_TUNE_LOCK_DIR" in err and "Traceback" not in err


def test_a_symlinked_lock_file_is_refused(locks, tmp_path):
    locks.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (locks / "gpu0.lock").symlink_to(victim)
    with pytest.raises(LaunchError, match="gpu0.lock"):
        GpuLock(["gpu0"]).acquire()
    assert victim.read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_shares_the_lock(monkeypatch):
    """Root takes the lock, user nobody (another home, another umask) is refused, then takes it."""
    shared = Path(tempfile.mkdtemp(prefix="vllm-tune-lock-test-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        folder = shared / "locks"
        monkeypatch.setenv("VLLM_TUNE_LOCK_DIR", str(folder))

        def as_nobody() -> int:
            """Exit status of a forked child that tries the lock as user nobody: 0 taken, 1 refused."""
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 3
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    os.umask(0o077)
                    os.environ["VLLM_TUNE_HOME"] = "/nonexistent-home"
                    try:
                        with GpuLock(["GPU-shared"]):
                            code = 0
                    except LaunchError as exc:
                        code = 1 if "pid " in str(exc) and "in use" in str(exc) else 2
                finally:
                    os._exit(code)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        old = os.umask(0o022)
        try:
            with GpuLock(["GPU-shared"]):
                assert as_nobody() == 1
        finally:
            os.umask(old)
        assert as_nobody() == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


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


def test_released_after_the_block(locks):
    with GpuLock(["gpu5"]):
        pass
    with GpuLock(["gpu5"]):
        pass
    assert (locks / "gpu5.lock").read_text() == ""


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
    with pytest.raises(LaunchError, match=f"pid {other.pid}, user .*\\) after waiting 0.5s"):
        GpuLock(["gpu7"], wait_s=0.5).acquire()
    assert time.monotonic() - started < 2
