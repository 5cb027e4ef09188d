"""``--simulate`` enters only as values the runtime carries: nothing of the tuner's process changes."""

from __future__ import annotations

import os
import sys

from click.testing import CliRunner

from vllm_tuner.cli import cli
from vllm_tuner.commands._common import build_runtime
from vllm_tuner.paths import data_dir


def _process_state():
    return dict(os.environ), list(sys.path), sys.modules.get("pynvml")


def test_the_runtime_carries_the_simulated_machine_and_the_process_is_untouched(monkeypatch):
    monkeypatch.delenv("VLLM_TUNE_SIM_STATE", raising=False)
    before = _process_state()
    runtime = build_runtime(
        vllm_cmd="vllm", docker_image=None, db=None, json_=True, simulate="rtx-4090", sim_time_scale=50.0
    )
    assert _process_state() == before
    folder = data_dir() / "sim" / "rtx-4090"
    assert runtime.launcher.command_env == {
        "VLLM_TUNE_SIM_STATE": str(folder),
        "VLLM_TUNE_SIM_TIME_SCALE": "50.0",
    }
    assert runtime.launcher.env([0])["VLLM_TUNE_SIM_STATE"] == str(folder)
    with runtime.open_nvml() as nvml:
        assert nvml.device_count() == 1 and "4090" in nvml.device(0).name


def test_estimate_reads_the_simulated_gpus_without_touching_the_process(monkeypatch):
    monkeypatch.delenv("VLLM_TUNE_SIM_STATE", raising=False)
    before = _process_state()
    result = CliRunner().invoke(
        cli, ["estimate", "--model", "qwen2.5-7b", "--simulate", "rtx-4090", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "4090" in result.output
    assert _process_state() == before
