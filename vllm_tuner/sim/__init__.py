"""``vllm_tuner.sim``: another name for :mod:`vllm_tuner.simlite`, the simulated vLLM and NVML.

``python -m vllm_tuner.sim`` runs the same executable, ``vllm_tuner.sim.activate`` is
``vllm_tuner.simlite.activate`` and :func:`truth` is the oracle ``vllm_tuner.simlite.oracle.truth``.
"""

from __future__ import annotations

from ..simlite.engine import Truth
from ..simlite.oracle import truth

__all__ = ["Truth", "truth"]
