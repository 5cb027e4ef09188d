"""`vllm-tune find` end to end against the simulated vLLM, through the same seams real vLLM uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.find import Finder, FindRequest
from vllm_tuner.gpus import resolve_gpus
from vllm_tuner.launch import detect_vllm
from vllm_tuner.models import resolve_model
from vllm_tuner.paths import data_dir, default_db_path
from vllm_tuner.progress import QuietProgress
from vllm_tuner.store import Store

GIB = 1 << 30


def sim_find(env) -> list[str]:
    return ["--vllm-cmd", env.vllm_cmd]


def run_json(capsys, args: list[str]) -> tuple[int, dict]:
    code = main(args)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def test_find_returns_a_stable_config_and_a_ready_command(sim, capsys):
    env = sim("rtx-5090", time_scale=40)
    code, result = run_json(
        capsys, ["find", "--model", "qwen2.5-7b", "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--json"]
    )
    assert code == 0
    assert result["stable"] is True
    assert result["launches"] <= 3
    assert result["command"].startswith(
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0,1"
    )
    assert " serve Qwen/Qwen2.5-7B-Instruct --tensor-parallel-size 2" in result["command"]
    assert result["config"]["--max-model-len"] == 32768
    # the scenario's 0.5 GiB runtime spike makes 0.95 unstable under load: the winner backed off
    assert result["config"]["--gpu-memory-utilization"] < 0.95
    assert any(t["verdict"] == "unstable" for t in result["trials"])
    winner = result["trials"][-1]
    assert winner["verdict"] == "stable" and winner["min_headroom_gib"] >= 1.0
    config_file = Path(result["config_file"])
    assert "max-model-len: 32768" in config_file.read_text()
    # every trial is in the store
    code, history = run_json(capsys, ["history", "--json"])
    assert code == 0 and history


def test_a_config_unstable_only_for_want_of_headroom_is_tried_again_under_a_smaller_headroom(sim, capsys):
    env = sim("rtx-5090", time_scale=200)  # its 0.5 GiB spike leaves 0.61 GiB at 0.95 under load
    args = ["find", "--model", "qwen2.5-7b", "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--json"]
    code, first = run_json(capsys, args)
    assert code == 0 and first["trials"][0]["verdict"] == "unstable"
    top = first["trials"][0]["flags"]
    assert top["--gpu-memory-utilization"] == 0.95 and 0.3 < first["trials"][0]["min_headroom_gib"] < 1.0
    code, smaller = run_json(capsys, [*args, "--headroom", "0.3"])
    assert code == 0 and smaller["config"] == top  # launched again, and enough now
    assert smaller["trials"][0]["duration_s"] > 0 and smaller["launches"] == 1
    code, larger = run_json(capsys, [*args, "--headroom", "1.5"])
    assert code == 0  # a headroom the known trial fell short of: not launched again
    assert larger["trials"][0]["flags"] == top and larger["trials"][0]["duration_s"] == 0
    skipped = larger["trials"][0]
    seen = first["trials"][0]["min_headroom_gib"]  # 0.61 GiB when the sampling catches the spike's peak
    assert skipped["verdict"] == "unstable" and skipped["probe_failure"] == (
        f"{seen:.2f} GiB headroom under load in an earlier run, below the 1.50 GiB required"
    )
    assert larger["config"]["--gpu-memory-utilization"] < 0.95
    main(["find", *args[1:-1], "--headroom", "1.5"])  # on a terminal: the skip says why
    said = capsys.readouterr().err
    # the headroom the first run sampled (0.61 GiB at the spike's peak, a little more when the
    # sampling misses it under a loaded machine), as recorded then
    assert (
        f"known from an earlier run (unstable under load: {seen:.2f} GiB headroom under load in an earlier run"
        in said
    )


def test_context_objective_learns_from_vllms_numbers_on_a_small_card(sim, capsys):
    env = sim("rtx-4090")
    code, result = run_json(
        capsys, ["find", "--model", "llama-3.1-8b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, "--json"]
    )
    assert code == 0 and result["stable"]
    length = result["config"]["--max-model-len"]
    assert 40000 < length < 131072  # KV-limited on 24 GB, computed from the measured pool
    assert result["launches"] <= 4


def test_graph_capture_edge_and_known_failures_are_not_relaunched(sim, capsys):
    # vLLM's CUDA-graph estimate is far below the real pool here: the top utilization dies in capture
    env = sim("rtx-4090", truth={"graph_base_gib": 6.0, "graph_estimate_ratio": 0.3})
    args = [
        "find",
        "--model",
        "qwen2.5-7b",
        "--gpus",
        "1",
        "--vllm-cmd",
        env.vllm_cmd,
        "--util-ceiling",
        "0.98",
        "--objective",
        "concurrency",
        "--min-context",
        "8192",
        "--headroom",
        "0.2",
        "--json",
    ]
    code, first = run_json(capsys, args)
    assert code == 0 and first["stable"]
    failed = [t for t in first["trials"] if t["category"] == "oom_cudagraph_capture"]
    assert failed, "the top utilization should fail in CUDA-graph capture on this scenario"
    top = max(t["flags"]["--gpu-memory-utilization"] for t in failed)
    assert first["config"]["--gpu-memory-utilization"] < top
    # A second search (other headroom: a new run) on the same machine must not launch the known failure again.
    code, second = run_json(capsys, args[:-3] + ["--headroom", "0.25", "--json"])
    assert code == 0
    relaunched = [
        t for t in second["trials"] if t["category"] == "oom_cudagraph_capture" and t["duration_s"] > 0
    ]
    assert not relaunched


class InterruptAfter(QuietProgress):
    def __init__(self, trials: int) -> None:
        self.left = trials

    def done(self, verdict: str, detail: str = "") -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def _finder(env, store, progress, tmp_path, **request) -> Finder:
    from vllm_tuner.estimate import Calibration, estimate

    nvml = env.open_nvml()
    spec = resolve_model("qwen2.5-7b")
    gpu = resolve_gpus(gpus=2, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nvml)
    launcher = env.launcher()
    req = FindRequest(model="qwen2.5-7b", gpu_ids=gpu.ids, tensor_parallel_size=2, **request)
    return Finder(
        req,
        spec=spec,
        gpu=gpu,
        estimate_fn=estimate,
        calibrate_fn=Calibration.from_facts,
        vllm_info=detect_vllm(launcher),
        launcher=launcher,
        nvml=nvml,
        store=store,
        progress=progress,
        log_dir=tmp_path / "logs",
    )


class Phases(QuietProgress):
    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict | None, str]] = []

    def phase(self, phase: str, elapsed_s: float, used_bytes=None, extra: str = "") -> None:
        self.seen.append((phase, elapsed_s, used_bytes, extra))


def test_progress_names_each_phase_with_time_and_memory_through_the_probe(sim, tmp_path):
    env = sim("rtx-5090", time_scale=200)
    progress = Phases()
    with Store.open(tmp_path / "t.db") as store:  # probes of 1.5 s at least: time for a few reports
        _finder(env, store, progress, tmp_path, probe_duration_s=1.5).run()
    names = list(dict.fromkeys(p for p, *_ in progress.seen))
    assert names[0] == "starting" and {"serving", "probing"} <= set(names)  # loading etc. fly by at 200x
    assert names.index("serving") < names.index("probing")
    probing = [(t, used, extra) for p, t, used, extra in progress.seen if p == "probing"]
    later = [(t, used, extra) for t, used, extra in probing if t > 0]
    assert later, "the probe reports while it runs, not only when it starts"
    assert all(set(used) == {0, 1} and min(used.values()) > 10 * GIB for _, used, _ in later)
    assert "done, peak memory" in later[-1][2]


def test_an_interrupted_search_resumes_where_it_stopped(sim, tmp_path):
    env = sim("rtx-5090", time_scale=40)
    with Store.open(tmp_path / "t.db") as store:
        with pytest.raises(KeyboardInterrupt):
            _finder(env, store, InterruptAfter(1), tmp_path).run()
        (run,) = store.runs()
        assert run.status == "interrupted" and run.trial_count == 1
        result = _finder(env, store, QuietProgress(), tmp_path).run()
        assert result.stable
        # the first trial came back from the store and was not launched again; it counts as a launch
        assert len(result.trials) == result.launches and result.trials[0].duration_s > 0
        keys = [t.config.key() for t in result.trials]
        assert len(keys) == len(set(keys))
        assert store.runs()[0].status == "done"


def test_dry_run_launches_nothing(sim, capsys):
    env = sim("rtx-5090")
    code, plan = run_json(
        capsys,
        ["find", "--model", "qwen2.5-7b", "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--dry-run", "--json"],
    )
    assert code == 0
    assert plan["first_candidate"]["--tensor-parallel-size"] == 2
    assert plan["ladder"][0].startswith("max-num-seqs: --min-seqs 1")
    assert [step.split(":")[0] for step in plan["ladder"][3:]] == ["eager", "fp8-kv", "offload"]
    assert plan["estimate_per_gpu"]["kv_pool_gib"] > 10 and plan["estimate_per_gpu"]["weights_gib"] > 5
    code, plan = run_json(
        capsys,
        ["find", "--model", "qwen2.5-7b", "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--dry-run", "--json"]
        + ["--allow", "fp8-kv", "--knob-order", "kv-cache-dtype,offload,enforce-eager"],
    )
    assert plan["ladder"][3:] == [
        "fp8-kv: allowed, used only if needed",
        "offload: only with --allow offload",
    ] + ["eager: only with --allow eager"]
    assert not list((env.state_dir / "procs").glob("*.json")) if (env.state_dir / "procs").exists() else True


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["--model", "qwen2.5-7b", "--util-ceiling", "0.99"], "--util-ceiling"),
        (["--model", "qwen2.5-7b", "--allow", "magic"], "--allow"),
        (["--model", "qwen2.5-7b", "--gpus", "3"], "GPU"),
        (["--model", "qwen2.5-7b", "--context", "4096"], "--seqs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sim, capsys, args, words):
    env = sim("rtx-5090")
    code = main(["find", *args, "--vllm-cmd", env.vllm_cmd])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_missing_vllm_is_one_line(sim, capsys):
    sim("rtx-5090")
    code = main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", "/nonexistent/vllm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not found" in err and len(err.splitlines()) == 1


def test_busy_gpus_are_refused_before_launching(sim, capsys):
    env = sim("l40s", foreign=[{"gpu": 0, "gib": 40.0}])
    code = main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "free" in err and "--gpu-ids" in err


def test_dummy_trials_are_proved_again_on_the_real_weights(sim, capsys):
    env = sim("rtx-4090", time_scale=40)
    code, result = run_json(
        capsys,
        [
            "find",
            "--model",
            "llama-3.1-8b",
            "--gpus",
            "1",
            "--vllm-cmd",
            env.vllm_cmd,
            "--dummy-trials",
            "--json",
        ],
    )
    assert code == 0 and result["stable"]
    assert all(t["flags"].get("--load-format") == "dummy" for t in result["trials"][:-1])
    last = result["trials"][-1]
    assert "--load-format" not in last["flags"] and last["verdict"] == "stable"
    assert "--load-format" not in result["command"]


def test_weights_that_cannot_fit_are_refused_before_any_launch_with_what_would(sim, capsys):
    env = sim("rtx-5090")
    code = main(["find", "--model", "llama-3.1-70b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "weights alone" in err and "quantized" in err
    assert "8 GPUs like these (--gpus 8: TP 8, the smallest that fits)" in err
    assert not (env.state_dir / "procs").exists() or not list((env.state_dir / "procs").iterdir())


def test_two_tuners_never_launch_on_the_same_gpu(sim, capsys):
    from vllm_tuner.gpulock import GpuLock, gpu_lock_keys

    env = sim("rtx-5090")
    nvml = env.open_nvml()
    keys = gpu_lock_keys([(0, nvml.device(0).uuid)])
    with GpuLock(keys):  # another tuner holds GPU 0
        code = main(["find", "--model", "qwen2.5-7b", "--gpus", "2", "--vllm-cmd", env.vllm_cmd])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "GPU" in err and len(err.splitlines()) == 1


def test_no_stable_config_exits_1_with_the_numbers(sim, capsys):
    env = sim("rtx-4090")
    code = main(
        ["find", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", env.vllm_cmd, "--context", "32768"]
        + ["--seqs", "40"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "40 sequence(s) of 32768 tokens" in out and "KV pool holds" in out


def test_negative_headroom_is_refused_in_one_line(capsys):
    assert main(["find", "--model", "qwen2.5-7b", "--headroom", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--headroom must be 0 or more" in err[0]


def test_the_time_budget_cuts_a_trial_short(sim, capsys):
    env = sim("slow-start", time_scale=20)  # its weights load for minutes of simulated time
    started = time.monotonic()
    code, result = run_json(
        capsys,
        ["find", "--model", "qwen2.5-7b", "--gpus", "1", "--time-budget", "3s", "--json", *sim_find(env)],
    )
    assert time.monotonic() - started < 10  # not the trial's own 30-minute readiness timeout
    assert code == 1 and result["reason"] == "stopped by the time budget" and not result["complete"]
    (trial,) = result["trials"]
    assert trial["category"] == "startup_timeout" and 2.5 < trial["duration_s"] < 6


def test_weights_larger_than_the_cards_are_served_with_offload_when_allowed(sim, capsys):
    env = sim("rtx-5090", time_scale=200)  # 70B in bf16: ~66 GiB per GPU at TP 2 on two 32 GB cards
    args = ["find", "--model", "llama-3.1-70b", "--gpus", "2", "--json", *sim_find(env)]
    assert main(args) == 2
    assert "or --allow offload" in capsys.readouterr().err
    code, result = run_json(capsys, [*args, "--allow", "offload"])
    assert code == 0 and result["stable"] and result["launches"] <= 4
    assert result["config"]["--cpu-offload-gb"] > 33  # more than the weights' excess over the card


def test_ctrl_c_stops_every_server_marks_the_run_and_says_how_to_resume():
    # the tuner in a process of its own, as a user runs it: --simulate boots its machine in the data folder
    argv = ["find", "--model", "qwen2.5-7b", "--gpus", "1", "--simulate", "h100", "--sim-time-scale", "5"]
    with subprocess.Popen(
        [sys.executable, "-m", "vllm_tuner", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as on a terminal
    ) as tuner:
        for line in tuner.stderr:  # until vLLM is loading weights
            if "loading" in line:
                break
        tuner.send_signal(signal.SIGINT)
        rest = tuner.stderr.read()
        assert tuner.wait(30) == 130
    assert "interrupted: run the same command again to resume where it stopped" in rest
    assert rest.strip().splitlines()[-1] == "vllm-tune: interrupted; every vLLM it started has been stopped"
    machine = data_dir() / "sim" / "h100"
    assert (machine / "scenario.json").is_file()
    assert not list((machine / "procs").glob("*.json"))  # no simulated server holds memory
    with Store.open(default_db_path()) as store:
        assert [r.status for r in store.runs()] == ["interrupted"]


def test_a_flag_the_installed_vllm_does_not_know_is_refused_before_any_launch(sim, capsys):
    env = sim("h100")
    code = main(["find", "--model", "qwen2.5-7b", "--gpus", "1", *sim_find(env), "--", "--bogus-flag", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "vllm-tune: error: vLLM 0.33.0 does not know --bogus-flag (passed after --); "
        "check its spelling in 'vllm serve --help=all', or drop it"
    )
    assert not (Path(os.environ["VLLM_TUNE_HOME"]) / "logs").exists()


def test_the_same_search_on_other_gpus_keeps_its_own_config_file(sim, capsys):
    args = ["find", "--model", "qwen2.5-7b", "--gpus", "1", "--json"]
    files = {}
    for scenario in ("h100", "a100-80g"):
        env = sim(scenario, time_scale=200)
        code, result = run_json(capsys, [*args, *sim_find(env)])
        assert code == 0 and result["stable"]
        files[scenario] = (Path(result["config_file"]), result["config"]["--max-num-seqs"])
    (h100, h100_seqs), (a100, a100_seqs) = files["h100"], files["a100-80g"]
    assert h100 != a100 and h100.parent != a100.parent
    assert f"max-num-seqs: {h100_seqs}" in h100.read_text()  # not overwritten by the A100's winner
    assert f"max-num-seqs: {a100_seqs}" in a100.read_text()
