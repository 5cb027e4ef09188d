"""Guide 003 ("VRAM/RAM Budgets", ../shared/seeds/003_*.txt): embed → rerank → generate in phases on one
16 GB card.

The guide's execution plan: load the embedder, run a batch, unload; load the reranker, run a batch,
unload; load the generator, respond; a cooldown between unload and load. Its author writes that plan
as profiles/deployments/rag-16gb-phased.yaml and runs it the way its header says: `plan`, `up` (the
first phase), `up --phase rerank`, `up --phase generate` (each with the `--vllm-cmd` of the simulated
vLLM, as on a machine whose vLLM is not on PATH), with requests to each phase's server (the
guide's starting batches: embed 8, rerank 8, generate 1). Here on the simulated 16 GB card
(`profiles/sim/rtx-4080.yaml`), whose vLLM serves pooling models as vLLM 0.32 does.

The guide's numbers, against what vLLM holds: Qwen3-Embedding-4B "~8GB" holds (4.02 B bf16 parameters:
8.04 GB, 7.49 GiB); Qwen3-Reranker-0.6B "~2GB" is its weights (1.19 GB) plus the runtime and a KV
cache; "GLM-4.5 Air ~5GB" cannot be: GLM-4.5-Air has 106 B parameters (over 200 GB in BF16), so the
deployment file generates with Qwen2.5-7B-Instruct-AWQ (5.2 GiB of AWQ weights) instead.
"""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from vllm_tuner.cli import main
from vllm_tuner.deploy.state import deployment_states
from vllm_tuner.launch import free_port
from vllm_tuner.paths import profiles_dir

GIB = 1 << 30
NAME = "rag-16gb-phased"
REPORTS = [
    "Paris is the capital of France and its largest city.",
    "The Seine flows through Paris.",
    "Bananas are rich in potassium.",
    "The Eiffel Tower was finished in 1889.",
    "Mount Everest is the highest mountain above sea level.",
    "France borders Spain, Italy and Germany.",
    "Photosynthesis turns light into chemical energy.",
    "The Louvre in Paris is the most visited museum.",
]


def deployment_file(tmp_path) -> str:
    """The bundled file, on free ports (a concurrent run must not collide with its fixed ones) and a
    one-second cooldown instead of five (the switches are timed against it)."""
    data = yaml.safe_load((profiles_dir() / "deployments" / f"{NAME}.yaml").read_text())
    ports: list[int] = []
    while len(ports) < len(data["models"]):
        port = free_port()
        if port not in ports:
            ports.append(port)
    for model, port in zip(data["models"], ports, strict=True):
        model["port"] = port
    data["cooldown"] = "1s"
    path = tmp_path / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, dict | str]:
    code = main(list(argv))
    out = capsys.readouterr()
    if "--json" in argv and out.out.strip():
        return code, json.loads(out.out)
    return code, out.out + out.err


def port_of(name: str) -> int:
    return next(i.port for i in deployment_states().load(NAME).instances if i.name == name)


def status(capsys) -> dict:
    code, report = run(capsys, "status", NAME, "--json")
    assert isinstance(report, dict)
    report["exit"] = code
    return report


