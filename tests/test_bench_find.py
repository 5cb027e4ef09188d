"""The pure parts of scripts/bench_find.py: the oracle and the baseline ladders (no processes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from vllm_tuner.simlite import groundtruth

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_find.py"
spec = importlib.util.spec_from_file_location("bench_find", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bench_find", bench)
spec.loader.exec_module(bench)

CASE = {"name": "t", "model": "llama-3.1-8b", "scenario": "rtx-4090", "gpus": 1, "overrides": {}}


def _stable(m, length: int, seqs: int, util: float) -> bool:
    args = groundtruth.LaunchArgs(
        tp=m.tp, max_model_len=length, max_num_seqs=seqs, gpu_memory_utilization=util
    )
    return bench.judge(m, args).stable


def test_oracle_is_stable_and_one_block_more_is_not():
    m = bench.machine_for(CASE)
    best = bench.oracle(m)
    assert best is not None and best.max_model_len < m.native and best.seqs == 1
    assert best.max_model_len % m.block == 0
    assert _stable(m, best.max_model_len, 1, best.util)
    for util in (0.95, 0.90, best.util):
        assert not bench._fits(m, best.max_model_len + m.block, 1, util)


def test_suite_is_large_and_varied():
    assert len(bench.SUITE) >= 10
    assert {c["gpus"] for c in bench.SUITE} >= {1, 2, 4}
    assert len({c["model"] for c in bench.SUITE}) >= 6


def test_baselines_count_launches_and_cost():
    m = bench.machine_for(CASE)
    best = bench.oracle(m)
    for strategy in bench.BASELINES:
        run = strategy(m)
        assert 1 <= run.launches <= bench.BASELINE_MAX_LAUNCHES
        assert run.gpu_seconds > 0
        row = bench.score(CASE, m, best, run)
        assert row.launches == run.launches
    auto = bench.auto_tune(m)
    assert [t["util"] for t in auto.trials][:2] == [0.98, 0.97]
    assert all(t["seqs"] == 256 and t["len"] == m.native for t in auto.trials)


def test_gap_is_relative_to_the_objective():
    best = bench.Best(65536, 1, 0.95)
    assert bench.gap_pct(best, 65536, 1) == 0.0
    assert bench.gap_pct(best, 32768, 1) == 50.0
    native = bench.Best(32768, 10, 0.95)
    assert bench.gap_pct(native, 32768, 9) == 10.0


def test_compile_cache_makes_a_relaunch_cheaper():
    m = bench.machine_for(CASE)
    args = groundtruth.LaunchArgs(tp=1, max_model_len=8192, max_num_seqs=4, gpu_memory_utilization=0.9)
    compiled: set = set()
    first = bench.launch_seconds(m, args, "success", compiled)
    again = bench.launch_seconds(m, args, "success", compiled)
    assert first - again == m.timing["compile_s"] - m.timing["compile_cached_s"]


def test_a_verified_baseline_pays_for_its_probe_and_never_ends_unstable():
    # the scenario's runtime spike makes auto_tune's first config that boots fail under load
    spiky = {"name": "s", "model": "qwen2.5-7b", "scenario": "rtx-5090", "gpus": 2, "overrides": {}}
    m = bench.machine_for(spiky)
    best = bench.oracle(m)
    for strategy in bench.BASELINES:
        plain, verified = strategy(m), strategy(m, verify=True)
        assert verified.strategy == plain.strategy + "+verify"
        assert verified.launches >= plain.launches
        assert verified.gpu_seconds > plain.gpu_seconds or verified.winner is None
        row = bench.score(spiky, m, best, verified)
        assert row.stable is not False
    assert bench.score(spiky, m, best, bench.auto_tune(m)).stable is False


def test_the_proven_floor_is_one_cold_dummy_launch_of_the_best_config_and_its_probe():
    m = bench.machine_for(CASE)
    best = bench.oracle(m)
    floor = bench.proven_floor_seconds(m, best)
    t = m.timing
    launch = 1.0 + 2.0 + t["compile_s"] + t["profile_s"] + t["capture_s"] + t["server_s"]  # dummy weights
    assert floor > launch  # plus the probe of best.max_model_len tokens
    assert (
        floor - launch
        < best.max_model_len / t["prefill_tokens_per_s"] + best.max_model_len * t["decode_step_s"]
    )
    assert bench.proven_floor_seconds(m, None) == 0.0
