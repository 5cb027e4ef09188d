"""Shared fixtures: isolated state for every test, and the simulated machine."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from vllm_tuner.simlite.activate import SHIM_DIR, create
from vllm_tuner.simlite.state import live_procs


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """No test reads or writes the real home: state, HF cache and crash logs go to a temp folder."""
    home = tmp_path / "vllm-tune-home"
    monkeypatch.setenv("VLLM_TUNE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return home


@pytest.fixture
def sim(tmp_path, monkeypatch):
    """``sim(scenario, time_scale=..., **overrides) -> SimEnvironment``, applied to this process
    (environment, ``pynvml`` from the shim). After the test no simulated server may survive."""
    made = []

    def make(scenario: str = "rtx-5090", *, time_scale: float = 400.0, **overrides):
        env = create(
            scenario, state_dir=tmp_path / f"sim-{len(made)}", time_scale=time_scale, overrides=overrides
        )
        for key, value in env.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.syspath_prepend(str(SHIM_DIR))
        module = sys.modules.get("pynvml")
        if module is not None and not str(getattr(module, "__file__", "")).startswith(str(SHIM_DIR)):
            monkeypatch.delitem(sys.modules, "pynvml")
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
