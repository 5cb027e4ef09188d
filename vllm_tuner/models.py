"""Model specs: what vLLM reads from a model's ``config.json`` and safetensors index.

``resolve_model(name)`` looks, in order, at a local directory, the local Hugging Face cache, the
Hugging Face hub (config and index only, when ``huggingface_hub`` is installed and the network
answers) and the bundled profiles in ``profiles/models/``. ``ModelSpec.from_config`` is the pure
part: it mirrors vLLM's config reading (vllm-internals.md §8): nested ``text_config``, kv-head
aliases, ``head_dim`` fallbacks, MLA latents replicated on every TP rank, sliding-window layer
patterns, hybrid Mamba/linear-attention state, ``quantization_config`` kinds and the derived
maximum model length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ModelError
from .paths import profiles_dir

KV_HEAD_ALIASES = (
    "n_head_kv",
    "num_kv_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "num_attention_groups",
)
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
MLA_MODEL_TYPES = frozenset(
    {
        "axk1",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "deepseek_v4",
        "deepseek_v41",
        "dots3_note",
        "deepseek_mtp",
        "k3_dspark",
        "glm5_next",
        "glm5_next_text",
        "glm_moe_dsa",
        "glm4_moe_lite",
        "glm4_moe_lite_mtp",
        "kimi_k2",
        "kimi_linear",
        "longcat_flash",
        "pangu_ultra_moe",
        "pangu_ultra_moe_mtp",
        "bailing_hybrid",
        "bailing_hybrid_mtp",
        "bailing_hybrid_v3_mtp",
        "hy_v4",
        "hy_v4_mtp",
    }
)
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp16": 2, "bf16": 2}
# RoPE types whose factor vLLM does not apply to the derived max length (§1 --max-model-len; vLLM 0.32's
# _get_and_verify_max_len: their max_position_embeddings is taken as already scaled).
UNSCALED_ROPE = frozenset(
    {"yarn", "deepseek_yarn", "deepseek_llama_scaling", "llama3", "longrope", "su", "default", "mrope"}
)


@dataclass(frozen=True)
class KvLayers:
    """A run of layers that keep the same kind of per-request state.

    kind: ``full`` (plain attention), ``sliding`` (``window`` tokens), ``mla`` (one latent per token,
    not sharded by TP) or ``mamba`` (a fixed state per sequence: ``state_bytes`` per layer at TP 1).
    """

    kind: str
    count: int
    num_kv_heads: int = 0
    head_size: int = 0
    head_size_v: int = 0
    window: int | None = None
    state_bytes: int = 0

    def heads_per_rank(self, tp: int) -> int:
        if self.kind == "mla":
            return 1
        return max(1, self.num_kv_heads // max(1, tp))


@dataclass(frozen=True)
class Quantization:
    """The checkpoint's weight format, normalised from ``quantization_config``."""

    method: str  # awq, gptq, fp8, nvfp4, mxfp4, int8, bitsandbytes, gguf, ...
    bits: float
    group_size: int = 0
    attention_unquantized: bool = False
    kv_cache_dtype: str | None = (
        None  # the checkpoint's own KV quantization ("fp8"), used by --kv-cache-dtype auto
    )

    def bytes_per_param(self) -> float:
        """Bytes per quantized parameter, scales and zero points included."""
        base = self.bits / 8
        if self.method in ("awq", "gptq", "compressed-tensors-int4") and self.group_size > 0:
            return base + (2 + self.bits / 8) / self.group_size  # fp16 scale + packed zero per group
        if self.method == "nvfp4":
            return base + 1 / 16  # one fp8 scale per 16 values
        if self.method == "mxfp4":
            return base + 1 / 32  # one e8m0 scale per 32 values
        if self.method == "bitsandbytes" and self.bits == 4:
            return base + 4 / 64  # fp32 absmax per 64 values (before double quantization)
        return base


