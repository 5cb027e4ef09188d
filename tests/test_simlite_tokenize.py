"""The simulator's ``/tokenize`` as vLLM 0.32 serves it, and its counts agreeing with what it generates from."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx

from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite.tokenize import answer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How long is a piece of string? " * 5},
    {"role": "assistant", "content": "Twice half its length."},
    {"role": "user", "content": "ok"},
]


def test_messages_form_applies_the_template_and_adds_the_generation_prompt():
    status, body = answer({"model": "chat", "messages": CHAT}, "chat", 4096)
    assert status == 200
    texts = [max(1, len(m["content"]) // 4) for m in CHAT]
    assert body["count"] == sum(texts) + 4 * len(CHAT) + 2
    assert len(body["tokens"]) == body["count"] and body["max_model_len"] == 4096
    assert body["token_strs"] is None
    _, without = answer({"messages": CHAT, "add_generation_prompt": False}, "chat", 4096)
    assert without["count"] == body["count"] - 2
    assert without["tokens"] == body["tokens"][:-2]


def test_prompt_form_counts_four_characters_a_token_and_returns_the_pieces():
    status, body = answer({"prompt": "abcdefghij", "return_token_strs": True}, "chat", 512)
    assert status == 200
    assert body["count"] == 2 and body["token_strs"] == ["abcd", "efghij"]
    assert answer({"prompt": ""}, "chat", 512)[1]["count"] == 1
    # the same text, the same ids
    assert answer({"prompt": "abcdefgh"}, "chat", 512)[1]["tokens"][0] == body["tokens"][0]


def test_an_over_long_input_is_counted_not_refused():
    status, body = answer({"prompt": "x" * 40_000}, "chat", 512)
    assert status == 200 and body["count"] == 10_000 and body["max_model_len"] == 512


def test_errors_in_vllms_shape():
    status, body = answer({"model": "other", "prompt": "hi"}, "chat", 512)
    assert status == 404
    assert body == {
        "error": {
            "message": "The model `other` does not exist. Valid aliases: chat.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    for bad in (
        {},
        {"prompt": 3},
        [1, 2],
        {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
    ):
        status, body = answer(bad, "chat", 512)
        assert status == 400 and body["error"]["type"] == "BadRequestError" and body["error"]["code"] == 400


def test_the_served_tokenize_counts_what_the_server_generates_from(sim, sim_server, tmp_path: Path):
    env = sim("rtx-5090")
    config = ServeConfig("qwen2.5-7b", max_model_len=256, extra_args=("--served-model-name", "chat"))
    with sim_server(env, config, tmp_path / "server.log") as server:
        url = server.base_url
        counted = httpx.post(f"{url}/tokenize", json={"model": "chat", "messages": CHAT}).json()
        served = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "chat", "messages": CHAT, "max_tokens": 2}
        )
        assert served.json()["usage"]["prompt_tokens"] == counted["count"]
        assert counted["max_model_len"] == 256
        text = "the quick brown fox " * 9
        counted = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()
        served = httpx.post(f"{url}/v1/completions", json={"model": "chat", "prompt": text, "max_tokens": 2})
        assert served.json()["usage"]["prompt_tokens"] == counted["count"]

        # over-long: counted by /tokenize, refused by generation with vLLM's 400
        long_chat = [{"role": "user", "content": "word " * 400}]
        counted = httpx.post(f"{url}/tokenize", json={"messages": long_chat}).json()
        assert counted["count"] > 256
        refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "chat", "messages": long_chat})
        assert refused.status_code == 400
        assert refused.json() == {
            "error": {
                "message": "This model's maximum context length is 256 tokens. However, your prompt contains "
                f"{counted['count']} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        }
        assert httpx.post(f"{url}/tokenize", content=b"{not json").status_code == 400


def test_the_server_answers_without_waiting_for_a_delayed_ack(sim, sim_server, tmp_path: Path):
    """TCP_NODELAY, as vLLM's asyncio server has it: headers and body go out at once, not 40 ms apart."""
    env = sim("rtx-5090")
    config = ServeConfig("qwen2.5-7b", max_model_len=256, extra_args=("--served-model-name", "chat"))
    with sim_server(env, config, tmp_path / "server.log") as server, httpx.Client() as client:
        took = []
        for _ in range(11):
            started = time.perf_counter()
            client.post(f"{server.base_url}/tokenize", json={"prompt": "hello"}).raise_for_status()
            took.append(time.perf_counter() - started)
        assert statistics.median(took) < 0.025, took
