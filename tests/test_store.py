"""The SQLite store: migrations from blank, runs, trials, resume and known outcomes; ``history``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.errors import StoreError
from vllm_tuner.hashkey import stable_key
from vllm_tuner.store import MIGRATIONS, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "s.db", clock=Clock()) as opened:
        yield opened


def _trial(
    store: Store,
    run_id: int,
    key: str,
    *,
    env: str = "env-a",
    verdict: str = "stable",
    category: str = "success",
    started_at: float = 1.0,
) -> int:
    return store.record_trial(
        run_id,
        config={"--max-model-len": 32768, "--enforce-eager": True},
        config_key=key,
        env_fingerprint=env,
        category=category,
        verdict=verdict,
        facts={"kv_cache_tokens": 82192},
        probe={"p99_s": 1.5},
        started_at=started_at,
        duration_s=42.0,
        log_path="/tmp/trial.log",
    )


def test_migrations_from_blank_are_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "new.db"
    with Store.open(path) as first:
        assert first.applied_migrations() == [name for name, _ in MIGRATIONS]
        assert first.migrate() == []
    with Store.open(path) as again:
        assert again.applied_migrations() == [name for name, _ in MIGRATIONS]
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(trials)")}
    indexes = {row[1] for row in db.execute("PRAGMA index_list(trials)")}
    db.close()
    assert {
        "run_id",
        "seq",
        "config",
        "config_key",
        "env_fingerprint",
        "category",
        "verdict",
        "facts",
        "probe",
        "started_at",
        "duration_s",
        "log_path",
    } <= columns
    assert "trials_by_config" in indexes


def test_a_partly_migrated_store_gets_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    MIGRATIONS[0][1](db)
    db.execute("INSERT INTO _migrations VALUES (?, 0)", (MIGRATIONS[0][0],))
    db.commit()
    db.close()
    with Store.open(path) as store:
        assert store.applied_migrations() == [name for name, _ in MIGRATIONS]


def test_runs_and_trials_round_trip(store: Store) -> None:
    run_id = store.begin_run("find", "req-1", {"model": "qwen2.5-7b", "gpus": [0]}, "env-a")
    first = _trial(store, run_id, "cfg-1")
    second = _trial(store, run_id, "cfg-2", verdict="failed", category="oom_cudagraph_capture")
    trials = store.trials(run_id)
    assert [(t.id, t.seq, t.config_key) for t in trials] == [(first, 1, "cfg-1"), (second, 2, "cfg-2")]
    assert trials[0].config == {"--max-model-len": 32768, "--enforce-eager": True}
    assert list(trials[0].config) == ["--max-model-len", "--enforce-eager"]  # flag order kept
    assert trials[0].facts == {"kv_cache_tokens": 82192} and trials[0].probe == {"p99_s": 1.5}
    store.finish_run(run_id, "done", {"command": "vllm serve qwen2.5-7b --max-model-len 32768"})
    run = store.run(run_id)
    assert run is not None and run.status == "done" and run.trial_count == 2
    assert run.result == {"command": "vllm serve qwen2.5-7b --max-model-len 32768"}
    assert run.finished_at is not None and run.finished_at > run.started_at


def test_unfinished_run_is_found_for_resume(store: Store) -> None:
    done = store.begin_run("find", "req-1", {}, "env-a")
    store.finish_run(done, "done", {})
    assert store.unfinished_run("find", "req-1") is None
    crashed = store.begin_run("find", "req-1", {}, "env-a")  # left "running" by a crash
    assert store.unfinished_run("find", "req-1").id == crashed
    store.finish_run(crashed, "interrupted", {})
    assert store.unfinished_run("find", "req-1").id == crashed
    assert store.unfinished_run("ramp", "req-1") is None
    assert store.unfinished_run("find", "req-2") is None
    store.resume_run(crashed)
    assert store.run(crashed).status == "running"


def test_known_trial_is_the_latest_of_any_run_on_the_same_environment(store: Store) -> None:
    old_run = store.begin_run("find", "req-1", {}, "env-a")
    _trial(store, old_run, "cfg-1", verdict="failed", category="oom_at_runtime", started_at=10.0)
    new_run = store.begin_run("ramp", "req-9", {}, "env-a")
    _trial(store, new_run, "cfg-1", verdict="stable", started_at=20.0)
    known = store.known_trial("env-a", "cfg-1")
    assert known is not None and known.verdict == "stable" and known.run_id == new_run
    assert store.known_trial("env-b", "cfg-1") is None
    assert store.known_trial("env-a", "cfg-2") is None


def test_runs_newest_first_with_limit_and_kind(store: Store) -> None:
    ids = [store.begin_run(kind, f"r{i}", {}, "e") for i, kind in enumerate(["find", "ramp", "find", "ramp"])]
    assert [r.id for r in store.runs()] == ids[::-1]
    assert [r.id for r in store.runs(limit=2)] == ids[:1:-1]
    assert [r.id for r in store.runs(kind="find")] == [ids[2], ids[0]]


def test_bad_values_are_programming_errors(store: Store) -> None:
    with pytest.raises(ValueError):
        store.begin_run("search", "r", {}, "e")
    with pytest.raises(ValueError):  # up --tune records its find runs; nothing records an 'up' run
        store.begin_run("up", "r", {}, "e")
    run_id = store.begin_run("find", "r", {}, "e")
    with pytest.raises(ValueError):
        store.finish_run(run_id, "ok", {})
    with pytest.raises(StoreError, match="no run 999"):
        store.finish_run(999, "done", {})


def test_a_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    run_id = store.begin_run("find", "r", {}, "e")
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("UPDATE runs SET status = 'done' WHERE id = ?", (run_id,))
        raise RuntimeError("boom")
    assert store.run(run_id).status == "running"


def test_sqlite_errors_are_one_line_store_errors_with_the_path(tmp_path: Path) -> None:
    damaged = tmp_path / "bad.db"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as caught:
        Store.open(damaged)
    assert str(damaged) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(StoreError):
        Store.open(tmp_path)  # a directory


def test_default_path_follows_vllm_tune_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "home"))
    with Store.open() as store:
        assert store.path == tmp_path / "home" / "vllm-tune.db"
    assert store.path.exists()


def test_stable_key_ignores_key_order() -> None:
    assert stable_key({"a": 1, "b": [1, 2]}) == stable_key({"b": [1, 2], "a": 1})
    assert stable_key({"a": 1}) != stable_key({"a": 2})


# --------------------------------------------------------------------------------------------------
# history


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "h.db"
    with Store.open(path, clock=Clock()) as store:
        run_id = store.begin_run("find", "req", {"model": "qwen2.5-7b", "gpu_ids": [0, 1]}, "env")
        _trial(store, run_id, "cfg-1")
        store.finish_run(run_id, "done", {"command": "vllm serve qwen2.5-7b --max-model-len 32768"})
        store.begin_run("ramp", "req2", {"model": "llama-3.1-8b", "gpus": 1}, "env")
    return path


def test_history_table(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--db", str(filled)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "started", "kind", "model", "gpus", "status", "launches", "winner"]
    assert "llama-3.1-8b" in lines[1] and "running" in lines[1]
    assert "qwen2.5-7b" in lines[2] and "0,1" in lines[2] and "vllm serve qwen2.5-7b" in lines[2]


def test_history_of_one_run_as_json(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--db", str(filled), "--json", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"]["kind"] == "find" and report["run"]["trial_count"] == 1
    assert report["trials"][0]["config"] == {"--max-model-len": 32768, "--enforce-eager": True}


def test_history_one_run_as_text(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--db", str(filled), "1"]) == 0
    out = capsys.readouterr().out
    assert "run 1: find qwen2.5-7b" in out and "--max-model-len 32768 --enforce-eager" in out


def test_history_missing_run_and_missing_store(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "--db", str(filled), "7"]) == 2
    assert "no run 7" in capsys.readouterr().err
    empty = tmp_path / "none.db"
    assert main(["history", "--db", str(empty)]) == 0
    assert "No runs recorded yet" in capsys.readouterr().out
    assert not empty.exists()


def test_history_shows_a_find_trial_as_the_flags_it_was_launched_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "f.db"
    with Store.open(path, clock=Clock()) as store:
        run_id = store.begin_run("find", "req", {"model": "qwen2.5-7b", "gpu_ids": [0]}, "env")
        store.record_trial(
            run_id,
            config={  # as find records a trial: every ServeConfig field, unset ones as None
                "model": "Qwen/Qwen2.5-7B-Instruct",
                "tensor_parallel_size": 1,
                "max_model_len": 32768,
                "max_num_seqs": 8,
                "max_num_batched_tokens": None,
                "gpu_memory_utilization": 0.93,
                "kv_cache_dtype": "auto",
                "enforce_eager": False,
                "cpu_offload_gb": 0.0,
                "load_format": None,
                "extra_args": ["--served-model-name", "my model"],
            },
            config_key="k",
            env_fingerprint="env",
            category="success",
            verdict="stable",
            facts={},
            probe={"min_headroom_bytes": 3 << 29},
            started_at=1.0,
            duration_s=42.0,
            log_path=None,
        )
    assert main(["history", "--db", str(path), "1"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.endswith(
        "1.50 GiB  --max-model-len 32768 --max-num-seqs 8 --gpu-memory-utilization 0.93 "
        "--served-model-name 'my model'"
    )
    assert "None" not in row


def test_history_names_the_gpus_a_search_ran_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.db"
    with Store.open(path, clock=Clock()) as store:
        store.begin_run(
            "find", "req", {"model": "qwen2.5-7b", "gpu_ids": [0, 1], "gpu_name": "NVIDIA L40S"}, "e"
        )
    assert main(["history", "--db", str(path)]) == 0
    assert "0,1 (NVIDIA L40S)" in capsys.readouterr().out.splitlines()[1]
