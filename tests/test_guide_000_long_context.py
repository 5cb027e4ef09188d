"""Guide 000 ("VRAM Requirements: GLM-4-32B-0414 AWQ with 128K Context", ../shared/seeds/000_*.txt).

The guide's author serves GLM-4-32B-0414 AWQ on one 32 GB RTX 5090 and tabulates 32K (native), 64K (YaRN 2x)
and 128K (YaRN 4x): safe, comfortable, tight. To make 128K work it lowers --gpu-memory-utilization to 0.85.
Run the way that author would: the card's context table (``estimate``), then ``find`` at 128K x 1 and the most
sequences at 64K on the simulated card, each with ``--allow rope-scaling``. Checked against vLLM 0.32's own
math:

- the ``--hf-overrides`` the tool emits, read with vLLM's rules (the simulator's independent copy of
  ``_get_and_verify_max_len`` and the override order): YaRN's ``factor`` is not applied to the derived length
  in 0.3x, so ``max_position_embeddings`` says the new length; the dict replaces the model's RoPE dict, so it
  repeats ``rope_theta`` and GLM's ``partial_rotary_factor``;
- KV per token: 61 layers x (K, V) x 2 KV heads x 128 x 2 bytes = 62,464 B; a request holds whole blocks of
  16 tokens and the pool keeps one null block besides.

Where the guide is right: its KV sizes (~2-3 GB at 32K, 4-6 GB at 64K, 8-10 GB at 128K in bf16). Where it is
wrong: a lower utilization makes the KV pool smaller (pool = utilization x card - everything else), so 0.85
takes 128K further out of reach, not closer; and YaRN is not free: vLLM's static YaRN scales every request,
short ones too, which the tool says with the flag.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.simlite import groundtruth, hfconfig, oracle
from vllm_tuner.simlite.activate import load_scenario_file, resolve

MODEL = "glm-4-32b-awq"
SCENARIO = "rtx-5090"  # the guide's 32 GB card (31.36 GiB)
KV_BYTES_PER_TOKEN = 61 * 2 * 2 * 128 * 2
BLOCK = 16
GIB = 1 << 30
GB = 1e9
GUIDE_KV_GB = {32768: (2, 3), 65536: (4, 6), 131072: (8, 10)}  # the guide's table, bf16 KV
GLM_CONFIG = {  # what vLLM reads from THUDM/GLM-4-32B-0414's config.json about positions
    "model_type": "glm4",
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
}


def kv_request_bytes(tokens: int) -> int:
    """One request's KV in vLLM: whole blocks."""
    return math.ceil(tokens / BLOCK) * BLOCK * KV_BYTES_PER_TOKEN


def vllm_reads(flag_value: str) -> tuple[int, dict]:
    """(derived max_model_len, RoPE dict) vLLM 0.32 reads with ``--hf-overrides flag_value``."""
    config = hfconfig.with_overrides(GLM_CONFIG, hfconfig.dict_or_str(flag_value))
    return hfconfig.derived_max_len(config)[0], config["rope_parameters"]


def find_json(capsys, env, *args: str) -> dict:
    argv = ["find", "--model", MODEL, "--gpus", "1", "--vllm-cmd", env.vllm_cmd, "--json", *args]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def serve_args(result: dict) -> list[str]:
    """The winner's ``vllm serve`` words, as the result's command prints them."""
    import shlex

    words = shlex.split(result["command"])
    return words[words.index("serve") :]


# ------------------------------------------------------------------------------------ the guide's table


def test_the_card_table_has_the_guides_rows_and_sizes(capsys):
    assert main(["estimate", "--model", MODEL, "--gpu", SCENARIO, "--json"]) == 0
    rows = {r["context"]: r for r in json.loads(capsys.readouterr().out)["contexts"]}
    for n, (low, high) in GUIDE_KV_GB.items():
        kv = rows[n]["kv_gib_per_seq"] * GIB
        assert kv == pytest.approx(kv_request_bytes(n), abs=0.001 * GIB)
        assert low <= kv / GB <= high, (n, kv / GB)  # the guide's KV column holds
    assert rows[32768]["rope"] is None
    assert [rows[n]["rope"]["factor"] for n in (65536, 131072)] == [2.0, 4.0]
    # safe, comfortable, tight
    assert rows[32768]["verdict"] == rows[65536]["verdict"] == "fits with margin"
    assert rows[131072]["verdict"] == "tight"
    for n in (65536, 131072):
        assert vllm_reads(rows[n]["rope"]["hf_overrides"])[0] == n


