"""vllmargv reads vLLM's command line as vLLM 0.32's FlexibleArgumentParser does, and writes it back in
the shape it was given."""

from __future__ import annotations

import shlex

import pytest

from vllm_tuner.vllmargv import (
    API_SERVER_MODULE,
    as_option,
    docker_run_argv,
    flag_words,
    has,
    long_name,
    options,
    parse_command,
    shell_command,
    switch_of,
    value_of,
    values_of,
    vllm_argv,
    with_value,
    without,
)

# (argv, flag, the value vLLM takes): every shape a flag comes in
VALUE_SHAPES = [
    (["--max-model-len", "8192"], "--max-model-len", "8192"),
    (["--max-model-len=8192"], "--max-model-len", "8192"),
    (["--max_model_len", "8192"], "--max-model-len", "8192"),
    (["--max_model_len=8192"], "--max-model-len", "8192"),
    (["-tp", "2"], "--tensor-parallel-size", "2"),
    (["-tp=2"], "--tensor-parallel-size", "2"),
    (["-pp", "2"], "--pipeline-parallel-size", "2"),
    (["-q", "awq"], "--quantization", "awq"),
    (["-O3"], "--optimization-level", "3"),
    (["-O=2"], "--optimization-level", "2"),
    (["-O", "1"], "--optimization-level", "1"),
    (["--max-model-len", "-1"], "--max-model-len", "-1"),  # a negative number is a value
    (["--seed", "-0.5"], "--seed", "-0.5"),
    (["--max-model-len", "4", "--max-model-len=8"], "--max-model-len", "8"),  # repeated: the last wins
    (["-tp", "1", "--tensor-parallel-size", "4"], "--tensor-parallel-size", "4"),
    (["--hf-overrides", '{"a": 1}'], "--hf-overrides", '{"a": 1}'),
    (["--served-model-name=a=b"], "--served-model-name", "a=b"),  # only the first '=' splits
    (["m", "--enforce-eager", "--max-model-len", "8"], "--max-model-len", "8"),
    (["--max-model-len"], "--max-model-len", None),  # no value left
    (["--max-model-len", "--enforce-eager"], "--max-model-len", None),  # an option is no value
    (["--enforce-eager", "m"], "--enforce-eager", None),  # a switch takes no value
    (["--no-enable-prefix-caching", "m"], "--no-enable-prefix-caching", None),
    (["--runner", "pooling"], "--convert", None),  # absent
]


@pytest.mark.parametrize(("args", "flag", "value"), VALUE_SHAPES)
def test_the_value_vllm_takes_in_every_shape(args, flag, value):
    assert value_of(args, flag) == value


@pytest.mark.parametrize(
    ("word", "name"),
    [
        ("--max-model-len", "--max-model-len"),
        ("--max_model_len=8", "--max-model-len"),
        ("--kv-transfer-config.kv_connector", "--kv-transfer-config"),
        ("--kv_transfer_config.kv_role=kv_both", "--kv-transfer-config"),
        ("-tp", "--tensor-parallel-size"),
        ("-ep", "--enable-expert-parallel"),
        ("-O3", "--optimization-level"),
        ("-O", "--optimization-level"),
        ("-x", "-x"),  # a short option vLLM has no long name for stays as written
        ("--no-enforce-eager", "--no-enforce-eager"),
    ],
)
def test_the_long_name_of_every_shape(word, name):
    assert long_name(word) == name


@pytest.mark.parametrize(
    ("args", "flag", "given"),
    [
        (["--kv-transfer-config", "{}"], "--kv-transfer-config", True),
        (["--kv-transfer-config={}"], "--kv-transfer-config", True),
        (["--kv_transfer_config={}"], "--kv-transfer-config", True),
        (["--kv-transfer-config.kv_connector", "X"], "--kv-transfer-config", True),
        (["--kv-transfer-config.kv_connector=X"], "--kv-transfer-config", True),
        (["-tp", "2"], "--tensor-parallel-size", True),
        (["--tensor-parallel-size=2"], "--tensor-parallel-size", True),
        (["--max-model-len", "--kv-transfer-config"], "--kv-transfer-config", True),
        (["--served-model-name", "--kv-transfer-config-x"], "--kv-transfer-config", False),
        (["m", "--max-model-len", "8"], "--kv-transfer-config", False),
    ],
)
def test_a_flag_is_given_in_any_shape(args, flag, given):
    assert has(args, flag) is given


