"""Which client concurrency a throughput sweep measures next, and which it chooses (pure).

A closed loop of C clients keeps at most C sequences running, as ``--max-num-seqs C`` would, so one
server measures every level. :func:`next_level` is stateless: it reads the levels measured so far.

1. Double C (from ``start``) while the SLO holds and output throughput grows, up to ``cap`` (as
   ``vllm bench sweep serve_sla`` does on request rate). A level grows when it beats the best level
   below it by ``threshold``; one level that does not (a noisy window) is not enough to stop: the
   doubling stops after two in a row.
2. Where a level broke the SLO, bisect between the last level that held it and the first that broke
   it, to ``resolution`` (a fraction of the lower bound, at least one client); not when throughput
   already fell below its best before the edge (throughput is concave in clients: nothing between
   can beat that best).
3. The knee: the fewest clients whose throughput is within ``tolerance`` of the best that held the SLO;
   bisect down to it the same way (to ``knee_resolution``: every level in that bracket is within
   ``tolerance`` anyway), from where concave throughput could reach it. More clients past it buy
   under ``tolerance`` and cost latency.

:func:`choose` picks that knee from the measured levels and says why in one line.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .slo import Slo
    from .traffic import Traffic

KNEE_THRESHOLD = 0.05  # throughput growth per doubling that counts as growing
KNEE_TOLERANCE = 0.02  # the knee: the fewest clients within this of the best throughput that held
RESOLUTION = 0.125  # the SLO edge's bisection stops at a bracket this fraction of its lower end
KNEE_RESOLUTION = 0.25  # the same for the bisection down to the knee
PREFILL_CHUNK = 2048  # vLLM's DEFAULT_MAX_NUM_BATCHED_TOKENS: its serve default below 70 GiB of GPU memory


@dataclass(frozen=True)
class Level:
    """One measured concurrency: output tokens/s and what broke (the SLO, or memory), if anything."""

    concurrency: int
    output_tokens_per_s: float
    broken: tuple[str, ...] = ()  # e.g. "TTFT SLO (p95 2.3 s, limit 2 s)"; empty: it held
    stats: dict = field(default_factory=dict, compare=False)

    @property
    def held(self) -> bool:
        return not self.broken


def next_level(
    levels: Sequence[Level],
    *,
    cap: int,
    start: int = 1,
    threshold: float = KNEE_THRESHOLD,
    tolerance: float = KNEE_TOLERANCE,
    resolution: float = RESOLUTION,
    knee_resolution: float = KNEE_RESOLUTION,
) -> int | None:
    """The concurrency to measure next, or None when the sweep is done."""
    if not levels:
        return max(1, min(start, cap))
    tried = {lv.concurrency: lv for lv in levels}
    held = sorted((lv for lv in levels if lv.held), key=lambda lv: lv.concurrency)
    top = max(levels, key=lambda lv: lv.concurrency)
    # 1. doubling
    if (
        top.held
        and top.concurrency < cap
        and (_grew(top, held, threshold) or _first_stall(top, held, threshold))
    ):
        return min(cap, top.concurrency * 2)
    # 2. the SLO edge
    lo = held[-1].concurrency if held else 0
    above = [c for c, lv in tried.items() if c > lo and not lv.held]
    falling = bool(held) and held[-1].output_tokens_per_s < max(lv.output_tokens_per_s for lv in held)
    if above and not falling:
        mid = _midpoint(lo, min(above), resolution)
        if mid is not None:
            return mid
    if not held:
        return None
    # 3. the knee
    knee = knee_level(held, tolerance)
    below = [lv for lv in levels if lv.concurrency < knee.concurrency]
    if not below:
        return _midpoint(0, knee.concurrency, knee_resolution)
    lower = max(below, key=lambda lv: lv.concurrency)
    return _midpoint(_knee_floor(lower, knee, tolerance), knee.concurrency, knee_resolution)


def knee_level(held: Sequence[Level], tolerance: float = KNEE_TOLERANCE) -> Level:
    """The fewest clients within ``tolerance`` of the best throughput among ``held`` levels."""
    best = max(lv.output_tokens_per_s for lv in held)
    return min(
        (lv for lv in held if lv.output_tokens_per_s >= (1 - tolerance) * best), key=lambda lv: lv.concurrency
    )


def _knee_floor(lower: Level, knee: Level, tolerance: float) -> int:
    """Below which no level can be within ``tolerance`` of ``knee``. Throughput is concave in clients
    (tokens/s per client never rises with more of them), so a level C above ``lower`` makes at most
    ``lower``'s throughput × C / lower.concurrency."""
    if lower.output_tokens_per_s <= 0:
        return lower.concurrency
    best = knee.output_tokens_per_s  # at most the best: the floor errs low, never past the knee
    reach = lower.concurrency * (1 - tolerance) * best / lower.output_tokens_per_s
    return max(lower.concurrency, min(knee.concurrency, int(reach)))


