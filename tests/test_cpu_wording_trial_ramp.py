"""On ``--device cpu`` a device is a NUMA node in every verdict, table, chart and live line a trial or a
ramp step prints, and the phase after the KV cache is the CPU worker's warm-up, not a graph capture."""

from __future__ import annotations

import io

from vllm_tuner.chart import ChartPoint, ramp_chart_html
from vllm_tuner.devices import CPU, CUDA
from vllm_tuner.probe import LoadReport
from vllm_tuner.progress import TerminalProgress
from vllm_tuner.ramp import RampPlan, judge_step, step_words, summary_table
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.trial import GIB, ProbePlan, TrialOutcome, judge_probe

CPU_UNIT = "NUMA node"  # HostNodes.unit


def _report(**changes) -> LoadReport:
    report = LoadReport(
        ok=True,
        requests=8,
        peak_used_bytes={0: 6 * GIB},
        headroom_bytes={0: GIB // 4},
        max_kv_usage=0.4,
        latency_p50_s=0.5,
        latency_p99_s=1.5,
        duration_s=30.0,
    )
    for key, value in changes.items():
        setattr(report, key, value)
    return report


def test_a_probe_short_of_headroom_names_the_numa_node():
    plan = ProbePlan(concurrency=4, prompt_tokens=1024, max_tokens=1024, headroom_bytes=GIB)
    assert judge_probe(_report(), plan, CPU_UNIT).startswith("NUMA node 0 had 0.25 GiB headroom under load")
    assert judge_probe(_report(), plan).startswith("GPU 0 had 0.25 GiB headroom")


def test_a_ramp_step_its_live_line_and_the_table_name_the_numa_node():
    outcome = TrialOutcome(ServeConfig("m", gpu_memory_utilization=0.2), "success", "unstable", {}, _report())
    step = judge_step(outcome, RampPlan(), "soak", soak_s=30, unit=CPU_UNIT)
    assert step.failure.startswith("NUMA node 0 had 0.25 GiB headroom under load")
    assert "peak node0 6.00 GiB" in step_words(step, CPU_UNIT)
    assert "peak GiB/node" in summary_table([step], CPU_UNIT)[0]
    assert "peak GiB/GPU" in summary_table([step])[0]


def test_the_ramp_chart_labels_the_device_it_measured():
    page = ramp_chart_html(
        [ChartPoint(0.2, 4_000_000, 6.0, True)], title="t", capacity_gib=18.2, unit=CPU_UNIT
    )
    assert "peak GiB per NUMA node" in page and "NUMA node capacity 18.2 GiB" in page
    assert "GPU" not in page


def test_the_live_phase_after_the_kv_cache_is_a_warm_up_on_the_cpu():
    out = io.StringIO()
    progress = TerminalProgress(out, device_label=CPU.label, phase_words=CPU.phase_words)
    progress.phase("capturing", 56.7, {0: 6 * GIB})
    assert out.getvalue().split() == ["warming", "up", "56.7s", "node0", "6.0", "GiB"]
    gpu_out = io.StringIO()
    TerminalProgress(gpu_out, device_label=CUDA.label, phase_words=CUDA.phase_words).phase("capturing", 2.1)
    assert gpu_out.getvalue().split()[0] == "capturing"
