"""The objectives of ``find``, registered here and only here (see ``base.Objective``).

A new objective is one module with an ``Objective`` subclass, and one line in ``_ALL``.
"""

from __future__ import annotations

from .base import Objective, Sizing
from .concurrency import CONCURRENCY
from .context import CONTEXT
from .targets import TARGETS
from .throughput import THROUGHPUT

_ALL: tuple[Objective, ...] = (CONTEXT, CONCURRENCY, TARGETS, THROUGHPUT)

REGISTRY: dict[str, Objective] = {o.name: o for o in _ALL}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# what find's --objective offers (the others have flags of their own)
BY_FLAG: tuple[str, ...] = tuple(o.name for o in _ALL if o.by_flag)


def named(name: str) -> Objective:
    """The objective ``name``; ValueError for one that is not registered."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}") from None


__all__ = ["BY_FLAG", "NAMES", "REGISTRY", "Objective", "Sizing", "named"]
