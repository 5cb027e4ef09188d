"""The winner as a ``vllm serve --config`` file: everything the command line says, the passed-through
flags included, read back the way vLLM reads a config file."""

from __future__ import annotations

import shlex

import pytest
import yaml

from vllm_tuner.find import FindRequest, FindResult
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.trial import TrialOutcome
from vllm_tuner.vllmargv import args_mapping

PASSED = ("--trust-remote-code", "--tool-call-parser", "glm47", "--served-model-name", "my model")


def as_vllm_reads_it(text: str) -> tuple[str, list[str]]:
    """vLLM's config file rules (FlexibleArgumentParser): ``key: value`` is ``--key value``, ``true`` a
    bare ``--key``, a list ``--key a b``; ``model`` is the positional model."""
    data = yaml.safe_load(text)
    argv: list[str] = []
    for key, value in data.items():
        if key == "model":
            continue
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return data["model"], argv


def winner(cfg: ServeConfig) -> FindResult:
    req = FindRequest(model=cfg.model, gpu_ids=(0,), tensor_parallel_size=1, extra_args=cfg.extra_args)
    outcome = TrialOutcome(cfg, "success", "stable")
    return FindResult(req, outcome, [outcome], 1, "proven stable", True, explanation=["why it ended here"])


def test_the_config_file_holds_the_passed_through_flags_as_the_command_does():
    cfg = ServeConfig(
        model="Qwen/Qwen2.5-7B-Instruct",
        max_model_len=32768,
        max_num_seqs=8,
        gpu_memory_utilization=0.93,
        extra_args=PASSED,
    )
    text = winner(cfg).yaml_text()
    model, argv = as_vllm_reads_it(text)
    assert model == cfg.model
    assert argv == cfg.serve_args()[2:]  # the very options the printed serve command passes
    assert "# why it ended here" in text


@pytest.mark.parametrize(
    ("args", "mapping"),
    [
        (["--enforce-eager"], {"enforce-eager": True}),
        (
            ["--max-loras=4", "--lora-modules", "a=/x", "b=/y"],
            {"max-loras": "4", "lora-modules": ["a=/x", "b=/y"]},
        ),
        (["-q", "awq", "--seed", "-1"], {"quantization": "awq", "seed": "-1"}),
        (["--compilation-config", '{"level": 3}'], {"compilation-config": '{"level": 3}'}),
    ],
)
def test_options_become_the_keys_vllm_reads_back(args, mapping):
    assert args_mapping(args) == mapping


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-O3"], "-O3 has no long option name"),
        (["stray"], "'stray' is not an option"),
        (["--a", "--a"], "twice"),
    ],
)
def test_what_a_config_file_cannot_say_stays_on_the_command_line(args, said):
    with pytest.raises(ValueError, match=said):
        args_mapping(args)
    cfg = ServeConfig(model="m", max_model_len=4096, extra_args=tuple(args))
    text = winner(cfg).yaml_text()
    assert f"so also pass: {shlex.join(args)}" in text
    assert as_vllm_reads_it(text)[1] == ["--max-model-len", "4096"]


def test_the_config_file_says_how_to_run_it_with_the_environment_the_trials_had():
    result = winner(ServeConfig(model="m", max_model_len=4096))
    result.env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_VISIBLE_DEVICES": "0,1"}
    first = result.yaml_text().splitlines()[0]
    assert first == (
        "# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=0,1 vllm serve --config this-file.yaml"
    )
