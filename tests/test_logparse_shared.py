"""One test per real vLLM log excerpt in ../shared/logs: the category and the numbers it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tuner.logparse import classify

LOGS = Path(__file__).resolve().parents[1].parent / "shared" / "logs"

# A row's number -> (fact key, factor from the row's unit to the fact's unit).
NUMBER_KEYS: dict[str, tuple[str, float]] = {
    "max_model_len": ("max_model_len", 1),
    "requested_max_model_len": ("max_model_len", 1),
    "derived_max_model_len": ("derived_max_model_len", 1),
    "kv_cache_max_tokens": ("kv_cache_tokens", 1),
    "num_gpu_blocks": ("num_gpu_blocks", 1),
    "num_cpu_blocks": ("num_cpu_blocks", 1),
    "kv_cache_size_gib": ("available_kv_gib", 1),
    "kv_cache_gib": ("available_kv_gib", 1),
    "kv_cache_gib_per_gpu": ("available_kv_gib", 1),
    "kv_cache_reserved_gib": ("available_kv_gib", 1),
    "available_gib": ("available_kv_gib", 1),
    "needed_gib": ("needed_gib", 1),
    "estimated_max_model_len": ("estimated_max_model_len", 1),
    "weights_gib": ("weights_gib", 1),
    "weights_gib_per_gpu": ("weights_gib", 1),
    "peak_torch_memory_gib": ("peak_torch_gib", 1),
    "activation_peak_gib": ("peak_activation_gib", 1),
    "non_torch_gib": ("non_torch_gib", 1),
    "max_concurrency": ("max_concurrency", 1),
    "total_gpu_gib": ("total_gib", 1),
    "total_capacity_gib": ("total_gib", 1),
    "budget_gib": ("requested_gib", 1),
    "gpu_memory_utilization": ("gpu_memory_utilization", 1),
    "free_gib": ("free_gib", 1),
    "total_gib": ("total_gib", 1),
    "requested_gib": ("requested_gib", 1),
    "tried_to_allocate_mib": ("tried_to_allocate_gib", 1 / 1024),
    "free_mib": ("free_gib", 1 / 1024),
    "free_kib": ("free_gib", 1 / 1024**2),
    "process_in_use_gib": ("process_used_gib", 1),
    "allocated_by_pytorch_gib": ("torch_allocated_gib", 1),
    "initial_free_gib": ("initial_free_gib", 1),
    "current_free_gib": ("current_free_gib", 1),
    "compute_capability": ("compute_capability", 1),
    "required_compute_capability": ("required_compute_capability", 1),
}
# Numbers the classifier does not read, on purpose: allocator detail that no advice uses.
NOT_READ = {"private_pools_mib", "reserved_unallocated_mib", "overshoot_vs_profile_gib"}
# (row id, number) pairs that the excerpt prints but in a form no parser can read.
UNREADABLE = {
    ("F018", "process_in_use_gib"): "the reporter's paste splits 'this proce\\nss has'",
    ("F054", "total_capacity_gib"): "the excerpt stops before the free memory's unit",
    ("F054", "free_mib"): "the excerpt stops before the unit ('of which 212.81')",
}
# Startup rows: field -> fact key. ``cudagraph_gib`` of S010 is vLLM's estimate (see the row's notes).
STARTUP_KEYS = {
    "weights_gib": "weights_gib",
    "available_kv_gib": "available_kv_gib",
    "kv_cache_tokens": "kv_cache_tokens",
    "num_gpu_blocks": "num_gpu_blocks",
    "max_concurrency": "max_concurrency",
    "max_concurrency_tokens_per_request": "concurrency_tokens",
}


def _rows(name: str) -> list[dict]:
    path = LOGS / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _params(name: str) -> list:
    rows = _rows(name)
    if not rows:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{LOGS / name} is not present"))]
    return [pytest.param(row, id=row["id"]) for row in rows]


def _printed(value: float, text: str) -> bool:
    """Whether the excerpt shows this number in some usual rendering."""
    forms = {str(value), f"{value:.2f}", f"{value:.1f}", f"{value:,}", f"{value:.4f}"}
    if float(value).is_integer():
        forms |= {str(int(value)), f"{int(value):,}"}
    return any(form in text for form in forms)


def _expected_category(row: dict) -> str:
    if row["category"] == "other":
        assert "Error in memory profiling" in row["log_excerpt"], (
            "only the profiling assertion is 'other' today"
        )
        return "profiling_memory_changed"
    return row["category"]


@pytest.mark.parametrize("row", _params("failures.jsonl"))
def test_failure_row(row: dict) -> None:
    text = row["log_excerpt"]
    diagnosis = classify(text)
    assert diagnosis.category == _expected_category(row), diagnosis.evidence
    checked = 0
    for name, value in (row.get("numbers") or {}).items():
        if name in NOT_READ or (row["id"], name) in UNREADABLE:
            continue
        assert name in NUMBER_KEYS, f"no mapping for the row's number {name}"
        if not isinstance(value, (int, float)) or not _printed(value, text):
            continue  # the number came from the thread's prose or title, not this excerpt
        key, factor = NUMBER_KEYS[name]
        assert diagnosis.facts.get(key) == pytest.approx(value * factor, rel=1e-3, abs=1e-4), key
        checked += 1
    if row["id"] in ("F001", "F004", "F040", "F009", "F013"):
        assert checked >= 4  # the rows that print several numbers really get them read


@pytest.mark.parametrize("row", _params("startups.jsonl"))
def test_startup_row(row: dict) -> None:
    text = row["log_excerpt"]
    diagnosis = classify(text)
    # An excerpt stops before the server is ready: no failure, and not yet a success.
    assert diagnosis.category == "unknown"
    assert diagnosis.phase == "profiling"
    for field, key in STARTUP_KEYS.items():
        value = row.get(field)
        if value is not None:
            assert diagnosis.facts.get(key) == pytest.approx(value), key
    if row.get("cudagraph_gib") is not None:
        assert diagnosis.facts.get("cudagraph_estimated_gib") == pytest.approx(row["cudagraph_gib"])
    ready = classify(text + "\n(APIServer pid=1) INFO:     Application startup complete.")
    assert ready.category == "success"
    assert ready.facts == diagnosis.facts


def test_weights_reported_in_mb_are_converted() -> None:
    rows = {row["id"]: row for row in _rows("startups.jsonl")}
    if "S019" not in rows:
        pytest.skip("shared logs not present")
    assert classify(rows["S019"]["log_excerpt"]).facts["weights_gib"] == pytest.approx(14737.2578 / 1024)
