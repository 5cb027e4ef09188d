"""`vllm-tune ramp` end to end against the simulated vLLM (one RTX 4090, Qwen2.5-7B, 4 × 16k)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.gpus import resolve_gpus
from vllm_tuner.models import resolve_model
from vllm_tuner.progress import QuietProgress
from vllm_tuner.ramp import Ramp, RampPlan, RampRequest
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.store import Store
from vllm_tuner.trial import Timeouts
from vllm_tuner.trialrecord import env_fingerprint

GIB = 1 << 30
FLAGS = ["--max-model-len", "16384", "--max-num-seqs", "4"]


def ramp(capsys, env, *args: str) -> tuple[int, dict]:
    argv = ["ramp", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, "--json", *args]
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def test_a_clean_ramp_reaches_the_ceiling_and_hands_back_its_command(sim, capsys, tmp_path):
    env = sim("rtx-4090")
    code, result = ramp(
        capsys, env, "--start", "0.86", "--ceiling", "0.88", "--soak", "1.5s", "--margin", "0.01", *FLAGS
    )
    assert code == 0, result
    assert [s["utilization"] for s in result["steps"]] == [0.86, 0.87, 0.88]
    assert all(s["verdict"] == "pass" and s["failure_category"] is None for s in result["steps"])
    assert result["last_stable"] == 0.88 and result["utilization"] == 0.87
    assert result["command"].endswith(
        "serve Qwen/Qwen2.5-7B-Instruct --max-model-len 16384 --max-num-seqs 4 --gpu-memory-utilization 0.87"
    )
    first, last = result["steps"][0], result["steps"][-1]
    assert last["kv_cache_tokens"] > first["kv_cache_tokens"] > 0
    assert last["peak_memory_gib"]["0"] > first["peak_memory_gib"]["0"]
    assert last["headroom_gib"]["0"] >= 1.0 and last["latency_p99_s"] >= last["latency_p50_s"] > 0
    assert last["requests"] > 4 and last["preemptions"] == 0
    chart = Path(result["chart"]).read_text()
    assert "<svg" in chart and "0.88" in chart
    main(["history", "--json"])
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["kind"] == "ramp" and runs[0]["status"] == "done" and runs[0]["trial_count"] == 3


def test_a_step_that_dies_at_startup_stops_the_ramp_at_the_step_below(sim, capsys):
    # vLLM's CUDA-graph estimate is far below the real pool: 0.90 dies capturing graphs
    env = sim("rtx-4090", truth={"graph_base_gib": 40.66, "graph_estimate_ratio": 0.2})
    code, result = ramp(capsys, env, "--start", "0.89", "--soak", "1s", "--headroom", "0.1", *FLAGS)
    assert code == 0, result
    assert [(s["utilization"], s["verdict"]) for s in result["steps"]] == [(0.89, "pass"), (0.9, "fail")]
    failed = result["steps"][1]
    assert failed["failure_category"] == "oom_cudagraph_capture"
    assert failed["soak_elapsed_s"] is None  # it never got to the soak
    assert result["last_stable"] == 0.89 and result["failure_category"] == "oom_cudagraph_capture"
    assert "--gpu-memory-utilization 0.89" in result["command"]


def test_a_step_that_dies_only_under_load_half_way_through_the_soak(sim, capsys):
    # a 3 GiB runtime spike at full KV usage: at 0.92 the server dies once the 4th worst-case stream
    # joins, which the warm-up schedules half-way through the soak
    env = sim("rtx-4090", truth={"runtime_spike_gib": 3.0})
    code, result = ramp(
        capsys, env, "--start", "0.91", "--soak", "4s", "--warmup", "2.7s", "--headroom", "0", *FLAGS
    )
    assert code == 0, result
    assert [(s["utilization"], s["verdict"]) for s in result["steps"]] == [(0.91, "pass"), (0.92, "fail")]
    died = result["steps"][1]
    assert died["failure_category"] == "oom_at_runtime"
    assert 1.0 < died["soak_elapsed_s"] < 3.8  # booted, soaked a while, died before the end
    assert "died under load after" in died["failure"]
    assert result["last_stable"] == 0.91


def test_a_headroom_violation_ends_the_ramp(sim, capsys):
    env = sim("rtx-4090")
    code, result = ramp(capsys, env, "--start", "0.88", "--soak", "1s", "--headroom", "2.0", *FLAGS)
    assert code == 0, result
    verdicts = [(s["utilization"], s["verdict"]) for s in result["steps"]]
    assert verdicts == [(0.88, "pass"), (0.89, "pass"), (0.9, "fail")]
    failed = result["steps"][-1]
    assert failed["failure_category"] == "headroom_below_minimum"
    assert failed["headroom_gib"]["0"] < 2.0 and "below the 2.00 GiB required" in failed["failure"]
    assert result["last_stable"] == 0.89


def test_bisect_finds_the_startup_edge_then_soaks_below_it(sim, capsys):
    env = sim("rtx-4090", truth={"graph_base_gib": 40.66, "graph_estimate_ratio": 0.2})
    code, result = ramp(
        capsys, env, "--strategy", "bisect", "--start", "0.85", "--soak", "1s", "--headroom", "0.1", *FLAGS
    )
    assert code == 0, result
    edges = [s for s in result["steps"] if s["phase"] == "edge"]
    soaks = [s for s in result["steps"] if s["phase"] == "soak"]
    assert len(edges) <= 4  # log2 of the 8 steps 0.85..0.92, plus one
    assert [s["utilization"] for s in soaks] == [0.88, 0.89]
    assert result["last_stable"] == 0.89 and "startup edge" in result["reason"]


class InterruptDuringSoak(QuietProgress):
    """Ctrl-C in the middle of the n-th soak."""

    def __init__(self, soak_number: int) -> None:
        self.soaks = 0
        self.soak_number = soak_number

    def step(self, title: str, detail: str = "") -> None:
        self.soaks += 1

    def phase(self, phase: str, elapsed_s: float, used_bytes=None, extra: str = "") -> None:
        if phase == "soak" and self.soaks == self.soak_number:
            raise KeyboardInterrupt


def _ramp(env, store, progress, tmp_path, **plan) -> Ramp:
    spec = resolve_model("qwen2.5-7b")
    nvml = env.open_nvml()
    gpu = resolve_gpus(gpus=1, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nvml)
    request = RampRequest(
        model=spec.serve_name,
        gpu_ids=(0,),
        config=ServeConfig(spec.serve_name, max_model_len=16384, max_num_seqs=4),
        plan=RampPlan(**{"start": 0.88, "ceiling": 0.90, "soak_s": 1.0, **plan}),
        timeouts=Timeouts(ready_s=60, stall_s=30),
    )
    return Ramp(
        request,
        env_fingerprint=env_fingerprint(spec, gpu, (0,), None),
        launcher=env.launcher(),
        nvml=nvml,
        store=store,
        progress=progress,
        log_dir=tmp_path / "logs",
    )


def test_an_interrupted_ramp_resumes_at_the_step_it_was_in(sim, tmp_path):
    env = sim("rtx-4090")
    with Store.open(tmp_path / "t.db") as store:
        with pytest.raises(KeyboardInterrupt):
            _ramp(env, store, InterruptDuringSoak(2), tmp_path).run()
        (run,) = store.runs()
        assert run.kind == "ramp" and run.status == "interrupted" and run.trial_count == 1
        result = _ramp(env, store, QuietProgress(), tmp_path).run()
        assert result.complete and result.launches == 2  # 0.88 was not soaked again
        assert [s.utilization for s in result.steps] == [0.88, 0.89, 0.90]
        assert result.last_stable.utilization == 0.90
        assert store.runs()[0].status == "done" and store.runs()[0].trial_count == 3


def test_a_launch_budget_stops_resumably(sim, capsys):
    env = sim("rtx-4090")
    args = ("--start", "0.88", "--ceiling", "0.89", "--soak", "1s", "--max-launches", "1", *FLAGS)
    code, first = ramp(capsys, env, *args)
    assert code == 0 and not first["complete"] and first["last_stable"] == 0.88
    code, second = ramp(capsys, env, *args)
    assert code == 0 and second["complete"] and second["launches"] == 1
    assert [s["utilization"] for s in second["steps"]] == [0.88, 0.89]
    assert second["run_id"] == first["run_id"]


def test_from_find_takes_the_flags_and_gpus(sim, capsys, tmp_path):
    env = sim("rtx-4090")
    found = tmp_path / "found.json"
    found.write_text(
        json.dumps(
            {
                "command": "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0 vllm serve "
                "Qwen/Qwen2.5-7B-Instruct --max-model-len 16384 --max-num-seqs 4 --gpu-memory-utilization 0.93"
            }
        )
    )
    code = main(
        ["ramp", "--from-find", str(found), "--vllm-cmd", env.vllm_cmd, "--json", "--start", "0.88"]
        + ["--ceiling", "0.89", "--soak", "1s"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["last_stable"] == 0.89
    assert "--max-model-len 16384 --max-num-seqs 4 --gpu-memory-utilization 0.89" in result["command"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ceiling", "0.99"], "--ceiling must be in (0, 0.98]"),
        (["--start", "0.93"], "--start must be above 0 and below --ceiling"),
        (["--step", "0"], "--step must be above 0"),
        (["--soak", "soon"], "--soak must be a positive duration"),
        (["--", "--gpu-memory-utilization", "0.9"], "--gpu-memory-utilization is what the ramp sets"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sim, capsys, args, words):
    env = sim("rtx-4090")
    code = main(["ramp", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_a_start_whose_pool_cannot_hold_the_load_climbs_to_a_stable_step(sim, capsys):
    # 7 × 16k = 114,688 tokens resident: the pool holds 104,800 at 0.86 … 113,232 at 0.88, 118,048 at 0.89
    env = sim("rtx-4090")
    flags = ["--max-model-len", "16384", "--max-num-seqs", "7"]
    code, result = ramp(capsys, env, "--start", "0.86", "--ceiling", "0.90", "--soak", "1s", *flags)
    assert code == 0, result
    steps = result["steps"]
    assert [(s["utilization"], s["verdict"]) for s in steps] == [
        (0.86, "pool_too_small"),
        (0.87, "pool_too_small"),
        (0.88, "pool_too_small"),
        (0.89, "pass"),
        (0.9, "pass"),
    ]
    for s in steps[:3]:  # said when the server reported its pool, not soaked
        assert s["kv_cache_tokens"] < 7 * 16384 and s["soak_elapsed_s"] is None
        assert f"below the soak load's {7 * 16384:,} resident tokens" in s["failure"]
    assert steps[3]["kv_cache_tokens"] >= 7 * 16384 and steps[3]["preemption_rate"] == 0
    assert result["last_stable"] == 0.9 and result["failure"] is None
    assert result["command"].endswith("--max-num-seqs 7 --gpu-memory-utilization 0.9")


def test_no_step_that_holds_the_load_ends_at_once_and_says_why(sim, capsys):
    env = sim("rtx-4090")
    argv = ["ramp", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, "--start", "0.90"]
    code = main([*argv, "--soak", "20m", "--max-model-len", "16384", "--max-num-seqs", "9"])
    out = capsys.readouterr().out
    assert code == 1
    rows = [line for line in out.splitlines() if line.strip().startswith("0.9")]
    assert len(rows) == 3 and all(r.endswith("pool too small: not soaked") for r in rows)
    (verdict,) = [line for line in out.splitlines() if line.startswith("✘")]
    assert verdict.startswith("✘ No stable step: no step up to the ceiling 0.92 holds the load: at 0.92, ")
    assert "below the soak load's 147,456 resident tokens" in verdict and "lower --max-num-seqs" in verdict


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-preemption-rate", "-1"], "--max-preemption-rate must be at least 0"),
        (["--max-preemptions", "3"], "--max-preemptions (a count) is replaced by --max-preemption-rate"),
    ],
)
def test_a_bad_preemption_limit_is_one_line_and_exit_2(sim, capsys, args, words):
    env = sim("rtx-4090")
    code = main(["ramp", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, *args, *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
