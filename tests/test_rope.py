"""The rope-scaling knob's YaRN override (vllm_tuner.rope), checked against vLLM 0.32's reading of it (the
simulator's independent copy of _get_and_verify_max_len and the --hf-overrides order), and the estimate's
advice past a model's length."""

from __future__ import annotations

import json

import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.estimate import GIB, estimate
from vllm_tuner.models import ModelSpec, find_profile
from vllm_tuner.rope import beyond_native, describe, extension, parse_hf_overrides, with_hf_overrides
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite import hfconfig


def vllm_derived(config: dict, flag_value: str) -> int:
    """The derived max length vLLM 0.32 reads with ``--hf-overrides flag_value``."""
    overrides = hfconfig.dict_or_str(flag_value)
    return hfconfig.derived_max_len(hfconfig.with_overrides(config, overrides))[0]


def vllm_rope(config: dict, flag_value: str) -> dict:
    return hfconfig.with_overrides(config, hfconfig.dict_or_str(flag_value))["rope_parameters"]


def test_glm_without_rope_scaling_gets_yarn_4_and_the_length_vllm_0_3x_needs():
    spec = find_profile("glm-4-32b-awq")
    ext = extension(spec, 131072)
    assert (ext.native, ext.length, ext.original, ext.factor, ext.configured_factor) == (
        32768,
        131072,
        32768,
        4.0,
        None,
    )
    assert vllm_derived(spec.config, ext.flag_value) == 131072
    # the dict replaces the model's RoPE dict: it repeats the base and the partial rotary factor
    assert vllm_rope(spec.config, ext.flag_value) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    longer = with_hf_overrides(spec, ext.flag_value)
    assert longer.derived_max_model_len == 131072
    assert longer.rope_cache_bytes() == 4 * spec.rope_cache_bytes()  # YaRN's cos/sin cache: original × factor
    assert "short texts" in ext.cost and ext.words == "YaRN ×4 (32,768 → 131,072 tokens)"
    assert describe(ext.flag_value) == "YaRN ×4 to 131,072 tokens"


def test_the_yarn_factor_is_the_smallest_that_reaches_the_length():
    spec = find_profile("glm-4-32b-awq")
    ext = extension(spec, 65536)
    assert ext.factor == 2.0 and ext.length == 65536
    odd = extension(spec, 40000)
    assert odd.factor == 1.23 and odd.length >= 40000
    assert vllm_derived(spec.config, odd.flag_value) == odd.length


def test_qwens_rope_theta_survives_the_override():
    # without it vLLM's rotary embedding would fall back to base 10000 for a model trained at 1e6
    spec = find_profile("qwen2.5-7b")
    ext = extension(spec, 131072)
    assert vllm_rope(spec.config, ext.flag_value)["rope_theta"] == 1_000_000.0


def test_a_model_with_yarn_configured_gets_a_larger_factor_and_other_advice():
    spec = find_profile("deepseek-v2-lite")  # YaRN ×40 from 4096: max_position_embeddings 163840
    assert spec.derived_max_model_len == 163840
    ext = extension(spec, 327680)
    assert (ext.factor, ext.configured_factor, ext.original, ext.length) == (80.0, 40.0, 4096, 327680)
    rope = vllm_rope(spec.config, ext.flag_value)
    assert rope["mscale"] == 0.707 and rope["beta_fast"] == 32  # the model's own YaRN settings stay
    assert vllm_derived(spec.config, ext.flag_value) == 327680
    assert "trained with YaRN ×40" in ext.cost
    none = extension(find_profile("glm-4-32b-awq"), 131072)
    assert ext.cost != none.cost and "trained with" not in none.cost
    assert "its config has YaRN ×40 from 4,096" in beyond_native(spec, 327680)
    assert "no RoPE scaling in its config" in beyond_native(find_profile("glm-4-32b-awq"), 131072)


def test_a_nested_text_config_gets_a_nested_override():
    config = {
        "model_type": "llava",
        "text_config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32000,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    }
    spec = ModelSpec.from_config("nested", config)
    ext = extension(spec, 32768)
    assert set(ext.overrides) == {"text_config"}
    assert vllm_derived(config, ext.flag_value) == 32768
    assert with_hf_overrides(spec, ext.flag_value).derived_max_model_len == 32768


@pytest.mark.parametrize(
    ("model", "length", "words"),
    [
        ("llama-3.1-8b", 262144, "already scaled (llama3 ×8)"),
        ("gemma-3-12b", 262144, "already scaled (linear ×8)"),
    ],
)
def test_rope_already_scaled_another_way_is_refused_in_one_line(model, length, words):
    spec = find_profile(model)
    with pytest.raises(UsageError) as caught:
        extension(spec, length, option="--context")
    line = str(caught.value)
    assert words in line and "\n" not in line
    assert f"use --context {spec.derived_max_model_len} or less" in line


def test_the_tuner_reads_an_override_as_vllm_does():
    spec = find_profile("glm-4-32b-awq")
    naive = json.dumps(
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    )
    # the recipe older vLLM took: 0.32 keeps 32768, and so does the tuner
    assert with_hf_overrides(spec, naive).derived_max_model_len == vllm_derived(spec.config, naive) == 32768
    linear = json.dumps({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert with_hf_overrides(spec, linear).derived_max_model_len == vllm_derived(spec.config, linear) == 65536


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"rope_scaling": }', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"rope_scaling": {"type": "yarn", "factor": 4}}', "KeyError: 'rope_type'"),
    ],
)
def test_bad_overrides_are_refused_in_one_line(text, words):
    with pytest.raises(UsageError) as caught:
        parse_hf_overrides(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_estimate_past_the_models_length_no_longer_suggests_the_env_var():
    spec = find_profile("glm-4-32b-awq")
    est = estimate(spec, int(31.36 * GIB), ServeConfig(spec.serve_name, max_model_len=131072))
    note = next(n for n in est.notes if "131072" in n and "past" in n)
    assert "unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" not in note
    assert "--allow rope-scaling serves it with YaRN ×4" in note and "short texts" in note
    assert not est.fits
    ext = extension(spec, 131072)
    extended = estimate(
        spec,
        int(31.36 * GIB),
        ServeConfig(spec.serve_name, max_model_len=131072, hf_overrides=ext.flag_value),
    )
    assert extended.derived_max_model_len == 131072 and extended.max_model_len_fit == 131072
    assert not any("past the" in n for n in extended.notes)
