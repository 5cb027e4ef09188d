"""Keeping a chat inside its upstream's max-model-len, planned over token counts. Pure.

A conversation is its leading system messages and its turns (a user message and the assistant and tool
messages that answer it). When the prompt and the reply do not fit, the system messages and the newest
message stay whole, the newest turns stay whole as far as they fit, and the older ones go:

- ``trim``: the older turns are left out; the newest of them is cut in the middle instead when at least
  ``MIN_CUT_TOKENS`` of each of its texts still fit (its longest texts first, down to a common length:
  head and tail kept, a note of how many tokens were cut between them).
- ``summarize``: the older turns are replaced by a summary the upstream model writes, added to the system
  message (a system message of its own when there is none).

The newest turn's earlier messages (an agent's tool calls and results) are cut in the middle when they do
not fit whole; never left out. A plan works on estimates (each message's text counted alone, the
template's own tokens shared out evenly); the caller counts the compressed conversation exactly and plans
again, tighter, when it is still over.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

STRATEGIES = ("trim", "summarize")
SYSTEM_ROLES = frozenset({"system", "developer"})
CUT_NOTE_TOKENS = 16  # what the "[... N tokens cut ...]" note costs, at most
MIN_CUT_TOKENS = 64  # an older turn that would keep fewer tokens of a text is left out instead
SUMMARY_MAX_TOKENS = 512
SUMMARY_MIN_TOKENS = 32  # a summary with less room than this is not worth writing: trim instead
DEFAULT_REPLY_TOKENS = 1024  # room kept for the reply when a request names no max_tokens (at most 1/4)
SUMMARY_HEADER = "Summary of the earlier conversation, left out to fit the model's context:"
# the chat request's fields that change what the chat template renders: /tokenize takes them too
TEMPLATE_FIELDS = (
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "mm_processor_kwargs",
    "media_io_kwargs",
)


# ------------------------------------------------------------------------------------------- the request


def reply_tokens(body: dict, max_len: int) -> int:
    """The room the reply needs: ``max_completion_tokens``, else ``max_tokens`` (as vLLM reads them),
    else ``DEFAULT_REPLY_TOKENS`` but at most a quarter of the context."""
    asked = body.get("max_completion_tokens")
    if asked is None:
        asked = body.get("max_tokens")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
        return asked
    return min(DEFAULT_REPLY_TOKENS, max_len // 4)


def names_reply(body: dict) -> bool:
    return body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None


def tokenize_request(body: dict, messages: list) -> dict:
    """The ``/tokenize`` body that counts ``messages`` as the chat request ``body`` would render them."""
    request = {"messages": messages, **{k: body[k] for k in TEMPLATE_FIELDS if k in body}}
    if body.get("model"):
        request["model"] = body["model"]
    return request


def message_text(message: dict) -> str:
    """What a message says: its text (the text parts of a list), and its tool calls' names and arguments."""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))
    else:
        text = ""
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        text += "\n" + json.dumps(calls, separators=(",", ":"))
    return text


# ---------------------------------------------------------------------------------------- the conversation


@dataclass(frozen=True)
class Shape:
    system: tuple[int, ...]  # the leading system (or developer) messages
    turns: tuple[tuple[int, ...], ...]  # the rest, a new turn at each user message; the newest last


def conversation_shape(messages: list[dict]) -> Shape:
    system: list[int] = []
    while len(system) < len(messages) and messages[len(system)].get("role") in SYSTEM_ROLES:
        system.append(len(system))
    turns: list[list[int]] = []
    for i in range(len(system), len(messages)):
        if not turns or messages[i].get("role") == "user":
            turns.append([i])
        else:
            turns[-1].append(i)
    return Shape(tuple(system), tuple(tuple(t) for t in turns))


