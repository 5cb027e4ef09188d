"""Progress for long work: a live line on a terminal, plain lines in a log, nothing with ``--json``.

The tuner's loops call a :class:`Progress`; they never print. ``--json`` gets :class:`QuietProgress` so
stdout carries exactly one JSON document.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Protocol, TextIO

from .units import GIB


class Progress(Protocol):
    def step(self, title: str, detail: str = "") -> None: ...

    def phase(
        self, phase: str, elapsed_s: float, used_bytes: dict[int, int] | None = None, extra: str = ""
    ) -> None: ...

    def done(self, verdict: str, detail: str = "") -> None: ...

    def note(self, text: str) -> None: ...


class QuietProgress:
    """Says nothing (``--json`` and tests)."""

    def step(self, title: str, detail: str = "") -> None:
        pass

    def phase(self, phase: str, elapsed_s: float, used_bytes=None, extra: str = "") -> None:
        pass

    def done(self, verdict: str, detail: str = "") -> None:
        pass

    def note(self, text: str) -> None:
        pass


class TerminalProgress:
    """Writes to stderr: a rewritten status line on a TTY, one line per phase change otherwise.

    ``device_label`` prefixes each device's index in the memory readings: ``GPU0``, or ``node0`` on
    ``--device cpu``, where a device is a NUMA node; ``phase_words`` renames a phase where the device
    does something else in it (the CPU backend warms up where a GPU captures graphs)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock=time.monotonic,
        device_label: str = "GPU",
        phase_words: Mapping[str, str] | None = None,
    ) -> None:
        self._out = stream or sys.stderr
        self._device_label = device_label
        self._phase_words = dict(phase_words or {})
        self._tty = bool(getattr(self._out, "isatty", lambda: False)())
        self._clock = clock
        self._last_phase: str | None = None
        self._live = False

    def _clear(self) -> None:
        if self._live:
            self._out.write("\r\033[K")
            self._live = False

    def step(self, title: str, detail: str = "") -> None:
        self._clear()
        self._last_phase = None
        self._out.write(f"▶ {title}\n")
        if detail:
            self._out.write(f"  {detail}\n")
        self._out.flush()

    def phase(self, phase: str, elapsed_s: float, used_bytes=None, extra: str = "") -> None:
        mem = ""
        if used_bytes:
            mem = "  " + " ".join(
                f"{self._device_label}{i} {b / GIB:5.1f} GiB" for i, b in sorted(used_bytes.items())
            )
        shown = self._phase_words.get(phase, phase)
        line = f"  {shown:<10} {elapsed_s:6.1f}s{mem}{('  ' + extra) if extra else ''}"
        if self._tty:
            self._out.write("\r\033[K" + line)
            self._live = True
        elif phase != self._last_phase:
            self._out.write(line + "\n")
        self._last_phase = phase
        self._out.flush()

    def done(self, verdict: str, detail: str = "") -> None:
        self._clear()
        mark = {"stable": "✔", "boots": "•", "skipped": "↷", "pool too small": "↗"}.get(verdict, "✘")
        self._out.write(f"  {mark} {verdict}{(': ' + detail) if detail else ''}\n")
        self._out.flush()

    def note(self, text: str) -> None:
        self._clear()
        self._out.write(f"  {text}\n")
        self._out.flush()
