"""Fitting one chat request into its upstream's context: count it exactly, compress it when it does not
fit (``context.plan_fit``), count the result exactly, plan tighter until it fits; refuse it, in vLLM's
400 shape, when even its system messages and newest turn are too long.

The counting and the summaries go through the injected :class:`Counter` (``upstream.Upstreams``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Protocol

from .cache import Lru
from .context import (
    MIN_CUT_TOKENS,
    FitPlan,
    Sizes,
    apply_plan,
    conversation_shape,
    message_text,
    minimal_plan,
    names_reply,
    plan_fit,
    prefix_keys,
    reply_tokens,
    summary_chunks,
    summary_prompt,
    tokenize_request,
    transcript,
)
from .metrics import ProxyMetrics
from .upstream import SummaryFailed

ATTEMPTS = 4  # plans, each tighter by what the last one was over, before the least form is tried
MARGIN_TOKENS = 8  # added to each tightening, so estimates that are off by a little converge
SUMMARY_MARGIN_TOKENS = 32  # for the transcript's role labels and estimates that are off by a little


class Counter(Protocol):
    async def count_chat(self, url: str, request: dict) -> tuple[int, int]: ...

    async def count_texts(self, url: str, model: str | None, texts: list[str]) -> list[int]: ...

    async def write_summary(self, url: str, model: str, messages: list[dict], max_tokens: int) -> str: ...


@dataclass(frozen=True)
class Fitted:
    messages: list[dict] | None  # None: the request goes as it came
    before: int  # prompt tokens as it came
    after: int  # prompt tokens as it goes
    turns: int  # turns left out, cut or summarised
    max_len: int
    strategy: str = ""  # what compressed it: trim or summarize

    @property
    def note(self) -> str:
        """The ``x-vllm-tune-compressed`` header: ``41210->30522 tokens, 6 turns``."""
        return f"{self.before}->{self.after} tokens, {self.turns} turn{'s' if self.turns != 1 else ''}"


class TooLong(Exception):
    """Even compressed the chat does not fit; ``str()`` is the 400's message."""


