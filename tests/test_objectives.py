"""find's objectives: registered in one place, each one object the search asks (floor, aim, rank, shrink)."""

from __future__ import annotations

import pytest

from vllm_tuner import objectives
from vllm_tuner.objectives.context import Context
from vllm_tuner.search import Observation, Policy, ProbeSummary, Request
from vllm_tuner.serveconfig import ServeConfig


def _config(context: int, seqs: int, util: float = 0.90, **more) -> ServeConfig:
    return ServeConfig(
        model="m", max_model_len=context, max_num_seqs=seqs, gpu_memory_utilization=util, **more
    )


def _stable(cfg: ServeConfig, **metrics: float) -> Observation:
    return Observation(cfg, "success", {}, ProbeSummary(ok=True), metrics=metrics)


def _policy(objective: str, **request) -> Policy:
    return Policy(
        Request(objective=objective, **request),
        ServeConfig(model="m"),
        estimate=lambda cfg, cal: None,
        calibrate=lambda facts, cfg: None,
    )


def test_the_registry_holds_the_four_objectives_and_refuses_others():
    assert objectives.NAMES == ("context", "concurrency", "targets", "throughput")
    assert objectives.BY_FLAG == ("context", "concurrency", "throughput")  # targets: --context/--seqs
    assert all(objectives.named(n).name == n for n in objectives.NAMES)
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        objectives.named("speed")
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        _policy("speed")


@pytest.mark.parametrize(
    ("objective", "request_", "floor"),
    [
        ("context", {"min_seqs": 4}, (16, 4)),
        ("context", {"min_context": 4096, "min_seqs": 2}, (4096, 2)),
        ("concurrency", {"native_max_len": 32768}, (8192, 1)),
        ("concurrency", {"min_context": 65536, "native_max_len": 32768}, (32768, 1)),
        ("targets", {"target_context": 2048, "target_seqs": 3}, (2048, 3)),
        ("targets", {"native_max_len": 4096}, (4096, 1)),
    ],
)
def test_each_objective_names_its_floor(objective, request_, floor):
    req = Request(objective=objective, **request_)
    assert (req.floor_context(), req.floor_seqs()) == floor


@pytest.mark.parametrize(
    ("objective", "winner"),
    [
        ("context", _config(32768, 1)),  # the longest context
        ("concurrency", _config(8192, 16)),  # the most sequences
        ("targets", _config(8192, 4, util=0.80)),  # the least memory that holds the target
    ],
)
def test_each_objective_ranks_results_its_own_way(objective, winner):
    results = [_stable(c) for c in (_config(32768, 1), _config(8192, 16), _config(8192, 4, util=0.80))]
    assert _policy(objective).best(results).config == winner


@pytest.mark.parametrize(
    ("objective", "shrunk"),
    [
        ("context", _config(31120, 8)),  # 5% less context, in whole blocks of 16
        ("concurrency", _config(32768, 7)),  # 5% fewer sequences
        ("targets", _config(32768, 8, util=0.89)),  # one utilization step less
    ],
)
def test_each_objective_shrinks_its_own_knob(objective, shrunk):
    assert _policy(objective, native_max_len=32768)._shrink(_config(32768, 8), 1) == shrunk


class _Fastest(Context):
    """A toy objective that ranks what a probe measured: the context objective's floor and aim."""

    name = "fastest"

    def rank(self, obs: Observation) -> tuple:
        return (obs.metrics.get("tokens_per_s", 0.0),)


def test_an_objective_can_rank_results_by_what_was_measured(monkeypatch):
    monkeypatch.setitem(objectives.REGISTRY, "fastest", _Fastest())
    longer, faster = (
        _stable(_config(32768, 1), tokens_per_s=900.0),
        _stable(_config(8192, 4), tokens_per_s=2400.0),
    )
    assert _policy("fastest").best([longer, faster]) is faster
    assert _policy("context").best([longer, faster]) is longer


def test_every_objective_says_in_one_line_what_it_guarantees():
    for name in ("context", "concurrency", "targets"):
        assert objectives.named(name).guarantee.startswith(
            "no preemption even when every sequence is at full length"
        )
    throughput = objectives.named("throughput").guarantee
    assert "measured goodput" in throughput and "--max-preemption-rate" in throughput
    assert all("\n" not in objectives.named(n).guarantee for n in objectives.NAMES)


def test_throughput_fits_memory_as_concurrency_does_and_ranks_launches_by_measured_goodput():
    policy = _policy("throughput", min_context=12000)
    assert policy.objective.floor(policy.request) == (12000, 1)
    fit_small, fit_big = _stable(_config(12000, 8)), _stable(_config(12000, 24))
    assert policy.best([fit_small, fit_big]).config.max_num_seqs == 24  # the largest pool, as concurrency
    slow = _stable(_config(12000, 128), output_tokens_per_s=3000.0)
    fast = _stable(_config(12000, 96), output_tokens_per_s=4210.0)
    assert policy.best([fit_big, slow, fast]) is fast  # measured goodput, not the flags, decides