def test_the_guides_phases_run_on_a_16gb_card(sim, tmp_path, capsys):
    env = sim("rtx-4080", time_scale=1000)
    path = deployment_file(tmp_path)
    code, plan = run(capsys, "plan", path, "--json")
    assert code == 0, plan
    try:
        code, up = run(capsys, "up", path, "--json", "--vllm-cmd", env.vllm_cmd)
        assert code == 0, up
        assert up["phase"] == "embed" and up["started"] == ["embedder"]
        command = up["instances"][0]["command"]
        assert command[command.index("--runner") + 1] == "pooling"

        # phase embed: a batch of 8 texts, one 2560-float embedding each
        embedder = f"http://127.0.0.1:{port_of('embedder')}"
        batch = httpx.post(
            f"{embedder}/v1/embeddings", json={"model": "Qwen/Qwen3-Embedding-4B", "input": REPORTS}
        )
        assert batch.status_code == 200, batch.text
        assert [len(d["embedding"]) for d in batch.json()["data"]] == [2560] * 8
        assert httpx.post(f"{embedder}/v1/completions", json={"prompt": "hi"}).status_code == 404
        report = status(capsys)
        assert (report["exit"], report["phase"], report["healthy"]) == (0, "embed", True)
        (row,) = report["instances"]
        assert row["used_bytes"]["0"] <= row["planned_bytes"]  # the file's memory: block holds it

        # phase rerank: the embedder is unloaded, the reranker orders 8 documents for one query
        code, switched = run(capsys, "up", path, "--phase", "rerank", "--json", "--vllm-cmd", env.vllm_cmd)
        assert code == 0, switched
        assert switched["started"] == ["reranker"] and switched["switch_s"] >= 1.0  # the cooldown
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{embedder}/health")
        reranker = f"http://127.0.0.1:{port_of('reranker')}"
        ranked = httpx.post(
            f"{reranker}/rerank",
            json={"query": "what is the capital of France", "documents": REPORTS, "top_n": 3},
        )
        assert ranked.status_code == 200, ranked.text
        results = ranked.json()["results"]
        assert len(results) == 3 and results[0]["index"] == 0
        assert [r["relevance_score"] for r in results] == sorted(
            (r["relevance_score"] for r in results), reverse=True
        )
        scored = httpx.post(f"{reranker}/score", json={"queries": "Paris", "documents": REPORTS[:2]})
        assert [d["index"] for d in scored.json()["data"]] == [0, 1]
        report = status(capsys)
        assert (report["phase"], report["healthy"]) == ("rerank", True)
        assert [i["name"] for i in report["instances"]] == ["reranker"]

        # phase generate: one answer from the generator
        code, switched = run(capsys, "up", path, "--phase", "generate", "--json", "--vllm-cmd", env.vllm_cmd)
        assert code == 0, switched
        generator = f"http://127.0.0.1:{port_of('generator')}"
        answer = httpx.post(
            f"{generator}/v1/chat/completions",
            json={
                "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
                "messages": [{"role": "user", "content": f"Using {REPORTS[0]} answer: capital of France?"}],
                "max_tokens": 32,
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 32
        assert status(capsys)["healthy"]
    finally:
        code, down = run(capsys, "down", NAME, "--json")
    assert code == 0 and down["gpu_memory"] == "released"


def test_a_phase_that_does_not_start_brings_the_previous_one_back(sim, tmp_path, capsys):
    """The reranker does not load (its weights take the card here): the switch used to leave nothing
    running while status said the deployment was healthy."""
    env = sim("rtx-4080", time_scale=1000, models={"Qwen/Qwen3-Reranker-0.6B": {"weights_factor": 20}})
    path = deployment_file(tmp_path)
    try:
        code, up = run(capsys, "up", path, "--vllm-cmd", env.vllm_cmd)
        assert code == 0, up
        code, said = run(capsys, "up", path, "--phase", "rerank", "--vllm-cmd", env.vllm_cmd)
        assert code == 2
        assert "phase rerank did not start: reranker exited while starting: oom_weights_load" in said
        assert "phase embed runs again (embedder)" in said
        report = status(capsys)
        assert (report["exit"], report["phase"], report["healthy"]) == (0, "embed", True)
        assert [i["name"] for i in report["instances"]] == ["embedder"]
        embedder = f"http://127.0.0.1:{port_of('embedder')}"
        assert httpx.post(f"{embedder}/v1/embeddings", json={"input": REPORTS[:2]}).status_code == 200
    finally:
        code, down = run(capsys, "down", NAME, "--json")
    assert code == 0 and down["gpu_memory"] == "released"