class ContextKeeper:
    def __init__(
        self,
        counter: Counter,
        *,
        strategy: str,
        summaries: Lru[str, str],
        metrics: ProxyMetrics,
        log: logging.Logger,
    ) -> None:
        self.counter = counter
        self.strategy = strategy
        self.summaries = summaries
        self.metrics = metrics
        self.log = log

    async def fit(self, url: str, model: str, body: dict, *, tighter_by: int = 0) -> Fitted:
        """``body``'s chat (for ``model``) as it fits ``url``'s context, ``tighter_by`` tokens short of
        it. Raises TooLong, and the counter's CountUnavailable."""
        messages = body["messages"]
        count, max_len = await self.counter.count_chat(url, tokenize_request(body, messages))
        reply = reply_tokens(body, max_len)
        limit = max_len - reply - tighter_by  # what the prompt may take
        if count <= limit or reply >= max_len:  # fits, or no prompt could: vLLM's own 400 says so
            return Fitted(None, count, count, 0, max_len)
        texts = await self.counter.count_texts(url, body.get("model"), [message_text(m) for m in messages])
        shape, sizes = conversation_shape(messages), Sizes.of(messages, texts, count)
        budget, strategy = limit, self.strategy
        for _ in range(ATTEMPTS):
            plan = plan_fit(shape, sizes, budget, strategy)
            if plan.excess:
                break
            used, compressed = await self._compressed(url, model, messages, plan, sizes, budget, max_len)
            if compressed is None:
                break
            if plan.summarized and used == "trim":  # the summary failed: trim from now on
                strategy = "trim"
            after, _ = await self.counter.count_chat(url, tokenize_request(body, compressed))
            if after <= limit:
                return Fitted(compressed, count, after, plan.turns, max_len, used)
            budget -= after - limit + MARGIN_TOKENS
        least = minimal_plan(shape, sizes)
        compressed = apply_plan(messages, least, sizes)
        after, _ = await self.counter.count_chat(url, tokenize_request(body, compressed))
        if after <= limit:
            return Fitted(compressed, count, after, least.turns, max_len, "trim")
        raise TooLong(too_long_message(max_len, after, reply, names_reply(body), tighter_by))

    async def _compressed(
        self,
        url: str,
        model: str,
        messages: list[dict],
        plan: FitPlan,
        sizes: Sizes,
        budget: int,
        max_len: int,
    ) -> tuple[str, list[dict] | None]:
        """(the strategy used, the messages) of a plan: its summary written, or trimmed when it cannot
        be; no messages when even trimmed it cannot fit."""
        if not plan.summarized:
            return "trim", apply_plan(messages, plan, sizes)
        try:
            summary = await self._summary(url, model, messages, plan, sizes, max_len)
        except SummaryFailed as exc:
            self.metrics.add("summary_failures_total", model=model)
            self.log.warning("%s: a summary could not be written (%s): trimming instead", model, exc)
            trimmed = plan_fit(conversation_shape(messages), sizes, budget, "trim")
            return "trim", None if trimmed.excess else apply_plan(messages, trimmed, sizes)
        return "summarize", apply_plan(messages, plan, sizes, summary)

    async def _summary(
        self, url: str, model: str, messages: list[dict], plan: FitPlan, sizes: Sizes, max_len: int
    ) -> str:
        """The summary of ``plan.summarized``: from the longest prefix already summarised, a chunk at a
        time, each chunk's summary cached under its prefix."""
        wanted = plan.summarized
        keys = prefix_keys(model, messages, wanted)
        start, summary = 0, ""
        for n in range(len(keys), 0, -1):
            known = self.summaries.get(keys[n - 1])
            if known is not None:
                start, summary = n, known
                self.metrics.add("summary_cache_hits_total", model=model)
                break
        if start == len(wanted):
            return summary
        skeleton = summary_prompt("x", "", plan.summary_tokens)  # the instruction and the labels, counted
        instruction, _ = await self.counter.count_chat(url, tokenize_request({"model": model}, skeleton))
        # the transcript's room: less the instruction, the answer, the summary so far and a margin
        room = max_len - instruction - 2 * plan.summary_tokens - SUMMARY_MARGIN_TOKENS
        if room < MIN_CUT_TOKENS:
            raise SummaryFailed(f"max-model-len {max_len} leaves no room to summarise in")
        position = {i: n for n, i in enumerate(wanted)}
        for chunk in summary_chunks(wanted[start:], sizes, room):
            shown = transcript([messages[i] for i in chunk], [sizes.text[i] for i in chunk], room)
            prompt = summary_prompt(summary, shown, plan.summary_tokens)
            summary = await self.counter.write_summary(url, model, prompt, plan.summary_tokens)
            self.metrics.add("summaries_total", model=model)
            self.summaries.put(keys[position[chunk[-1]]], summary)
        return summary


def too_long_message(max_len: int, least: int, reply: int, asked: bool, tighter_by: int = 0) -> str:
    """vLLM's words for an over-long prompt, saying what was kept and by how much it is over."""
    over = least + reply + tighter_by - max_len
    room = f"max_tokens asks for {reply} more" if asked else f"{reply} are kept for the reply"
    return (
        f"This model's maximum context length is {max_len} tokens. However, your messages take {least} input "
        f"tokens even with the earlier turns left out (the system message and the latest message are kept "
        f"whole) and {room}: {over} tokens too many. Please shorten the latest message or the system message "
        f"by {over} tokens, or ask for fewer output tokens."
    )


@dataclass(frozen=True)
class LengthError:
    prompt: int | None  # the prompt tokens the upstream counted, where it said
    max_len: int | None


_PROMPT_SAID = (
    re.compile(r"your prompt contains (?:at least )?(\d+) input tokens"),
    re.compile(r"prompt \(length (\d+)\)"),
    re.compile(r"(\d+) in the messages"),
)
_MAX_SAID = (
    re.compile(r"maximum context length is (\d+)"),
    re.compile(r"maximum model length of (\d+)"),
)


def length_error(message: str) -> LengthError | None:
    """What an upstream's 400 says about the input's length (vLLM's messages), or None: not about it."""
    if not re.search(r"maximum (context|model) length", message):
        return None
    prompt = next((int(m.group(1)) for p in _PROMPT_SAID if (m := p.search(message))), None)
    max_len = next((int(m.group(1)) for p in _MAX_SAID if (m := p.search(message))), None)
    return LengthError(prompt, max_len)