@dataclass(frozen=True)
class Sizes:
    """Token counts of one conversation's messages."""

    text: tuple[int, ...]  # each message's text, counted alone
    frame: int  # the chat template's tokens per message: the whole count less the texts, shared out
    cuttable: tuple[bool, ...]  # a plain-text content that can be cut in the middle

    @classmethod
    def of(cls, messages: list[dict], text_tokens: list[int], total: int) -> Sizes:
        frame = math.ceil(max(0, total - sum(text_tokens)) / max(1, len(messages)))
        cuttable = tuple(isinstance(m.get("content"), str) and bool(m["content"]) for m in messages)
        return cls(tuple(text_tokens), frame, cuttable)

    def whole(self, i: int) -> int:
        return self.frame + self.text[i]

    def cost(self, indices: tuple[int, ...] | list[int], level: int | None = None) -> int:
        """What ``indices`` take with every cuttable text cut to ``level`` tokens plus the note (the note
        counted for each, cut or not: an upper bound); ``None``: whole."""
        if level is None:
            return sum(self.whole(i) for i in indices)
        return sum(
            self.frame + (min(self.text[i], level) + CUT_NOTE_TOKENS if self.cuttable[i] else self.text[i])
            for i in indices
        )


@dataclass(frozen=True)
class FitPlan:
    kept: tuple[int | None, ...]  # per message: text tokens kept (all: whole, fewer: cut); None: left out
    summarized: tuple[int, ...] = ()  # the messages a summary stands for (summarize), oldest first
    summary_tokens: int = 0  # the room left for that summary
    turns: int = 0  # the turns left out, cut or summarized
    excess: int = 0  # > 0: what is kept of the newest turn and the system messages is this many tokens over

    @property
    def left_out(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kept) if k is None)


def plan_fit(shape: Shape, sizes: Sizes, budget: int, strategy: str = "trim") -> FitPlan:
    """Which messages to keep whole, cut, leave out or summarise so the prompt takes at most ``budget``."""
    last = len(sizes.text) - 1
    kept: list[int | None] = [None] * len(sizes.text)
    for i in {*shape.system, last}:
        kept[i] = sizes.text[i]
    room = budget - sizes.cost(sorted({*shape.system, last}))
    current = tuple(i for i in shape.turns[-1] if i != last) if shape.turns else ()
    older = shape.turns[:-1]
    trimmed = _keep_newest(sizes, kept, current, older, room, cut_older=True)
    if strategy != "summarize" or trimmed.excess or not trimmed.left_out:
        return trimmed
    summary = min(SUMMARY_MAX_TOKENS, room // 4)
    if summary < SUMMARY_MIN_TOKENS:
        return trimmed
    summary_cost = summary + (CUT_NOTE_TOKENS if shape.system else sizes.frame + CUT_NOTE_TOKENS)
    planned = _keep_newest(sizes, kept, current, older, room - summary_cost, cut_older=False)
    if planned.excess:
        return trimmed
    return FitPlan(planned.kept, planned.left_out, summary, planned.turns)


def minimal_plan(shape: Shape, sizes: Sizes) -> FitPlan:
    """The least a conversation can be: its system messages, the newest turn cut to nothing but notes
    (its last message whole), the older turns left out."""
    last = len(sizes.text) - 1
    kept: list[int | None] = [None] * len(sizes.text)
    for i in {*shape.system, last}:
        kept[i] = sizes.text[i]
    for i in shape.turns[-1] if shape.turns else ():
        if i != last:
            kept[i] = 0 if sizes.cuttable[i] else sizes.text[i]
    return FitPlan(tuple(kept), turns=len(shape.turns))


def _keep_newest(
    sizes: Sizes,
    fixed: list[int | None],
    current: tuple[int, ...],
    older: tuple[tuple[int, ...], ...],
    room: int,
    *,
    cut_older: bool,
) -> FitPlan:
    kept = list(fixed)
    if room < 0:
        return FitPlan(tuple(kept), excess=-room)
    if sizes.cost(current) > room:  # the newest turn is cut; nothing older fits beside it
        level = _water_level(sizes, current, room)
        if level is None:
            return FitPlan(tuple(kept), excess=sizes.cost(current, 0) - room)
        _cut(sizes, kept, current, level)
        return FitPlan(tuple(kept), turns=1 + len(older))
    for i in current:
        kept[i] = sizes.text[i]
    room -= sizes.cost(current)
    for n_kept, turn in enumerate(reversed(older)):
        if sizes.cost(turn) <= room:
            for i in turn:
                kept[i] = sizes.text[i]
            room -= sizes.cost(turn)
            continue
        going = len(older) - n_kept  # this turn and every older one
        level = _water_level(sizes, turn, room) if cut_older else None
        if level is not None and level >= MIN_CUT_TOKENS:
            _cut(sizes, kept, turn, level)
        return FitPlan(tuple(kept), turns=going)
    return FitPlan(tuple(kept))


def _cut(sizes: Sizes, kept: list[int | None], indices: tuple[int, ...], level: int) -> None:
    for i in indices:
        kept[i] = min(sizes.text[i], level) if sizes.cuttable[i] else sizes.text[i]


def _water_level(sizes: Sizes, indices: tuple[int, ...], room: int) -> int | None:
    """The largest length every cuttable text of ``indices`` can keep within ``room``; None: not even
    with all of them cut to nothing."""
    if not any(sizes.cuttable[i] for i in indices) or sizes.cost(indices, 0) > room:
        return None
    low, high = 0, max(sizes.text[i] for i in indices if sizes.cuttable[i])
    while low < high:
        mid = (low + high + 1) // 2
        if sizes.cost(indices, mid) <= room:
            low = mid
        else:
            high = mid - 1
    return low


# ------------------------------------------------------------------------------------------ the messages


def cut_text(text: str, tokens: int, keep: int) -> str:
    """``text`` (``tokens`` long) cut to about ``keep`` tokens: its head and tail, a note between."""
    if keep >= tokens:
        return text
    chars = len(text) * keep // max(1, tokens)
    tail = chars // 2
    head = chars - tail
    return f"{text[:head]}\n[... {tokens - keep} tokens cut ...]\n{text[len(text) - tail :] if tail else ''}"


def apply_plan(messages: list[dict], plan: FitPlan, sizes: Sizes, summary: str | None = None) -> list[dict]:
    """The messages a plan keeps, cut where it says, with ``summary`` in the (first) system message."""
    out: list[dict] = []
    for i, message in enumerate(messages):
        keep = plan.kept[i]
        if keep is None:
            continue
        if keep < sizes.text[i] and sizes.cuttable[i]:
            message = {**message, "content": cut_text(message["content"], sizes.text[i], keep)}
        out.append(message)
    if summary is not None:
        note = f"{SUMMARY_HEADER}\n{summary.strip()}"
        if out and out[0].get("role") in SYSTEM_ROLES:
            out[0] = _with_text(out[0], note)
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _with_text(message: dict, note: str) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [*content, {"type": "text", "text": note}]}
    return {**message, "content": f"{content}\n\n{note}" if content else note}


