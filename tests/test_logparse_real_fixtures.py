"""Logs real vLLM 0.32 printed on the CPU, captured by the real-vLLM tier (``VLLM_TUNE_CAPTURE_LOGS``), read
back by the classifier without vLLM: each file's category, and the numbers the log itself prints, as
``expected.json`` records them (written from the log lines by hand-checked regexes, not by the classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tuner.logparse import classify

REAL = Path(__file__).parent / "data" / "logs" / "real"
EXPECTED = json.loads((REAL / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_real_vllm_log_is_read_right(name):
    want = EXPECTED[name]
    diagnosis = classify((REAL / name).read_text(errors="replace"))
    assert diagnosis.category == want["category"], diagnosis.evidence
    for key, value in want["facts"].items():
        assert diagnosis.facts.get(key) == pytest.approx(value), key


def test_every_real_log_has_an_expectation():
    assert sorted(p.name for p in REAL.glob("*.log")) == sorted(EXPECTED)
