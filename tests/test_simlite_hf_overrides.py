"""The simulated vLLM takes --hf-overrides as vLLM 0.32 does: JSON parsed by argparse (a bad value is its
error, exit 2), a word that is not JSON refused by ModelConfig, and a RoPE override that moves the derived
maximum length the way _get_and_verify_max_len computes it (YaRN does not multiply it: max_position_embeddings
must say the new length)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_tuner.logparse import classify
from vllm_tuner.simlite import hfconfig, oracle
from vllm_tuner.simlite.activate import load_scenario_file

GLM = "glm-4-32b-awq"  # max_position_embeddings 32768, rope_theta 10000, no RoPE scaling
GLM_CONFIG = {
    "model_type": "glm4",
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
}
YARN_4 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def run_cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_tuner.simlite", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env.env},
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


def serve_until_ready(env, *args: str) -> str:
    """The simulated server's log until it is ready (or dead); the server is stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_tuner.simlite", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env.env},
        stdin=subprocess.DEVNULL,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Application startup complete." in line:
                break
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
    return "".join(lines)


def derived(config: dict, overrides: dict | None) -> int:
    return hfconfig.derived_max_len(hfconfig.with_overrides(config, overrides))[0]


def test_a_yarn_override_needs_max_position_embeddings_in_vllm_0_3x():
    assert derived(GLM_CONFIG, None) == 32768
    # the recipe older vLLM took (it multiplied the length by YaRN's factor) leaves 0.32's length alone
    assert derived(GLM_CONFIG, {"rope_scaling": YARN_4}) == 32768
    assert derived(GLM_CONFIG, {"rope_scaling": YARN_4, "max_position_embeddings": 131072}) == 131072
    assert derived(GLM_CONFIG, {"rope_parameters": YARN_4, "max_position_embeddings": 131072}) == 131072
    # linear scaling is still multiplied, and so is a dynamic one
    assert derived(GLM_CONFIG, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}) == 65536
    # a config that has YaRN already keeps its (scaled) max_position_embeddings
    deepseek = {"max_position_embeddings": 163840, "rope_scaling": {"type": "yarn", "factor": 40}}
    assert derived(deepseek, None) == 163840


def test_the_override_replaces_the_rope_dict_after_the_legacy_patching():
    patched = hfconfig.with_overrides(GLM_CONFIG, None)
    assert patched["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    replaced = hfconfig.with_overrides(GLM_CONFIG, {"rope_scaling": YARN_4})
    assert replaced["rope_parameters"] == YARN_4  # rope_theta gone: vLLM's rotary embedding uses 10000
    with pytest.raises(KeyError, match="rope_type"):
        hfconfig.derived_max_len(
            hfconfig.with_overrides(GLM_CONFIG, {"rope_scaling": {"type": "yarn", "factor": 4.0}})
        )
    # a sub-config is merged key by key
    nested = {"model_type": "x", "text_config": {"max_position_embeddings": 8192, "rope_theta": 1e6}}
    merged = hfconfig.with_overrides(
        nested, {"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}}
    )
    assert merged["text_config"]["rope_parameters"]["rope_theta"] == 1e6


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (None, "unsupported_flag_or_arg_error"),
        ({"rope_scaling": YARN_4}, "unsupported_flag_or_arg_error"),
        ({"rope_scaling": YARN_4, "max_position_embeddings": 131072}, "success"),
    ],
)
def test_the_oracle_takes_131072_tokens_only_with_the_length_in_the_override(overrides, expected):
    scenario = load_scenario_file("h100")
    args = ["serve", GLM, "--max-model-len", "131072"]
    if overrides is not None:
        args += ["--hf-overrides", json.dumps(overrides)]
    assert oracle.truth(scenario, args, [0]).category == expected


def test_serve_with_a_rope_override_uses_the_longer_length(sim):
    env = sim("h100")
    override = json.dumps({"rope_scaling": YARN_4, "max_position_embeddings": 131072})
    log = serve_until_ready(env, GLM, "--hf-overrides", override)
    assert "Using max model len 131072" in log
    assert "'hf_overrides': {'rope_scaling'" in log  # vLLM's non-default args
    assert classify(log).category == "success"


def test_serve_refuses_the_old_recipe_with_vllms_own_words(sim):
    done = run_cli(
        sim("h100"),
        "serve",
        GLM,
        "--max-model-len",
        "131072",
        "--hf-overrides",
        json.dumps({"rope_scaling": YARN_4}),
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "greater than the derived max_model_len (max_position_embeddings=32768" in out
    assert classify(out).category == "unsupported_flag_or_arg_error"


@pytest.mark.parametrize("value", ['{"rope_scaling": }', "{rope_scaling: yarn}"])
def test_invalid_json_is_argparses_error(sim, value):
    done = run_cli(sim("h100"), "serve", GLM, "--hf-overrides", value)
    assert done.returncode == 2
    assert f"vllm serve: error: argument --hf-overrides: Value {value} cannot be converted to" in done.stderr
    assert classify(done.stdout + done.stderr).category == "unsupported_flag_or_arg_error"


@pytest.mark.parametrize("value", ["yarn", '{"rope_scaling": '])
def test_a_value_that_does_not_look_like_json_is_refused_by_modelconfig(sim, value):
    # argparse keeps a value without the outer braces as a string (union_dict_and_str)
    done = run_cli(sim("h100"), "serve", GLM, "--hf-overrides", value)
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "2 validation errors for ModelConfig" in out and f"input_value={value!r}" in out


def test_a_legacy_type_key_fails_with_vllms_key_error(sim):
    override = json.dumps(
        {"rope_scaling": {"type": "yarn", "factor": 4.0}, "max_position_embeddings": 131072}
    )
    done = run_cli(sim("h100"), "serve", GLM, "--hf-overrides", override)
    assert done.returncode == 1
    assert "KeyError: 'rope_type'" in done.stdout + done.stderr
