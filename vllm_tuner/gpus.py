"""Which GPUs a command targets and how big they are.

Memory comes from NVML (through :mod:`vllm_tuner.nvml` only) when it answers; otherwise from
``--gpu NAME`` (``profiles/gpus.yaml``) or ``--gpu-memory SIZE``. An explicit size or name wins over
NVML, so estimates for another machine work anywhere. On ``--device cpu`` the reader passed in is the
NUMA nodes' (:class:`vllm_tuner.hostmem.HostNodes`): a "GPU" is then a node, and the messages say so by
the reader's ``unit``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import units
from .devices import unit_of
from .errors import GpuError, UsageError
from .nvml import open_nvml
from .paths import profiles_dir
from .units import GIB


@dataclass(frozen=True)
class GpuProfile:
    name: str
    total_bytes: int
    aliases: tuple[str, ...] = ()
    nvml: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class GpuTarget:
    """The GPUs one server would use: ``total_bytes`` is per GPU (the smallest when they differ)."""

    ids: tuple[int, ...]
    name: str
    total_bytes: int
    free_bytes: tuple[int, ...] | None = None
    source: str = "explicit"  # "nvml" | "profile" | "explicit"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.ids)


def parse_size(text: str, *, option: str = "--gpu-memory") -> int:
    """Bytes in ``32GiB``, ``32G`` (= GiB, as vLLM reads it), ``32GB`` (10^9), ``24000MiB``; a bare number is GiB."""
    try:
        size = units.parse_size(text, bare=GIB)
    except ValueError:
        size = 0
    if size <= 0:
        raise UsageError(
            f"{option} must be a size like 32GiB, 24000MiB or 80, got {text!r}", f"pass e.g. {option} 32GiB"
        )
    return size


def load_gpu_profiles() -> list[GpuProfile]:
    path = profiles_dir() / "gpus.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GpuError(f"cannot read {path}: {exc}", "reinstall vllm-tune or fix the file") from exc
    return [
        GpuProfile(
            name=str(g["name"]),
            total_bytes=int(float(g["total_gib"]) * GIB),
            aliases=tuple(str(a) for a in g.get("aliases") or ()),
            nvml=tuple(g.get("nvml") or ()),
            source=str(g.get("source") or ""),
        )
        for g in data.get("gpus") or []
    ]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("nvidia", "").replace("geforce", "")).strip("-")


def find_gpu_profile(name: str, profiles: Sequence[GpuProfile] | None = None) -> GpuProfile:
    """A profile by name or alias (case, spaces and dashes ignored); else GpuError with close matches."""
    profiles = list(profiles if profiles is not None else load_gpu_profiles())
    wanted = _norm(name)
    keys: dict[str, GpuProfile] = {}
    for p in profiles:
        for key in (p.name, *p.aliases):
            keys.setdefault(_norm(key), p)
    if wanted in keys:
        return keys[wanted]
    close = difflib.get_close_matches(wanted, list(keys), n=4, cutoff=0.5)
    names = sorted({keys[c].name for c in close}) or [p.name for p in profiles[:6]]
    raise GpuError(
        f"unknown GPU {name!r} (close: {', '.join(names)})",
        "pass one of those with --gpu, or give the size with --gpu-memory 32GiB",
    )


def profile_for_nvml_name(nvml_name: str, profiles: Sequence[GpuProfile] | None = None) -> GpuProfile | None:
    """The profile whose NVML substring is the longest match in ``nvml_name``."""
    best: tuple[int, GpuProfile] | None = None
    for p in profiles if profiles is not None else load_gpu_profiles():
        for sub in p.nvml:
            if sub.lower() in nvml_name.lower() and (best is None or len(sub) > best[0]):
                best = (len(sub), p)
    return best[1] if best else None


def _ids(gpus: int | None, gpu_ids: Sequence[int] | None) -> tuple[int, ...]:
    if gpus is not None and gpu_ids:
        raise UsageError("--gpus and --gpu-ids cannot be combined", "use one of them")
    if gpu_ids:
        if any(i < 0 for i in gpu_ids) or len(set(gpu_ids)) != len(gpu_ids):
            raise UsageError(
                f"--gpu-ids must be distinct non-negative integers, got {list(gpu_ids)}",
                "pass e.g. --gpu-ids 0,2",
            )
        return tuple(gpu_ids)
    if gpus is not None and gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}", "pass e.g. --gpus 1")
    return tuple(range(gpus or 1))


def resolve_gpus(
    *,
    gpus: int | None,
    gpu_ids: list[int] | None,
    gpu_name: str | None,
    gpu_memory: str | None,
    nvml_opener: Callable[[], Any] = open_nvml,  # an open memory reader (Nvml or HostNodes)
) -> GpuTarget:
    """The target GPUs: ``--gpu-memory`` > ``--gpu`` > NVML. ``nvml_opener`` returns an open Nvml;
    a session opened by the default opener is closed here, one passed in stays the caller's."""
    ids = _ids(gpus, gpu_ids)
    if gpu_memory:
        total = parse_size(gpu_memory)
        name = find_gpu_profile(gpu_name).name if gpu_name else ""
        return GpuTarget(ids=ids, name=name, total_bytes=total, source="explicit")
    if gpu_name:
        profile = find_gpu_profile(gpu_name)
        return GpuTarget(ids=ids, name=profile.name, total_bytes=profile.total_bytes, source="profile")
    try:
        nvml = nvml_opener()
    except GpuError as exc:
        raise GpuError(
            f"no GPU memory to estimate with: {exc.problem}",
            "pass --gpu NAME (e.g. --gpu rtx-4090) or --gpu-memory SIZE (e.g. --gpu-memory 24GiB)",
        ) from exc
    try:
        return _from_nvml(nvml, ids)
    finally:
        if nvml_opener is open_nvml:
            nvml.close()


