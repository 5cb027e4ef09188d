"""Deployment files from a :class:`DeploymentPlan` (pure): shell, docker compose, systemd, Kubernetes, routers, Ray.

Every emitter carries the planned memory numbers as comments, starts the instances in the plan's order
(each after the previous one answers ``/health``), and passes ``--kv-cache-memory-bytes`` and the
start-order ``--gpu-memory-utilization`` exactly as planned. Each returns ``{filename: text}``. Compose
and systemd also write ``vllm-tune proxy`` in front of the instances when given ``proxy_port``.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from typing import Any

import yaml

from ..vllmargv import shell_command
from .plan import DeploymentPlan, Instance
from .report import gib, render_budget

DEFAULT_IMAGE = "vllm/vllm-openai:v0.33.0"
HEALTH_TIMEOUT_S = 1800
SETTLE_S = 10
PROXY_IMAGE = "${VLLM_TUNE_IMAGE:-vllm-tune}"  # compose: an image with vllm-tune installed
PROXY_FORMATS = ("compose", "systemd")  # the formats that can write the proxy
FORMATS = ("shell", "compose", "systemd", "kubernetes", "helm", "litellm", "router", "ray")


def memory_comment(plan: DeploymentPlan, prefix: str = "# ") -> str:
    """The plan's per-GPU tables and per-instance numbers as comment lines."""
    source = sorted({i.cost.source for i in plan.instances})
    lines = [
        f"vllm-tune plan for deployment {plan.deployment.name!r} (memory numbers: {', '.join(source)})",
        "",
    ]
    for phase in plan.phases:
        for budget in plan.budgets(phase):
            if budget.rows:
                lines += render_budget(budget) + [""]
    return "\n".join((prefix + line).rstrip() for line in lines).rstrip() + "\n"


def instance_comment(inst: Instance) -> str:
    return (
        f"{inst.name}: GPU {','.join(map(str, inst.gpu_ids))}, weights {gib(inst.cost.weights_bytes)} GiB, "
        f"KV {gib(inst.kv_bytes)} GiB ({inst.kv_tokens:,} tokens), {inst.max_model_len} tokens x "
        f"{inst.max_num_seqs} seqs, holds {gib(inst.footprint_bytes)} GiB per GPU, util "
        f"{inst.gpu_memory_utilization:.2f} (free at its start {gib(inst.free_at_start_bytes)} GiB)"
    )


def _unit(plan: DeploymentPlan, inst: Instance) -> str:
    return f"vllm-{plan.deployment.name}-{inst.name}"


def _ordered(plan: DeploymentPlan) -> list[Instance]:
    """All instances: always-on first, then each phase in order."""
    seen: list[Instance] = []
    for phase in plan.phases:
        for inst in plan.resident(phase):
            if inst not in seen:
                seen.append(inst)
    return seen


def proxy_argv(urls: list[str], port: int) -> list[str]:
    """``vllm-tune proxy URL... --host 0.0.0.0 --port PORT`` (after the command itself)."""
    return ["proxy", *urls, "--host", "0.0.0.0", "--port", str(port)]


def _argv(inst: Instance, *, ray: bool = False) -> list[str]:
    argv = inst.serve_args()
    if ray:
        argv += ["--distributed-executor-backend", "ray"]
    return argv


# --------------------------------------------------------------------------------------------------- shell


