"""`vllm-tune find` refuses bad input up front: one line on stderr, exit 2, nothing launched or written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.commands.find import TUNED_PASSTHROUGH, _check_heads

PREFIX = "vllm-tune: error: "
LLAMA = ["--model", "llama-3.1-8b"]  # 32 attention heads
QWEN = ["--model", "qwen2.5-7b"]  # 28 attention heads


@pytest.fixture
def fake_vllm(tmp_path):
    """A vLLM command that leaves a marker when anything runs it (even ``vllm --version``) and fails."""
    marker = tmp_path / "vllm-was-run"
    script = tmp_path / "fake-vllm"
    script.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, marker


@pytest.fixture
def refuse(sim, capsys, fake_vllm, isolated_state):
    """``refuse(*args) -> message``: runs find on the simulated 4×A100 machine and checks the house rules
    for bad input: exit 2, one ``vllm-tune: error:`` line, no traceback, no stdout, vLLM never run, no
    store and no trial logs written. Returns the line without its prefix."""
    script, marker = fake_vllm

    def run(*args: str, scenario: str = "a100-80g") -> str:
        sim(scenario)
        code = main(["find", "--vllm-cmd", str(script), *args])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, captured
        assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
        assert "Traceback" not in captured.err and captured.out == ""
        assert not marker.exists(), "vLLM was run"
        assert not (isolated_state / "vllm-tune.db").exists(), "a run was recorded"
        assert not (isolated_state / "logs").exists(), "trial logs were written"
        return lines[0][len(PREFIX) :]

    return run


@pytest.fixture
def dry_run(sim, capsys):
    """``dry_run(*args) -> stdout`` of an accepted ``--dry-run`` on the simulated 4×A100 machine."""

    def run(*args: str, scenario: str = "a100-80g") -> str:
        env = sim(scenario)
        cut = args.index("--") if "--" in args else len(args)
        before, after = list(args[:cut]), list(args[cut:])
        code = main(["find", "--vllm-cmd", env.vllm_cmd, *before, "--dry-run", *after])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "Dry run: nothing was launched." in captured.out
        return captured.out

    return run


def test_the_fake_vllm_is_run_when_the_input_is_good(sim, capsys, fake_vllm):
    # the default (TP = the GPU count) passes every check and reaches vLLM: the marker is not vacuous
    script, marker = fake_vllm
    sim("a100-80g")
    assert main(["find", "--vllm-cmd", str(script), *LLAMA, "--gpus", "2"]) == 2
    assert marker.exists()
    assert "--gpus" not in capsys.readouterr().err


# 1. tensor-parallel size below 1


@pytest.mark.parametrize("value", ["-2", "0"])
def test_tensor_parallel_size_below_one_is_refused(refuse, value):
    assert refuse(*LLAMA, "-tp", value) == (
        f"--tensor-parallel-size must be at least 1, got {value}; "
        "pass -tp 1 or more, or leave it out for one per GPU"
    )


# 2. tensor-parallel size must divide the attention heads


@pytest.mark.parametrize("args", [["--gpus", "3", "-tp", "3"], ["--gpus", "3"], ["-tp", "3"]])
def test_tp_that_does_not_divide_the_heads_is_refused_naming_the_sizes_that_do(refuse, args):
    assert refuse(*LLAMA, *args) == (
        "tensor parallel size 3 cannot shard the 32 attention heads of meta-llama/Llama-3.1-8B-Instruct, "
        "and vLLM refuses that; pick -tp from 1, 2, 4, 8 with as many GPUs, e.g. -tp 2 --gpus 2"
    )


def test_heads_fix_names_gpu_ids_when_they_were_used(refuse):
    message = refuse(*QWEN, "--gpu-ids", "0,1,2", "-tp", "3")
    assert "the 28 attention heads of Qwen/Qwen2.5-7B-Instruct" in message
    assert message.endswith("pick -tp from 1, 2, 4 with as many GPUs, e.g. -tp 2 with 2 id(s) in --gpu-ids")


def test_tp_must_shard_the_kv_heads_too(refuse):
    # 7 divides Qwen2.5-7B's 28 query heads, but not its 4 KV heads, nor is it a multiple of them
    message = refuse(*QWEN, "-tp", "7")
    assert message.startswith(
        "tensor parallel size 7 cannot shard the 4 KV heads (split evenly, or each copied whole)"
    )
    assert message.endswith("pick -tp from 1, 2, 4 with as many GPUs, e.g. -tp 4 --gpus 4")


def test_a_size_that_divides_the_heads_is_accepted(dry_run):
    assert "--tensor-parallel-size 4" in dry_run(*QWEN, "--gpus", "4", "-tp", "4")


def test_unknown_head_count_is_not_checked():
    from dataclasses import replace

    from vllm_tuner.models import resolve_model

    unknown = replace(resolve_model("llama-3.1-8b"), num_attention_heads=0, kv_layers=())
    _check_heads(unknown, 3, using_ids=False)  # no error: only a known head count is checked


# 3. TP (× PP 1) must use every GPU given


def test_fewer_tp_ranks_than_gpus_is_refused_with_both_fixes(refuse):
    assert refuse(*LLAMA, "--gpus", "2", "-tp", "1") == (
        "--tensor-parallel-size 1 uses 1 of the 2 GPUs given and vLLM would leave 1 idle "
        "(find needs tensor parallel size = GPU count); pass --gpus 1, or -tp 2"
    )


def test_fewer_tp_ranks_than_gpu_ids_names_the_ids_to_keep(refuse):
    assert refuse(*LLAMA, "--gpu-ids", "0,2", "-tp", "1").endswith("; pass --gpu-ids 0, or -tp 2")


def test_more_tp_ranks_than_gpus_says_gpus_defaults_to_one(refuse):
    assert refuse(*LLAMA, "-tp", "2") == (
        "--tensor-parallel-size 2 needs 2 GPUs, but 1 was given (--gpus defaults to 1); pass --gpus 2, or -tp 1"
    )


def test_minus_tp_gpu_count_is_not_offered_when_it_does_not_divide_the_heads(refuse):
    assert refuse(*LLAMA, "--gpus", "3", "-tp", "1").endswith("; pass --gpus 1")


def test_tp_defaults_to_the_gpu_count(dry_run):
    assert "--tensor-parallel-size 2" in dry_run(*LLAMA, "--gpus", "2")
    assert "--tensor-parallel-size 2" in dry_run(*LLAMA, "--gpu-ids", "1,3")
    assert "--tensor-parallel-size" not in dry_run(*LLAMA)  # one GPU: TP 1, vLLM's default


# 4. counts below 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--context", "0", "--seqs", "0"], "--context must be at least 1, got 0; pass e.g. --context 32768"),
        (
            ["--context", "-5", "--seqs", "2"],
            "--context must be at least 1, got -5; pass e.g. --context 32768",
        ),
        (["--context", "4096", "--seqs", "0"], "--seqs must be at least 1, got 0; pass e.g. --seqs 8"),
        (["--min-context", "0"], "--min-context must be at least 1, got 0; pass e.g. --min-context 8192"),
        (["--min-seqs", "0"], "--min-seqs must be at least 1, got 0; use --min-seqs 1 or more"),
        (["--max-launches", "0"], "--max-launches must be at least 1, got 0; use e.g. --max-launches 12"),
    ],
)
def test_counts_below_one_are_refused(refuse, args, message):
    assert refuse(*LLAMA, *args) == message


# 5. flags find tunes itself are not passed through


def _passthrough_cases():
    cases = []
    for flag in TUNED_PASSTHROUGH:
        if flag.endswith("eager"):
            cases.append(([flag], flag))
        else:
            cases.append(([flag, "2"], flag))
            cases.append(([f"{flag}=2"], flag))
    cases += [(["-tp", "2"], "-tp (--tensor-parallel-size)"), (["-tp=2"], "-tp (--tensor-parallel-size)")]
    cases += [(["-pp", "2"], "-pp (--pipeline-parallel-size)")]
    cases += [(["--max_model_len=4096"], "--max_model_len (--max-model-len)")]
    return cases


@pytest.mark.parametrize("words, named", _passthrough_cases())
def test_tuned_flags_after_the_double_dash_are_refused(refuse, words, named):
    message = refuse(*LLAMA, "--", "--trust-remote-code", *words)
    assert message.startswith(f"{named} cannot be passed through after --: ")


@pytest.mark.parametrize(
    "words, fix",
    [
        (["--max-model-len", "4096"], "use --context (with --seqs) or --min-context"),
        (["--max-num-seqs", "4"], "use --seqs (with --context) or --min-seqs"),
        (["--gpu-memory-utilization=0.5"], "cap it with --util-ceiling"),
        (["--tensor-parallel-size", "1"], "use find's own -tp, before the --"),
        (["--kv-cache-dtype", "fp8"], "use --allow fp8-kv"),
        (["--enforce-eager"], "use --allow eager"),
        (["--cpu-offload-gb", "4"], "use --allow offload"),
        (["--kv-cache-memory-bytes", "8000000000"], "drop it and cap the utilization with --util-ceiling"),
        (["--max-num-batched-tokens", "2048"], "drop it"),
    ],
)
def test_the_refusal_names_the_find_option_to_use_instead(refuse, words, fix):
    assert refuse(*LLAMA, "--", *words).endswith(f"; {fix}")


def test_the_reviewers_repro_is_refused_on_its_first_tuned_flag(refuse):
    message = refuse(*LLAMA, "--", "--max-model-len", "4096", "--gpu-memory-utilization", "0.5")
    assert message == (
        "--max-model-len cannot be passed through after --: find tunes it; "
        "use --context (with --seqs) or --min-context"
    )


def test_load_format_dummy_passes_through_for_a_model_without_weights(dry_run):
    dry_run(*LLAMA, "--", "--load-format", "dummy", "--skip-tokenizer-init")  # as scripts/gpu-e2e.sh runs


def test_another_load_format_clashes_only_with_dummy_trials(refuse, dry_run):
    assert refuse(*LLAMA, "--dummy-trials", "--", "--load-format=safetensors") == (
        "--load-format=safetensors after -- overrides the --load-format dummy that --dummy-trials sets; "
        "drop one of them"
    )
    dry_run(*LLAMA, "--", "--load-format", "safetensors")


def test_other_vllm_flags_still_pass_through(dry_run):
    dry_run(*LLAMA, "--", "--trust-remote-code", "--tool-call-parser", "hermes", "--max-loras=2")


# 6. an empty --gpu-ids


@pytest.mark.parametrize("value", [",", "", " , "])
def test_gpu_ids_naming_no_gpu_are_refused(refuse, value):
    assert (
        refuse(*LLAMA, "--gpu-ids", value)
        == f"--gpu-ids names no GPU, got {value!r}; pass e.g. --gpu-ids 0,2"
    )


# 7. --help shows the --gpus default


def test_help_shows_that_gpus_defaults_to_one(capsys):
    assert main(["find", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--gpus INTEGER Use the first N GPUs [default: 1]." in help_text


# 8. --write-config is checked before any launch


def test_a_write_config_under_a_folder_that_cannot_be_made_is_refused(refuse):
    assert refuse(*LLAMA, "--write-config", "/proc/nope/x.yaml") == (
        "--write-config /proc/nope/x.yaml cannot be written (/proc/nope: No such file or directory); "
        "choose a path in a folder you can write, e.g. --write-config ./vllm-serve.yaml"
    )


def test_a_write_config_under_a_file_is_refused(refuse, tmp_path):
    (tmp_path / "plain").write_text("x")
    assert refuse(*LLAMA, "--write-config", str(tmp_path / "plain" / "x.yaml")).startswith(
        f"--write-config {tmp_path}/plain/x.yaml cannot be written: {tmp_path}/plain is not a folder; "
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_write_config_in_a_read_only_folder_is_refused(refuse, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "Permission denied" in refuse(*LLAMA, "--write-config", str(folder / "x.yaml"))
    finally:
        folder.chmod(0o700)


def test_the_write_config_check_leaves_nothing_behind(dry_run, tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    dry_run(*LLAMA, "--write-config", str(existing / "serve.yaml"))
    dry_run(*LLAMA, "--write-config", str(tmp_path / "new" / "deeper" / "serve.yaml"))
    assert list(existing.iterdir()) == []
    assert not (tmp_path / "new").exists()


def test_the_config_is_written_into_a_folder_the_search_creates(sim, capsys, tmp_path):
    env = sim("rtx-5090")
    target = tmp_path / "new" / "serve.yaml"
    code = main(["find", *QWEN, "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--write-config", str(target)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Config file: {target}" in out and "max-model-len:" in target.read_text()


def test_a_config_that_fails_to_write_late_still_prints_the_serve_command(sim, capsys, tmp_path, monkeypatch):
    from vllm_tuner.find import FindResult

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FindResult, "yaml_text", disk_full)
    env = sim("rtx-5090")
    target = tmp_path / "serve.yaml"
    code = main(["find", *QWEN, "--gpus", "2", "--vllm-cmd", env.vllm_cmd, "--write-config", str(target)])
    captured = capsys.readouterr()
    assert code == 2
    assert "Serve command:" in captured.out and "Config file:" not in captured.out
    assert captured.err.strip().splitlines()[-1] == (  # after the trials' progress lines
        f"{PREFIX}the config file {target} could not be written (No space left on device); "
        "the serve command above is the result; free the disk or choose another --write-config"
    )


# 9. --util-ceiling below the utilization floor


def test_a_util_ceiling_below_the_floor_is_refused(refuse):
    assert refuse(*LLAMA, "--util-ceiling", "0.3") == (
        "--util-ceiling 0.3 is below 0.50, the utilization floor where the search gives up; "
        "pass --util-ceiling 0.50 or more (the ceiling must be at least the floor)"
    )


def test_a_util_ceiling_at_the_floor_is_accepted(dry_run):
    assert "--gpu-memory-utilization 0.5" in dry_run(*LLAMA, "--util-ceiling", "0.5")


def test_paths_in_messages_are_as_typed(refuse, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("plain").write_text("x")
    assert refuse(*LLAMA, "--write-config", "plain/x.yaml").startswith("--write-config plain/x.yaml cannot")


def test_headroom_takes_gib_or_a_size(dry_run, refuse):
    from vllm_tuner.commands._common import _headroom_gib

    assert [_headroom_gib(None, None, v) for v in ("1", "1.5", "1.5GiB", "512MiB", "0")] == [
        1.0,
        1.5,
        1.5,
        0.5,
        0.0,
    ]
    assert refuse(*LLAMA, "--headroom", "lots") == (
        "--headroom takes GiB (1.5) or a size (1.5GiB, 512MiB), got 'lots'; pass e.g. --headroom 1"
    )
    dry_run(*LLAMA, "--headroom", "512MiB")


@pytest.mark.parametrize("args", [["--context", "131072", "--seqs", "1"], ["--min-context", "99999999"]])
def test_a_context_floor_above_the_models_maximum_is_refused(refuse, args):
    message = refuse(*QWEN, *args)
    assert f"{args[0]} {args[1]} is longer than Qwen/Qwen2.5-7B-Instruct takes (32768 tokens" in message
    assert f"; use {args[0]} 32768 or less, or --allow rope-scaling for YaRN ×" in message


def test_an_objective_and_fixed_targets_together_are_refused(refuse):
    assert refuse(*QWEN, "--objective", "concurrency", "--context", "8192", "--seqs", "4") == (
        "--objective concurrency and fixed targets (--context/--seqs) ask for different searches; "
        "drop --objective to reach the targets, or drop --context/--seqs to search by the objective"
    )
