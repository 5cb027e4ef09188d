"""What ``find`` returns and how it says it: :class:`FindResult` (the serve command, the YAML file, the
JSON), :func:`explain` (why each knob ended where it did), :class:`UtilizationStep`, :func:`trial_json`.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..objectives.base import UTIL_STEP
from ..rope import describe
from ..search import (
    LOSSY_COST,
)
from ..serveconfig import ServeConfig
from ..trial import TrialOutcome
from ..units import GIB, MIB
from ..vllmargv import shell_command
from .request import FindRequest


@dataclass
class FindResult:
    request: FindRequest
    winner: TrialOutcome | None
    trials: list[TrialOutcome]
    launches: int
    reason: str
    complete: bool
    missing: tuple[str, ...] = ()
    gains: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what the trials showed the estimate got badly wrong
    utilization_step: UtilizationStep | None = None  # what 0.01 of utilization buys (with a winner)
    explanation: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    run_id: int | None = None

    @property
    def stable(self) -> bool:
        return self.winner is not None and self.winner.verdict == "stable"

    def final_config(self) -> ServeConfig | None:
        if self.winner is None:
            return None
        return self.winner.config.replace(load_format=None)

    def command(self) -> str | None:
        cfg = self.final_config()
        return shell_command(cfg.serve_args(), self.env, vllm_cmd=self.request.vllm_cmd) if cfg else None

    def yaml_text(self) -> str | None:
        cfg = self.final_config()
        if cfg is None:
            return None
        notes = "".join(f"# {line}\n" for line in self.explanation)
        try:
            mapping = cfg.yaml_mapping()
        except ValueError as exc:  # the passed-through flags stay on the command line
            mapping = cfg.yaml_mapping(passed_through=False)
            notes += f"# not in this file ({exc}), so also pass: {shlex.join(cfg.extra_args)}\n"
        run = shell_command(["serve", "--config", "this-file.yaml"], self.env, vllm_cmd=self.request.vllm_cmd)
        return (
            f"# {run}\n# (written by vllm-tune find; the environment is the one the trials ran with)\n{notes}"
            + yaml.safe_dump(mapping, sort_keys=False)
        )

    def as_json(self) -> dict[str, Any]:
        cfg = self.final_config()
        return {
            "command": self.command(),
            "config": {k: v for k, v in cfg.flags().items()} if cfg else {},
            "model": cfg.model if cfg else self.request.model,
            "stable": self.stable,
            "complete": self.complete,
            "reason": self.reason,
            "launches": self.launches,
            "explanation": self.explanation,
            "warnings": list(self.warnings),
            "missing": list(self.missing),
            "lossy_gains": list(self.gains),
            "utilization_step": self.utilization_step.as_json() if self.utilization_step else None,
            "config_file": str(self.config_path) if self.config_path else None,
            "run_id": self.run_id,
            "trials": [trial_json(t) for t in self.trials],
        }


def trial_json(t: TrialOutcome) -> dict[str, Any]:
    probe = t.probe
    return {
        "flags": t.config.flags(),
        "category": t.category,
        "verdict": t.verdict,
        "facts": t.facts,
        "duration_s": round(t.duration_s, 3),
        "min_headroom_gib": round(t.min_headroom_bytes / GIB, 3)
        if t.min_headroom_bytes is not None
        else None,
        "probe_failure": t.probe_failure or None,
        "preemptions": getattr(probe, "preemptions", None),
        "load": {
            "concurrency": t.probe_plan.concurrency,
            "prompt_tokens": t.probe_plan.prompt_tokens,
            "max_tokens": t.probe_plan.max_tokens,
        }
        if t.probe_plan
        else None,
        "log": str(t.log_path) if t.log_path else None,
    }


def explain(result: FindResult, total_bytes: int) -> list[str]:
    """Why each knob ended where it did, from the trials' own numbers."""
    lines = [f"warning: {warning}" for warning in result.warnings]
    w = result.winner
    if w is not None:
        cfg, f = w.config, w.facts
        pool, tokens = f.get("available_kv_gib"), f.get("kv_cache_tokens")
        if pool is not None and tokens is not None:
            # a pool given in bytes is known to the byte (vLLM prints two decimals of a GiB)
            size = (
                f"{pool:.2f} GiB"
                if cfg.kv_cache_memory_bytes is None
                else _pool_words(cfg.kv_cache_memory_bytes)
            )
            lines.append(
                f"KV pool {size} holds {int(tokens):,} tokens; --max-model-len {cfg.max_model_len} "
                f"at {cfg.max_num_seqs} sequence(s)"
            )
        if cfg.kv_cache_memory_bytes is not None:
            lines.append(_kv_bytes_words(result, cfg))
        elif result.utilization_step is not None:
            lines.append(result.utilization_step.words())
        util_words = f"{cfg.gpu_memory_utilization or 0:.2f}"
        failed = sorted(
            {
                (t.config.gpu_memory_utilization or 0, t.probe_failure or t.category.replace("_", " "))
                for t in result.trials
                if t.verdict in ("failed", "unstable")
                and (t.config.gpu_memory_utilization or 0) > (cfg.gpu_memory_utilization or 0)
            },
            reverse=True,
        )
        head = (
            f" with {w.min_headroom_bytes / GIB:.2f} GiB headroom under load"
            if w.min_headroom_bytes is not None
            else ""
        )
        if cfg.kv_cache_memory_bytes is not None:
            lines.append(f"the {_pool_words(cfg.kv_cache_memory_bytes)} KV pool stable{head}")
        elif failed:
            u, cat = failed[-1]
            lines.append(f"{u:.2f} failed ({cat}), {util_words} stable{head}")
        else:
            lines.append(f"--gpu-memory-utilization {util_words} stable{head}")
        yarn = describe(cfg.hf_overrides)
        lossy = [
            name
            for name, on in (
                ("--enforce-eager", cfg.enforce_eager),
                ("--kv-cache-dtype fp8", cfg.kv_cache_dtype != "auto"),
                ("--cpu-offload-gb", bool(cfg.cpu_offload_gb)),
                (f"--hf-overrides ({yarn})", bool(yarn)),
            )
            if on
        ]
        if lossy:
            lines.append("lossy knobs used because they were allowed and needed: " + ", ".join(lossy))
        if yarn:
            lines.append(
                f"{yarn} serves a length past the model's own: {LOSSY_COST['rope-scaling']}, which can "
                "degrade short texts (serve short traffic from a server without it)"
            )
    lines.append(f"{result.launches} launch(es); {result.reason}")
    lines.extend(result.missing)
    lines.extend(f"not allowed: {gain}" for gain in result.gains)
    return lines