def test_128k_without_the_knob_is_refused_naming_it(sim, capsys):
    env = sim(SCENARIO)
    code = main(
        [
            "find",
            "--model",
            MODEL,
            "--gpus",
            "1",
            "--vllm-cmd",
            env.vllm_cmd,
            "--context",
            "131072",
            "--seqs",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "--allow rope-scaling for YaRN ×4 (32,768 → 131,072 tokens)" in err and "short texts" in err


# ------------------------------------------------------------------------------- on the simulated card


def test_128k_with_rope_scaling_serves_on_the_simulated_card(sim, capsys):
    env = sim(SCENARIO)
    result = find_json(capsys, env, "--context", "131072", "--seqs", "1", "--allow", "rope-scaling")
    assert result["stable"] is True
    flags = result["config"]
    assert flags["--max-model-len"] == 131072 and flags["--max-num-seqs"] == 1
    derived, rope = vllm_reads(flags["--hf-overrides"])
    assert derived == 131072
    assert rope == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    assert rope["factor"] * rope["original_max_position_embeddings"] == derived
    assert any("YaRN ×4" in line and "short texts" in line for line in result["explanation"])
    # vLLM's KV check: one request of 131,072 tokens and the null block fit in what the server reported
    winner = result["trials"][-1]
    assert winner["facts"]["available_kv_gib"] * GIB >= kv_request_bytes(131072) + BLOCK * KV_BYTES_PER_TOKEN
    scenario = load_scenario_file(SCENARIO)
    truth = oracle.truth(scenario, serve_args(result), [0])
    assert truth.boots and truth.survives_load and truth.kv_cache_tokens >= 131072
    # without the override vLLM refuses the length outright
    args = serve_args(result)
    del args[args.index("--hf-overrides") : args.index("--hf-overrides") + 2]
    assert oracle.truth(scenario, args, [0]).category == "unsupported_flag_or_arg_error"
    # the config file find wrote serves the same way (vllm serve --config)
    text = Path(result["config_file"]).read_text()
    assert "hf-overrides:" in text
    assert oracle.truth(scenario, ["serve", "--config", result["config_file"]], [0]).boots


def test_the_guides_lower_utilization_leaves_128k_less_room(sim, capsys):
    env = sim(SCENARIO)
    result = find_json(capsys, env, "--context", "131072", "--seqs", "1", "--allow", "rope-scaling")
    winner_util = result["config"]["--gpu-memory-utilization"]
    scenario = resolve(load_scenario_file(SCENARIO))
    args = serve_args(result)
    i = args.index("--gpu-memory-utilization")

    def boot(util: float):
        parsed = oracle.parse([*args[1:i], "--gpu-memory-utilization", str(util), *args[i + 2 :]])
        p = oracle.prepare(parsed, scenario, "0")
        gpu = scenario["gpus"][0]
        return groundtruth.boot(
            p.model,
            p.launch,
            total_bytes=int(gpu["total_bytes"]),
            others_bytes=0,
            gpu_name=gpu["name"],
            truth=p.truth,
        )

    pools = [boot(u).pool_bytes for u in (0.85, 0.90, winner_util)]
    assert pools == sorted(pools) and pools[0] < pools[1]  # the pool shrinks with the utilization
    need = kv_request_bytes(131072) + BLOCK * KV_BYTES_PER_TOKEN  # vLLM's check, null block included
    guide = boot(0.85)
    assert (guide.category == "kv_cache_insufficient_for_max_len") == (guide.pool_bytes < need)
    # the guide lowers the fraction to 0.85 "for headroom": with AWQ's 18.3 GiB of weights that pool
    # still holds one 128K request, by less than the winner's, which find proved under load
    winner = boot(winner_util)
    assert winner_util > 0.85 and winner.pool_bytes - need > guide.pool_bytes - need


def test_64k_with_rope_scaling_holds_the_sequences_the_pool_has_room_for(sim, capsys):
    env = sim(SCENARIO)
    result = find_json(
        capsys, env, "--objective", "concurrency", "--min-context", "65536", "--allow", "rope-scaling"
    )
    flags = result["config"]
    assert result["stable"] is True and flags["--max-model-len"] == 65536
    assert vllm_reads(flags["--hf-overrides"])[0] == 65536
    seqs = flags["--max-num-seqs"]
    blocks = (
        result["trials"][-1]["facts"]["kv_cache_tokens"] // BLOCK
    )  # vLLM counts every block, the null one too
    assert seqs == (blocks - 1) // (65536 // BLOCK)  # every sequence the measured pool holds
    assert seqs >= 2  # the guide's "comfortable": more than one 64K request at once
    truth = oracle.truth(load_scenario_file(SCENARIO), serve_args(result), [0])
    assert truth.boots and truth.survives_load and truth.max_concurrency >= seqs
