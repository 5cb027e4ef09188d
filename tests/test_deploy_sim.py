"""End to end through the CLI against the simulated vLLM and NVML (skipped until the simulator lands)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from vllm_tuner.cli import main
from vllm_tuner.commands.deploy import recorded_simulation
from vllm_tuner.deploy.spec import load_deployment
from vllm_tuner.deploy.state import deployment_states
from vllm_tuner.launch import free_port
from vllm_tuner.paths import profiles_dir

SCENARIO = "rtx-pro-6000"

needs_sim = pytest.mark.skipif(
    not (profiles_dir() / "sim" / f"{SCENARIO}.yaml").is_file(),
    reason=f"simulator scenario profiles/sim/{SCENARIO}.yaml not available yet",
)


def distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:  # distinct free ports: concurrent test runs must not collide
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def deployment_file(tmp_path, count):
    names = ["coder", "general", "helper"][:count]
    ports = distinct_ports(count)
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


# ------------------------------------------------------------- a simulated deployment, CLI run by CLI run

SIM_KEYS = ("VLLM_TUNE_SIM_STATE", "VLLM_TUNE_SIM_TIME_SCALE")


def cli(*args: str) -> subprocess.CompletedProcess:
    """One ``vllm-tune`` run in a fresh process, as a user types it: nothing of an earlier run's
    simulation in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in SIM_KEYS}
    return subprocess.run(
        [sys.executable, "-m", "vllm_tuner", *args], capture_output=True, text=True, env=env, timeout=60
    )


def hints(text: str) -> list[list[str]]:
    """The 'vllm-tune ...' commands a line suggests, as argv after 'vllm-tune'."""
    return [shlex.split(cmd)[1:] for cmd in re.findall(r"'(vllm-tune [^']*)'", text)]


def kill_leftovers(name: str) -> None:
    if deployment_states().path(name).exists():
        for inst in json.loads(deployment_states().path(name).read_text())["instances"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst["pgid"], signal.SIGKILL)


@needs_sim
def test_status_down_and_a_phase_switch_follow_the_deployments_own_simulation_as_hinted(tmp_path):
    a, b = distinct_ports(2)
    path = tmp_path / "hinted.yaml"
    path.write_text(
        "name: hinted\ngpus: {count: 1}\nphases: [first, second]\nmodels:\n"
        f"  - {{name: one, model: qwen2.5-7b, port: {a}, phase: first, needs: {{min_context: 4096}}}}\n"
        f"  - {{name: two, model: qwen2.5-7b, port: {b}, phase: second, needs: {{min_context: 4096}}}}\n"
    )
    try:
        up = cli("up", str(path), "--simulate", SCENARIO, "--sim-time-scale", "1000")
        assert up.returncode == 0, up.stderr
        status_hint, down_hint = hints(up.stdout.splitlines()[-1])
        assert status_hint == ["status", "hinted"] and down_hint == ["down", "hinted"]

        again = cli("up", str(path))  # the deployment is up: said so, with hints that work as printed
        assert again.returncode == 2
        (error,) = again.stderr.strip().splitlines()
        assert "deployment 'hinted' is already up" in error
        assert hints(error) == [status_hint, down_hint]

        status = cli(*status_hint)
        assert status.returncode == 0, status.stderr
        assert "Deployment hinted  phase first: healthy" in status.stdout
        row = status.stdout.splitlines()[3].split()
        assert row[:2] == ["one", "healthy"] and float(row[4]) > 1  # its memory, read on its simulation

        for wrong in (["status", "hinted"], ["up", str(path), "--phase", "second"]):
            refused = cli(*wrong, "--simulate", "h100")
            assert refused.returncode == 2
            assert refused.stderr.strip() == (
                "vllm-tune: error: deployment 'hinted' was started with --simulate rtx-pro-6000, not h100; "
                "drop --simulate: the deployment's own simulation is used"
            )

        switch = cli("up", str(path), "--phase", "second")
        assert switch.returncode == 0, switch.stderr
        assert "switched to phase second" in switch.stdout

        down = cli(*down_hint)
        assert down.returncode == 0, down.stderr
        assert down.stdout.splitlines() == ["two: stopped", "GPU memory: released"]
        assert not deployment_states().path("hinted").exists()
    finally:
        kill_leftovers("hinted")


