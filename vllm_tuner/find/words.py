"""The live view's words for one trial of ``find``: its flags, its outcome, a past trial reused."""

from __future__ import annotations

from ..serveconfig import ServeConfig
from ..trial import TrialOutcome
from ..units import GIB


def known_words(t: TrialOutcome) -> str:
    if t.verdict == "unstable":
        return f"unstable under load: {t.probe_failure or t.category.replace('_', ' ')}"
    return t.category.replace("_", " ")


def flags_words(cfg: ServeConfig) -> str:
    return " ".join(
        f"{k}" if v is True else f"{k} {v}"
        for k, v in cfg.flags().items()
        if k not in ("--tensor-parallel-size", "--load-format")
    )


def outcome_words(t: TrialOutcome) -> str:
    f = t.facts
    if t.verdict in ("stable", "boots", "unstable"):
        bits = []
        if "available_kv_gib" in f:
            bits.append(f"KV {f['available_kv_gib']:.2f} GiB")
        if "kv_cache_tokens" in f:
            bits.append(f"{int(f['kv_cache_tokens']):,} tokens")
        if t.min_headroom_bytes is not None:
            bits.append(f"headroom {t.min_headroom_bytes / GIB:.2f} GiB")
        if t.probe_failure:
            bits.append(t.probe_failure)
        return ", ".join(bits)
    words = t.category.replace("_", " ")
    if t.evidence and t.category in ("unsupported_flag_or_arg_error", "engine_core_died_other", "unknown"):
        words += f" ({t.evidence.strip()[:200]})"
    if "estimated_max_model_len" in f:
        words += f" (vLLM: estimated maximum model length is {int(f['estimated_max_model_len'])})"
    return words