def emit_shell(
    plan: DeploymentPlan, *, vllm_cmd: str = "vllm", log_dir: str = "logs", ray: bool = False
) -> dict[str, str]:
    name = plan.deployment.name
    lines = [
        "#!/usr/bin/env bash",
        f"# Start deployment {name!r}: one vLLM after another, each only after the",
        "# previous one answers /health and GPU memory has settled.",
        "#",
        memory_comment(plan).rstrip(),
        "set -euo pipefail",
        f'LOG_DIR="${{LOG_DIR:-{log_dir}}}"',
        'mkdir -p "$LOG_DIR"',
        "",
        "wait_healthy() {  # name port pid",
        f"  local deadline=$((SECONDS + {HEALTH_TIMEOUT_S}))",
        '  until curl -fsS "http://127.0.0.1:$2/health" >/dev/null 2>&1; do',
        '    if ! kill -0 "$3" 2>/dev/null; then echo "$1 exited; see $LOG_DIR/$1.log" >&2; exit 1; fi',
        '    if (( SECONDS > deadline )); then echo "$1 not healthy in time" >&2; exit 1; fi',
        "    sleep 2",
        "  done",
        f"  sleep {SETTLE_S}  # let its GPU memory settle before the next one starts",
        '  echo "$1 is up on port $2 (pid $3)"',
        "}",
        "",
        "stop_instance() {  # name",
        '  local pidfile="$LOG_DIR/$1.pid"',
        '  [[ -f "$pidfile" ]] || return 0',
        '  local pgid; pgid="$(cat "$pidfile")"',
        '  kill -TERM -- "-$pgid" 2>/dev/null || true',
        '  for _ in $(seq 60); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 1; done',
        '  kill -KILL -- "-$pgid" 2>/dev/null || true',
        '  rm -f "$pidfile"',
        "}",
        "",
    ]
    if ray:
        lines += _ray_preamble(plan)
    for inst in _ordered(plan):
        command = shell_command(_argv(inst, ray=ray), vllm_cmd=vllm_cmd)
        if ray:
            # the deployment's GPU ids span the nodes; this script runs on the head node, where only
            # its own devices exist (Ray gives the other nodes' workers theirs)
            head = _nodes(plan)[0].get(inst.name, [])
            visible = f"CUDA_VISIBLE_DEVICES={','.join(map(str, head))} " if head else ""
        else:
            visible = f"CUDA_VISIBLE_DEVICES={','.join(map(str, inst.gpu_ids))} "
        lines += [
            f"start_{_ident(inst.name)}() {{",
            f"  # {instance_comment(inst)}",
            *([f"  # {_placement_comment(plan, inst)}"] if ray else []),
            f"  {visible}setsid {command} \\",
            f'    >"$LOG_DIR/{inst.name}.log" 2>&1 &',
            f'  echo $! >"$LOG_DIR/{inst.name}.pid"',
            f"  wait_healthy {inst.name} {inst.port} $!",
            "}",
            "",
        ]
    lines += _shell_phases(plan)
    return {f"{name}.sh": "\n".join(lines) + "\n"}


def _shell_phases(plan: DeploymentPlan) -> list[str]:
    always = [i for i in _ordered(plan) if i.phase is None]
    lines = ["start_always() {"] + [f"  start_{_ident(i.name)}" for i in always] + ["  :", "}", ""]
    if not plan.deployment.phases:
        return lines + [
            'case "${1:-up}" in',
            "  up) start_always ;;",
            "  down) " + "; ".join(f"stop_instance {i.name}" for i in reversed(always)) + " ;;",
            '  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;',
            "esac",
        ]
    cooldown = int(round(plan.deployment.cooldown_s))
    cases = []
    for phase in plan.deployment.phases:
        members = [i for i in _ordered(plan) if i.phase == phase]
        others = [i for i in _ordered(plan) if i.phase not in (None, phase)]
        lines += [f"phase_{_ident(phase)}() {{  # unload the other phases, cool down, load {phase}"]
        lines += [f"  stop_instance {i.name}" for i in others]
        lines += [f"  sleep {cooldown}"] + [f"  start_{_ident(i.name)}" for i in members] + ["}", ""]
        cases.append(f"  {phase}) phase_{_ident(phase)} ;;")
    first = plan.deployment.phases[0]
    stop_all = "; ".join(f"stop_instance {i.name}" for i in reversed(_ordered(plan)))
    return lines + [
        'case "${1:-up}" in',
        f"  up) start_always; phase_{_ident(first)} ;;",
        *cases,
        f"  down) {stop_all} ;;",
        f'  *) echo "usage: $0 [up|down|{"|".join(plan.deployment.phases)}]" >&2; exit 2 ;;',
        "esac",
    ]


