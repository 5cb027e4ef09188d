"""The real-vLLM tier for ``find --objective throughput``: the tiny Llama on vLLM's CPU backend with a
short workload and a TTFT SLO; one find, its sweep and proof on real vLLM (~3 min), the choice the best
level of its own table that held the SLO.

The comparison with an exhaustive sweep of --max-num-seqs on the same engine, a restart per point, is
``scripts/bench_real_throughput.py`` (in ``make bench``): on two shared cores it takes ~10 minutes and a
level's throughput moves by several percent between runs, so it is a measurement, not a CI test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_vllm import (
    DUMMY,
    RealVllm,
    small_fraction,
    tiny_llama,
    why_not_runnable,
)

from vllm_tuner.traffic import traffic_named

_why = why_not_runnable()
pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(_why is not None, reason=f"real vLLM tier not run: {_why}"),
]

LEVEL_S = 5.0
# two cores serve the tiny model's short requests in ~0.1-0.4 s at up to 64 clients and several seconds at 128:
# the sweep brackets the SLO's edge instead of doubling on to hundreds of clients
SLO = "ttft:p95<=1s"
ROWS = "prompt_tokens,output_tokens\n" + "".join(f"{32 + 24 * i},{8 + 3 * i}\n" for i in range(8))


@pytest.fixture
def real(tmp_path):
    real = RealVllm(home=tmp_path / "home")
    yield real
    try:
        real.assert_nothing_left()
    finally:
        real.close()


def find_throughput(real: RealVllm, tmp_path: Path) -> tuple[str, Path, dict]:
    """find --objective throughput on the tiny model: (model folder, workload file, the --json result)."""
    model = str(tiny_llama(tmp_path / "tiny-llama"))
    rows = tmp_path / "traffic.csv"
    rows.write_text(ROWS)
    done = real.tune(
        "find", "--model", model, "--objective", "throughput", "--workload", str(rows),
        "--slo", SLO, "--level-duration", f"{LEVEL_S:g}s", "--util-ceiling", str(small_fraction()), "--json",
        "--", *DUMMY,
        timeout_s=1200,
    )  # fmt: skip
    return model, rows, json.loads(done.stdout)


def test_throughput_find_sweeps_one_server_and_proves_its_choice(real, tmp_path):
    model, rows, result = find_throughput(real, tmp_path)
    assert result["stable"], result["explanation"]
    chosen = result["chosen"]["concurrency"]
    assert result["config"]["--max-num-seqs"] == chosen
    assert result["config"]["--max-model-len"] == traffic_named(str(rows)).longest
    # one launch for the whole sweep, one for the proof (and one more where that proof did not hold and
    # the choice fell back to the next level that held, which the reason then names)
    launches = result["launches"]
    assert launches[0]["verdict"] == "stable" and launches[-1]["verdict"] == "stable"
    assert len(launches) == 2 or "did not hold at saturation" in result["chosen"]["reason"], launches
    table = result["table"]
    # a level that failed requests is judged broken and says why; the chosen one held, with none
    assert len(table) >= 2 and all(row["errors"] == 0 or row["broken"] for row in table), table
    row = next(r for r in table if r["concurrency"] == chosen)
    assert not row["broken"] and row["errors"] == 0 and row["output_tokens_per_s"] > 0, row
    assert row["ttft_p95"] <= 1.0, row  # the choice holds the SLO
    # the choice is within the knee's margin of the best level that held the SLO
    if len(launches) == 2:
        best = max(r["output_tokens_per_s"] for r in table if not r["broken"])
        assert row["output_tokens_per_s"] >= 0.95 * best, table
    assert f"--max-num-seqs {chosen}" in result["command"]
    real.assert_nothing_left()
