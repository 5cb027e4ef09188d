"""The VRAM model of one vLLM server, per GPU, the way vLLM ≥ 0.18 (V1 engine) budgets it. Pure.

    pool = ceil(total × gpu_memory_utilization) − (weights + non_torch + peak_activation) − cudagraph
           (or --kv-cache-memory-bytes when set)

then blocks = pool // bytes_per_block, one null block, and vLLM's group-aware capacity:
``max_concurrency = blocks / Σ_groups blocks_per_request`` and ``tokens = int(max_concurrency × max_model_len)``
(vllm-internals.md §2). Every overhead that is an estimate (not a formula vLLM applies) lives in
:data:`OVERHEADS`, with its source; a :class:`Calibration` from a measured launch replaces them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from .devices import CUDA, DeviceKind
from .errors import UsageError
from .logparse import Fact
from .models import KvLayers, ModelSpec
from .pooling import GENERATE, RunnerChoice, runner_of
from .rope import beyond_native, with_hf_overrides
from .serveconfig import ServeConfig
from .units import GIB, MIB
from .vllm_defaults import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_UTILIZATION,
    MLA_BLOCK_SIZE,
    batch_defaults,
    capture_sizes,
)

REDUNDANCY_BUFFER = 150 * MIB  # subtracted from the --kv-cache-memory=A/B suggestions (§2.3)


class Overhead(TypedDict, total=False):
    """One estimated term: its size, or the formula that sizes it, and where it came from."""

    bytes: int
    formula: str
    source: str


# The estimated terms, in one place. Each value says where it came from; a Calibration replaces them.
OVERHEADS: dict[str, Overhead] = {
    "non_torch_tp1": {
        "bytes": 150 * MIB,
        "source": "memory a TP=1 worker gains after vLLM's init snapshot (cuBLAS workspaces, allocator "
        "slack); V0 logs show 0.03-0.35 GiB non-torch incl. context (failures F040, startups S001)",
    },
    "non_torch_tp": {
        "bytes": 400 * MIB,
        "source": "TP>1 adds NCCL and custom all-reduce buffers: 0.25 GiB (F036, TP2) and 0.28 GiB (S007, TP8) "
        "non-torch in V0 logs, plus the TP1 term",
    },
    "cuda_context": {
        "bytes": CUDA.context_overhead_bytes,
        "source": "CUDA context + cuBLAS a worker holds before the free-memory check; outside the budget but it "
        "must fit in (1 − util) × total (§2.1); devices.CUDA.context_overhead_bytes",
    },
    "activation_per_token": {
        "formula": "2 bytes × (2 × hidden + 3 × intermediate_per_rank) per batched token",
        "source": "profile_run peak: residual + gate_up + activation output of the widest MLP for "
        "max_num_batched_tokens tokens (§2.2); MoE uses top_k × moe_intermediate",
    },
    "sampler_logits": {
        "formula": "max_num_seqs × vocab_size × 4 bytes (a pooling runner: max_num_seqs × hidden_size × 4)",
        "source": "the dummy sampler run on max_num_seqs float32 logits rows (§2.2 profile_run); a pooling "
        "runner warms its pooler on the pooled hidden states instead (vllm_tuner.pooling)",
    },
    "activation_floor": {
        "bytes": 64 * MIB,
        "source": "allocator rounding and attention metadata seen as the smallest peak in small-batch logs",
    },
    "cudagraph_base": {
        "bytes": 200 * MIB,
        "source": "CUDA-graph pool at the default 67 capture sizes: 0.49 GiB for a 64-layer 27B at TP2 "
        "(startups S004 util delta 0.0208 × 23.56 GiB); scaled by capture sizes / 67",
    },
    "cudagraph_per_layer": {"bytes": 5 * MIB, "source": "as cudagraph_base: per decoder layer"},
}

KV_DTYPE_BYTES = {
    "float16": 2.0,
    "bfloat16": 2.0,
    "half": 2.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "float32": 4.0,
    "fp8": 1.0,
    "fp8_e4m3": 1.0,
    "fp8_e5m2": 1.0,
    "fp8_inc": 1.0,
    "int8_per_token_head": 1.0,
    "fp8_per_token_head": 1.0,
    "int4_per_token_head": 0.5,
    "nvfp4": 0.5 + 1 / 16,
    "nvfp4_4over6": 0.5 + 1 / 16,
}
MLA_FIXED_TOKEN_BYTES = {"fp8_ds_mla": 656, "nvfp4_ds_mla": 352}  # per layer per token (§2.5)


def kv_dtype_bytes(kv_cache_dtype: str, spec: ModelSpec) -> float:
    """Bytes per KV element for ``--kv-cache-dtype`` (``auto`` = the checkpoint's KV quant or model dtype)."""
    dtype = (kv_cache_dtype or "auto").lower()
    if dtype == "auto":
        if spec.quantization and spec.quantization.kv_cache_dtype:
            return KV_DTYPE_BYTES[spec.quantization.kv_cache_dtype]
        return float(spec.dtype_bytes)
    if dtype in MLA_FIXED_TOKEN_BYTES:
        return 1.0
    if dtype not in KV_DTYPE_BYTES:
        raise UsageError(
            f"--kv-cache-dtype {kv_cache_dtype!r} is not modelled",
            f"use one of auto, {', '.join(sorted(KV_DTYPE_BYTES))}",
        )
    return KV_DTYPE_BYTES[dtype]


def token_bytes(layer: KvLayers, tp: int, kv_cache_dtype: str, spec: ModelSpec) -> float:
    """KV bytes one token costs in one layer on one GPU (MLA: the latent, on every TP rank)."""
    if layer.kind == "mamba":
        return 0.0
    if layer.kind == "mla" and kv_cache_dtype in MLA_FIXED_TOKEN_BYTES:
        return float(MLA_FIXED_TOKEN_BYTES[kv_cache_dtype])
    elem = kv_dtype_bytes(kv_cache_dtype, spec)
    return layer.heads_per_rank(tp) * (layer.head_size + layer.head_size_v) * elem


# -- the KV layout: groups, pages, blocks per request ---------------------------------------------
@dataclass(frozen=True)
class KvGroup:
    kind: str
    window: int | None
    page_bytes: int  # one layer, one block


@dataclass(frozen=True)
class KvLayout:
    groups: tuple[KvGroup, ...]  # one entry per KV-cache group (a type may have several)
    group_size: int  # layers per group: the block pool holds group_size pages per block id
    block_size: int
    bytes_per_block: int
    bytes_per_token: int  # per GPU, every attention layer (the plain full-attention cost)

    def blocks_per_request(self, context: int, in_flight: int) -> int:
        total = 0
        for g in self.groups:
            if g.kind == "mamba":
                total += 1
            elif g.kind == "sliding" and g.window:
                total += _cdiv(min(g.window - 1 + in_flight, context), self.block_size) + 1
            else:
                total += _cdiv(context, self.block_size)
        return total


def kv_layout(spec: ModelSpec, tp: int = 1, pp: int = 1, kv_cache_dtype: str = "auto") -> KvLayout:
    """Group the layers the way vLLM's KV-cache planner does (§2.5 grouping)."""
    layers = [dataclasses.replace(g, count=_cdiv(g.count, max(1, pp))) for g in spec.kv_layers if g.count]
    attn = [g for g in layers if g.kind != "mamba"]
    mamba = [g for g in layers if g.kind == "mamba"]
    block_size = MLA_BLOCK_SIZE if spec.is_mla else DEFAULT_BLOCK_SIZE
    per_token = {id(g): token_bytes(g, tp, kv_cache_dtype, spec) for g in attn}
    if mamba:
        state = max(g.state_bytes // max(1, tp) for g in mamba)
        unit = max(per_token.values(), default=0.0) * DEFAULT_BLOCK_SIZE
        if unit:
            block_size = DEFAULT_BLOCK_SIZE * max(1, math.ceil(state / unit))
    pages = {id(g): math.ceil(per_token[id(g)] * block_size) for g in attn}
    if mamba:
        page = max([*pages.values(), *(g.state_bytes // max(1, tp) for g in mamba)])
        pages = {k: page for k in pages} | {id(g): page for g in mamba}
    counts = [g.count for g in layers]
    group_size = counts[0] if len(layers) == 1 else min(counts)
    groups: list[KvGroup] = []
    for g in layers:
        for _ in range(_cdiv(g.count, group_size)):
            groups.append(KvGroup(g.kind, g.window, pages[id(g)]))
    page_max = max((pages[id(g)] for g in layers), default=0)
    bytes_per_token = int(sum(per_token[id(g)] * g.count for g in attn))
    return KvLayout(tuple(groups), group_size, block_size, group_size * page_max, bytes_per_token)


# -- calibration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Measured values from one launch that replace estimated terms.

    ``non_kv_bytes`` is vLLM's "non KV cache memory" (consumed since the init snapshot + peak
    activation) at ``config``; ``cudagraph_bytes`` what vLLM subtracted for CUDA graphs; the pool at
    ``config`` is reproduced exactly as ``ceil(total × util) − non_kv − cudagraph``.
    """

    config: ServeConfig | None = None
    total_bytes: int | None = None
    weights_bytes: int | None = None
    non_kv_bytes: int | None = None
    activation_bytes: int | None = None
    cudagraph_bytes: int | None = None
    kv_pool_bytes: int | None = None
    kv_cache_tokens: int | None = None
    kv_bytes_per_token: float | None = None  # measured pool / tokens at config's max_model_len (group-aware)
    offloaded_bytes: int | None = None  # weights --cpu-offload-gb moved to CPU memory, as vLLM logged it

    @classmethod
    def from_facts(cls, facts: Mapping[str, Fact], config: ServeConfig) -> Calibration:
        """Build from the facts keys of docs/architecture.md (any subset)."""

        def gib(key: str) -> int | None:
            value = facts.get(key)
            return int(round(float(value) * GIB)) if isinstance(value, (int, float)) else None

        total = gib("total_gib")
        util = facts.get("gpu_memory_utilization") or config.gpu_memory_utilization or DEFAULT_UTILIZATION
        pool = gib("available_kv_gib")
        if pool is not None and config.kv_cache_memory_bytes is not None:
            pool = int(
                config.kv_cache_memory_bytes
            )  # the pool vLLM was given, exactly (it prints 2 decimals)
        if facts.get("kv_cache_memory_fit_bytes") and total and not config.kv_cache_memory_bytes:
            pool_a = int(facts["kv_cache_memory_fit_bytes"])  # A = requested − non_kv − 150 MiB, exact bytes
            pool = (
                pool_a + REDUNDANCY_BUFFER
                if pool is None or abs(pool_a + REDUNDANCY_BUFFER - pool) < 64 * MIB
                else pool
            )
        graphs = gib("cudagraph_estimated_gib")
        if graphs is None:
            graphs = gib("cudagraph_gib")
        if config.enforce_eager:
            graphs = 0
        non_kv = None
        if config.kv_cache_memory_bytes is None and total and pool is not None:
            lumped = math.ceil(total * float(util)) - pool  # non_kv + cudagraph, exactly as vLLM subtracted
            if graphs is None:
                return cls._lumped(config, total, facts, pool, lumped)
            non_kv = lumped - graphs
        elif (consumed := gib("consumed_gib")) is not None:
            non_kv = consumed + (gib("peak_activation_gib") or 0)
        return cls(
            config=config,
            total_bytes=total,
            weights_bytes=gib("weights_gib"),
            non_kv_bytes=non_kv,
            activation_bytes=gib("peak_activation_gib"),
            cudagraph_bytes=graphs,
            kv_pool_bytes=pool,
            kv_cache_tokens=_int(facts.get("kv_cache_tokens")),
            kv_bytes_per_token=_per_token(pool, facts),
            offloaded_bytes=gib("offloaded_gib"),
        )

    @classmethod
    def _lumped(
        cls, config: ServeConfig, total: int, facts: Mapping[str, Fact], pool: int, lumped: int
    ) -> Calibration:
        """Only the sum non_kv + cudagraph is known: keep it whole, flagged by ``cudagraph_bytes=-1``."""
        return cls(
            config=config,
            total_bytes=total,
            weights_bytes=int(float(facts["weights_gib"]) * GIB) if facts.get("weights_gib") else None,
            non_kv_bytes=lumped,
            cudagraph_bytes=-1,
            kv_pool_bytes=pool,
            kv_cache_tokens=_int(facts.get("kv_cache_tokens")),
            kv_bytes_per_token=_per_token(pool, facts),
            offloaded_bytes=int(float(facts["offloaded_gib"]) * GIB) if facts.get("offloaded_gib") else None,
        )


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _per_token(pool: int | None, facts: Mapping[str, Fact]) -> float | None:
    tokens = facts.get("kv_cache_tokens")
    if pool and isinstance(tokens, (int, float)) and tokens > 0:
        return pool / float(tokens)
    return None


# -- the estimate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Per-GPU memory of one server and what it can hold. Sizes are bytes per GPU."""

    gpu_name: str
    total_bytes: int
    utilization: float
    requested_bytes: int
    weights_bytes: int
    non_torch_bytes: int
    activation_bytes: int
    cudagraph_bytes: int
    kv_pool_bytes: int
    kv_bytes_per_token: int
    block_size: int
    bytes_per_block: int
    num_blocks: int
    kv_cache_tokens: int
    max_model_len: int
    derived_max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_concurrency: float
    max_model_len_fit: int
    fits: bool
    tensor_parallel_size: int = 1
    context_bytes: int = 0
    calibrated: bool = False
    kv_from_flag: bool = False
    has_kv_cache: bool = True  # False for a bidirectional encoder served by a pooling runner
    layout: KvLayout | None = field(default=None, repr=False)
    in_flight_tokens: int = 0
    notes: tuple[str, ...] = ()

    @property
    def non_kv_bytes(self) -> int:
        return self.weights_bytes + self.non_torch_bytes + self.activation_bytes

    @property
    def headroom_bytes(self) -> int:
        """Memory outside vLLM's budget: for the CUDA context and anything else on the GPU."""
        return self.total_bytes - self.requested_bytes

    @property
    def usable_blocks(self) -> int:
        return max(0, self.num_blocks - 1)  # the BlockPool null block

    def _bpr(self, context: int) -> int:
        assert self.layout is not None
        return self.layout.blocks_per_request(context, self.in_flight_tokens)

    def max_seqs(self, context: int) -> int:
        """How many sequences of ``context`` tokens fit in the pool at once."""
        if not self.has_kv_cache:
            return self.max_num_seqs
        if context <= 0 or self.layout is None:
            return 0
        return self.usable_blocks // self._bpr(context)

    def max_context(self, seqs: int) -> int:
        """The largest context (≤ the model's derived max) that ``seqs`` sequences can hold at once."""
        if not self.has_kv_cache:
            return self.derived_max_model_len
        if seqs <= 0 or self.layout is None:
            return 0
        lo, hi = 0, self.derived_max_model_len
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if seqs * self._bpr(mid) <= self.usable_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def kv_bytes_for(self, context: int, seqs: int) -> int:
        """Pool bytes ``seqs`` sequences of ``context`` tokens need (null block included)."""
        if not self.has_kv_cache:
            return 0
        return (seqs * self._bpr(context) + 1) * self.bytes_per_block

    def min_utilization(self, context: int, seqs: int) -> float | None:
        """The smallest --gpu-memory-utilization (4 decimals, rounded up) that holds (context, seqs)."""
        need = self.kv_bytes_for(context, seqs) + self.non_kv_bytes + self.cudagraph_bytes
        util = math.ceil(need / self.total_bytes * 10000) / 10000
        return util if util <= 1.0 else None

    def as_dict(self) -> dict[str, object]:
        return {
            "gpu": self.gpu_name,
            "total_gib": _gib(self.total_bytes),
            "gpu_memory_utilization": self.utilization,
            "requested_gib": _gib(self.requested_bytes),
            "weights_gib": _gib(self.weights_bytes),
            "non_torch_gib": _gib(self.non_torch_bytes),
            "activation_gib": _gib(self.activation_bytes),
            "cudagraph_gib": _gib(self.cudagraph_bytes),
            "kv_pool_gib": _gib(self.kv_pool_bytes),
            "headroom_gib": _gib(self.headroom_bytes),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "block_size": self.block_size,
            "num_gpu_blocks": self.num_blocks,
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_model_len": self.max_model_len,
            "derived_max_model_len": self.derived_max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_concurrency": round(self.max_concurrency, 2),
            "max_model_len_fit": self.max_model_len_fit,
            "fits": self.fits,
            "tensor_parallel_size": self.tensor_parallel_size,
            "calibrated": self.calibrated,
            "notes": list(self.notes),
        }


def _gib(value: int) -> float:
    return round(value / GIB, 3)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unbuilt_lm_head_bytes(spec: ModelSpec, runner: RunnerChoice, tp: int, pp: int) -> int:
    """Per GPU, the LM head a converted pooling model never builds (an untied checkpoint still holds it)."""
    text = spec.config.get("text_config") or spec.config
    if not runner.converted or text.get("tie_word_embeddings"):
        return 0
    return spec.vocab_size * spec.hidden_size * spec.dtype_bytes // (max(1, tp) * max(1, pp))


def non_torch_estimate(tp: int) -> int:
    return OVERHEADS["non_torch_tp" if tp > 1 else "non_torch_tp1"]["bytes"]


def activation_estimate(
    spec: ModelSpec, tp: int, batched_tokens: int, max_num_seqs: int, *, pooling: bool = False
) -> int:
    text = spec.config.get("text_config") or spec.config
    inter = int(text.get("intermediate_size") or 4 * spec.hidden_size)
    if text.get("num_experts_per_tok") and text.get("moe_intermediate_size"):
        inter = max(
            inter if text.get("first_k_dense_replace") else 0,
            int(text["num_experts_per_tok"]) * int(text["moe_intermediate_size"]),
        )
    per_token = 2 * (2 * spec.hidden_size + 3 * inter // max(1, tp))
    sampler = max_num_seqs * (spec.hidden_size if pooling else spec.vocab_size) * 4
    return batched_tokens * per_token + sampler + OVERHEADS["activation_floor"]["bytes"]


def cudagraph_estimate(spec: ModelSpec, config: ServeConfig, seqs: int, batched: int, gpu_name: str) -> int:
    if config.enforce_eager:
        return 0
    sizes = len(capture_sizes(seqs, batched, gpu_name))
    layers = _cdiv(spec.num_layers, max(1, config.pipeline_parallel_size))
    base = OVERHEADS["cudagraph_base"]["bytes"] + layers * OVERHEADS["cudagraph_per_layer"]["bytes"]
    return int(base * sizes / 67)


def resolved_limits(
    spec: ModelSpec,
    config: ServeConfig,
    total_bytes: int,
    gpu_name: str,
    max_model_len: int,
    device: DeviceKind = CUDA,
    *,
    chunked_prefill: bool = True,
) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) after vLLM's defaults and clamps (§1 "Batch defaults");
    without chunked prefill the default batch holds at least one whole prompt."""
    if device.batch_defaults_per_rank is not None:
        ranks = max(1, config.tensor_parallel_size) * max(1, config.pipeline_parallel_size)
        default_tokens, default_seqs = (n * ranks for n in device.batch_defaults_per_rank)
    else:
        default_tokens, default_seqs = batch_defaults(total_bytes, gpu_name)
    seqs = config.max_num_seqs or default_seqs
    batched = config.max_num_batched_tokens
    if batched is None:
        if not chunked_prefill:
            default_tokens = max(default_tokens, max_model_len)
        batched = min(seqs * max_model_len, default_tokens)
        seqs = min(seqs, batched)
    return seqs, batched


def estimate(
    spec: ModelSpec,
    gpu_total_bytes: int,
    config: ServeConfig,
    *,
    gpu_name: str = "",
    calibration: Calibration | None = None,
    device: DeviceKind = CUDA,
) -> Estimate:
    """The per-GPU breakdown and capacity of ``config`` on a GPU of ``gpu_total_bytes`` (a NUMA node's
    RAM on ``device`` cpu, where the worker's own resident memory counts against the budget). Pure."""
    tp, pp = max(1, config.tensor_parallel_size), max(1, config.pipeline_parallel_size)
    cal = calibration
    total = gpu_total_bytes
    util = config.gpu_memory_utilization or DEFAULT_UTILIZATION
    if not 0 < util <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {util}", "pass e.g. 0.9")
    spec = with_hf_overrides(spec, config.hf_overrides)  # the config vLLM reads (a YaRN override's length)
    derived = spec.derived_max_model_len
    auto_len = config.max_model_len is not None and config.max_model_len < 0
    max_len = derived if (config.max_model_len is None or auto_len) else config.max_model_len
    notes: list[str] = list(spec.notes)
    if max_len > derived:
        notes.append(beyond_native(spec, max_len))
    runner = runner_of(spec.config, config.extra_args)
    seqs, batched = resolved_limits(
        spec, config, total, gpu_name, max_len, device, chunked_prefill=runner.chunked_prefill
    )
    layout = kv_layout(spec, tp, pp, config.kv_cache_dtype)

    weights = spec.weights_per_gpu(tp, pp) - unbuilt_lm_head_bytes(spec, runner, tp, pp)
    offload = int(config.cpu_offload_gb * GIB)
    weights = max(0, weights - offload)
    non_torch = non_torch_estimate(tp) if device.worker_runtime_bytes is None else device.worker_runtime_bytes
    activation = activation_estimate(spec, tp, batched, seqs, pooling=runner.pooling)
    graphs = cudagraph_estimate(spec, config, seqs, batched, gpu_name)
    non_kv = weights + non_torch + activation

    if cal is not None:
        weights, non_torch, activation, graphs, non_kv, layout = _apply_calibration(
            cal,
            spec,
            config,
            gpu_name,
            layout,
            weights,
            non_torch,
            activation,
            graphs,
            offload,
            runner,
            device,
        )

    requested = math.ceil(total * util)
    if config.kv_cache_memory_bytes is not None:
        pool = int(config.kv_cache_memory_bytes)
    else:
        pool = requested - non_kv - graphs
    pool = max(0, pool) if runner.keeps_kv_cache else 0  # an encoder's pooling runner keeps no KV cache
    bpb = max(1, layout.bytes_per_block)
    blocks = pool // bpb
    in_flight = (pp + 1) * batched  # max_concurrent_batches × max_num_batched_tokens (§2.5 sliding window)
    probe = Estimate(
        gpu_name=gpu_name,
        total_bytes=total,
        utilization=util,
        requested_bytes=requested,
        weights_bytes=weights,
        non_torch_bytes=non_torch,
        activation_bytes=activation,
        cudagraph_bytes=graphs,
        kv_pool_bytes=pool,
        kv_bytes_per_token=layout.bytes_per_token if runner.keeps_kv_cache else 0,
        block_size=layout.block_size,
        bytes_per_block=bpb,
        num_blocks=blocks,
        kv_cache_tokens=0,
        max_model_len=max_len,
        derived_max_model_len=derived,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        max_concurrency=0.0,
        max_model_len_fit=0,
        fits=False,
        tensor_parallel_size=tp,
        context_bytes=OVERHEADS["cuda_context"]["bytes"],
        calibrated=cal is not None,
        kv_from_flag=config.kv_cache_memory_bytes is not None,
        has_kv_cache=runner.keeps_kv_cache,
        layout=layout,
        in_flight_tokens=in_flight,
    )
    fit_len = probe.max_context(1)
    if auto_len:
        max_len = max(1, fit_len)
        notes.append(f"--max-model-len auto: vLLM would fit {fit_len}")
    per_request = layout.blocks_per_request(max_len, in_flight)
    concurrency = blocks / per_request if per_request else 0.0
    tokens = int(concurrency * max_len)
    fits = pool > 0 and fit_len >= max_len
    if not runner.keeps_kv_cache:  # only the scheduler bounds the batch; the rest must fit the budget
        concurrency, tokens = float(seqs), 0
        fits = requested >= non_kv + graphs
        notes.append("a bidirectional encoder on a pooling runner: vLLM allocates no KV cache")
    elif not fits and max_len <= derived:  # past the model's length, the note above says why
        notes.append(
            f"one request of {max_len} tokens needs {probe.kv_bytes_for(max_len, 1) / GIB:.2f} GiB of KV "
            f"cache, the pool has {pool / GIB:.2f} GiB (vLLM: estimated maximum model length is {fit_len})"
        )
    if (1 - util) * total < OVERHEADS["cuda_context"]["bytes"]:
        notes.append(
            "utilization leaves less than 0.5 GiB for the CUDA context: vLLM's free-memory check may fail"
        )
    return dataclasses.replace(
        probe,
        max_model_len=max_len,
        kv_cache_tokens=tokens,
        max_concurrency=concurrency,
        max_model_len_fit=fit_len,
        fits=fits,
        notes=tuple(notes),
    )


def _apply_calibration(
    cal: Calibration,
    spec: ModelSpec,
    config: ServeConfig,
    gpu_name: str,
    layout: KvLayout,
    weights: int,
    non_torch: int,
    activation: int,
    graphs: int,
    offload: int,
    runner: RunnerChoice = GENERATE,
    device: DeviceKind = CUDA,
) -> tuple[int, int, int, int, int, KvLayout]:
    """Replace estimated terms by measured ones; shift them by the estimated change since ``cal.config``."""
    base = cal.config or config
    same_split = (base.tensor_parallel_size, base.pipeline_parallel_size) == (
        config.tensor_parallel_size,
        config.pipeline_parallel_size,
    )
    # offload moves weights to CPU memory and nothing else: a launch at another amount measured them too
    # (what vLLM logged it moved, which a budget past the decoder layers' weights does not reach)
    offloaded_then = (
        cal.offloaded_bytes if cal.offloaded_bytes is not None else int(base.cpu_offload_gb * GIB)
    )
    moved = 0 if base.cpu_offload_gb == config.cpu_offload_gb else offloaded_then - offload
    if cal.weights_bytes is not None and same_split:
        weights = max(0, cal.weights_bytes + moved)
        moved = weights - cal.weights_bytes
    # activation and graphs at the calibrated config, by the same formulas, to carry the deltas
    base_len = (
        base.max_model_len if base.max_model_len and base.max_model_len > 0 else spec.derived_max_model_len
    )
    total = cal.total_bytes or 0
    b_seqs, b_batched = resolved_limits(
        spec, base, total or 80 * GIB, gpu_name, base_len, device, chunked_prefill=runner.chunked_prefill
    )
    act_then = activation_estimate(
        spec, max(1, base.tensor_parallel_size), b_batched, b_seqs, pooling=runner.pooling
    )
    graphs_then = cudagraph_estimate(spec, base, b_seqs, b_batched, gpu_name)
    if cal.cudagraph_bytes is not None and cal.cudagraph_bytes >= 0:
        if config.enforce_eager:
            graphs = 0
        elif not base.enforce_eager and graphs_then:
            graphs = int(cal.cudagraph_bytes * graphs / graphs_then)
    if cal.non_kv_bytes is not None and same_split:
        if cal.cudagraph_bytes == -1:  # only non_kv + graphs is known: carry the graph delta in it
            lumped = cal.non_kv_bytes + moved + (activation - act_then) + (graphs - graphs_then)
            non_kv_total = lumped - graphs
        else:
            non_kv_total = cal.non_kv_bytes + moved + (activation - act_then)
        if cal.activation_bytes is not None:
            activation = max(0, cal.activation_bytes + activation - act_then)
        non_torch = non_kv_total - weights - activation
        if non_torch < 0:
            activation, non_torch = max(0, activation + non_torch), 0
            weights = non_kv_total - activation - non_torch
        non_kv = non_kv_total
    else:
        non_kv = weights + non_torch + activation
    if cal.kv_bytes_per_token and cal.kv_pool_bytes and cal.config is not None:
        layout = _calibrated_layout(cal, spec, layout, base, base_len, b_batched)
    return weights, non_torch, activation, graphs, non_kv, layout


def _calibrated_layout(
    cal: Calibration, spec: ModelSpec, layout: KvLayout, base: ServeConfig, base_len: int, batched: int
) -> KvLayout:
    """Scale the page size when vLLM's measured tokens disagree with the layout by more than 1%."""
    assert cal.kv_pool_bytes is not None  # the caller calibrates the layout only from a measured pool
    then = kv_layout(
        spec, max(1, base.tensor_parallel_size), max(1, base.pipeline_parallel_size), base.kv_cache_dtype
    )
    in_flight = (max(1, base.pipeline_parallel_size) + 1) * batched
    per_request = then.blocks_per_request(base_len, in_flight)
    predicted = (
        int((cal.kv_pool_bytes // max(1, then.bytes_per_block)) / per_request * base_len)
        if per_request
        else 0
    )
    if not predicted or not cal.kv_cache_tokens:
        return layout
    ratio = predicted / cal.kv_cache_tokens
    if abs(ratio - 1) <= 0.01:
        return layout
    return dataclasses.replace(
        layout,
        bytes_per_block=max(1, int(layout.bytes_per_block * ratio)),
        bytes_per_token=int(layout.bytes_per_token * ratio),
    )
