"""One lock file per GPU, so two tuners never launch on the same card at once.

    with GpuLock(gpu_lock_keys(devices)):
        ...  # trials on these GPUs

Locks are ``fcntl.flock`` on ``data_dir()/locks/<key>.lock``; the kernel drops them when the holder
exits, however it exits, so a crashed tuner never leaves a stale lock. Taking a lock never blocks:
if another process holds one, :class:`LaunchError` names the GPU and the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
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

    def __init__(self, keys: Sequence[str], *, folder: Path | None = None) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.folder = folder
        self._held: list[IO[str]] = []

    def __enter__(self) -> GpuLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        folder = self.folder or lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for key in sorted(self.keys):
                self._held.append(self._take(folder / _file_name(key), key))
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path, key: str) -> IO[str]:
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LaunchError(
                f"GPU {key} is in use by another vllm-tune (pid {holder})",
                "wait for it to finish, or choose other GPUs with --gpu-ids",
            ) from None
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
