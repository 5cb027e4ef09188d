#!/usr/bin/env python3
"""`make bench`, real vLLM on the CPU: find --objective throughput's choice against an exhaustive sweep of
--max-num-seqs on the same engine, a restart per point (tests/test_real_vllm_throughput.py, with
VLLM_TUNE_BENCH=1; CI runs only the cheaper test of that file). Needs the real-vLLM venv (make real-vllm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {**os.environ, "VLLM_TUNE_BENCH": "1"}
    test = "tests/test_real_vllm_throughput.py::test_throughput_choice_is_within_5_percent_of_an_exhaustive_sweep"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "real_vllm", test], cwd=ROOT, env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
