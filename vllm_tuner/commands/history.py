"""``vllm-tune history``: past searches, ramps and deployments, or one run's trials."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import UsageError
from ..paths import default_db_path
from ..store import RunRecord, Store, TrialRecord
from ..units import GIB


@click.command(name="history")
@click.argument("run_id", type=int, required=False)
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The store (default: the user's).",
)
@click.option("json_", "--json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many runs to list."
)
def command(run_id: int | None, db_path: Path | None, json_: bool, limit: int) -> None:
    """List past runs (newest first), or the trials of RUN_ID.

    \b
    Examples:
      vllm-tune history
      vllm-tune history 3 --json
    """
    path = db_path or default_db_path()
    if not path.exists():
        if run_id is not None:
            raise UsageError(f"no store at {path}", "run 'vllm-tune find' first, or pass --db")
        click.echo("[]" if json_ else f"No runs recorded yet (no store at {path}).")
        return
    with Store.open(path) as store:
        if run_id is None:
            runs = store.runs(limit=limit)
            click.echo(json.dumps([asdict(r) for r in runs], indent=2) if json_ else runs_table(runs, path))
            return
        run = store.run(run_id)
        if run is None:
            raise UsageError(f"no run {run_id} in {path}", "see 'vllm-tune history' for the run ids")
        trials = store.trials(run_id)
    if json_:
        click.echo(json.dumps({"run": asdict(run), "trials": [asdict(t) for t in trials]}, indent=2))
    else:
        click.echo(run_detail(run, trials))


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return _dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _gpus(request: dict) -> str:
    value = next((request[k] for k in ("gpu_ids", "gpus", "gpu") if request.get(k) is not None), "-")
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value) or "-"
    name = request.get("gpu_name")
    return f"{value} ({name})" if name else str(value)


def _winner(run: RunRecord) -> str:
    result = run.result or {}
    for key in ("command", "summary", "winner"):
        value = result.get(key)
        if value:
            return str(value)
    return result.get("reason", "-") if result else "-"


def runs_table(runs: list[RunRecord], path: Path) -> str:
    if not runs:
        return f"No runs recorded yet in {path}."
    header = ("id", "started", "kind", "model", "gpus", "status", "launches", "winner")
    rows = [
        (
            str(r.id),
            _when(r.started_at),
            r.kind,
            str(r.request.get("model", "-")),
            _gpus(r.request),
            r.status,
            str(r.trial_count),
            _winner(r),
        )
        for r in runs
    ]
    return _table(header, rows)


def run_detail(run: RunRecord, trials: list[TrialRecord]) -> str:
    lines = [
        f"run {run.id}: {run.kind} {run.request.get('model', '-')} on {_gpus(run.request)} — {run.status}",
        f"  started {_when(run.started_at)}, finished {_when(run.finished_at)}, {len(trials)} launches",
        f"  result: {_winner(run)}",
        *(f"  warning: {w}" for w in (run.result or {}).get("warnings") or []),
    ]
    if trials:
        header = ("#", "verdict", "category", "secs", "headroom", "flags")
        rows = [
            (
                str(t.seq),
                t.verdict,
                t.category,
                f"{t.duration_s:.0f}",
                _headroom(t),
                _flags(t.config),
            )
            for t in trials
        ]
        lines += ["", _table(header, rows)]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(out)


def _headroom(trial: TrialRecord) -> str:
    """The least free memory under the load probe, "-" when it was not probed."""
    left = (trial.probe or {}).get("min_headroom_bytes")
    return f"{left / GIB:.2f} GiB" if left is not None else "-"


def _flags(config: dict) -> str:
    """A trial's config as the vLLM flags it was launched with (after ``serve MODEL``)."""
    from ..serveconfig import ServeConfig

    fields = {k: v for k, v in config.items() if k in ServeConfig.__dataclass_fields__}
    fields["extra_args"] = tuple(fields.get("extra_args") or ())
    try:
        return shlex.join(ServeConfig(**fields).serve_args()[2:])
    except TypeError:  # a record of another shape: as stored
        return " ".join(f"{k} {v}" if v is not True else k for k, v in config.items())