def test_a_deployment_on_real_gpus_refuses_simulate_and_an_older_state_file_names_its_simulation(capsys):
    instance = {
        "name": "a",
        "pid": 1,
        "pgid": 1,
        "port": 8001,
        "gpu_ids": [0],
        "argv": ["/venv/bin/python", "-m", "vllm_tuner.simlite", "serve", "Qwen/Qwen2.5-7B-Instruct"],
        "env": {"CUDA_VISIBLE_DEVICES": "0"},
        "log_path": "a.log",
        "proc_start": "1",
        "started_at": 0,
    }
    deployment_states().path("real").parent.mkdir(parents=True)
    deployment_states().path("real").write_text(
        json.dumps(
            {
                "name": "real",
                "source": "r.yaml",
                "started_at": 0,
                "baseline_used": {},
                "instances": [instance],
            }
        )
    )
    assert main(["status", "real", "--simulate", SCENARIO]) == 2
    assert capsys.readouterr().err.strip() == (
        "vllm-tune: error: deployment 'real' runs on real GPUs (it was started without --simulate), "
        f"not on --simulate {SCENARIO}; drop --simulate"
    )
    assert recorded_simulation(deployment_states().load("real")) == {}

    # written before 'simulation' was recorded: the simulator's state folder is in the instances' env
    instance["env"].update(VLLM_TUNE_SIM_STATE="/home/u/.local/share/vllm-tune/sim/h100", PYTHONPATH="/shim")
    deployment_states().path("old").write_text(
        json.dumps(
            {"name": "old", "source": "o.yaml", "started_at": 0, "baseline_used": {}, "instances": [instance]}
        )
    )
    assert recorded_simulation(deployment_states().load("old")) == {
        "scenario": "h100",
        "state_dir": "/home/u/.local/share/vllm-tune/sim/h100",
        "vllm_cmd": "/venv/bin/python -m vllm_tuner.simlite",
        "env": {"VLLM_TUNE_SIM_STATE": "/home/u/.local/share/vllm-tune/sim/h100", "PYTHONPATH": "/shim"},
    }
    assert main(["down", "old", "--simulate", "rtx-4090"]) == 2
    assert "was started with --simulate h100, not rtx-4090" in capsys.readouterr().err


@needs_sim
@pytest.mark.parametrize(("held_on", "tune"), [("0.0.0.0", []), ("127.0.0.1", ["--tune"])])
def test_a_port_another_process_holds_is_refused_before_anything_starts(tmp_path, capsys, held_on, tune):
    path = deployment_file(tmp_path, 2)
    port = load_deployment(path).model("general").port
    with socket.socket() as holder:  # another program serving on general's port
        holder.bind((held_on, port))
        holder.listen()
        code = main(["up", str(path), *tune, "--simulate", SCENARIO, "--sim-time-scale", "1000"])
    out = capsys.readouterr()
    assert code == 2
    assert out.err.strip().splitlines()[-1] == (
        f"vllm-tune: error: port {port} of general cannot be bound on 0.0.0.0 (Address already in use); "
        f"nothing was started; change general's port: in {path}, or stop what holds port {port}"
    )
    assert "tuning" not in out.err and "starting" not in out.err
    assert not deployment_states().path("sim-pair").exists()


@pytest.mark.parametrize(
    ("phases", "said"),
    [
        (
            "",
            "deployment 'sim-pair' has no phases, so --phase nope has nothing to load; "
            "drop --phase (a 'phases:' list and each model's 'phase:' in the file define phases)",
        ),
        ("phases: [embed]\n", "sim-pair has no phase 'nope'; use one of embed"),
    ],
)
def test_an_unknown_phase_is_refused_before_anything_runs(tmp_path, capsys, phases, said):
    path = tmp_path / "d.yaml"
    phase = ", phase: embed" if phases else ""
    path.write_text(
        f"name: sim-pair\ngpus: {{count: 1}}\n{phases}models:\n"
        f"  - {{name: a, model: qwen2.5-7b, port: 8001{phase}}}\n"
    )
    assert main(["up", str(path), "--phase", "nope", "--simulate", SCENARIO]) == 2
    assert capsys.readouterr().err.strip() == f"vllm-tune: error: {said}"


