"""What an objective of ``find`` is: the one place that says what the search wants (pure).

An objective names the floor a result must meet, where the search aims given what memory holds, when
a set of lossy knobs buys enough to be worth them, how results rank (by their config, or by something
a probe measured: ``Observation.metrics``) and how a config that failed where the model said it fits
is shrunk for the next try. ``search.Policy`` holds no objective of its own: it asks the one the
request names (``vllm_tuner.objectives.named``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..search import EstimateView, Observation, Request
    from ..serveconfig import ServeConfig

UTIL_STEP = 0.01  # the step of --gpu-memory-utilization the search moves by
# what the context, concurrency and targets objectives promise: a worst-case proof
WORST_CASE = "no preemption even when every sequence is at full length (--max-num-seqs × --max-model-len fit the KV pool)"


def round_length(context: int, block_size: int, ceiling: int) -> int:
    """A computed --max-model-len in whole blocks; the ceiling itself when it reaches it."""
    if context >= ceiling:
        return ceiling
    return max(block_size, context // block_size * block_size)


@dataclass(frozen=True)
class Sizing:
    """What the search knows when it aims, at the caps the history allows.

    ``ceiling``: the longest --max-model-len vLLM takes with the knobs in use; ``seq_cap``: the most
    sequences the caps allow; ``estimate``: the (calibrated) estimate at the objective's sizing length;
    ``measured_context(seqs)``: the longest context for ``seqs`` sequences as vLLM itself reported it,
    or None.
    """

    request: Request
    ceiling: int
    seq_cap: int
    estimate: EstimateView
    measured_context: Callable[[int], int | None]

    def round_length(self, context: int) -> int:
        return round_length(context, self.request.block_size, self.ceiling)


class Objective(ABC):
    """One objective of ``find``; ``name`` is what ``Request.objective`` and the store say."""

    name: str
    # True: the objective wants as much as memory buys, so a winner is told what each lossy knob not
    # allowed would add to it; False: a fixed target, which a winner meets and nothing adds to
    wants_more: bool = True
    by_flag: bool = True  # offered by find's --objective
    guarantee: str = ""  # what a result promises, in one line (find prints it)

    @abstractmethod
    def floor(self, req: Request) -> tuple[int, int]:
        """The least (context, sequences) a result must have."""

    @abstractmethod
    def sizing_length(self, req: Request, ceiling: int) -> int:
        """The context the memory is sized at (vLLM's batched tokens, so activations, follow it)."""

    @abstractmethod
    def aim(self, sizing: Sizing) -> tuple[int, int] | None:
        """The (context, sequences) to launch, or None if nothing fits."""

    @abstractmethod
    def reaches_goal(self, req: Request, context: int, seqs: int) -> bool:
        """Whether (context, sequences) is enough that another lossy knob is not worth its cost."""

    @abstractmethod
    def key(self, cfg: ServeConfig) -> tuple:
        """How configs rank for this objective (larger is better)."""

    def rank(self, obs: Observation) -> tuple:
        """How results rank (larger is better): by their config, unless the objective ranks by what a
        launch measured (``obs.metrics``)."""
        return self.key(obs.config)

    @abstractmethod
    def beats(self, cfg: ServeConfig, best: Observation, near_optimum: float) -> bool:
        """Whether an untried ``cfg`` is worth a launch after the proven ``best``."""

    @abstractmethod
    def shrink(self, req: Request, cfg: ServeConfig, step: int, ceiling: int) -> ServeConfig | None:
        """``cfg`` failed where the model said it fits: the ``step``-th smaller try, or None."""

    @abstractmethod
    def ladder(self, req: Request) -> list[str]:
        """How the objective sets the lossless knobs, for ``--dry-run``'s ladder."""


def lossless(cfg: ServeConfig) -> int:
    """Minus the lossy knobs ``cfg`` uses: 0 is best."""
    return -sum(1 for flag in (cfg.enforce_eager, cfg.kv_cache_dtype != "auto", cfg.cpu_offload_gb) if flag)


def beats_by_slack(a: tuple, b: tuple, near_optimum: float) -> bool:
    """Ahead on the first rank by more than ``near_optimum``, or level there and ahead on the second."""
    slack = 1 + near_optimum
    return a[0] > b[0] * slack or (a[0] >= b[0] and a[1] > b[1] * slack)
