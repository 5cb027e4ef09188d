"""The one exception tree of vllm-tune.

    TunerError                 every error the user can act on; one line, exit code 2
    ├── UsageError             bad flags or values given to vllm-tune itself
    ├── ModelError             unknown or unreadable model
    ├── GpuError               NVML unavailable, GPUs busy or too small, memory not released
    ├── VllmError              vLLM missing or unusable (command not found, bad version)
    ├── LaunchError            a trial could not be started (port in use, lock held)
    ├── ProbeError             an HTTP probe of a running server failed
    ├── StoreError             the SQLite store could not be opened or is damaged
    └── DeployError            a multi-model deployment file or state is invalid

Foreign exceptions (pynvml, httpx, OSError, sqlite3) are translated in exactly one place each, with
``raise ... from exc``. Anything that is not a TunerError is a bug and is reported as a crash.
"""

from __future__ import annotations


class TunerError(Exception):
    """An error with a problem and a fix, printed as one line."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.problem}; {self.fix}"
        return self.problem


class UsageError(TunerError):
    """Bad flags or values given to vllm-tune."""


class ModelError(TunerError):
    """Unknown or unreadable model."""


class GpuError(TunerError):
    """NVML unavailable, GPUs busy or too small, memory not released."""


class VllmError(TunerError):
    """vLLM missing or unusable."""


class LaunchError(TunerError):
    """A trial could not be started."""


class ProbeError(TunerError):
    """An HTTP probe of a running server failed."""


class StoreError(TunerError):
    """The SQLite store could not be opened or is damaged."""


class DeployError(TunerError):
    """A multi-model deployment file or its state is invalid."""
