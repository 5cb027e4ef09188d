"""``find --device cpu`` on a busy NUMA node, end to end against the simulated vLLM as its CPU backend
(``VLLM_TARGET_DEVICE=cpu``, as the tuner launches it): the node refuses the fraction, and the search
serves from a pool in ``--kv-cache-memory-bytes``, which the simulated CPU worker, like vLLM 0.32's, takes
without that check."""

from __future__ import annotations

import math

from vllm_tuner.devices import CPU
from vllm_tuner.estimate import Calibration, estimate
from vllm_tuner.find import Finder, FindRequest
from vllm_tuner.gpus import resolve_gpus
from vllm_tuner.launch import LocalLauncher, detect_vllm
from vllm_tuner.models import resolve_model
from vllm_tuner.progress import QuietProgress
from vllm_tuner.store import Store

GIB = 1 << 30
MIB = 1 << 20


def _find_on_cpu(env, tmp_path, **request):
    nvml = env.open_nvml()  # the simulator's node, read through its shim
    spec = resolve_model("qwen2.5-7b")
    node = resolve_gpus(gpus=1, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nvml)
    launcher = LocalLauncher(
        env.vllm_cmd, device=CPU, command_env=env.env
    )  # VLLM_TARGET_DEVICE=cpu, CPU_VISIBLE_MEMORY_NODES
    req = FindRequest(model="qwen2.5-7b", gpu_ids=node.ids, tensor_parallel_size=1, device="cpu", **request)
    with Store.open(tmp_path / "t.db") as store:
        return Finder(
            req,
            spec=spec,
            gpu=node,
            estimate_fn=estimate,
            calibrate_fn=Calibration.from_facts,
            vllm_info=detect_vllm(launcher),
            launcher=launcher,
            nvml=nvml,
            store=store,
            progress=QuietProgress(),
            log_dir=tmp_path / "logs",
        ).run()


def test_a_busy_node_refuses_the_fraction_and_find_serves_from_the_goals_pool_in_bytes(sim, tmp_path):
    env = sim("rtx-5090", time_scale=400, foreign=[{"gpu": 0, "gib": 8.0}])  # another process holds 8 GiB
    result = _find_on_cpu(
        env, tmp_path, objective="targets", target_context=8192, target_seqs=4, util_ceiling=0.9
    )
    first, second = result.trials[:2]
    # the fraction capped at what was free still meets vLLM's own processes' memory: refused, with numbers
    assert first.category == "startup_free_memory_below_utilization"
    assert first.config.kv_cache_memory_bytes is None
    log = first.log_path.read_text()
    assert "on startup is less than desired CPU memory utilization" in log
    assert first.facts["free_gib"] < first.config.gpu_memory_utilization * first.facts["total_gib"]
    # the node is as busy as before: the pool the goal needs, in bytes, starts where a fraction would not
    assert second.config.kv_cache_memory_bytes is not None and second.config.gpu_memory_utilization is None
    per_token = 28 * 2 * 4 * 128 * 2  # Qwen2.5-7B: 28 layers, K and V, 4 KV heads of 128, bf16
    need = (4 * math.ceil(8192 / 16) + 1) * 16 * per_token
    assert second.config.kv_cache_memory_bytes == math.ceil(need / MIB) * MIB
    log = second.log_path.read_text()
    assert "on startup is less than" not in log
    assert f"Explicitly set ({round(second.config.kv_cache_memory_bytes / GIB, 2)}/" in log
    assert second.verdict == "stable" and result.stable and result.winner.config == second.config
    command = result.command()
    assert f"--kv-cache-memory-bytes {second.config.kv_cache_memory_bytes}" in command
    assert "--gpu-memory-utilization" not in command and "VLLM_TARGET_DEVICE=cpu" in command
    (line,) = [x for x in result.explanation if x.startswith("--kv-cache-memory-bytes")]
    assert f"had only {first.facts['free_gib']} of {first.facts['total_gib']} GiB free" in line
    assert "--kv-cache-memory-bytes" in result.yaml_text()


def test_a_pool_in_bytes_the_node_does_not_have_once_loaded_is_refused_by_the_cpu_worker(sim, tmp_path):
    # the worker holds 4 GiB the estimate does not know of (its truth): the pool the estimate had room for
    # is more than the node has once the weights are in
    env = sim("rtx-5090", time_scale=400, foreign=[{"gpu": 0, "gib": 8.0}], truth={"non_torch_gib": 4.0})
    result = _find_on_cpu(
        env, tmp_path, objective="targets", target_context=8192, target_seqs=12, util_ceiling=0.9
    )
    in_bytes = [t for t in result.trials if t.config.kv_cache_memory_bytes is not None]
    assert in_bytes and in_bytes[0].category == "startup_free_memory_below_utilization"
    log = in_bytes[0].log_path.read_text()
    assert "on startup is less than" not in log
    assert "on kv cache allocation is less than requested memory for kv (" in log
    # what the node had at allocation (the worker's memory held) is what the next pool is sized in
    assert in_bytes[0].facts["free_gib"] < in_bytes[0].config.kv_cache_memory_bytes / GIB
    assert result.winner is None and len(result.trials) == 2
    assert "free memory (a pool in --kv-cache-memory-bytes)" in result.reason
