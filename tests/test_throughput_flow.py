"""The throughput flow's decisions with a fake finder and a toy world (no server, no clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm_tuner.find import FindRequest, FindResult
from vllm_tuner.loadgen import LevelReport
from vllm_tuner.probe import LoadReport
from vllm_tuner.progress import QuietProgress
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.slo import parse_slo
from vllm_tuner.store import Store
from vllm_tuner.throughput import ThroughputPlan, ThroughputSearch
from vllm_tuner.traffic import traffic_named
from vllm_tuner.trial import TrialOutcome

GIB = 1 << 30
FITTED = ServeConfig("m", max_model_len=6800, max_num_seqs=39, gpu_memory_utilization=0.93)


@dataclass
class FakeTrials:
    """Boots a config unless its --max-num-seqs is in ``fails_at``, then runs the load it is given."""

    fails_at: set[int] = field(default_factory=set)
    vocab_size: int = 32000
    runs: list[ServeConfig] = field(default_factory=list)

    def run(self, config, *, log_path, decide_probe, make_load=None, within_s=None):
        self.runs.append(config)
        if config.max_num_seqs in self.fails_at:
            return TrialOutcome(config, "oom_during_cudagraph_capture", "failed")
        plan = decide_probe({})
        report = make_load({})("http://sim", "m", lambda: True)
        return TrialOutcome(config, "success", "stable", {}, report, probe_plan=plan)


class FakeFinder:
    """The memory fit done; with a ``store``, as a finished run of it."""

    def __init__(self, trials: FakeTrials, store: Store | None = None, fitted: ServeConfig = FITTED) -> None:
        self.fitted = fitted
        self.request = FindRequest(model="m", gpu_ids=(0,), tensor_parallel_size=1, objective="throughput")
        self.trials = trials
        self.progress = QuietProgress()
        self.log_dir = Path("/nonexistent")
        self.nvml = None
        self.store = store

    def env_fingerprint(self) -> str:
        return "env-1"

    def run(self) -> FindResult:
        winner = TrialOutcome(self.fitted, "success", "stable")
        run_id = None
        if self.store is not None:
            run_id = self.store.begin_run("find", "req-1", {}, self.env_fingerprint())
            self.store.finish_run(run_id, "done", {})
        return FindResult(self.request, winner, [winner], 2, "done", True, run_id=run_id)

    def _with_totals(self, facts):
        return dict(facts)


def toy_level(preempt_from: int = 10**9):
    """Throughput saturating at 4,000 tok/s, p95 TTFT 20 ms per client; preemptions past a load."""

    def run(base_url, traffic, *, concurrency, **_):
        load = LoadReport(ok=True, requests=100, headroom_bytes={0: 2 * GIB})
        load.preemptions = 50 if concurrency >= preempt_from else 0
        stats = {"ttft_p95": 0.02 * concurrency, "ttft_p50": 0.01 * concurrency, "itl_p95": 0.03}
        tput = 4000 * concurrency / (concurrency + 64)
        return LevelReport(concurrency, 10.0, tput, tput / 200, stats, 100, load)

    return run


def search(trials, level, slo="ttft:p95<=2s", **plan):
    return ThroughputSearch(
        FakeFinder(trials),
        ThroughputPlan(traffic_named("chat"), parse_slo(slo), **plan),
        level_runner=level,
    ).run()


def test_one_sweep_launch_and_one_proof_at_the_choice():
    trials = FakeTrials()
    result = search(trials, toy_level())
    assert [c.max_num_seqs for c in trials.runs] == [256, result.choice.level.concurrency]
    assert 88 <= result.choice.level.concurrency <= 100  # the TTFT edge is at 100 clients
    assert result.winner.config.max_num_seqs == result.choice.level.concurrency
    assert result.winner.config.max_model_len == 6800 and result.winner.config.gpu_memory_utilization == 0.93
    assert result.proof.concurrency == 2 * result.choice.level.concurrency  # saturation
    assert result.choice.reason.startswith(f"C={result.choice.level.concurrency}: ")
    broke = [row for row in result.table() if row["ttft_p95"] > 2]
    assert broke and min(row["concurrency"] for row in broke) <= 112  # the edge was bracketed
    assert [row["concurrency"] for row in result.table()] == sorted(
        row["concurrency"] for row in result.table()
    )


def test_the_sweep_and_the_proof_launch_with_the_same_token_budget():
    trials = FakeTrials()
    search(trials, toy_level(), slo="ttft:p95<=2s,itl:p95<=80ms")  # chat prompts fit vLLM's 2,048 chunk
    assert [c.max_num_batched_tokens for c in trials.runs] == [2048, 2048]
    trials = FakeTrials()
    ThroughputSearch(
        FakeFinder(trials),
        ThroughputPlan(traffic_named("code"), parse_slo("itl:p95<=80ms")),
        level_runner=toy_level(),
    ).run()
    assert [c.max_num_batched_tokens for c in trials.runs] == [None, None]  # vLLM's default


def test_a_sweep_cap_that_does_not_boot_is_halved():
    trials = FakeTrials(fails_at={256})
    result = search(trials, toy_level())
    assert [c.max_num_seqs for c in trials.runs][:2] == [256, 128]
    assert result.winner is not None and max(row["concurrency"] for row in result.table()) <= 128


def test_levels_that_preempt_past_the_rate_are_not_chosen():
    trials = FakeTrials()
    result = search(trials, toy_level(preempt_from=48))
    assert result.choice.level.concurrency < 48
    assert "preemption rate 0.50 per request" in result.choice.reason


def test_a_proof_that_does_not_hold_falls_back_to_the_next_level_once():
    trials = FakeTrials()
    calls = []

    def level(base_url, traffic, *, concurrency, **kw):
        report = toy_level()(base_url, traffic, concurrency=concurrency, **kw)
        calls.append(concurrency)
        if len(trials.runs) == 2:  # the first proof: preempts at saturation
            report.load.preemptions = 40
        return report

    result = search(trials, level)
    first, second = trials.runs[1].max_num_seqs, trials.runs[2].max_num_seqs
    assert second < first
    assert result.winner.config.max_num_seqs == second == result.choice.level.concurrency
    assert result.choice.reason.startswith(f"C={second}: ")
    assert f"C={first} did not hold at saturation (preemption rate" in result.choice.reason
    assert result.as_json()["chosen"]["concurrency"] == result.as_json()["config"]["--max-num-seqs"] == second
    assert result.launches[1].verdict == "unstable" and "preemption rate" in result.launches[1].probe_failure


def test_the_chart_marks_the_choice_and_says_why_levels_were_not_chosen():
    result = search(FakeTrials(), toy_level())
    page = result.chart_html()
    chosen = result.choice.level.concurrency
    assert page.startswith("<!doctype html>") and "<svg" in page and "<script" not in page
    assert f"<title>C={chosen}: " in page and "fill='#5cb85c'" in page  # the chosen bar, green
    assert "TTFT limit 2 s" in page
    broke = [lv for lv in result.judged if lv.broken]
    assert broke and f"<li>C={broke[0].concurrency}: TTFT SLO (p95" in page


def test_the_sweep_and_the_proof_are_recorded_and_the_same_command_reuses_them(tmp_path):
    store = Store.open(tmp_path / "runs.db")
    plan = ThroughputPlan(traffic_named("chat"), parse_slo("ttft:p95<=2s"))
    trials = FakeTrials()
    first = ThroughputSearch(FakeFinder(trials, store), plan, level_runner=toy_level()).run()
    assert len(trials.runs) == 2
    recorded = store.trials(first.fit.run_id)
    assert [r.config["max_num_seqs"] for r in recorded] == [256, first.choice.level.concurrency]
    assert all(r.verdict == "stable" for r in recorded)
    run = store.run(first.fit.run_id)  # the run's result is the throughput choice, as `history` shows it
    assert run.status == "done" and run.result["command"] == first.command()

    again = FakeTrials()
    measured: list[int] = []

    def level(base_url, traffic, *, concurrency, **kw):
        measured.append(concurrency)
        return toy_level()(base_url, traffic, concurrency=concurrency, **kw)

    # the rerun's memory fit landed 0.01 lower: the recorded sweep (at 0.93) and its proof are reused
    refit = FakeFinder(again, store, fitted=FITTED.replace(gpu_memory_utilization=0.92))
    second = ThroughputSearch(refit, plan, level_runner=level).run()
    assert again.runs == [] and measured == []  # nothing launched, nothing measured again
    assert second.table() == first.table()
    assert second.winner.config == first.winner.config
    assert second.winner.config.gpu_memory_utilization == 0.93
    assert "2 more recorded by an earlier run, not launched again" in second.reason
    assert second.proof.row() == first.proof.row()

    other = FakeTrials()  # another SLO measures another sweep: launched afresh
    plan2 = ThroughputPlan(traffic_named("chat"), parse_slo("ttft:p95<=1s"))
    ThroughputSearch(FakeFinder(other, store), plan2, level_runner=toy_level()).run()
    assert len(other.runs) == 2
