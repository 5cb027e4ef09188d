"""A tiny stand-in for ``vllm serve`` for the runner's process-control tests.

    python tests/fakes/server.py serve MODE [--flags ...] --host H --port P

MODE (the model name) picks the behaviour:
    idle                 print a start line, then sleep (a plain SIGTERM ends it)
    stubborn             ignore SIGTERM, start a worker that ignores it too, then sleep
    crash-leaves-worker  start a worker, print a fatal engine error and exit 1 (the worker stays)
    fatal-then-linger    print a fatal engine error and a traceback, then keep running (no exit, no /health)
Every mode prints ``worker pid N`` for a worker it started, so a test can check it is gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

WORKER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


def start_worker() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER])
    print(f"worker pid {worker.pid}", flush=True)


def main() -> int:
    mode = sys.argv[2]
    print(f"INFO fake vLLM serving {mode}", flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        start_worker()
    elif mode == "crash-leaves-worker":
        start_worker()
        time.sleep(0.2)
        print("ERROR [core.py:1] EngineCore failed to start.", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        return 1
    elif mode == "fatal-then-linger":
        time.sleep(0.2)
        print("ERROR [core.py:1] EngineCore failed to start.", flush=True)
        print("Traceback (most recent call last):", flush=True)
        for depth in range(5):
            print(f'  File "/vllm/v1/engine/core.py", line {100 + depth}, in run', flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
