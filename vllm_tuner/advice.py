"""The next change of flags for a diagnosed vLLM log, with the numbers worked out (pure).

Advice follows the knob order of the guides — fewer ``--max-num-seqs``, shorter ``--max-model-len``,
higher ``--gpu-memory-utilization``, ``--enforce-eager``, fp8 KV cache, CPU offload — keeping only the
knobs that can fix the category at hand, and it says so where the right move is counter-intuitive:
"No available memory for the cache blocks" wants a *higher* utilization, a startup free-memory failure
wants a *lower* one.

Advice follows the flags in force: with ``--kv-cache-memory-bytes`` (or ``--num-gpu-blocks-override``)
the KV cache is the flag's size, so neither ``--gpu-memory-utilization`` nor ``--enforce-eager`` moves
it and the advice names the flag instead; a knob already in force (``--enforce-eager``, an fp8 KV cache)
is not suggested again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .logparse import Diagnosis, Facts
from .units import GIB, MIB

LENGTH_STEP = 256  # suggested context lengths are rounded down to this
UTIL_CEILING = 0.98  # never suggest more than this
UTIL_MARGIN = 0.01

# Flags that newer vLLM no longer accepts, and what to use instead.
REMOVED_FLAGS: dict[str, str] = {
    "--swap-space": "use --kv-offloading-size GIB (CPU KV cache) or --cpu-offload-gb GIB (weights) instead",
    "--calculate-kv-scales": "drop it; fp8 KV scales come from the checkpoint",
    "--max-seq-len-to-capture": "drop it; use --max-cudagraph-capture-size to bound graph capture",
    "--use-v2-block-manager": "drop it; the V2 block manager is the only one",
    "--disable-log-requests": "drop it; request logging is off unless --enable-log-requests",
}


@dataclass(frozen=True)
class Advice:
    """One suggestion: a sentence, and the flag changes it means (empty when it is not a flag)."""

    text: str
    changes: dict[str, object] = field(default_factory=dict)


def advise(
    diagnosis: Diagnosis, flags: Mapping[str, object] | None = None, *, gpu_total_gib: float | None = None
) -> list[Advice]:
    """What to change next, best first.

    ``flags`` are the flags the failed launch used, if known (``{"--max-model-len": 32768}``);
    ``gpu_total_gib`` is one GPU's total memory, used when the log does not print it.
    """
    facts = dict(diagnosis.facts)
    if gpu_total_gib and "total_gib" not in facts:
        facts["total_gib"] = gpu_total_gib
    known = _Known(facts, dict(flags or {}))
    rule = _RULES.get(diagnosis.category)
    return rule(known) if rule else []


class _Known:
    """The numbers a rule may use: the log's facts first, then the flags the launch was given."""

    def __init__(self, facts: Facts, flags: dict[str, object]) -> None:
        self.facts = facts
        self.flags = flags

    def number(self, fact: str, flag: str | None = None) -> float | None:
        value: object = self.facts.get(fact)
        if value is None and flag:
            value = self.flags.get(flag)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return value

    def util(self) -> float | None:
        value = self.number("gpu_memory_utilization", "--gpu-memory-utilization")
        requested, total = self.number("requested_gib"), self.number("total_gib")
        if value is None and requested and total:
            value = round(requested / total, 2)  # vLLM asks for total x the fraction (rounded up)
        return value

    def kv_cache_bytes(self) -> int | None:
        """The ``--kv-cache-memory-bytes`` the launch used: the KV cache is that size, not a share."""
        value = self.flags.get("--kv-cache-memory-bytes")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def blocks_override(self) -> int | None:
        """``--num-gpu-blocks-override``: the KV cache is that many blocks, not a share."""
        value = self.flags.get("--num-gpu-blocks-override")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def pool_fixed(self) -> bool:
        """The KV cache's size is set by a flag: --gpu-memory-utilization and CUDA graphs do not move it."""
        return self.kv_cache_bytes() is not None or self.blocks_override() is not None

    @property
    def eager(self) -> bool:
        """Already without CUDA graphs (--enforce-eager, -O0): suggesting it again changes nothing."""
        level = self.flags.get("--optimization-level")
        return self.flags.get("--enforce-eager") is True or (level is not None and str(level) == "0")

    @property
    def fp8_kv(self) -> bool:
        return str(self.flags.get("--kv-cache-dtype") or "").startswith("fp8")

    def block_size(self) -> int:
        value = self.flags.get("--block-size")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 16

    def pool_step_bytes(self, fraction: float) -> int:
        """``fraction`` of one GPU (what a utilization step of that size would move), else 1 GiB."""
        total = self.number("total_gib")
        return math.ceil(fraction * total * GIB) if total else GIB

    @property
    def cpu(self) -> bool:
        """vLLM's CPU backend: the fraction is a share of one NUMA node's memory, and no CUDA graphs."""
        return self.facts.get("platform") == "cpu"

    def max_model_len(self) -> int | None:
        value = self.number("max_model_len", "--max-model-len")
        return int(value) if value else None

    def max_num_seqs(self) -> int | None:
        value = self.number("max_num_seqs", "--max-num-seqs")
        return int(value) if value else None

    def tp(self) -> int:
        value = self.flags.get("--tensor-parallel-size") or 1
        return int(value) if isinstance(value, (int, float)) else 1


