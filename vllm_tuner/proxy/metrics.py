"""The proxy's own ``/metrics``: counters and gauges as Prometheus text. Pure."""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "vllm_tune_proxy_"
# name (without the prefix) -> (type, help)
FAMILIES: dict[str, tuple[str, str]] = {
    "requests_total": ("counter", "Requests answered, by route, model and status code."),
    "in_flight": ("gauge", "Requests an upstream is answering now."),
    "compressed_total": ("counter", "Chats compressed to fit the upstream's max-model-len."),
    "compressed_prompt_tokens_before_total": ("counter", "Prompt tokens of the compressed chats as sent."),
    "compressed_prompt_tokens_after_total": (
        "counter",
        "Prompt tokens of the compressed chats as forwarded.",
    ),
    "compressed_turns_total": ("counter", "Turns left out, cut or summarised."),
    "too_long_total": ("counter", "Chats refused: even compressed they do not fit."),
    "length_retries_total": ("counter", "Upstream 400s about the input's length, retried once compressed."),
    "summaries_total": ("counter", "Summaries the upstream model wrote."),
    "summary_cache_hits_total": ("counter", "Summaries of a conversation prefix found in the cache."),
    "summary_failures_total": ("counter", "Summaries that could not be written (the chat was trimmed)."),
    "uncounted_total": ("counter", "Chats forwarded uncounted: the upstream's /tokenize did not answer."),
    "upstream_errors_total": (
        "counter",
        "Requests the proxy could not relay: unreachable, timed out, broken off.",
    ),
}

Labels = tuple[tuple[str, str], ...]


class ProxyMetrics:
    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = {name: {} for name in FAMILIES}

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        series = self._values[name]
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, in_flight: Mapping[str, int]) -> str:
        """Every family with HELP and TYPE; ``in_flight`` (per upstream URL) read at this moment."""
        gauges = {(("upstream", url),): float(n) for url, n in in_flight.items()}
        lines = []
        for name, (kind, help_) in FAMILIES.items():
            lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}"]
            series = gauges if name == "in_flight" else self._values[name]
            for labels, value in sorted(series.items()):
                text = ",".join(f'{k}="{_escaped(v)}"' for k, v in labels)
                lines.append(f"{PREFIX}{name}{{{text}}} {value}" if text else f"{PREFIX}{name} {value}")
        return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
