"""The SQLite store: every run (find, ramp, up) and every trial launch, kept across sessions.

One :class:`Store` owns the connection, the schema migrations and the transactions. Migrations are
named, applied in order, recorded in ``_migrations``, and safe to run again. Two things depend on it:

* resume: :meth:`Store.unfinished_run` finds the run an interrupted ``find`` left behind, and its
  trials replay the search to the same point;
* never twice: :meth:`Store.known_trial` returns the latest outcome of a config on the same
  environment (model, GPUs, driver, vLLM), so a config known to fail is not launched again.

Timestamps are Unix seconds (``float``); JSON columns come back parsed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import StoreError
from .paths import default_db_path

RUN_KINDS = ("find", "ramp")  # up --tune records the find runs it makes
RUN_STATUSES = ("running", "done", "failed", "interrupted")
UNFINISHED = ("running", "interrupted")


@dataclass(frozen=True)
class RunRecord:
    id: int
    kind: str
    request_key: str
    request: dict
    env_fingerprint: str
    status: str
    started_at: float
    finished_at: float | None
    result: dict | None
    trial_count: int = 0


@dataclass(frozen=True)
class TrialRecord:
    id: int
    run_id: int
    seq: int
    config: dict
    config_key: str
    env_fingerprint: str
    category: str
    verdict: str
    facts: dict
    probe: dict | None
    started_at: float
    duration_s: float
    log_path: str | None


# --------------------------------------------------------------------------------------------------
# Migrations: append only; never edit one that has shipped.


def _m001_runs_and_trials(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE IF NOT EXISTS runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            request_key TEXT NOT NULL,
            request TEXT NOT NULL,
            env_fingerprint TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            result TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE IF NOT EXISTS trials (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            config TEXT NOT NULL,
            config_key TEXT NOT NULL,
            env_fingerprint TEXT NOT NULL,
            category TEXT NOT NULL,
            verdict TEXT NOT NULL,
            facts TEXT NOT NULL,
            probe TEXT,
            started_at REAL NOT NULL,
            duration_s REAL NOT NULL,
            log_path TEXT,
            UNIQUE (run_id, seq)
        )"""
    )


def _m002_lookup_indexes(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX IF NOT EXISTS runs_by_request ON runs (kind, request_key, status)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS trials_by_config ON trials (env_fingerprint, config_key, started_at)"
    )


MIGRATIONS: tuple[tuple[str, Callable[[sqlite3.Connection], None]], ...] = (
    ("m001_runs_and_trials", _m001_runs_and_trials),
    ("m002_lookup_indexes", _m002_lookup_indexes),
)


