"""Which upstream serves a request: the routing table built from each upstream's ``/v1/models``. Pure.

A model name is what a client sends as ``"model"``: every ``id`` an upstream lists (its
``--served-model-name`` values, its LoRA adapters). Several upstreams listing one name are replicas: a
request goes to the one with the fewest requests in flight, ties taken in turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ProbeError


@dataclass(frozen=True)
class Upstream:
    url: str  # base URL, no trailing slash and no /v1: http://127.0.0.1:8001
    models: tuple[dict, ...]  # the entries of its /v1/models, as it listed them

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(m["id"]) for m in self.models)


@dataclass(frozen=True)
class RoutingTable:
    upstreams: tuple[Upstream, ...]

    def names(self) -> list[str]:
        """Every model name served, each once, in the order the upstreams were given."""
        return list(dict.fromkeys(n for u in self.upstreams for n in u.names))

    def serving(self, model: str) -> tuple[str, ...]:
        """The URLs of the upstreams that serve ``model`` (none: unknown)."""
        return tuple(u.url for u in self.upstreams if model in u.names)

    def entries(self) -> list[dict]:
        """``/v1/models``' data: each name's entry as its first upstream listed it."""
        seen: dict[str, dict] = {}
        for upstream in self.upstreams:
            for entry in upstream.models:
                seen.setdefault(str(entry["id"]), entry)
        return list(seen.values())

    def resolve(self, model: object) -> str | None:
        """The name a request means: its ``model``; without one, the only model served (as vLLM serves
        its one model), else None."""
        if isinstance(model, str) and model:
            return model
        names = self.names()
        return names[0] if len(names) == 1 else None


def routing_table(listings: Mapping[str, object]) -> RoutingTable:
    """The table from each upstream URL's ``/v1/models`` JSON; a listing that is not one is refused."""
    upstreams = []
    for url, listing in listings.items():
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and m.get("id") for m in data):
            raise ProbeError(
                f"{url}/v1/models did not answer an OpenAI model list",
                "point the proxy at vLLM servers (their base URL, e.g. http://127.0.0.1:8000)",
            )
        upstreams.append(Upstream(url, tuple(data)))
    return RoutingTable(tuple(upstreams))


def pick(candidates: tuple[str, ...], in_flight: Mapping[str, int], turn: int) -> str:
    """The least busy of ``candidates``; among the equally busy, the ``turn``-th (round robin)."""
    least = min(in_flight.get(url, 0) for url in candidates)
    idle = [url for url in candidates if in_flight.get(url, 0) == least]
    return idle[turn % len(idle)]


def base_url(text: str) -> str:
    """A server's base URL as the user may write it (``http://host:8000/v1/``) → ``http://host:8000``."""
    url = text.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
