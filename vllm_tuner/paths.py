"""Where vllm-tune finds its bundled profiles and keeps its state."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def profiles_dir() -> Path:
    """The bundled ``profiles/`` folder: inside the wheel, or at the top of a source checkout."""
    installed = _PACKAGE / "_profiles"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "profiles"


def data_dir() -> Path:
    """The user's state directory: ``$VLLM_TUNE_HOME``, else ``$XDG_DATA_HOME/vllm-tune``."""
    explicit = os.environ.get("VLLM_TUNE_HOME")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "vllm-tune"


def default_db_path() -> Path:
    return data_dir() / "vllm-tune.db"