def _from_nvml(nvml, ids: tuple[int, ...]) -> GpuTarget:
    """The target from an open memory reader: NVML's GPUs, or on ``--device cpu`` the NUMA nodes (whose
    ids need not be 0..N-1: a node without memory is no device). ``unit`` names one device of the reader
    ("GPU" where it has none)."""
    unit = unit_of(nvml)
    count = nvml.device_count()
    node_ids = getattr(nvml, "node_ids", None)
    present = list(node_ids()) if node_ids is not None else list(range(count))
    missing = [i for i in ids if i not in present]
    if missing:
        numbered = present == list(range(count))
        raise GpuError(
            f"asked for {unit}(s) {list(ids)} but this machine has {count} {unit}(s)"
            + ("" if numbered else f" ({', '.join(map(str, present))})"),
            (
                f"choose --gpus {count} or fewer, or --gpu-ids below {count}"
                if numbered
                else f"choose --gpu-ids from {', '.join(map(str, present))}"
            )
            if count
            else f"run on a machine with a {unit}",
        )
    devices = [nvml.device(i) for i in ids]
    memories = [nvml.memory(i) for i in ids]
    notes: tuple[str, ...] = ()
    if unit == "GPU":
        names = sorted({d.name for d in devices})
        if len(names) > 1:
            notes = (f"mixed GPUs ({', '.join(names)}): using the smallest memory",)
    elif min(m.total for m in memories) < 0.98 * max(m.total for m in memories):
        # nodes are named by their index, and their sizes differ by a few MiB of the kernel's anyway
        sizes = ", ".join(f"{unit} {m.index} {m.total / GIB:.1f} GiB" for m in memories)
        notes = (f"{unit}s of different sizes ({sizes}): using the smallest memory",)
    total = min(m.total for m in memories)
    return GpuTarget(
        ids=ids,
        name=devices[0].name,
        total_bytes=total,
        free_bytes=tuple(m.free for m in memories),
        source="nvml",
        notes=notes,
    )
