"""``vllm-tune diagnose LOGFILE``: explain a vLLM log — the category, the numbers, the next flags."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import click

from ..advice import Advice, advise
from ..errors import UsageError
from ..failures import title as category_title
from ..logparse import Diagnosis, classify, launch_flags

# Facts shown in the human output, in this order, with their labels and units.
_SHOWN: tuple[tuple[str, str, str], ...] = (
    ("vllm_version", "vLLM", ""),
    ("max_model_len", "max model len", "tokens"),
    ("derived_max_model_len", "model's max len", "tokens"),
    ("estimated_max_model_len", "max len that fits", "tokens"),
    ("weights_gib", "weights", "GiB"),
    ("available_kv_gib", "KV cache memory", "GiB"),
    ("needed_gib", "KV cache needed", "GiB"),
    ("kv_cache_tokens", "KV cache", "tokens"),
    ("num_gpu_blocks", "GPU blocks", ""),
    ("max_concurrency", "max concurrency", "x"),
    ("concurrency_tokens", "at tokens per request", ""),
    ("cudagraph_estimated_gib", "CUDA graphs (estimated)", "GiB"),
    ("cudagraph_gib", "CUDA graphs", "GiB"),
    ("peak_activation_gib", "peak activation", "GiB"),
    ("total_gib", "GPU total", "GiB"),
    ("free_gib", "GPU free", "GiB"),
    ("gpu_memory_utilization", "gpu-memory-utilization", ""),
    ("requested_gib", "requested", "GiB"),
    ("tried_to_allocate_gib", "tried to allocate", "GiB"),
    ("initial_free_gib", "free before profiling", "GiB"),
    ("current_free_gib", "free after profiling", "GiB"),
    ("max_num_seqs", "max num seqs", ""),
    ("max_num_seqs_limit", "max num seqs that fit", ""),
    ("kv_cache_memory_fit_bytes", "--kv-cache-memory (fit)", "bytes"),
    ("kv_cache_memory_full_bytes", "--kv-cache-memory (full)", "bytes"),
    ("init_seconds", "engine init", "s"),
)

# vLLM's CPU backend (the fact ``platform`` = "cpu") budgets one NUMA node's RAM as a GPU's memory: the
# same facts, in the words of host memory, with the platform itself and what the worker used outside its
# KV cache (vLLM prints it in the line that sets the KV size).
_CPU_LABELS = {
    "num_gpu_blocks": "KV cache blocks",
    "total_gib": "NUMA node total",
    "free_gib": "NUMA node available",
}
_CPU_ADDED = {  # key -> the row shown after it
    "vllm_version": ("platform", "platform", ""),
    "requested_gib": ("consumed_gib", "consumed by non-KV usage", "GiB"),
}
_PLATFORM_WORDS = {"cpu": "cpu (vLLM's CPU backend: the memory is a NUMA node's RAM)"}


def shown_facts(facts: Mapping[str, object]) -> list[tuple[str, str, str]]:
    """The rows of the human output for a log's facts: :data:`_SHOWN` as it is for a GPU, in host-memory
    words (and with the platform and the non-KV usage) for vLLM's CPU backend."""
    if facts.get("platform") != "cpu":
        return list(_SHOWN)
    rows = []
    for key, label, unit in _SHOWN:
        rows.append((key, _CPU_LABELS.get(key, label), unit))
        if key in _CPU_ADDED:
            rows.append(_CPU_ADDED[key])
    return rows


@click.command(name="diagnose")
@click.argument("logfile", required=False)
@click.option("json_", "--json", is_flag=True, help="Print one JSON object: category, facts, advice.")
@click.option(
    "--max-model-len", type=int, help="The --max-model-len the launch used, if the log does not show it."
)
@click.option("--gpu-memory-utilization", type=float, help="The --gpu-memory-utilization the launch used.")
@click.option("--max-num-seqs", type=int, help="The --max-num-seqs the launch used.")
@click.option(
    "--gpu-total-gib",
    type=float,
    help="One GPU's total memory in GiB (on vLLM's CPU backend: one NUMA node's), if the log does not print it.",
)
def command(
    logfile: str | None,
    json_: bool,
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    max_num_seqs: int | None,
    gpu_total_gib: float | None,
) -> None:
    """Explain a vLLM log: what failed, the numbers vLLM printed, and which flag to change.

    \b
    Examples:
      vllm-tune diagnose vllm.log
      docker logs vllm 2>&1 | vllm-tune diagnose --json
    """
    text = _read_log(logfile)
    diagnosis = classify(text)
    flags = launch_flags(text)
    given = {
        "--max-model-len": max_model_len,
        "--gpu-memory-utilization": gpu_memory_utilization,
        "--max-num-seqs": max_num_seqs,
    }
    flags.update({k: v for k, v in given.items() if v is not None})
    advice = advise(diagnosis, flags, gpu_total_gib=gpu_total_gib)
    if json_:
        click.echo(json.dumps(report(diagnosis, advice, flags), indent=2))
    else:
        click.echo(render(diagnosis, advice))


def _read_log(logfile: str | None) -> str:
    if logfile in (None, "-"):
        if logfile is None and sys.stdin.isatty():
            raise UsageError("no log given", "pass a LOGFILE or pipe the log into 'vllm-tune diagnose'")
        return sys.stdin.read()
    path = Path(logfile)
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise UsageError(f"no such log file: {path}", "pass the path of a vLLM server log") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", "pass a readable vLLM server log") from exc


def report(diagnosis: Diagnosis, advice: list[Advice], flags: dict[str, object]) -> dict[str, object]:
    """The ``--json`` document."""
    return {
        "category": diagnosis.category,
        "title": category_title(diagnosis.category),
        "evidence": diagnosis.evidence,
        "inferred": diagnosis.inferred,
        "phase": diagnosis.phase,
        "facts": diagnosis.facts,
        "flags": {k: v for k, v in flags.items() if _jsonable(v)},
        "advice": [{"text": a.text, "changes": a.changes} for a in advice],
    }


def _jsonable(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def render(diagnosis: Diagnosis, advice: list[Advice]) -> str:
    """The human report: category in words, the evidence, the numbers, the advice."""
    title = category_title(diagnosis.category)
    lines = [f"{title} ({diagnosis.category})"]
    if diagnosis.inferred:
        lines.append("  inferred: the log has no error message; judged from where the stack trace stopped")
    if diagnosis.evidence:
        lines.append(f"  evidence: {_shorten(diagnosis.evidence, 300)}")
    numbers = [
        _fact_text(key, label, unit, diagnosis.facts[key])
        for key, label, unit in shown_facts(diagnosis.facts)
        if key in diagnosis.facts
    ]
    if numbers:
        lines.append("  numbers:")
        lines += [f"    {n}" for n in numbers]
    if advice:
        lines.append("next:")
        for index, item in enumerate(advice, 1):
            lines.append(f"  {index}. {item.text}")
    return "\n".join(lines)


def _fact_text(key: str, label: str, unit: str, value: object) -> str:
    if key == "platform":
        value = _PLATFORM_WORDS.get(str(value), value)
    if isinstance(value, float) and unit == "GiB":
        shown = f"{value:.2f} GiB" if value == 0 or abs(value) >= 0.1 else f"{value * 1024:.2f} MiB"
    elif isinstance(value, int) and unit in ("tokens", "", "bytes") and key != "vllm_version":
        shown = f"{value:,}" + (f" {unit}" if unit else "")
    elif unit == "x":
        shown = f"{value}x"
    else:
        shown = f"{value}" + (f" {unit}" if unit else "")
    return f"{label + ':':<26} {shown}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
