"""``find --dry-run`` on ``--device cpu``: the knobs the CPU backend lacks are skipped, with why, and a
device is a NUMA node; the search policy names devices by the unit it is given (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tuner.commands.find import _print_dry_run
from vllm_tuner.devices import CPU
from vllm_tuner.estimate import Calibration, estimate
from vllm_tuner.find import Finder, FindRequest
from vllm_tuner.gpus import GpuTarget
from vllm_tuner.launch import VllmInfo
from vllm_tuner.models import resolve_model
from vllm_tuner.progress import QuietProgress
from vllm_tuner.search import Observation, Policy, Request
from vllm_tuner.serveconfig import ServeConfig

GIB = 1 << 30
FLAGS = frozenset(
    {
        "--max-model-len",
        "--max-num-seqs",
        "--gpu-memory-utilization",
        "--tensor-parallel-size",
        "--enforce-eager",
        "--kv-cache-dtype",
        "--cpu-offload-gb",
    }
)


def _finder(device: str, allow: frozenset[str] = frozenset()) -> Finder:
    cpu = device == "cpu"
    gpu = GpuTarget(
        ids=(0,),
        name="AMD EPYC (NUMA node 0)" if cpu else "NVIDIA GeForce RTX 4090",
        total_bytes=int((64 if cpu else 23.53) * GIB),
    )
    req = FindRequest(
        model="qwen2.5-7b",
        gpu_ids=(0,),
        tensor_parallel_size=1,
        allow=allow,
        device=device,
        util_ceiling=CPU.util_ceiling if cpu else 0.95,
        util_floor=CPU.util_floor if cpu else 0.50,
    )
    return Finder(
        req,
        spec=resolve_model("qwen2.5-7b"),
        gpu=gpu,
        estimate_fn=estimate,
        calibrate_fn=Calibration.from_facts,
        vllm_info=VllmInfo("0.32.0", FLAGS),
        launcher=None,
        nvml=None,
        store=None,
        progress=QuietProgress(),
        log_dir=Path("."),
    )


def _dry_run(capsys: pytest.CaptureFixture[str], finder: Finder) -> str:
    _print_dry_run(finder, False)
    return capsys.readouterr().out


def test_cpu_dry_run_lists_the_knobs_it_lacks_as_skipped_with_why(capsys) -> None:
    out = _dry_run(capsys, _finder("cpu"))
    assert f"eager: skipped on cpu ({CPU.missing_knobs['eager']})" in out
    assert f"offload: skipped on cpu ({CPU.missing_knobs['offload']})" in out
    assert "only with --allow eager" not in out and "only with --allow offload" not in out
    assert "fp8-kv: only with --allow fp8-kv" in out  # the CPU has that knob


def test_a_knob_the_cpu_lacks_is_skipped_even_when_allowed(capsys) -> None:
    out = _dry_run(capsys, _finder("cpu", allow=frozenset({"eager", "fp8-kv", "offload"})))
    assert "eager: skipped on cpu (the CPU backend captures no CUDA graphs" in out
    assert "offload: skipped on cpu" in out
    assert "fp8-kv: allowed, used only if needed" in out


def test_cpu_dry_run_speaks_of_numa_nodes_and_no_cuda_graphs(capsys) -> None:
    out = _dry_run(capsys, _finder("cpu"))
    assert "on NUMA node(s) [0] (64.0 GiB each)" in out
    assert "Its estimate per NUMA node: weights" in out
    assert "CUDA graphs" not in out.split("How each knob")[0]
    assert "GPU(s)" not in out and "per GPU" not in out


def test_cpu_dry_run_json_names_the_device_and_the_skipped_knobs(capsys) -> None:
    _print_dry_run(_finder("cpu"), True)
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "cpu"
    assert [s.split(":")[0] for s in plan["ladder"][3:]] == [
        "eager",
        "fp8-kv",
        "offload",
        "kv-cache-memory-bytes",
    ]
    assert plan["ladder"][3].startswith("eager: skipped on cpu (")


def test_cuda_dry_run_is_as_before(capsys) -> None:
    out = _dry_run(capsys, _finder("cuda"))
    assert "on GPU(s) [0] (23.53 GiB each)" in out and "Its estimate per GPU: weights" in out
    assert "CUDA graphs" in out
    assert "eager: only with --allow eager" in out and "skipped" not in out


# --------------------------------------------------------------------------------------------------
# search.py, with plain data


class _Est:
    kv_pool_bytes = 4 * GIB
    kv_bytes_per_token = 1 << 17
    weights_bytes = GIB
    non_kv_bytes = GIB
    cudagraph_bytes = 0

    def max_context(self, seqs: int) -> int:
        return self.kv_pool_bytes // (self.kv_bytes_per_token * seqs)

    def max_seqs(self, context: int) -> int:
        return self.kv_pool_bytes // (self.kv_bytes_per_token * context)


def _policy(**request) -> Policy:
    return Policy(
        Request(**request),
        ServeConfig(model="m"),
        estimate=lambda c, cal: _Est(),
        calibrate=lambda f, c: None,
    )


def test_ladder_marks_skipped_knobs_and_keeps_the_rest() -> None:
    policy = _policy(allow=frozenset({"fp8-kv"}))
    steps = policy.ladder({"eager": "no graphs here"}, "cpu")
    assert steps[3:] == [
        "eager: skipped on cpu (no graphs here)",
        "fp8-kv: allowed, used only if needed",
        "offload: only with --allow offload",
    ]
    assert policy.ladder()[3] == "eager: only with --allow eager"  # no device facts: as before


def test_stop_reasons_name_the_devices_by_their_unit() -> None:
    cfg = ServeConfig(model="m", gpu_memory_utilization=0.3)
    weights = [Observation(cfg, "oom_weights_load")]
    changed = [Observation(cfg, "profiling_memory_changed")] * 2
    node = _policy(device_unit="NUMA node", util_floor=0.02)
    assert node.next(weights).reason == "the weights alone do not fit on the NUMA nodes"
    assert node.next(changed).reason.startswith("another process changed NUMA node memory")
    gpu = _policy()
    assert gpu.next(weights).reason == "the weights alone do not fit on the GPUs"
    assert gpu.next(changed).reason.startswith("another process changed GPU memory")
