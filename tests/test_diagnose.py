"""Advice with numbers, and the ``vllm-tune diagnose`` command."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from vllm_tuner.advice import advise, round_length
from vllm_tuner.cli import main
from vllm_tuner.logparse import Diagnosis, classify

DATA = Path(__file__).parent / "data" / "logs"


def _advice(category: str, facts: dict, flags: dict | None = None, **kw) -> list:
    return advise(Diagnosis(category, facts), flags, **kw)


def test_kv_insufficient_names_the_length_that_fits_and_the_utilization_that_keeps_it() -> None:
    facts = {
        "kv_cache_tokens": 22032,
        "max_model_len": 32768,
        "needed_gib": 4.0,
        "available_kv_gib": 2.69,
        "gpu_memory_utilization": 0.9,
        "total_gib": 23.53,
    }
    first, second, *rest = _advice("kv_cache_insufficient_for_max_len", facts)
    assert (
        first.text == "KV cache holds 22,032 tokens but --max-model-len is 32768: use --max-model-len 22016"
    )
    assert first.changes == {"--max-model-len": 22016}
    # 0.9 + (4.0 - 2.69) / 23.53 + 0.01 = 0.9657 -> 0.97
    assert second.changes == {"--gpu-memory-utilization": 0.97}
    assert "to keep 32768" in second.text and "4.00 GiB" in second.text
    assert [a.changes for a in rest] == [{"--enforce-eager": True}, {"--kv-cache-dtype": "fp8"}]


def test_kv_insufficient_uses_the_gpu_total_given_when_the_log_lacks_it() -> None:
    diagnosis = classify((DATA / "kv_cache_insufficient_for_max_len.log").read_text())
    flags = {"--gpu-memory-utilization": 0.9}
    assert advise(diagnosis, flags)[1].changes == {}
    assert advise(diagnosis, flags, gpu_total_gib=23.53)[1].changes == {"--gpu-memory-utilization": 0.97}


def test_kv_insufficient_beyond_the_ceiling_says_so() -> None:
    facts = {
        "estimated_max_model_len": 5632,
        "max_model_len": 131072,
        "needed_gib": 16.0,
        "available_kv_gib": 0.71,
        "total_gib": 32.0,
    }
    advice = _advice("kv_cache_insufficient_for_max_len", facts, {"--gpu-memory-utilization": 0.9})
    assert advice[0].changes == {"--max-model-len": 5632}
    assert advice[1].changes == {} and "cannot keep 131072" in advice[1].text


def test_no_kv_memory_raises_utilization() -> None:
    facts = {"available_kv_gib": -1.05, "total_gib": 8.0, "gpu_memory_utilization": 0.7, "weights_gib": 5.2}
    first = _advice("no_kv_cache_memory", facts)[0]
    assert "RAISE" in first.text
    assert first.changes == {"--gpu-memory-utilization": 0.96}  # 0.7 + (1.05 + 1) / 8 = 0.956


def test_free_memory_below_utilization_lowers_it() -> None:
    facts = {"free_gib": 19.77, "total_gib": 22.05, "gpu_memory_utilization": 0.9, "requested_gib": 19.84}
    first, second = _advice("startup_free_memory_below_utilization", facts)
    assert "LOWER" in first.text and first.changes == {"--gpu-memory-utilization": 0.88}
    assert "2.28 GiB" in second.text


def test_graph_capture_oom_steps_down_then_fewer_sizes_then_eager() -> None:
    advice = _advice("oom_cudagraph_capture", {"gpu_memory_utilization": 0.98}, {"--max-num-seqs": 64})
    assert [a.changes for a in advice] == [
        {"--gpu-memory-utilization": 0.97},
        {"--max-cudagraph-capture-size": 64},
        {"--enforce-eager": True},
    ]


def test_mamba_uses_the_printed_limit() -> None:
    advice = _advice("mamba_blocks_below_max_num_seqs", {"max_num_seqs": 1024, "max_num_seqs_limit": 868})
    assert advice[0].changes == {"--max-num-seqs": 864}
    assert "868" in advice[0].text and "1024" in advice[0].text


def test_removed_flag_names_its_replacement() -> None:
    advice = _advice("unsupported_flag_or_arg_error", {"unrecognized_arguments": "--swap-space 4"})
    assert "--kv-offloading-size" in advice[0].text and "--cpu-offload-gb" in advice[0].text
    assert advice[0].changes == {"--swap-space": None}


def test_profiling_change_suggests_one_at_a_time_and_fixed_kv_bytes() -> None:
    facts = {"initial_free_gib": 82.94, "current_free_gib": 90.17, "kv_cache_memory_fit_bytes": 4595651706}
    first, second = _advice("profiling_memory_changed", facts)
    assert "one at a time" in first.text and "82.94" in first.text
    assert second.changes == {"--kv-cache-memory-bytes": 4595651706}


def test_weights_oom_asks_for_more_gpus_or_a_smaller_checkpoint() -> None:
    advice = _advice("oom_weights_load", {}, {"--tensor-parallel-size": 2})
    assert advice[0].changes == {"--tensor-parallel-size": 4}
    assert any("quantized" in a.text for a in advice)


def test_every_failure_category_gets_advice() -> None:
    for path in DATA.glob("*.log"):
        diagnosis = classify(path.read_text())
        assert bool(advise(diagnosis)) == (diagnosis.category != "success"), path.name


def test_round_length() -> None:
    assert round_length(22032) == 22016
    assert round_length(5632) == 5632
    assert round_length(200) == 192


# --------------------------------------------------------------------------------------------------
# The command


def test_diagnose_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(DATA / "kv_cache_insufficient_for_max_len.log"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"category", "facts", "advice"} <= set(report)
    assert report["category"] == "kv_cache_insufficient_for_max_len"
    assert report["facts"]["estimated_max_model_len"] == 22032
    assert report["advice"][0] == {
        "text": "KV cache holds 22,032 tokens but --max-model-len is 32768: use --max-model-len 22016",
        "changes": {"--max-model-len": 22016},
    }
    assert report["flags"]["--gpu-memory-utilization"] == 0.9  # read from the "non-default args" line


def test_diagnose_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(DATA / "startup_free_memory_below_utilization.log")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("less memory is free than --gpu-memory-utilization asks for")
    assert "18.10 GiB" in out and "LOWER --gpu-memory-utilization to 0.75" in out


def test_diagnose_flags_given_on_the_command_line_win(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(DATA / "oom_cudagraph_capture.log")
    assert main(["diagnose", path, "--json", "--gpu-memory-utilization", "0.95"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["advice"][0]["changes"] == {"--gpu-memory-utilization": 0.89}  # the log's 0.9 is the fact


def test_diagnose_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO((DATA / "mamba_blocks_below_max_num_seqs.log").read_text()))
    assert main(["diagnose", "-", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["category"] == "mamba_blocks_below_max_num_seqs"


def test_diagnose_missing_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(tmp_path / "nope.log")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such log file" in err


def test_diagnose_unknown_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.log"
    path.write_text("hello\n")
    assert main(["diagnose", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["category"] == "unknown" and report["advice"] == []


def test_small_amounts_are_shown_in_mib_not_as_zero_gib():
    from vllm_tuner.commands.diagnose import _fact_text

    assert "2.00 MiB" in _fact_text("tried_to_allocate_gib", "tried to allocate", "GiB", 2 / 1024)
    assert "1.50 GiB" in _fact_text("tried_to_allocate_gib", "tried to allocate", "GiB", 1.5)


# ------------------------------------------------------------------ advice follows the flags in force

KV_BYTES = {"--kv-cache-memory-bytes": 4294967296, "--max-model-len": 32768, "--gpu-memory-utilization": 0.2}
FIXED_POOL_FLAGS = ("--gpu-memory-utilization", "--enforce-eager")


def _changed(advice) -> set[str]:
    return {flag for a in advice for flag in a.changes}


def test_kv_insufficient_with_kv_cache_memory_bytes_never_suggests_utilization_or_eager() -> None:
    """The server of a plan: its pool is --kv-cache-memory-bytes, so utilization and graphs do not move it."""
    facts = {
        "max_model_len": 32768,
        "estimated_max_model_len": 32752,  # one request's blocks exactly: the null block is missing
        "needed_gib": 4.0,
        "available_kv_gib": 4.0,
        "total_gib": 94.97,
        "gpu_memory_utilization": 0.2,
    }
    advice = _advice("kv_cache_insufficient_for_max_len", facts, KV_BYTES)
    assert not _changed(advice) & set(FIXED_POOL_FLAGS), [a.text for a in advice]
    assert all("utilization" not in a.text and "eager" not in a.text for a in advice)
    assert advice[1].changes["--kv-cache-memory-bytes"] > 4294967296
    # the same log without the flag: the utilization and eager are the right moves
    plain = _advice("kv_cache_insufficient_for_max_len", facts, {"--max-model-len": 32768})
    assert {"--gpu-memory-utilization", "--enforce-eager"} <= _changed(plain)


def test_knobs_already_in_force_are_not_suggested_again() -> None:
    facts = {
        "max_model_len": 32768,
        "estimated_max_model_len": 20000,
        "needed_gib": 4.0,
        "available_kv_gib": 2.5,
    }
    flags = {"--max-model-len": 32768, "--enforce-eager": True, "--kv-cache-dtype": "fp8"}
    advice = _advice("kv_cache_insufficient_for_max_len", facts, flags)
    assert not {"--enforce-eager", "--kv-cache-dtype"} & _changed(advice)
    capture = _advice("oom_cudagraph_capture", {"gpu_memory_utilization": 0.9}, {"--enforce-eager": True})
    assert "--enforce-eager" not in _changed(capture)


@pytest.mark.parametrize(
    ("category", "facts", "flag"),
    [
        (
            "oom_cudagraph_capture",
            {"total_gib": 94.97, "gpu_memory_utilization": 0.92},
            "--kv-cache-memory-bytes",
        ),
        ("oom_at_runtime", {"total_gib": 94.97, "gpu_memory_utilization": 0.92}, "--kv-cache-memory-bytes"),
        (
            "no_kv_cache_memory",
            {"total_gib": 94.97, "gpu_memory_utilization": 0.92},
            "--kv-cache-memory-bytes",
        ),
    ],
)
def test_a_pool_sized_by_its_flag_is_changed_by_that_flag(category, facts, flag) -> None:
    flags = {"--kv-cache-memory-bytes": 85_500_000_000, "--max-model-len": 32768, "--max-num-seqs": 64}
    advice = _advice(category, facts, flags)
    assert flag in _changed(advice) or flag in advice[0].text, [a.text for a in advice]
    assert "--gpu-memory-utilization" not in _changed(advice)
    assert all("RAISE --gpu-memory-utilization" not in a.text for a in advice)


def test_the_kv_tensors_of_kv_cache_memory_bytes_not_fitting_lower_the_flag() -> None:
    """vLLM sized the cache (it printed its tokens), then could not allocate what the flag asked for."""
    facts = {"kv_cache_tokens": 686640, "tried_to_allocate_gib": 83.82, "free_gib": 79.78, "total_gib": 94.97}
    first, *_ = _advice("oom_during_profiling", facts, {"--kv-cache-memory-bytes": 90_000_000_000})
    target = first.changes["--kv-cache-memory-bytes"]
    assert target < 90_000_000_000 - 4.04 * (1 << 30)  # at least what it was short
    assert "--max-num-batched-tokens" not in first.text


def test_diagnose_of_a_planned_server_refused_for_the_null_block(tmp_path, capsys) -> None:
    """The log of guide 001's refusal (a simulated vLLM 0.33 started as the planner used to start it)."""
    log = tmp_path / "general.log"
    log.write_text(
        "(APIServer pid=1) INFO 12-03 10:09:58 [utils.py:301] non-default args: {'model_tag': 'mistral-7b', "
        "'model': 'mistral-7b', 'max_model_len': 32768, 'max_num_seqs': 1, 'kv_cache_memory_bytes': 4294967296, "
        "'gpu_memory_utilization': 0.2}\n"
        "(EngineCore pid=1) ERROR 12-03 10:09:58 [core.py:1584] ValueError: To serve at least one request with "
        "the model's max seq len (32768), (4.00 GiB KV cache is needed, which is larger than the available KV "
        "cache memory (4.00 GiB). Based on the available memory, the estimated maximum model length is 32752. "
        "Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or "
        "decreasing `max_model_len` when initializing the engine.\n"
    )
    assert main(["diagnose", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["category"] == "kv_cache_insufficient_for_max_len"
    changed = {flag for a in out["advice"] for flag in a["changes"]}
    assert "--kv-cache-memory-bytes" in changed
    assert not changed & {"--gpu-memory-utilization", "--enforce-eager"}


def test_a_pool_of_num_gpu_blocks_override_is_raised_by_that_flag() -> None:
    facts = {"max_model_len": 32768, "estimated_max_model_len": 32752, "total_gib": 94.97}
    flags = {"--num-gpu-blocks-override": 2048, "--max-model-len": 32768, "--gpu-memory-utilization": 0.9}
    advice = _advice("kv_cache_insufficient_for_max_len", facts, flags)
    assert advice[1].changes == {"--num-gpu-blocks-override": 2049}  # 2048 blocks of 16 + the null block
    assert not _changed(advice) & set(FIXED_POOL_FLAGS)