def _hosts(plan: DeploymentPlan) -> tuple[str, ...]:
    return plan.deployment.hosts or ("head-node",)


def _per_node(plan: DeploymentPlan) -> int:
    """GPUs per node: the deployment's GPUs split evenly over ``hosts``, in order."""
    return max(1, -(-len(plan.gpus) // len(_hosts(plan))))


def _node_gpus(plan: DeploymentPlan) -> list[list[int]]:
    """Per host, the device indices on that host of the deployment's GPUs there: on several hosts the
    plan's GPUs in order, ``_per_node`` of them per host (GPU 8 of a 16-GPU plan on two hosts is GPU 0
    of the second)."""
    if len(_hosts(plan)) == 1:
        return [[g.id for g in plan.gpus]]  # one machine: the plan's ids are its devices
    per = _per_node(plan)
    return [list(range(len(plan.gpus[k * per : (k + 1) * per]))) for k in range(len(_hosts(plan)))]


def _nodes(plan: DeploymentPlan) -> list[dict[str, list[int]]]:
    """Per host, each instance's device indices on that host."""
    per = _per_node(plan)
    position = {g.id: n for n, g in enumerate(plan.gpus)}
    out: list[dict[str, list[int]]] = [{} for _ in _hosts(plan)]
    for inst in _ordered(plan):
        for g in inst.gpu_ids:
            node, local = divmod(position[g], per) if len(out) > 1 else (0, g)
            out[min(node, len(out) - 1)].setdefault(inst.name, []).append(local)
    return out


def _placement_comment(plan: DeploymentPlan, inst: Instance) -> str:
    hosts = _hosts(plan)
    parts = [
        f"{hosts[k]} GPU {','.join(map(str, node[inst.name]))}"
        for k, node in enumerate(_nodes(plan))
        if inst.name in node
    ]
    return "on " + "; ".join(parts)


def _ray_preamble(plan: DeploymentPlan) -> list[str]:
    hosts = _hosts(plan)
    head = hosts[0]
    gpus = _node_gpus(plan)

    def start(k: int, args: str) -> str:
        ids = ",".join(map(str, gpus[k]))
        return f"CUDA_VISIBLE_DEVICES={ids} ray start {args} --num-gpus {len(gpus[k])}"

    lines = [
        "# Multi-node: vLLM's Ray executor spreads pipeline stages across the nodes of one Ray cluster.",
        f"# The deployment's {len(plan.gpus)} GPU(s) are {_per_node(plan)} per node, in order of hosts:",
        f"# GPU i of the plan is GPU i mod {_per_node(plan)} of host i div {_per_node(plan)}.",
        f"# On the head node ({head}):   {start(0, '--head --port 6379')}",
    ]
    lines += [f"# On {h}:   {start(k, f'--address {head}:6379')}" for k, h in enumerate(hosts) if k]
    lines += [
        'ray status >/dev/null 2>&1 || { echo "start the Ray cluster first (ray start --head)" >&2; exit 1; }',
        "",
    ]
    return lines


def _ident(name: str) -> str:
    return name.replace("-", "_")


# ------------------------------------------------------------------------------------------------- compose


def local_model_dir(inst: Instance) -> str | None:
    """The absolute path of the instance's model when it is a folder on this machine, else None (an HF
    id or a bundled profile). Judged from how it is written: absolute, ``./``, ``../``, ``~``, or more
    than one ``/`` (``org/name`` is an HF id; write ``./models/name`` for a relative folder)."""
    for model in (inst.entry.model, inst.config.model):  # as the file wrote it, then as resolved
        if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
            return os.path.abspath(os.path.expanduser(model))
    return None


def emit_compose(
    plan: DeploymentPlan, *, image: str = DEFAULT_IMAGE, proxy_port: int | None = None
) -> dict[str, str]:
    services: dict[str, dict[str, Any]] = {}
    previous: str | None = None
    for inst in _ordered(plan):
        command = _argv(inst)[1:]
        volumes = ["${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface"]
        local = local_model_dir(inst)
        if local is not None:
            # a folder on the host: mounted read-only at the same absolute path, which the command names
            volumes.append(f"{local}:{local}:ro")
            if command[0] != local:
                command[0] = local
                if not inst.entry.served_model_name:  # clients keep the name a local `up` serves
                    command += ["--served-model-name", inst.public_name]
        service: dict[str, Any] = {
            "image": image,
            "entrypoint": ["vllm", "serve"],
            "command": command,
            "ports": [f"{inst.port}:{inst.port}"],
            "ipc": "host",
            "volumes": volumes,
            "environment": {"HF_TOKEN": "${HF_TOKEN:-}", **dict(inst.entry.env)},
            "deploy": {
                "resources": {
                    "reservations": {
                        "devices": [
                            {
                                "driver": "nvidia",
                                "device_ids": [str(g) for g in inst.gpu_ids],
                                "capabilities": ["gpu"],
                            }
                        ]
                    }
                }
            },
            "healthcheck": {
                "test": [
                    "CMD",
                    "python3",
                    "-c",
                    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{inst.port}/health')",
                ],
                "interval": "10s",
                "timeout": "5s",
                "retries": 3,
                "start_period": f"{HEALTH_TIMEOUT_S}s",
            },
            "restart": "unless-stopped",
            "labels": {
                "vllm-tune.deployment": plan.deployment.name,
                "vllm-tune.kv-cache-memory-bytes": str(inst.kv_bytes),
                "vllm-tune.footprint-bytes": str(inst.footprint_bytes),
            },
        }
        if inst.phase is not None:
            service["profiles"] = [inst.phase]
        elif previous is not None:
            service["depends_on"] = {previous: {"condition": "service_healthy"}}
        if inst.phase is None:
            previous = inst.name
        services[inst.name] = service
    header = memory_comment(plan) + "".join(f"# {instance_comment(i)}\n" for i in _ordered(plan))
    if plan.deployment.phases:
        header += "# Phases are compose profiles: `docker compose --profile <phase> up -d` after stopping the last.\n"
    if proxy_port is not None:
        services[PROXY_SERVICE] = _compose_proxy(plan, proxy_port)
        header += (
            f"# {PROXY_SERVICE}: one OpenAI endpoint for every model on port {proxy_port}, started once they\n"
            "# are healthy; its image needs vllm-tune installed (set VLLM_TUNE_IMAGE, e.g. an image built\n"
            "# FROM python:3.12-slim with `pip install vllm-tune`).\n"
        )
    body = yaml.safe_dump({"name": plan.deployment.name, "services": services}, sort_keys=False, width=200)
    return {"compose.yaml": header + body}


PROXY_SERVICE = "vllm-tune-proxy"


def _compose_proxy(plan: DeploymentPlan, port: int) -> dict[str, Any]:
    """The proxy's service: reaches each instance by its service name, after every one is healthy."""
    urls = [f"http://{inst.name}:{inst.port}" for inst in _ordered(plan)]
    return {
        "image": PROXY_IMAGE,
        "entrypoint": ["vllm-tune"],
        "command": proxy_argv(urls, port),
        "ports": [f"{port}:{port}"],
        "depends_on": {inst.name: {"condition": "service_healthy"} for inst in _ordered(plan)},
        "healthcheck": {
            "test": [
                "CMD",
                "python3",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health')",
            ],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
        },
        "restart": "unless-stopped",
        "labels": {"vllm-tune.deployment": plan.deployment.name},
    }


# ------------------------------------------------------------------------------------------------- systemd


def emit_systemd(
    plan: DeploymentPlan,
    *,
    vllm_cmd: str = "/usr/local/bin/vllm",
    user: str = "vllm",
    proxy_port: int | None = None,
    vllm_tune_cmd: str = "/usr/local/bin/vllm-tune",
) -> dict[str, str]:
    files: dict[str, str] = {}
    previous: str | None = None
    always = [i for i in _ordered(plan) if i.phase is None]
    for inst in _ordered(plan):
        unit = _unit(plan, inst)
        after = (
            f"After=network-online.target {previous}.service"
            if previous and inst.phase is None
            else "After=network-online.target"
        )
        conflicts = [f"{_unit(plan, o)}.service" for o in _ordered(plan) if o.phase not in (None, inst.phase)]
        env = " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in [("CUDA_VISIBLE_DEVICES", ",".join(map(str, inst.gpu_ids))), *inst.entry.env]
        )
        wait = (
            f"/bin/bash -c 'for i in $(seq {HEALTH_TIMEOUT_S // 2}); do curl -fsS "
            f"http://127.0.0.1:{inst.port}/health >/dev/null && sleep {SETTLE_S} && exit 0; sleep 2; done; exit 1'"
        )
        lines = [
            memory_comment(plan).rstrip(),
            f"# {instance_comment(inst)}",
            "[Unit]",
            f"Description=vLLM {inst.name} ({inst.entry.model}) of deployment {plan.deployment.name}",
            after,
            "Wants=network-online.target",
        ]
        if previous and inst.phase is None:
            lines.append(f"Requires={previous}.service")
        if conflicts:
            lines.append("Conflicts=" + " ".join(conflicts))
        lines += [
            "",
            "[Service]",
            "Type=exec",
            f"User={user}",
            f"Environment={env}",
            "ExecStart=" + shell_command(inst.serve_args(), vllm_cmd=vllm_cmd),
            f"ExecStartPost={wait}",
            f"TimeoutStartSec={HEALTH_TIMEOUT_S + 60}",
            "KillMode=control-group",
            "TimeoutStopSec=60",
            "Restart=on-failure",
            "RestartSec=30",
            "",
            "[Install]",
            f"WantedBy={plan.deployment.name}.target"
            if inst.phase is None
            else f"WantedBy=vllm-{plan.deployment.name}-{inst.phase}.target",
        ]
        files[f"{unit}.service"] = "\n".join(lines) + "\n"
        if inst.phase is None:
            previous = unit
    wanted = [f"{_unit(plan, i)}.service" for i in always]
    if proxy_port is not None:
        proxy_unit = f"vllm-{plan.deployment.name}-proxy.service"
        files[proxy_unit] = _systemd_proxy(plan, proxy_port, vllm_tune_cmd=vllm_tune_cmd, user=user)
        wanted.append(proxy_unit)
    files[f"{plan.deployment.name}.target"] = (
        "\n".join(
            [
                f"# Starts every always-on model of {plan.deployment.name}, in order.",
                "[Unit]",
                f"Description=vLLM deployment {plan.deployment.name}",
                "Wants=" + " ".join(wanted),
                "",
                "[Install]",
                "WantedBy=multi-user.target",
            ]
        )
        + "\n"
    )
    for phase in plan.deployment.phases:
        members = [i for i in _ordered(plan) if i.phase == phase]
        files[f"vllm-{plan.deployment.name}-{phase}.target"] = (
            "\n".join(
                [
                    f"# Phase {phase}: `systemctl start vllm-{plan.deployment.name}-{phase}.target` (stops other phases).",
                    "[Unit]",
                    f"Description=vLLM deployment {plan.deployment.name}, phase {phase}",
                    "Wants=" + " ".join(f"{_unit(plan, i)}.service" for i in members),
                ]
            )
            + "\n"
        )
    return files


def _systemd_proxy(plan: DeploymentPlan, port: int, *, vllm_tune_cmd: str, user: str) -> str:
    """The proxy's unit: started after every model's unit (whose start waits for its /health)."""
    models = " ".join(f"{_unit(plan, i)}.service" for i in _ordered(plan))
    urls = [f"http://127.0.0.1:{inst.port}" for inst in _ordered(plan)]
    lines = [
        f"# One OpenAI endpoint for every model of {plan.deployment.name} on port {port} (vllm-tune proxy).",
        "[Unit]",
        f"Description=vllm-tune proxy of deployment {plan.deployment.name}",
        f"After=network-online.target {models}",
        f"Requires={models}",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        "ExecStart=" + shlex.join([vllm_tune_cmd, *proxy_argv(urls, port)]),
        "KillMode=control-group",
        "TimeoutStopSec=30",
        "Restart=on-failure",
        "RestartSec=10",
        "",
        "[Install]",
        f"WantedBy={plan.deployment.name}.target",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- kubernetes


def emit_kubernetes(
    plan: DeploymentPlan, *, image: str = DEFAULT_IMAGE, namespace: str | None = None
) -> dict[str, str]:
    docs: list[dict[str, Any]] = []
    previous: Instance | None = None
    for inst in _ordered(plan):
        docs += [
            _k8s_deployment(plan, inst, image, namespace, previous if inst.phase is None else None),
            _k8s_service(plan, inst, namespace),
        ]
        if inst.phase is None:
            previous = inst
    header = memory_comment(plan) + (
        "# Instances that share a GPU need GPU sharing in the NVIDIA device plugin (time-slicing or MPS),\n"
        "# so that each pod's nvidia.com/gpu: 1 can land on the same card; the absolute KV budgets above\n"
        "# keep them within the plan. Each waits (initContainer) for the previous one's /health.\n"
    )
    body = yaml.safe_dump_all(docs, sort_keys=False, width=200)
    return {f"{plan.deployment.name}-k8s.yaml": header + body}


def _k8s_name(plan: DeploymentPlan, inst: Instance) -> str:
    return f"{plan.deployment.name}-{inst.name}"[:63].rstrip("-")


def _meta(plan: DeploymentPlan, inst: Instance, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": _k8s_name(plan, inst),
        "labels": {"app.kubernetes.io/part-of": plan.deployment.name, "app.kubernetes.io/name": inst.name},
        "annotations": {"vllm-tune/memory": instance_comment(inst)},
    }
    if namespace:
        meta["namespace"] = namespace
    return meta


def _k8s_deployment(
    plan: DeploymentPlan, inst: Instance, image: str, namespace: str | None, previous: Instance | None
) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/health", "port": inst.port}, "periodSeconds": 10}
    container = {
        "name": "vllm",
        "image": image,
        "command": ["vllm", "serve"],
        "args": _argv(inst)[1:],
        "ports": [{"name": "http", "containerPort": inst.port}],
        "env": [{"name": k, "value": v} for k, v in inst.entry.env],
        "resources": {"limits": {"nvidia.com/gpu": inst.entry.world_size}},
        "startupProbe": {**probe, "failureThreshold": HEALTH_TIMEOUT_S // 10},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "failureThreshold": 3},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
    }
    if previous is not None:
        target = f"http://{_k8s_name(plan, previous)}:{previous.port}/health"
        spec["initContainers"] = [
            {
                "name": "wait-for-previous",
                "image": "busybox:1.36",
                "command": [
                    "sh",
                    "-c",
                    f"until wget -q -O /dev/null {target}; do sleep 5; done; sleep {SETTLE_S}",
                ],
            }
        ]
    labels = {"app.kubernetes.io/name": inst.name, "app.kubernetes.io/part-of": plan.deployment.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(plan, inst, namespace),
        "spec": {
            "replicas": 0 if inst.phase and inst.phase != plan.phases[0] else 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def _k8s_service(plan: DeploymentPlan, inst: Instance, namespace: str | None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(plan, inst, namespace),
        "spec": {
            "selector": {
                "app.kubernetes.io/name": inst.name,
                "app.kubernetes.io/part-of": plan.deployment.name,
            },
            "ports": [{"name": "http", "port": inst.port, "targetPort": inst.port}],
        },
    }


def emit_helm_values(plan: DeploymentPlan, *, image: str = DEFAULT_IMAGE) -> dict[str, str]:
    """Values for the vLLM production-stack Helm chart (``servingEngineSpec.modelSpec``) and its router."""
    repository, _, tag = image.partition(":")
    specs = []
    for inst in _ordered(plan):
        extra = ["--kv-cache-memory-bytes", str(inst.kv_bytes)]
        if inst.entry.kv_cache_dtype != "auto":
            extra += ["--kv-cache-dtype", inst.entry.kv_cache_dtype]
        extra += list(inst.config.extra_args)
        specs.append(
            {
                "name": inst.name,
                "repository": repository,
                "tag": tag or "latest",
                "modelURL": inst.config.model,
                "replicaCount": 1,
                "requestCPU": 4,
                "requestMemory": "16Gi",
                "requestGPU": inst.entry.world_size,
                "vllmConfig": {
                    "maxModelLen": inst.max_model_len,
                    "maxNumSeqs": inst.max_num_seqs,
                    "tensorParallelSize": inst.entry.tensor_parallel_size,
                    "gpuMemoryUtilization": inst.gpu_memory_utilization,
                    "extraArgs": extra,
                },
            }
        )
    values = {
        "servingEngineSpec": {"runtimeClassName": "nvidia", "modelSpec": specs},
        "routerSpec": {"routingLogic": "roundrobin"},
    }
    header = memory_comment(plan) + "".join(f"# {instance_comment(i)}\n" for i in _ordered(plan))
    return {"values.yaml": header + yaml.safe_dump(values, sort_keys=False, width=200)}


# ------------------------------------------------------------------------------------------------- routers


def emit_litellm(plan: DeploymentPlan, *, host: str = "127.0.0.1") -> dict[str, str]:
    """A LiteLLM proxy ``config.yaml``: one endpoint, routed by model name to the plan's instances."""
    model_list = [
        {
            "model_name": inst.name,
            "litellm_params": {
                "model": f"hosted_vllm/{inst.public_name}",
                "api_base": f"http://{host}:{inst.port}/v1",
            },
            "model_info": {"max_input_tokens": inst.max_model_len},
        }
        for inst in _ordered(plan)
    ]
    header = memory_comment(plan) + "# Run: litellm --config config.yaml --port 4000\n"
    return {"config.yaml": header + yaml.safe_dump({"model_list": model_list}, sort_keys=False, width=200)}


def _model_type(inst: Instance) -> str:
    role = inst.entry.role.lower()
    if "embed" in role:
        return "embeddings"
    if "rerank" in role:
        return "rerank"
    return "chat"


def emit_router(plan: DeploymentPlan, *, host: str = "127.0.0.1", port: int = 8000) -> dict[str, str]:
    """The vLLM production-stack router with static backends, as a start script."""
    insts = _ordered(plan)
    argv = [
        "vllm-router",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--service-discovery",
        "static",
        "--static-backends",
        ",".join(f"http://{host}:{i.port}" for i in insts),
        "--static-models",
        ",".join(i.public_name for i in insts),
        "--static-model-types",
        ",".join(_model_type(i) for i in insts),
        "--routing-logic",
        "roundrobin",
    ]
    text = (
        "#!/usr/bin/env bash\n"
        + memory_comment(plan)
        + "set -euo pipefail\nexec "
        + " \\\n  ".join(
            [shlex.quote(argv[0])] + [f"{argv[i]} {shlex.quote(argv[i + 1])}" for i in range(1, len(argv), 2)]
        )
        + "\n"
    )
    return {f"{plan.deployment.name}-router.sh": text}


def emit_ray(plan: DeploymentPlan, *, vllm_cmd: str = "vllm") -> dict[str, str]:
    return emit_shell(plan, vllm_cmd=vllm_cmd, ray=True)


EMITTERS: dict[str, Callable[..., dict[str, str]]] = {
    "shell": emit_shell,
    "compose": emit_compose,
    "systemd": emit_systemd,
    "kubernetes": emit_kubernetes,
    "helm": emit_helm_values,
    "litellm": emit_litellm,
    "router": emit_router,
    "ray": emit_ray,
}


def emit(plan: DeploymentPlan, fmt: str, **options: object) -> dict[str, str]:
    """``{filename: text}`` for one format of :data:`FORMATS`."""
    return EMITTERS[fmt](plan, **options)


def as_json(files: dict[str, str]) -> str:
    return json.dumps(files, indent=2)
