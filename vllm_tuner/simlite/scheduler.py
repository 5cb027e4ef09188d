"""The simulated engine's scheduler, one step at a time, in simulated seconds. Pure: no threads, no clock.

It follows vLLM V1's ``Scheduler.schedule`` (v1/core/sched/scheduler.py) in what matters for throughput
and latency:

- one token budget per step (``--max-num-batched-tokens``) shared by decodes and prefill chunks; the
  RUNNING sequences are served first, in order, then WAITING ones are admitted while the budget, the
  ``--max-num-seqs`` cap and the free blocks allow; with chunked prefill a long prompt takes several
  steps, without it a prompt must fit the budget whole;
- a sequence samples a token in the step that computes its last pending token, and the client sees it
  when that step ends;
- when a running sequence cannot get the blocks its new tokens need, the newest running sequence is
  preempted by recompute: its blocks are freed, its computed tokens forgotten, and it goes back to the
  front of the queue (prompt and the tokens it already produced are prefilled again); no sequence is
  admitted in a step that preempted.

How long a step takes is the caller's (``step_time``: see :mod:`.steptime`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Seq:
    """One request as the scheduler sees it; times are simulated seconds."""

    prompt_len: int
    max_tokens: int  # 0: a pooling request, done when its prompt is computed
    arrived: float = 0.0
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0
    blocks: int = 0
    preemptions: int = 0
    scheduled_at: float | None = None  # first left the queue
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # between consecutive tokens

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated


@dataclass
class Step:
    """What one step did; its tokens reach the clients at ``ends``."""

    ends: float
    duration: float
    scheduled_tokens: int
    sampled: list[Seq] = field(default_factory=list)  # each produced one token
    finished: list[Seq] = field(default_factory=list)
    preempted: list[Seq] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        step_time: Callable[[list[tuple[int, int]]], float],
        chunked_prefill: bool = True,
        keeps_kv_cache: bool = True,
    ) -> None:
        self.usable_blocks = max(0, num_blocks - 1)  # block 0 is the null block
        self.free_blocks = self.usable_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_time = step_time
        self.chunked_prefill = chunked_prefill
        self.keeps_kv_cache = keeps_kv_cache
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.preemptions = 0

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    @property
    def kv_usage(self) -> float:
        return 1 - self.free_blocks / self.usable_blocks if self.usable_blocks else 0.0

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size) if self.keeps_kv_cache else 0

    def _grow(self, seq: Seq, tokens: int) -> bool:
        """Give ``seq`` the blocks for ``tokens`` tokens in the cache, if the pool has them."""
        need = self.blocks_for(tokens) - seq.blocks
        if need > self.free_blocks:
            return False
        self.free_blocks -= max(0, need)
        seq.blocks += max(0, need)
        return True

    def _free(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def step(self, now: float) -> Step | None:
        """Schedule, run and account one step starting at ``now``; None when there is nothing to run."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Seq, int]] = []
        preempted: list[Seq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            new = min(seq.num_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if preempted and preempted[-1] is seq:
                break
            scheduled.append((seq, new))
            budget -= new
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            new = seq.num_tokens - seq.computed
            if new > budget and not self.chunked_prefill:
                break
            new = min(new, budget)
            if not self._grow(seq, seq.computed + new):
                break
            self.waiting.pop(0)
            self.running.append(seq)
            if seq.scheduled_at is None:
                seq.scheduled_at = now
            scheduled.append((seq, new))
            budget -= new
        if not scheduled:
            return None if not preempted else Step(now, 0.0, 0, preempted=preempted)
        duration = self.step_time([(seq.computed, new) for seq, new in scheduled])
        ends = now + duration
        step = Step(ends, duration, sum(new for _, new in scheduled), preempted=preempted)
        for seq, new in scheduled:
            seq.computed += new
            if seq.computed < seq.num_tokens:
                continue  # a prefill chunk: more of the prompt to go
            if seq.max_tokens:
                seq.generated += 1
                if seq.last_token_at is not None:
                    seq.token_gaps.append(ends - seq.last_token_at)
                seq.first_token_at = seq.first_token_at if seq.first_token_at is not None else ends
                seq.last_token_at = ends
                step.sampled.append(seq)
            if seq.generated >= seq.max_tokens:
                seq.finished_at = ends
                self._free(seq)
                self.running.remove(seq)
                step.finished.append(seq)
        return step

    def _preempt(self, seq: Seq) -> None:
        """Recompute: forget the sequence's cache; it waits at the front of the queue."""
        self._free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, seq)


@dataclass(frozen=True)
class LoadResult:
    """A closed loop's outcome over its measured window (after the warm-up): output tokens/s counts every
    token that streamed in the window, finished request or not (a window shorter than a long request
    still measures it); requests/s and the latencies count the requests that finished in it."""

    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: list[float]  # per request
    itl_s: list[float]  # every gap between two tokens of a request
    e2e_s: list[float]  # per request
    preemptions: int  # over the whole run
    completed: int  # over the whole run

    def percentile(self, values: list[float], p: float) -> float | None:
        """The ``p``-th percentile (nearest rank) of ``values``, None when there are none."""
        if not values:
            return None
        ordered = sorted(values)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def closed_loop(
    scheduler: Scheduler,
    clients: int,
    requests: list[tuple[int, int]],
    *,
    seconds: float,
    warmup: float = 0.0,
) -> LoadResult:
    """``clients`` clients, each sending its next request the moment its last one ends, for ``seconds``
    simulated seconds; requests are ``(prompt tokens, output tokens)`` taken in turn from ``requests``."""
    if not requests:
        raise ValueError("closed_loop needs at least one request shape")
    sent = 0

    def send(now: float) -> None:
        nonlocal sent
        prompt, output = requests[sent % len(requests)]
        scheduler.add(Seq(prompt, output, arrived=now))
        sent += 1

    for _ in range(clients):
        send(0.0)
    now, done, streamed = 0.0, [], 0
    while now < seconds:
        step = scheduler.step(now)
        if step is None:
            break
        now = step.ends
        if now > warmup:
            streamed += len(step.sampled)
        for seq in step.finished:
            done.append(seq)
            send(now)
    counted = [s for s in done if s.finished_at is not None and s.finished_at > warmup]
    window = max(now - warmup, 1e-9)
    return LoadResult(
        output_tokens_per_s=streamed / window,
        requests_per_s=len(counted) / window,
        ttft_s=[s.first_token_at - s.arrived for s in counted if s.first_token_at is not None],
        itl_s=[gap for s in counted for gap in s.token_gaps],
        e2e_s=[s.finished_at - s.arrived for s in counted if s.finished_at is not None],
        preemptions=scheduler.preemptions,
        completed=len(done),
    )