def _kv_bytes_words(result: FindResult, cfg: ServeConfig) -> str:
    """Why the winner's pool is in bytes: the fraction a device's free memory refused (the last such
    refusal's numbers), and what the flag does instead."""
    unit = result.request.device_kind.unit
    refused = [t for t in result.trials if t.category == "startup_free_memory_below_utilization"]
    facts = refused[-1].facts if refused else {}
    free, total = facts.get("free_gib"), facts.get("total_gib")
    why = (
        f"the {unit} had only {free} of {total} GiB free for the fraction"
        if free and total
        else "free memory"
    )
    pool = cfg.kv_cache_memory_bytes or 0  # set: this is only said of a pool in bytes
    return (
        f"--kv-cache-memory-bytes {pool} ({_pool_words(pool)}) sizes the "
        f"KV pool for {cfg.max_num_seqs} x {cfg.max_model_len} tokens: {why}, and with the pool in bytes vLLM "
        "skips that startup check (no --gpu-memory-utilization: it would not be used)"
    )


def _pool_words(nbytes: int) -> str:
    """A pool in bytes for people: GiB, or MiB for one under a tenth of a GiB (a tiny model's)."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB // 10 else f"{nbytes / MIB:.1f} MiB"


@dataclass(frozen=True)
class UtilizationStep:
    """What one 0.01 of --gpu-memory-utilization buys on this machine: 1% of each device's total memory
    (vLLM's budget is a fraction of the total, device by device) and the KV tokens that holds at the
    winner's bytes per token on one device (the KV cache is split over TP, or, with MLA, whole on each)."""

    bytes_per_device: int
    devices: int
    tokens: int
    unit: str = "GPU"

    @classmethod
    def of(cls, total_bytes: int, devices: int, kv_bytes_per_token: int, unit: str) -> UtilizationStep:
        step = math.ceil(total_bytes * UTIL_STEP)
        return cls(step, devices, step // max(1, kv_bytes_per_token), unit)

    def words(self) -> str:
        per = self.bytes_per_device / GIB
        across = (
            f" ({per * self.devices:.2f} GiB over the {self.devices} {self.unit}s)"
            if self.devices > 1
            else ""
        )
        return (
            f"each 0.01 of --gpu-memory-utilization is {per:.2f} GiB per {self.unit}{across} and holds "
            f"{self.tokens:,} tokens of KV cache"
        )

    def as_json(self) -> dict[str, Any]:
        per = self.bytes_per_device / GIB
        return {
            "gib_per_device": round(per, 3),
            "gib_total": round(per * self.devices, 3),
            "tokens": self.tokens,
        }
