"""``up --proxy PORT`` on the simulator: the proxy starts with the deployment, routes to its models,
shows in ``status``, and ``down`` stops it with the instances; a proxy port in use starts nothing."""

from __future__ import annotations

import json
import os
import signal
import socket

import httpx
from test_deploy_sim import SCENARIO, cli, deployment_file, distinct_ports, kill_leftovers, needs_sim

from vllm_tuner.deploy.state import DeploymentState, ProxyState, deployment_states, is_alive


@needs_sim
def test_up_with_a_proxy_routes_through_it_status_shows_it_and_down_stops_everything(tmp_path):
    path = deployment_file(tmp_path, 2)
    (port,) = distinct_ports(1)
    try:
        up = cli("up", str(path), "--proxy", str(port), "--simulate", SCENARIO, "--sim-time-scale", "1000")
        assert up.returncode == 0, up.stderr
        url = f"http://127.0.0.1:{port}"
        assert f"{url}/v1" in up.stdout
        state = deployment_states().load("sim-pair")
        assert state.proxy is not None and state.proxy.port == port and is_alive(state.proxy)

        for model in ("coder", "general"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model  # each served by its own server: the other 404s it

        status = cli("status", "sim-pair", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["proxy"] == {"url": f"{url}/v1", "port": port, "state": "healthy"}
        table = cli("status", "sim-pair").stdout
        assert any(line.split()[:3] == ["proxy", "healthy", str(port)] for line in table.splitlines())

        down = cli("down", "sim-pair")
        assert down.returncode == 0, down.stderr
        assert down.stdout.splitlines() == [
            "proxy: stopped",
            "general: stopped",
            "coder: stopped",
            "GPU memory: released",
        ]
        assert not is_alive(state.proxy) and not any(is_alive(i) for i in state.instances)
        assert not deployment_states().path("sim-pair").exists()
    finally:
        left = deployment_states().load("sim-pair") if deployment_states().path("sim-pair").exists() else None
        kill_leftovers("sim-pair")
        if left is not None and left.proxy is not None and is_alive(left.proxy):
            os.killpg(left.proxy.pgid, signal.SIGKILL)


@needs_sim
def test_a_proxy_port_in_use_is_one_line_and_starts_nothing(tmp_path):
    path = deployment_file(tmp_path, 2)
    (port,) = distinct_ports(1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        up = cli("up", str(path), "--proxy", str(port), "--simulate", SCENARIO, "--sim-time-scale", "1000")
    assert up.returncode == 2
    assert up.stderr.strip().splitlines() == [
        f"vllm-tune: error: --proxy port {port} cannot be bound on 0.0.0.0 (Address already in use); "
        f"nothing was started; choose another --proxy port, or stop what holds port {port}"
    ]
    assert not deployment_states().path("sim-pair").exists()


def test_a_proxy_port_an_instance_serves_on_is_refused(tmp_path):
    path = deployment_file(tmp_path, 2)
    taken = str(load_deployment_port(path))
    up = cli("up", str(path), "--proxy", taken, "--simulate", SCENARIO)
    assert up.returncode == 2
    assert f"--proxy port {taken} cannot be bound on 0.0.0.0 (coder serves on it)" in up.stderr


def load_deployment_port(path) -> int:
    from vllm_tuner.deploy.spec import load_deployment

    return load_deployment(path).model("coder").port


def test_a_state_file_without_a_proxy_still_loads_and_one_with_it_round_trips():
    old = {"name": "old", "source": "o.yaml", "started_at": 0, "baseline_used": {}, "instances": []}
    assert DeploymentState.from_json(json.dumps(old)).proxy is None
    proxy = ProxyState(pid=5, pgid=5, port=9000, argv=["x"], log_path="p.log", proc_start="1", started_at=0)
    state = DeploymentState("new", "n.yaml", 0, {}, proxy=proxy)
    assert DeploymentState.from_json(state.to_json()).proxy == proxy
