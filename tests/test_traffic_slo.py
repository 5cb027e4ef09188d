"""Workload mixes and files, and SLO parsing, of find --objective throughput (plain data)."""

from __future__ import annotations

import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.slo import parse_slo
from vllm_tuner.traffic import MIXES, check_fits_model, traffic_named


@pytest.mark.parametrize("name", sorted(MIXES))
def test_named_mixes_draw_within_their_documented_ranges(name):
    traffic = traffic_named(name)
    drawn = [traffic.draw(n) for n in range(400)]
    lo_p = min(c.prompt_tokens[0] for c in MIXES[name])
    assert all(p >= lo_p and p + o <= traffic.longest for p, o in drawn)
    assert drawn == [traffic.draw(n) for n in range(400)]  # the same sequence every time
    assert len(set(drawn)) > 300  # and not one request over and over
    assert name in traffic.describe()


def test_mixes_differ_in_shape_as_documented():
    def mean(name, i):
        t = traffic_named(name)
        return sum(t.draw(n)[i] for n in range(500)) / 500

    assert mean("rag", 0) > 2 * mean("chat", 0)  # long prompts
    assert mean("rag", 1) < mean("code", 1)  # short answers
    assert traffic_named("agent").longest > traffic_named("rag").longest


def test_workload_file_rows_and_their_longest(tmp_path):
    f = tmp_path / "traffic.csv"
    f.write_text("prompt_tokens,output_tokens\n1200,300\n# a comment\n\n5000,80\n")
    traffic = traffic_named(str(f))
    assert traffic.rows == ((1200, 300), (5000, 80))
    assert traffic.longest == 5080
    assert {traffic.draw(n) for n in range(50)} == {(1200, 300), (5000, 80)}


def test_a_bad_row_is_one_line_naming_it(tmp_path):
    f = tmp_path / "traffic.csv"
    f.write_text("prompt_tokens,output_tokens\n1200,300\nlots,80\n")
    with pytest.raises(UsageError) as err:
        traffic_named(str(f))
    assert "line 3" in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_workload_names_the_mixes():
    with pytest.raises(UsageError, match="chat, rag, code, agent"):
        traffic_named("nosuch")


def test_a_workload_longer_than_the_model_is_refused():
    with pytest.raises(UsageError, match="28,500 tokens, more than tiny"):
        check_fits_model(traffic_named("agent"), 4096, "tiny")
    check_fits_model(traffic_named("chat"), 32768, "big")


def test_slo_parses_percentiles_operators_and_units():
    slo = parse_slo("ttft:p95<=2s, itl:p99<100ms,e2e:p50<=1.5s")
    assert [(lim.key, lim.strict, lim.seconds) for lim in slo.limits] == [
        ("ttft_p95", False, 2.0),
        ("itl_p99", True, 0.1),
        ("e2e_p50", False, 1.5),
    ]
    assert slo.broken({"ttft_p95": 2.0, "itl_p99": 0.05, "e2e_p50": 1.0}) == []
    assert slo.broken({"ttft_p95": 2.0, "itl_p99": 0.1, "e2e_p50": 1.0}) == [
        "ITL SLO (p99 100 ms, limit 100 ms)"
    ]
    assert slo.broken({"ttft_p95": 2.5, "itl_p99": 0.01, "e2e_p50": None})[0].startswith(
        "TTFT SLO (p95 2.5 s"
    )
    assert not parse_slo(None) and not parse_slo("")


@pytest.mark.parametrize(
    "bad", ["ttft<=2s", "ttft:p97<=2s", "tpot:p95<=2s", "ttft:p95=>2s", "ttft:p95<=2", "ttft:p95<=0s"]
)
def test_a_bad_slo_says_the_accepted_form_in_one_line(bad):
    with pytest.raises(UsageError) as err:
        parse_slo(bad)
    text = str(err.value)
    assert "METRIC:pNN<=VALUE" in text and "\n" not in text
