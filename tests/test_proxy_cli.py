"""``vllm-tune proxy`` as a user runs it: its targets (URLs, a running deployment), bad input as one line
and exit 2, and a client that disconnects cancelling the upstream request."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
from proxy_running import FakeVllm, free_port, run_proxy

from vllm_tuner.cli import main
from vllm_tuner.deploy.state import DeploymentState, InstanceState, deployment_states
from vllm_tuner.proxy.serve import bind, upstream_urls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vllm-tune: error: ")
    return err


def deployment(name: str, ports: list[int]) -> None:
    instances = [
        InstanceState(
            name=f"i{n}",
            pid=1,
            pgid=1,
            port=port,
            gpu_ids=[n],
            argv=[],
            env={},
            log_path="",
            proc_start="",
            started_at=0.0,
        )  # fmt: skip
        for n, port in enumerate(ports)
    ]
    deployment_states().save(
        DeploymentState(name=name, source="duo.yaml", started_at=0.0, baseline_used={}, instances=instances)
    )


def test_the_proxy_is_a_command():
    assert main(["--help"]) == 0
    assert main(["proxy", "--help"]) == 0


def test_an_unknown_deployment_is_one_line_and_exit_2(capsys):
    assert main(["proxy", "no-such-deployment"]) == 2
    assert "no running deployment named 'no-such-deployment'" in one_line_error(capsys)


def test_an_unreachable_upstream_is_one_line_and_exit_2(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["proxy", url, "--port", str(free_port())]) == 2
    err = one_line_error(capsys)
    assert f"upstream {url} did not answer GET /v1/models (ConnectError" in err
    assert "start it, or check the URL" in err


def test_a_port_in_use_is_one_line_and_exit_2(capsys):
    with FakeVllm() as upstream, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["proxy", upstream.url, "--port", str(port)]) == 2
    assert f"port {port} is in use on 127.0.0.1; choose another with --port" in one_line_error(capsys)


def test_a_deployment_is_its_running_instances():
    deployment("duo", [8101, 8102])
    assert upstream_urls(("duo", "http://h:9/v1/")) == [
        "http://127.0.0.1:8101",
        "http://127.0.0.1:8102",
        "http://h:9",
    ]


def test_a_deployment_running_nothing_is_refused(capsys):
    deployment("idle", [])
    assert main(["proxy", "idle"]) == 2
    assert "deployment 'idle' runs no instance" in one_line_error(capsys)


def test_the_proxy_routes_to_a_deployments_instances_and_stops_on_sigterm():
    with FakeVllm(name="slow") as upstream:
        deployment("duo", [upstream.port])
        with run_proxy("duo") as proxy:
            models = httpx.get(f"{proxy.url}/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["slow"]
            assert httpx.get(f"{proxy.url}/health").json()["status"] == "healthy"
        assert proxy.proc.returncode in (0, 130)
    assert f"vllm-tune proxy on {proxy.url}/v1 (compress: trim)" in proxy.out
    assert f"slow  -> {upstream.url} (max-model-len 4096)" in proxy.out
    assert "Traceback" not in proxy.err


def test_a_client_that_disconnects_cancels_the_upstream_request():
    with FakeVllm() as upstream, run_proxy(upstream.url) as proxy:
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=10) as streamed:
            assert streamed.status_code == 200
            events = []
            for line in streamed.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                if len(events) == 3:
                    break
        assert events[2] == 'data: {"choices": [{"index": 0, "delta": {"content": "t2"}}]}'
        assert upstream.wait_for(lambda: upstream.disconnects == 1), (
            "the streamed upstream request was not cancelled"
        )

        body["stream"] = False
        started = time.monotonic()
        try:
            httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=0.5)
        except httpx.ReadTimeout:
            pass
        assert upstream.wait_for(lambda: upstream.disconnects == 2), (
            "the waiting upstream request was not cancelled"
        )
        assert time.monotonic() - started < 5
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert f'vllm_tune_proxy_in_flight{{upstream="{upstream.url}"}} 0.0' in metrics
    assert "Traceback" not in proxy.err


def test_the_proxys_connections_send_without_waiting_for_acks():
    """asyncio sets TCP_NODELAY only on connections of an IPPROTO_TCP socket; without it every response
    the proxy sends in two writes waits 40 ms for the client's delayed ACK."""

    async def accepted_nodelay() -> int:
        sock = bind("127.0.0.1", 0)
        seen: list[int] = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _reader, writer = await asyncio.open_connection(*sock.getsockname())
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()
        return seen[0]

    assert asyncio.run(accepted_nodelay()) == 1
