"""Fixed targets (``find --context L --seqs S``, a deployment's ``fixed`` instance): exactly L x S,
at the lowest --gpu-memory-utilization and with the fewest lossy knobs that hold it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..vllm_defaults import DEFAULT_UTILIZATION
from .base import UTIL_STEP, WORST_CASE, Objective, Sizing, lossless

if TYPE_CHECKING:
    from ..search import Observation, Request
    from ..serveconfig import ServeConfig


class Targets(Objective):
    name = "targets"
    wants_more = False
    by_flag = False  # set by --context/--seqs, not --objective
    guarantee = WORST_CASE

    def floor(self, req: Request) -> tuple[int, int]:
        return req.target_context or req.native_max_len, req.target_seqs or 1

    def sizing_length(self, req: Request, ceiling: int) -> int:
        return self.floor(req)[0]

    def aim(self, sizing: Sizing) -> tuple[int, int] | None:
        context, seqs = self.floor(sizing.request)
        return (context, seqs) if sizing.estimate.max_seqs(context) >= seqs else None

    def reaches_goal(self, req: Request, context: int, seqs: int) -> bool:
        floor_context, floor_seqs = self.floor(req)
        return context >= floor_context and seqs >= floor_seqs

    def key(self, cfg: ServeConfig) -> tuple:
        return (
            lossless(cfg),
            -(cfg.gpu_memory_utilization or 0),
            cfg.max_model_len or 0,
            cfg.max_num_seqs or 0,
        )

    def beats(self, cfg: ServeConfig, best: Observation, near_optimum: float) -> bool:
        return self.key(cfg) > self.rank(best)

    def shrink(self, req: Request, cfg: ServeConfig, step: int, ceiling: int) -> ServeConfig | None:
        util = round((cfg.gpu_memory_utilization or DEFAULT_UTILIZATION) - UTIL_STEP * step, 2)
        return cfg.replace(gpu_memory_utilization=util) if util >= req.util_floor else None

    def ladder(self, req: Request) -> list[str]:
        context, seqs = self.floor(req)
        return [f"max-model-len {context} and max-num-seqs {seqs}: fixed"]


TARGETS = Targets()
