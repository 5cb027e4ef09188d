"""Context past a model's trained length: ``--hf-overrides`` as vLLM 0.3x applies it, and the YaRN
override that ``--allow rope-scaling`` adds. Pure.

How vLLM 0.32 combines them (``ModelConfig.__post_init__``, ``_get_and_verify_max_len``,
``transformers_utils/config.py``):

- ``--hf-overrides`` keys with a flat value (``max_position_embeddings``) update the HF config before
  ``patch_rope_parameters`` runs; keys with a dict value (``rope_scaling``) are set afterwards, as they are:
  the dict replaces the model's whole RoPE dict (``rope_scaling`` is transformers 5's alias of
  ``rope_parameters``), is not patched (a legacy ``"type"`` without ``"rope_type"`` fails with
  ``KeyError: 'rope_type'``), and loses ``rope_theta`` and ``partial_rotary_factor`` unless it repeats
  them (vLLM's rotary embedding then falls back to base 10000 and a full rotary dimension). A dict under
  a sub-config key (``text_config``) is merged into it instead.
- The derived maximum length is the smallest length key (``max_position_embeddings``, ...), times the RoPE
  ``factor`` except for YaRN, llama3, longrope and DeepSeek's types, whose ``max_position_embeddings`` is
  taken as already scaled (and Gemma 3's). So ``{"rope_scaling": {yarn, factor 4}}`` alone leaves the
  length where it was (older vLLM multiplied it): ``max_position_embeddings`` has to say the new length.

Static YaRN scales the positions of every request, short ones too: vLLM has no dynamic YaRN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UsageError
from .models import MAX_LEN_KEYS, ModelSpec, text_config

ROPE_KEYS = ("rope_scaling", "rope_parameters")  # one dict in transformers 5: either name replaces it
SUB_CONFIGS = ("text_config", "language_config", "llm_config", "thinker_config", "vision_config")
YARN_TYPES = frozenset({"yarn", "deepseek_yarn"})
PLAIN_TYPES = frozenset({"default", "mrope"})  # RoPE without scaling (mrope: legacy name of default)
# positions that are learned or ALiBi, not rotary: nothing to stretch
NO_ROPE_MODEL_TYPES = frozenset({"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "bert", "roberta"})


def parse_hf_overrides(text: str, option: str = "--hf-overrides") -> dict:
    """The JSON object of ``--hf-overrides``, refused the way vLLM refuses it (one line)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{option} is not valid JSON ({exc}), and vLLM refuses it",
            "quote it for the shell, e.g. --hf-overrides '{\"max_position_embeddings\": 65536}'",
        ) from None
    if not isinstance(value, dict):
        raise UsageError(
            f"{option} must be a JSON object, got {type(value).__name__}",
            "pass e.g. --hf-overrides '{\"max_position_embeddings\": 65536}'",
        )
    for rope in _rope_dicts(value):
        if "rope_type" not in rope:
            raise UsageError(
                f'{option} sets a RoPE dict without "rope_type": vLLM 0.3x applies it as it is and fails '
                "with KeyError: 'rope_type'",
                'write "rope_type" (e.g. "rope_type": "yarn"), not the legacy "type"',
            )
    return value


def _rope_dicts(overrides: Mapping):
    for key, value in overrides.items():
        if key in ROPE_KEYS and isinstance(value, Mapping):
            yield value
        elif key in SUB_CONFIGS and isinstance(value, Mapping):
            yield from _rope_dicts(value)


def apply_hf_overrides(config: Mapping, overrides: Mapping) -> dict:
    """``config`` as vLLM sees it with ``--hf-overrides overrides``: flat keys set, a RoPE dict replacing
    the model's (under both its names), a sub-config merged key by key."""
    out = dict(config)
    for key, value in overrides.items():
        if key in SUB_CONFIGS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif key in ROPE_KEYS:
            for name in ROPE_KEYS:
                out.pop(name, None)
            out["rope_scaling"] = value
        else:
            out[key] = value
    return out


def _merge(target: Mapping, updates: Mapping) -> dict:
    """vLLM's ``_update_nested``: dicts inside a sub-config are merged, other values set."""
    out = dict(target)
    for key, value in updates.items():
        inner = out.get("rope_scaling") if key in ROPE_KEYS else out.get(key)
        if isinstance(value, Mapping) and isinstance(inner, Mapping):
            merged = _merge(inner, value)
            if key in ROPE_KEYS:
                out.pop("rope_parameters", None)
                key = "rope_scaling"
            out[key] = merged
        else:
            out[key] = value
    return out


def with_hf_overrides(spec: ModelSpec, text: str | None) -> ModelSpec:
    """``spec`` read again from its config with ``--hf-overrides text`` applied (no tokenizer cap: vLLM
    0.32 applies one to pooling models only)."""
    if not text:
        return spec
    config = apply_hf_overrides(spec.config, parse_hf_overrides(text))
    return ModelSpec.from_config(
        spec.name,
        config,
        serve_name=spec.serve_name,
        weights_bytes=spec.weights_bytes if spec.weights_exact else None,
        source=spec.source,
    )


# -- the rope-scaling knob ---------------------------------------------------------------------------
def rope_dict(text: Mapping) -> dict:
    """The model's RoPE dict (empty when it has none), with the legacy ``type`` read as ``rope_type``."""
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        return {}
    out = {k: v for k, v in rope.items() if k != "type"}
    out["rope_type"] = str(rope.get("rope_type") or rope.get("type") or "default")
    return out


