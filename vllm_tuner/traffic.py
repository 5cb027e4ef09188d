"""The traffic of ``find --objective throughput``: which requests a concurrency sweep sends (pure).

``--workload`` is either a named mix or a file of the user's own request lengths. A named mix is a few
request classes, each with a share of the traffic and uniform ranges of prompt and output tokens:

    chat   chat turns: 70% 200-2,000 prompt + 100-500 output, 30% 2,000-6,000 + 200-800
    rag    long retrieved prompts, short answers: 3,000-12,000 prompt + 100-400 output
    code   completion and edits: 60% 1,000-4,000 + 50-300, 40% 4,000-12,000 + 300-1,500
    agent  long, growing contexts: 50% 4,000-16,000 + 100-500, 50% 16,000-28,000 + 100-500

A file holds one request a line, ``prompt_tokens,output_tokens`` (``workload.read_prompt_lengths``
reads it, as ``ramp --workload-file`` does; a bad row is refused naming its line).

:meth:`Traffic.draw` gives the ``n``-th request of a fixed, seeded sequence: the same sweep sends the
same requests, level after level, run after run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .workload import read_prompt_lengths


@dataclass(frozen=True)
class RequestClass:
    """A share of a mix: prompt and output tokens drawn uniformly from their ranges."""

    share: float
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    @property
    def longest(self) -> int:
        return self.prompt_tokens[1] + self.output_tokens[1]


MIXES: dict[str, tuple[RequestClass, ...]] = {
    "chat": (RequestClass(0.7, (200, 2000), (100, 500)), RequestClass(0.3, (2000, 6000), (200, 800))),
    "rag": (RequestClass(1.0, (3000, 12000), (100, 400)),),
    "code": (RequestClass(0.6, (1000, 4000), (50, 300)), RequestClass(0.4, (4000, 12000), (300, 1500))),
    "agent": (RequestClass(0.5, (4000, 16000), (100, 500)), RequestClass(0.5, (16000, 28000), (100, 500))),
}

MIX_WORDS = {
    "chat": "chat turns, mostly short prompts",
    "rag": "long retrieved prompts, short answers",
    "code": "code completion and edits, longer answers",
    "agent": "agent loops, long and growing contexts",
}


@dataclass(frozen=True)
class Traffic:
    """A workload: a named mix, or the rows of a file (``rows``), drawn in a seeded order."""

    name: str
    classes: tuple[RequestClass, ...] = ()
    rows: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    @property
    def longest(self) -> int:
        """Prompt plus output tokens of the longest request: the least --max-model-len that serves it."""
        if self.rows:
            return max(p + o for p, o in self.rows)
        return max(c.longest for c in self.classes)

    def draw(self, n: int) -> tuple[int, int]:
        """The ``n``-th (prompt_tokens, output_tokens) of this workload's sequence."""
        rng = random.Random(f"{self.seed}:{n}")
        if self.rows:
            return self.rows[rng.randrange(len(self.rows))]
        pick, acc = rng.random() * sum(c.share for c in self.classes), 0.0
        chosen = self.classes[-1]
        for c in self.classes:
            acc += c.share
            if pick < acc:
                chosen = c
                break
        return rng.randint(*chosen.prompt_tokens), rng.randint(*chosen.output_tokens)

    def describe(self) -> str:
        if self.rows:
            return f"{self.name} ({len(self.rows):,} requests, longest {self.longest:,} tokens)"
        return f"{self.name} ({MIX_WORDS.get(self.name, 'a mix')}, longest {self.longest:,} tokens)"


def traffic_named(text: str) -> Traffic:
    """``--workload``: a mix name, or the path of a file of ``prompt_tokens,output_tokens`` rows."""
    name = text.strip()
    if name in MIXES:
        return Traffic(name, classes=MIXES[name])
    path = Path(name)
    if not path.exists():
        raise UsageError(
            f"--workload {text!r} is neither a named mix nor a file",
            f"use one of {', '.join(MIXES)} or a file of prompt_tokens,output_tokens rows",
        )
    rows = read_prompt_lengths(path)
    if not rows:
        raise UsageError(
            f"the workload file {path} holds no requests", "write one prompt_tokens,output_tokens row a line"
        )
    return Traffic(path.name, rows=tuple(rows))


def check_fits_model(traffic: Traffic, model_max_len: int, model_name: str) -> None:
    """A request longer than the model takes cannot be served at any --max-model-len."""
    if model_max_len and traffic.longest > model_max_len:
        raise UsageError(
            f"the longest request of --workload {traffic.name} is {traffic.longest:,} tokens, more than "
            f"{model_name} takes ({model_max_len:,})",
            "use a workload of shorter requests or a model with a longer context",
        )
