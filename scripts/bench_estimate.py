#!/usr/bin/env python3
"""Score the estimator against real vLLM startup logs (../shared/logs/startups.jsonl, failures.jsonl).

Two questions per usable row:
  kv:      given the available KV memory the log reports, predict the KV tokens (or blocks) vLLM printed;
  weights: given the model, predict the weights GiB per GPU vLLM printed ("Model loading took X GiB").
Rows whose model has no known config (hybrids, GGUF, unnamed checkpoints) are listed as skipped.

Usage: python scripts/bench_estimate.py [--logs DIR]   (default: ../shared/logs beside the repo)
Exits 0 when the files are absent (CI clones have ../shared beside them; other checkouts may not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_tuner.estimate import kv_layout  # noqa: E402
from vllm_tuner.models import find_profile  # noqa: E402

GIB = 1 << 30
# Log model names -> bundled profile (config overrides where the logged checkpoint differs).
MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b", {}),
    "neuralmagic/Meta-Llama-3.1-70B-Instruct-quantized.w8a8": ("llama-3.1-70b-w8a8", {}),
    "deepseek-ai/DeepSeek-R1": ("deepseek-v3", {}),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ("deepseek-r1-distill-qwen-14b", {}),
    # Llama-3-8B with a 1M-token RoPE: same weights as Llama-3.1-8B, bigger cos/sin cache
    "gradientai/Llama-3-8B-Instruct-Gradient-1048k": ("llama-3.1-8b", {"max_position_embeddings": 1048576}),
}


def spec_for(model: str | None):
    if not model or model.split(" ")[0] not in MODELS:
        return None
    name, overrides = MODELS[model.split(" ")[0]]
    spec = find_profile(name)
    if overrides:
        import dataclasses

        spec = dataclasses.replace(
            spec, max_position=overrides.get("max_position_embeddings", spec.max_position)
        )
    return spec


def rows(logs: Path) -> list[dict]:
    out = []
    for name in ("startups.jsonl", "failures.jsonl"):
        path = logs / name
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    nums = row.get("numbers") or {}
                    flags = row.get("flags") or {}
                    out.append(
                        {
                            "id": row["id"],
                            "model": row.get("model"),
                            "tp": row.get("tensor_parallel_size")
                            or (
                                flags.get("tensor_parallel_size")
                                if isinstance(flags.get("tensor_parallel_size"), int)
                                else None
                            )
                            or 1,
                            "weights_gib": row.get("weights_gib")
                            or nums.get("weights_gib")
                            or nums.get("weights_gib_per_gpu"),
                            "kv_gib": row.get("available_kv_gib")
                            or nums.get("kv_cache_size_gib")
                            or nums.get("kv_cache_gib_per_gpu"),
                            "tokens": row.get("kv_cache_tokens") or nums.get("kv_cache_max_tokens"),
                            "blocks": row.get("num_gpu_blocks") or nums.get("num_gpu_blocks"),
                            "max_len": row.get("max_concurrency_tokens_per_request")
                            or row.get("max_model_len"),
                            "pp": 4 if row["id"] in ("S007", "F013") else 1,  # 32 GPUs at TP 8 (row notes)
                            "prose": "prose" in (row.get("notes") or ""),
                        }
                    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=ROOT.parent / "shared" / "logs")
    args = parser.parse_args()
    if not (args.logs / "startups.jsonl").is_file():
        print(
            f"no {args.logs / 'startups.jsonl'}: nothing to score (it lives in ../shared/logs beside the repo)"
        )
        return 0
    kv_err, w_err = [], []
    print(f"{'row':<6} {'model':<46} {'check':<8} {'logged':>12} {'predicted':>12} {'error':>8}")
    for r in rows(args.logs):
        spec = spec_for(r["model"])
        label = (r["model"] or "?")[:46]
        if spec is None:
            if r["kv_gib"] or r["weights_gib"]:
                print(f"{r['id']:<6} {label:<46} skipped  (no known config for this checkpoint)")
            continue
        if r["weights_gib"]:
            pred = spec.weights_per_gpu(r["tp"], r["pp"]) / GIB
            err = (pred - r["weights_gib"]) / r["weights_gib"]
            w_err.append(abs(err))
            print(f"{r['id']:<6} {label:<46} weights  {r['weights_gib']:>12.4f} {pred:>12.4f} {err:>+8.2%}")
        if r["kv_gib"] and (r["tokens"] or r["blocks"]):
            layout = kv_layout(spec, r["tp"], r["pp"])
            blocks = int(r["kv_gib"] * GIB) // layout.bytes_per_block
            if r["blocks"]:
                logged, pred, what = r["blocks"], blocks, "blocks"
            else:
                logged, pred, what = r["tokens"], blocks * layout.block_size, "tokens"
            err = (pred - logged) / logged
            tag = "  (KV GiB from the reporter's prose: not scored)" if r["prose"] else ""
            if not r["prose"]:
                kv_err.append(abs(err))
            print(f"{r['id']:<6} {label:<46} kv-{what:<5}{logged:>12,} {pred:>12,} {err:>+8.2%}{tag}")
    for name, errs in (("KV tokens", kv_err), ("weights", w_err)):
        if errs:
            print(
                f"{name}: {len(errs)} rows, median error {statistics.median(errs):.2%}, worst {max(errs):.2%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
