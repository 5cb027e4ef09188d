"""The real-vLLM tier for ``vllm-tune proxy``: two real CPU servers of a tiny Llama with a tokenizer the
test trains itself (``tests/tiny_tokenizer.py``: a byte-level BPE and a ChatML template), so that
``/tokenize`` and chat completions are real. A conversation three times the server's max-model-len goes
through the proxy and gets an answer, streamed and not; a message that cannot fit gets the proxy's 400 in
the shape of vLLM's own; requests are routed across the two servers by model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from proxy_running import run_proxy
from real_vllm import (
    VENV,
    RealVllm,
    free_port,
    start_command,
    stop_group,
    tiny_llama,
    wait_healthy,
    why_not_runnable,
)

from vllm_tuner.probe import parse_metrics

_why = why_not_runnable()
pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(_why is not None, reason=f"real vLLM tier not run: {_why}"),
]

MAX_LEN = {"tiny-a": 256, "tiny-b": 1024}  # tiny-b leaves room to summarise in
# vLLM 0.32 refuses an over-long prompt by its tokens, or first by its characters (more than max-model-len
# times the tokenizer's longest token)
LENGTH_PARAMS = ("input_tokens", "input_text")
KV_BYTES = 256 << 20  # each server's KV pool, set explicitly: two servers beside the test on one node


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    real = RealVllm(home=tmp_path_factory.mktemp("proxy-home"))
    yield real
    try:
        real.assert_nothing_left()
    finally:
        real.close()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny Llama with a real tokenizer: its vocabulary is the tokenizer's."""
    folder = tiny_llama(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat-llama")
    built = subprocess.run(
        [str(VENV / "bin" / "python"), str(Path(__file__).with_name("tiny_tokenizer.py")), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = int(built.stdout.split()[-1])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def servers(real, chat_model, tmp_path_factory):
    """``{served name: base URL}`` of two real vLLM servers of the tiny model, tiny-a and tiny-b, shared
    by the module's tests (each test starts its own proxy; two starts of vLLM cost ~100 s on two cores)."""
    tmp_path = tmp_path_factory.mktemp("proxy-servers")
    started: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        for name, max_len in MAX_LEN.items():
            port = free_port()
            command = (
                f"VLLM_TARGET_DEVICE=cpu {VENV / 'bin' / 'python'} -m vllm.entrypoints.openai.api_server "
                f"--model {chat_model} --served-model-name {name} --max-model-len {max_len} --max-num-seqs 4 "
                f"--kv-cache-memory-bytes {KV_BYTES} --load-format dummy -O0"
            )
            log = tmp_path / f"{name}.log"
            started[name] = (f"http://127.0.0.1:{port}", start_command(command, real, port, log))
            real.captured.append(log)
        for url, proc in started.values():
            wait_healthy(url, proc)
        yield {name: url for name, (url, _proc) in started.items()}
    finally:
        for _url, proc in started.values():
            stop_group(proc)


def conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for n in range(turns):
        messages += [
            {"role": "user", "content": f"Turn {n}: the proxy keeps the context before the limit. " * 3},
            {"role": "assistant", "content": f"Reply {n}: the server answers long prompts quickly. " * 3},
        ]
    return messages + [{"role": "user", "content": "What did the proxy keep?"}]


def count(url: str, model: str, messages: list[dict]) -> int:
    counted = httpx.post(f"{url}/tokenize", json={"model": model, "messages": messages}, timeout=60)
    assert counted.status_code == 200, counted.text
    assert counted.json()["max_model_len"] == MAX_LEN[model]
    return counted.json()["count"]


def test_a_conversation_three_times_max_model_len_gets_an_answer_through_the_proxy(servers):
    for model, strategy in (("tiny-a", "trim"), ("tiny-b", "summarize")):
        url, turns = servers[model], 8
        while (counted := count(url, model, conversation(turns))) <= 3 * MAX_LEN[model]:
            turns += 8
        body = {"model": model, "messages": conversation(turns), "max_tokens": 16}
        direct = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert direct.status_code == 400  # what a client gets without the proxy
        assert direct.json()["error"]["param"] in LENGTH_PARAMS

        with run_proxy(*servers.values(), "--compress", strategy) as proxy:
            done = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=300)
            assert done.status_code == 200, done.text
            note = done.headers["x-vllm-tune-compressed"]
            assert note.startswith(f"{counted}->")
            after = int(note.split("->")[1].split(" tokens")[0])
            # the proxy's exact count is vLLM's own
            assert done.json()["usage"]["prompt_tokens"] == after <= MAX_LEN[model] - 16
            assert done.json()["choices"][0]["message"]["role"] == "assistant"

            stream = {**body, "stream": True}
            with httpx.stream(
                "POST", f"{proxy.url}/v1/chat/completions", json=stream, timeout=300
            ) as streamed:
                assert streamed.status_code == 200
                assert streamed.headers["x-vllm-tune-compressed"] == note
                events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert all("error" not in json.loads(e[len("data: ") :]) for e in events[:-1])
            metrics = parse_metrics(httpx.get(f"{proxy.url}/metrics").text)
        assert metrics["vllm_tune_proxy_compressed_total"] == 2
        if strategy == "summarize":  # the real model wrote the summary; the streamed request reused it
            assert metrics["vllm_tune_proxy_summaries_total"] >= 1
            assert metrics["vllm_tune_proxy_summary_cache_hits_total"] >= 1
            assert "vllm_tune_proxy_summary_failures_total" not in metrics
        assert "Traceback" not in proxy.err


def test_a_message_that_cannot_fit_gets_the_proxys_400_in_vllms_shape(servers):
    url = servers["tiny-a"]
    messages = [{"role": "user", "content": "The cache holds the context today. " * 60}]
    alone = count(url, "tiny-a", messages)
    assert alone > MAX_LEN["tiny-a"]
    body = {"model": "tiny-a", "messages": messages, "max_tokens": 8}
    vllm_says = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()["error"]
    with run_proxy(url) as proxy:
        refused = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=120)
    assert refused.status_code == 400
    proxy_says = refused.json()["error"]
    assert set(proxy_says) == set(vllm_says) == {"message", "type", "param", "code"}
    assert (
        (proxy_says["type"], proxy_says["code"])
        == (vllm_says["type"], vllm_says["code"])
        == ("BadRequestError", 400)
    )
    assert proxy_says["param"] == "input_tokens" and vllm_says["param"] in LENGTH_PARAMS
    assert f"{alone + 8 - MAX_LEN['tiny-a']} tokens too many" in proxy_says["message"]


def test_requests_are_routed_across_two_real_servers(servers):
    with run_proxy(*servers.values()) as proxy:
        listed = {m["id"]: m["max_model_len"] for m in httpx.get(f"{proxy.url}/v1/models").json()["data"]}
        assert listed == MAX_LEN
        assert httpx.get(f"{proxy.url}/health").json()["status"] == "healthy"
        for model in MAX_LEN:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "Hello there."}],
                "max_tokens": 4,
            }
            done = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=120)
            assert done.status_code == 200, done.text
            assert done.json()["model"] == model
            completed = httpx.post(
                f"{proxy.url}/v1/completions",
                json={"model": model, "prompt": "The proxy", "max_tokens": 3},
                timeout=120,
            )
            assert completed.status_code == 200 and completed.json()["model"] == model
        unknown = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "nope", "messages": []})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
