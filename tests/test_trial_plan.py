"""The worst-case load plan: every sequence at full length, decoding just long enough to overlap."""

from __future__ import annotations

from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.trial import GIB, ProbePlan, overlap_decode_tokens


def test_decode_covers_the_scheduler_steps_that_prefill_every_prompt():
    # 24 × 32768 prompt tokens at 2048 per step land after 384 steps; the first request decodes past that
    assert overlap_decode_tokens(24, 32768, 2048) == 384 * 5 // 4 + 32
    # a bigger step budget (H100 class: 8192) needs a quarter of the steps
    assert overlap_decode_tokens(24, 32768, 8192) == 96 * 5 // 4 + 32


def test_decode_stays_within_its_bounds():
    assert overlap_decode_tokens(1, 1024, 2048) == 64  # at least a few dozen steps of decode
    assert overlap_decode_tokens(256, 131072, 2048) == 4096  # never more than the old fixed decode


def test_worst_case_fills_every_sequence_to_the_context():
    cfg = ServeConfig("m", max_model_len=32768, max_num_seqs=24)
    plan = ProbePlan.worst_case(cfg, headroom_bytes=GIB)
    assert plan.concurrency == 24
    assert plan.prompt_tokens + plan.max_tokens == 32768
    assert plan.max_tokens == overlap_decode_tokens(24, 32768, 2048)


def test_worst_case_uses_the_configured_batch_budget_and_leaves_room_for_a_prompt():
    cfg = ServeConfig("m", max_model_len=65536, max_num_seqs=4, max_num_batched_tokens=16384)
    assert ProbePlan.worst_case(cfg, headroom_bytes=GIB).max_tokens == overlap_decode_tokens(4, 65536, 16384)
    tiny = ServeConfig("m", max_model_len=96, max_num_seqs=1)
    plan = ProbePlan.worst_case(tiny, headroom_bytes=GIB)
    assert plan.max_tokens == 48 and plan.prompt_tokens == 48  # at most half the context is decode


def test_a_sustained_soak_decodes_an_eighth_of_the_context():
    cfg = ServeConfig("m", max_model_len=32768, max_num_seqs=8)
    plan = ProbePlan.worst_case(cfg, headroom_bytes=GIB, duration_s=60, sustained=True)
    assert (plan.prompt_tokens, plan.max_tokens, plan.duration_s) == (28672, 4096, 60)
