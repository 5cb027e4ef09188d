"""The deployment file: several models that share GPUs, read from YAML and validated.

Every problem is one :class:`DeployError` line naming the key (``models[1].port``) and the fix. The
parsed :class:`Deployment` is plain data; nothing here touches a GPU or the network.

.. code-block:: yaml

    name: coder-and-general
    gpus: {count: 1, profile: rtx-pro-6000}     # or {ids: [0, 1]}, or {count: 2, memory: 24GiB}
    headroom: 1GiB                              # kept free on every GPU
    models:
      - name: coder
        model: Qwen/Qwen2.5-Coder-32B-Instruct-AWQ
        role: coder
        port: 8001
        needs: {min_context: 32768, min_seqs: 8, objective: concurrency}
        flags: {quantization: awq}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml

from .. import units
from ..errors import DeployError
from ..units import GIB, parse_duration
from ..vllmargv import as_option, flag_words, options

DEFAULT_HEADROOM_BYTES = GIB
DEFAULT_MIN_CONTEXT = 8192
OBJECTIVES = ("concurrency", "context", "fixed")
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Flags the plan sets itself; a deployment says what it needs instead.
PLANNED_FLAGS = {
    "port": "port",
    "host": "host (vllm-tune serves on 0.0.0.0)",
    "gpu-memory-utilization": "the plan (it is derived from the start order)",
    "kv-cache-memory-bytes": "the plan (an absolute KV budget per instance)",
    "kv-cache-memory": "the plan (an absolute KV budget per instance)",
    "max-model-len": "needs.min_context",
    "max-num-seqs": "needs.min_seqs",
    "tensor-parallel-size": "tensor_parallel_size",
    "tp": "tensor_parallel_size",
    "pipeline-parallel-size": "pipeline_parallel_size",
    "pp": "pipeline_parallel_size",
    "kv-cache-dtype": "kv_cache_dtype",
    "served-model-name": "served_model_name",
}


@dataclass(frozen=True)
class Needs:
    """What one model must be able to serve: ``min_seqs`` requests of ``min_context`` tokens at once."""

    min_context: int | None = None
    min_seqs: int = 1
    objective: str = "concurrency"  # what the spare memory buys: concurrency | context | fixed (nothing)


@dataclass(frozen=True)
class MemoryOverride:
    """Measured (or known) per-GPU numbers that replace the estimator for one model."""

    weights_bytes: int
    overhead_bytes: int
    kv_bytes_per_token: int
    max_context: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: str
    port: int
    role: str = ""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    served_model_name: str | None = None
    flags: tuple[str, ...] = ()
    needs: Needs = Needs()
    gpus: tuple[int, ...] | None = None  # pinned GPU ids (length = TP x PP)
    phase: str | None = None
    memory: MemoryOverride | None = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def min_seqs(self) -> int:
        return self.needs.min_seqs

    @property
    def public_name(self) -> str:
        """The name clients send in ``"model"``: the served name, else the model id (vLLM's default)."""
        return self.served_model_name or self.model


@dataclass(frozen=True)
class GpuSpec:
    """Which GPUs: ``ids`` on this machine, or ``count`` of them; ``profile``/``memory`` plan offline."""

    count: int | None = None
    ids: tuple[int, ...] | None = None
    profile: str | None = None
    memory_bytes: int | None = None
    device: str = "cuda"  # "cpu": vLLM's CPU backend, the "GPUs" are NUMA nodes

    @property
    def n(self) -> int:
        return len(self.ids) if self.ids is not None else int(self.count or 1)

    @property
    def offline(self) -> bool:
        return self.profile is not None or self.memory_bytes is not None


@dataclass(frozen=True)
class Deployment:
    name: str
    models: tuple[ModelEntry, ...]
    gpus: GpuSpec = GpuSpec(count=1)
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES
    cooldown_s: float = 0.0
    phases: tuple[str, ...] = ()
    source: str = "<deployment>"
    hosts: tuple[str, ...] = field(default_factory=tuple)  # multi-node (Ray) emitters only

    def model(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise DeployError(f"{self.source}: no model named {name!r}", f"use one of {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def check_phase(self, phase: str | None) -> None:
        """``--phase`` must name one of the file's phases (None: the first one, or none at all)."""
        if phase is None or phase in self.phases:
            return
        if not self.phases:
            raise DeployError(
                f"deployment {self.name!r} has no phases, so --phase {phase} has nothing to load",
                "drop --phase (a 'phases:' list and each model's 'phase:' in the file define phases)",
            )
        raise DeployError(f"{self.name} has no phase {phase!r}", f"use one of {', '.join(self.phases)}")

    @property
    def phased(self) -> bool:
        return bool(self.phases)

    def in_phase(self, phase: str | None) -> list[ModelEntry]:
        """The models resident in ``phase``: the always-on ones plus that phase's own."""
        return [m for m in self.models if m.phase is None or m.phase == phase]


# ---------------------------------------------------------------------------------------------- parsing


def load_deployment(path: str | Path) -> Deployment:
    """Read and validate a deployment file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeployError(
            f"cannot read deployment file {path}: {exc.strerror}",
            "pass the path of a YAML file, e.g. profiles/deployments/coder-general-96gb.yaml",
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DeployError(f"{path}: not valid YAML{where}", "fix the YAML syntax") from exc
    return parse_deployment(data, source=str(path), default_name=path.stem)


def parse_deployment(
    data: object, *, source: str = "<deployment>", default_name: str = "deployment"
) -> Deployment:
    """Validate a mapping (as loaded from YAML) into a :class:`Deployment`."""
    ctx = _Ctx(source)
    top = ctx.mapping(data, "", {"name", "gpus", "headroom", "cooldown", "phases", "models", "hosts"})
    name = str(top.get("name", default_name))
    if not NAME_PATTERN.match(name):
        ctx.fail(
            "name", f"{name!r} is not a valid deployment name", "use lowercase letters, digits and dashes"
        )
    gpus = _parse_gpus(ctx, top.get("gpus", {"count": 1}))
    headroom = ctx.size(top.get("headroom", DEFAULT_HEADROOM_BYTES), "headroom")
    cooldown = _parse_cooldown(ctx, top.get("cooldown", 0))
    raw_models = top.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        ctx.fail("models", "must be a non-empty list", "list at least one model with name, model and port")
    models = tuple(_parse_model(ctx, item, i, gpus) for i, item in enumerate(raw_models))
    _check_unique(ctx, models)
    phases = _parse_phases(ctx, top.get("phases"), models)
    hosts = tuple(str(h) for h in ctx.list_(top.get("hosts", []), "hosts"))
    return Deployment(
        name=name,
        models=models,
        gpus=gpus,
        headroom_bytes=headroom,
        cooldown_s=cooldown,
        phases=phases,
        source=source,
        hosts=hosts,
    )


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> NoReturn:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        raise DeployError(where + problem, fix)

    def mapping(self, value: object, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}", "write it as 'key: value' lines")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            prefix = f"{key}." if key else ""
            self.fail(prefix + unknown[0], "unknown key", f"use one of: {', '.join(sorted(allowed))}")
        return value

    def list_(self, value: object, key: str) -> list:
        if not isinstance(value, list):
            self.fail(key, f"must be a list, got {type(value).__name__}", "write it as [a, b] or '- a' lines")
        return value

    def integer(self, value: object, key: str, *, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(
                key,
                f"must be an integer >= {minimum}, got {value!r}",
                f"write e.g. {key.split('.')[-1]}: {max(minimum, 1)}",
            )
        return int(value)

    def size(self, value: object, key: str) -> int:
        try:
            return parse_size(value)
        except ValueError:
            self.fail(key, f"{value!r} is not a size", "write e.g. 1GiB, 512MiB or a number of bytes")
        raise AssertionError  # unreachable


def parse_size(value: object) -> int:
    """Bytes in ``96GiB``, ``1.5 GiB``, ``24GB`` (decimal), ``512MiB`` or a plain number of bytes (as
    vLLM's ``--kv-cache-memory-bytes`` takes them, and unlike ``--headroom``'s GiB on the command line)."""
    return units.parse_size(value, bare=1)


def _parse_cooldown(ctx: _Ctx, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    try:
        return parse_duration(str(value), option="cooldown")
    except Exception:
        ctx.fail("cooldown", f"{value!r} is not a duration", "write e.g. cooldown: 5s")
    raise AssertionError


def _parse_gpus(ctx: _Ctx, value: object) -> GpuSpec:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"count": value}
    raw = ctx.mapping(value, "gpus", {"count", "ids", "profile", "memory", "device"})
    ids = None
    if "ids" in raw:
        ids = tuple(ctx.integer(x, "gpus.ids", minimum=0) for x in ctx.list_(raw["ids"], "gpus.ids"))
        if not ids or len(set(ids)) != len(ids):
            ctx.fail("gpus.ids", "must list each GPU id once", "write e.g. ids: [0, 1]")
    count = ctx.integer(raw["count"], "gpus.count") if "count" in raw else None
    if ids is not None and count is not None and count != len(ids):
        ctx.fail(
            "gpus.count", f"is {count} but gpus.ids lists {len(ids)} GPU(s)", "drop count or make them agree"
        )
    profile = str(raw["profile"]) if raw.get("profile") is not None else None
    memory = ctx.size(raw["memory"], "gpus.memory") if raw.get("memory") is not None else None
    if profile and memory:
        ctx.fail("gpus.memory", "cannot be combined with gpus.profile", "keep one of them")
    if memory is not None and memory < GIB:
        ctx.fail(
            "gpus.memory", f"{memory} bytes is smaller than any GPU", "write the size with a unit, e.g. 24GiB"
        )
    device = str(raw.get("device") or "cuda")
    if device not in ("cuda", "cpu"):
        ctx.fail(
            "gpus.device",
            f"{device!r} is not a device vLLM runs on here",
            "write device: cuda or device: cpu",
        )
    return GpuSpec(
        count=count if ids is None else None, ids=ids, profile=profile, memory_bytes=memory, device=device
    )


_MODEL_KEYS = {
    "name",
    "model",
    "role",
    "port",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "kv_cache_dtype",
    "served_model_name",
    "flags",
    "needs",
    "gpus",
    "phase",
    "memory",
    "env",
}


def _parse_model(ctx: _Ctx, item: object, index: int, gpus: GpuSpec) -> ModelEntry:
    key = f"models[{index}]"
    raw = ctx.mapping(item, key, _MODEL_KEYS)
    for required in ("name", "model", "port"):
        if required not in raw:
            ctx.fail(f"{key}.{required}", "is missing", "every model needs name, model and port")
    name = str(raw["name"])
    if not NAME_PATTERN.match(name):
        ctx.fail(f"{key}.name", f"{name!r} is not a valid name", "use lowercase letters, digits and dashes")
    key = f"models[{index}] ({name})"
    port = ctx.integer(raw["port"], f"{key}.port", minimum=1)
    if port > 65535:
        ctx.fail(f"{key}.port", f"{port} is not a TCP port", "use a port between 1024 and 65535")
    tp = ctx.integer(raw.get("tensor_parallel_size", 1), f"{key}.tensor_parallel_size")
    pp = ctx.integer(raw.get("pipeline_parallel_size", 1), f"{key}.pipeline_parallel_size")
    pinned = None
    if raw.get("gpus") is not None:
        pinned = tuple(
            ctx.integer(x, f"{key}.gpus", minimum=0) for x in ctx.list_(raw["gpus"], f"{key}.gpus")
        )
        if len(pinned) != tp * pp or len(set(pinned)) != len(pinned):
            ctx.fail(
                f"{key}.gpus",
                f"pins {len(pinned)} GPU(s) but the model needs {tp * pp} (TP x PP), each once",
                "list one distinct GPU id per rank",
            )
        available = gpus.ids if gpus.ids is not None else tuple(range(gpus.n))
        missing = [g for g in pinned if g not in available]
        if missing:
            ctx.fail(
                f"{key}.gpus",
                f"GPU {missing[0]} is not among the deployment's GPUs {list(available)}",
                "pin one of the deployment's GPUs or add it under gpus.ids",
            )
    if tp * pp > gpus.n and pp == 1:
        ctx.fail(
            f"{key}.tensor_parallel_size",
            f"is {tp} but the deployment has {gpus.n} GPU(s)",
            "lower tensor_parallel_size or add GPUs",
        )
    return ModelEntry(
        name=name,
        model=str(raw["model"]),
        port=port,
        role=str(raw.get("role", "")),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        kv_cache_dtype=str(raw.get("kv_cache_dtype", "auto")),
        served_model_name=str(raw["served_model_name"]) if raw.get("served_model_name") else None,
        flags=_parse_flags(ctx, raw.get("flags", []), f"{key}.flags"),
        needs=_parse_needs(ctx, raw.get("needs", {}), f"{key}.needs"),
        gpus=pinned,
        phase=str(raw["phase"]) if raw.get("phase") is not None else None,
        memory=_parse_memory(ctx, raw["memory"], f"{key}.memory") if raw.get("memory") is not None else None,
        env=_parse_env(ctx, raw.get("env", {}), f"{key}.env"),
    )


def _parse_env(ctx: _Ctx, value: object, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        ctx.fail(
            key, "must be a mapping of environment variables", "write e.g. env: {VLLM_LOGGING_LEVEL: INFO}"
        )
    return tuple((str(k), str(v)) for k, v in value.items())


def _parse_needs(ctx: _Ctx, value: object, key: str) -> Needs:
    raw = ctx.mapping(value, key, {"min_context", "min_seqs", "objective"})
    min_context = (
        ctx.integer(raw["min_context"], f"{key}.min_context") if raw.get("min_context") is not None else None
    )
    min_seqs = ctx.integer(raw.get("min_seqs", 1), f"{key}.min_seqs")
    objective = str(raw.get("objective", "concurrency"))
    if objective not in OBJECTIVES:
        ctx.fail(
            f"{key}.objective", f"{objective!r} is not an objective", f"use one of {', '.join(OBJECTIVES)}"
        )
    return Needs(min_context=min_context, min_seqs=min_seqs, objective=objective)


def _parse_memory(ctx: _Ctx, value: object, key: str) -> MemoryOverride:
    raw = ctx.mapping(value, key, {"weights", "overhead", "kv_bytes_per_token", "max_context"})
    for required in ("weights", "kv_bytes_per_token"):
        if required not in raw:
            ctx.fail(f"{key}.{required}", "is missing", "give weights (per GPU) and kv_bytes_per_token")
    return MemoryOverride(
        weights_bytes=ctx.size(raw["weights"], f"{key}.weights"),
        overhead_bytes=ctx.size(raw.get("overhead", GIB), f"{key}.overhead"),
        kv_bytes_per_token=ctx.integer(raw["kv_bytes_per_token"], f"{key}.kv_bytes_per_token"),
        max_context=ctx.integer(raw["max_context"], f"{key}.max_context") if raw.get("max_context") else None,
    )


def _parse_flags(ctx: _Ctx, value: object, key: str) -> tuple[str, ...]:
    """Passthrough vLLM flags: a list of argv words, or a mapping ``{flag: value}`` (true -> ``--flag``)."""
    words: list[str] = []
    if isinstance(value, dict):
        for flag, arg in value.items():
            words += flag_words(as_option(str(flag)), arg)
    else:
        words = [str(w) for w in ctx.list_(value, key)]
    for option in options(words):
        flag = option.name[2:]
        if flag in PLANNED_FLAGS:
            ctx.fail(key, f"--{flag} is set by the plan", f"use {PLANNED_FLAGS[flag]} instead")
    return tuple(words)


def _check_unique(ctx: _Ctx, models: tuple[ModelEntry, ...]) -> None:
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, str] = {}
    for i, m in enumerate(models):
        if m.name in seen_names:
            ctx.fail(f"models[{i}].name", f"{m.name!r} is used twice", "give each model its own name")
        seen_names[m.name] = i
        if m.port in seen_ports:
            ctx.fail(
                f"models[{i}] ({m.name}).port",
                f"{m.port} is already used by {seen_ports[m.port]!r}",
                "give each model its own port",
            )
        seen_ports[m.port] = m.name


def _parse_phases(ctx: _Ctx, value: object, models: tuple[ModelEntry, ...]) -> tuple[str, ...]:
    used = []
    for m in models:
        if m.phase is not None and m.phase not in used:
            used.append(m.phase)
    if value is None:
        return tuple(used)
    phases = tuple(str(p) for p in ctx.list_(value, "phases"))
    if len(set(phases)) != len(phases):
        ctx.fail("phases", "lists a phase twice", "list each phase once, in serving order")
    for m in models:
        if m.phase is not None and m.phase not in phases:
            ctx.fail(
                f"models ({m.name}).phase",
                f"{m.phase!r} is not in phases {list(phases)}",
                "add it to phases or fix the spelling",
            )
    empty = [p for p in phases if p not in used]
    if empty:
        ctx.fail("phases", f"phase {empty[0]!r} has no model", "give it a model or drop it")
    return phases