# ------------------------------------------------------------------------------------------- summaries


def summary_prompt(previous: str, transcript: str, max_tokens: int) -> list[dict]:
    """What the upstream model is asked to summarise: the summary so far and the turns that follow it."""
    words = max(20, max_tokens * 2 // 3)
    instruction = (
        "You summarise conversations. Write a concise summary of the conversation below that keeps the "
        "facts, decisions, names, numbers, code identifiers and open questions later turns may need. "
        f"Answer with the summary only, at most {words} words."
    )
    shown = f"Summary so far:\n{previous.strip()}\n\n" if previous else ""
    return [
        {"role": "system", "content": instruction},
        {"role": "user", "content": f"{shown}Conversation:\n{transcript}"},
    ]


def transcript(messages: list[dict], sizes_of: list[int], room: int) -> str:
    """The messages as ``role: text`` paragraphs, each text cut to ``room`` tokens."""
    return "\n\n".join(
        f"{m.get('role', 'user')}: {cut_text(message_text(m), n, min(n, room))}"
        for m, n in zip(messages, sizes_of, strict=True)
    )


def summary_chunks(indices: tuple[int, ...], sizes: Sizes, room: int) -> list[tuple[int, ...]]:
    """``indices`` in order, grouped so each group's texts (and a few tokens for each role) take at most
    ``room``; a text larger than that alone makes a group of its own (its transcript cuts it)."""
    chunks: list[list[int]] = []
    used = room + 1
    for i in indices:
        cost = sizes.text[i] + 4
        if used + cost > room:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += cost
    return [tuple(c) for c in chunks]


def prefix_keys(model: str, messages: list[dict], indices: tuple[int, ...]) -> list[str]:
    """One key per message of ``indices``: the model and every message of ``indices`` up to that one,
    so a growing conversation finds the summary of the prefix it shares with an earlier request."""
    digest = hashlib.sha256(model.encode())
    keys = []
    for i in indices:
        digest.update(json.dumps(messages[i], sort_keys=True).encode() + b"\0")
        keys.append(digest.copy().hexdigest())
    return keys
