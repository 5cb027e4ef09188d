"""What ``find`` is asked and the checks before any launch: :class:`FindRequest`, :func:`validate_request`
(the options), :func:`check_weights_fit` and :func:`check_gpus_free` (the weights against the devices).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import CUDA, DeviceKind, device_kind
from ..errors import GpuError, UsageError
from ..hashkey import stable_key
from ..search import (
    MAX_SEQS,
)
from ..trial import Timeouts
from ..units import GIB

REQUIRED_FLAGS = ("--max-model-len", "--max-num-seqs", "--gpu-memory-utilization", "--tensor-parallel-size")
# The lossy rungs and the flag each needs. Since vLLM 0.18 there is no --swap-space: the "offload"
# rung is weight offload through --cpu-offload-gb (KV offload to CPU does not shrink the GPU pool).
# rope-scaling is a YaRN override (rope.extension) for a context past the model's own length.
LOSSY_FLAGS = {
    "eager": "--enforce-eager",
    "fp8-kv": "--kv-cache-dtype",
    "offload": "--cpu-offload-gb",
    "rope-scaling": "--hf-overrides",
}


@dataclass(frozen=True)
class FindRequest:
    model: str
    gpu_ids: tuple[int, ...]
    tensor_parallel_size: int
    objective: str = "context"
    knob_order: tuple[str, ...] = ()
    min_seqs: int = 1
    min_context: int | None = None
    target_context: int | None = None
    target_seqs: int | None = None
    allow: frozenset[str] = frozenset()
    util_ceiling: float = 0.95
    util_floor: float = 0.50  # below this the search gives up (a share of a shared card may go lower)
    headroom_bytes: int = GIB
    max_launches: int = 12
    time_budget_s: float | None = None
    timeouts: Timeouts = Timeouts()
    probe_duration_s: float | None = None
    dummy_trials: bool = False
    extra_args: tuple[str, ...] = ()
    vllm_cmd: str = "vllm"
    device: str = "cuda"

    @property
    def device_kind(self) -> DeviceKind:
        return device_kind(self.device)

    def key(self) -> str:
        return stable_key(self.as_dict(), compact=False)

    def as_dict(self) -> dict:
        # a field at its old value is left out, so the keys of earlier runs stay the same
        floor = {} if self.util_floor == 0.50 else {"util_floor": self.util_floor}
        device = {} if self.device == "cuda" else {"device": self.device}
        return {
            **floor,
            **device,
            "model": self.model,
            "gpu_ids": list(self.gpu_ids),
            "tp": self.tensor_parallel_size,
            "objective": self.objective,
            "min_seqs": self.min_seqs,
            "min_context": self.min_context,
            "target_context": self.target_context,
            "target_seqs": self.target_seqs,
            "allow": sorted(self.allow),
            "util_ceiling": self.util_ceiling,
            "headroom_bytes": self.headroom_bytes,
            "dummy_trials": self.dummy_trials,
            "extra_args": list(self.extra_args),
        }


def context_guess(kind: DeviceKind) -> int:
    """What find assumes vLLM holds before its free-memory check: half the device's context overhead,
    optimistic on purpose. A first utilization capped too high fails in seconds and vLLM's error then
    says the exact free memory; a refusal before any launch must not refuse what would start."""
    return kind.context_overhead_bytes // 2


def check_weights_fit(spec, total_bytes: int, tp: int, gpu_count: int, kind: DeviceKind = CUDA) -> None:
    """Refuse before any launch when the weights alone cannot fit, and say what would."""
    # room for non-torch, activation and a little KV
    usable = total_bytes * kind.util_ceiling - context_guess(kind) - GIB
    if kind.name == "cpu" and spec.weights_per_gpu(tp) > usable:
        raise GpuError(
            f"the weights alone need {spec.weights_per_gpu(tp) / GIB:.1f} GiB per NUMA node at TP {tp}, "
            f"more than a node's {total_bytes / GIB:.1f} GiB of RAM can give vLLM",
            "use a machine with more memory per node, more nodes (--gpus N), or a smaller or quantized model",
        )
    if spec.weights_per_gpu(tp) <= usable:
        return
    fits = [t for t in spec.tp_sizes() if t >= tp and spec.weights_per_gpu(t) <= usable]
    more = (
        f"{fits[0]} GPUs like these (--gpus {fits[0]}: TP {fits[0]}, the smallest that fits)"
        if fits
        else "more or larger GPUs"
    )
    raise GpuError(
        f"the weights alone need {spec.weights_per_gpu(tp) / GIB:.1f} GiB per GPU at TP {tp}, "
        f"more than a {total_bytes / GIB:.1f} GiB GPU can give after vLLM's overheads",
        f"use {more}, a quantized checkpoint (AWQ/GPTQ/FP8), or --allow offload",
    )


def check_gpus_free(gpu, weights_per_gpu: int, *, gpu_ids, kind: DeviceKind = CUDA) -> None:
    """Refuse early when other processes hold so much memory that not even the weights fit."""
    free = getattr(gpu, "free_bytes", None)
    if not free:
        return
    for idx, f in zip(gpu_ids, free, strict=False):
        if gpu.total_bytes - f < GIB and not kind.process_bytes:
            continue  # next to nothing held by others: whether the weights fit is not theirs to answer
        if kind.process_bytes and f < weights_per_gpu + kind.process_bytes:
            raise GpuError(
                f"{kind.unit} {idx} has only {f / GIB:.1f} GiB available of {gpu.total_bytes / GIB:.1f} GiB, and "
                f"vLLM needs {(weights_per_gpu + kind.process_bytes) / GIB:.1f} GiB there before any KV cache "
                f"({weights_per_gpu / GIB:.1f} GiB of weights, {kind.process_bytes / GIB:.1f} GiB for its processes)",
                "stop what is using the memory (top, sorted by RES) or choose other nodes with --gpu-ids",
            )
        if f - context_guess(kind) < weights_per_gpu:
            raise GpuError(
                f"GPU {idx} has only {f / GIB:.1f} GiB free of {gpu.total_bytes / GIB:.1f} GiB, "
                f"less than the {weights_per_gpu / GIB:.1f} GiB of weights per GPU",
                "stop what is using it (nvidia-smi) or choose other GPUs with --gpu-ids",
            )


def validate_request(req: FindRequest) -> None:
    if not 0 < req.util_ceiling <= 0.98:
        raise UsageError(
            f"--util-ceiling must be in (0, 0.98], got {req.util_ceiling}",
            "vLLM needs some memory outside its budget; use e.g. --util-ceiling 0.95",
        )
    if req.objective == "targets" and not (req.target_context and req.target_seqs):
        raise UsageError(
            "fixed targets need both --context and --seqs", "pass e.g. --context 131072 --seqs 8"
        )
    if req.min_seqs < 1:
        raise UsageError(f"--min-seqs must be at least 1, got {req.min_seqs}", "use --min-seqs 1 or more")
    for option, seqs in (("--min-seqs", req.min_seqs), ("--seqs", req.target_seqs)):
        if seqs and seqs > MAX_SEQS:
            raise UsageError(
                f"{option} {seqs} is more sequences than find searches (at most {MAX_SEQS}, vLLM's largest default)",
                f"use {option} {MAX_SEQS} or fewer, or run several servers",
            )
    if req.max_launches < 1:
        raise UsageError(
            f"--max-launches must be at least 1, got {req.max_launches}", "use e.g. --max-launches 12"
        )
    unknown = req.allow - set(LOSSY_FLAGS)
    if unknown:
        raise UsageError(
            f"unknown lossy knob(s) in --allow: {', '.join(sorted(unknown))}",
            f"choose from {', '.join(LOSSY_FLAGS)}",
        )
