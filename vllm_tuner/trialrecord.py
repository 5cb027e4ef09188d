"""One trial as the store keeps it, and the machine it ran on: ``find`` and ``ramp`` record, resume and
recognise past trials through here.

A trial's flags are stored as :func:`config_record` and read back onto the request's base config with
:func:`config_from_record`; :func:`outcome_from_record` is a stored trial as the outcome it was (its
probe's failure and headroom included). :func:`env_fingerprint` says on what a stored outcome holds:
the model and its weights, the GPUs (or NUMA nodes), vLLM's version and the machine (driver and device
UUIDs); a past failure applies only where the fingerprint is the same. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .hashkey import stable_key
from .probe import LoadReport
from .serveconfig import ServeConfig
from .trial import TrialOutcome


def config_record(cfg: ServeConfig) -> dict:
    return {
        "model": cfg.model,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "enforce_eager": cfg.enforce_eager,
        "cpu_offload_gb": cfg.cpu_offload_gb,
        "kv_offloading_size": cfg.kv_offloading_size,
        "load_format": cfg.load_format,
        **({"hf_overrides": cfg.hf_overrides} if cfg.hf_overrides else {}),
        "extra_args": list(cfg.extra_args),
    }


def probe_record(t: TrialOutcome) -> dict | None:
    """What the store keeps of a trial's load probe (None: no probe ran): its verdict, the headroom,
    preemptions, death, latency and the peak memory per device."""
    if t.probe is None:
        return None
    p = t.probe
    return {
        "ok": t.verdict == "stable",
        "failure": t.probe_failure,
        "min_headroom_bytes": t.min_headroom_bytes,
        "preemptions": getattr(p, "preemptions", None),
        "server_died": getattr(p, "server_died", None),
        "latency_p50_s": getattr(p, "latency_p50_s", None),
        "latency_p99_s": getattr(p, "latency_p99_s", None),
        "peak_used_bytes": {str(k): v for k, v in (getattr(p, "peak_used_bytes", {}) or {}).items()},
    }


def config_from_record(base: ServeConfig, rec) -> ServeConfig:
    data = dict(rec.config)
    data["extra_args"] = tuple(data.get("extra_args") or ())
    return base.replace(**{k: v for k, v in data.items() if hasattr(base, k)})


def outcome_from_record(cfg: ServeConfig, rec) -> TrialOutcome:
    """A stored trial as the outcome it was: its probe's failure and headroom included, so that the
    result explains a skipped or resumed trial as it explained the launched one."""
    p = rec.probe or {}
    report = None
    if rec.probe:
        left = p.get("min_headroom_bytes")
        report = LoadReport(
            ok=rec.verdict == "stable",
            server_died=bool(p.get("server_died")),
            headroom_bytes={0: left} if left is not None else {},
            peak_used_bytes={int(k): v for k, v in (p.get("peak_used_bytes") or {}).items()},
            preemptions=p.get("preemptions") or 0,
        )
    return TrialOutcome(
        cfg,
        rec.category,
        rec.verdict,
        dict(rec.facts or {}),
        probe=report,
        log_path=Path(rec.log_path) if rec.log_path else None,
        duration_s=rec.duration_s or 0.0,
        probe_failure=p.get("failure") or "",
    )


def env_parts(spec, gpu, gpu_ids: Sequence[int], vllm_info) -> dict:
    """The environment a trial's outcome depends on besides its flags: the model, its weights, the GPUs
    and the vLLM version. find and ramp each fingerprint these with their own machine parts."""
    return {
        "model": spec.serve_name,
        "weights": getattr(spec, "weights_bytes", None),
        "gpus": [getattr(gpu, "name", ""), gpu.total_bytes, list(gpu_ids)],
        "vllm": getattr(vllm_info, "version", ""),
    }


def env_fingerprint(spec, gpu, gpu_ids: Sequence[int], vllm_info, machine_id: str = "") -> str:
    """Sixteen hex digits of :func:`env_parts` and the machine id (``driver|uuid,uuid``; "" where no
    memory reader knows the devices). Stored runs resume and past failures are recognised by this exact
    string: its JSON form is the one the first release hashed."""
    parts = {**env_parts(spec, gpu, gpu_ids, vllm_info), "machine": machine_id}
    return stable_key(parts, compact=False)