class Store:
    """The one owner of the SQLite connection. Use :meth:`open`; close it or use ``with``."""

    def __init__(self, db: sqlite3.Connection, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self.path = path
        self._clock = clock

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) the store at ``path`` or the default path, and migrate it."""
        target = Path(path) if path is not None else default_db_path()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(target), timeout=10.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the store {target}: {exc}", "pass a writable path with --db"
            ) from exc
        store = cls(db, target, clock)
        try:
            with store._errors():
                db.execute("PRAGMA foreign_keys = ON")
                db.execute("PRAGMA busy_timeout = 10000")
            store.migrate()
        except BaseException:
            db.close()
            raise
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(
                f"the store {self.path} failed: {exc}", "check the file, or point --db at a new one"
            ) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception."""
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded; returns their names."""
        applied: list[str] = []
        with self.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
            for name, step in MIGRATIONS:
                if name in done:
                    continue
                step(db)
                db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, self._clock()))
                applied.append(name)
        return applied

    def applied_migrations(self) -> list[str]:
        with self._errors():
            return [row[0] for row in self._db.execute("SELECT name FROM _migrations ORDER BY rowid")]

    # -- runs ---------------------------------------------------------------------------------

    def begin_run(self, kind: str, request_key: str, request: dict, env_fingerprint: str) -> int:
        _check(kind, RUN_KINDS, "kind")
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (kind, request_key, request, env_fingerprint, status, started_at)"
                " VALUES (?, ?, ?, ?, 'running', ?)",
                (kind, request_key, _dump(request), env_fingerprint, self._clock()),
            )
            return int(cursor.lastrowid or 0)

    def unfinished_run(self, kind: str, request_key: str) -> RunRecord | None:
        """The most recent run of this kind and request that is still running or was interrupted."""
        rows = self._runs_where(
            "r.kind = ? AND r.request_key = ? AND r.status IN ('running', 'interrupted')",
            (kind, request_key),
            1,
        )
        return rows[0] if rows else None

    def resume_run(self, run_id: int) -> None:
        """Mark an unfinished run as running again (the caller is continuing it)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ?", (run_id,))

    def finish_run(self, run_id: int, status: str, result: dict | None = None) -> None:
        _check(status, RUN_STATUSES, "status")
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, result = ? WHERE id = ?",
                (status, self._clock(), _dump(result) if result is not None else None, run_id),
            )
            if cursor.rowcount != 1:
                raise StoreError(
                    f"the store {self.path} has no run {run_id}", "pass a run id from 'vllm-tune history'"
                )

    def run(self, run_id: int) -> RunRecord | None:
        rows = self._runs_where("r.id = ?", (run_id,), 1)
        return rows[0] if rows else None

    def runs(self, limit: int = 20, kind: str | None = None) -> list[RunRecord]:
        """The latest runs, newest first."""
        if kind is None:
            return self._runs_where("1 = 1", (), limit)
        return self._runs_where("r.kind = ?", (kind,), limit)

    def _runs_where(self, where: str, args: tuple, limit: int) -> list[RunRecord]:
        query = (
            "SELECT r.id, r.kind, r.request_key, r.request, r.env_fingerprint, r.status, r.started_at,"
            " r.finished_at, r.result, (SELECT COUNT(*) FROM trials t WHERE t.run_id = r.id)"
            f" FROM runs r WHERE {where} ORDER BY r.started_at DESC, r.id DESC LIMIT ?"
        )
        with self._errors():
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [
            RunRecord(
                id=row[0],
                kind=row[1],
                request_key=row[2],
                request=_load(row[3]) or {},
                env_fingerprint=row[4],
                status=row[5],
                started_at=row[6],
                finished_at=row[7],
                result=_load(row[8]),
                trial_count=row[9],
            )
            for row in rows
        ]

    # -- trials -------------------------------------------------------------------------------

    def record_trial(
        self,
        run_id: int,
        *,
        config: dict,
        config_key: str,
        env_fingerprint: str,
        category: str,
        verdict: str,
        facts: dict,
        probe: dict | None,
        started_at: float,
        duration_s: float,
        log_path: str | Path | None,
    ) -> int:
        with self.transaction() as db:
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM trials WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            cursor = db.execute(
                "INSERT INTO trials (run_id, seq, config, config_key, env_fingerprint, category, verdict, facts,"
                " probe, started_at, duration_s, log_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    seq,
                    _dump(config),
                    config_key,
                    env_fingerprint,
                    category,
                    verdict,
                    _dump(facts),
                    _dump(probe) if probe is not None else None,
                    started_at,
                    duration_s,
                    str(log_path) if log_path is not None else None,
                ),
            )
            return int(cursor.lastrowid or 0)

    def trials(self, run_id: int) -> list[TrialRecord]:
        """A run's trials in launch order."""
        return self._trials_where("run_id = ? ORDER BY seq", (run_id,))

    def known_trial(self, env_fingerprint: str, config_key: str) -> TrialRecord | None:
        """The latest trial of this config on this environment, from any run."""
        rows = self._trials_where(
            "env_fingerprint = ? AND config_key = ? ORDER BY started_at DESC, id DESC LIMIT 1",
            (env_fingerprint, config_key),
        )
        return rows[0] if rows else None

    def _trials_where(self, where: str, args: tuple) -> list[TrialRecord]:
        query = (
            "SELECT id, run_id, seq, config, config_key, env_fingerprint, category, verdict, facts, probe,"
            f" started_at, duration_s, log_path FROM trials WHERE {where}"
        )
        with self._errors():
            rows = self._db.execute(query, args).fetchall()
        return [
            TrialRecord(
                id=row[0],
                run_id=row[1],
                seq=row[2],
                config=_load(row[3]) or {},
                config_key=row[4],
                env_fingerprint=row[5],
                category=row[6],
                verdict=row[7],
                facts=_load(row[8]) or {},
                probe=_load(row[9]),
                started_at=row[10],
                duration_s=row[11],
                log_path=row[12],
            )
            for row in rows
        ]


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def _dump(value: object) -> str:
    return json.dumps(value, default=str)


def _load(text: str | None) -> dict | None:
    return json.loads(text) if text is not None else None
