"""How fast the runner notices a failed vLLM start: from the fatal log line to ``wait_ready`` returning.

    .venv/bin/python scripts/bench_detect.py [--runs 10] [--time-scale 400]

Each run launches the simulated vLLM with a config that fails (rotating over the startup failure
categories) through :class:`ServerProcess`, and measures the time between the moment the log reader
thread fed the first fatal line to the watcher and the moment ``wait_ready`` returned. Then the same
over a fake server that prints a fatal line and a traceback but does not exit (an API server that
outlives its engine): there only the log can decide.
Goal: under 1 second (not a health-poll timeout).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fakes" / "server.py"
sys.path.insert(0, str(ROOT))

from vllm_tuner.launch import LocalLauncher, ServerProcess  # noqa: E402
from vllm_tuner.logparse import LogWatcher  # noqa: E402
from vllm_tuner.serveconfig import ServeConfig  # noqa: E402
from vllm_tuner.simlite.activate import create  # noqa: E402

CASES = [
    ("oom_weights_load", ServeConfig("qwen2.5-14b")),
    ("no_kv_cache_memory", ServeConfig("qwen2.5-7b", gpu_memory_utilization=0.5)),
    (
        "kv_cache_insufficient_for_max_len",
        ServeConfig("qwen2.5-7b", max_model_len=32768, gpu_memory_utilization=0.68),
    ),
    ("oom_cudagraph_capture", ServeConfig("qwen2.5-7b", max_model_len=8192, gpu_memory_utilization=0.98)),
    ("oom_during_profiling", ServeConfig("qwen2.5-7b", max_num_batched_tokens=2_000_000)),
]


class TimedWatcher(LogWatcher):
    def __init__(self) -> None:
        super().__init__()
        self.fatal_seen_at: float | None = None

    def feed(self, line: str):
        events = super().feed(line)
        if self.fatal_seen_at is None and any(e.kind == "fatal" for e in events):
            self.fatal_seen_at = time.monotonic()
        return events


def one_run(
    launcher: LocalLauncher, config: ServeConfig, log_path: Path, *, grace_s: float = 10.0
) -> tuple[str, float]:
    watcher = TimedWatcher()
    with ServerProcess(
        launcher, config, gpu_ids=[0], log_path=log_path, watcher=watcher, grace_s=grace_s
    ) as proc:
        ready = proc.wait_ready(timeout_s=60, stall_s=30)
        returned = time.monotonic()
    if ready.ready or watcher.fatal_seen_at is None:
        raise SystemExit(f"expected a failure, got ready={ready.ready} diagnosis={ready.diagnosis}")
    return ready.diagnosis.category, returned - watcher.fatal_seen_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--time-scale", type=float, default=400.0)
    args = parser.parse_args()
    rows: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = create("rtx-4090", state_dir=Path(tmp) / "sim", time_scale=args.time_scale)
        launcher = env.launcher()
        for i in range(args.runs):
            expected, config = CASES[i % len(CASES)]
            category, delay = one_run(launcher, config, Path(tmp) / f"sim{i}.log")
            rows.append(("simulated, exits", expected, category, delay))
        lingering = LocalLauncher(f"{sys.executable} {FAKE}")
        for i in range(args.runs):
            config = ServeConfig("fatal-then-linger")
            category, delay = one_run(lingering, config, Path(tmp) / f"fake{i}.log", grace_s=0.5)
            rows.append(("fake, keeps running", "engine_core_died_other", category, delay))
    print(f"{'run':>3}  {'server':<20} {'expected':<34} {'classified':<34} {'detect ms':>9}")
    for i, (server, expected, category, delay) in enumerate(rows):
        print(f"{i:>3}  {server:<20} {expected:<34} {category:<34} {delay * 1000:>9.0f}")
    print()
    failed = False
    for server in dict.fromkeys(r[0] for r in rows):
        delays = [d for s, _, _, d in rows if s == server]
        wrong = sum(1 for s, e, c, _ in rows if s == server and e != c)
        print(
            f"{server:<20} runs {len(delays)}  median {statistics.median(delays) * 1000:.0f} ms  "
            f"max {max(delays) * 1000:.0f} ms  misclassified {wrong}  goal < 1000 ms"
        )
        failed = failed or max(delays) >= 1.0 or wrong > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
