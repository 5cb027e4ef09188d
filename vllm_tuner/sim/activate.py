"""Same as :mod:`vllm_tuner.simlite.activate`: ``create(scenario, ...) -> SimEnvironment``."""

from __future__ import annotations

from ..simlite.activate import SHIM_DIR, SimEnvironment, create, load_scenario_file, resolve, scenario_names

__all__ = ["SHIM_DIR", "SimEnvironment", "create", "load_scenario_file", "resolve", "scenario_names"]