@needs_sim
@pytest.mark.parametrize(
    ("name", "scenario", "tune"),
    [
        ("pair-7b-96gb", "rtx-pro-6000", ["--tune"]),
        ("coder-general-96gb", "rtx-pro-6000", []),
        ("four-7b-on-2-gpus", "a100-80g", []),
        ("rag-16gb-phased", "rtx-4080", []),
    ],
)
def test_the_example_deployments_run_on_the_scenarios_docs_name(tmp_path, capsys, name, scenario, tune):
    """docs/deploy.md's table: these examples start, are healthy and stop on the simulator (on free
    ports here, so that a concurrent run does not collide with the files' fixed ones)."""
    data = yaml.safe_load((profiles_dir() / "deployments" / f"{name}.yaml").read_text())
    for model, port in zip(data["models"], distinct_ports(len(data["models"])), strict=True):
        model["port"] = port
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        assert main(["plan", str(path)]) == 0
        up = ["up", str(path), *tune, "--simulate", scenario, "--sim-time-scale", "1000", "--json"]
        assert main(up) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["status", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["healthy"]
        assert main(["down", name, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["gpu_memory"] == "released"
    finally:
        kill_leftovers(name)


@needs_sim
def test_a_second_deployment_on_the_same_simulated_card_sees_the_first_one(tmp_path):
    """Two deployments started with the same --simulate share one simulated machine, as two on one
    real card do: the second is planned around the first's memory and the first keeps running."""
    names = ("left", "right")
    for name, port in zip(names, distinct_ports(2), strict=True):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\ngpus: {{count: 1}}\nheadroom: 1GiB\nmodels:\n"
            f"  - {{name: m, model: qwen2.5-7b, port: {port}, needs: {{min_context: 8192, min_seqs: 2, objective: fixed}}}}\n"
        )
    try:
        first = cli("up", str(tmp_path / "left.yaml"), "--simulate", SCENARIO, "--sim-time-scale", "1000")
        assert first.returncode == 0, first.stderr
        alone = json.loads(cli("status", "left", "--json").stdout)
        second = cli("up", str(tmp_path / "right.yaml"), "--simulate", SCENARIO, "--sim-time-scale", "1000")
        assert second.returncode == 0, second.stderr
        both = json.loads(cli("status", "left", "--json").stdout)
        assert both["healthy"] and both["instances"][0]["used_bytes"] == alone["instances"][0]["used_bytes"]
        right = json.loads(cli("status", "right", "--json").stdout)
        assert right["healthy"]
        left_used = sum(alone["instances"][0]["used_bytes"].values())
        right_used = sum(right["instances"][0]["used_bytes"].values())
        assert right["gpus"][0]["used_bytes"] >= left_used + right_used  # one card holds both
        assert (
            deployment_states().load("right").baseline_used["0"] >= left_used
        )  # 'right' was planned around 'left'
        for name in reversed(names):
            down = cli("down", name)
            assert down.returncode == 0, down.stderr
    finally:
        for name in names:
            kill_leftovers(name)


def test_a_state_file_that_names_its_simulation_simulation_is_read_as_attach():
    """State files written before the record was named ``attach`` (the deploy code does not know it is a
    simulation; only the CLI's --simulate wiring reads it) still reach their simulated machine."""
    from vllm_tuner.deploy.state import DeploymentState

    sim = {"scenario": "h100", "state_dir": "/s/h100", "vllm_cmd": "python -m vllm_tuner.simlite", "env": {}}
    old = {"name": "o", "source": "o.yaml", "started_at": 0, "baseline_used": {}, "simulation": sim}
    state = DeploymentState.from_json(json.dumps(old))
    assert state.attach == sim and recorded_simulation(state) == sim
    assert "simulation" not in json.loads(state.to_json()) and json.loads(state.to_json())["attach"] == sim
