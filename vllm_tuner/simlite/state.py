"""The simulator's shared state folder (``$VLLM_TUNE_SIM_STATE``).

    scenario.json       the resolved scenario (GPUs, foreign memory, hidden truths, timing, faults)
    procs/<pid>.json    per live simulated server: {"gpus": {"0": bytes, ...}, "name": ...}
    compile/<key>       marker: torch.compile cache of a (model, max_model_len, seqs, batched) exists
    foreign.json        the foreign processes now, once a scripted co-tenant has released memory

Memory of a process whose pid is gone is released, so SIGKILL frees it like a real driver would.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

STATE_ENV = "VLLM_TUNE_SIM_STATE"
SCALE_ENV = "VLLM_TUNE_SIM_TIME_SCALE"


def state_dir() -> Path | None:
    value = os.environ.get(STATE_ENV)
    return Path(value) if value else None


def load_scenario(folder: Path) -> dict:
    return json.loads((folder / "scenario.json").read_text())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) holds no GPU memory
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields and fields[0] == "Z":
            return False
    return True


def write_proc(folder: Path, pid: int, per_gpu: dict[int, int], name: str = "vllm") -> None:
    procs = folder / "procs"
    procs.mkdir(parents=True, exist_ok=True)
    tmp = procs / f".{pid}.tmp"
    tmp.write_text(json.dumps({"gpus": {str(k): int(v) for k, v in per_gpu.items()}, "name": name}))
    tmp.replace(procs / f"{pid}.json")


def remove_proc(folder: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        (folder / "procs" / f"{pid}.json").unlink()


def live_procs(folder: Path) -> dict[int, dict[int, int]]:
    """pid -> {gpu: bytes} for every simulated server still alive (dead ones are cleaned up)."""
    out: dict[int, dict[int, int]] = {}
    procs = folder / "procs"
    if not procs.is_dir():
        return out
    for path in procs.glob("*.json"):
        try:
            pid = int(path.stem)
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out[pid] = {int(k): int(v) for k, v in data.get("gpus", {}).items()}
    return out


def foreign(folder: Path, scenario: dict) -> list[dict]:
    """The foreign (non-simulated) processes holding memory: the scenario's, as changed by faults."""
    path = folder / "foreign.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    return list(scenario.get("foreign", []))


def released(folder: Path) -> bool:
    """Whether the scripted co-tenant release (``faults: {profiling_release: ...}``) already happened."""
    return (folder / "foreign.json").is_file()


def release_foreign(folder: Path, scenario: dict, gpu: int, nbytes: int) -> None:
    """A foreign process on ``gpu`` frees up to ``nbytes`` (for good)."""
    procs = [dict(p) for p in foreign(folder, scenario)]
    for proc in procs:
        if int(proc["gpu"]) == gpu and nbytes > 0:
            freed = min(int(proc["bytes"]), nbytes)
            proc["bytes"] = int(proc["bytes"]) - freed
            nbytes -= freed
    tmp = folder / ".foreign.tmp"
    tmp.write_text(json.dumps([p for p in procs if int(p["bytes"]) > 0]))
    tmp.replace(folder / "foreign.json")


def others_bytes(folder: Path, scenario: dict, gpu: int, *, exclude_pid: int | None = None) -> int:
    """Memory on ``gpu`` held by foreign processes and by other live simulated servers."""
    foreign_ = sum(int(p["bytes"]) for p in foreign(folder, scenario) if int(p["gpu"]) == gpu)
    sims = sum(g.get(gpu, 0) for pid, g in live_procs(folder).items() if pid != exclude_pid)
    return foreign_ + sims
