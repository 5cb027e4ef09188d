"""Shared fixtures: isolated state for every test, and the simulated machine."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import pytest

from vllm_tuner.launch import ServerProcess
from vllm_tuner.logparse import LogWatcher
from vllm_tuner.simlite.activate import create
from vllm_tuner.simlite.state import live_procs


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """No test reads or writes the real home: state, HF cache, GPU locks and crash logs go to a temp folder."""
    home = tmp_path / "vllm-tune-home"
    monkeypatch.setenv("VLLM_TUNE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("VLLM_TUNE_LOCK_DIR", str(tmp_path / "gpu-locks"))  # the machine-wide one stays clean
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return home


@pytest.fixture
def sim(tmp_path, monkeypatch):
    """``sim(scenario, time_scale=..., **overrides) -> SimEnvironment``: a simulated machine, reached as
    the tuner reaches it under ``--simulate`` (``env.launcher()``, ``env.open_nvml()``). For the tests that
    run the CLI in-process as on a real machine (``--vllm-cmd env.vllm_cmd``, no ``--simulate``, which
    would boot a machine of its own), it also stands in for this machine until the test ends: its
    environment keys set and its ``pynvml`` as this process's (the tuner itself never does either).
    After the test no simulated server may survive."""
    made = []

    def make(scenario: str = "rtx-5090", *, time_scale: float = 400.0, **overrides):
        env = create(
            scenario, state_dir=tmp_path / f"sim-{len(made)}", time_scale=time_scale, overrides=overrides
        )
        for key, value in env.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setitem(sys.modules, "pynvml", env.nvml_module())
        made.append(env)
        return env

    yield make
    survivors = {}
    for env in made:
        survivors.update(live_procs(env.state_dir))
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, f"simulated vLLM processes survived the test: {sorted(survivors)}"


@pytest.fixture
def sim_server():
    """``with sim_server(env, config, log_path, *, nvml=None, wait=True, wait_release=True) as server``:
    the simulated vLLM of ``env`` on GPU 0 under the tuner's own :class:`ServerProcess`, started and
    (with ``wait``) ready, the test failing when it does not boot; stopped when the block ends."""

    @contextlib.contextmanager
    def serve(env, config, log_path, *, nvml=None, wait: bool = True, wait_release: bool = True):
        server = ServerProcess(
            env.launcher(),
            config,
            gpu_ids=[0],
            log_path=log_path,
            watcher=LogWatcher(),
            nvml=nvml,
            grace_s=3.0,
            release_timeout_s=5.0,
        )
        server.start()
        if wait:
            ready = server.wait_ready(timeout_s=30, stall_s=10)
            if not ready.ready:
                server.stop(wait_release=False)
                pytest.fail(f"simulated server did not boot: {ready.diagnosis}")
        try:
            yield server
        finally:
            server.stop(wait_release=wait_release)

    return serve
