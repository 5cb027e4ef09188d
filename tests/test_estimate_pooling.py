"""Pooling models sized the way vLLM 0.32 budgets them (vllm_tuner.pooling): no sampler warm-up, no LM
head for a converted checkpoint, a KV cache for a decoder embedder and none for a bidirectional encoder,
whose batches hold whole prompts. Checked against the simulator, whose truth is its own."""

from __future__ import annotations

import pytest

from vllm_tuner.deploy.costs import model_costs
from vllm_tuner.deploy.plan import GIB, GpuInfo, make_plan
from vllm_tuner.deploy.spec import parse_deployment
from vllm_tuner.estimate import estimate
from vllm_tuner.models import ModelSpec, find_profile
from vllm_tuner.pooling import runner_of
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite import oracle
from vllm_tuner.simlite.activate import load_scenario_file, resolve
from vllm_tuner.vllmargv import value_of

CARD = int(15.7 * GIB)  # a 16 GB card, guide 003's
POOLING = ("--runner", "pooling")
BGE_M3 = {  # BAAI/bge-m3: an XLM-RoBERTa encoder, CLS pooling
    "architectures": ["XLMRobertaModel"],
    "model_type": "xlm-roberta",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 8194,
    "vocab_size": 250002,
    "torch_dtype": "float32",
}


def config(model: str, *extra: str, **kw) -> ServeConfig:
    return ServeConfig(model=model, max_model_len=8192, max_num_seqs=4, extra_args=tuple(extra), **kw)


def test_the_runner_follows_the_flags_and_the_architecture():
    embedder = find_profile("qwen3-embedding-4b").config
    assert not runner_of(embedder).pooling  # a *ForCausalLM checkpoint generates by default
    assert runner_of(embedder, POOLING).pooling and runner_of(embedder, POOLING).converted
    assert runner_of(embedder, ["--convert=embed"]).pooling
    assert not runner_of(embedder, [*POOLING, "--runner", "generate"]).pooling  # the last one wins
    bge = runner_of(BGE_M3)
    assert bge.pooling and bge.encoder_only and not bge.converted and not bge.keeps_kv_cache
    assert value_of(["--runner_type", "x", "--runner", "pooling"], "--runner") == "pooling"


def test_a_decoder_embedder_keeps_its_kv_cache_and_warms_a_pooler_not_the_sampler():
    spec = find_profile("qwen3-embedding-4b")
    gen = estimate(spec, CARD, config(spec.serve_name), gpu_name="rtx-4080")
    pool = estimate(spec, CARD, config(spec.serve_name, *POOLING), gpu_name="rtx-4080")
    assert gen.activation_bytes - pool.activation_bytes == 4 * (151665 - 2560) * 4  # max_num_seqs rows
    assert pool.kv_bytes_per_token == gen.kv_bytes_per_token == 36 * 2 * 8 * 128 * 2
    assert pool.weights_bytes == gen.weights_bytes  # tied embeddings: no LM head of its own
    assert pool.max_num_batched_tokens == gen.max_num_batched_tokens == 2048  # last-token pooling chunks


def test_a_converted_untied_checkpoint_loads_no_lm_head():
    spec = find_profile("qwen2.5-7b-awq")
    gen = estimate(spec, CARD, config(spec.serve_name), gpu_name="rtx-4080")
    pool = estimate(spec, CARD, config(spec.serve_name, *POOLING), gpu_name="rtx-4080")
    assert gen.weights_bytes - pool.weights_bytes == 152064 * 3584 * 2


def test_an_encoder_has_no_kv_cache_and_batches_a_whole_prompt():
    spec = ModelSpec.from_config("BAAI/bge-m3", BGE_M3)
    est = estimate(spec, CARD, config("BAAI/bge-m3", max_num_batched_tokens=None), gpu_name="rtx-4080")
    assert (est.kv_bytes_per_token, est.kv_pool_bytes, est.kv_cache_tokens) == (0, 0, 0)
    assert est.fits and est.max_model_len_fit == est.derived_max_model_len >= est.max_model_len == 8192
    assert est.max_num_batched_tokens == 8192  # no chunked prefill: max(max_model_len, 2048)
    assert est.max_seqs(8192) == 4 and est.kv_bytes_for(8192, 4) == 0


