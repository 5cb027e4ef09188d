"""One lock file per GPU, machine-wide, so two tuners never launch on the same card at once.

    with GpuLock(gpu_lock_keys(devices)):
        ...  # trials on these GPUs

Locks are ``fcntl.flock`` on ``<lock folder>/<key>.lock``; the kernel drops them when the holder
exits, however it exits, so a crashed tuner never leaves a stale lock. The folder is the same for every
user and every ``$VLLM_TUNE_HOME`` of the machine (:func:`lock_dir`): ``$VLLM_TUNE_LOCK_DIR``, else
``/run/lock/vllm-tune`` where ``/run/lock`` is the world-writable sticky folder the FHS keeps for locks
(Debian, Ubuntu: a tmpfs, unaffected by systemd's PrivateTmp and by /tmp cleaners), else
``/tmp/vllm-tune-locks``. It is created with mode 1777 and each lock file with 0o666, whatever the
umask, so another user's tuner can open and lock it. By default taking a lock never blocks: if another
process holds one, :class:`LaunchError` names the GPU and the holder's pid and user. With ``wait_s`` it
retries until the GPU is free or the time is up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import LaunchError

LOCK_DIR_ENV = "VLLM_TUNE_LOCK_DIR"
RUN_LOCK = Path("/run/lock")
TMP_LOCK_DIR = Path("/tmp/vllm-tune-locks")  # a fixed path, not $TMPDIR: that one may be per user


class GpuKey(str):
    """A lock key that remembers the GPU's index, for the message that names a busy GPU."""

    gpu_index: int | None = None

    def __new__(cls, key: str, index: int | None = None) -> GpuKey:
        made = super().__new__(cls, key)
        made.gpu_index = index
        return made

    def label(self) -> str:
        if self.gpu_index is None:
            return str(self)
        own = f"gpu{self.gpu_index}"
        return str(self.gpu_index) if str(self) == own else f"{self.gpu_index} ({self})"


def gpu_lock_keys(gpus: Iterable[tuple[int, str | None]]) -> list[str]:
    """Lock keys for ``(index, uuid)`` pairs: the NVML UUID when known (stable across
    ``CUDA_VISIBLE_DEVICES`` renumbering and across users), else ``gpu<index>``. Each key is a
    :class:`GpuKey` that also keeps the index."""
    return [GpuKey(uuid if uuid else f"gpu{index}", index) for index, uuid in gpus]


def lock_dir() -> Path:
    """The machine-wide lock folder: ``$VLLM_TUNE_LOCK_DIR``, ``/run/lock/vllm-tune``, or
    ``/tmp/vllm-tune-locks``. The choice depends only on the machine, never on the user, so every
    user's tuner picks the same folder."""
    explicit = os.environ.get(LOCK_DIR_ENV)
    if explicit:
        return Path(explicit)
    try:
        mode = RUN_LOCK.stat().st_mode
    except OSError:
        return TMP_LOCK_DIR
    shared = stat.S_ISDIR(mode) and mode & stat.S_IWOTH and mode & stat.S_ISVTX
    return RUN_LOCK / "vllm-tune" if shared else TMP_LOCK_DIR


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


def _unusable(folder: Path, reason: str, *, fix: str | None = None) -> LaunchError:
    fix = fix or f"run 'chmod 1777 {folder}' as its owner"
    return LaunchError(
        f"the GPU lock folder {folder} cannot be used ({reason})",
        f"{fix}, or set {LOCK_DIR_ENV} to a folder every user of these GPUs can write (all of them "
        "must use the same one)",
    )


def _owner(st: os.stat_result) -> str:
    try:
        import pwd

        return pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        return f"uid {st.st_uid}"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid{os.geteuid()}"


