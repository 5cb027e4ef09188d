"""Fitting one chat: exact counts, plans made tighter until the count fits, summaries cached per prefix,
vLLM's 400 when it cannot fit. The counter is a plain object that counts as the simulator does."""

from __future__ import annotations

import asyncio
import logging

import pytest

from vllm_tuner.proxy.cache import Lru
from vllm_tuner.proxy.context import SUMMARY_HEADER
from vllm_tuner.proxy.fit import ContextKeeper, TooLong
from vllm_tuner.proxy.metrics import ProxyMetrics
from vllm_tuner.proxy.upstream import CountUnavailable, SummaryFailed
from vllm_tuner.simlite.tokenize import answer

MAX_LEN = 1024


class Counter:
    """Counts with the simulator's tokenizer; writes a fixed summary; records what it was asked."""

    def __init__(self, max_len: int = MAX_LEN, *, summary: str | None = "the gist") -> None:
        self.max_len = max_len
        self.summary = summary
        self.chats: list[list[dict]] = []
        self.summaries: list[list[dict]] = []

    async def count_chat(self, url: str, request: dict) -> tuple[int, int]:
        self.chats.append(request["messages"])
        status, body = answer(request, "m", self.max_len)
        assert status == 200
        return body["count"], body["max_model_len"]

    async def count_texts(self, url: str, model: str | None, texts: list[str]) -> list[int]:
        return [answer({"prompt": t}, "m", self.max_len)[1]["count"] if t else 0 for t in texts]

    async def write_summary(self, url: str, model: str, messages: list[dict], max_tokens: int) -> str:
        self.summaries.append(messages)
        if self.summary is None:
            raise SummaryFailed("HTTP 500")
        return self.summary


def keeper(counter, strategy: str = "trim", metrics: ProxyMetrics | None = None) -> ContextKeeper:
    return ContextKeeper(
        counter,
        strategy=strategy,
        summaries=Lru(64),
        metrics=metrics or ProxyMetrics(),
        log=logging.getLogger("test-proxy"),
    )


def conversation(turns: int, words: int = 60) -> list[dict]:
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for n in range(turns):
        messages += [
            {"role": "user", "content": f"question {n}: " + "lorem ipsum " * words},
            {"role": "assistant", "content": f"answer {n}: " + "dolor sit " * words},
        ]
    return messages + [{"role": "user", "content": "and now?"}]


def tokens(messages: list[dict]) -> int:
    return answer({"messages": messages}, "m", MAX_LEN)[1]["count"]


def test_a_chat_that_fits_goes_as_it_came_after_one_count():
    counter = Counter()
    fitted = asyncio.run(
        keeper(counter).fit("u", "m", {"model": "m", "messages": conversation(2), "max_tokens": 64})
    )
    assert fitted.messages is None and fitted.before == fitted.after == tokens(conversation(2))
    assert len(counter.chats) == 1


def test_trim_fits_a_conversation_three_times_the_context():
    messages = conversation(12)
    assert tokens(messages) > 3 * MAX_LEN
    counter = Counter()
    fitted = asyncio.run(
        keeper(counter).fit("u", "m", {"model": "m", "messages": messages, "max_tokens": 100})
    )
    assert fitted.messages is not None and fitted.strategy == "trim"
    assert fitted.after == tokens(fitted.messages) <= MAX_LEN - 100
    assert fitted.before == tokens(messages)
    assert fitted.messages[0] == messages[0] and fitted.messages[-1] == messages[-1]
    assert fitted.messages[-3:] == messages[-3:]  # the newest turn before the question, whole
    assert fitted.note == f"{fitted.before}->{fitted.after} tokens, {fitted.turns} turns"
    assert fitted.turns >= 9


def test_summarize_writes_a_summary_and_a_growing_chat_reuses_it():
    counter = Counter()
    kept = keeper(counter, "summarize")
    messages = conversation(12)
    fitted = asyncio.run(kept.fit("u", "m", {"model": "m", "messages": messages, "max_tokens": 100}))
    assert fitted.strategy == "summarize" and fitted.after <= MAX_LEN - 100
    assert fitted.messages[0]["content"].startswith(messages[0]["content"])
    assert f"{SUMMARY_HEADER}\nthe gist" in fitted.messages[0]["content"]
    first = len(counter.summaries)
    assert first >= 2  # the turns summarised are more than one summarising request holds
    # each summarising request fits the context: the transcript of its chunk and the summary so far
    assert all(tokens(prompt) + 128 <= MAX_LEN for prompt in counter.summaries)
    assert "Summary so far:\nthe gist" in counter.summaries[-1][1]["content"]

    grown = messages[:-1] + [
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "nothing more " * 40},
        {"role": "user", "content": "really?"},
    ]
    metrics = kept.metrics
    fitted = asyncio.run(kept.fit("u", "m", {"model": "m", "messages": grown, "max_tokens": 100}))
    assert fitted.strategy == "summarize" and fitted.after <= MAX_LEN - 100
    assert metrics.value("summary_cache_hits_total", model="m") >= 1
    assert len(counter.summaries) - first <= 1  # only what was added since is summarised


def test_a_summary_that_cannot_be_written_trims_instead():
    metrics = ProxyMetrics()
    counter = Counter(summary=None)
    fitted = asyncio.run(
        keeper(counter, "summarize", metrics).fit("u", "m", {"messages": conversation(12), "max_tokens": 100})
    )
    assert fitted.strategy == "trim" and fitted.after <= MAX_LEN - 100
    assert metrics.value("summary_failures_total", model="m") == 1
    assert len(counter.summaries) == 1  # not asked again for the same chat


def test_a_latest_message_that_cannot_fit_is_refused_saying_by_how_much():
    messages = conversation(3)
    messages[-1]["content"] = "word " * 1000  # 1250 tokens alone
    least = tokens([messages[0], messages[-1]])
    with pytest.raises(TooLong) as refused:
        asyncio.run(keeper(Counter()).fit("u", "m", {"model": "m", "messages": messages, "max_tokens": 50}))
    over = least + 50 - MAX_LEN
    assert f"your messages take {least} input tokens" in str(refused.value)
    assert f"{over} tokens too many" in str(refused.value)


def test_tighter_compresses_a_chat_the_count_said_fits():
    messages = conversation(2)
    count = tokens(messages)
    assert count + 100 <= MAX_LEN
    fitted = asyncio.run(
        keeper(Counter()).fit(
            "u", "m", {"model": "m", "messages": messages, "max_tokens": 100}, tighter_by=300
        )
    )
    assert fitted.messages is not None and fitted.after <= MAX_LEN - 100 - 300


def test_a_reply_as_long_as_the_context_is_left_to_the_upstream_to_refuse():
    fitted = asyncio.run(
        keeper(Counter()).fit("u", "m", {"model": "m", "messages": conversation(12), "max_tokens": MAX_LEN})
    )
    assert fitted.messages is None


def test_a_counter_that_cannot_count_says_so():
    class Uncounting(Counter):
        async def count_chat(self, url, request):
            raise CountUnavailable("u/tokenize answered HTTP 404")

    with pytest.raises(CountUnavailable):
        asyncio.run(keeper(Uncounting()).fit("u", "m", {"model": "m", "messages": conversation(1)}))
