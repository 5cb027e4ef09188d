"""The simulator's weights truth (``simlite/weights.py``) against vLLM's own layer shapes.

Each expectation is written out from vLLM 0.3x's modules (``FusedMoE``, ``determine_expert_map``,
``DeepseekV2MLAAttention``, ``Glm4MoE``, ``VocabParallelEmbedding``, ``offloader/uva.py``), not from the
simulator's code and never from the tuner's estimator.
"""

from __future__ import annotations

import pytest

from vllm_tuner.simlite import groundtruth, oracle, server, weights
from vllm_tuner.simlite.activate import load_scenario_file

GIB = 1 << 30

# GLM-4.7-Flash (bundled profile): 47 layers, hidden 2048, 64 routed experts of width 1536 + 1 shared,
# top-4, layer 0 dense (first_k_dense_replace 1, intermediate 10240), MLA (q_lora 768, kv_lora 512,
# nope 192, rope 64, v 256, 20 heads), vocab 154880, untied
H, L, E, I_MOE, I_DENSE, HEADS, VOCAB = 2048, 47, 64, 1536, 10240, 20, 154880
Q_LORA, KV_LORA, NOPE, ROPE, V = 768, 512, 192, 64, 256


def glm_flash():
    config, size = server.find_model("glm-4.7-flash")
    assert size is None  # no safetensors size: the layout is the truth
    return groundtruth.model_truth("glm-4.7-flash", config, size)