@dataclass(frozen=True)
class Extension:
    """A YaRN override that makes vLLM take ``length`` tokens of a model trained for ``native``."""

    native: int  # the model's derived maximum length
    length: int  # the derived maximum length with the override
    original: int  # YaRN's original_max_position_embeddings
    factor: float
    configured_factor: float | None  # the YaRN factor the config already has (None: no RoPE scaling)
    overrides: dict

    @property
    def flag_value(self) -> str:
        """The ``--hf-overrides`` value (compact JSON)."""
        return json.dumps(self.overrides, separators=(",", ":"))

    @property
    def words(self) -> str:
        was = f", was ×{self.configured_factor:g}" if self.configured_factor else ""
        return f"YaRN ×{self.factor:g}{was} ({self.original:,} → {self.length:,} tokens)"

    @property
    def cost(self) -> str:
        if self.configured_factor:
            return (
                f"the model was trained with YaRN ×{self.configured_factor:g} to {self.native:,} tokens: past "
                "that its quality is untested, and the larger factor changes every request, short ones too"
            )
        return (
            f"static YaRN: vLLM scales every request's positions by {self.factor:g}, short ones too, which "
            "can degrade short texts; serve short traffic from a server without it"
        )


def extension(spec: ModelSpec, context: int, *, option: str = "--max-model-len") -> Extension:
    """The YaRN override that lets vLLM serve ``context`` tokens of ``spec``; UsageError (one line, with
    the longest length to use instead) where the model's positions cannot be stretched that way."""
    text = text_config(spec.config)
    native = spec.derived_max_model_len
    rope = rope_dict(text)
    kind = rope["rope_type"]
    refuse = f"use {option} {native} or less"
    if (
        not (text.get("rope_scaling") or text.get("rope_parameters"))
        and spec.model_type in NO_ROPE_MODEL_TYPES
    ):
        raise UsageError(
            f"{option} {context} is past the {native:,} positions {spec.serve_name} has, and its positions are "
            "not rotary: RoPE scaling cannot stretch them",
            refuse,
        )
    if kind not in YARN_TYPES | PLAIN_TYPES or spec.model_type.startswith("gemma3"):
        factor = rope.get("factor")
        scaled = f"{kind} ×{factor:g}" if isinstance(factor, (int, float)) else kind
        raise UsageError(
            f"{option} {context} is past the {native:,} tokens of {spec.serve_name}, whose RoPE is already "
            f"scaled ({scaled}): YaRN cannot be put on top of it in vLLM",
            refuse,
        )
    configured = float(rope["factor"]) if kind in YARN_TYPES and rope.get("factor") else None
    original = int(rope.get("original_max_position_embeddings") or 0)
    if not original:
        original = int(native / configured) if configured else native
    factor = math.ceil(context / original * 100) / 100
    length = max(context, round(original * factor))
    new_rope = {**rope, "rope_type": kind if kind in YARN_TYPES else "yarn"}
    new_rope.update(factor=factor, original_max_position_embeddings=original)
    # the dict replaces the model's whole RoPE dict in vLLM: repeat what the model set outside it
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in new_rope and isinstance(text.get(key), (int, float)):
            new_rope[key] = text[key]
    changes: dict = {"rope_scaling": new_rope}
    changes.update({k: length for k in MAX_LEN_KEYS if isinstance(text.get(k), (int, float))})
    changes.setdefault("max_position_embeddings", length)
    nested = next((k for k in SUB_CONFIGS if isinstance(spec.config.get(k), Mapping)), None)
    overrides = {nested: changes} if nested else changes
    return Extension(native, length, original, factor, configured, overrides)


def beyond_native(spec: ModelSpec, context: int, *, option: str = "--max-model-len") -> str:
    """Why vLLM refuses ``context`` past the model's length, and what would serve it: the YaRN override
    of ``--allow rope-scaling`` where the model takes one (never VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, which only
    lifts the check: the model then sees positions it never saw)."""
    native = spec.derived_max_model_len
    head = f"{option} {context} is past the {native:,} tokens {spec.serve_name} takes, and vLLM refuses it"
    try:
        ext = extension(spec, context, option=option)
    except UsageError as exc:
        return f"{exc.problem}; {exc.fix}"
    how = (
        f"its config has YaRN ×{ext.configured_factor:g} from {ext.original:,}"
        if ext.configured_factor
        else "no RoPE scaling in its config"
    )
    return (
        f"{head} ({how}; VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 would feed it positions it never saw); "
        f"--allow rope-scaling serves it with {ext.words}: {ext.cost}"
    )


def yarn_of(flag_value: str | None) -> tuple[float, int | None] | None:
    """(factor, length) of an ``--hf-overrides`` value that sets YaRN; None for any other value."""
    try:
        overrides = json.loads(flag_value or "")
    except ValueError:
        return None
    if not isinstance(overrides, dict):
        return None
    scope = next((overrides[k] for k in SUB_CONFIGS if isinstance(overrides.get(k), dict)), overrides)
    rope = next((scope[k] for k in ROPE_KEYS if isinstance(scope.get(k), dict)), None)
    if (
        not rope
        or rope.get("rope_type") not in YARN_TYPES
        or not isinstance(rope.get("factor"), (int, float))
    ):
        return None
    length = scope.get("max_position_embeddings")
    return float(rope["factor"]), int(length) if isinstance(length, (int, float)) else None


def describe(flag_value: str | None) -> str | None:
    """``YaRN ×4 to 131,072 tokens`` for an ``--hf-overrides`` value that sets YaRN (None otherwise)."""
    yarn = yarn_of(flag_value)
    if yarn is None:
        return None
    factor, length = yarn
    return f"YaRN ×{factor:g}" + (f" to {length:,} tokens" if length else "")