def _grew(top: Level, held: Sequence[Level], threshold: float) -> bool:
    """Whether ``top`` beats the best held level below it by ``threshold``."""
    below = [lv.output_tokens_per_s for lv in held if lv.concurrency < top.concurrency]
    return not below or top.output_tokens_per_s >= (1 + threshold) * max(below)


def _first_stall(top: Level, held: Sequence[Level], threshold: float) -> bool:
    """Whether ``top`` is the first level of the doubling that did not grow: the held level it doubled
    from (the largest at or below half of it) did."""
    before = [lv for lv in held if lv.concurrency <= top.concurrency // 2]
    return bool(before) and _grew(before[-1], held, threshold)


def _midpoint(lo: int, hi: int, resolution: float) -> int | None:
    if hi - lo <= max(1, int(lo * resolution)):
        return None
    return (lo + hi) // 2


@dataclass(frozen=True)
class Choice:
    level: Level | None
    reason: str


def choose(levels: Sequence[Level], *, cap: int, tolerance: float = KNEE_TOLERANCE) -> Choice:
    """The knee of the levels that held, and the reason in one line, e.g.
    "C=96: 4,210 tok/s, p95 TTFT 1.7 s; C=128 breaks the TTFT SLO (p95 2.3 s, limit 2 s)"."""
    ordered = sorted(levels, key=lambda lv: lv.concurrency)
    held = [lv for lv in ordered if lv.held]
    if not held:
        first = ordered[0] if ordered else None
        why = f"C={first.concurrency} breaks the {_and(first.broken)}" if first else "nothing was measured"
        return Choice(None, f"no concurrency held: {why}")
    knee = knee_level(held, tolerance)
    head = f"C={knee.concurrency}: {level_words(knee)}"
    after = [lv for lv in ordered if lv.concurrency > knee.concurrency]
    if not after:
        end = "the --max-num-seqs cap of the sweep" if knee.concurrency >= cap else "the last level measured"
        return Choice(knee, f"{head}; it is {end}")
    nxt = after[0]
    if not nxt.held:
        return Choice(knee, f"{head}; C={nxt.concurrency} breaks the {_and(nxt.broken)}")
    best = max(held, key=lambda lv: lv.output_tokens_per_s)
    more = best if best.concurrency > knee.concurrency else nxt
    gain = more.output_tokens_per_s / max(knee.output_tokens_per_s, 1e-9) - 1
    if gain <= 0:
        return Choice(
            knee, f"{head}; C={more.concurrency} adds nothing ({more.output_tokens_per_s:,.0f} tok/s)"
        )
    return Choice(
        knee,
        f"{head}; C={more.concurrency} adds only {gain:+.0%} ({more.output_tokens_per_s:,.0f} tok/s), "
        f"under the {tolerance:.0%} that would be worth its latency",
    )


def level_words(lv: Level) -> str:
    from .slo import seconds_words

    words = f"{lv.output_tokens_per_s:,.0f} tok/s"
    ttft = lv.stats.get("ttft_p95")
    if ttft is not None:
        words += f", p95 TTFT {seconds_words(ttft)}"
    return words


def token_budget(traffic: Traffic, slo: Slo, cap: int, *, sample: int = 1000) -> int | None:
    """The sweep launch's --max-num-batched-tokens where the memory fit did not lower it (the proof keeps
    it: the sweep measured under it); None: vLLM's default.

    With chunked prefill, vLLM's scheduler serves the running decodes first and fills what is left of
    the step's token budget with prefill chunks of waiting prompts. A small budget (``PREFILL_CHUNK``)
    puts at most that much prefill in any step: it rides on decode steps, which are bound by memory
    bandwidth, and no step stalls every running sequence behind several whole prompts; vLLM's larger
    default on ≥70 GiB GPUs (8,192) batches more prefill at once. The one case the small budget loses
    is an ITL limit with prompts longer than the chunk: each prompt then slows several steps instead
    of one, and the p95 gap between tokens lands on a slowed step. So: ``PREFILL_CHUNK`` (at least
    ``cap``: vLLM refuses a budget below --max-num-seqs) unless the SLO limits ITL and the workload's
    median prompt is longer than it."""
    limits_itl = any(limit.metric == "itl" for limit in slo.limits)
    median_prompt = statistics.median(traffic.draw(n)[0] for n in range(sample))
    if limits_itl and median_prompt > PREFILL_CHUNK:
        return None
    return max(PREFILL_CHUNK, cap)


def _and(items: Sequence[str]) -> str:
    return " and the ".join(items) if items else "limits"
