"""Starting the proxy: its upstreams (URLs given, or a running deployment's instances), the routing table
from their ``/v1/models``, the listening socket, and uvicorn serving the app until SIGINT or SIGTERM.

Bad input is refused before anything listens: an unknown deployment (``DeployError``), an upstream that
does not answer as vLLM does (``ProbeError``), a port in use (``LaunchError``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import click
import uvicorn

from ..deploy.state import DeploymentState, deployment_states
from ..errors import DeployError, LaunchError, ProbeError
from .app import Proxy, Router, create_app
from .cache import Lru
from .fit import ContextKeeper
from .metrics import ProxyMetrics
from .routing import RoutingTable, base_url, routing_table
from .upstream import UpstreamDown, Upstreams, make_http

LOG = logging.getLogger("vllm_tuner.proxy")
SUMMARIES_KEPT = 1024  # conversation prefixes whose summary the proxy remembers


def upstream_urls(
    targets: tuple[str, ...], states: Callable[[str], DeploymentState] | None = None
) -> list[str]:
    """Each target's upstreams: a URL is one; a deployment (its name or file) is its running instances,
    read by ``states`` (name -> state; the user's :func:`deployment_states`)."""
    states = states or deployment_states().load
    urls: list[str] = []
    for target in targets:
        if "://" in target:
            urls.append(base_url(target))
            continue
        state = states(_deployment_name(target))
        if not state.instances:
            raise DeployError(
                f"deployment {state.name!r} runs no instance", f"'vllm-tune status {state.name}' says why"
            )
        urls += [f"http://127.0.0.1:{inst.port}" for inst in state.instances]
    return list(dict.fromkeys(urls))


def _deployment_name(target: str) -> str:
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from ..deploy.spec import load_deployment

        return load_deployment(path).name
    return target


async def discover(targets: tuple[str, ...], upstreams: Upstreams, *, strict: bool) -> RoutingTable:
    """The routing table of what ``targets`` serve now. ``strict`` (at start): an upstream that does not
    answer is an error; otherwise it is left out."""
    urls = upstream_urls(targets)
    answers = await asyncio.gather(*(upstreams.listing(u) for u in urls), return_exceptions=True)
    listings = {}
    for url, answer in zip(urls, answers, strict=True):
        if isinstance(answer, UpstreamDown):
            if strict:
                raise ProbeError(
                    f"upstream {url} did not answer GET /v1/models ({answer})",
                    "start it, or check the URL (a vLLM server's base URL, e.g. http://127.0.0.1:8000)",
                )
            LOG.warning("upstream %s left out: %s", url, answer)
            continue
        if isinstance(answer, BaseException):
            raise answer
        listings[url] = answer
    return routing_table(listings)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn takes it so a port in use is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, as getaddrinfo names it for uvicorn's own sockets: asyncio sets TCP_NODELAY only on
    # connections of such a socket (without it every response waits 40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LaunchError(f"port {port} is in use on {host}", "choose another with --port") from exc
        raise LaunchError(
            f"cannot listen on {host}:{port}: {exc.strerror}", "check --host and --port"
        ) from exc
    return sock


def describe(table: RoutingTable, address: str, strategy: str) -> str:
    """What the proxy serves, as it starts."""
    lines = [f"vllm-tune proxy on {address}/v1 (compress: {strategy})"]
    width = max((len(n) for n in table.names()), default=0)
    for upstream in table.upstreams:
        for entry in upstream.models:
            limit = entry.get("max_model_len")
            suffix = f" (max-model-len {limit})" if limit else ""
            lines.append(f"  {str(entry['id']):<{width}}  -> {upstream.url}{suffix}")
    return "\n".join(lines)


async def serve(targets: tuple[str, ...], *, host: str, port: int, strategy: str) -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    async with make_http() as http:
        upstreams = Upstreams(http)
        table = await discover(targets, upstreams, strict=True)
        if not table.names():
            raise ProbeError(f"no upstream of {' '.join(targets)} serves a model", "check the URLs")
        sock = bind(host, port)
        metrics = ProxyMetrics()
        keeper = ContextKeeper(
            upstreams, strategy=strategy, summaries=Lru(SUMMARIES_KEPT), metrics=metrics, log=LOG
        )

        async def refresh() -> RoutingTable:
            try:
                return await discover(targets, upstreams, strict=False)
            except (DeployError, ProbeError) as exc:
                LOG.warning("routing table kept: %s", exc)
                return router.table

        router = Router(table, refresh)
        app = create_app(Proxy(router, upstreams, keeper, metrics, LOG))
        shown = f"[{host}]" if ":" in host else host
        click.echo(describe(table, f"http://{shown}:{port}", strategy))
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            log_level="warning",
        )
        try:
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            sock.close()
