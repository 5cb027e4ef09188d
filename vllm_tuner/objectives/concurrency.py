"""``--objective concurrency``: the most --max-num-seqs that keeps --min-context tokens each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import WORST_CASE, Objective, Sizing, beats_by_slack, lossless

if TYPE_CHECKING:
    from ..search import Observation, Request
    from ..serveconfig import ServeConfig

# vLLM's default --max-num-seqs on most GPUs: past it, concurrency is not worth a lossy knob
LOSSY_SEQS_GOAL = 256
DEFAULT_MIN_CONTEXT = 8192


class Concurrency(Objective):
    name = "concurrency"
    guarantee = WORST_CASE

    def floor(self, req: Request) -> tuple[int, int]:
        longest = max(req.native_max_len, req.rope_max_len or 0)
        return min(req.min_context or DEFAULT_MIN_CONTEXT, longest), req.min_seqs

    def sizing_length(self, req: Request, ceiling: int) -> int:
        return self.floor(req)[0]

    def aim(self, sizing: Sizing) -> tuple[int, int] | None:
        context = self.floor(sizing.request)[0]
        return context, min(sizing.seq_cap, sizing.estimate.max_seqs(context))

    def reaches_goal(self, req: Request, context: int, seqs: int) -> bool:
        # lossy knobs buy sequences up to vLLM's usual default only
        return seqs >= min(req.max_seqs_cap, LOSSY_SEQS_GOAL) and context >= self.floor(req)[0]

    def key(self, cfg: ServeConfig) -> tuple:
        return (cfg.max_num_seqs or 0, cfg.max_model_len or 0, lossless(cfg), cfg.gpu_memory_utilization or 0)

    def beats(self, cfg: ServeConfig, best: Observation, near_optimum: float) -> bool:
        return beats_by_slack(self.key(cfg), self.rank(best), near_optimum)

    def shrink(self, req: Request, cfg: ServeConfig, step: int, ceiling: int) -> ServeConfig | None:
        seqs = int((cfg.max_num_seqs or 1) * (1 - 0.05 * step))
        return cfg.replace(max_num_seqs=seqs) if seqs >= 1 else None

    def ladder(self, req: Request) -> list[str]:
        return [
            f"max-model-len: --min-context {self.floor(req)[0]}",
            f"max-num-seqs: what the measured KV pool holds at that length, up to {req.max_seqs_cap}",
        ]


CONCURRENCY = Concurrency()