def glm_flash_bf16_per_gpu(tp: int) -> float:
    """vLLM's parameters of GLM-4.7-Flash on one of ``tp`` ranks, in bytes, by module."""
    bf16, fp32 = 2, 4
    embed = -(-VOCAB // 64) * 64 * H / tp * bf16  # VocabParallelEmbedding, ParallelLMHead: padded to 64
    attn = (
        H * (Q_LORA + KV_LORA + ROPE)  # fused_qkv_a_proj: ReplicatedLinear, whole on every rank
        + Q_LORA
        + KV_LORA  # q_a_layernorm, kv_a_layernorm
        + Q_LORA * HEADS * (NOPE + ROPE) / tp  # q_b_proj: ColumnParallelLinear
        + KV_LORA * HEADS * (NOPE + V) / tp  # kv_b_proj
        + HEADS * V * H / tp  # o_proj: RowParallelLinear
        + KV_LORA * HEADS * (NOPE + V) / tp  # W_UK_T + W_UV kept after loading (mla_attention.py)
    ) * bf16
    dense_mlp = 3 * H * I_DENSE / tp * bf16
    moe = (
        H * E * fp32  # GateLinear(params_dtype=float32)
        + E * fp32  # e_score_correction_bias
        + E * 3 * H * (I_MOE / tp) * bf16  # FusedMoE w13 + w2, intermediate_size_per_partition = I // tp
        + 3 * H * I_MOE / tp * bf16  # shared experts: a TP-split MLP
    )
    norms = 2 * H * bf16
    return 2 * embed + H * bf16 + L * (attn + norms) + dense_mlp + (L - 1) * moe


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glm_flash_bf16_per_gpu_is_vllms_module_sum(tp):
    loaded = glm_flash().loaded(tp, 1, False, 0)
    assert loaded.bytes == pytest.approx(glm_flash_bf16_per_gpu(tp), abs=1024)
    assert loaded.offloaded_bytes == 0 and loaded.local_experts is None


def test_glm_flash_bf16_is_far_from_the_dense_formula_that_loaded_it_in_nothing():
    per_gpu = glm_flash().loaded(2, 1, False, 0).bytes
    dense = L * (4 * H * H + 3 * H * I_DENSE) * 2 + 2 * VOCAB * H * 2  # what the simulator used to load
    assert 28 * GIB < per_gpu < 28.5 * GIB  # ~30B parameters in bf16 over two cards
    assert per_gpu > 3 * dense / 2


def test_nvfp4_shrinks_the_linear_layers_the_checkpoint_quantized_and_keeps_attention():
    bf16 = glm_flash()
    config, size = server.find_model("glm-4.7-flash-nvfp4")
    fp4 = groundtruth.model_truth("glm-4.7-flash-nvfp4", config, size)
    # the same module list; compressed-tensors NVFP4: 4-bit values + an fp8 scale per 16 (0.5625 B),
    # its ignore list keeps lm_head, self_attn and the router gate in their dtype
    bf16_experts = (E * 3 * H * I_MOE + 3 * H * I_MOE) * (L - 1) + 3 * H * I_DENSE  # every MLP weight
    saved = bf16_experts * (2 - (0.5 + 1 / 16))
    assert bf16.weights_bytes - fp4.weights_bytes == pytest.approx(saved, rel=1e-6)
    assert fp4.layout.quant.method == "nvfp4"
    attn = next(p for p in fp4.layout.layers[3] if p.name.endswith("q_b_proj"))
    gate = next(p for p in fp4.layout.layers[3] if p.name.endswith("mlp.gate"))
    assert not fp4.layout.quant.covers(attn.name) and not fp4.layout.quant.covers(gate.name)


def qwen_moe_config() -> dict:
    """Qwen1.5-MoE-A2.7B's shape: 60 experts (not a multiple of 8), 16 heads, a gated shared expert."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "vocab_size": 151936,
        "max_position_embeddings": 8192,
    }


def test_expert_parallel_gives_whole_experts_and_the_remainder_to_the_first_ranks():
    model = groundtruth.model_truth("qwen-moe", qwen_moe_config(), None)
    tp = model.loaded(8, 1, False, 0)
    ep = model.loaded(8, 1, True, 0)
    # determine_expert_map: 60 = 7 x 8 + 4, ranks 0-3 hold 8 whole experts; TP gives every rank all 60
    # at 1408 // 8 = 176 of their width, i.e. 7.5 experts' worth: the busiest EP rank holds half an expert
    # more per layer (w13 + w2 = 3 x 2048 x 1408 bf16 values)
    assert ep.local_experts == 8 and tp.local_experts is None
    assert ep.bytes - tp.bytes == 24 * 0.5 * 3 * 2048 * 1408 * 2
    even = groundtruth.model_truth("glm", server.find_model("glm-4.7-flash")[0], None)
    assert even.loaded(2, 1, True, 0).bytes == even.loaded(2, 1, False, 0).bytes  # 64 over 2: the same


def test_expert_parallel_runs_whole_experts_so_the_moe_activation_is_wider():
    model = groundtruth.model_truth("qwen-moe", qwen_moe_config(), None)
    assert model.mlp_width(8, False) == max(3 * 5632 // 8, 4 * 3 * (1408 // 8))
    assert model.mlp_width(8, True) == 4 * 3 * 1408


def test_offload_moves_decoder_parameters_in_order_until_the_budget_and_never_the_embeddings():
    model = glm_flash()
    whole = model.loaded(2, 1, False, 0)
    some = model.loaded(2, 1, False, 4 * GIB)
    # uva.py offloads parameter by parameter and stops once the budget is reached: the last one may
    # overshoot it by at most one parameter (here the largest is one layer's w13 of 64 experts)
    w13 = E * 2 * I_MOE // 2 * H * 2
    assert 4 * GIB <= some.offloaded_bytes < 4 * GIB + w13
    assert some.bytes == whole.bytes - some.offloaded_bytes
    everything = model.loaded(2, 1, False, 100 * GIB)
    kept = 2 * (-(-VOCAB // 64) * 64 * H // 2) * 2 + H * 2  # embed_tokens + lm_head halves + final norm
    assert everything.bytes == kept


def test_a_checkpoint_size_is_split_as_the_layout_splits_it():
    config, _ = server.find_model("glm-4.7-flash")
    sized = groundtruth.model_truth("glm", config, 60_000_000_000)
    layout = sized.layout
    share = layout.on_gpu(2, 1, False, 0).bytes / layout.total_bytes()
    assert sized.loaded(2, 1, False, 0).bytes == pytest.approx(60_000_000_000 * share, abs=2)
    dense, size = server.find_model("qwen2.5-7b")
    qwen = groundtruth.model_truth("qwen", dense, size)
    assert qwen.loaded(2, 1, False, 0).bytes == size // 2  # a dense checkpoint of known size: half each


def test_deepseek_v3_fp8_at_tp8_holds_what_a_public_log_shows():
    """DeepSeek-R1 (V3 architecture, FP8 blocks of 128x128) on eight devices: HabanaAI/vllm-fork#809
    logs 'Pre-loading model weights ... took 79.41 GiB of device memory' on each."""
    config, size = server.find_model("deepseek-v3")
    per_gpu = groundtruth.model_truth("deepseek-v3", config, size).loaded(8, 1, False, 0).bytes
    assert per_gpu / GIB == pytest.approx(79.41, rel=0.01)


def test_pipeline_stages_split_layers_as_get_pp_indices_does():
    assert weights.pp_range(47, 2, 0) == (0, 24) and weights.pp_range(47, 2, 1) == (24, 47)
    assert [weights.pp_range(10, 4, s) for s in range(4)] == [(0, 2), (2, 5), (5, 8), (8, 10)]


def test_the_simulated_vllm_takes_expert_parallel_and_runner_as_vllm_does():
    args = oracle.parse(["glm-4.7-flash", "-tp", "2", "-ep", "--runner", "generate"])
    assert args.enable_expert_parallel and args.runner == "generate"
    assert oracle.parse(["glm-4.7-flash", "--enable-expert-parallel"]).enable_expert_parallel
    assert not oracle.parse(["glm-4.7-flash", "--disable-expert-parallel"]).enable_expert_parallel
    assert oracle.parse(["glm-4.7-flash", "--runner", "pooling"]).runner == "pooling"
    assert oracle.parse(["glm-4.7-flash"]).runner == "auto"


def test_the_oracle_loads_glm_flash_bf16_with_little_room_left_on_two_5090s():
    scenario = load_scenario_file("rtx-5090")
    base = ["serve", "glm-4.7-flash", "-tp", "2", "--kv-cache-dtype", "fp8", "--max-num-seqs", "1"]
    # the guide's working BF16 config: 8000 tokens, eager, 0.96
    guide = oracle.truth(
        scenario,
        [*base, "--max-model-len", "8000", "--enforce-eager", "--gpu-memory-utilization", "0.96"],
        [0, 1],
    )
    assert guide.boots
    # its whole context does not fit at the default utilization, with or without expert parallelism
    for ep in ([], ["--enable-expert-parallel"]):
        full = oracle.truth(scenario, [*base, *ep, "--max-model-len", "202752"], [0, 1])
        assert full.category == "kv_cache_insufficient_for_max_len"