@pytest.mark.parametrize(
    ("args", "state"),
    [
        ([], None),
        (["--enforce-eager"], True),
        (["--enforce_eager"], True),
        (["--no-enforce-eager"], False),
        (["--enforce-eager", "--no-enforce-eager"], False),  # the last one wins
        (["--no-enforce-eager", "--enforce-eager"], True),
        (["--enforce-eager-x"], None),
    ],
)
def test_a_boolean_and_its_no_form(args, state):
    assert switch_of(args, "--enforce-eager") is state


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("max_model_len", "--max-model-len"),
        ("--enforce-eager", "--enforce-eager"),
        ("hf_overrides.rope_theta", "--hf-overrides.rope_theta"),
        ("compilation_config.cudagraph_capture_sizes", "--compilation-config.cudagraph_capture_sizes"),
    ],
)
def test_a_config_style_name_as_the_option_vllm_reads(name, option):
    assert as_option(name) == option
    assert long_name(option) == long_name(option.replace("_", "-").split(".")[0])


def test_options_keep_where_they_were_and_how_they_were_written():
    found = options(["m", "-tp", "2", "--max_model_len=8", "--enforce-eager", "--seed", "-1", "-O3"])
    assert [(o.name, o.value, o.written, o.start, o.stop, o.inline) for o in found] == [
        ("--tensor-parallel-size", "2", "-tp", 1, 3, False),
        ("--max-model-len", "8", "--max_model_len", 3, 4, True),
        ("--enforce-eager", None, "--enforce-eager", 4, 5, False),
        ("--seed", "-1", "--seed", 5, 7, False),
        ("--optimization-level", "3", "-O", 7, 8, True),
    ]
    dotted = options(["--kv-transfer-config.kv_connector", "X"])
    assert [(o.name, o.key, o.value) for o in dotted] == [("--kv-transfer-config", "kv_connector", "X")]


def test_every_value_of_a_repeated_flag_in_order():
    args = ["--lora-modules", "a=/x", "--lora-modules=b=/y", "--max-model-len", "8"]
    assert values_of(args, "--lora-modules") == ["a=/x", "b=/y"]


@pytest.mark.parametrize(
    ("args", "flag", "left"),
    [
        (["m", "--gpu-memory-utilization", "0.9", "-tp", "2"], "--gpu-memory-utilization", ["m", "-tp", "2"]),
        (["m", "--gpu-memory-utilization=0.9", "-tp", "2"], "--gpu-memory-utilization", ["m", "-tp", "2"]),
        (["m", "--gpu_memory_utilization", "0.9"], "--gpu-memory-utilization", ["m"]),
        (["-tp", "2", "--tensor-parallel-size=4", "x"], "--tensor-parallel-size", ["x"]),
        (["--enforce-eager", "--no-enforce-eager", "m"], "--enforce-eager", ["m"]),
        (["--kv-transfer-config.kv_connector", "X", "m"], "--kv-transfer-config", ["m"]),
        (["m", "--max-model-len", "8"], "--seed", ["m", "--max-model-len", "8"]),
    ],
)
def test_without_drops_every_shape_with_its_value(args, flag, left):
    assert without(args, flag) == left


