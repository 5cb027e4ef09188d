"""One vLLM server configuration and its rendering as serve arguments and a ``--config`` YAML (the
command lines around them are :mod:`vllm_tuner.vllmargv`'s).

A :class:`ServeConfig` holds only the flags vllm-tune reasons about; anything else the user passes
through (``-- --trust-remote-code ...``) travels untouched in ``extra_args``. ``None`` means "leave
the flag unset and let vLLM choose its default".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .vllmargv import args_mapping

# The flags vllm-tune sets, in the order they are rendered. Field name -> vLLM flag.
TUNED_FLAGS: dict[str, str] = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "kv_cache_memory_bytes": "--kv-cache-memory-bytes",
    "kv_cache_dtype": "--kv-cache-dtype",
    "enforce_eager": "--enforce-eager",
    "cpu_offload_gb": "--cpu-offload-gb",
    "kv_offloading_size": "--kv-offloading-size",
    "load_format": "--load-format",
    "hf_overrides": "--hf-overrides",
}

# Flags whose change invalidates vLLM's torch.compile cache (ModelConfig/SchedulerConfig hashes).
RECOMPILE_FIELDS = frozenset(
    {"max_model_len", "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "hf_overrides"}
)


@dataclass(frozen=True)
class ServeConfig:
    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    cpu_offload_gb: float = 0.0
    kv_offloading_size: float | None = None
    load_format: str | None = None
    hf_overrides: str | None = None  # JSON text (a YaRN override: rope.Extension.flag_value)
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def replace(self, **changes: Any) -> ServeConfig:  # dataclasses.replace checks the names
        return dataclasses.replace(self, **changes)

    def flags(self) -> dict[str, object]:
        """The non-default tuned flags as ``{"--flag": value}`` (booleans as True)."""
        out: dict[str, object] = {}
        for name, flag in TUNED_FLAGS.items():
            value = getattr(self, name)
            if _is_default(name, value):
                continue
            out[flag] = value
        return out

    def serve_args(self) -> list[str]:
        """``["serve", MODEL, "--flag", "value", ...]`` without host and port."""
        argv = ["serve", self.model]
        for flag, value in self.flags().items():
            if value is True:
                argv.append(flag)
            else:
                argv += [flag, _render_value(value)]
        argv += list(self.extra_args)
        return argv

    def yaml_mapping(self, *, passed_through: bool = True) -> dict[str, object]:
        """The mapping for ``vllm serve --config file.yaml`` (keys without dashes): the tuned flags,
        then the passed-through ones (:func:`args_mapping`, whose ValueError says what a config file
        cannot hold)."""
        out: dict[str, object] = {"model": self.model}
        for flag, value in self.flags().items():
            out[flag.lstrip("-")] = value
        if passed_through:
            out.update(args_mapping(self.extra_args))
        return out

    def key(self) -> str:
        """A stable short hash of everything that reaches vLLM's command line."""
        blob = json.dumps(self.serve_args(), separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def recompiles_from(self, other: ServeConfig) -> bool:
        """True when going from ``other`` to this config invalidates vLLM's compile cache."""
        return any(getattr(self, f) != getattr(other, f) for f in RECOMPILE_FIELDS)


def _is_default(name: str, value: object) -> bool:
    if value is None:
        return True
    if name in ("tensor_parallel_size", "pipeline_parallel_size"):
        return value == 1
    if name == "kv_cache_dtype":
        return value == "auto"
    if name == "enforce_eager":
        return value is False
    if name == "cpu_offload_gb":
        return not value
    return False


def _render_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)
