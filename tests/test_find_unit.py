"""Finder's pure wiring: what the installed vLLM accepts shapes the ladder (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_tuner.errors import VllmError
from vllm_tuner.estimate import Calibration, estimate
from vllm_tuner.find import Finder, FindRequest
from vllm_tuner.gpus import GpuTarget
from vllm_tuner.launch import VllmInfo
from vllm_tuner.models import resolve_model
from vllm_tuner.progress import QuietProgress

GIB = 1 << 30
ALL = frozenset(
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


def finder(
    flags: frozenset[str], allow=frozenset({"eager", "fp8-kv", "offload"}), free=None, machine_id=""
) -> Finder:
    gpu = GpuTarget(ids=(0,), name="NVIDIA GeForce RTX 4090", total_bytes=int(23.53 * GIB), free_bytes=free)
    req = FindRequest(model="qwen2.5-7b", gpu_ids=(0,), tensor_parallel_size=1, allow=allow)
    return Finder(
        req,
        spec=resolve_model("qwen2.5-7b"),
        gpu=gpu,
        estimate_fn=estimate,
        calibrate_fn=Calibration.from_facts,
        vllm_info=VllmInfo("0.33.0", flags),
        launcher=None,
        nvml=None,
        store=None,
        progress=QuietProgress(),
        log_dir=Path("."),
        machine_id=machine_id,
    )


def test_a_vllm_without_the_core_flags_is_refused_with_the_fix():
    with pytest.raises(VllmError, match="does not accept --max-model-len"):
        finder(ALL - {"--max-model-len"})


def test_lossy_rungs_the_installed_vllm_cannot_express_are_dropped():
    assert finder(ALL).policy.request.allow == {"eager", "fp8-kv", "offload"}
    trimmed = finder(ALL - {"--cpu-offload-gb", "--enforce-eager"}).policy.request
    assert trimmed.allow == {"fp8-kv"} and trimmed.offload_flag is None


def test_memory_held_by_others_caps_the_first_utilization():
    busy = finder(ALL, free=(int(20 * GIB),))
    first = busy.policy.next([])
    assert first.config.gpu_memory_utilization <= (20 - 0.25) / 23.53


def test_the_environment_fingerprint_is_pinned():
    """Stored runs resume, and past trials apply, by this exact string: it must not drift."""
    assert finder(ALL).env_fingerprint() == "dc6e13d814c55afe"
    assert finder(ALL, machine_id="580.65|GPU-abc").env_fingerprint() == "56218a24ec8c5e6b"


def test_the_utilization_floor_reaches_the_policy_and_only_a_changed_one_changes_the_key():
    base = FindRequest(model="m", gpu_ids=(0,), tensor_parallel_size=1)
    low = FindRequest(model="m", gpu_ids=(0,), tensor_parallel_size=1, util_floor=0.05)
    assert "util_floor" not in base.as_dict()  # stored runs of before keep resuming by their key
    assert low.key() != base.key() and low.as_dict()["util_floor"] == 0.05
    f = finder(ALL)
    f2 = Finder(
        FindRequest(model="qwen2.5-7b", gpu_ids=(0,), tensor_parallel_size=1, util_floor=0.05),
        spec=f.spec,
        gpu=f.gpu,
        estimate_fn=estimate,
        calibrate_fn=Calibration.from_facts,
        vllm_info=f.vllm_info,
        launcher=None,
        nvml=None,
        store=None,
        progress=QuietProgress(),
        log_dir=Path("."),
    )
    assert f.policy.request.util_floor == 0.50 and f2.policy.request.util_floor == 0.05


def test_a_known_trial_is_reused_by_why_it_failed():
    from types import SimpleNamespace

    from vllm_tuner.find.loop import _known_failure
    from vllm_tuner.serveconfig import ServeConfig

    cfg = ServeConfig(model="m", max_model_len=4096, max_num_seqs=8, gpu_memory_utilization=0.95)

    def rec(verdict, failure="", left=None, category="success"):
        probe = (
            {"failure": failure, "min_headroom_bytes": left, "server_died": False}
            if verdict != "failed"
            else None
        )
        return SimpleNamespace(
            verdict=verdict, category=category, probe=probe, facts={}, log_path=None, duration_s=9.0
        )

    errors = _known_failure(cfg, rec("unstable", "3 request(s) failed under load", 3 * GIB), GIB)
    assert errors is not None and errors.verdict == "unstable" and errors.duration_s == 0.0
    short = rec(
        "unstable", "GPU 0 had 0.61 GiB headroom under load, below the 1.00 GiB required", int(0.61 * GIB)
    )
    assert _known_failure(cfg, short, GIB) is not None
    assert _known_failure(cfg, short, GIB // 2) is None  # enough under a smaller headroom: launch it again
    stable = rec("stable", "", int(1.2 * GIB))
    assert _known_failure(cfg, stable, GIB) is None
    assert "below the 1.50 GiB required" in _known_failure(cfg, stable, int(1.5 * GIB)).probe_failure
    assert _known_failure(cfg, rec("failed", category="oom_cudagraph_capture"), GIB).verdict == "failed"
    assert _known_failure(cfg, rec("failed", category="startup_timeout"), GIB) is None  # transient


def test_runtime_finder_builds_the_finder_with_its_run_folder(tmp_path):
    """The folder of a request's trial logs (its key and environment fingerprint) is given to the
    Finder it builds, not patched in afterwards."""
    from vllm_tuner.commands._common import Runtime, find_run_dir, runtime_finder

    built = finder(ALL)
    runtime = Runtime(
        launcher=None, db_path=tmp_path / "db", json=True, progress=QuietProgress(), log_root=tmp_path
    )
    wired = runtime_finder(
        built.request,
        spec=built.spec,
        gpu=built.gpu,
        runtime=runtime,
        nvml=None,
        store=None,
        vllm_info=built.vllm_info,
    )
    assert wired.env_fingerprint() == "dc6e13d814c55afe"
    assert (
        wired.log_dir
        == find_run_dir(runtime, built.request, "dc6e13d814c55afe")
        == tmp_path / (f"find-{built.request.key()}-dc6e13d8")
    )
