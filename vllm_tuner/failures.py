"""The failure categories: one declaration each, and what every part of the tuner does about it (pure).

A category is how a launch of vLLM ended, as ``logparse`` reads it from the log (``Diagnosis.category``).
Each is declared once here with its title (one line for people: ``diagnose``), whether it is
``transient`` (it says nothing about the config itself, so a later run launches the same flags again
instead of reusing the stored failure) and what ``find``'s search does about it (:class:`Response`; the
how is ``search.Policy``'s, one handler per response). ``advice`` holds one rule per category that
has a cause to act on; tests/test_failures.py checks that every category has its place everywhere.

Adding a category: declare it here, teach ``logparse`` the line that shows it, give ``advice`` its
rule, and name it in docs/architecture.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Response(enum.Enum):
    """What the search learns from a launch that ended in a category."""

    BOOTED = "it started: proven under load or not, it is a result (an unstable one lowers the utilization)"
    CAP_UTIL_AT_FREE = (
        "cap --gpu-memory-utilization at the share of memory found free at startup (where "
        "--kv-cache-memory-bytes skips that check: the pool the goal needs, in bytes, within what was free)"
    )
    STEP_UTIL_DOWN = "lower --gpu-memory-utilization one step per failure (CUDA graphs live outside it)"
    LOWER_UTIL_FOR_HEADROOM = "lower --gpu-memory-utilization by the headroom missing under load"
    HALVE_BATCHED_TOKENS = "halve --max-num-batched-tokens, stopping at the least worth trying"
    CAP_SEQS_AT_LIMIT = "cap --max-num-seqs at the limit vLLM printed"
    REMEASURE_POOL = "recompute the next candidate from the KV pool vLLM measured"
    REMEASURE_LENGTH = "recompute the next length from vLLM's estimated maximum model length"
    RETRY_ONCE = "launch the same config once more; stop at the second"
    STOP = "stop the search"


@dataclass(frozen=True)
class Category:
    """One way a launch ends.

    ``stop``: for a response that can end the search, why, in words (``{unit}`` = one device, "GPU").
    ``memory``: whether a memory knob could help at all; False where no lossy knob buys anything (bad
    flags, a hang, a taken port), so a stopped search does not suggest one.
    """

    name: str
    title: str
    response: Response
    transient: bool = False
    stop: str = ""
    memory: bool = True

    def stop_reason(self, unit: str) -> str:
        return self.stop.format(unit=unit)


CATEGORIES: tuple[Category, ...] = (
    Category("success", "the server started", Response.BOOTED),
    Category(
        "oom_weights_load",
        "out of GPU memory while loading the weights",
        Response.STOP,
        stop="the weights alone do not fit on the {unit}s",
    ),
    Category(
        "kv_cache_insufficient_for_max_len",
        "the KV cache cannot hold one request of --max-model-len tokens",
        Response.REMEASURE_LENGTH,
    ),
    Category(
        "no_kv_cache_memory",
        "no memory left for the KV cache inside --gpu-memory-utilization",
        Response.REMEASURE_POOL,
    ),
    Category(
        "startup_free_memory_below_utilization",
        "less memory is free than --gpu-memory-utilization asks for",
        Response.CAP_UTIL_AT_FREE,
    ),
    Category(
        "oom_cudagraph_capture", "out of GPU memory while capturing CUDA graphs", Response.STEP_UTIL_DOWN
    ),
    Category(
        "oom_during_profiling",
        "out of GPU memory during the startup profile run",
        Response.HALVE_BATCHED_TOKENS,
    ),
    Category("oom_at_runtime", "out of GPU memory while serving requests", Response.LOWER_UTIL_FOR_HEADROOM),
    Category(
        "mamba_blocks_below_max_num_seqs",
        "fewer Mamba cache blocks than --max-num-seqs",
        Response.CAP_SEQS_AT_LIMIT,
    ),
    Category(
        "profiling_memory_changed",
        "free GPU memory changed while vLLM was profiling (another process)",
        Response.RETRY_ONCE,
        transient=True,
        stop="another process changed {unit} memory while vLLM was profiling, twice",
    ),
    Category(
        "unsupported_flag_or_arg_error",
        "vLLM rejected a flag or its value",
        Response.STOP,
        stop="vLLM rejected the command line",
        memory=False,
    ),
    Category(
        "port_in_use",
        "another process already listens on the server's port",
        Response.STOP,
        transient=True,
        stop="another process holds the server's port",
        memory=False,
    ),
    Category(
        "startup_timeout",
        "the server did not become ready in time",
        Response.STOP,
        transient=True,
        stop="vLLM did not become ready in time",
        memory=False,
    ),
    Category(
        "engine_core_died_other",
        "the engine died for a reason that is not GPU memory",
        Response.STOP,
        transient=True,
        stop="vLLM died for a reason that is not memory",
        memory=False,
    ),
    Category(
        "unknown",
        "no vLLM failure or startup found in the log",
        Response.STOP,
        transient=True,
        stop="vLLM stopped without a recognisable cause",
        memory=False,
    ),
)

BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# Failures that say nothing about the config itself: worth launching again on a later run.
TRANSIENT: frozenset[str] = frozenset(c.name for c in CATEGORIES if c.transient)


def category(name: str) -> Category:
    """The declaration of ``name``; KeyError for a name no part of the tuner knows."""
    return BY_NAME[name]


def title(name: str) -> str:
    """One line for people; an undeclared name is shown as it is."""
    return BY_NAME[name].title if name in BY_NAME else name
