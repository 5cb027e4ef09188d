"""Preemption under load is read one way everywhere (find's probe, ramp's soak, ``status``): preemptions
per completed request, judged against ``--max-preemption-rate`` with memory trouble first."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_tuner.commands.ramp import _preemption_rate
from vllm_tuner.deploy.state import DeploymentState, InstanceState
from vllm_tuner.deploy.status import deployment_status
from vllm_tuner.errors import UsageError
from vllm_tuner.probe import LoadReport, PreemptionReading, preemptions_from_metrics
from vllm_tuner.trial import HEADROOM, PREEMPTIONS, ProbePlan, judge_probe, probe_verdict
from vllm_tuner.workload import Stream, Workload, default_workload

GIB = 1 << 30

METRICS = """\
vllm:num_preemptions_total{engine="0",model_name="m"} 12.0
vllm:num_preemptions_total{engine="1",model_name="m"} 3.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 40.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 20.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.9
"""


def test_the_rate_is_preemptions_per_completed_request():
    reading = PreemptionReading(preemptions=15, requests=60)
    assert reading.rate == 0.25
    assert reading.within(0.25) and not reading.within(0.2) and reading.within(None)
    assert reading.words() == "15 preemption(s) in 60 completed request(s) (0.25 per request)"
    stuck = PreemptionReading(preemptions=7, requests=0)  # thrashing: nothing completes
    assert math.isinf(stuck.rate) and not stuck.within(100.0) and "none completed" in stuck.words()
    assert PreemptionReading().rate == 0.0 and PreemptionReading().within(0.0)


def test_a_servers_metrics_read_into_the_same_reading():
    assert preemptions_from_metrics(METRICS) == PreemptionReading(15, 60)  # summed over engines and reasons
    assert preemptions_from_metrics("vllm:kv_cache_usage_perc 0.5\n") is None


def test_the_probe_verdict_reads_the_rate_after_memory_trouble():
    report = LoadReport(requests=40, preemptions=4, headroom_bytes={0: 2 * GIB})
    assert probe_verdict(report, headroom_bytes=GIB, max_preemption_rate=0.1).category == "success"
    over = probe_verdict(report, headroom_bytes=GIB, max_preemption_rate=0.05)
    assert over.category == PREEMPTIONS
    assert (
        over.failure
        == "4 preemption(s) in 40 completed request(s) (0.10 per request) under load, limit 0.05 per request"
    )
    short = probe_verdict(report, headroom_bytes=3 * GIB, max_preemption_rate=0.05)
    assert short.category == HEADROOM  # memory trouble is named first
    plan = ProbePlan(concurrency=4, prompt_tokens=1024, max_tokens=64, max_preemption_rate=None)
    assert judge_probe(report, plan) == ""  # find's worst-case probe: any rate (its pool holds the load)


def test_the_soak_loads_resident_tokens_are_its_longest_running_requests_at_full_length():
    work = default_workload(concurrency=4, context=32768, duration_s=60)  # + 1 short stream
    assert work.resident_tokens(4) == 4 * 32768  # --max-num-seqs 4: the short request waits
    assert work.resident_tokens(None) == 4 * 32768 + 512 + 128
    mixed = Workload((Stream("a", 2, 1000, 100), Stream("b", 3, 5000, 500)), 60)
    assert mixed.resident_tokens(4) == 3 * 5500 + 1100


class _Http:
    def __init__(self, metrics: str) -> None:
        self.metrics = metrics

    def get(self, url: str, timeout: float):
        return SimpleNamespace(status_code=200, text=self.metrics if url.endswith("/metrics") else "")


class _Nvml:
    def processes(self, gpu: int):
        return [SimpleNamespace(pid=100, used=20 * GIB)]

    def memory(self, gpu: int):
        return SimpleNamespace(used=21 * GIB, total=32 * GIB)


class _Processes:
    def alive(self, inst) -> bool:
        return True

    def pids(self, inst) -> set[int]:
        return {100}


def _state() -> DeploymentState:
    inst = InstanceState(
        "coder", 100, 100, 8001, [0], [], {}, "/tmp/coder.log", "1", 0.0, footprint_bytes=20 * GIB
    )
    return DeploymentState("one", "one.yaml", 0.0, {"0": 0}, [inst])


def test_status_says_when_an_instance_preempts():
    status = deployment_status(_state(), nvml=_Nvml(), http=_Http(METRICS), processes=_Processes())
    (inst,) = status.instances
    assert inst.preemption == PreemptionReading(15, 60) and inst.kv_usage == 0.9
    data = status.as_dict()["instances"][0]
    assert (data["preemptions"], data["completed_requests"], data["preemption_rate"]) == (15, 60, 0.25)
    assert (
        "  coder: 15 preemption(s) in 60 completed request(s) (0.25 per request): "
        "its KV pool is too small for this traffic"
    ) in status.render().splitlines()
    calm = deployment_status(
        _state(),
        nvml=_Nvml(),
        http=_Http(METRICS.replace("12.0", "0").replace("3.0", "0")),
        processes=_Processes(),
    )
    assert "preemption" not in calm.render() and calm.as_dict()["instances"][0]["preemption_rate"] == 0.0


def test_the_deprecated_count_still_means_rate_zero_and_refuses_any_other_count():
    assert _preemption_rate(0.05, None) == 0.05
    assert _preemption_rate(0.0, 0) == 0.0
    with pytest.raises(UsageError, match="--max-preemption-rate"):
        _preemption_rate(0.0, 3)