@dataclass(frozen=True)
class ModelSpec:
    name: str
    serve_name: str
    config: dict
    weights_bytes: int
    weights_exact: bool
    derived_max_model_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_layers: tuple[KvLayers, ...]
    dtype: str = "bfloat16"
    quantization: Quantization | None = None
    model_type: str = ""
    num_params: int = 0
    rotary_dim: int = 0
    max_position: int = 0
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def is_mla(self) -> bool:
        return any(g.kind == "mla" for g in self.kv_layers)

    @property
    def is_hybrid(self) -> bool:
        return any(g.kind == "mamba" for g in self.kv_layers)

    @property
    def quantization_name(self) -> str | None:
        return self.quantization.method if self.quantization else None

    def rope_cache_bytes(self) -> int:
        """vLLM's cos/sin cache, allocated once per GPU beside the weights."""
        return self.max_position * self.rotary_dim * self.dtype_bytes

    def weights_per_gpu(self, tp: int = 1, pp: int = 1) -> int:
        return int(self.weights_bytes / (max(1, tp) * max(1, pp))) + self.rope_cache_bytes()

    def kv_heads(self) -> list[int]:
        """The KV head counts of the sharded attention layers (MLA's one latent is not sharded)."""
        return [g.num_kv_heads for g in self.kv_layers if g.kind in ("full", "sliding")]

    def shards_over(self, tp: int) -> bool:
        """Whether vLLM can shard the attention over ``tp`` GPUs: the query heads split evenly, and the
        KV heads too, or (fewer KV heads than GPUs) each is copied a whole number of times."""
        if self.num_attention_heads and self.num_attention_heads % tp:
            return False
        return all(kv % tp == 0 if tp <= kv else tp % kv == 0 for kv in self.kv_heads() if kv)

    def tp_sizes(self, up_to: int = 16) -> list[int]:
        """The tensor-parallel sizes up to ``up_to`` that vLLM can shard the model over."""
        return [t for t in range(1, up_to + 1) if self.shards_over(t)]

    @classmethod
    def from_config(
        cls,
        name: str,
        config: Mapping,
        *,
        serve_name: str | None = None,
        weights_bytes: int | None = None,
        source: str = "",
        tokenizer_max_len: int | None = None,
    ) -> ModelSpec:
        """Read a HF ``config.json`` mapping the way vLLM does. Pure."""
        raw = dict(config)
        text = text_config(raw)
        model_type = str(text.get("model_type") or raw.get("model_type") or "")
        hidden = int(_first(text, ("hidden_size", "n_embd", "d_model", "dim")) or 0)
        layers = int(_first(text, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")) or 0)
        heads = int(_first(text, ("num_attention_heads", "n_head", "n_heads")) or 0)
        vocab = int(text.get("vocab_size") or raw.get("vocab_size") or 0)
        if not (hidden and layers and vocab):
            raise ModelError(
                f"config of {name} lacks hidden_size, num_hidden_layers or vocab_size",
                "pass a model directory whose config.json describes a decoder LM",
            )
        dtype = _dtype(raw, text)
        quant = quantization_of(raw)
        kv = kv_layers_of(text, model_type, layers, heads, hidden)
        params = count_params(text, model_type, heads, hidden, layers, vocab)
        notes: list[str] = []
        full_precision = DTYPE_BYTES[dtype] == 4
        if full_precision:  # vLLM's --dtype auto (_resolve_auto_dtype) serves a float32 checkpoint in 16 bits
            dtype = "bfloat16"
            notes.append("float32 checkpoint: vLLM serves it in 16 bits (--dtype auto), weights and KV alike")
        if weights_bytes is None:
            weights_bytes = weights_from_params(text, model_type, heads, hidden, layers, vocab, dtype, quant)
            exact = False
            notes.append("weights computed from the architecture (no safetensors index)")
        else:
            exact = True
            if full_precision and quant is None:
                weights_bytes = int(weights_bytes) // 2
        rotary = _rotary_dim(text, model_type, hidden, heads)
        max_pos = int(text.get("max_position_embeddings") or 0)
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        if isinstance(rope, dict) and _rope_type(rope) == "linear" and not model_type.startswith("gemma3"):
            max_pos = int(max_pos * float(rope.get("factor") or 1))
        derived = derived_max_model_len(text, model_type, tokenizer_max_len)
        if any(g.kind == "mamba" for g in kv):
            notes.append("hybrid model: Mamba/linear-attention state sizes are approximate")
        return cls(
            name=name,
            serve_name=serve_name or name,
            config=raw,
            weights_bytes=int(weights_bytes),
            weights_exact=exact,
            derived_max_model_len=derived,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            kv_layers=tuple(kv),
            dtype=dtype,
            quantization=quant,
            model_type=model_type,
            num_params=params,
            rotary_dim=rotary,
            max_position=max_pos,
            source=source,
            notes=tuple(notes),
        )


# -- config reading (pure) ----------------------------------------------------------------------
def text_config(config: Mapping) -> dict:
    """``hf_text_config``: the language model's part of a multimodal config."""
    inner = config.get("text_config") or config.get("language_config") or config.get("llm_config")
    if isinstance(inner, Mapping):
        merged = dict(inner)
        for key in ("quantization_config", "torch_dtype", "dtype"):
            if key not in merged and key in config:
                merged[key] = config[key]
        return merged
    return dict(config)


def _first(cfg: Mapping, keys: tuple[str, ...]):
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def _dtype(raw: Mapping, text: Mapping) -> str:
    value = (
        text.get("torch_dtype")
        or text.get("dtype")
        or raw.get("torch_dtype")
        or raw.get("dtype")
        or "bfloat16"
    )
    value = str(value).replace("torch.", "")
    return value if value in DTYPE_BYTES else "bfloat16"


def _rope_type(rope: Mapping) -> str:
    return str(rope.get("rope_type") or rope.get("type") or "default")


def total_kv_heads(text: Mapping, model_type: str, heads: int) -> int:
    if model_type == "falcon" and text.get("multi_query") and not text.get("new_decoder_architecture"):
        return 1
    if model_type == "dbrx":
        return int((text.get("attn_config") or {}).get("kv_n_heads") or heads)
    if "n_heads_in_group" in text:
        return max(1, heads // int(text["n_heads_in_group"]))
    value = _first(text, KV_HEAD_ALIASES)
    return int(value) if value else heads


def head_size(text: Mapping, hidden: int, heads: int) -> int:
    hd = text.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        return hd
    if text.get("hidden_size_per_head"):
        return int(text["hidden_size_per_head"])
    return hidden // heads if heads else 0


def is_mla(text: Mapping, model_type: str) -> bool:
    return model_type in MLA_MODEL_TYPES and bool(
        text.get("kv_lora_rank") or (model_type == "deepseek_v4" and text.get("head_dim"))
    )


def _layer_kinds(text: Mapping, model_type: str, layers: int) -> list[str]:
    """Per-layer 'attention' | 'sliding' | 'mamba' from the config's layer pattern."""
    window = text.get("sliding_window") or None
    if text.get("use_sliding_window") is False:
        window = None
    types = text.get("layer_types")
    if isinstance(types, list) and len(types) >= layers:
        out = []
        for t in types[:layers]:
            t = str(t)
            if t in ("linear_attention", "mamba", "mamba2", "ssm"):
                out.append("mamba")
            elif t in ("sliding_attention", "local_attention", "sliding") and window:
                out.append("sliding")
            else:
                out.append("attention")
        return out
    block_types = text.get("layers_block_type") or text.get("hybrid_override_pattern")
    if isinstance(block_types, str):  # Nemotron-H pattern "M-M*-..."
        block_types = ["mamba" if c == "M" else "attention" if c == "*" else "mlp" for c in block_types]
    if isinstance(block_types, list) and block_types:
        kinds = [
            "mamba"
            if str(b) in ("mamba", "mamba2", "hybrid")
            else "attention"
            if str(b) == "attention"
            else "none"
            for b in block_types
        ]
        return kinds[:layers]
    attn_list = text.get("attn_type_list")
    if isinstance(attn_list, list) and attn_list:
        return ["attention" if int(a) == 1 else "mamba" for a in attn_list[:layers]]
    if window and model_type == "gemma2":
        return ["sliding" if i % 2 == 0 else "attention" for i in range(layers)]
    if window and model_type.startswith("gemma3"):
        pattern = int(text.get("sliding_window_pattern") or 6)
        return ["attention" if (i + 1) % pattern == 0 else "sliding" for i in range(layers)]
    if window and model_type == "gpt_oss":
        return ["sliding" if i % 2 == 0 else "attention" for i in range(layers)]
    if window and model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        max_window_layers = int(text.get("max_window_layers") or layers)
        return ["sliding" if i >= max_window_layers else "attention" for i in range(layers)]
    if window:
        return ["sliding"] * layers
    return ["attention"] * layers


def mamba_state_bytes(text: Mapping, dtype_bytes: int) -> int:
    """Conv + SSM state of one Mamba/linear-attention layer for one sequence at TP 1 (approximate)."""
    if text.get("linear_num_value_heads"):  # Qwen3-Next / Qwen3.5 gated delta net
        kh, vh = int(text.get("linear_num_key_heads") or 16), int(text["linear_num_value_heads"])
        kd, vd = int(text.get("linear_key_head_dim") or 128), int(text.get("linear_value_head_dim") or 128)
        conv = (int(text.get("linear_conv_kernel_dim") or 4) - 1) * (2 * kh * kd + vh * vd)
        return (conv + vh * kd * vd) * dtype_bytes
    d_state = int(text.get("mamba_d_state") or text.get("ssm_state_size") or text.get("state_size") or 128)
    d_conv = int(text.get("mamba_d_conv") or text.get("conv_kernel") or 4)
    hidden = int(text.get("hidden_size") or 0)
    inner = int(text.get("mamba_expand") or text.get("expand") or 2) * hidden
    if mamba2_heads := text.get("mamba_num_heads") or text.get("mamba_n_heads"):  # Mamba2
        nheads = int(mamba2_heads)
        head_dim = int(text.get("mamba_head_dim") or inner // nheads)
        groups = int(text.get("n_groups") or text.get("mamba_n_groups") or 1)
        conv = (d_conv - 1) * (nheads * head_dim + 2 * groups * d_state)
        return (conv + nheads * head_dim * d_state) * dtype_bytes
    return ((d_conv - 1) * inner + inner * d_state) * dtype_bytes  # Mamba1 (Jamba)


def kv_layers_of(text: Mapping, model_type: str, layers: int, heads: int, hidden: int) -> list[KvLayers]:
    if is_mla(text, model_type):
        latent = int(text.get("kv_lora_rank") or 0) + int(text.get("qk_rope_head_dim") or 0)
        if model_type == "deepseek_v4" and text.get("head_dim"):
            latent = int(text["head_dim"])
        return [KvLayers("mla", layers, 1, latent, 0)]
    kv_heads = total_kv_heads(text, model_type, heads)
    hs = head_size(text, hidden, heads)
    window = text.get("sliding_window") or None
    kinds = _layer_kinds(text, model_type, layers)
    counts = {k: kinds.count(k) for k in ("attention", "sliding", "mamba")}
    out = []
    if counts["attention"]:
        out.append(KvLayers("full", counts["attention"], kv_heads, hs, hs))
    if counts["sliding"]:
        assert window is not None  # a layer is sliding only where the config names a window
        out.append(KvLayers("sliding", counts["sliding"], kv_heads, hs, hs, window=int(window)))
    if counts["mamba"]:
        out.append(
            KvLayers(
                "mamba",
                counts["mamba"],
                state_bytes=mamba_state_bytes(text, DTYPE_BYTES.get(_dtype(text, text), 2)),
            )
        )
    return out


def derived_max_model_len(text: Mapping, model_type: str, tokenizer_max_len: int | None = None) -> int:
    """The smallest length key, scaled by the RoPE factor where vLLM scales it, capped by the tokenizer."""
    values = [int(text[k]) for k in MAX_LEN_KEYS if isinstance(text.get(k), (int, float)) and text[k] > 0]
    derived = min(values) if values else 2048
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if isinstance(rope, Mapping) and not model_type.startswith("gemma3"):
        kind = _rope_type(rope)
        if kind not in UNSCALED_ROPE and rope.get("factor"):
            derived = int(derived * float(rope["factor"]))
    if tokenizer_max_len and 0 < tokenizer_max_len < derived:
        derived = int(tokenizer_max_len)
    return derived


def _rotary_dim(text: Mapping, model_type: str, hidden: int, heads: int) -> int:
    if text.get("qk_rope_head_dim"):
        return int(text["qk_rope_head_dim"])
    hs = head_size(text, hidden, heads)
    factor = (
        text.get("partial_rotary_factor")
        or (text.get("rope_parameters") or {}).get("partial_rotary_factor")
        or 1.0
    )
    return int(hs * float(factor))


def quantization_of(raw: Mapping) -> Quantization | None:
    """Normalise ``quantization_config`` / ``compression_config`` (AWQ, GPTQ, FP8, NVFP4, bnb, ...)."""
    q = (
        raw.get("quantization_config")
        or raw.get("compression_config")
        or text_config(raw).get("quantization_config")
    )
    if not isinstance(q, Mapping):
        return None
    method = str(q.get("quant_method") or q.get("quantization") or "").lower()
    ignore = [
        str(x) for x in (q.get("ignore") or q.get("exclude_modules") or q.get("modules_to_not_convert") or [])
    ]
    attn_skip = any("attn" in x or "attention" in x for x in ignore)
    kv = None
    if method in ("awq", "awq_marlin", "gptq", "gptq_marlin", "auto_round", "autoround"):
        bits = float(q.get("bits") or q.get("w_bit") or 4)
        group = int(q.get("group_size") or q.get("q_group_size") or 128)
        name = "awq" if method.startswith("awq") else "gptq"
        return Quantization(name, bits, group if group > 0 else 0, attn_skip)
    if method in ("modelopt", "modelopt_fp4", "nvfp4"):
        algo = str(q.get("quant_algo") or (q.get("quantization") or {}).get("quant_algo") or "NVFP4").upper()
        kv_algo = q.get("kv_cache_quant_algo")
        kv = "fp8" if kv_algo and "FP8" in str(kv_algo).upper() else None
        if "FP4" in algo:
            return Quantization("nvfp4", 4, 16, attn_skip, kv)
        return Quantization("fp8", 8, 0, attn_skip, kv)
    if method in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
        return Quantization("fp8", 8, 0, attn_skip)
    if method == "mxfp4":
        return Quantization("mxfp4", 4, 32, True)
    if method == "bitsandbytes":
        return Quantization("bitsandbytes", 4 if q.get("load_in_4bit") else 8, 64, attn_skip)
    if method in ("compressed-tensors", "compressed_tensors"):
        fmt = str(q.get("format") or "").lower()
        groups = q.get("config_groups") or {}
        weights: dict = {}
        for group in groups.values() if isinstance(groups, Mapping) else []:
            weights = (group or {}).get("weights") or {}
            break
        bits = float(weights.get("num_bits") or 8)
        kind = str(weights.get("type") or "int")
        scheme = q.get("kv_cache_scheme")
        kv = "fp8" if isinstance(scheme, Mapping) and int(scheme.get("num_bits") or 8) == 8 else None
        if "nvfp4" in fmt or (bits == 4 and kind == "float"):
            return Quantization("nvfp4", 4, 16, attn_skip, kv)
        if bits == 8 and kind == "float":
            return Quantization("fp8", 8, 0, attn_skip, kv)
        if bits == 8:
            return Quantization("int8", 8, 0, attn_skip, kv)
        return Quantization(
            "compressed-tensors-int4", bits, int(weights.get("group_size") or 128), attn_skip, kv
        )
    if method == "gguf":
        return Quantization("gguf", 4.5, 0, False)
    if method:
        return Quantization(method, float(q.get("bits") or 8), int(q.get("group_size") or 0), attn_skip)
    return None


def count_params(text: Mapping, model_type: str, heads: int, hidden: int, layers: int, vocab: int) -> int:
    """Parameters by part: returns the total; :func:`param_parts` gives the split."""
    return sum(param_parts(text, model_type, heads, hidden, layers, vocab).values())


def param_parts(
    text: Mapping, model_type: str, heads: int, hidden: int, layers: int, vocab: int
) -> dict[str, int]:
    """Embedding, attention and MLP parameter counts (the linear layers are what quantization shrinks)."""
    tied = bool(text.get("tie_word_embeddings"))
    embed = vocab * hidden * (1 if tied else 2)
    if is_mla(text, model_type):
        nope, rope = int(text.get("qk_nope_head_dim") or 128), int(text.get("qk_rope_head_dim") or 64)
        v_dim, kv_lora = int(text.get("v_head_dim") or 128), int(text.get("kv_lora_rank") or 512)
        q_lora = int(text.get("q_lora_rank") or 0)
        q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
        attn = q + hidden * (kv_lora + rope) + kv_lora * heads * (nope + v_dim) + heads * v_dim * hidden
    else:
        hs = head_size(text, hidden, heads)
        kv_heads = total_kv_heads(text, model_type, heads)
        attn = hidden * heads * hs * 2 + 2 * hidden * kv_heads * hs
        if text.get("attention_bias") or model_type.startswith("qwen2"):
            attn += heads * hs + 2 * kv_heads * hs
    inter = int(text.get("intermediate_size") or text.get("ffn_hidden_size") or 4 * hidden)
    dense_mlp = 3 * hidden * inter
    experts = int(
        text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts") or 0
    )
    attn_layers = sum(1 for k in _layer_kinds(text, model_type, layers) if k != "mamba")
    mlp_total = dense_mlp * layers
    if experts:
        moe_inter = int(text.get("moe_intermediate_size") or inter)
        shared = int(text.get("n_shared_experts") or 0) * moe_inter + int(
            text.get("shared_expert_intermediate_size") or 0
        )
        first_dense = int(text.get("first_k_dense_replace") or 0)
        moe_layer = 3 * hidden * moe_inter * experts + 3 * hidden * shared + hidden * experts
        mlp_total = first_dense * dense_mlp + (layers - first_dense) * moe_layer
    mamba = 0
    if attn_layers < layers:  # hybrid: rough mixer size of the non-attention layers
        mamba = (layers - attn_layers) * 4 * hidden * hidden
    return {
        "embed": embed,
        "attn": attn * attn_layers,
        "mlp": mlp_total,
        "mamba": mamba,
        "norms": 2 * hidden * layers,
    }


def weights_from_params(
    text: Mapping,
    model_type: str,
    heads: int,
    hidden: int,
    layers: int,
    vocab: int,
    dtype: str,
    quant: Quantization | None,
) -> int:
    parts = param_parts(text, model_type, heads, hidden, layers, vocab)
    base = DTYPE_BYTES.get(dtype, 2)
    if quant is None:
        return int(sum(parts.values()) * base)
    per = quant.bytes_per_param()
    attn = parts["attn"] * (base if quant.attention_unquantized else per)
    return int(parts["embed"] * base + parts["norms"] * base + attn + (parts["mlp"] + parts["mamba"]) * per)


# -- resolution (I/O) ---------------------------------------------------------------------------
def resolve_model(name: str, *, allow_download: bool = True) -> ModelSpec:
    """A local dir, the HF cache, the hub (config + index only) or a bundled profile; else ModelError."""
    tried: list[str] = []
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _from_dir(path, name=path.name, serve_name=str(path), source=f"local directory {path}")
        tried.append(f"local directory {path} (no config.json)")
    else:
        tried.append("local directory")
    if "/" in name and not path.is_dir():
        snap = hf_cache_snapshot(name)
        if snap is not None:
            return _from_dir(snap, name=name, serve_name=name, source=f"HF cache {snap}")
        tried.append(f"HF cache ({hf_cache_root()})")
    profile = find_profile(name)
    if profile is not None:
        return profile
    tried.append(f"bundled profiles ({profiles_dir() / 'models'})")
    if "/" in name and allow_download:
        spec, why = _from_hub(name)
        if spec is not None:
            return spec
        tried.append(f"HF hub ({why})")
    raise ModelError(
        f"unknown model {name!r}: tried {', '.join(tried)}",
        "pass a local model directory, a cached HF id, or a profile name from profiles/models/",
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", "check that the file is valid JSON") from exc


def _from_dir(folder: Path, *, name: str, serve_name: str, source: str) -> ModelSpec:
    config = _read_json(folder / "config.json")
    weights = None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        total = (_read_json(index).get("metadata") or {}).get("total_size")
        weights = int(total) if total else None
    elif (folder / "model.safetensors").is_file():
        weights = _safetensors_single_size(folder / "model.safetensors")
    tok_max = None
    tok = folder / "tokenizer_config.json"
    if tok.is_file():
        value = _read_json(tok).get("model_max_length")
        tok_max = int(value) if isinstance(value, (int, float)) and value < 1e12 else None
    return ModelSpec.from_config(
        name, config, serve_name=serve_name, weights_bytes=weights, source=source, tokenizer_max_len=tok_max
    )


def _safetensors_single_size(path: Path) -> int | None:
    """Tensor bytes of a single-file checkpoint: file size minus its JSON header."""
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        return path.stat().st_size - 8 - header_len
    except OSError:
        return None


def hf_cache_root() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    home = os.environ.get("HF_HOME")
    return Path(home) / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub"


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the HF cache holding a config.json (``refs/main`` first)."""
    folder = hf_cache_root() / ("models--" + repo_id.replace("/", "--"))
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    candidates = sorted(
        (p for p in snapshots.iterdir() if (p / "config.json").is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return candidates[0] if candidates else None


def _from_hub(repo_id: str) -> tuple[ModelSpec | None, str]:
    try:
        from huggingface_hub import hf_hub_download  # optional: not a dependency
    except ImportError:
        return None, "huggingface_hub not installed: pip install 'vllm-tune[hub]'"
    try:
        config_path = Path(hf_hub_download(repo_id, "config.json"))
    except Exception as exc:  # network, auth, missing repo: all mean "not from the hub"
        return None, f"download failed: {type(exc).__name__}"
    try:
        hf_hub_download(repo_id, "model.safetensors.index.json")
    except Exception:
        pass
    return _from_dir(config_path.parent, name=repo_id, serve_name=repo_id, source="HF hub"), ""


def _profile_paths() -> list[Path]:
    folder = profiles_dir() / "models"
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def load_profile(path: Path) -> ModelSpec:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read model profile {path}: {exc}", "fix or remove the file") from exc
    return ModelSpec.from_config(
        str(data["name"]),
        data.get("config") or {},
        serve_name=str(data.get("hf_id") or data["name"]),
        weights_bytes=data.get("weights_bytes"),
        source=f"bundled profile {path.name}",
        tokenizer_max_len=data.get("tokenizer_model_max_length"),
    )


def profile_names() -> dict[str, Path]:
    """Every lower-cased name, hf_id and alias of the bundled profiles -> its file."""
    out: dict[str, Path] = {}
    for path in _profile_paths():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for key in [data.get("name"), data.get("hf_id"), *(data.get("aliases") or [])]:
            if key:
                out.setdefault(str(key).lower(), path)
    return out


def find_profile(name: str) -> ModelSpec | None:
    path = profile_names().get(name.lower())
    return load_profile(path) if path else None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "KvLayers",
    "ModelSpec",
    "Quantization",
    "resolve_model",
    "find_profile",
    "profile_names",
    "hf_cache_snapshot",
    "hf_cache_root",
    "text_config",
    "derived_max_model_len",
    "quantization_of",
    "weights_from_params",
]
