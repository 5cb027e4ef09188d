"""End to end through the CLI against the simulated vLLM and NVML (skipped until the simulator lands)."""

from __future__ import annotations

import json

import pytest

from vllm_tuner.cli import main
from vllm_tuner.launch import free_port
from vllm_tuner.paths import profiles_dir

SCENARIO = "rtx-pro-6000"

needs_sim = pytest.mark.skipif(
    not (profiles_dir() / "sim" / f"{SCENARIO}.yaml").is_file(),
    reason=f"simulator scenario profiles/sim/{SCENARIO}.yaml not available yet",
)


def deployment_file(tmp_path, count):
    names = ["coder", "general", "helper"][:count]
    ports = []
    while len(ports) < count:  # distinct free ports: concurrent test runs must not collide
        port = free_port()
        if port not in ports:
            ports.append(port)
    models = "\n".join(
        f"  - {{name: {n}, model: qwen2.5-7b, served_model_name: {n}, port: {ports[i]}, "
        f"needs: {{min_context: 8192, min_seqs: 4}}}}"
        for i, n in enumerate(names)
    )
    path = tmp_path / "sim.yaml"
    path.write_text(f"name: sim-pair\ngpus: {{count: 1}}\nheadroom: 1GiB\nmodels:\n{models}\n")
    return path


@needs_sim
@pytest.mark.parametrize("count", [2, 3])
def test_models_start_in_order_on_one_simulated_card_and_down_restores_it(
    tmp_path, monkeypatch, capsys, count
):
    pytest.importorskip("vllm_tuner.simlite.activate", reason="simulator not available yet")
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "home"))
    path = deployment_file(tmp_path, count)
    sim = ["--simulate", SCENARIO, "--sim-time-scale", "200"]
    assert main(["up", str(path), "--json", *sim]) == 0
    up = json.loads(capsys.readouterr().out)
    assert len(up["instances"]) == count
    assert main(["status", "sim-pair", "--json", *sim]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["healthy"] and all(i["state"] == "healthy" for i in status["instances"])
    assert main(["down", "sim-pair", "--json", *sim]) == 0
    down = json.loads(capsys.readouterr().out)
    assert down["gpu_memory"] == "released"


def test_a_plan_that_does_not_fit_is_refused_with_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "home"))
    path = tmp_path / "big.yaml"
    path.write_text(
        "name: big\ngpus: {count: 1, profile: rtx-4090}\nmodels:\n"
        "  - {name: a, model: qwen2.5-7b, port: 8001, needs: {min_context: 32768, min_seqs: 16}}\n"
    )
    assert main(["plan", str(path)]) == 2
    out = capsys.readouterr()
    assert "Does not fit" in out.out and "GiB per GPU" in out.out and "What would fit" in out.out
    assert "does not fit" in out.err
