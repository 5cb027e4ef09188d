"""The VRAM model: exact KV numbers, vLLM's budget and capacity math, calibration, sharing."""

from __future__ import annotations

import math

import pytest

from vllm_tuner.estimate import GIB, Calibration, estimate, kv_layout
from vllm_tuner.models import ModelSpec, find_profile
from vllm_tuner.serveconfig import ServeConfig

H100 = int(79.19 * GIB)
R3090 = int(23.58 * GIB)


def cfg(**kw) -> ServeConfig:
    return ServeConfig(model="m", **kw)


def test_gqa_bytes_per_token_llama_8b():
    spec = find_profile("llama-3.1-8b")
    assert kv_layout(spec, 1).bytes_per_token == 131072
    assert kv_layout(spec, 2).bytes_per_token == 65536
    assert kv_layout(spec, 16).bytes_per_token == 32 * 1 * 256 * 2  # heads replicated past TP 8
    assert kv_layout(spec, 1, kv_cache_dtype="fp8").bytes_per_token == 65536


def test_mla_replicated_across_tp():
    v3 = find_profile("deepseek-v3")
    for tp in (1, 8):
        assert kv_layout(v3, tp).bytes_per_token == 61 * 1152
    assert kv_layout(v3, 8, kv_cache_dtype="fp8_ds_mla").bytes_per_token == 61 * 656
    assert kv_layout(v3, 1).block_size == 64


def test_sliding_window_groups_and_blocks():
    gemma = find_profile("gemma-2-9b")
    layout = kv_layout(gemma, 1)
    assert layout.group_size == 21 and layout.bytes_per_block == 21 * 16 * 8 * 512 * 2
    # full group grows with the context, the sliding group is bounded by window + in-flight tokens
    assert layout.blocks_per_request(8192, 4096) == 512 + math.ceil(min(4095 + 4096, 8192) / 16) + 1
    assert layout.blocks_per_request(1024, 4096) == 64 + 64 + 1


def test_budget_formula_and_tokens_as_vllm_logs_them():
    spec = find_profile("llama-3.1-8b")
    est = estimate(spec, H100, cfg(max_model_len=32768), gpu_name="h100")
    requested = math.ceil(H100 * 0.92)
    assert (
        est.kv_pool_bytes
        == requested - est.weights_bytes - est.non_torch_bytes - est.activation_bytes - est.cudagraph_bytes
    )
    assert est.num_blocks == est.kv_pool_bytes // (16 * 131072)
    assert est.kv_cache_tokens == int(est.num_blocks / 2048 * 32768)
    assert (est.max_num_seqs, est.max_num_batched_tokens) == (1024, 8192)  # H100 serve defaults
    assert est.fits and est.max_model_len_fit == 131072


def test_defaults_by_gpu_size_and_eager():
    spec = find_profile("qwen2.5-7b")
    small = estimate(spec, R3090, cfg())
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (256, 2048)
    assert small.max_model_len == 32768 and small.utilization == 0.92
    a100 = estimate(spec, int(79.15 * GIB), cfg(), gpu_name="a100-80gb")
    assert a100.max_num_batched_tokens == 2048
    assert estimate(spec, R3090, cfg(enforce_eager=True)).cudagraph_bytes == 0


def test_kv_cache_memory_bytes_overrides_pool():
    spec = find_profile("qwen2.5-7b")
    est = estimate(spec, R3090, cfg(kv_cache_memory_bytes=4 * GIB))
    assert est.kv_pool_bytes == 4 * GIB and est.kv_from_flag


def test_max_context_seqs_and_min_utilization_are_consistent():
    spec = find_profile("llama-3.1-8b")
    est = estimate(spec, R3090, cfg(max_model_len=32768))
    ctx = est.max_context(4)
    assert 4 * math.ceil(ctx / 16) <= est.usable_blocks < 4 * math.ceil((ctx + 16) / 16) + 4
    assert est.max_seqs(ctx) >= 4
    util = est.min_utilization(32768, 1)
    again = estimate(spec, R3090, cfg(max_model_len=32768, gpu_memory_utilization=util))
    assert again.fits and again.max_seqs(32768) >= 1
    assert est.min_utilization(131072, 64) is None


def test_does_not_fit_reports_vllm_estimated_max_len():
    spec = find_profile("llama-3.1-8b")
    est = estimate(spec, R3090, cfg(max_model_len=131072))
    assert not est.fits and 0 < est.max_model_len_fit < 131072
    assert any("estimated maximum model length" in n for n in est.notes)


