"""Ground truth of the simulated vLLM: what a launch does on the scenario's GPUs. Pure, no I/O.

This deliberately does NOT use vllm_tuner.estimate or vllm_tuner.models: it reads the model config
with its own small reader (the weights each GPU holds come from :mod:`.weights`) and applies the scenario's hidden overheads (weights overhead, activation
factor, CUDA-graph under-estimate, runtime spike), so the tuner's estimate can be wrong the way it is
on real hardware. The benchmark uses :func:`truth` as an oracle of the true best stable config.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from ..units import GIB, MIB
from . import hfconfig
from .runner import Runner
from .weights import Loaded, WeightLayout, layout

REDUNDANCY = 150 * MIB

DEFAULT_TRUTH = {
    "context_gib": 0.45,  # CUDA context + cuBLAS per worker, held before the free-memory check
    "non_torch_gib": 0.12,
    "nccl_gib": 0.30,  # extra non-torch memory per worker when TP > 1
    "weights_factor": 1.0,  # × the checkpoint's bytes
    "activation_factor": 1.0,  # × the simulator's own activation formula
    "graph_base_gib": 0.25,
    "graph_per_layer_mib": 6.0,
    "graph_estimate_ratio": 0.75,  # vLLM's estimate / the real graph pool (it under-estimates)
    "runtime_spike_gib": 0.0,  # extra memory at full KV usage under load (fragmentation, sampler, ...)
    "noise_mib": 24,  # deterministic per-config jitter of the activation peak
}

DEFAULT_TIMING = {
    "load_s": 20.0,
    "compile_s": 45.0,
    "compile_cached_s": 6.0,
    "profile_s": 4.0,
    "capture_s": 12.0,
    "server_s": 2.0,
    # flat costs scripts/bench_find.py charges a probe; the served engine's steps are timed by .steptime
    "decode_step_s": 0.03,
    "prefill_tokens_per_s": 25000.0,
}


@dataclass(frozen=True)
class ModelTruth:
    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_bytes_per_token_tp1: int  # bf16 KV bytes per token, summed over layers, at TP 1
    mla: bool
    kv_heads: int
    weights_bytes: int
    derived_max_len: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False  # the LM head is the embedding matrix: no weights of its own
    layout: WeightLayout | None = field(default=None, repr=False)  # where each parameter goes
    checkpoint_sized: bool = False  # weights_bytes is the checkpoint's safetensors size

    def loaded(self, tp: int, pp: int, expert_parallel: bool, offload_bytes: int) -> Loaded:
        """What the busiest GPU of the group holds after loading: the layout's own sizes, scaled to the
        checkpoint's size where that is known; a dense checkpoint of known size split evenly."""
        even = self.layout is None or (self.checkpoint_sized and not self.layout.experts)
        if even:
            share = int(self.weights_bytes / (tp * pp))
            return Loaded(max(0, share - offload_bytes), min(share, offload_bytes))
        assert self.layout is not None
        scale = self.weights_bytes / self.layout.total_bytes() if self.checkpoint_sized else 1.0
        on = self.layout.on_gpu(tp, pp, expert_parallel, int(offload_bytes / scale))
        return Loaded(int(on.bytes * scale), int(on.offloaded_bytes * scale), on.local_experts)

    def mlp_width(self, tp: int, expert_parallel: bool) -> int:
        """Elements per token of the widest MLP output on one rank (the profile run's peak)."""
        if self.layout is None:
            return 3 * self.intermediate // tp
        return self.layout.mlp_width(tp, expert_parallel)

    def kv_bytes_per_token(self, tp: int, kv_dtype: str) -> int:
        scale = 0.5 if kv_dtype.startswith("fp8") else 1.0
        if self.mla:
            return int(self.kv_bytes_per_token_tp1 * scale)
        heads_per_rank = max(1, self.kv_heads // tp)
        return int(self.kv_bytes_per_token_tp1 * heads_per_rank / self.kv_heads * scale)


def model_truth(name: str, config: dict, weights_bytes: int | None) -> ModelTruth:
    """Read what matters from an HF config (nested ``text_config`` too)."""
    shape = hfconfig.dims(config)
    text = shape.text
    layers, hidden, kv_heads = shape.layers, shape.hidden, shape.kv_heads
    head_dim, inter, vocab = shape.head_dim, shape.intermediate, shape.vocab
    mla = bool(text.get("kv_lora_rank"))
    if mla:
        per_token = layers * (int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim") or 64)) * 2
    else:
        per_token = layers * 2 * kv_heads * head_dim * 2
    max_len = int(text.get("max_position_embeddings") or 4096)
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    if weights_bytes and dtype in ("float32", "float") and not config.get("quantization_config"):
        weights_bytes = int(weights_bytes) // 2  # --dtype auto loads a float32 checkpoint in 16 bits
    tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
    params = layout(config)
    return ModelTruth(
        name,
        layers,
        hidden,
        inter,
        vocab,
        per_token,
        mla,
        kv_heads,
        int(weights_bytes or params.total_bytes()),
        max_len,
        tied_embeddings=tied,
        layout=params,
        checkpoint_sized=bool(weights_bytes),
    )


GENERATE = Runner("generate", "none", "generate")


@dataclass(frozen=True)
class LaunchArgs:
    """The flags the simulated engine acts on (already validated)."""

    tp: int = 1
    pp: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    cpu_offload_gb: float = 0.0
    block_size: int | None = None
    # fields added later stay out of the noise key, so the numbers of older configs do not move
    cudagraphs: bool = True  # False with -O0 or -cc '{"cudagraph_mode": "NONE"}'
    max_cudagraph_capture_size: int | None = None
    num_gpu_blocks_override: int | None = None
    performance_mode: str = "balanced"
    runner: Runner = GENERATE  # --runner / --convert as vLLM resolved them for this model
    expert_parallel: bool = False  # --enable-expert-parallel
    # "cpu": vLLM 0.32's CPU backend (VLLM_TARGET_DEVICE=cpu): the device is a NUMA node's RAM, no CUDA
    # graphs, and a pool given in bytes skips the startup check of the fraction
    platform: str = "cuda"

    def noise_key(self) -> str:
        return (
            f"LaunchArgs(tp={self.tp}, pp={self.pp}, max_model_len={self.max_model_len}, "
            f"max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.max_num_batched_tokens}, "
            f"gpu_memory_utilization={self.gpu_memory_utilization}, "
            f"kv_cache_memory_bytes={self.kv_cache_memory_bytes}, kv_cache_dtype={self.kv_cache_dtype!r}, "
            f"enforce_eager={self.enforce_eager}, cpu_offload_gb={self.cpu_offload_gb}, "
            f"block_size={self.block_size})"
        )

    @property
    def auto_max_model_len(self) -> bool:
        return self.max_model_len == -1

    @property
    def captures_graphs(self) -> bool:
        return self.cudagraphs and not self.enforce_eager and self.platform != "cpu"


@dataclass
class Boot:
    """The outcome of a launch, with every number the log prints."""

    category: str  # success or a failure category (same names as the tuner's taxonomy)
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    total_bytes: int
    free_at_start: int
    requested_bytes: int
    context_bytes: int
    weights_bytes: int
    non_torch_bytes: int
    activation_bytes: int
    graph_actual_bytes: int
    graph_estimate_bytes: int
    pool_bytes: int = 0
    num_blocks: int = 0
    block_size: int = 16
    kv_tokens: int = 0
    max_concurrency: float = 0.0
    kv_bytes_per_token: int = 0
    estimated_max_len: int = 0
    idle_used_bytes: int = 0  # this process's memory per GPU once serving
    spike_bytes: int = 0
    capacity_bytes: int = 0  # physical memory this process may use (total − others)
    sampler_bytes: int = 0  # part of activation_bytes: the dummy sampler run (max_num_seqs logits)
    derived_max_len: int = 0
    auto_fit: str = ""  # "", "full" or "reduced" when --max-model-len auto/-1
    blocks_before_override: int = 0
    fail_detail: dict = field(default_factory=dict)
    offloaded_bytes: int = 0  # weights --cpu-offload-gb moved to CPU memory
    local_experts: int | None = None  # routed experts per GPU with --enable-expert-parallel

    def used_under_load(self, kv_usage: float) -> int:
        return self.idle_used_bytes + int(self.spike_bytes * max(0.0, min(1.0, kv_usage)))

    def dies_at_usage(self) -> float | None:
        """The KV usage at which the runtime spike pushes this process past the card, if any."""
        room = self.capacity_bytes - self.idle_used_bytes
        if self.spike_bytes <= 0 or room >= self.spike_bytes:
            return None
        return max(0.0, room / self.spike_bytes)


def batch_defaults(total_bytes: int, gpu_name: str) -> tuple[int, int]:
    if total_bytes >= 160 * GIB:
        return 1024, 16384
    if total_bytes >= 70 * GIB and "A100" not in gpu_name:
        return 1024, 8192
    return 256, 2048


def capture_sizes(max_seqs: int, top: int | None = None) -> int:
    top = top if top is not None else min(max_seqs * 2, 512)
    sizes = [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)] if s <= top]
    return len(sizes)


