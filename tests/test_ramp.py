"""The ramp's pure parts: the grid, the next step (linear, bisect), verdicts, flags, the table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.launch import VllmInfo
from vllm_tuner.probe import LoadReport
from vllm_tuner.ramp import (
    POOL_TOO_SMALL,
    NextStep,
    RampPlan,
    StepResult,
    Stop,
    config_from_args,
    judge_step,
    parse_serve_command,
    pool_shortfall,
    read_find_result,
    summary_table,
)
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.trial import HEADROOM, PREEMPTIONS, REQUEST_ERRORS, TrialOutcome
from vllm_tuner.trialrecord import env_fingerprint

GIB = 1 << 30


def soak(u: float, ok: bool = True, category: str = "success") -> StepResult:
    return StepResult(u, "soak", "pass" if ok else "fail", category if not ok else "success")


def edge(u: float, ok: bool = True) -> StepResult:
    return StepResult(u, "edge", "boots" if ok else "fail", "success" if ok else "oom_cudagraph_capture")


def walk(plan: RampPlan, passes_below: float, boots_below: float | None = None) -> list[StepResult]:
    """Run the plan against a machine whose soaks hold below ``passes_below`` and which boots below
    ``boots_below``; return the steps it took."""
    steps: list[StepResult] = []
    for _ in range(40):
        decision = plan.next(steps)
        if isinstance(decision, Stop):
            return steps
        u = decision.utilization
        boots = boots_below is None or u < boots_below
        if decision.phase == "edge":
            steps.append(edge(u, boots))
        else:
            steps.append(soak(u, boots and u < passes_below))
    raise AssertionError("the plan never stopped")


def test_grid_is_rounded_and_ends_at_the_ceiling():
    assert RampPlan().grid() == (0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92)
    assert RampPlan(start=0.9, step=0.03, ceiling=0.98).grid() == (0.9, 0.93, 0.96)


def test_linear_goes_up_one_step_per_pass_and_stops_at_the_first_failure():
    plan = RampPlan()
    steps = walk(plan, passes_below=0.895)
    assert [(s.utilization, s.passed) for s in steps][-3:] == [(0.88, True), (0.89, True), (0.9, False)]
    assert plan.last_stable(steps).utilization == 0.89
    decision = plan.next(steps)
    assert isinstance(decision, Stop) and "0.90 failed" in decision.reason and "0.89" in decision.reason


def test_linear_to_the_ceiling_and_a_failing_start():
    plan = RampPlan()
    steps = walk(plan, passes_below=1.0)
    assert len(steps) == 8 and plan.last_stable(steps).utilization == 0.92
    assert "ceiling" in plan.next(steps).reason
    steps = walk(plan, passes_below=0.5)
    assert len(steps) == 1 and plan.last_stable(steps) is None and plan.recommended(steps) is None


def test_margin_is_taken_off_the_last_stable_step():
    plan = RampPlan(margin=0.02)
    steps = walk(plan, passes_below=0.9)
    assert plan.recommended(steps) == 0.87


def test_bisect_finds_the_edge_in_log2_launches_then_soaks_just_below_it():
    plan = RampPlan(strategy="bisect")
    steps = walk(plan, passes_below=1.0, boots_below=0.905)
    edges = [s for s in steps if s.phase == "edge"]
    soaks = [s for s in steps if s.phase == "soak"]
    assert len(edges) <= 4
    assert [s.utilization for s in soaks] == [0.89, 0.9]  # just below the edge 0.90, then the edge
    assert plan.last_stable(steps).utilization == 0.9


def test_bisect_steps_down_when_the_soak_below_the_edge_fails():
    plan = RampPlan(strategy="bisect")
    steps = walk(plan, passes_below=0.875, boots_below=0.905)
    soaks = [(s.utilization, s.passed) for s in steps if s.phase == "soak"]
    assert soaks == [(0.89, False), (0.88, False), (0.87, True)]
    assert plan.last_stable(steps).utilization == 0.87


def test_bisect_when_nothing_boots_and_when_everything_boots():
    plan = RampPlan(strategy="bisect")
    steps = walk(plan, passes_below=1.0, boots_below=0.5)
    assert not any(s.phase == "soak" for s in steps)
    assert "not even --start 0.85 boots" in plan.next(steps).reason
    steps = walk(plan, passes_below=1.0)
    assert [s.utilization for s in steps if s.phase == "soak"] == [0.91, 0.92]


def test_the_first_decision_of_each_strategy():
    assert RampPlan().next([]) == NextStep(0.85, "soak", "the safe starting point")
    first = RampPlan(strategy="bisect").next([])
    assert first.phase == "edge" and 0.85 < first.utilization < 0.92


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"ceiling": 0.99}, "--ceiling must be in (0, 0.98]"),
        ({"start": 0.92}, "--start must be above 0 and below --ceiling"),
        ({"step": 0.0}, "--step must be above 0"),
        ({"step": 0.2}, "--step must be above 0 and at most"),
        ({"strategy": "random"}, "unknown --strategy"),
        ({"margin": -0.01}, "--margin must be at least 0"),
        ({"max_preemption_rate": -0.1}, "--max-preemption-rate must be at least 0"),
    ],
)
def test_validation_is_one_usage_error(changes, words):
    with pytest.raises(UsageError) as info:
        RampPlan(**changes).validate()
    assert words in str(info.value) and "\n" not in str(info.value)


def outcome(
    verdict: str, category: str = "success", report: LoadReport | None = None, **facts
) -> TrialOutcome:
    cfg = ServeConfig("m", gpu_memory_utilization=0.9)
    return TrialOutcome(cfg, category, verdict, dict(facts), report, duration_s=12.0, evidence="")


def report(**changes) -> LoadReport:
    base = LoadReport(
        ok=True,
        requests=40,
        peak_used_bytes={0: 21 * GIB, 1: 22 * GIB},
        headroom_bytes={0: 3 * GIB, 1: 2 * GIB},
        max_kv_usage=0.6,
        latency_p50_s=0.5,
        latency_p99_s=1.5,
        duration_s=30.0,
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_a_healthy_soak_passes_with_its_numbers():
    step = judge_step(
        outcome("stable", report=report(), kv_cache_tokens=500000), RampPlan(), "soak", soak_s=30
    )
    assert step.verdict == "pass" and step.category == "success" and step.failure == ""
    assert step.kv_cache_tokens == 500000 and step.min_headroom_bytes == 2 * GIB
    data = step.as_json()
    assert data["peak_memory_gib"] == {"0": 21.0, "1": 22.0} and data["failure_category"] is None


@pytest.mark.parametrize(
    ("changes", "category", "words"),
    [
        ({"headroom_bytes": {0: 3 * GIB, 1: GIB // 2}}, HEADROOM, "GPU 1 had 0.50 GiB headroom under load"),
        ({"errors": {"http_5xx": 2}}, REQUEST_ERRORS, "2 request(s) failed under load (2 http_5xx)"),
        ({"server_died": True, "duration_s": 14.0}, "server_died_under_load", "died under load after 14.0s"),
    ],
)
def test_each_soak_failure_has_its_category_and_numbers(changes, category, words):
    step = judge_step(outcome("unstable", report=report(**changes)), RampPlan(), "soak", soak_s=30)
    assert step.verdict == "fail" and step.category == category and words in step.failure


def test_a_log_category_wins_and_a_startup_failure_has_no_soak():
    died = judge_step(
        outcome("unstable", "oom_at_runtime", report(server_died=True)), RampPlan(), "soak", soak_s=60
    )
    assert died.category == "oom_at_runtime" and "of the 60.0s soak" in died.failure
    failed = judge_step(outcome("failed", "oom_cudagraph_capture"), RampPlan(), "soak", soak_s=60)
    assert failed.verdict == "fail" and failed.soak_elapsed_s is None and "did not start" in failed.failure
    booted = judge_step(outcome("boots"), RampPlan(), "edge")
    assert booted.passed and booted.verdict == "boots"


def test_step_records_round_trip():
    step = judge_step(outcome("stable", report=report()), RampPlan(), "soak", soak_s=30)
    again = StepResult.from_record(step.to_record())
    assert again == step


def test_a_step_goes_into_the_store_and_back_through_one_module():
    from vllm_tuner.ramp.record import step_from_record, step_record

    steps = [
        judge_step(outcome("stable", report=report()), RampPlan(), "soak", soak_s=30),
        judge_step(outcome("failed", "oom_cudagraph_capture"), RampPlan(), "soak", soak_s=30),
        judge_step(outcome("boots"), RampPlan(), "edge"),
    ]
    for step, verdict in zip(steps, ("stable", "failed", "boots"), strict=True):
        row = step_record(outcome("stable", report=report()), step, "fp")
        assert row["verdict"] == verdict and row["env_fingerprint"] == "fp"
        assert step_from_record(SimpleNamespace(**row)) == step
    bare = SimpleNamespace(
        config={"model": "m", "gpu_memory_utilization": 0.9}, probe=None, category="oom_at_runtime"
    )
    assert step_from_record(bare) == StepResult(0.9, "soak", "fail", "oom_at_runtime")


def test_flags_after_dashes_become_fields_and_the_rest_passes_through():
    cfg = config_from_args(
        "m",
        [
            "--max-model-len",
            "8192",
            "--enforce-eager",
            "--trust-remote-code",
            "-tp=2",
            "--kv-cache-dtype",
            "fp8",
        ],
    )
    assert cfg.max_model_len == 8192 and cfg.enforce_eager and cfg.tensor_parallel_size == 2
    assert cfg.kv_cache_dtype == "fp8" and cfg.extra_args == ("--trust-remote-code",)
    assert config_from_args("m", ["--max-num-seqs", "4"], max_num_seqs=8).max_num_seqs == 8
    with pytest.raises(UsageError):
        config_from_args("m", ["--gpu-memory-utilization", "0.9"])
    with pytest.raises(UsageError):
        config_from_args("m", ["--max-model-len", "long"])


def test_a_find_command_is_read_back():
    found = parse_serve_command(
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0,1 uv run vllm serve "
        "Qwen/Qwen2.5-7B-Instruct --tensor-parallel-size 2 --max-model-len 32768 --trust-remote-code"
    )
    assert found.model == "Qwen/Qwen2.5-7B-Instruct" and found.gpu_ids == (0, 1)
    assert found.vllm_cmd == "uv run vllm"
    assert found.args == ("--tensor-parallel-size", "2", "--max-model-len", "32768", "--trust-remote-code")


def test_a_find_command_in_the_server_module_form_is_read_back(tmp_path):
    # find prints the form --vllm-cmd gave it: the module takes --model MODEL, not serve MODEL
    command = (
        "CUDA_VISIBLE_DEVICES=1 /opt/venv/bin/python -m vllm.entrypoints.openai.api_server --model org/m "
        "--max-model-len 8192 --gpu-memory-utilization=0.91 --trust-remote-code"
    )
    result = tmp_path / "found.json"
    result.write_text(json.dumps({"command": command}))
    found = read_find_result(result)
    assert found.model == "org/m" and found.gpu_ids == (1,)
    assert found.vllm_cmd == "/opt/venv/bin/python -m vllm.entrypoints.openai.api_server"
    assert found.args == ("--max-model-len", "8192", "--trust-remote-code")  # the ramp sets the fraction


def test_the_table_has_a_row_per_step():
    steps = [
        judge_step(outcome("stable", report=report(), kv_cache_tokens=500000), RampPlan(), "soak", soak_s=30),
        judge_step(outcome("failed", "oom_cudagraph_capture"), RampPlan(), "soak", soak_s=30),
    ]
    lines = summary_table(steps)
    assert lines[0].split()[:3] == ["util", "phase", "KV"]
    assert "500,000" in lines[1] and "22.00" in lines[1] and "0.50/1.50" in lines[1] and "pass" in lines[1]
    assert "fail: oom cudagraph capture" in lines[2]


def test_the_environment_fingerprint_is_pinned():
    """An interrupted ramp resumes by this exact string: it must not drift. ramp and find share it (a
    ramp once read the machine from GPU fields no target had, so its machine part was always empty)."""
    spec = SimpleNamespace(serve_name="Qwen/Qwen2.5-7B-Instruct", weights_bytes=15231233024)
    gpu = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_bytes=25265000448)
    vllm = VllmInfo("0.33.0", frozenset())
    assert env_fingerprint(spec, gpu, (0, 1), vllm) == "8fa4ad44075bd578"
    bare = env_fingerprint(SimpleNamespace(serve_name="m"), SimpleNamespace(total_bytes=1), [0], None)
    assert bare == "17c74cf701b72afd"


def test_the_machine_id_from_nvml_tells_two_machines_apart():
    spec = SimpleNamespace(serve_name="Qwen/Qwen2.5-7B-Instruct", weights_bytes=15231233024)
    gpu = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_bytes=25265000448)
    vllm = VllmInfo("0.33.0", frozenset())
    here = env_fingerprint(spec, gpu, (0,), vllm, machine_id="580.1|GPU-a")
    there = env_fingerprint(spec, gpu, (0,), vllm, machine_id="580.1|GPU-b")
    assert len({here, there, env_fingerprint(spec, gpu, (0,), vllm)}) == 3


# -- preemption is a signal: a pool too small for the load climbs ---------------------------------------
def small(u: float) -> StepResult:
    return StepResult(u, "soak", "pool_too_small", PREEMPTIONS, "3 preemption(s) in 4 completed request(s)")


def walk_pools(plan: RampPlan, holds_from: float, fails_from: float = 1.0) -> list[StepResult]:
    """A machine whose pool holds the load from ``holds_from`` up and whose memory runs out from
    ``fails_from`` up: below ``holds_from`` a step preempts with memory to spare."""
    steps: list[StepResult] = []
    for _ in range(40):
        decision = plan.next(steps)
        if isinstance(decision, Stop):
            return steps
        u = decision.utilization
        if decision.phase == "edge":
            steps.append(edge(u))
        elif u >= fails_from:
            steps.append(soak(u, False, HEADROOM))
        else:
            steps.append(soak(u) if u >= holds_from else small(u))
    raise AssertionError("the plan never stopped")


def test_a_start_that_preempts_with_memory_to_spare_climbs_to_the_step_that_holds_the_load():
    plan = RampPlan(start=0.9)
    steps = walk_pools(plan, holds_from=0.915)
    assert [(s.utilization, s.verdict) for s in steps] == [
        (0.9, "pool_too_small"),
        (0.91, "pool_too_small"),
        (0.92, "pass"),
    ]
    assert plan.last_stable(steps).utilization == 0.92 and plan.recommended(steps) == 0.92
    assert "reached the ceiling 0.92: 0.92 is stable" in plan.next(steps).reason
    assert "0.91's pool is too small for the load: one step up" in plan.next(steps[:2]).reason


def test_climbing_past_small_pools_still_stops_at_memory_trouble():
    plan = RampPlan()
    steps = walk_pools(plan, holds_from=0.865, fails_from=0.885)
    assert [s.verdict for s in steps] == ["pool_too_small", "pool_too_small", "pass", "pass", "fail"]
    assert plan.last_stable(steps).utilization == 0.88 and "0.89 failed" in plan.next(steps).reason


def test_no_step_holds_the_load_says_why_and_what_to_change():
    plan = RampPlan(start=0.9)
    steps = walk_pools(plan, holds_from=1.0)
    assert len(steps) == 3 and plan.last_stable(steps) is None
    reason = plan.next(steps).reason
    assert reason.startswith("no step up to the ceiling 0.92 holds the load: at 0.92, 3 preemption(s)")
    assert "lower --max-num-seqs or --max-model-len" in reason
    steps = walk_pools(plan, holds_from=1.0, fails_from=0.915)  # memory runs out before the pool holds it
    assert [s.verdict for s in steps] == ["pool_too_small", "pool_too_small", "fail"]
    reason = plan.next(steps).reason
    assert "0.92 failed" in reason and "0.91 below it is too small for the load" in reason


def test_bisect_climbs_from_a_small_pool_below_the_edge_and_never_steps_down_onto_one():
    plan = RampPlan(strategy="bisect")
    steps = walk_pools(plan, holds_from=0.905)
    assert [(s.utilization, s.verdict) for s in steps if s.phase == "soak"] == [
        (0.91, "pass"),
        (0.92, "pass"),
    ]
    steps = walk_pools(plan, holds_from=0.915)
    assert [(s.utilization, s.verdict) for s in steps if s.phase == "soak"] == [
        (0.91, "pool_too_small"),
        (0.92, "pass"),
    ]
    steps = walk_pools(plan, holds_from=1.0, fails_from=0.915)
    soaks = [(s.utilization, s.verdict) for s in steps if s.phase == "soak"]
    assert soaks == [(0.91, "pool_too_small"), (0.92, "fail")] and plan.last_stable(steps) is None


def test_preemptions_with_memory_to_spare_are_a_pool_too_small_not_a_failure():
    step = judge_step(outcome("unstable", report=report(preemptions=10)), RampPlan(), "soak", soak_s=30)
    assert step.verdict == "pool_too_small" and step.category == PREEMPTIONS and step.pool_too_small
    assert (
        "10 preemption(s) in 40 completed request(s) (0.25 per request) under load, limit 0" in step.failure
    )
    assert step.as_json()["preemption_rate"] == 0.25
    assert summary_table([step])[1].endswith("pool too small: 0.25 preemptions/request")
    # memory trouble wins: short of headroom and preempting is a failure, not a climb
    both = report(preemptions=10, headroom_bytes={0: GIB // 4})
    failed = judge_step(outcome("unstable", report=both), RampPlan(), "soak", soak_s=30)
    assert failed.verdict == "fail" and failed.category == HEADROOM
    # within the rate, the step holds
    allowed = judge_step(
        outcome("unstable", report=report(preemptions=10)),
        RampPlan(max_preemption_rate=0.25),
        "soak",
        soak_s=30,
    )
    assert allowed.verdict == "pass"
    again = StepResult.from_record(step.to_record())
    assert again == step and again.pool_too_small


def test_a_pool_below_the_soak_load_is_said_and_not_soaked():
    assert pool_shortfall(90944, 4 * 32768, RampPlan()) == (
        "90,944 KV tokens, below the soak load's 131,072 resident tokens: not soaked"
    )
    assert pool_shortfall(131072, 4 * 32768, RampPlan()) == ""
    assert pool_shortfall(None, 4 * 32768, RampPlan()) == ""
    assert pool_shortfall(90944, 4 * 32768, RampPlan(max_preemption_rate=0.1)) == ""  # the soak measures it
    step = judge_step(
        outcome("boots", kv_cache_tokens=90944), RampPlan(), "soak", soak_s=30, resident_tokens=131072
    )
    assert step.verdict == "pool_too_small" and step.category == POOL_TOO_SMALL
    assert step.soak_elapsed_s is None and "below the soak load's 131,072 resident tokens" in step.failure
    assert summary_table([step])[1].endswith("pool too small: not soaked")
    unsoaked = judge_step(
        outcome("boots", kv_cache_tokens=200000), RampPlan(), "soak", resident_tokens=131072
    )
    assert unsoaked.verdict == "fail" and unsoaked.failure == "booted but was not soaked"
