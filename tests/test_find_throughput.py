"""`vllm-tune find --objective throughput` on the simulator: bad input refused up front, and the whole
flow (memory fit, one sweep launch, one proof launch) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_find_cli_input import fake_vllm, refuse  # noqa: F401  (the house rules for bad input)

from vllm_tuner.cli import main

QWEN = ["--model", "qwen2.5-7b"]
THROUGHPUT = [*QWEN, "--objective", "throughput"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (THROUGHPUT, "--objective throughput needs --workload"),
        ([*THROUGHPUT, "--workload", "chat", "--slo", "ttft<2s"], "METRIC:pNN<=VALUE"),
        ([*THROUGHPUT, "--workload", "nosuch"], "neither a named mix nor a file"),
        ([*QWEN, "--workload", "chat"], "--workload is for --objective throughput"),
        ([*QWEN, "--slo", "ttft:p95<=2s"], "--slo is for --objective throughput"),
        ([*THROUGHPUT, "--workload", "chat", "--seqs", "8"], "the sweep chooses --max-num-seqs"),
        ([*THROUGHPUT, "--workload", "chat", "--context", "4096"], "shorter than the longest request"),
        ([*THROUGHPUT, "--workload", "chat", "--max-preemption-rate", "-1"], "0 or more"),
    ],
)
def test_bad_throughput_input_is_one_line_and_exit_2(refuse, args, words):  # noqa: F811
    assert words in refuse(*args)


def test_a_bad_workload_row_and_a_request_longer_than_the_model_are_refused(refuse, tmp_path):  # noqa: F811
    rows = tmp_path / "traffic.csv"
    rows.write_text("prompt_tokens,output_tokens\n1000,100\n2000,x\n")
    assert f"line 3 of {rows}" in refuse(*THROUGHPUT, "--workload", str(rows))
    rows.write_text("1000,100\n40000,200\n")
    assert "40,200 tokens, more than Qwen/Qwen2.5-7B-Instruct takes (32,768)" in refuse(
        *THROUGHPUT, "--workload", str(rows)
    )


def test_throughput_sweeps_one_server_and_proves_its_choice(capsys, tmp_path):
    rows = tmp_path / "traffic.csv"
    rows.write_text(
        "prompt_tokens,output_tokens\n" + "".join(f"{300 + 97 * i},{40 + 7 * i}\n" for i in range(8))
    )
    code = main(
        [
            "find",
            *THROUGHPUT,
            "--workload",
            str(rows),
            "--slo",
            "ttft:p95<=1s",
            "--level-duration",
            "20s",
            "--simulate",
            "rtx-5090",
            "--sim-time-scale",
            "10",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    table = {row["concurrency"]: row for row in out["table"]}
    chosen = out["chosen"]["concurrency"]
    assert out["stable"] and chosen in table
    assert out["config"]["--max-num-seqs"] == chosen
    assert out["config"]["--max-model-len"] == 300 + 97 * 7 + 40 + 7 * 7  # the longest request
    assert table[chosen]["ttft_p95"] <= 1.0  # the choice holds the SLO
    # within 5% of the best level that held the SLO (the simulator shares this machine's few cores with
    # the clients, so how much batching pays here is not the simulator's alone: only the rule is checked)
    held = [
        row["output_tokens_per_s"]
        for row in table.values()
        if row["ttft_p95"] is not None and row["ttft_p95"] <= 1.0 and not row["errors"]
    ]
    assert table[chosen]["output_tokens_per_s"] >= 0.95 * max(held)
    assert len(table) >= 3 and table[chosen]["requests"] > 0
    # one sweep launch at a high cap, one proof at the choice: no restart per level
    sweep, proof = out["launches"]
    assert sweep["flags"]["--max-num-seqs"] == 256 and sweep["verdict"] == "stable"
    assert proof["flags"]["--max-num-seqs"] == chosen and proof["verdict"] == "stable"
    # prompts of at most 979 tokens and no ITL limit: vLLM's 2,048-token chunk, on both launches
    assert sweep["flags"]["--max-num-batched-tokens"] == proof["flags"]["--max-num-batched-tokens"] == 2048
    assert out["proof"]["concurrency"] == 2 * chosen and out["proof"]["errors"] == 0
    assert out["command"].endswith(
        f"--max-num-seqs {chosen} --max-num-batched-tokens 2048 "
        f"--gpu-memory-utilization {out['config']['--gpu-memory-utilization']}"
    )
    assert any(line.startswith(f"chosen C={chosen}: ") for line in out["explanation"])
    assert "<svg" in Path(out["chart"]).read_text()


def test_a_worst_case_result_says_what_it_guarantees(sim, capsys):
    env = sim("rtx-5090", time_scale=200)
    code = main(["find", *QWEN, "--gpus", "2", "--vllm-cmd", env.vllm_cmd])
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "  • guarantee: no preemption even when every sequence is at full length "
        "(--max-num-seqs × --max-model-len fit the KV pool)\n\nServe command:" in out
    )
