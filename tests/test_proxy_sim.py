"""``vllm-tune proxy`` end to end in front of two simulated vLLM servers: routing, streaming, a
conversation three times the context that goes through compressed, vLLM's 400 for a message that cannot
fit, and 50 concurrent streamed chats with no error and no stream mixed up."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest
from proxy_running import run_proxy

from vllm_tuner.launch import ServerProcess
from vllm_tuner.logparse import LogWatcher
from vllm_tuner.probe import parse_metrics
from vllm_tuner.serveconfig import ServeConfig

CHAT_LEN, CODER_LEN = 1024, 2048


@pytest.fixture
def two_servers(sim, tmp_path: Path):
    """``chat`` (max-model-len 1024) on GPU 0 and ``coder`` (2048) on GPU 1 of a simulated 2x RTX 5090."""
    env = sim("rtx-5090")
    with contextlib.ExitStack() as stack:
        urls = []
        for gpu, (name, max_len) in enumerate((("chat", CHAT_LEN), ("coder", CODER_LEN))):
            config = ServeConfig(
                "qwen2.5-7b", max_model_len=max_len, extra_args=("--served-model-name", name)
            )
            server = ServerProcess(
                env.launcher(),
                config,
                gpu_ids=[gpu],
                log_path=tmp_path / f"{name}.log",
                watcher=LogWatcher(),
                grace_s=3.0,
                release_timeout_s=5.0,
            )
            stack.enter_context(server)
            assert server.wait_ready(timeout_s=30, stall_s=10).ready, (tmp_path / f"{name}.log").read_text()[
                -2000:
            ]
            urls.append(server.base_url)
        yield urls


def conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a patient tutor."}]
    for n in range(turns):
        messages += [
            {"role": "user", "content": f"Question {n}: " + "why is the sky blue and the sea green? " * 8},
            {"role": "assistant", "content": f"Answer {n}: " + "light scatters off small things. " * 8},
        ]
    return messages + [{"role": "user", "content": "Summing up, what did we learn?"}]


def sse_events(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_routes_by_model_streams_and_refuses_an_unknown_one(two_servers):
    chat_url, coder_url = two_servers
    with run_proxy(chat_url, coder_url) as proxy:
        models = httpx.get(f"{proxy.url}/v1/models").json()["data"]
        assert {(m["id"], m["max_model_len"]) for m in models} == {("chat", CHAT_LEN), ("coder", CODER_LEN)}
        assert httpx.get(f"{proxy.url}/health").json()["upstreams"] == {
            chat_url: "healthy",
            coder_url: "healthy",
        }

        for model in ("chat", "coder"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            done = httpx.post(f"{proxy.url}/v1/chat/completions", json=body).json()
            assert done["model"] == model and done["usage"]["completion_tokens"] == 5
            with httpx.stream(
                "POST", f"{proxy.url}/v1/chat/completions", json={**body, "stream": True}
            ) as streamed:
                assert streamed.headers["content-type"].startswith("text/event-stream")
                events = sse_events(streamed.iter_lines())
            assert events[-1] == "[DONE]" and len(events) == 6
            assert all(json.loads(e)["choices"][0]["delta"]["content"] == " tok" for e in events[:-1])
        done = httpx.post(
            f"{proxy.url}/v1/completions", json={"model": "coder", "prompt": "def f(", "max_tokens": 3}
        )
        assert done.json()["usage"]["completion_tokens"] == 3

        unknown = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"

        # each server answered its own model's requests, nothing else
        for url, expected in ((chat_url, 2), (coder_url, 3)):
            served = parse_metrics(httpx.get(f"{url}/metrics").text)
            assert served["vllm:request_success_total"] == expected


def test_a_conversation_three_times_the_context_goes_through_compressed(two_servers):
    chat_url, coder_url = two_servers
    messages = conversation(24)
    counted = httpx.post(f"{chat_url}/tokenize", json={"model": "chat", "messages": messages}).json()["count"]
    assert counted > 3 * CHAT_LEN
    for strategy in ("trim", "summarize"):
        with run_proxy(chat_url, coder_url, "--compress", strategy) as proxy:
            body = {"model": "chat", "messages": messages, "max_tokens": 64}
            done = httpx.post(f"{proxy.url}/v1/chat/completions", json=body)
            assert done.status_code == 200, done.text
            note = done.headers["x-vllm-tune-compressed"]
            assert note.startswith(f"{counted}->")
            after = int(note.split("->")[1].split(" tokens")[0])
            assert done.json()["usage"]["prompt_tokens"] == after <= CHAT_LEN - 64
            assert done.json()["usage"]["completion_tokens"] == 64

            with httpx.stream(
                "POST", f"{proxy.url}/v1/chat/completions", json={**body, "stream": True}
            ) as streamed:
                assert streamed.status_code == 200
                assert streamed.headers["x-vllm-tune-compressed"] == note
                events = sse_events(streamed.iter_lines())
            assert events[-1] == "[DONE]" and len(events) == 65

            metrics = parse_metrics(httpx.get(f"{proxy.url}/metrics").text)
            assert metrics["vllm_tune_proxy_compressed_total"] == 2
            assert metrics["vllm_tune_proxy_compressed_prompt_tokens_before_total"] == 2 * counted
        assert (
            f"chat: compressed a chat {note} ({strategy}, max-model-len {CHAT_LEN}); {chat_url} answered 200"
            in proxy.err
        )
        if strategy == "summarize":
            assert metrics["vllm_tune_proxy_summaries_total"] >= 1
            assert metrics["vllm_tune_proxy_summary_cache_hits_total"] >= 1  # the streamed one reused it


def test_a_message_that_cannot_fit_gets_vllms_400_saying_by_how_much(two_servers):
    chat_url, _ = two_servers
    with run_proxy(chat_url) as proxy:
        messages = [{"role": "user", "content": "far too long " * 400}]
        alone = httpx.post(f"{chat_url}/tokenize", json={"messages": messages}).json()["count"]
        refused = httpx.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 24}
        )
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "input_tokens", 400)
        assert error["message"].startswith(f"This model's maximum context length is {CHAT_LEN} tokens.")
        assert f"{alone + 24 - CHAT_LEN} tokens too many" in error["message"]
        assert parse_metrics(httpx.get(f"{proxy.url}/metrics").text)["vllm_tune_proxy_too_long_total"] == 1


def test_fifty_concurrent_streamed_chats_through_the_proxy(two_servers):
    chat_url, coder_url = two_servers
    with run_proxy(chat_url, coder_url) as proxy:

        async def one(client: httpx.AsyncClient, n: int) -> tuple[str, int, int]:
            model = ("chat", "coder")[n % 2]
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"request {n}"}],
                "max_tokens": 5 + n,  # its own length: a mixed-up stream would not end at it
                "stream": True,
            }
            async with client.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as streamed:
                assert streamed.status_code == 200
                events = sse_events([line async for line in streamed.aiter_lines()])
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all("error" not in c for c in chunks)
            return model, n, len(chunks)

        async def all_of_them():
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(client, n) for n in range(50)))

        before = {url: parse_metrics(httpx.get(f"{url}/metrics").text) for url in two_servers}
        results = asyncio.run(all_of_them())
        assert [tokens for _, n, tokens in results] == [5 + n for n in range(50)]
        for url, model in ((chat_url, "chat"), (coder_url, "coder")):
            after = parse_metrics(httpx.get(f"{url}/metrics").text)
            generated = after["vllm:generation_tokens_total"] - before[url]["vllm:generation_tokens_total"]
            assert generated == sum(tokens for m, _, tokens in results if m == model)
            assert after["vllm:request_success_total"] - before[url]["vllm:request_success_total"] == 25
        metrics = parse_metrics(httpx.get(f"{proxy.url}/metrics").text)
        assert metrics.get("vllm_tune_proxy_upstream_errors_total", 0) == 0
    assert "Traceback" not in proxy.err
