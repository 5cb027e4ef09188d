"""The estimator on ``--device cpu`` against the pools real vLLM 0.32 reported in the real tier's logs.

vLLM's CPU worker sizes its KV pool as ``fraction × node total`` minus its own resident memory ("N GiB
memory was consumed by non-kv usages"), and defaults its batch to 2048 tokens and 128 sequences per rank.
Each captured log that printed a pool is replayed here: the flags from its "non-default args" line, the
model from the real tier's own ``tiny_llama``, the node's size from the log; no vLLM needed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from real_vllm import tiny_llama

from vllm_tuner.devices import CPU, CUDA
from vllm_tuner.estimate import estimate
from vllm_tuner.logparse import classify
from vllm_tuner.models import resolve_model
from vllm_tuner.serveconfig import ServeConfig

GIB = 1 << 30
REAL = Path(__file__).parent / "data" / "logs" / "real"
# the real tier's model per test (tests/test_real_vllm.py): the long-context test's is the only other shape
LONG_CONTEXT = {"max_len": 1 << 20, "layers": 8, "kv_heads": 4}


def _served() -> list[Path]:
    return sorted(p for p in REAL.glob("*.log") if "Auto set (" in p.read_text(errors="replace"))


def _flags(text: str) -> dict:
    line = re.search(r"non-default args: (\{.*\})", text).group(1)
    return ast.literal_eval(line)


@pytest.mark.parametrize("log", _served(), ids=lambda p: p.stem)
def test_the_cpu_estimate_of_the_pool_is_within_ten_percent_of_what_vllm_reported(log, tmp_path):
    text = log.read_text(errors="replace")
    facts = classify(text).facts
    args = _flags(text)
    shape = LONG_CONTEXT if log.name.startswith("a_context") else {}
    spec = resolve_model(str(tiny_llama(tmp_path / "model", **shape)))
    config = ServeConfig(
        model=spec.serve_name,
        max_model_len=args["max_model_len"],
        max_num_seqs=args["max_num_seqs"],
        gpu_memory_utilization=args["gpu_memory_utilization"],
        enforce_eager=True,
    )
    est = estimate(spec, int(facts["total_gib"] * GIB), config, gpu_name="node 0", device=CPU)
    reported = facts["available_kv_gib"] * GIB
    assert est.kv_pool_bytes == pytest.approx(reported, rel=0.10)
    # vLLM's rounded GiB is all the log gives: the non-KV side within 0.05 GiB
    assert est.non_kv_bytes / GIB == pytest.approx(facts["consumed_gib"], abs=0.05)
    if "kv_cache_tokens" in facts:
        assert est.kv_cache_tokens == pytest.approx(facts["kv_cache_tokens"], rel=0.10)


def test_the_cpu_batch_defaults_are_vllms_for_the_cpu_backend_per_rank(tmp_path):
    spec = resolve_model(str(tiny_llama(tmp_path / "model")))
    config = ServeConfig(model=spec.serve_name, max_model_len=4096, gpu_memory_utilization=0.2)
    on_cpu = estimate(spec, 16 * GIB, config, device=CPU)
    assert (on_cpu.max_num_batched_tokens, on_cpu.max_num_seqs) == (2048, 128)
    # a GPU of the same size gets vLLM's GPU defaults (256 sequences)
    assert estimate(spec, 16 * GIB, config, device=CUDA).max_num_seqs == 256
