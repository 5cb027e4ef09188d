"""The simulator's ground truth for weights: what each GPU holds once vLLM has loaded a model. Pure.

An independent model of vLLM's layers (it does not use the tuner's estimator): the decoder is walked
as vLLM builds it, parameter by parameter, each with the way vLLM places it on the GPUs of a
tensor-parallel group:

- ``VocabParallelEmbedding`` / ``ParallelLMHead``: the vocabulary padded to a multiple of 64 and split
  over TP (the LM head shares the embedding when ``tie_word_embeddings``); first / last PP stage only.
- Attention: ``QKVParallelLinear`` splits the query heads, and the KV heads while there are at least as
  many as ranks (each rank keeps ``max(1, kv_heads // tp)``); ``o_proj`` is split. MLA (DeepSeek-V2/V3,
  GLM-4.7-Flash): ``q_a`` / ``kv_a`` projections are ``ReplicatedLinear`` (whole on every rank),
  ``q_b`` / ``kv_b`` / ``o`` are split by heads, and after loading vLLM keeps ``W_UK_T`` and ``W_UV``
  (``kv_b_proj`` dequantized to the model dtype, ``mla_attention.py``) beside it.
- Dense MLP (``first_k_dense_replace`` layers, or every layer of a dense model): gate/up/down split
  over TP.
- MoE layers: the router (``GateLinear``, never quantized; fp32 in GLM-4 MoE, with an fp32
  ``e_score_correction_bias``), the routed experts (``FusedMoE``: every rank holds every expert with
  ``moe_intermediate_size // tp`` of its width, or with ``--enable-expert-parallel`` whole experts,
  ``E // tp`` of them plus one more on the first ``E % tp`` ranks, ``determine_expert_map``), and the
  shared experts (a TP-split MLP).
- Quantization shrinks the linear layers a checkpoint quantized (``ignore`` / ``modules_to_not_convert``
  keep theirs in the model dtype): AWQ/GPTQ (packed ints + fp16 scales and zeros per group), FP8
  (+ fp32 block scales), NVFP4 (4 bits + an fp8 scale per 16), MXFP4, int8.
- ``--cpu-offload-gb`` (UVA offload, ``offloader/uva.py``): parameters of the decoder layers, in
  order, are moved to CPU memory until the budget is reached (the last one may overshoot it); the
  embedding, the LM head and the final norm always stay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

VOCAB_PADDING = 64  # DEFAULT_VOCAB_PADDING_SIZE (vocab_parallel_embedding.py)
FP32_ROUTER_TYPES = ("glm4_moe", "glm4_moe_lite", "glm4_moe_lite_mtp")

REPLICATED, SPLIT, KV_HEADS, EXPERTS = "replicated", "split", "kv_heads", "experts"


@dataclass(frozen=True)
class Param:
    """One parameter (or a few fused ones) as vLLM allocates it.

    ``units`` is what TP divides (heads, output rows, the vocabulary); for routed experts it is the
    number of experts and ``width`` the intermediate size TP divides instead when experts are not
    spread by expert parallelism. ``dtype_bytes`` fixes the element size (None: the model dtype, or the
    checkpoint's quantization where ``quantizable``)."""

    name: str
    elements: int
    split: str = REPLICATED
    units: int = 1
    width: int = 1
    quantizable: bool = False
    dtype_bytes: float | None = None

    def local_elements(self, tp: int, expert_parallel: bool, rank: int) -> float:
        if self.split == REPLICATED:
            return self.elements
        if self.split == KV_HEADS:
            return self.elements / self.units * max(1, self.units // tp)
        if self.split == EXPERTS:
            if expert_parallel and tp > 1:
                base, extra = divmod(self.units, tp)
                return self.elements / self.units * (base + (1 if rank < extra else 0))
            return self.elements / self.width * (self.width // tp)
        return self.elements / self.units * (self.units // tp)


@dataclass(frozen=True)
class Quant:
    """A checkpoint's weight quantization: bytes per element of the layers it covers."""

    method: str
    linear_bytes: float
    ignore: tuple[str, ...] = ()

    def covers(self, name: str) -> bool:
        for rule in self.ignore:
            if rule.startswith("re:"):
                if re.match(rule[3:], name):
                    return False
            elif rule == name or name.endswith("." + rule) or f".{rule}." in f".{name}.":
                return False
        return True


@dataclass(frozen=True)
class Loaded:
    """What one GPU holds after loading."""

    bytes: int
    offloaded_bytes: int = 0
    local_experts: int | None = None  # with --enable-expert-parallel: this rank's routed experts


@dataclass(frozen=True)
class WeightLayout:
    """Every parameter of the model, grouped as vLLM places them."""

    embed: tuple[Param, ...]
    layers: tuple[tuple[Param, ...], ...]
    head: tuple[Param, ...]
    dtype_bytes: float
    quant: Quant | None
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    dense_intermediate: int = 0
    dense_layers: int = 0  # layers with a dense MLP

    def param_bytes(self, p: Param, tp: int, expert_parallel: bool, rank: int) -> float:
        if p.dtype_bytes is not None:
            per = p.dtype_bytes
        elif p.quantizable and self.quant is not None and self.quant.covers(p.name):
            per = self.quant.linear_bytes
        else:
            per = self.dtype_bytes
        return p.local_elements(tp, expert_parallel, rank) * per

    def total_bytes(self) -> int:
        """The whole model on one GPU (TP 1, nothing offloaded)."""
        return self.on_gpu(1, 1, False, 0).bytes

    def on_gpu(self, tp: int, pp: int, expert_parallel: bool, offload_bytes: int) -> Loaded:
        """The GPU of the group that holds the most (the one whose memory decides)."""
        busiest = None
        for stage in range(max(1, pp)):
            for rank in range(max(1, tp)):
                loaded = self._rank(tp, pp, stage, rank, expert_parallel, offload_bytes)
                if busiest is None or loaded.bytes > busiest.bytes:
                    busiest = loaded
        assert busiest is not None
        return busiest

    def _rank(self, tp: int, pp: int, stage: int, rank: int, ep: bool, offload_bytes: int) -> Loaded:
        first, last = pp_range(len(self.layers), pp, stage)
        kept = 0.0
        if stage == 0:
            kept += sum(self.param_bytes(p, tp, ep, rank) for p in self.embed)
        if stage == pp - 1:
            kept += sum(self.param_bytes(p, tp, ep, rank) for p in self.head)
        offloaded = 0.0
        for layer in self.layers[first:last]:
            for p in layer:
                size = self.param_bytes(p, tp, ep, rank)
                if offloaded < offload_bytes:  # per parameter, until the budget is reached
                    offloaded += size
                else:
                    kept += size
        local = None
        if ep and tp > 1 and self.experts:
            base, extra = divmod(self.experts, tp)
            local = base + (1 if rank < extra else 0)
        return Loaded(int(kept), int(offloaded), local)

    def mlp_width(self, tp: int, expert_parallel: bool) -> int:
        """Elements per token of the widest MLP a forward pass runs on one rank (gate, up and down
        outputs): a dense layer's ``3 × intermediate / tp``, an MoE layer's ``top_k × 3 × width`` of
        the experts it runs (their whole width with expert parallelism)."""
        widths = []
        if self.dense_layers:
            widths.append(3 * self.dense_intermediate // tp)
        if self.experts:
            moe = self.moe_intermediate if expert_parallel and tp > 1 else self.moe_intermediate // tp
            widths.append(self.experts_per_token * 3 * moe)
        return max(widths, default=0)


def pp_range(layers: int, pp: int, stage: int) -> tuple[int, int]:
    """vLLM's ``get_pp_indices``: an even split, the remainder on the stages before the last."""
    sizes = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        sizes[-i] += 1
    start = sum(sizes[:stage])
    return start, start + sizes[stage]


# -- reading a config ---------------------------------------------------------------------------------
def layout(config: Mapping) -> WeightLayout:
    """The parameters of an HF ``config.json`` mapping (its ``text_config`` for a multimodal model)."""
    text = config.get("text_config") or config
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    hidden = int(text.get("hidden_size") or 4096)
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 32)
    heads = int(text.get("num_attention_heads") or 32)
    kv_heads = int(text.get("num_key_value_heads") or text.get("num_kv_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    inter = int(text.get("intermediate_size") or 4 * hidden)
    vocab = int(text.get("vocab_size") or config.get("vocab_size") or 32000)
    padded = math.ceil(vocab / VOCAB_PADDING) * VOCAB_PADDING
    experts = int(
        text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts") or 0
    )
    moe_inter = int(text.get("moe_intermediate_size") or inter)
    first_dense = int(text.get("first_k_dense_replace") or 0)
    freq = int(text.get("moe_layer_freq") or text.get("decoder_sparse_step") or 1)
    dense_only = {int(i) for i in text.get("mlp_only_layers") or []}

    embed = (Param("model.embed_tokens", padded * hidden, SPLIT, padded),)
    head: tuple[Param, ...] = (Param("model.norm", hidden),)
    if not (text.get("tie_word_embeddings") or config.get("tie_word_embeddings")):
        head += (Param("lm_head", padded * hidden, SPLIT, padded),)
    all_layers = []
    dense_layers = 0
    for i in range(layers):
        prefix = f"model.layers.{i}"
        attn = _mla(text, prefix, hidden, heads) if text.get("kv_lora_rank") else None
        if attn is None:
            attn = _gqa(text, model_type, prefix, hidden, heads, kv_heads, head_dim)
        moe = bool(experts) and i >= first_dense and i % freq == 0 and i not in dense_only
        if moe:
            mlp = _moe(text, model_type, f"{prefix}.mlp", hidden, experts, moe_inter)
        else:
            dense_layers += 1
            mlp = _dense_mlp(f"{prefix}.mlp", hidden, inter)
        norms = (
            Param(f"{prefix}.input_layernorm", hidden),
            Param(f"{prefix}.post_attention_layernorm", hidden),
        )
        all_layers.append((*attn, *mlp, *norms))
    return WeightLayout(
        embed=embed,
        layers=tuple(all_layers),
        head=head,
        dtype_bytes=2.0,  # vLLM serves fp16/bf16 checkpoints (and fp32 ones, cast down) in 2 bytes
        quant=quantization(config),
        experts=experts,
        experts_per_token=int(text.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate=moe_inter if experts else 0,
        dense_intermediate=inter,
        dense_layers=dense_layers,
    )


def _linear(name: str, rows_in: int, rows_out: int, units: int, split: str = SPLIT) -> Param:
    return Param(name, rows_in * rows_out, split, units, quantizable=True)


def _gqa(text, model_type: str, prefix: str, hidden: int, heads: int, kv: int, hd: int) -> tuple[Param, ...]:
    a = f"{prefix}.self_attn"
    out = [
        _linear(f"{a}.q_proj", hidden, heads * hd, heads),
        _linear(f"{a}.k_proj", hidden, 2 * kv * hd, kv, KV_HEADS),  # k and v
        _linear(f"{a}.o_proj", heads * hd, hidden, heads),
    ]
    if text.get("attention_bias") or text.get("qkv_bias") or model_type.startswith("qwen2"):
        out += [
            Param(f"{a}.q_proj.bias", heads * hd, SPLIT, heads),
            Param(f"{a}.k_proj.bias", 2 * kv * hd, KV_HEADS, kv),
        ]
    return tuple(out)


def _mla(text, prefix: str, hidden: int, heads: int) -> tuple[Param, ...]:
    a = f"{prefix}.self_attn"
    nope, rope = int(text.get("qk_nope_head_dim") or 128), int(text.get("qk_rope_head_dim") or 64)
    v_dim, kv_lora = int(text.get("v_head_dim") or 128), int(text["kv_lora_rank"])
    q_lora = int(text.get("q_lora_rank") or 0)
    out = []
    if q_lora:
        out += [
            _linear(f"{a}.q_a_proj", hidden, q_lora + kv_lora + rope, 1, REPLICATED),  # fused with kv_a
            Param(f"{a}.q_a_layernorm", q_lora),
            _linear(f"{a}.q_b_proj", q_lora, heads * (nope + rope), heads),
        ]
    else:
        out += [
            _linear(f"{a}.q_proj", hidden, heads * (nope + rope), heads),
            _linear(f"{a}.kv_a_proj_with_mqa", hidden, kv_lora + rope, 1, REPLICATED),
        ]
    return (
        *out,
        Param(f"{a}.kv_a_layernorm", kv_lora),
        _linear(f"{a}.kv_b_proj", kv_lora, heads * (nope + v_dim), heads),
        _linear(f"{a}.o_proj", heads * v_dim, hidden, heads),
        # W_UK_T and W_UV: kv_b_proj dequantized and split, kept in the model dtype for decode
        Param(f"{a}.W_UK_T", kv_lora * heads * (nope + v_dim), SPLIT, heads, dtype_bytes=2.0),
    )


def _dense_mlp(prefix: str, hidden: int, inter: int) -> tuple[Param, ...]:
    return (
        _linear(f"{prefix}.gate_proj", hidden, 2 * inter, inter),  # gate_up_proj
        _linear(f"{prefix}.down_proj", inter, hidden, inter),
    )


def _moe(text, model_type: str, prefix: str, hidden: int, experts: int, moe_inter: int) -> tuple[Param, ...]:
    fp32 = model_type in FP32_ROUTER_TYPES
    router = [Param(f"{prefix}.gate", hidden * experts, dtype_bytes=4.0 if fp32 else None)]
    if fp32 or text.get("topk_method") == "noaux_tc":
        router.append(Param(f"{prefix}.gate.e_score_correction_bias", experts, dtype_bytes=4.0))
    routed = [
        Param(
            f"{prefix}.experts.w13_weight",
            experts * 2 * moe_inter * hidden,
            EXPERTS,
            experts,
            moe_inter,
            True,
        ),
        Param(f"{prefix}.experts.w2_weight", experts * moe_inter * hidden, EXPERTS, experts, moe_inter, True),
    ]
    shared_inter = int(text.get("n_shared_experts") or 0) * moe_inter + int(
        text.get("shared_expert_intermediate_size") or 0
    )
    shared = list(_dense_mlp(f"{prefix}.shared_experts", hidden, shared_inter)) if shared_inter else []
    if text.get("shared_expert_intermediate_size"):
        shared.append(Param(f"{prefix}.shared_expert_gate", hidden))
    return (*router, *routed, *shared)


def quantization(config: Mapping) -> Quant | None:
    """Bytes per element of the layers a checkpoint's ``quantization_config`` covers."""
    text = config.get("text_config") or {}
    q = (
        config.get("quantization_config")
        or config.get("compression_config")
        or text.get("quantization_config")
    )
    if not isinstance(q, Mapping):
        return None
    method = str(q.get("quant_method") or q.get("quantization") or "").lower()
    ignore = tuple(
        str(x) for x in (q.get("ignore") or q.get("ignored_layers") or q.get("modules_to_not_convert") or [])
    )
    if method in ("awq", "awq_marlin", "gptq", "gptq_marlin", "auto_round", "autoround"):
        bits = float(q.get("bits") or q.get("w_bit") or 4)
        group = int(q.get("group_size") or q.get("q_group_size") or 128)
        per_group = (2 + bits / 8) / group if group > 0 else 0.0  # an fp16 scale and a packed zero
        return Quant(method, bits / 8 + per_group, ignore)
    if method in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
        block = q.get("weight_block_size") or None
        return Quant("fp8", 1 + (4 / (block[0] * block[1]) if block else 0.0), ignore)
    if method in ("modelopt", "modelopt_fp4", "nvfp4"):
        algo = str(q.get("quant_algo") or (q.get("quantization") or {}).get("quant_algo") or "NVFP4").upper()
        return Quant("nvfp4", 0.5 + 1 / 16, ignore) if "FP4" in algo else Quant("fp8", 1.0, ignore)
    if method == "mxfp4":
        return Quant("mxfp4", 0.5 + 1 / 32, ignore)
    if method in ("compressed-tensors", "compressed_tensors"):
        weights: Mapping = {}
        for group in (q.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            break
        bits = int(weights.get("num_bits") or 8)
        kind = str(weights.get("type") or "int")
        if bits == 4 and (kind == "float" or "nvfp4" in str(q.get("format") or "")):
            return Quant("nvfp4", 0.5 + 1 / 16, ignore)  # e2m1 values, an fp8 scale per 16
        if bits == 4:
            group = int(weights.get("group_size") or 128)
            return Quant("int4", 0.5 + 2 / group, ignore)
        return Quant(f"{kind}{bits}", bits / 8, ignore)
    if method == "bitsandbytes":
        return Quant("bitsandbytes", 0.5 + 4 / 64 if q.get("load_in_4bit") else 1.0, ignore)
    if q.get("bits"):
        return Quant(method, float(q["bits"]) / 8, ignore)
    return None
