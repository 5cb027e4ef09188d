"""The flags of the ramped config: read from the command line (:func:`config_from_args`) or from the
serve command of a ``find --json`` file (:func:`read_find_result`, the one file the ramp reads).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..serveconfig import TUNED_FLAGS, ServeConfig
from ..vllmargv import options, parse_command, without

_FLAG_FIELDS = {flag: name for name, flag in TUNED_FLAGS.items()}
_BOOL_FIELDS = {"enforce_eager"}


def config_from_args(model: str, argv: Sequence[str], **given: object) -> ServeConfig:
    """A :class:`ServeConfig` from vLLM flags: the tuned ones become fields, the rest stays in
    ``extra_args``. ``given`` (from vllm-tune's own options) wins over the argv. The ramp sets
    ``--gpu-memory-utilization`` itself, so it is refused here."""
    fields: dict[str, Any] = {}  # ServeConfig field -> its value, as _convert typed it
    extra: list[str] = []
    words = list(argv)
    at = 0
    for option in options(words):
        extra += words[at : option.start]  # positional words
        at = option.stop
        name = _FLAG_FIELDS.get(option.name) if not option.key else None
        if name is None:
            extra += words[option.start : option.stop]
            continue
        if name == "gpu_memory_utilization":
            raise UsageError(
                "--gpu-memory-utilization is what the ramp sets at every step",
                "drop it and use --start/--step/--ceiling",
            )
        if name in _BOOL_FIELDS:
            fields[name] = True
            continue
        if option.value is None:
            raise UsageError(f"{option.name} needs a value", f"pass e.g. {option.name} 8")
        fields[name] = _convert(name, option.name, option.value)
    extra += words[at:]
    fields.update({k: v for k, v in given.items() if v is not None})
    return ServeConfig(model=model, extra_args=tuple(extra), **fields)


def _convert(name: str, flag: str, value: str) -> object:
    default = ServeConfig.__dataclass_fields__[name].default
    try:
        if name in ("kv_cache_dtype", "load_format", "hf_overrides"):
            return value
        if name in ("cpu_offload_gb", "kv_offloading_size") or isinstance(default, float):
            return float(value)
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} expects a number, got {value!r}", f"pass e.g. {flag} 8") from None


@dataclass(frozen=True)
class FindFlags:
    """What ``--from-find RESULT`` takes from a ``find --json`` file."""

    model: str
    args: tuple[str, ...]  # the serve flags after the model (host/port absent)
    gpu_ids: tuple[int, ...] | None
    vllm_cmd: str | None


def read_find_result(path: Path) -> FindFlags:
    """The model, flags and GPUs of the config a ``vllm-tune find --json`` run returned."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", "pass the file 'find --json' wrote") from exc
    except ValueError:
        raise UsageError(
            f"{path} is not JSON", "pass the output of 'vllm-tune find --json > result.json'"
        ) from None
    command = data.get("command") if isinstance(data, dict) else None
    if not command:
        raise UsageError(f"{path} holds no stable config (no 'command')", "run find until it returns one")
    found = parse_serve_command(command)
    return FindFlags(found.model, _without_utilization(found.args), found.gpu_ids, found.vllm_cmd)


def _without_utilization(args: Sequence[str]) -> tuple[str, ...]:
    """The flags less ``--gpu-memory-utilization`` (find's value; the ramp sets its own)."""
    return tuple(without(args, "--gpu-memory-utilization"))


def parse_serve_command(command: str) -> FindFlags:
    """``ENV=... <vllm cmd> serve MODEL --flags`` (or the server module's ``--model MODEL`` form) → model,
    flags, ``CUDA_VISIBLE_DEVICES``, the vLLM command."""
    found = parse_command(shlex.split(command))
    if found is None or len(found.serve_args) < 2:
        raise UsageError(f"not a vllm serve command: {command[:80]!r}", "pass the output of 'find --json'")
    ids = None
    if found.env.get("CUDA_VISIBLE_DEVICES"):
        try:
            ids = tuple(int(x) for x in found.env["CUDA_VISIBLE_DEVICES"].split(",") if x.strip())
        except ValueError:
            ids = None
    return FindFlags(
        model=found.serve_args[1],
        args=found.serve_args[2:],
        gpu_ids=ids,
        vllm_cmd=shlex.join(found.vllm_words) or None,
    )