def _jitter(key: str, mib: float) -> int:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return int((h * 2 - 1) * mib * MIB)


def boot(
    model: ModelTruth, args: LaunchArgs, *, total_bytes: int, others_bytes: int, gpu_name: str, truth: dict
) -> Boot:
    """What happens when this model starts with ``args`` on a GPU of ``total_bytes`` of which
    ``others_bytes`` are held by other processes (per GPU; the busiest GPU of the group decides)."""
    t = {**DEFAULT_TRUTH, **truth}
    seqs_default, batched_default = batch_defaults(total_bytes, gpu_name)
    if args.performance_mode == "throughput":
        seqs_default, batched_default = seqs_default * 2, batched_default * 2
    derived = model.derived_max_len
    max_len = derived if args.auto_max_model_len else (args.max_model_len or derived)
    runner = args.runner
    seqs = args.max_num_seqs or seqs_default
    batched = args.max_num_batched_tokens or batched_default
    if args.max_num_batched_tokens is None and not runner.chunked_prefill:
        batched = max(batched, max_len)  # without chunked prefill one batch must hold a whole prompt
    batched = min(batched, seqs * max_len)
    seqs = min(seqs, batched)
    tp, pp = args.tp, args.pp
    ctx = int(t["context_gib"] * GIB)
    factor = t["weights_factor"]
    loaded = model.loaded(tp, pp, args.expert_parallel, int(args.cpu_offload_gb * GIB / factor))
    lm_head = 0
    if not runner.builds_lm_head and not model.tied_embeddings:  # a converted model loads no LM head
        lm_head = model.vocab * model.hidden * model.dtype_bytes // (tp * pp)
    weights = max(0, int((loaded.bytes - lm_head) * factor))
    non_torch = int((t["non_torch_gib"] + (t["nccl_gib"] if tp > 1 else 0)) * GIB)
    act_per_token = 2 * (4 * model.hidden + model.mlp_width(tp, args.expert_parallel))
    # the dummy sampler's float32 logits (max_num_seqs x vocab), or a pooler's pooled hidden states
    head_rows = seqs * (model.hidden if runner.pooling else model.vocab) * 4
    sampler = int(head_rows * t["activation_factor"])
    activation = int((batched * act_per_token + head_rows + 64 * MIB) * t["activation_factor"])
    activation += _jitter(f"{model.name}|{args.noise_key()}", t["noise_mib"])
    if not args.captures_graphs:
        graph_actual = graph_est = 0
    else:
        graph_actual = int(
            (t["graph_base_gib"] * GIB + t["graph_per_layer_mib"] * MIB * model.layers / pp)
            * capture_sizes(seqs, args.max_cudagraph_capture_size)
            / 67
        )
        graph_est = int(graph_actual * t["graph_estimate_ratio"])
    capacity = total_bytes - others_bytes
    free_at_start = capacity - ctx
    requested = math.ceil(total_bytes * args.gpu_memory_utilization)
    per_token = model.kv_bytes_per_token(tp, args.kv_cache_dtype) if runner.keeps_kv_cache else 0
    block = args.block_size or (64 if model.mla else 16)
    b = Boot(
        "success",
        max_len,
        seqs,
        batched,
        total_bytes,
        free_at_start,
        requested,
        ctx,
        weights,
        non_torch,
        activation,
        graph_actual,
        graph_est,
        block_size=block,
        kv_bytes_per_token=per_token,
        capacity_bytes=capacity,
        spike_bytes=int(t["runtime_spike_gib"] * GIB),
        sampler_bytes=sampler,
        derived_max_len=derived,
        offloaded_bytes=int(loaded.offloaded_bytes * factor),
        local_experts=loaded.local_experts,
    )
    cpu = args.platform == "cpu"
    # the CPU worker checks the fraction against the node's free memory only without a pool in bytes
    if free_at_start < requested and not (cpu and args.kv_cache_memory_bytes is not None):
        b.category = "startup_free_memory_below_utilization"
        return b
    if ctx + weights > capacity:
        b.category = "oom_weights_load"
        b.fail_detail = {
            "tried": min(weights, 896 * MIB),
            "free": max(capacity - ctx - weights + 896 * MIB, 0),
        }
        return b
    if ctx + weights + non_torch + activation > capacity:
        b.category = "oom_during_profiling"
        room = max(capacity - ctx - weights - non_torch, 0)
        forward = activation - sampler
        b.fail_detail = {
            "stage": "forward" if forward > room else "sampler",
            "tried": (forward // 2) if forward > room else sampler,
            "free": (room // 3) if forward > room else max(room - forward, 0) // 2,
        }
        return b
    if not runner.keeps_kv_cache:  # a bidirectional encoder: no KV cache, nothing profiled for one
        b.idle_used_bytes = ctx + weights + non_torch + activation + graph_actual
        if b.idle_used_bytes > capacity:
            b.category = "oom_cudagraph_capture"
            b.fail_detail = {
                "tried": 20 * MIB,
                "free": max(0, capacity - b.idle_used_bytes + graph_actual) % (32 * MIB),
            }
        return b
    if args.kv_cache_memory_bytes is not None:
        pool = args.kv_cache_memory_bytes
    else:
        pool = requested - (weights + non_torch + activation) - graph_est
    b.pool_bytes = pool
    page = block * per_token
    blocks = max(0, pool // page) if page else 0
    b.blocks_before_override = blocks
    if args.num_gpu_blocks_override:
        blocks = args.num_gpu_blocks_override
        b.pool_bytes = pool = blocks * page
    b.num_blocks = blocks
    if pool <= 0 or blocks <= 1:
        b.category = "no_kv_cache_memory"
        return b
    # the CPU worker allocates its pool only where the node has it available now, its own memory held
    available = capacity - ctx - weights - non_torch - activation
    if cpu and pool > available:
        b.category = "startup_free_memory_below_utilization"
        b.fail_detail = {"stage": "kv_alloc", "available": max(0, available)}
        return b
    usable = blocks - 1  # BlockPool keeps block 0 as the null block: vLLM checks and schedules the rest
    if args.auto_max_model_len:
        fitted = min(derived, usable * block)
        b.auto_fit = "full" if fitted >= derived else "reduced"
        b.max_model_len = max_len = fitted
    per_request = math.ceil(max_len / block)
    if usable < per_request:
        b.category = "kv_cache_insufficient_for_max_len"
        b.estimated_max_len = usable * block
        return b
    # vLLM reports the capacity over the whole pool, null block included (get_max_concurrency_for_kv_cache_
    # config divides kv_cache_config.num_blocks), while its checks and the scheduler have one block less
    b.max_concurrency = blocks / per_request
    b.kv_tokens = int(b.max_concurrency * max_len)
    b.estimated_max_len = usable * block
    b.idle_used_bytes = ctx + weights + non_torch + activation + pool + graph_actual
    before_graphs = b.idle_used_bytes - graph_actual
    if before_graphs > capacity:  # an explicit --kv-cache-memory-bytes / block override too large
        b.category = "oom_during_profiling"
        b.fail_detail = {
            "stage": "kv_alloc",
            "tried": pool,
            "free": max(0, capacity - (before_graphs - pool)),
        }
        return b
    if b.idle_used_bytes > capacity:
        b.category = "oom_cudagraph_capture"
        b.fail_detail = {"tried": 20 * MIB, "free": max(0, capacity - before_graphs) % (32 * MIB)}
        return b
    return b


@dataclass(frozen=True)
class Truth:
    boots: bool
    category: str
    kv_cache_tokens: int
    max_concurrency: float
    peak_under_load_bytes: int  # this process + others, per GPU, at full KV usage
    survives_load: bool
    headroom_under_load_bytes: int


def truth(
    model: ModelTruth,
    args: LaunchArgs,
    *,
    total_bytes: int,
    others_bytes: int,
    gpu_name: str,
    truth_overrides: dict,
    concurrency_needed: int | None = None,
) -> Truth:
    """The oracle: does this config boot, and does it survive its worst-case load?"""
    b = boot(
        model,
        args,
        total_bytes=total_bytes,
        others_bytes=others_bytes,
        gpu_name=gpu_name,
        truth=truth_overrides,
    )
    if b.category != "success":
        return Truth(False, b.category, 0, 0.0, 0, False, 0)
    seqs = concurrency_needed or b.max_num_seqs
    usage = min(1.0, seqs * math.ceil(b.max_model_len / b.block_size) / max(1, b.num_blocks - 1))
    peak = b.used_under_load(usage) + others_bytes
    survives = b.dies_at_usage() is None or usage < (b.dies_at_usage() or 0)
    return Truth(True, "success", b.kv_tokens, b.max_concurrency, peak, survives, total_bytes - peak)
