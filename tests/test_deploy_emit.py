"""Emitters are checked by parsing what they write (YAML, compose keys, systemd sections, bash -n)."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest
import yaml

from vllm_tuner.deploy.costs import model_costs, plan_gpus
from vllm_tuner.deploy.emit import FORMATS, emit
from vllm_tuner.deploy.plan import GIB, make_plan
from vllm_tuner.deploy.spec import GpuSpec, load_deployment
from vllm_tuner.paths import profiles_dir


def plan_of(name):
    d = load_deployment(profiles_dir() / "deployments" / f"{name}.yaml")
    gpus, offline = plan_gpus(d.gpus)
    return make_plan(d, gpus, model_costs(d, gpus[0].total_bytes), offline=offline)


@pytest.fixture(scope="module")
def phased():
    return plan_of("rag-16gb-phased")


@pytest.fixture(scope="module")
def flat(phased):
    from dataclasses import replace

    dep = phased.deployment
    models = tuple(replace(m, phase=None) for m in dep.models if m.name != "embedder")
    d = replace(dep, name="pair", models=models, phases=(), gpus=GpuSpec(count=1, memory_bytes=24 * GIB))
    gpus, _ = plan_gpus(d.gpus)
    plan = make_plan(d, gpus, model_costs(d, gpus[0].total_bytes))
    assert plan.fits, plan.problems
    return plan


def only(files):
    (text,) = files.values()
    return text


@pytest.mark.parametrize("fixture", ["flat", "phased"])
def test_shell_script_is_valid_bash_and_starts_in_plan_order(fixture, request):
    plan = request.getfixturevalue(fixture)
    text = only(emit(plan, "shell"))
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    first = plan.start_order()[0]
    assert f"--kv-cache-memory-bytes {first.kv_bytes}" in text
    assert "wait_healthy" in text and "/health" in text
    assert "# GPU 0" in text  # the memory table rides along as comments
    if plan.deployment.phases:
        assert "phase_rerank()" in text and "sleep 5" in text


def test_compose_services_start_after_the_previous_is_healthy(flat):
    doc = yaml.safe_load(only(emit(flat, "compose")))
    names = [i.name for i in flat.start_order()]
    assert list(doc["services"]) == names
    second = doc["services"][names[1]]
    assert second["depends_on"] == {names[0]: {"condition": "service_healthy"}}
    device = second["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["device_ids"] == ["0"] and device["capabilities"] == ["gpu"]
    assert "--kv-cache-memory-bytes" in second["command"]
    assert "/health" in " ".join(second["healthcheck"]["test"])


def test_compose_phases_are_profiles(phased):
    doc = yaml.safe_load(only(emit(phased, "compose")))
    assert doc["services"]["reranker"]["profiles"] == ["rerank"]


def test_systemd_units_parse_and_chain(flat):
    files = emit(flat, "systemd")
    first, second = (f"vllm-pair-{i.name}.service" for i in flat.start_order())
    for name, text in files.items():
        parser = configparser.ConfigParser(strict=True, interpolation=None)
        parser.read_string(text)
        if name.endswith(".service"):
            assert {"Unit", "Service", "Install"} <= set(parser.sections())
            assert parser["Service"]["ExecStart"].startswith("/usr/local/bin/vllm serve ")
            assert "CUDA_VISIBLE_DEVICES=0" in parser["Service"]["Environment"]
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string(files[second])
    assert first in unit["Unit"]["After"] and unit["Unit"]["Requires"] == first
    assert "pair.target" in files


def test_kubernetes_deployment_has_health_probes_and_gpu_limits(flat):
    docs = list(yaml.safe_load_all(only(emit(flat, "kubernetes"))))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Deployment", "Service"] * 2
    dep = docs[2]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["template"]["spec"]["initContainers"][0]["name"] == "wait-for-previous"
    assert docs[3]["spec"]["ports"][0]["port"] == flat.start_order()[1].port


def test_helm_values_for_the_production_stack(flat):
    values = yaml.safe_load(only(emit(flat, "helm", image="vllm/vllm-openai:v0.33.0")))
    specs = values["servingEngineSpec"]["modelSpec"]
    assert [s["name"] for s in specs] == [i.name for i in flat.start_order()]
    first = flat.start_order()[0]
    assert specs[0]["repository"] == "vllm/vllm-openai" and specs[0]["tag"] == "v0.33.0"
    assert specs[0]["vllmConfig"]["maxModelLen"] == first.max_model_len
    assert specs[0]["vllmConfig"]["gpuMemoryUtilization"] == first.gpu_memory_utilization
    assert str(first.kv_bytes) in specs[0]["vllmConfig"]["extraArgs"]


def test_routers_route_by_model_name(flat):
    config = yaml.safe_load(only(emit(flat, "litellm")))
    entries = {e["model_name"]: e["litellm_params"] for e in config["model_list"]}
    inst = flat.start_order()[0]
    assert entries[inst.name]["api_base"] == f"http://127.0.0.1:{inst.port}/v1"
    assert entries[inst.name]["model"] == f"hosted_vllm/{inst.public_name}"
    script = only(emit(flat, "router"))
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "--service-discovery static" in script and f"http://127.0.0.1:{inst.port}" in script


def test_ray_variant_uses_the_ray_executor(flat):
    text = only(emit(flat, "ray"))
    assert "--distributed-executor-backend ray" in text and "ray start --head" in text
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_every_format_carries_the_memory_numbers(flat):
    for fmt in FORMATS:
        text = "".join(emit(flat, fmt).values())
        assert "headroom" in text, fmt


# ----------------------------------------------------------------------------- local models, Ray nodes


def _plan(models, *, gpus, hosts=(), cost=None):
    from vllm_tuner.deploy.plan import GpuInfo, ModelCost
    from vllm_tuner.deploy.spec import parse_deployment

    data = {"name": "t", "gpus": {"count": gpus}, "models": models}
    if hosts:
        data["hosts"] = list(hosts)
    d = parse_deployment(data)
    cost = cost or ModelCost(14 * GIB, GIB, 131072, 32768)
    plan = make_plan(
        d, [GpuInfo(i, "H200", 141 * GIB) for i in range(gpus)], {m.name: cost for m in d.models}
    )
    assert plan.fits, plan.problems
    return plan


def test_compose_mounts_a_local_model_folder_and_serves_it_under_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = _plan(
        [
            {"name": "abs", "model": "/srv/models/mistral-7b-awq", "port": 8001},
            {"name": "rel", "model": "./models/coder", "port": 8002},
            {"name": "hub", "model": "mistralai/Mistral-7B-Instruct-v0.3", "port": 8003},
        ],
        gpus=1,
        cost=None,
    )
    services = yaml.safe_load(only(emit(plan, "compose")))["services"]
    absolute = services["abs"]
    assert "/srv/models/mistral-7b-awq:/srv/models/mistral-7b-awq:ro" in absolute["volumes"]
    assert absolute["command"][0] == "/srv/models/mistral-7b-awq"
    rel = services["rel"]
    folder = str(tmp_path / "models" / "coder")
    assert f"{folder}:{folder}:ro" in rel["volumes"]  # compose would read a relative host path elsewhere
    assert rel["command"][0] == folder
    served = rel["command"][rel["command"].index("--served-model-name") + 1]
    assert served == "./models/coder"  # what clients send, as with a local `up`
    hub = services["hub"]
    assert hub["volumes"] == ["${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface"]
    assert hub["command"][0] == "mistralai/Mistral-7B-Instruct-v0.3"


def test_ray_on_two_8_gpu_nodes_never_names_a_gpu_the_head_node_lacks():
    plan = _plan(
        [
            {
                "name": "big",
                "model": "org/big",
                "port": 8001,
                "tensor_parallel_size": 8,
                "pipeline_parallel_size": 2,
            }
        ],
        gpus=16,
        hosts=("node-a", "node-b"),
        cost=None,
    )
    assert plan.instance("big").gpu_ids == tuple(range(16))
    text = only(emit(plan, "ray"))
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    visible = [
        line.split("CUDA_VISIBLE_DEVICES=")[1].split()[0]
        for line in text.splitlines()
        if "CUDA_VISIBLE_DEVICES=" in line
    ]
    assert visible and all(max(int(i) for i in ids.split(",")) < 8 for ids in visible), visible
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 setsid" in text  # the head node's part of the instance
    assert "ray start --head --port 6379 --num-gpus 8" in text
    assert "ray start --address node-a:6379 --num-gpus 8" in text
    assert "on node-a GPU 0,1,2,3,4,5,6,7; node-b GPU 0,1,2,3,4,5,6,7" in text


def test_ray_on_one_machine_keeps_the_planned_gpu_ids():
    plan = _plan(
        [
            {"name": "a", "model": "org/a", "port": 8001, "gpus": [2]},
            {"name": "b", "model": "org/b", "port": 8002, "gpus": [3]},
        ],
        gpus=4,
    )
    text = only(emit(plan, "ray"))
    assert "CUDA_VISIBLE_DEVICES=2 setsid" in text and "CUDA_VISIBLE_DEVICES=3 setsid" in text


# ------------------------------------------------------------------------------------------ emit --proxy


def test_compose_with_a_proxy_runs_it_after_every_model_is_healthy(flat):
    doc = yaml.safe_load(only(emit(flat, "compose", proxy_port=9000)))
    names = [i.name for i in flat.start_order()]
    assert list(doc["services"]) == [*names, "vllm-tune-proxy"]
    proxy = doc["services"]["vllm-tune-proxy"]
    assert proxy["entrypoint"] == ["vllm-tune"]
    urls = [f"http://{i.name}:{i.port}" for i in flat.start_order()]
    assert proxy["command"] == ["proxy", *urls, "--host", "0.0.0.0", "--port", "9000"]
    assert proxy["depends_on"] == {n: {"condition": "service_healthy"} for n in names}
    assert proxy["ports"] == ["9000:9000"] and "9000/health" in " ".join(proxy["healthcheck"]["test"])
    assert "vllm-tune-proxy" not in only(emit(flat, "compose"))


def test_systemd_with_a_proxy_adds_a_unit_after_the_models_in_the_target(flat):
    files = emit(flat, "systemd", proxy_port=9000)
    models = [f"vllm-pair-{i.name}.service" for i in flat.start_order()]
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string(files["vllm-pair-proxy.service"])
    assert unit["Unit"]["After"].split()[1:] == models and unit["Unit"]["Requires"].split() == models
    urls = " ".join(f"http://127.0.0.1:{i.port}" for i in flat.start_order())
    assert unit["Service"]["ExecStart"] == f"/usr/local/bin/vllm-tune proxy {urls} --host 0.0.0.0 --port 9000"
    assert unit["Install"]["WantedBy"] == "pair.target"
    target = configparser.ConfigParser(interpolation=None)
    target.read_string(files["pair.target"])
    assert target["Unit"]["Wants"].split() == [*models, "vllm-pair-proxy.service"]
    assert "vllm-pair-proxy.service" not in emit(flat, "systemd")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--format", "kubernetes", "--proxy", "9000"],
            "--proxy is written by --format compose and systemd, not kubernetes",
        ),
        (
            ["--format", "compose", "--proxy", "9000"],
            "--proxy: deployment 'rag-16gb-phased' has phases, whose servers come and go",
        ),
    ],
)
def test_emit_proxy_refusals_are_one_line(capsys, args, said):
    from vllm_tuner.cli import main

    path = profiles_dir() / "deployments" / "rag-16gb-phased.yaml"
    assert main(["emit", str(path), *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vllm-tune: error: {said}")


def test_emit_proxy_on_a_models_port_is_refused(tmp_path, capsys):
    from vllm_tuner.cli import main

    path = tmp_path / "d.yaml"
    path.write_text(
        "name: d\ngpus: {count: 1, profile: rtx-pro-6000}\nmodels:\n"
        "  - {name: a, model: qwen2.5-7b, port: 8001, needs: {min_context: 4096}}\n"
    )
    assert main(["emit", str(path), "--format", "systemd", "--proxy", "8001"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vllm-tune: error: --proxy port 8001 is a's port; choose another --proxy port"
    )
    assert main(["emit", str(path), "--format", "systemd", "--proxy", "9000"]) == 0
    assert "vllm-d-proxy.service" in capsys.readouterr().out
