"""``python -m vllm_tuner.sim``: the simulated ``vllm`` executable (see :mod:`vllm_tuner.simlite`)."""

from __future__ import annotations

import sys

from ..simlite.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
