"""Guide 001 ("VRAM Calculation Reference", ../shared/seeds/001_*.txt): two models on one 96 GB GPU.

The guide's author puts DeepSeek-Coder-33B AWQ beside Mistral-7B (scenario 1), Qwen2.5-14B (scenario 2) or
puts Qwen2.5-Coder-32B AWQ beside Qwen2.5-7B (scenario 3) on one RTX PRO 6000 and starts them as two
`vllm serve` processes. Run the way that author would: plan the pair, start it on the simulated card,
read a failed server's log with `diagnose`, emit it for docker compose. Checked against vLLM's own
KV math (kv_cache_utils.py of vLLM 0.3x): the BlockPool keeps one null block back, so a pool must hold
its requests' blocks plus one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from vllm_tuner.cli import main
from vllm_tuner.deploy.costs import model_costs, plan_gpus
from vllm_tuner.deploy.plan import make_plan
from vllm_tuner.deploy.spec import parse_deployment
from vllm_tuner.launch import free_port
from vllm_tuner.simlite import oracle
from vllm_tuner.simlite.activate import load_scenario_file

SCENARIO = "rtx-pro-6000"  # the guide's 96 GB card (94.97 GiB usable)
PAIRS = [  # (coder, general) of the guide's three "96GB GPU budget scenarios"
    ("deepseek-coder-33b-awq", "mistral-7b"),
    ("deepseek-coder-33b-awq", "qwen2.5-14b"),
    ("qwen2.5-coder-32b-awq", "qwen2.5-7b"),
]


def ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in out:
            out.append(port)
    return out


def pair(coder: str, general: str, *, general_needs: dict, coder_needs: dict | None = None, gpus=None):
    a, b = ports(2)
    return {
        "name": "guide-001",
        "gpus": gpus or {"count": 1, "profile": SCENARIO},
        "headroom": "1GiB",
        "models": [
            {
                "name": "coder",
                "model": coder,
                "port": a,
                "needs": coder_needs or {"min_context": 16384, "min_seqs": 8, "objective": "concurrency"},
            },
            {"name": "general", "model": general, "port": b, "needs": general_needs},
        ],
    }


def write(tmp_path, data) -> str:
    path = tmp_path / "guide-001.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------------ the planned pools


@pytest.mark.parametrize(("coder", "general"), PAIRS)
@pytest.mark.parametrize("objective", ["context", "concurrency"])
def test_every_planned_instance_passes_vllms_kv_check(coder, general, objective):
    """A context-objective model at its maximum length used to get exactly one request of KV:
    vLLM refused it ("the estimated maximum model length is 32752")."""
    coder_needs = {"min_context": 16384, "min_seqs": 8, "objective": "fixed"}  # the spare goes to general
    d = parse_deployment(
        pair(coder, general, general_needs={"min_seqs": 1, "objective": objective}, coder_needs=coder_needs)
    )
    gpus, offline = plan_gpus(d.gpus)
    plan = make_plan(d, gpus, model_costs(d, gpus[0].total_bytes, gpu_name=gpus[0].name), offline=offline)
    assert plan.fits, plan.problems
    scenario = load_scenario_file(SCENARIO)
    for inst in plan.instances:
        truth = oracle.truth(scenario, inst.serve_args(), list(inst.gpu_ids))
        assert truth.boots, (inst.name, truth.category, inst.serve_args())
        # vLLM's capacity counts the null block: the pool holds max_num_seqs requests besides it
        per_request = math.ceil(inst.max_model_len / 16)
        assert truth.max_concurrency * per_request - 1 >= inst.max_num_seqs * per_request - 1e-6
    if objective == "context":
        assert plan.instance("general").max_model_len == 32768  # the model's maximum, with its null block


# ------------------------------------------------------------------------------- on the simulated card


def test_the_guides_pair_starts_on_the_simulated_card(sim, tmp_path, capsys):
    env = sim(SCENARIO, time_scale=1000)
    data = pair(
        *PAIRS[0],
        general_needs={"min_seqs": 1, "objective": "context"},
        coder_needs={"min_context": 16384, "min_seqs": 8, "objective": "fixed"},
        gpus={"count": 1},
    )
    path = write(tmp_path, data)
    assert main(["up", path, "--json", "--vllm-cmd", env.vllm_cmd]) == 0
    up = json.loads(capsys.readouterr().out)
    try:
        general = next(i for i in up["instances"] if i["name"] == "general")
        argv = general["command"]
        assert argv[argv.index("--max-model-len") + 1] == "32768"
        assert main(["status", "guide-001", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["healthy"]
    finally:
        assert main(["down", "guide-001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory"] == "released"


def test_a_first_instance_larger_than_planned_is_named_and_up_tune_starts_the_pair(sim, tmp_path, capsys):
    """DeepSeek-Coder-33B AWQ holds ~3 GiB more on the card than the estimate puts it at (a checkpoint
    larger than its config says: the simulator's weights_factor); with Mistral filling the rest, the
    second start finds too little free. The message names the first one and its overshoot, not "other
    processes", and `up --tune` (which measures each) starts the pair."""
    env = sim(SCENARIO, time_scale=1000, models={"deepseek-coder-33b-awq": {"weights_factor": 1.18}})
    data = pair(
        *PAIRS[0],
        general_needs={"min_context": 32768, "min_seqs": 2, "objective": "concurrency"},
        gpus={"count": 1},
    )
    path = write(tmp_path, data)
    assert main(["up", path, "--vllm-cmd", env.vllm_cmd]) == 2
    err = capsys.readouterr().err
    assert "before starting general" in err
    assert "coder took" in err and "GiB more than the plan" in err
    assert "other processes" not in err and "nvidia-smi" not in err
    assert f"vllm-tune up {path} --tune" in err
    tuned = main(["up", path, "--tune", "--json", "--vllm-cmd", env.vllm_cmd])
    assert tuned == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    assert main(["down", "guide-001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory"] == "released"


# ---------------------------------------------------------------------------------------- diagnose


def test_diagnose_of_a_refused_planned_server_follows_its_kv_cache_memory_bytes(sim, tmp_path, capsys):
    """The server as the planner used to start it: --kv-cache-memory-bytes of exactly one request.
    Its pool is that flag: neither a higher utilization nor --enforce-eager moves it."""
    env = sim(SCENARIO, time_scale=1000)
    one_request = 2048 * 16 * 131072  # mistral-7b: 2048 blocks of 16 tokens x 128 KiB
    argv = [
        *env.vllm_cmd.split(),
        "serve",
        "mistral-7b",
        "--max-model-len",
        "32768",
        "--max-num-seqs",
        "1",
        "--gpu-memory-utilization",
        "0.2",
        "--kv-cache-memory-bytes",
        str(one_request),
        "--port",
        str(free_port()),
    ]
    done = subprocess.run(argv, env={**os.environ, **env.env}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    log = tmp_path / "general.log"
    log.write_text(done.stdout + done.stderr)
    assert "estimated maximum model length is 32752" in log.read_text()
    assert main(["diagnose", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["category"] == "kv_cache_insufficient_for_max_len"
    assert out["flags"]["--max-num-seqs"] == 1
    changed = [flag for advice in out["advice"] for flag in advice["changes"]]
    assert "--kv-cache-memory-bytes" in changed
    assert "--gpu-memory-utilization" not in changed and "--enforce-eager" not in changed
    raised = next(
        a["changes"]["--kv-cache-memory-bytes"]
        for a in out["advice"]
        if "--kv-cache-memory-bytes" in a["changes"]
    )
    fixed = [*argv[: argv.index(str(one_request))], str(raised), *argv[argv.index(str(one_request)) + 1 :]]
    truth = oracle.truth(load_scenario_file(SCENARIO), fixed[fixed.index("serve") :], [0])
    assert truth.boots  # the advised size serves the length


# -------------------------------------------------------------------------------------------- emit


def test_emit_compose_mounts_the_downloaded_model_folder(tmp_path, monkeypatch, capsys):
    """The guide downloads TheBloke's AWQ checkpoints (huggingface-cli download) and serves them; a
    deployment naming the folder gets it mounted into the container."""
    folder = tmp_path / "models" / "tiny-llama"
    folder.parent.mkdir()
    source = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-llama")
    subprocess.run(["cp", "-r", source, str(folder)], check=True)
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        {
            "name": "guide-001",
            "gpus": {"count": 1, "profile": SCENARIO},
            "models": [
                {"name": "coder", "model": "./models/tiny-llama", "port": 8001},
                {"name": "general", "model": str(folder), "port": 8002},
            ],
        },
    )
    assert main(["emit", path, "--format", "compose", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    services = yaml.safe_load((tmp_path / "out" / "compose.yaml").read_text())["services"]
    for name in ("coder", "general"):
        assert f"{folder}:{folder}:ro" in services[name]["volumes"], name
        assert services[name]["command"][0] == str(folder)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
