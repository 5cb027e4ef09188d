"""``--objective throughput``: the most output tokens/s the workload gets under its latency SLO.

Memory is fitted as ``concurrency`` fits it, at the context the workload's longest request needs (the
floor is ``--min-context``, which ``find --workload`` sets): the largest stable KV pool. Then
``vllm_tuner.throughput`` sweeps client concurrency on one server and proves the chosen
--max-num-seqs under the workload at saturation; those launches are ranked by what they measured
(``Observation.metrics["output_tokens_per_s"]``), not by their flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import beats_by_slack
from .concurrency import Concurrency

if TYPE_CHECKING:
    from ..search import Observation, Request
    from ..serveconfig import ServeConfig

GOODPUT = "output_tokens_per_s"  # the metric a measured launch is ranked by


class Throughput(Concurrency):
    name = "throughput"
    guarantee = (
        "the measured goodput of this workload under its SLO, proved at saturation; preemption is "
        "allowed up to --max-preemption-rate, so a burst of full-length requests may queue or recompute"
    )

    def rank(self, obs: Observation) -> tuple:
        """Measured launches first, by their goodput; the memory fit's launches by their config."""
        if GOODPUT in obs.metrics:
            return (1, obs.metrics[GOODPUT], *self.key(obs.config))
        return (0, 0.0, *self.key(obs.config))

    def beats(self, cfg: ServeConfig, best: Observation, near_optimum: float) -> bool:
        return beats_by_slack(self.key(cfg), self.key(best.config), near_optimum)

    def ladder(self, req: Request) -> list[str]:
        return [
            f"max-model-len: the workload's longest request ({self.floor(req)[0]} tokens) or --context",
            "gpu-memory-utilization: the largest stable KV pool at that length",
            "max-num-seqs: the knee of a closed-loop concurrency sweep on one server, within the --slo",
        ]


THROUGHPUT = Throughput()