@pytest.mark.parametrize(
    ("args", "flag", "value", "written"),
    [
        (["m", "--gpu-memory-utilization", "0.9"], "--gpu-memory-utilization", "0.85", ["m", "--gpu-memory-utilization", "0.85"]),
        (["m", "--gpu-memory-utilization=0.9"], "--gpu-memory-utilization", "0.85", ["m", "--gpu-memory-utilization=0.85"]),
        (["-tp", "2", "m"], "--tensor-parallel-size", "4", ["-tp", "4", "m"]),
        (["--max-model-len", "4", "--max_model_len=8"], "--max-model-len", "16", ["--max-model-len", "16", "--max_model_len=16"]),
        (["-O3"], "--optimization-level", "0", ["-O=0"]),
        (["m"], "--gpu-memory-utilization", "0.85", ["m", "--gpu-memory-utilization", "0.85"]),
        (["--max-model-len"], "--max-model-len", "8", ["--max-model-len", "8"]),  # a value was missing
    ],
)  # fmt: skip
def test_with_value_rewrites_each_occurrence_in_its_shape(args, flag, value, written):
    assert with_value(args, flag, value) == written
    assert value_of(written, flag) == value


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--enforce-eager", True, ["--enforce-eager"]),
        ("--enable-prefix-caching", False, ["--no-enable-prefix-caching"]),
        ("--max-model-len", 8192, ["--max-model-len", "8192"]),
        ("--hf-overrides", {"a": [1, 2]}, ["--hf-overrides", '{"a":[1,2]}']),
    ],
)
def test_flag_words_write_what_the_reader_reads_back(flag, value, words):
    assert flag_words(flag, value) == words
    if value is True or value is False:
        assert switch_of(words, flag.removeprefix("--no-")) is value
    else:
        assert value_of(words, flag) == words[1]


MODULE = ["/opt/venv/bin/python", "-m", API_SERVER_MODULE]
SERVE = ["serve", "org/m", "--max-model-len", "8", "--enforce-eager"]


@pytest.mark.parametrize(
    ("vllm_words", "argv"),
    [
        (["vllm"], ["vllm", *SERVE]),
        (["uv", "run", "vllm"], ["uv", "run", "vllm", *SERVE]),
        (MODULE, [*MODULE, "--model", "org/m", "--max-model-len", "8", "--enforce-eager"]),
    ],
)
def test_both_launch_forms_are_written_and_read_back(vllm_words, argv):
    assert vllm_argv(vllm_words, SERVE) == argv
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    text = shell_command(SERVE, env, vllm_cmd=shlex.join(vllm_words))
    back = parse_command(shlex.split(text))
    assert back is not None
    assert (back.env, list(back.vllm_words), list(back.serve_args)) == (env, vllm_words, SERVE)


def test_a_command_that_starts_no_vllm_server_is_not_read():
    assert parse_command(["vllm", "bench", "--model", "m"]) is None
    assert parse_command([*MODULE, "--max-model-len", "8"]) is None  # the module form without --model


def test_the_module_form_reads_model_in_either_shape_anywhere():
    back = parse_command([*MODULE, "-tp", "2", "--model=org/m", "--seed", "1"])
    assert back is not None and list(back.serve_args) == ["serve", "org/m", "-tp", "2", "--seed", "1"]


def test_docker_run_puts_the_serve_words_after_the_image():
    argv = docker_run_argv(
        ["serve", "org/m", "--max-model-len", "8"],
        image="vllm/vllm-openai:v0.33.0",
        name="n",
        publish="127.0.0.1:8000:8000",
        gpu_ids=[1, 3],
        env_keys=["A", "HF_TOKEN", "A"],
        labels=["k=v"],
        hf_cache="/data/hf",
        docker_args=["--shm-size", "1g"],
    )
    assert argv == [
        "docker", "run", "--rm", "--name", "n", "--label", "k=v", "--gpus", '"device=1,3"', "--ipc=host",
        "-p", "127.0.0.1:8000:8000", "-e", "A", "-e", "HF_TOKEN", "-v", "/data/hf:/root/.cache/huggingface/hub",
        "--shm-size", "1g", "vllm/vllm-openai:v0.33.0", "org/m", "--max-model-len", "8",
    ]  # fmt: skip
