"""``--objective context``: the longest --max-model-len that keeps --min-seqs sequences."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import WORST_CASE, Objective, Sizing, beats_by_slack, lossless, round_length

if TYPE_CHECKING:
    from ..search import Observation, Request
    from ..serveconfig import ServeConfig


class Context(Objective):
    name = "context"
    guarantee = WORST_CASE

    def floor(self, req: Request) -> tuple[int, int]:
        return req.min_context or req.block_size, req.min_seqs

    def sizing_length(self, req: Request, ceiling: int) -> int:
        return ceiling  # a realistic length: vLLM's batched tokens (activations) shrink with tiny ones

    def aim(self, sizing: Sizing) -> tuple[int, int] | None:
        req, est, ceiling = sizing.request, sizing.estimate, sizing.ceiling
        floor_context, floor_seqs = self.floor(req)
        seqs = min(sizing.seq_cap, floor_seqs)
        measured = sizing.measured_context(seqs)
        context = min(ceiling, measured if measured is not None else est.max_context(seqs))
        if context >= ceiling:
            context = ceiling
            seqs = max(seqs, min(sizing.seq_cap, est.max_seqs(context)))
        # a computed length, in whole blocks; a --min-context it reaches stays as given
        return max(sizing.round_length(context), min(context, floor_context)), seqs

    def reaches_goal(self, req: Request, context: int, seqs: int) -> bool:
        return context >= req.native_max_len and seqs >= self.floor(req)[1]

    def key(self, cfg: ServeConfig) -> tuple:
        return (cfg.max_model_len or 0, cfg.max_num_seqs or 0, lossless(cfg), cfg.gpu_memory_utilization or 0)

    def beats(self, cfg: ServeConfig, best: Observation, near_optimum: float) -> bool:
        return beats_by_slack(self.key(cfg), self.rank(best), near_optimum)

    def shrink(self, req: Request, cfg: ServeConfig, step: int, ceiling: int) -> ServeConfig | None:
        context = round_length(int((cfg.max_model_len or 0) * (1 - 0.05 * step)), req.block_size, ceiling)
        return cfg.replace(max_model_len=context) if context >= req.block_size else None

    def ladder(self, req: Request) -> list[str]:
        rope = f" ({req.rope_max_len} with rope-scaling)" if req.rope_max_len else ""
        return [
            f"max-num-seqs: --min-seqs {self.floor(req)[1]} (more only at the model's full length)",
            f"max-model-len: what the measured KV pool holds, up to {req.native_max_len}{rope}",
        ]


CONTEXT = Context()