@pytest.mark.parametrize("model", ["qwen3-embedding-4b", "qwen3-reranker-0.6b"])
def test_the_estimated_minimum_utilization_boots_the_simulated_pooling_server(model):
    """The estimate's smallest --gpu-memory-utilization for 4 x 8192 tokens starts the simulated vLLM
    (its memory truth is its own) with a pool that holds them."""
    spec = find_profile(model)
    est = estimate(spec, CARD, config(spec.serve_name, *POOLING), gpu_name="rtx-4080")
    util = est.min_utilization(8192, 4)
    scenario = resolve(
        {**load_scenario_file("rtx-4090"), "gpus": [{"name": "NVIDIA RTX 4080", "total_gib": 15.7}]}
    )
    argv = ["serve", spec.serve_name, *POOLING, "--max-model-len", "8192", "--max-num-seqs", "4"]
    truth = oracle.truth(scenario, [*argv, "--gpu-memory-utilization", f"{util + 0.01:.4f}"], [0])
    assert truth.boots, truth.category
    assert truth.max_concurrency >= 4


def test_a_deployment_sizes_a_pooling_model_from_its_flags():
    """The planner passes the file's flags to the estimator: --runner pooling drops the sampler logits,
    and an encoder gets no KV budget and no --kv-cache-memory-bytes."""
    d = parse_deployment(
        {
            "name": "rag",
            "gpus": {"count": 1, "memory": "15.7GiB"},
            "models": [
                {
                    "name": "embedder",
                    "model": "qwen3-embedding-4b",
                    "port": 8101,
                    "flags": {"runner": "pooling"},
                    "needs": {"min_context": 8192, "min_seqs": 4, "objective": "fixed"},
                },
                {
                    "name": "as-generator",
                    "model": "qwen3-embedding-4b",
                    "port": 8102,
                    "needs": {"min_context": 8192, "min_seqs": 4, "objective": "fixed"},
                },
            ],
        }
    )
    costs = model_costs(d, CARD, gpu_name="rtx-4080")
    assert costs["as-generator"].overhead_bytes - costs["embedder"].overhead_bytes == 4 * (151665 - 2560) * 4
    encoder = parse_deployment(
        {
            "name": "bge",
            "gpus": {"count": 1, "memory": "15.7GiB"},
            "models": [
                {"name": "bge", "model": "bge", "port": 8103, "needs": {"min_context": 8192, "min_seqs": 8}}
            ],
        }
    )
    costs = model_costs(encoder, CARD, resolve=lambda _name: ModelSpec.from_config("BAAI/bge-m3", BGE_M3))
    assert costs["bge"].kv_bytes_per_token == 0
    plan = make_plan(encoder, [GpuInfo(0, "card", CARD)], costs)
    assert plan.fits, plan.problems
    (inst,) = plan.instances
    assert inst.kv_bytes == 0 and "--kv-cache-memory-bytes" not in inst.serve_args()


def test_a_float32_checkpoint_is_served_in_16_bits_by_the_estimate_and_the_simulator():
    """vLLM's --dtype auto (_resolve_auto_dtype) downcasts float32 checkpoints, as many sentence-transformers
    encoders are: float16 for a pooling model, bfloat16 for a generator, two bytes either way."""
    from vllm_tuner.simlite import groundtruth

    on_disk = 2_271_145_984  # bge-m3's float32 tensors
    spec = ModelSpec.from_config("BAAI/bge-m3", BGE_M3, weights_bytes=on_disk)
    assert (spec.weights_bytes, spec.dtype_bytes) == (on_disk // 2, 2)
    assert ModelSpec.from_config("BAAI/bge-m3", BGE_M3).dtype_bytes == 2
    assert groundtruth.model_truth("bge-m3", BGE_M3, on_disk).weights_bytes == on_disk // 2
