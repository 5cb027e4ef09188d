"""``vllm-tune estimate`` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from vllm_tuner.cli import main

KEYS = {
    "weights_gib",
    "non_torch_gib",
    "activation_gib",
    "cudagraph_gib",
    "kv_pool_gib",
    "kv_bytes_per_token",
    "kv_cache_tokens",
    "max_concurrency",
    "max_model_len_fit",
    "fits",
}


def run_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["estimate", *args, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else {})


def test_json_has_stable_keys(capsys):
    code, data = run_json(capsys, "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--max-model-len", "32768")
    assert code == 0 and set(data) >= KEYS
    assert data["kv_bytes_per_token"] == 131072 and data["fits"] is True
    assert data["contexts"][-1]["context"] == 131072


def test_tp_splits_kv_per_gpu(capsys):
    code, data = run_json(
        capsys, "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--tensor-parallel-size", "2"
    )
    assert code == 0 and data["kv_bytes_per_token"] == 65536 and data["gpu_ids"] == [0, 1]


def test_human_output_when_it_does_not_fit(capsys):
    code = main(["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-3090", "--max-model-len", "131072"])
    out = capsys.readouterr().out
    assert code == 0
    for text in (
        "KV cache pool",
        "does NOT fit",
        "Context table",
        "fewer sequences",
        "fp8 KV cache",
        "CPU offload",
    ):
        assert text in out


def test_weights_too_big_for_one_card_name_the_gpus_that_would_fit(capsys):
    code = main(["estimate", "--model", "qwen2.5-14b", "--gpu", "rtx-4090"])
    out = capsys.readouterr().out
    assert code == 0 and "does NOT fit" in out
    (line,) = [x for x in out.splitlines() if "more GPUs" in x]
    assert line.split()[:5] == ["more", "GPUs", "(-tp", "2,", "--gpus"] and line.rstrip().endswith("fits")


@pytest.mark.parametrize("util", ["0", "1.5", "-0.1"])
def test_bad_utilization_exits_2(capsys, util):
    assert main(["estimate", "--model", "qwen2.5-7b", "--gpu", "h100", "--gpu-memory-utilization", util]) == 2
    assert "--gpu-memory-utilization" in capsys.readouterr().err


def test_without_nvml_or_gpu_says_what_to_pass(capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n\ndef nvmlInit():\n    raise NVMLError('no driver')\n"
    )
    import sys

    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    try:
        assert main(["estimate", "--model", "qwen2.5-7b"]) == 2
    finally:
        sys.modules.pop("pynvml", None)
    err = capsys.readouterr().err
    assert "--gpu" in err and "--gpu-memory" in err and err.count("\n") == 1


def test_unknown_model_and_gpu_exit_2(capsys):
    assert main(["estimate", "--model", "no-such-model", "--gpu", "h100"]) == 2
    assert main(["estimate", "--model", "qwen2.5-7b", "--gpu", "h1000"]) == 2


def run_models_file(capsys, tmp_path, text: str, *args: str) -> tuple[int, dict]:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return run_json(capsys, "--models", str(path), *args)


def test_models_file_shares_one_gpu(capsys, tmp_path):
    code, data = run_models_file(
        capsys,
        tmp_path,
        "- model: qwen2.5-7b\n  max-model-len: 8192\n- model: mistral-7b\n  max_model_len: 8192\n",
        "--gpu",
        "h100",
    )
    assert code == 0 and data["fits"] and len(data["models"]) == 2
    assert all(m["max_model_len"] >= 8192 and 0 < m["gpu_memory_utilization"] < 1 for m in data["models"])
    assert all(m["fits"] and m["reason"] == "" and m["gpu_ids"] == [0] for m in data["models"])
    total, used = data["total_gib"], 0.0
    for m in data["models"]:  # in start order
        # vLLM's startup check: util x total free after the ones started before and its own CUDA context
        assert total - used - 0.5 >= m["gpu_memory_utilization"] * total - 0.01
        # the pool holds its requests in whole blocks plus vLLM's null block
        assert m["kv_cache_tokens"] >= m["max_model_len"] * m["max_num_seqs"] + 16
        used += m["weights_gib"] + m["overhead_gib"] + m["kv_pool_gib"]
    assert used + data["headroom_gib"] + data["spare_gib"] == pytest.approx(total, abs=0.01)


def test_models_that_do_not_share_a_card_say_which_and_why(capsys):
    args = ["--model", "qwen2.5-7b", "--model", "mistral-7b", "--gpu", "rtx-3090", "--max-model-len", "32768"]
    code, data = run_json(capsys, *args)
    assert code == 0 and not data["fits"]
    placed, refused = data["models"]
    assert placed["fits"] and placed["reason"] == "" and placed["gpu_memory_utilization"] < 1
    assert not refused["fits"] and refused["gpu_memory_utilization"] is None
    assert refused["reason"].startswith("needs ") and "GPU 0 has only" in refused["reason"]
    assert {placed["model"], refused["model"]} == {"qwen2.5-7b", "mistral-7b"}
    assert main(["estimate", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("they do NOT fit")
    assert any(line.split()[:4] == [refused["model"], "does", "NOT", "fit:"] for line in lines)
    assert any(f"--max-model-len {placed['max_model_len']}" in line for line in lines)


def test_models_that_do_not_share_a_card_go_to_another_gpu(capsys, tmp_path):
    code, data = run_models_file(
        capsys,
        tmp_path,
        "- {model: qwen2.5-7b, max-model-len: 32768, tensor-parallel-size: 1}\n"
        "- {model: mistral-7b, max-model-len: 32768, tensor-parallel-size: 1}\n",
        "--gpu",
        "rtx-3090",
        "--gpus",
        "2",
    )
    assert code == 0 and data["fits"] and data["gpu_ids"] == [0, 1]
    assert sorted(m["gpu_ids"] for m in data["models"]) == [[0], [1]]


def test_the_same_model_twice_is_two_servers(capsys):
    code, data = run_json(capsys, "--model", "qwen2.5-7b", "--model", "qwen2.5-7b", "--gpu", "h100")
    assert code == 0 and data["fits"]
    assert sorted(m["model"] for m in data["models"]) == ["qwen2.5-7b", "qwen2.5-7b-2"]


def test_click_usage_errors_are_one_line_with_the_help_to_read(capsys):
    assert main(["plan", "no-such-deployment.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "vllm-tune plan --help" in err[0]
    assert main(["find", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0] and "vllm-tune find --help" in err[0]