def test_calibration_reproduces_measured_pool_exactly():
    spec = find_profile("qwen2.5-7b")
    measured = cfg(max_model_len=16384, max_num_seqs=64, gpu_memory_utilization=0.9)
    facts = {
        "total_gib": 23.58,
        "gpu_memory_utilization": 0.9,
        "weights_gib": 14.25,
        "available_kv_gib": 5.12,
        "cudagraph_estimated_gib": 0.61,
        "kv_cache_tokens": 89000,
    }
    cal = Calibration.from_facts(facts, measured)
    est = estimate(spec, R3090, measured, calibration=cal)
    assert abs(est.kv_pool_bytes - 5.12 * GIB) < 0.001 * 5.12 * GIB
    assert est.weights_bytes == int(round(14.25 * GIB)) and est.calibrated
    higher = estimate(spec, R3090, measured.replace(gpu_memory_utilization=0.95), calibration=cal)
    assert abs(higher.kv_pool_bytes - est.kv_pool_bytes - 0.05 * R3090) < 2 * (1 << 20)


def test_calibration_without_graph_estimate_keeps_the_sum():
    spec = find_profile("llama-3.1-8b")
    measured = cfg(max_model_len=8192, gpu_memory_utilization=0.9)
    cal = Calibration.from_facts(
        {"total_gib": 23.58, "available_kv_gib": 4.0, "weights_gib": 14.99}, measured
    )
    est = estimate(spec, R3090, measured, calibration=cal)
    assert abs(est.kv_pool_bytes - 4 * GIB) < 0.001 * 4 * GIB
    eager = estimate(spec, R3090, measured.replace(enforce_eager=True), calibration=cal)
    assert eager.kv_pool_bytes > est.kv_pool_bytes


def test_quantized_model_fits_where_bf16_does_not():
    awq = find_profile("qwen2.5-coder-32b-awq")
    est = estimate(awq, R3090, cfg(max_model_len=8192))
    assert est.fits and est.weights_bytes < 19.5 * GIB
    big = find_profile("llama-3.1-70b")
    assert estimate(big, R3090, cfg(max_model_len=8192)).kv_pool_bytes == 0


def test_hybrid_counts_state_per_sequence():
    cfg_json = {
        "model_type": "qwen3_next",
        "hidden_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "vocab_size": 1000,
        "max_position_embeddings": 262144,
        "layer_types": ["linear_attention"] * 6 + ["full_attention"] * 2,
        "linear_num_value_heads": 32,
    }
    spec = ModelSpec.from_config("hyb", cfg_json)
    layout = kv_layout(spec, 1)
    assert layout.block_size > 16 and layout.bytes_per_token == 2 * 2 * 512 * 2
    # group size 2: one full-attention group (2 layers) + three Mamba groups of one block each
    assert layout.group_size == 2
    assert layout.blocks_per_request(10**5, 0) == math.ceil(10**5 / layout.block_size) + 3


def test_bad_utilization_raises():
    from vllm_tuner.errors import UsageError

    with pytest.raises(UsageError):
        estimate(find_profile("qwen2.5-7b"), R3090, cfg(gpu_memory_utilization=1.5))


def test_weights_measured_at_one_offload_carry_to_another():
    """--cpu-offload-gb moves weights to CPU memory and nothing else: what a launch at 4 GiB loaded tells
    the weights at 6 GiB (2 GiB fewer) and at none; vLLM's logged offload counts where it is known."""
    spec = find_profile("glm-4.7-flash")
    at4 = cfg(max_model_len=8192, tensor_parallel_size=2, gpu_memory_utilization=0.95, cpu_offload_gb=4.0)
    facts = {"total_gib": 31.36, "gpu_memory_utilization": 0.95, "weights_gib": 24.5, "available_kv_gib": 3.9}
    cal = Calibration.from_facts(facts, at4)
    at6 = estimate(spec, int(31.36 * GIB), at4.replace(cpu_offload_gb=6.0), calibration=cal)
    same = estimate(spec, int(31.36 * GIB), at4, calibration=cal)
    assert at6.weights_bytes == int(round(22.5 * GIB)) and same.weights_bytes == int(round(24.5 * GIB))
    assert at6.kv_pool_bytes - same.kv_pool_bytes == 2 * GIB
    logged = Calibration.from_facts({**facts, "offloaded_gib": 4.37}, at4)  # the last parameter overshot
    none = estimate(spec, int(31.36 * GIB), at4.replace(cpu_offload_gb=0.0), calibration=logged)
    assert none.weights_bytes == pytest.approx((24.5 + 4.37) * GIB, abs=2)
