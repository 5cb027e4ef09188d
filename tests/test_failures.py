"""Every failure category is declared once (failures.py) and has its place everywhere it must: a title,
a search response that stops or moves a cap, advice where there is a cause to act on, and the log
lines that name it reach the rules that read them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from re import _parser as sre_parse  # the parser re itself uses: the literal text a pattern requires

import pytest

from vllm_tuner import failures, logparse
from vllm_tuner.advice import advise
from vllm_tuner.failures import CATEGORIES, NAMES, TRANSIENT, Response
from vllm_tuner.logparse import Diagnosis, classify
from vllm_tuner.search import Observation, Policy, ProbeSummary, Request
from vllm_tuner.serveconfig import ServeConfig

# Markers of logparse's own rules, resolved into a category before any diagnosis names them: a raw
# out-of-memory error is placed in its phase, a death notice waits for its cause.
_RESOLVED_LATER = {"oom", "died"}


GIB = 1 << 30


@dataclass
class _Pool:
    """A plain estimate: 8 GiB of KV at 128 KiB a token, whatever the config."""

    kv_pool_bytes: int = 8 * GIB
    kv_bytes_per_token: int = 128 << 10
    weights_bytes: int = 14 * GIB
    non_kv_bytes: int = 15 * GIB
    cudagraph_bytes: int = GIB // 2

    def max_context(self, seqs: int) -> int:
        return self.kv_pool_bytes // (self.kv_bytes_per_token * seqs)

    def max_seqs(self, context: int) -> int:
        return self.kv_pool_bytes // (self.kv_bytes_per_token * context)


def _policy() -> Policy:
    return Policy(
        Request(), ServeConfig(model="m"), estimate=lambda cfg, cal: _Pool(), calibrate=lambda f, c: None
    )


def test_every_category_is_declared_once_with_a_title():
    assert len(NAMES) == len(set(NAMES)) == len(CATEGORIES)
    assert NAMES[0] == "success" and "unknown" in NAMES
    for category in CATEGORIES:
        assert category.title and category.title[0].islower(), category.name
        assert failures.title(category.name) == category.title
    assert failures.title("not_declared") == "not_declared"
    with pytest.raises(KeyError):
        failures.category("not_declared")


def test_a_category_that_can_end_the_search_says_why():
    for category in CATEGORIES:
        ends = category.response in (Response.STOP, Response.RETRY_ONCE)
        assert bool(category.stop) == ends, category.name
        if ends:
            assert "{" not in category.stop_reason("GPU"), category.name


def test_a_failure_that_no_memory_knob_fixes_stops_the_search():
    for category in CATEGORIES:
        assert category.memory or category.response is Response.STOP, category.name


def test_transient_failures_are_the_ones_that_say_nothing_about_the_config():
    transient = {
        "startup_timeout",
        "profiling_memory_changed",
        "engine_core_died_other",
        "port_in_use",
        "unknown",
    }
    assert transient == TRANSIENT


@pytest.mark.parametrize("name", NAMES)
def test_the_search_has_a_disposition_for_every_category(name):
    """One failed launch of each category: the policy stops with the declared reason, or moves on."""
    category = failures.category(name)
    cfg = ServeConfig(model="m", max_model_len=8192, max_num_seqs=1, gpu_memory_utilization=0.90)
    facts = {"free_gib": 20.0, "total_gib": 32.0, "max_num_seqs_limit": 4}
    probe = ProbeSummary(ok=True) if name == "success" else None
    policy = _policy()
    caps = policy.caps([Observation(cfg, name, facts, probe)])
    if category.response is Response.STOP:
        assert (caps.stop, caps.stop_is_memory) == (category.stop_reason("GPU"), category.memory)
    else:
        assert caps.stop is None, name
    twice = policy.caps([Observation(cfg, name, facts), Observation(cfg, name, facts)])
    if category.response is Response.RETRY_ONCE:
        assert twice.stop == category.stop_reason("GPU")


def test_every_response_has_a_handler_in_the_search():
    assert set(Policy._LEARN) == set(Response)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("success", "unknown")])
def test_every_failure_with_a_cause_has_advice(name):
    assert advise(Diagnosis(name)), name


def test_nothing_to_advise_without_a_failure_or_a_cause():
    assert advise(Diagnosis("success")) == advise(Diagnosis("unknown")) == []


def test_every_category_the_log_rules_name_is_declared():
    named = {category for _, category in logparse._FATAL_RULES}
    assert named - _RESOLVED_LATER <= set(NAMES)
    assert set(logparse._OOM_CATEGORY.values()) <= set(NAMES)
    assert logparse.CATEGORIES == NAMES


def _literal_runs(branch: sre_parse.SubPattern) -> list[str]:
    """The runs of plain text every match of ``branch`` contains."""
    runs, run = [], ""
    for op, value in branch:
        if op is sre_parse.LITERAL:
            run += chr(value)
        else:
            runs.append(run)
            run = ""
    return [r for r in [*runs, run] if r]


def _branches(pattern: re.Pattern[str]) -> list[sre_parse.SubPattern]:
    parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    if len(parsed) == 1 and parsed[0][0] is sre_parse.BRANCH:
        return [sre_parse.SubPattern(parsed.state, list(b)) for b in parsed[0][1][1]]
    return [parsed]


@pytest.mark.parametrize("pattern", [p for p, _ in logparse._FATAL_RULES], ids=lambda p: p.pattern[:40])
def test_every_fatal_rule_passes_the_prefilter(pattern):
    """Every text a fatal rule matches holds one of the prefilter's words, or the rule is never tried."""
    for branch in _branches(pattern):
        text = " ".join(_literal_runs(branch)).lower()
        assert any(word in run.lower() for run in _literal_runs(branch) for word in logparse._FATAL_WORDS), (
            f"{pattern.pattern!r}: the branch with {text!r} holds none of _FATAL_WORDS"
        )


@pytest.mark.parametrize(
    ("line", "category"),
    [
        # the CPU backend's refusal, wrapped so that "memory" fell out of the lines the rules see
        (
            "node 0 (3.1/64.0 GiB) on kv cache allocation is less than requested",
            "startup_free_memory_below_utilization",
        ),
        ("Address already in use", "port_in_use"),
    ],
)
def test_a_fatal_line_is_read_without_the_words_of_other_lines(line, category):
    assert classify(line + "\n").category == category
