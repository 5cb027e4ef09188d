"""The simulated vLLM's reading of ``--hf-overrides`` and of the derived maximum model length, as vLLM 0.32
does it (``engine/arg_utils.py`` ``union_dict_and_str``, ``ModelConfig.__post_init__``,
``transformers_utils/config.py`` ``patch_rope_parameters``, ``config/model.py`` ``_get_and_verify_max_len``).
Pure; independent of the tuner's own reader, so that the tuner can be wrong about it.

- The flag's value is JSON when it looks like ``{...}`` (invalid JSON is argparse's error); any other word
  stays a string, which ModelConfig's validation refuses.
- Keys with a flat value update the config before the RoPE patching (legacy ``type`` → ``rope_type``,
  ``rope_theta`` moved into the RoPE dict); keys with a dict value are set afterwards, as given: a RoPE
  dict replaces the model's (unpatched), a sub-config is merged key by key.
- The derived length is the smallest length key (``model_max_length`` wins), times the RoPE factor
  unless the type takes ``max_position_embeddings`` as already scaled (YaRN, llama3, longrope, DeepSeek's)
  or the model is a Gemma 3. A RoPE dict without ``rope_type`` fails there with ``KeyError: 'rope_type'``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass

LENGTH_KEYS = (
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
ROPE_NAMES = ("rope_scaling", "rope_parameters")  # one attribute in transformers 5
SUB_CONFIGS = ("text_config", "language_config", "llm_config", "thinker_config", "vision_config")
SCALED_ALREADY = frozenset({"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"})
DEFAULT_MAX_LEN = 2048  # no length key at all


def dict_or_str(value: str) -> dict | str:
    """``--hf-overrides``' argparse type (vLLM's ``union_dict_and_str``)."""
    if not re.match(r"(?s)^\s*{.*}\s*$", value):
        return str(value)
    try:
        return json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Value {value} cannot be converted to {json.loads}.") from None


def not_a_dict(value: str) -> str:
    """ModelConfig's validation error for an ``--hf-overrides`` word that is not JSON."""
    return (
        "pydantic_core._pydantic_core.ValidationError: 2 validation errors for ModelConfig\n"
        "hf_overrides.dict[str,any]\n"
        f"  Input should be a valid dictionary [type=dict_type, input_value={value!r}, input_type=str]\n"
        "hf_overrides.callable\n"
        f"  Input should be callable [type=callable_type, input_value={value!r}, input_type=str]"
    )


def with_overrides(config: dict, overrides: dict | None) -> dict:
    """The model's config as vLLM holds it after ``--hf-overrides``."""
    overrides = overrides or {}
    out = {**config, **{k: v for k, v in overrides.items() if not isinstance(v, dict)}}
    out = _patched(out)
    for key in SUB_CONFIGS:
        if isinstance(out.get(key), dict):
            out[key] = _patched(out[key])
    for key, value in overrides.items():
        if not isinstance(value, dict):
            continue
        if key in SUB_CONFIGS and isinstance(out.get(key), dict):
            out[key] = _update_nested(out[key], value)
        elif key in ROPE_NAMES:
            out.pop("rope_scaling", None)
            out["rope_parameters"] = value
        else:
            out[key] = value
    return out


def _patched(config: dict) -> dict:
    """transformers' ``standardize_rope_params`` after vLLM's ``patch_legacy_rope_type``."""
    out = dict(config)
    rope = out.pop("rope_scaling", None) or out.get("rope_parameters")
    theta = out.get("rope_theta")
    if not (isinstance(rope, dict) and rope) and theta is None:
        return out
    rope = dict(rope or {})
    if any(isinstance(v, dict) for v in rope.values()):  # per layer type: left as it is
        out["rope_parameters"] = rope
        return out
    kind = rope.get("rope_type") or rope.pop("type", None) or "default"
    rope["rope_type"] = {"su": "longrope", "mrope": "default"}.get(kind, kind)
    rope.setdefault("rope_theta", theta)
    if out.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", out["partial_rotary_factor"])
    out["rope_parameters"] = rope
    return out


def _update_nested(target: dict, updates: dict) -> dict:
    out = dict(target)
    for key, value in updates.items():
        name = "rope_parameters" if key in ROPE_NAMES else key
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _update_nested(out[name], value)
        else:
            out[name] = value
    return out


def derived_max_len(config: dict) -> tuple[int, str]:
    """(derived max_model_len, the key it came from). KeyError where a RoPE dict has no ``rope_type``."""
    text = next(
        (
            config[k]
            for k in ("text_config", "language_config", "llm_config")
            if isinstance(config.get(k), dict)
        ),
        config,
    )
    derived, key = float("inf"), "max_position_embeddings"
    for name in LENGTH_KEYS:
        value = text.get(name)
        if isinstance(value, (int, float)) and value < derived:
            derived, key = value, name
    if isinstance(text.get("model_max_length"), (int, float)) and text["model_max_length"]:
        derived, key = text["model_max_length"], "model_max_length"
    if derived == float("inf"):
        derived = DEFAULT_MAX_LEN
    rope = text.get("rope_parameters")
    layers = [rope] if isinstance(rope, dict) and rope else []
    if isinstance(rope, dict) and layers and all(isinstance(v, dict) for v in rope.values()):
        layers = [v for v in rope.values() if v]
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    if layers and "gemma3" not in model_type:
        factor = 1.0
        for params in layers:
            if params["rope_type"] not in SCALED_ALREADY:
                factor = params.get("factor", factor)
        derived *= factor if factor is not None else 1.0
    return int(derived), key


@dataclass(frozen=True)
class Dims:
    """The shape of a transformer as its HF config gives it (``text_config`` of a multimodal one), with
    the defaults the simulator assumes where a key is missing."""

    text: dict  # the config's text part, for the keys only one reader needs
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def dims(config: dict) -> Dims:
    """The transformer's shape from an HF config (nested ``text_config`` too)."""
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or 4096)
    heads = int(text.get("num_attention_heads") or 32)
    return Dims(
        text=text,
        layers=int(text.get("num_hidden_layers") or text.get("n_layer") or 32),
        hidden=hidden,
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or text.get("num_kv_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate=int(text.get("intermediate_size") or 4 * hidden),
        vocab=int(text.get("vocab_size") or 32000),
    )
