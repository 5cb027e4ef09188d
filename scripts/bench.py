#!/usr/bin/env python3
"""`make bench`: run every sub-benchmark in turn; exit non-zero if any of them failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
BENCHMARKS = (
    "bench_estimate.py",
    "bench_find.py",
    "bench_throughput.py",
    "bench_detect.py",
    "bench_proxy.py",
    "bench_real_cpu.py",
    "bench_real_throughput.py",
)


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        script = SCRIPTS / name
        if not script.is_file():
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
