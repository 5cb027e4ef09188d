"""Model specs: config reading the way vLLM does, and resolution from local dirs, the HF cache, profiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_tuner.errors import ModelError
from vllm_tuner.models import ModelSpec, find_profile, resolve_model

DATA = Path(__file__).parent / "data" / "models"
GIB = 1 << 30


def test_local_dir_reads_config_index_and_tokenizer_cap():
    spec = resolve_model(str(DATA / "tiny-llama"))
    assert spec.weights_bytes == 123456789 and spec.weights_exact
    assert spec.derived_max_model_len == 2048  # tokenizer model_max_length caps max_position_embeddings
    assert spec.serve_name == str(DATA / "tiny-llama")
    assert spec.kv_layers[0].kind == "full" and spec.kv_layers[0].num_kv_heads == 2
    assert spec.kv_layers[0].head_size == 32  # hidden // heads


def test_hf_cache_layout(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(DATA / "tiny-llama" / "config.json", snap / "config.json")
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    spec = resolve_model("acme/tiny", allow_download=False)
    assert spec.serve_name == "acme/tiny" and not spec.weights_exact and "HF cache" in spec.source


def test_unknown_model_is_one_line_naming_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        resolve_model("nobody/nothing-7b", allow_download=False)
    text = str(err.value)
    assert "\n" not in text and "HF cache" in text and "bundled profiles" in text


def test_profiles_by_name_hf_id_and_alias_case_insensitive():
    assert find_profile("LLAMA-3.1-8B").name == "llama-3.1-8b"
    assert find_profile("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert find_profile("deepseek-ai/DeepSeek-R1").name == "deepseek-v3"


@pytest.mark.parametrize(
    "name",
    [
        "glm-4-32b-awq",
        "glm-4.7-flash",
        "glm-4.7-flash-nvfp4",
        "deepseek-coder-33b-awq",
        "qwen2.5-coder-32b-awq",
        "qwen2.5-7b",
        "qwen2.5-14b",
        "mistral-7b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "deepseek-v2-lite",
        "gemma-2-9b",
        "gemma-3-12b",
    ],
)
def test_bundled_profiles_load(name):
    spec = find_profile(name)
    assert spec is not None and spec.weights_bytes > GIB and spec.derived_max_model_len >= 8192


def test_text_config_and_kv_head_aliases():
    spec = ModelSpec.from_config(
        "mm",
        {
            "model_type": "llava",
            "text_config": {
                "model_type": "llama",
                "hidden_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "multi_query_group_num": 2,
                "vocab_size": 100,
                "max_position_embeddings": 1024,
            },
        },
    )
    assert spec.kv_layers[0].num_kv_heads == 2 and spec.num_layers == 2


def test_head_dim_fallbacks():
    base = {
        "model_type": "llama",
        "hidden_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "vocab_size": 10,
    }
    assert ModelSpec.from_config("a", {**base, "head_dim": 128}).kv_layers[0].head_size == 128
    assert ModelSpec.from_config("b", {**base, "head_dim": None}).kv_layers[0].head_size == 64
    assert ModelSpec.from_config("c", {**base, "hidden_size_per_head": 32}).kv_layers[0].head_size == 32


def test_mla_latent_and_sliding_patterns():
    v3 = find_profile("deepseek-v3")
    assert v3.is_mla and v3.kv_layers[0].head_size == 576 and v3.kv_layers[0].heads_per_rank(8) == 1
    gemma2 = find_profile("gemma-2-9b")
    assert {(g.kind, g.count, g.window) for g in gemma2.kv_layers} == {
        ("full", 21, None),
        ("sliding", 21, 4096),
    }
    gemma3 = find_profile("gemma-3-12b")
    assert {(g.kind, g.count) for g in gemma3.kv_layers} == {("full", 8), ("sliding", 40)}
    assert gemma3.derived_max_model_len == 131072  # Gemma3's RoPE factor is not applied
    qwen = find_profile("qwen2.5-7b")
    assert [g.kind for g in qwen.kv_layers] == ["full"]  # use_sliding_window: false


def test_layer_types_and_hybrid_state():
    cfg = {
        "model_type": "qwen3_next",
        "hidden_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "vocab_size": 1000,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "linear_num_value_heads": 32,
        "linear_num_key_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
    }
    spec = ModelSpec.from_config("hyb", cfg)
    kinds = {g.kind: g for g in spec.kv_layers}
    assert kinds["full"].count == 1 and kinds["mamba"].count == 3
    assert kinds["mamba"].state_bytes == (3 * (2 * 16 * 128 + 32 * 128) + 32 * 128 * 128) * 2


def test_derived_max_len_scales_linear_rope_not_yarn():
    coder = find_profile("deepseek-coder-33b-awq")
    assert coder.derived_max_model_len == 16384  # 16384 × 4 (linear), capped by the tokenizer's 16384
    assert find_profile("deepseek-v2-lite").derived_max_model_len == 163840  # yarn: not scaled


def test_quantized_weights_are_computed_from_bytes_per_param():
    awq = find_profile("qwen2.5-coder-32b-awq")
    assert awq.quantization.method == "awq" and 17 * GIB < awq.weights_bytes < 19.5 * GIB
    w8 = find_profile("llama-3.1-70b-w8a8")
    assert w8.quantization.method == "int8"
    assert abs(w8.weights_per_gpu() / GIB - 67.7229) / 67.7229 < 0.01  # vLLM log: "took 67.7229 GB" (S013)
    fp4 = find_profile("glm-4.7-flash-nvfp4")
    assert (
        fp4.quantization.method == "nvfp4"
        and fp4.weights_bytes < find_profile("glm-4.7-flash").weights_bytes / 2.5
    )


def test_exact_weights_plus_rope_cache_match_vllm_log():
    spec = find_profile("llama-3.1-8b")
    assert round(spec.weights_per_gpu() / GIB, 4) == 14.9888  # "Model loading took 14.9889 GiB" (S016)


def test_unreadable_config_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path))