def round_length(tokens: float) -> int:
    """A context length at or below ``tokens``: a multiple of 256 (of 16 below 256)."""
    step = LENGTH_STEP if tokens >= LENGTH_STEP else 16
    return max(16, int(tokens) // step * step)


def _util_up(value: float) -> float:
    return round(math.ceil(round(value * 100, 6)) / 100, 2)


def _util_down(value: float) -> float:
    return round(math.floor(round(value * 100, 6)) / 100, 2)


def _gib(value: float) -> str:
    return f"{value:.2f} GiB" if abs(value) >= 0.1 or value == 0 else f"{value * 1024:.1f} MiB"


# --------------------------------------------------------------------------------------------------
# One rule per category.


def _kv_insufficient(k: _Known) -> list[Advice]:
    length = k.max_model_len()
    fits = k.number("estimated_max_model_len") or k.number("kv_cache_tokens")
    tokens = k.number("kv_cache_tokens")
    out: list[Advice] = []
    if fits and length:
        new_len = round_length(fits)
        holds = f"KV cache holds {int(tokens or fits):,} tokens"
        out.append(
            Advice(
                f"{holds} but --max-model-len is {length}: use --max-model-len {new_len}",
                {"--max-model-len": new_len},
            )
        )
    elif length:
        out.append(Advice(f"shorten --max-model-len below {length}", {}))
    else:
        out.append(Advice("shorten --max-model-len", {}))
    util, total = k.util(), k.number("total_gib")
    needed, available = k.number("needed_gib"), k.number("available_kv_gib")
    if needed is None and available is not None and tokens and length:
        needed = available * length / tokens
    if needed is not None and needed < 0.01:
        needed = available = None  # printed as 0.0 GiB: too small to compute with
    keep = f" to keep {length}" if length else ""
    fixed = k.kv_cache_bytes()
    override = k.blocks_override()
    if override is not None and fixed is None:
        # the KV cache is that many blocks: one request of the length, plus the null block vLLM keeps back
        blocks = math.ceil(length / k.block_size()) + 1 if length else None
        out.append(
            Advice(
                f"or raise --num-gpu-blocks-override to {blocks}{keep} (one request's blocks and the "
                "null block vLLM keeps back)"
                if blocks
                else "or raise --num-gpu-blocks-override",
                {"--num-gpu-blocks-override": blocks} if blocks else {},
            )
        )
    elif fixed:
        # the KV cache is the flag's size: the utilization does not move it
        need = needed * GIB if needed else (fixed * length / fits if fits and length else None)
        if need:
            target: float = math.ceil(need * 1.02 / MIB) * MIB
            out.append(
                Advice(
                    f"or raise --kv-cache-memory-bytes to {target}{keep} ({_gib(need / GIB)} of KV cache needed)",
                    {"--kv-cache-memory-bytes": target},
                )
            )
        else:
            out.append(Advice(f"or raise --kv-cache-memory-bytes{keep}", {}))
    elif util and total and needed is not None and available is not None:
        target = _util_up(util + (needed - available) / total + UTIL_MARGIN)
        if target <= UTIL_CEILING:
            out.append(
                Advice(
                    f"or raise --gpu-memory-utilization to {target}{keep} "
                    f"({_gib(needed)} of KV cache needed, {_gib(available)} available)",
                    {"--gpu-memory-utilization": target},
                )
            )
        else:
            out.append(
                Advice(f"raising --gpu-memory-utilization cannot keep {length}: it would need {target}", {})
            )
    else:
        detail = (
            f" ({_gib(needed)} of KV cache needed, {_gib(available)} available)"
            if needed and available
            else ""
        )
        out.append(Advice(f"or raise --gpu-memory-utilization{keep}{detail}", {}))
    if not k.cpu and not k.eager and not k.pool_fixed:
        out.append(
            Advice(
                "or --enforce-eager: no CUDA graphs, their memory goes to the KV cache",
                {"--enforce-eager": True},
            )
        )
    if not k.fp8_kv:
        out.append(
            Advice(
                "or --kv-cache-dtype fp8: about twice the tokens in the same memory (small quality cost)",
                {"--kv-cache-dtype": "fp8"},
            )
        )
    return out


def _no_kv_memory(k: _Known) -> list[Advice]:
    if k.pool_fixed:
        return _no_kv_memory_fixed(k)
    util, total = k.util(), k.number("total_gib")
    available, free = k.number("available_kv_gib"), k.number("free_gib")
    used = [f"weights {_gib(w)}" for w in [k.number("weights_gib")] if w]
    used += [f"activations {_gib(a)}" for a in [k.number("peak_activation_gib")] if a]
    if not used and k.number("consumed_gib"):
        used = [f"the model's {_gib(k.number('consumed_gib') or 0)}"]
    spent = f" after {' and '.join(used)}" if used else ""
    share = "the node's memory" if k.cpu else "the GPU"
    budget = f" ({util:.2f} of {share})" if util else ""
    full = "the node is full" if k.cpu else "the GPU is full"
    lead = (
        f"the budget{budget} has no room for a KV cache{spent}: RAISE "
        f"--gpu-memory-utilization — this error means the budget is too small, not that {full}"
    )
    out: list[Advice] = []
    if util and total:
        short = max(0.0, -(available or 0.0)) + 1.0  # reach at least 1 GiB of KV cache
        target = _util_up(util + short / total)
        # no more than is free: above that the startup check (or the allocation) fails instead
        fits = _util_down(free / total - UTIL_MARGIN) if free else UTIL_CEILING
        ceiling = min(UTIL_CEILING, fits)
        if target <= ceiling:
            out.append(Advice(f"{lead}; try {target}", {"--gpu-memory-utilization": target}))
        elif ceiling > util:
            out.append(
                Advice(
                    f"{lead}; {target} would be needed for 1 GiB of KV cache, but only {free:.2f} of "
                    f"{total:.2f} GiB is free: {ceiling} is the most that fits",
                    {"--gpu-memory-utilization": ceiling},
                )
            )
        elif free and fits < UTIL_CEILING:
            out.append(
                Advice(f"{lead}, but only {free:.2f} of {total:.2f} GiB is free: free memory first", {})
            )
        else:
            out.append(Advice(f"{lead}, but even {UTIL_CEILING} is not enough", {}))
    else:
        out.append(Advice(lead, {}))
    seqs = k.max_num_seqs()
    if seqs and seqs > 1:
        out.append(
            Advice(
                f"fewer --max-num-seqs ({seqs // 2}) and --max-num-batched-tokens shrink the activation peak",
                {"--max-num-seqs": seqs // 2},
            )
        )
    if not k.cpu and not k.eager:
        out.append(
            Advice(
                "--enforce-eager frees the CUDA graph memory reserved out of the budget",
                {"--enforce-eager": True},
            )
        )
    out.append(_more_gpus(k, "the weights leave too little of each GPU"))
    return out


def _no_kv_memory_fixed(k: _Known) -> list[Advice]:
    """The KV cache was sized by a flag too small for one block beside vLLM's null block: the
    utilization, the activations and CUDA graphs do not change it; only the flag does."""
    fixed, override = k.kv_cache_bytes(), k.blocks_override()
    length = k.max_model_len()
    if fixed is not None:
        per_token = _kv_bytes_per_token(k)
        need = (
            (math.ceil(length / k.block_size()) + 1) * k.block_size() * per_token
            if length and per_token
            else None
        )
        lead = (
            f"--kv-cache-memory-bytes {fixed} leaves no KV block beside the null block vLLM keeps back: "
            "RAISE --kv-cache-memory-bytes (--gpu-memory-utilization does not size this cache)"
        )
        if need:
            target = math.ceil(need / MIB) * MIB
            return [
                Advice(
                    f"{lead}; {target} holds one request of {length} tokens",
                    {"--kv-cache-memory-bytes": target},
                )
            ]
        return [Advice(lead, {})]
    blocks = math.ceil(length / k.block_size()) + 1 if length else 2
    return [
        Advice(
            f"--num-gpu-blocks-override {override} leaves no KV block beside the null block vLLM keeps back: "
            f"RAISE it to {blocks}" + (f" (one request of {length} tokens)" if length else ""),
            {"--num-gpu-blocks-override": blocks},
        )
    ]


def _kv_bytes_per_token(k: _Known) -> float | None:
    """KV bytes per token per GPU, from the pool and tokens vLLM printed."""
    available, tokens = k.number("available_kv_gib"), k.number("kv_cache_tokens")
    if available and tokens:
        return available * GIB / tokens
    needed, length = k.number("needed_gib"), k.max_model_len()
    if needed and length:
        return needed * GIB / length
    return None


def _free_below_util(k: _Known) -> list[Advice]:
    free, total = k.number("free_gib"), k.number("total_gib")
    util, requested = k.util(), k.number("requested_gib")
    kv = k.number("available_kv_gib")
    out: list[Advice] = []
    others = (
        f"{total - free:.2f} GiB of the node is used by other processes (see free -g)"
        if k.cpu and free is not None and total
        else f"{total - free:.2f} GiB is held by other processes or this one's CUDA context (see nvidia-smi)"
        if free is not None and total
        else ""
    )
    memory = "memory" if k.cpu else "GPU memory"
    if k.kv_cache_bytes() is not None or (requested is None and kv is not None):
        # --kv-cache-memory-bytes: the KV cache must fit in what is available now
        asked = _gib(kv) if kv is not None else f"{k.kv_cache_bytes()} bytes"
        if free is not None and total:
            size = math.floor((free - UTIL_MARGIN * total) * 1024) * MIB
            if size > 0:
                out.append(
                    Advice(
                        f"--kv-cache-memory-bytes asks for {asked} but only {free:.2f} GiB is available: "
                        f"LOWER --kv-cache-memory-bytes to {size}",
                        {"--kv-cache-memory-bytes": size},
                    )
                )
            out.append(Advice(f"or free {memory}: {others}", {}))
        else:
            out.append(Advice(f"LOWER --kv-cache-memory-bytes, or stop what else uses the {memory}", {}))
        return out
    if free and total:
        target = _util_down(free / total - UTIL_MARGIN)
        asks = (
            f" but --gpu-memory-utilization {util:g} asks for {_gib(requested)}" if util and requested else ""
        )
        if target > 0:
            where = " of the node is free for this server" if k.cpu else " is free at startup"
            out.append(
                Advice(
                    f"only {free:.2f} of {total:.2f} GiB{where}{asks}: LOWER "
                    f"--gpu-memory-utilization to {target}",
                    {"--gpu-memory-utilization": target},
                )
            )
        share = "the node's whole memory" if k.cpu else "the whole GPU"
        out.append(Advice(f"or free {memory}: {others}; the utilization is a share of {share}", {}))
    else:
        other = "the node's memory" if k.cpu else "the GPU"
        out.append(Advice(f"LOWER --gpu-memory-utilization, or stop what else uses {other}", {}))
    return out


def _oom_capture(k: _Known) -> list[Advice]:
    util = k.util()
    out: list[Advice] = []
    fixed = k.kv_cache_bytes()
    if fixed is not None:
        # the KV cache is the flag's size whatever the utilization says: only a smaller one leaves
        # room for the graphs (one utilization step of the card less)
        target: float = (fixed - k.pool_step_bytes(UTIL_MARGIN)) // MIB * MIB
        out.append(
            Advice(
                f"lower --kv-cache-memory-bytes to {target}: the KV cache is that size whatever "
                "--gpu-memory-utilization says, and CUDA graphs are captured beside it",
                {"--kv-cache-memory-bytes": target},
            )
        )
    elif util:
        target = round(util - UTIL_MARGIN, 2)
        out.append(
            Advice(
                f"lower --gpu-memory-utilization to {target}: CUDA graphs are captured outside the budget",
                {"--gpu-memory-utilization": target},
            )
        )
    else:
        out.append(
            Advice("lower --gpu-memory-utilization by 0.01: CUDA graphs are captured outside the budget", {})
        )
    seqs = k.max_num_seqs()
    largest = min(seqs * 2, 512) if seqs else 512
    out.append(
        Advice(
            f"or capture fewer graph sizes: --max-cudagraph-capture-size {max(largest // 2, 8)}",
            {"--max-cudagraph-capture-size": max(largest // 2, 8)},
        )
    )
    if not k.eager:
        out.append(
            Advice("or --enforce-eager: no graph capture at all (slower decoding)", {"--enforce-eager": True})
        )
    return out


def _oom_weights(k: _Known) -> list[Advice]:
    free, total = k.number("free_gib"), k.number("total_gib")
    out: list[Advice] = []
    if free is not None and total and free < 0.5 and (k.number("process_used_gib") or 0) < total * 0.5:
        out.append(
            Advice(f"the GPU had only {free:.2f} GiB free: another process holds it; free the GPU", {})
        )
    out.append(_more_gpus(k, "the weights do not fit one GPU"))
    out.append(Advice("or a quantized checkpoint (AWQ, GPTQ, FP8) to shrink the weights", {}))
    out.append(
        Advice(
            "or --cpu-offload-gb N to keep N GiB of weights per GPU in CPU memory (slow)",
            {"--cpu-offload-gb": 4},
        )
    )
    return out


def _oom_profiling(k: _Known) -> list[Advice]:
    fixed = k.kv_cache_bytes()
    if fixed is not None and k.number("kv_cache_tokens"):
        return _oom_kv_tensors(k, fixed)
    out: list[Advice] = []
    seqs = k.max_num_seqs()
    if seqs and seqs > 1:
        out.append(
            Advice(
                f"fewer --max-num-seqs ({seqs // 2}): the profile run's activation peak grows with it",
                {"--max-num-seqs": seqs // 2},
            )
        )
    tokens = k.number("max_num_batched_tokens", "--max-num-batched-tokens")
    new_tokens = max(2048, int(tokens) // 2) if tokens else 2048
    out.append(
        Advice(
            f"--max-num-batched-tokens {new_tokens}: the profile run processes this many tokens at once "
            "(with chunked prefill off it is the whole --max-model-len)",
            {"--max-num-batched-tokens": new_tokens},
        )
    )
    length = k.max_model_len()
    if length and length > 4096:
        new_len = round_length(length / 2)
        out.append(Advice(f"or a shorter --max-model-len ({new_len})", {"--max-model-len": new_len}))
    out.append(_more_gpus(k, "activations and weights together do not fit"))
    return out


def _oom_kv_tensors(k: _Known, fixed: int) -> list[Advice]:
    """vLLM sized the KV cache (it printed its tokens) and then could not allocate it: the
    ``--kv-cache-memory-bytes`` asked for more than was free after the weights and the profile run."""
    tried, free = k.number("tried_to_allocate_gib"), k.number("free_gib")
    short = max(0.0, (tried or 0.0) - (free or 0.0)) * GIB if tried is not None and free is not None else 0
    target = int(fixed - short - k.pool_step_bytes(UTIL_MARGIN)) // MIB * MIB
    what = (
        f" (it tried {_gib(tried)} with {_gib(free)} free)" if tried is not None and free is not None else ""
    )
    out = []
    if target > 0:
        out.append(
            Advice(
                f"the KV cache of --kv-cache-memory-bytes {fixed} did not fit beside the weights and "
                f"activations{what}: LOWER --kv-cache-memory-bytes to {target}",
                {"--kv-cache-memory-bytes": target},
            )
        )
    else:
        out.append(Advice(f"LOWER --kv-cache-memory-bytes: the KV cache did not fit{what}", {}))
    out.append(
        Advice(
            "or drop --kv-cache-memory-bytes and let --gpu-memory-utilization size the KV cache from "
            "what the profile run leaves",
            {"--kv-cache-memory-bytes": None},
        )
    )
    return out


def _oom_runtime(k: _Known) -> list[Advice]:
    out: list[Advice] = []
    tried, free = k.number("tried_to_allocate_gib"), k.number("free_gib")
    what = f" (it needed {_gib(tried)} more with {_gib(free)} free)" if tried and free is not None else ""
    seqs = k.max_num_seqs()
    if seqs and seqs > 1:
        out.append(
            Advice(
                f"fewer --max-num-seqs ({seqs // 2}): the server ran out of memory under load{what}",
                {"--max-num-seqs": seqs // 2},
            )
        )
    util = k.util()
    fixed = k.kv_cache_bytes()
    if fixed is not None:
        target: float = (fixed - k.pool_step_bytes(0.03)) // MIB * MIB
        out.append(
            Advice(
                f"lower --kv-cache-memory-bytes to {target}: the KV cache is that size whatever "
                f"--gpu-memory-utilization says; leave room for activations beside it{'' if out else what}",
                {"--kv-cache-memory-bytes": target},
            )
        )
    elif util:
        target = round(util - 0.03, 2)
        out.append(
            Advice(
                f"lower --gpu-memory-utilization to {target}: leave room for activations outside the budget"
                f"{'' if out else what}",
                {"--gpu-memory-utilization": target},
            )
        )
    else:
        out.append(Advice(f"lower --gpu-memory-utilization by 0.03 to leave room for activations{what}", {}))
    if k.flags.get("--no-enable-chunked-prefill") or k.flags.get("--enable-chunked-prefill") is False:
        out.append(
            Advice(
                "turn chunked prefill back on: a whole long prompt's activations arrive at once",
                {"--enable-chunked-prefill": True},
            )
        )
    out.append(
        Advice(
            "or a smaller --max-num-batched-tokens, so each step's activations stay small",
            {"--max-num-batched-tokens": 2048},
        )
    )
    return out


def _mamba(k: _Known) -> list[Advice]:
    limit = k.number("max_num_seqs_limit")
    seqs = k.max_num_seqs()
    if not limit:
        knob = "--kv-cache-memory-bytes" if k.kv_cache_bytes() is not None else "--gpu-memory-utilization"
        return [Advice(f"lower --max-num-seqs or raise {knob}", {})]
    new = int(limit) // 8 * 8 if limit >= 8 else int(limit)
    asked = f" but --max-num-seqs is {seqs}" if seqs else ""
    return [
        Advice(
            f"only {int(limit)} Mamba cache blocks fit{asked} (one per running sequence): use --max-num-seqs {new}",
            {"--max-num-seqs": new},
        ),
        Advice(
            "or raise --kv-cache-memory-bytes to fit more blocks"
            if k.kv_cache_bytes() is not None
            else "or raise --gpu-memory-utilization to fit more blocks",
            {},
        ),
    ]


def _profiling_changed(k: _Known) -> list[Advice]:
    first, later = k.number("initial_free_gib"), k.number("current_free_gib")
    moved = f" (free memory went from {first:.2f} to {later:.2f} GiB)" if first and later else ""
    out = [
        Advice(
            f"another process freed or took GPU memory while vLLM profiled{moved}: start instances one at a "
            "time and keep the GPU to this server while it starts",
            {},
        )
    ]
    fit = k.number("kv_cache_memory_fit_bytes")
    if k.kv_cache_bytes() is not None:
        pass  # already sized by the flag: vLLM skipped the profiling-based sizing
    elif fit:
        out.append(
            Advice(
                f"or fix the KV cache size and skip profiling: --kv-cache-memory-bytes {int(fit)}",
                {"--kv-cache-memory-bytes": int(fit)},
            )
        )
    else:
        out.append(
            Advice(
                "or fix the KV cache size and skip profiling with --kv-cache-memory-bytes "
                "(the value a clean start printed as --kv-cache-memory=)",
                {},
            )
        )
    return out


def _arg_error(k: _Known) -> list[Advice]:
    facts = k.facts
    unknown = str(facts.get("unrecognized_arguments", ""))
    out: list[Advice] = []
    for word in unknown.split():
        flag = word.split("=")[0].replace("_", "-")
        if flag in REMOVED_FLAGS:
            out.append(Advice(f"{flag} was removed from vLLM: {REMOVED_FLAGS[flag]}", {flag: None}))
    if unknown and not out:
        out.append(
            Advice(
                f"this vLLM does not accept {unknown}: check `vllm serve --help`; a flag and its value "
                "passed as one argument ('--flag value') also fails, write --flag=value",
                {},
            )
        )
    derived = facts.get("derived_max_model_len")
    if isinstance(derived, int):
        out.append(
            Advice(
                f"the model takes {derived} tokens: use --max-model-len {derived}, or stretch its RoPE with "
                "YaRN ('vllm-tune find --allow rope-scaling' writes the --hf-overrides this vLLM needs; static "
                "YaRN can degrade short texts); VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 only lifts the check, the model "
                "then sees positions it never saw",
                {"--max-model-len": derived},
            )
        )
    batched, seqs = facts.get("max_num_batched_tokens"), facts.get("max_num_seqs")
    if isinstance(batched, int) and isinstance(seqs, int):
        out.append(
            Advice(
                f"--max-num-batched-tokens ({batched}) must be at least --max-num-seqs ({seqs}): "
                f"use --max-num-batched-tokens {seqs}",
                {"--max-num-batched-tokens": seqs},
            )
        )
    if "required_compute_capability" in facts:
        out.append(Advice("this GPU has no bfloat16: use --dtype half", {"--dtype": "half"}))
    if not out:
        out.append(
            Advice(
                "fix the flag named in the error line; `vllm serve --help` lists what this vLLM accepts", {}
            )
        )
    return out


def _timeout(k: _Known) -> list[Advice]:
    return [
        Advice(
            "the engine did not finish starting: check the last lines for progress (weights still loading, "
            "a compile, a download); raise VLLM_ENGINE_READY_TIMEOUT_S (default 600) for large models",
            {},
        ),
    ]


def _died(k: _Known) -> list[Advice]:
    return [
        Advice("not a memory limit that flags can fix: read the error line above and the lines before it", {})
    ]


def _port_in_use(k: _Known) -> list[Advice]:
    return [
        Advice(
            "pick a free port with --port N, or stop what holds this one (ss -ltnp shows it); "
            "not a memory problem",
            {},
        )
    ]


def _more_gpus(k: _Known, why: str) -> Advice:
    tp = k.tp()
    if k.cpu:  # the CPU backend shards over NUMA nodes, one rank each
        why = why.replace("GPU", "NUMA node")
        return Advice(
            f"{why}: split the model over more NUMA nodes, --tensor-parallel-size {tp * 2}",
            {"--tensor-parallel-size": tp * 2},
        )
    return Advice(
        f"{why}: use more GPUs, --tensor-parallel-size {tp * 2}", {"--tensor-parallel-size": tp * 2}
    )


_RULES: dict[str, Callable[[_Known], list[Advice]]] = {
    "kv_cache_insufficient_for_max_len": _kv_insufficient,
    "no_kv_cache_memory": _no_kv_memory,
    "startup_free_memory_below_utilization": _free_below_util,
    "oom_cudagraph_capture": _oom_capture,
    "oom_weights_load": _oom_weights,
    "oom_during_profiling": _oom_profiling,
    "oom_at_runtime": _oom_runtime,
    "mamba_blocks_below_max_num_seqs": _mamba,
    "profiling_memory_changed": _profiling_changed,
    "unsupported_flag_or_arg_error": _arg_error,
    "startup_timeout": _timeout,
    "port_in_use": _port_in_use,
    "engine_core_died_other": _died,
}
