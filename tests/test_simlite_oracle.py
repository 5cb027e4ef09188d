"""The simulator's pure parts: vLLM's argument parsing, GPU selection, the memory model and the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.simlite import groundtruth, oracle
from vllm_tuner.simlite.activate import create, load_scenario_file, resolve, scenario_names
from vllm_tuner.simlite.state import live_procs, remove_proc, write_proc

MODEL = "qwen2.5-7b"


def parsed(*argv: str):
    return oracle.parse([MODEL, *argv])


@pytest.mark.parametrize(
    ("argv", "attr", "expected"),
    [
        (["--enforce-eager"], "enforce_eager", True),
        (["--no-enforce-eager"], "enforce_eager", False),
        (["--enable-prefix-caching"], "enable_prefix_caching", True),
        (["--disable-prefix-caching"], "enable_prefix_caching", False),
        (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
        (["--disable-log-stats"], "disable_log_stats", True),
        (["--max_num_seqs", "8"], "max_num_seqs", 8),  # _ and - are the same
        (["--max-num-s", "8"], "max_num_seqs", 8),  # argparse's unique-prefix abbreviation
        (["--kv-cache-memory", "20G"], "kv_cache_memory_bytes", 20 << 30),  # vLLM's own suggestion form
        (["--max-model-len", "32k"], "max_model_len", 32000),
        (["--max-model-len", "1K"], "max_model_len", 1024),
        (["--max-model-len", "25.6k"], "max_model_len", 25600),
        (["--max-model-len", "auto"], "max_model_len", -1),
        (["--max-model-len", "-1"], "max_model_len", -1),
        (["-O0"], "optimization_level", 0),
        (["-O", "3"], "optimization_level", 3),
        (["-tp", "2"], "tensor_parallel_size", 2),
        (["-cc.cudagraph_mode=NONE"], "compilation_config", '{"cudagraph_mode": "NONE"}'),
    ],
)
def test_parser_behaves_like_vllms(argv, attr, expected):
    assert getattr(parsed(*argv), attr) == expected


@pytest.mark.parametrize("flag", [["--swap-space", "4"], ["--calculate-kv-scales"], ["--bogus"]])
def test_unknown_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as caught:
        parsed(*flag)
    assert caught.value.code == 2
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def test_config_file_gives_flags_cli_wins(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: qwen2.5-7b\nmax-model-len: 8192\nenforce-eager: true\nmax-num-seqs: 4\n")
    args = oracle.parse(["--config", str(path), "--max-num-seqs", "16"])
    assert (args.model_tag, args.max_model_len, args.enforce_eager, args.max_num_seqs) == (
        MODEL,
        8192,
        True,
        16,
    )


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--gpu-memory-utilization", "1.2"], "Input should be less than or equal to 1"),
        (
            ["--kv-cache-dtype", "fp4"],
            "ValueError: Invalid kv_cache_dtype: 'fp4'. Valid values are: ['auto',",
        ),
        (
            ["--max-num-seqs", "64", "--max-num-batched-tokens", "32"],
            "max_num_batched_tokens (32) must be greater than or equal to max_num_seqs (64).",
        ),
        (["--max-model-len", "40000"], "User-specified max_model_len (40000) is greater than the derived"),
        (["-tp", "4"], "World size (4) is larger than the number of available GPUs (2) in this node."),
    ],
)
def test_config_errors_carry_vllms_text(argv, text):
    scenario = resolve(load_scenario_file("rtx-5090"))
    with pytest.raises(oracle.ConfigError) as caught:
        oracle.prepare(parsed(*argv), scenario)
    assert text in str(caught.value)


def test_gpus_come_from_cuda_visible_devices_and_device_ids():
    scenario = resolve(load_scenario_file("a100-80g"))
    uuid = scenario["gpus"][3]["uuid"]
    assert oracle.select_gpus(parsed("-tp", "2"), scenario, None) == [0, 1]
    assert oracle.select_gpus(parsed("-tp", "2"), scenario, "2,3") == [2, 3]
    assert oracle.select_gpus(parsed(), scenario, f"{uuid},0") == [3]
    assert oracle.select_gpus(parsed("--device-ids", "1"), scenario, "2,3") == [3]
    with pytest.raises(oracle.ConfigError):
        oracle.select_gpus(parsed("-tp", "2"), scenario, "1")


def test_compilation_switches():
    assert oracle.compilation(parsed()) == (True, True)
    assert oracle.compilation(parsed("--enforce-eager")) == (False, False)
    assert oracle.compilation(parsed("-O0")) == (False, False)
    assert oracle.compilation(parsed("-cc.cudagraph_mode=NONE")) == (True, False)


def test_noise_is_deterministic_and_new_fields_keep_old_numbers():
    model = groundtruth.ModelTruth("m", 28, 3584, 18944, 152064, 57344, False, 4, 15 << 30, 32768)
    args = groundtruth.LaunchArgs(max_model_len=8192, gpu_memory_utilization=0.9)
    # the jitter key is the LaunchArgs repr before the later fields were added
    old_repr = (
        "LaunchArgs(tp=1, pp=1, max_model_len=8192, max_num_seqs=None, max_num_batched_tokens=None, "
        "gpu_memory_utilization=0.9, kv_cache_memory_bytes=None, kv_cache_dtype='auto', enforce_eager=False, "
        "cpu_offload_gb=0.0, block_size=None)"
    )
    assert args.noise_key() == old_repr
    one = groundtruth.boot(model, args, total_bytes=24 << 30, others_bytes=0, gpu_name="x", truth={})
    two = groundtruth.boot(model, args, total_bytes=24 << 30, others_bytes=0, gpu_name="x", truth={})
    assert one == two


def test_the_graph_capture_edge_in_the_oracle():
    scenario = load_scenario_file("rtx-4090")  # raw YAML is accepted too
    base = ["serve", MODEL, "--max-model-len", "8192", "--gpu-memory-utilization"]
    fails = oracle.truth(scenario, [*base, "0.98"], [0])
    boots = oracle.truth(scenario, [*base, "0.97"], [0])
    assert (fails.boots, fails.category) == (False, "oom_cudagraph_capture")
    assert (boots.boots, boots.category) == (True, "success")
    assert boots.kv_cache_tokens > 0 and boots.max_concurrency > 1
    assert boots.survives_load


def test_oracle_spike_starts_fine_and_dies_under_load():
    scenario = load_scenario_file("spike")
    base = [MODEL, "--max-model-len", "8192", "--gpu-memory-utilization"]
    high = oracle.truth(scenario, [*base, "0.9"], [0])
    low = oracle.truth(scenario, [*base, "0.85"], [0])
    assert high.boots and not high.survives_load
    assert high.peak_under_load_bytes > resolve(scenario)["gpus"][0]["total_bytes"]
    assert low.boots and low.survives_load


@pytest.mark.parametrize(
    ("scenario", "argv", "gpus", "category"),
    [
        ("hang", [MODEL], [0], "startup_timeout"),
        ("rtx-4090", [MODEL, "--swap-space", "4"], [0], "unsupported_flag_or_arg_error"),
        ("rtx-4090", ["qwen2.5-14b"], [0], "oom_weights_load"),
        (
            "l40s",
            ["qwen2.5-14b", "--gpu-memory-utilization", "0.9"],
            [0],
            "startup_free_memory_below_utilization",
        ),
        ("rtx-4090", [MODEL, "--gpu-memory-utilization", "0.5"], [0], "no_kv_cache_memory"),
        ("rtx-4090", [MODEL, "--max-num-batched-tokens", "2000000"], [0], "oom_during_profiling"),
        (
            "shared-3090",
            [MODEL, "-tp", "2", "--gpu-memory-utilization", "0.9"],
            [0, 1],
            "startup_free_memory_below_utilization",
        ),
        ("shared-3090", [MODEL, "-tp", "2", "--gpu-memory-utilization", "0.7"], [0, 1], "success"),
        ("rtx-5090", [MODEL, "-tp", "2", "--max-model-len", "32768"], [0, 1], "success"),
        ("a100-80g", ["llama-3.1-70b", "-tp", "4", "--max-model-len", "8192"], [0, 1, 2, 3], "success"),
    ],
)
def test_oracle_categories(scenario, argv, gpus, category):
    assert oracle.truth(load_scenario_file(scenario), argv, gpus).category == category


def test_sampler_oom_is_a_profiling_failure():
    model = groundtruth.ModelTruth("m", 28, 3584, 18944, 152064, 57344, False, 4, 15 << 30, 32768)
    args = groundtruth.LaunchArgs(max_model_len=4096, max_num_seqs=20000, max_num_batched_tokens=20000)
    b = groundtruth.boot(model, args, total_bytes=24 << 30, others_bytes=0, gpu_name="x", truth={})
    assert b.category == "oom_during_profiling"
    assert b.fail_detail["stage"] == "sampler"


def test_auto_fit_reduces_max_model_len_to_what_one_request_fits():
    scenario = load_scenario_file("rtx-4090")
    full = oracle.truth(scenario, [MODEL, "--max-model-len", "auto"], [0])
    reduced = oracle.truth(
        scenario, [MODEL, "--max-model-len", "auto", "--gpu-memory-utilization", "0.68"], [0]
    )
    assert full.max_concurrency > 1
    # auto-fit sizes one request to the pool less the null block; vLLM's capacity counts the whole pool
    assert 1.0 < reduced.max_concurrency < 1.01 and 0 < reduced.kv_cache_tokens < 32768


def test_the_null_block_as_vllm_keeps_it():
    """vLLM 0.3x (kv_cache_utils.py): check_enough_kv_cache_memory and auto-fit plan against the pool less
    one block (BlockPool's null block), the capacity it logs divides the whole pool."""
    scenario = load_scenario_file("rtx-pro-6000")
    block = 16 * 131072  # mistral-7b: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes per token
    argv = ["mistral-7b", "--max-model-len", "32768", "--max-num-seqs", "1"]
    one_request = oracle.truth(scenario, [*argv, "--kv-cache-memory-bytes", str(2048 * block)], [0])
    assert one_request.category == "kv_cache_insufficient_for_max_len"
    resolved = resolve(scenario)
    prepared = oracle.prepare(
        oracle.parse([*argv, "--kv-cache-memory-bytes", str(2048 * block)]), resolved, "0"
    )
    gpu = resolved["gpus"][0]
    boot = groundtruth.boot(
        prepared.model,
        prepared.launch,
        total_bytes=int(gpu["total_bytes"]),
        others_bytes=0,
        gpu_name=str(gpu["name"]),
        truth=prepared.truth,
    )
    assert boot.estimated_max_len == 32752  # vLLM's "the estimated maximum model length is 32752"
    with_null = oracle.truth(scenario, [*argv, "--kv-cache-memory-bytes", str(2049 * block)], [0])
    assert with_null.boots
    assert with_null.kv_cache_tokens == 2049 * 16 and with_null.max_concurrency == 2049 / 2048


def test_estimates_are_off_both_ways():
    """estimate-low / estimate-high hide overheads that move the true KV pool away from vLLM's defaults."""
    argv = [MODEL, "--max-model-len", "8192", "--gpu-memory-utilization", "0.9"]
    plain = oracle.truth(load_scenario_file("rtx-4090"), argv, [0]).kv_cache_tokens
    low = oracle.truth(load_scenario_file("estimate-low"), argv, [0]).kv_cache_tokens
    high = oracle.truth(load_scenario_file("estimate-high"), argv, [0]).kv_cache_tokens
    assert 1.08 < low / plain < 1.25
    assert 0.75 < high / plain < 0.92


def test_unknown_scenario_lists_the_names(tmp_path):
    with pytest.raises(UsageError) as caught:
        create("no-such-rig", state_dir=tmp_path)
    assert "rtx-5090" in str(caught.value)
    for name in ("rtx-5090", "rtx-4090", "rtx-3090", "h100", "a100-80g", "rtx-pro-6000", "l40s", "hang"):
        assert name in scenario_names()


def test_create_merges_overrides_and_builds_the_environment(tmp_path):
    env = create(
        "rtx-5090", state_dir=tmp_path / "s", time_scale=50, overrides={"foreign": [{"gpu": 1, "gib": 2}]}
    )
    # what the simulated vLLM reads from its environment; no shim on its import path (it reads no NVML)
    assert env.env == {"VLLM_TUNE_SIM_STATE": str(tmp_path / "s"), "VLLM_TUNE_SIM_TIME_SCALE": "50"}
    assert env.vllm_cmd.endswith("-m vllm_tuner.simlite")
    assert env.scenario["foreign"] == [{"gpu": 1, "bytes": 2 << 30, "pid": 4242}]
    assert len(env.scenario["gpus"]) == 2 and env.scenario["gpus"][0]["total_bytes"] > 31 << 30


def test_a_machine_that_servers_still_run_on_is_joined_not_reset(tmp_path):
    folder = tmp_path / "s"
    create("rtx-5090", state_dir=folder)
    write_proc(folder, os.getpid(), {0: 5 << 30})  # a simulated server still running (this process)
    (folder / "foreign.json").write_text("[]")  # its scripted co-tenant already released
    create("rtx-5090", state_dir=folder)  # a second tuner or deployment on the same simulated machine
    assert live_procs(folder) == {os.getpid(): {0: 5 << 30}}
    assert (folder / "foreign.json").read_text() == "[]"
    with pytest.raises(UsageError) as caught:  # other truths under a running server: refused
        create("rtx-5090", state_dir=folder, overrides={"foreign": [{"gpu": 0, "gib": 1}]})
    assert f"is in use (pids {os.getpid()})" in str(caught.value)
    remove_proc(folder, os.getpid())  # it ended: the next run boots the machine afresh
    env = create("rtx-5090", state_dir=folder, overrides={"foreign": [{"gpu": 0, "gib": 1}]})
    assert live_procs(folder) == {} and not (folder / "foreign.json").exists()
    assert json.loads((folder / "scenario.json").read_text()) == env.scenario


def test_each_simulated_machine_has_its_own_gpu_uuids(tmp_path):
    """The per-GPU lock is machine-wide and keyed by UUID: two simulated machines (two homes, two
    tests) must never share one, two tuners on the same simulated machine must."""
    first = [g["uuid"] for g in create("rtx-5090", state_dir=tmp_path / "a").scenario["gpus"]]
    again = [g["uuid"] for g in create("rtx-5090", state_dir=tmp_path / "a").scenario["gpus"]]
    other = [g["uuid"] for g in create("rtx-5090", state_dir=tmp_path / "b").scenario["gpus"]]
    assert first == again and len(set(first)) == 2
    assert not set(first) & set(other)
    assert all(u.startswith("GPU-5") and len(u) == len("GPU-") + 36 for u in first + other)
    explicit = {"gpus": [{"name": "X", "total_gib": 8, "uuid": "GPU-fixed"}]}
    for folder in ("d", "e"):  # a scenario's own uuid is kept as it is
        env = create("rtx-5090", state_dir=tmp_path / folder, overrides=explicit)
        assert env.scenario["gpus"][0]["uuid"] == "GPU-fixed"


def test_the_simulated_nvml_reports_the_machines_uuid(sim):

    env = sim("rtx-5090")
    assert env.open_nvml().device(1).uuid == env.scenario["gpus"][1]["uuid"]


def test_a_machine_another_tuner_uses_between_its_launches_is_not_booted_afresh(tmp_path):
    """A tuner between two trials has no server running, yet its scripted co-tenant state is its own."""
    folder = tmp_path / "s"
    user = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom vllm_tuner.simlite.activate import create\n"
            f"create('cotenant-release', state_dir={str(folder)!r}); print('in', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout.readline().strip() == "in"
        (folder / "foreign.json").write_text("[]")  # its co-tenant released during its first launch
        create("cotenant-release", state_dir=folder)  # e.g. a --dry-run on the same scenario meanwhile
        assert (folder / "foreign.json").read_text() == "[]"
    finally:
        user.kill()
        user.wait(10)
        user.stdout.close()
    create("cotenant-release", state_dir=folder)  # it has exited: the machine boots afresh
    assert not (folder / "foreign.json").exists()
