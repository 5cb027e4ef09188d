"""One lock file per GPU, so two tuners never launch on the same card at once.

    with GpuLock(gpu_lock_keys(devices)):
        ...  # trials on these GPUs

Locks are ``fcntl.flock`` on ``data_dir()/locks/<key>.lock``; the kernel drops them when the holder
exits, however it exits, so a crashed tuner never leaves a stale lock. By default taking a lock never
blocks: if another process holds one, :class:`LaunchError` names the GPU and the holder's pid. With
``wait_s`` it retries until the GPU is free or the time is up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

from .errors import LaunchError
from .paths import data_dir


def gpu_lock_keys(gpus: Iterable[tuple[int, str | None]]) -> list[str]:
    """Lock keys for ``(index, uuid)`` pairs: the NVML UUID when known (stable across
    ``CUDA_VISIBLE_DEVICES`` renumbering), else ``gpu<index>``."""
    return [uuid if uuid else f"gpu{index}" for index, uuid in gpus]


def lock_dir() -> Path:
    return data_dir() / "locks"


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


class GpuLock:
    """Holds the locks of ``keys`` for the ``with`` block; all or none."""

    def __init__(self, keys: Sequence[str], *, folder: Path | None = None, wait_s: float = 0.0) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.folder = folder
        self.wait_s = wait_s
        self._held: list[IO[str]] = []

    def __enter__(self) -> GpuLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        folder = self.folder or lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            busy = self._try_all(folder)
            if busy is None:
                return
            if time.monotonic() >= deadline:
                key, holder = busy
                waited = f" after waiting {self.wait_s:g}s" if self.wait_s else ""
                raise LaunchError(
                    f"GPU {key} is in use by another vllm-tune (pid {holder}){waited}",
                    "wait for it to finish, or choose other GPUs with --gpu-ids",
                )
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _try_all(self, folder: Path) -> tuple[str, str] | None:
        """Take every lock, or none: returns ``(key, holder pid)`` of the first busy GPU."""
        try:
            for key in sorted(self.keys):
                handle = self._take(folder / _file_name(key))
                if isinstance(handle, str):
                    self.release()
                    return key, handle
                self._held.append(handle)
        except BaseException:
            self.release()
            raise
        return None

    @staticmethod
    def _take(path: Path) -> IO[str] | str:
        """The locked file, or the holder's pid (as written in the file) when another process holds it."""
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def release(self) -> None:
        while self._held:
            handle = self._held.pop()
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
