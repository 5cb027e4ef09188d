"""Guide 002 ("1M Context. Without the OOM.", ../shared/seeds/002_*.txt): a large FP8 MoE on 8x H200.

The guide's model ("GLM 5.2") is not a public checkpoint; DeepSeek-V3 (FP8 blocks, 671B, 256 routed
experts, MLA) is the large FP8 MoE the simulator has. The author serves it at TP 8 with 1-4 sequences at
the longest context, never above --gpu-memory-utilization 0.92, and raises the utilization 0.01 at a
time, each step said to buy "~6 GB total pool on 8xH200". Checked against vLLM's own math:

- weights per GPU: the FP8 experts split eight ways, ~79.5 GiB (a public log of DeepSeek-R1 on eight
  devices shows 79.41 GiB; ``tests/test_simlite_weights.py``);
- a 0.01 step is 0.01 x each GPU's total memory: 1.40 GiB per H200 (139.81 GiB), 11.18 GiB over eight,
  not 6 GB;
- MLA keeps one latent of 512 + 64 values per token per layer, whole on every GPU (TP does not split
  it): 61 x 576 x 2 = 70272 B per token, so the 8 GPUs' 11.18 GiB buy what one GPU's 1.40 GiB buys.
"""

from __future__ import annotations

import json
import math

from vllm_tuner.cli import main

GIB = 1 << 30
H200 = 139.81 * GIB
TOKEN_BYTES = 61 * (512 + 64) * 2  # MLA latent, bf16, per GPU


def test_the_result_says_what_one_hundredth_of_utilization_buys_on_eight_h200s(sim, capsys):
    env = sim("h200")
    args = ["find", "--model", "deepseek-ai/DeepSeek-V3", "--gpus", "8", "--vllm-cmd", env.vllm_cmd]
    args += ["--context", "163840", "--seqs", "4", "--util-ceiling", "0.92"]  # the guide's 1-4 seqs, <= 0.92
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stable"] and result["config"]["--gpu-memory-utilization"] <= 0.92
    winner = result["trials"][-1]
    assert 79.0 < winner["facts"]["weights_gib"] < 80.0
    step = result["utilization_step"]
    per_gpu = math.ceil(H200 * 0.01)
    assert step == {
        "gib_per_device": round(per_gpu / GIB, 3),  # 1.398
        "gib_total": round(8 * per_gpu / GIB, 3),  # 11.185: the guide's "~6 GB" is about half of it
        "tokens": per_gpu // TOKEN_BYTES,  # 21362: one GPU's step, the same latent on all eight
    }
    line = "each 0.01 of --gpu-memory-utilization is 1.40 GiB per GPU (11.18 GiB over the 8 GPUs) and holds "
    assert f"{line}21,362 tokens of KV cache" in result["explanation"]
    # the pool is vLLM's: 64-token blocks of the per-GPU latent, capacity over 163840-token requests
    facts = winner["facts"]
    blocks = facts["available_kv_gib"] * GIB / (64 * TOKEN_BYTES)
    assert abs(facts["kv_cache_tokens"] - blocks * 64) <= 0.006 * GIB / TOKEN_BYTES + 64
    assert facts["kv_cache_tokens"] >= 4 * 163840
    # and the terminal says the same
    assert main(args) == 0
    assert f"{line}21,362 tokens of KV cache" in capsys.readouterr().out
