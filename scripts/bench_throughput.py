#!/usr/bin/env python3
"""Benchmark `find --objective throughput`'s choice of --max-num-seqs against an exhaustive grid.

For every scenario of SUITE (a GPU scenario of profiles/sim, a model, a workload mix, an SLO), on the
simulator's serving oracle (``vllm_tuner.simlite.oracle.load``: the engine's own scheduler and step
model, a closed loop of clients, no server, no sleeping):

  find:        the sweep policy ``vllm_tuner.sweep`` (the same ``token_budget``, ``next_level`` and
               ``choose`` the CLI runs), each level a closed loop of C clients on one launch at
               --max-num-seqs 256 and the token budget, then the proof: the choice at saturation
               (2 clients per sequence);
  exhaustive:  every --max-num-seqs of GRID_SEQS x --max-num-batched-tokens of GRID_BATCHED, one launch
               each, C = --max-num-seqs clients;
  goodput:     output tokens/s of a config with C = --max-num-seqs clients when it holds the SLO and
               preempts at most --max-preemption-rate per request, else 0. find's choice is evaluated
               the same way, at the token budget it chose (vLLM's default where it chose none).

All three start from the same memory fit (--max-model-len = the workload's longest request, utilization
0.90), so its launches are left out of every cost. GPU-minutes (wall x GPUs) are modelled:
  find:       2 launches (sweep, proof) + every level's LEVEL_S + the proof's PROOF_S (each the whole
              simulated run, warm-up included);
  auto_tune:  vLLM's benchmarks/auto_tune phase 2 grid, --max-num-seqs {128, 256} x
              --max-num-batched-tokens {512, 1024, 2048, 4096}: a restart per combination, then a bisection
              of the request rate (RATE_RUNS benchmark runs of BENCH_S each);
  serve_sla:  `vllm bench sweep serve_sla` over the exhaustive grid: a restart per combination and the
              same bisection of the request rate.
A launch costs BOOT_S (the simulator's default timing: load, compile, profile, capture, server start).

Usage: python scripts/bench_throughput.py [--only NAME[,NAME]] [--out bench-results/throughput.json]
Exits 1 if find's choice ever falls below 95% of the exhaustive best, or its proof does not hold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_tuner.simlite.activate import load_scenario_file  # noqa: E402
from vllm_tuner.simlite.groundtruth import DEFAULT_TIMING  # noqa: E402
from vllm_tuner.simlite.oracle import load  # noqa: E402
from vllm_tuner.slo import Slo, parse_slo  # noqa: E402
from vllm_tuner.sweep import Level, choose, next_level, token_budget  # noqa: E402
from vllm_tuner.throughput import DEFAULT_MAX_PREEMPTION_RATE, SATURATION, SWEEP_SEQ_CAP  # noqa: E402
from vllm_tuner.traffic import traffic_named  # noqa: E402

GRID_SEQS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
GRID_BATCHED = (2048, 8192)
AUTO_TUNE_GRID = 2 * 4
# simulated seconds a level and the proof run, each counting WARMUP_S of warm-up (the oracle's
# ``seconds`` is the whole run: its window is what follows the warm-up)
LEVEL_S, WARMUP_S, PROOF_S = 60.0, 15.0, 120.0
BENCH_S, RATE_RUNS = 60.0, 6  # one benchmark run of the request-rate bisection, and how many
BOOT_S = sum(DEFAULT_TIMING[k] for k in ("load_s", "compile_s", "profile_s", "capture_s", "server_s"))
REQUESTS = 4000  # the workload's requests, drawn once per scenario, taken in turn


@dataclass(frozen=True)
class Scenario:
    name: str
    sim: str
    model: str
    gpus: int
    workload: str
    slo: str


SUITE = (
    Scenario("5090-7b-chat", "rtx-5090", "qwen2.5-7b", 1, "chat", "ttft:p95<=2s,itl:p95<=60ms"),
    Scenario("5090x2-7b-rag", "rtx-5090", "qwen2.5-7b", 2, "rag", "ttft:p95<=3s"),
    Scenario("h100-8b-code", "h100", "llama-3.1-8b", 1, "code", "itl:p95<=40ms"),
    Scenario("a100-8b-chat-knee", "a100-80g", "llama-3.1-8b", 1, "chat", ""),
    Scenario("h100-7b-chat", "h100", "qwen2.5-7b", 1, "chat", "ttft:p95<=1s,itl:p95<=80ms"),
    Scenario("h200-8b-agent", "h200", "llama-3.1-8b", 1, "agent", "ttft:p95<=5s"),
    Scenario("4090-7b-code-knee", "rtx-4090", "qwen2.5-7b", 1, "code", ""),
)


def serve_args(sc: Scenario, context: int, seqs: int, batched: int | None) -> list[str]:
    args = ["serve", sc.model, "--max-model-len", str(context), "--max-num-seqs", str(seqs)]
    args += ["--gpu-memory-utilization", "0.90", "--tensor-parallel-size", str(sc.gpus)]
    return args + (["--max-num-batched-tokens", str(batched)] if batched else [])


def measure(scenario, sc, requests, context, seqs, batched, clients, seconds, warmup):
    r = load(scenario, serve_args(sc, context, seqs, batched), list(range(sc.gpus)), clients=clients,
             requests=requests, seconds=seconds, warmup=warmup)  # fmt: skip
    if r is None:
        return None
    stats = {
        f"{name}_p{p}": r.percentile(values, p)
        for name, values in (("ttft", r.ttft_s), ("itl", r.itl_s), ("e2e", r.e2e_s))
        for p in (50, 90, 95, 99)
    }
    return r, stats


def judged(slo: Slo, result) -> tuple[float, tuple[str, ...]]:
    if result is None:
        return 0.0, ("does not boot",)
    r, stats = result
    broken = list(slo.broken(stats))
    rate = r.preemptions / max(1, r.completed)
    if rate > DEFAULT_MAX_PREEMPTION_RATE:
        broken.append(f"preemption rate {rate:.2f}")
    return r.output_tokens_per_s, tuple(broken)


def goodput(scenario, sc, slo, requests, context, seqs, batched) -> float:
    tput, broken = judged(
        slo, measure(scenario, sc, requests, context, seqs, batched, seqs, LEVEL_S, WARMUP_S)
    )
    return 0.0 if broken else tput


def run(sc: Scenario) -> dict:
    scenario = load_scenario_file(sc.sim)
    traffic = traffic_named(sc.workload)
    slo = parse_slo(sc.slo)
    requests = [traffic.draw(n) for n in range(REQUESTS)]
    context = traffic.longest
    # find: one launch at the cap and the token budget, the sweep on it
    budget = token_budget(traffic, slo, SWEEP_SEQ_CAP)
    levels: list[Level] = []
    while (c := next_level(levels, cap=SWEEP_SEQ_CAP)) is not None:
        tput, broken = judged(
            slo, measure(scenario, sc, requests, context, SWEEP_SEQ_CAP, budget, c, LEVEL_S, WARMUP_S)
        )
        levels.append(Level(c, tput, broken))
    choice = choose(levels, cap=SWEEP_SEQ_CAP)
    chosen = choice.level.concurrency if choice.level else None
    proof_holds = False
    if chosen:
        proof = measure(
            scenario, sc, requests, context, chosen, budget, SATURATION * chosen, PROOF_S, WARMUP_S
        )
        proof_holds = proof is not None and judged(Slo(), proof)[1] == ()
    find_goodput = goodput(scenario, sc, slo, requests, context, chosen, budget) if chosen else 0.0
    # the exhaustive grid
    grid = {
        (s, b): goodput(scenario, sc, slo, requests, context, s, b)
        for s, b in itertools.product(GRID_SEQS, GRID_BATCHED)
    }
    (best_s, best_b), best = max(grid.items(), key=lambda kv: kv[1])
    minutes = sc.gpus / 60
    find_cost = (2 * BOOT_S + len(levels) * LEVEL_S + PROOF_S) * minutes
    per_combination = BOOT_S + RATE_RUNS * BENCH_S
    return {
        **asdict(sc),
        "levels": [(lv.concurrency, round(lv.output_tokens_per_s, 1), list(lv.broken)) for lv in levels],
        "chosen": chosen,
        "max_num_batched_tokens": budget,
        "reason": choice.reason,
        "proof_holds": proof_holds,
        "find_goodput": round(find_goodput, 1),
        "best": {"max_num_seqs": best_s, "max_num_batched_tokens": best_b, "goodput": round(best, 1)},
        "ratio": round(find_goodput / best, 3) if best else None,
        "gpu_minutes": {
            "find": round(find_cost, 1),
            "auto_tune": round(AUTO_TUNE_GRID * per_combination * minutes, 1),
            "serve_sla": round(len(grid) * per_combination * minutes, 1),
        },
    }


def _pair(seqs: int | None, batched: int | None) -> str:
    return f"({seqs or '-'}, {batched or 'default'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "throughput.json")
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    rows = []
    for sc in SUITE:
        if not only or sc.name in only:
            rows.append(run(sc))
            print(f"{sc.name}: done", file=sys.stderr, flush=True)
    bad = 0
    print(f"{'scenario':<20} {'find (S, B)':>14} {'goodput':>9} {'best (S, B)':>18} {'best':>9} {'ratio':>6} "
          f"{'GPU-min find':>12} {'auto_tune':>9} {'serve_sla':>9}")  # fmt: skip
    for r in rows:
        best = r["best"]
        cost = r["gpu_minutes"]
        ok = (r["ratio"] or 0) >= 0.95 and r["proof_holds"]
        bad += not ok
        print(
            f"{r['name']:<20} {_pair(r['chosen'], r['max_num_batched_tokens']):>14} {r['find_goodput']:>9,.0f} "
            f"{'(' + str(best['max_num_seqs']) + ', ' + str(best['max_num_batched_tokens']) + ')':>18} "
            f"{best['goodput']:>9,.0f} {r['ratio'] or 0:>6.1%} {cost['find']:>12.1f} {cost['auto_tune']:>9.1f} "
            f"{cost['serve_sla']:>9.1f}{'' if ok else '  ✘'}"
        )
        print(f"    {r['reason']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"written {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