def ensure_lock_dir(folder: Path) -> Path:
    """Create ``folder`` (mode 1777) unless it exists; a :class:`LaunchError` when it cannot be used."""
    try:
        info = folder.stat()
    except FileNotFoundError:
        _create(folder)
        try:
            info = folder.stat()
        except OSError as exc:
            raise _unusable(folder, exc.strerror or type(exc).__name__) from exc
    except OSError as exc:
        raise _unusable(folder, exc.strerror or type(exc).__name__) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise _unusable(folder, "it is not a folder", fix=f"remove {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unusable(folder, f"owned by {_owner(info)}, mode {stat.S_IMODE(info.st_mode):04o}")
    return folder


def _create(folder: Path) -> None:
    """Make ``folder`` appear already at mode 1777: made under another name, then renamed, so another
    user's tuner never sees it half made (with the umask's mode)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        spare = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}"
        os.mkdir(spare, 0o700)
    except OSError as exc:
        raise _unusable(
            folder,
            f"it cannot be created: {exc.strerror or type(exc).__name__}",
            fix=f"create it with 'mkdir -m 1777 {folder}' where that is allowed",
        ) from exc
    try:
        os.chmod(spare, 0o1777)
        os.rename(spare, folder)
    except OSError:
        pass  # another tuner made it first (or it cannot be made: the caller's stat says which)
    with contextlib.suppress(OSError):
        os.rmdir(spare)


class GpuLock:
    """Holds the locks of ``keys`` for the ``with`` block; all or none."""

    def __init__(self, keys: Sequence[str], *, folder: Path | None = None, wait_s: float = 0.0) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.folder = folder
        self.wait_s = wait_s
        self._held: list[int] = []

    def __enter__(self) -> GpuLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        folder = ensure_lock_dir(self.folder or lock_dir())
        deadline = time.monotonic() + self.wait_s
        while True:
            busy = self._try_all(folder)
            if busy is None:
                return
            if time.monotonic() >= deadline:
                key, holder = busy
                label = key.label() if isinstance(key, GpuKey) else key
                waited = f" after waiting {self.wait_s:g}s" if self.wait_s else ""
                raise LaunchError(
                    f"GPU {label} is in use by another vllm-tune ({holder}){waited}",
                    "wait for it to finish, or choose other GPUs with --gpu-ids",
                )
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _try_all(self, folder: Path) -> tuple[str, str] | None:
        """Take every lock, or none: returns ``(key, holder)`` of the first busy GPU."""
        try:
            for key in sorted(self.keys):
                handle = _take(folder / _file_name(key), folder)
                if isinstance(handle, str):
                    self.release()
                    return key, handle
                self._held.append(handle)
        except BaseException:
            self.release()
            raise
        return None

    def release(self) -> None:
        while self._held:
            fd = self._held.pop()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _open(path: Path, folder: Path) -> int:
    """The lock file opened read-write: an existing one is opened without ``O_CREAT`` (which
    ``fs.protected_regular`` refuses for another user's file in a sticky folder), a new one is made
    0o666 whatever the umask; never through a symbolic link."""
    flags = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                os.fchmod(fd, 0o666)
            except FileExistsError:
                fd = os.open(path, flags)
    except OSError as exc:
        reason = f"{path.name}: {exc.strerror or type(exc).__name__}"
        raise _unusable(folder, reason, fix=f"run 'chmod 666 {path}' as its owner") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _unusable(folder, f"{path.name} is not a regular file", fix=f"remove {path}")
    return fd


def _take(path: Path, folder: Path) -> int | str:
    """The locked file, or who holds it (``pid N, user U`` as written in the file) when another
    process does."""
    for _ in range(5):
        fd = _open(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            written = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            os.close(fd)
            if not written:
                return "pid unknown"
            user = f", user {written[1]}" if len(written) > 1 else ""
            return f"pid {written[0]}{user}"
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)  # the file was removed (a /tmp cleaner) while we took it: take the new one
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_user()}".encode(), 0)
        return fd
    raise _unusable(folder, f"{path.name} keeps being removed")
