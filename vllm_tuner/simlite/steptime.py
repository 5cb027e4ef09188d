"""How long one engine step takes on the scenario's GPUs: the simulator's own roofline. Pure but for
:func:`load_gpu_specs`.

A step runs the scheduled tokens of every running sequence at once (prefill chunks and decodes share
it). Its matmuls cost 2 FLOPs per active parameter per token, its attention 4 FLOPs per head dimension
per (new token, context token) pair; it reads every weight on the rank once and the KV cache of every
scheduled sequence. A prefill-heavy step is bound by compute, a decode step by memory bandwidth, so
throughput grows with the batch until the step turns compute-bound or the KV reads dominate: the knee.

The published peaks come from ``profiles/gpus.yaml``; the scenario's hidden truths scale them
(``compute_efficiency``, ``bandwidth_efficiency``) and add a fixed cost per step (``step_overhead_ms``:
scheduling, sampling, launches) and per TP all-reduce (``allreduce_us``, two per layer). The tuner
never reads these: it can only measure what they do.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from ..paths import profiles_dir
from . import hfconfig

DEFAULT_EFFICIENCY = {
    "compute_efficiency": 0.5,  # achieved / peak dense BF16 FLOPs on large matmuls
    "bandwidth_efficiency": 0.8,  # achieved / peak memory bandwidth on streaming reads
    "step_overhead_ms": 3.0,  # per step, whatever it holds
    "allreduce_us": 12.0,  # per all-reduce with TP > 1 (two per layer)
}
# a GPU the profiles do not know: an A100-class card
FALLBACK_SPECS = {"bandwidth_gbs": 1555.0, "bf16_tflops": 312.0}


@dataclass(frozen=True)
class Hardware:
    bandwidth_bytes_s: float  # peak memory bandwidth of one GPU
    flops: float  # peak dense BF16 tensor FLOP/s of one GPU


def load_gpu_specs() -> list[dict]:
    """The GPU profiles (``profiles/gpus.yaml``) as plain mappings."""
    return list((yaml.safe_load((profiles_dir() / "gpus.yaml").read_text()) or {}).get("gpus") or [])


def hardware_of(gpu_name: str, specs: list[dict]) -> Hardware:
    """The peaks of the profile whose ``nvml`` substring matches ``gpu_name`` (the longest match wins:
    "RTX 3090 Ti" over "RTX 3090"), or of its ``name``; an A100-class card when none does."""
    name = gpu_name.lower()
    best: tuple[int, dict] = (0, FALLBACK_SPECS)
    for spec in specs:
        keys = [str(k).lower() for k in spec.get("nvml") or []] + [str(spec.get("name", "")).lower()]
        for key in keys:
            if key and key in name and len(key) > best[0] and "bandwidth_gbs" in spec:
                best = (len(key), spec)
    spec = best[1]
    return Hardware(float(spec["bandwidth_gbs"]) * 1e9, float(spec["bf16_tflops"]) * 1e12)


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model, whole (before TP splits it)."""

    linear_flops_per_token: float  # 2 × active parameters (experts a token is routed to, LM head)
    attention_flops_per_pair: float  # per (new token, context token): 4 × layers × heads × head_dim
    layers: int


def model_cost(config: dict) -> ModelCost:
    """From an HF config (nested ``text_config`` too): the model's active parameters and attention width."""
    shape = hfconfig.dims(config)
    text = shape.text
    layers, hidden, heads, kv_heads = shape.layers, shape.hidden, shape.heads, shape.kv_heads
    head_dim, inter, vocab = shape.head_dim, shape.intermediate, shape.vocab
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, k, v, o
    experts = int(
        text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts") or 0
    )
    if experts:
        moe_inter = int(text.get("moe_intermediate_size") or inter)
        routed = int(text.get("num_experts_per_tok") or 1) + int(text.get("n_shared_experts") or 0)
        mlp = 3 * hidden * (routed * moe_inter + int(text.get("shared_expert_intermediate_size") or 0))
    else:
        mlp = 3 * hidden * inter
    active = layers * (attention + mlp) + hidden * vocab
    return ModelCost(2.0 * active, 4.0 * layers * heads * head_dim, layers)


@dataclass(frozen=True)
class StepModel:
    """The time of one step on one rank of the group (all ranks run in lock step)."""

    weights_bytes: int  # read once per step by each rank (every pipeline stage, one after the other)
    kv_bytes_per_token: int  # a token's KV cache over all layers, one TP rank's share
    linear_flops_per_token: float  # one rank's share
    attention_flops_per_pair: float  # one rank's share
    hardware: Hardware
    compute_efficiency: float
    bandwidth_efficiency: float
    overhead_s: float  # per step: the fixed cost and TP's all-reduces

    def seconds(self, work: list[tuple[int, int]]) -> float:
        """``work``: (tokens already in the KV cache, tokens computed now) of each scheduled sequence."""
        if not work:
            return 0.0
        flops = sum(
            new * self.linear_flops_per_token + new * (done + (new + 1) / 2) * self.attention_flops_per_pair
            for done, new in work
        )
        read = self.weights_bytes + self.kv_bytes_per_token * sum(done + new for done, new in work)
        compute = flops / (self.hardware.flops * self.compute_efficiency)
        memory = read / (self.hardware.bandwidth_bytes_s * self.bandwidth_efficiency)
        return max(compute, memory) + self.overhead_s


def step_model(
    cost: ModelCost,
    hardware: Hardware,
    truth: dict,
    *,
    weights_bytes: int,
    kv_bytes_per_token: int,
    tp: int,
    pp: int,
) -> StepModel:
    """The step model of a launch: ``weights_bytes`` and ``kv_bytes_per_token`` are one GPU's (as the
    boot found them), ``truth`` the scenario's hidden truths for this model."""
    t = {**DEFAULT_EFFICIENCY, **{k: v for k, v in truth.items() if k in DEFAULT_EFFICIENCY}}
    allreduce = 2 * cost.layers * float(t["allreduce_us"]) * 1e-6 if tp > 1 else 0.0
    return StepModel(
        weights_bytes=weights_bytes * pp,
        kv_bytes_per_token=kv_bytes_per_token,
        linear_flops_per_token=cost.linear_flops_per_token / tp,
        attention_flops_per_pair=cost.attention_flops_per_pair / tp,
        hardware=hardware,
        compute_efficiency=float(t["compute_efficiency"]),
        bandwidth_efficiency=float(t["bandwidth_efficiency"]),
        overhead_s=float(t["step_overhead_ms"]) * 1e-3 + allreduce,
    )
