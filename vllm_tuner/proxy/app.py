"""The proxy's ASGI app (Starlette): one OpenAI-compatible endpoint in front of the upstreams.

``POST /v1/chat/completions`` (fitted into the upstream's context first), ``/v1/completions`` and
``/v1/embeddings`` go to the upstream that serves the request's ``model``, their answers relayed as they
arrive (SSE included, nothing buffered); ``GET /v1/models``, ``/health`` and ``/metrics`` are the proxy's
own. A client that goes away cancels what the proxy was doing for it, the upstream request included.
Every failure is answered in the OpenAI error shape; none shows a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .fit import MARGIN_TOKENS, ContextKeeper, Fitted, TooLong, length_error
from .metrics import ProxyMetrics
from .routing import RoutingTable, pick
from .upstream import CountRefused, CountUnavailable, Upstreams

CHAT = "/v1/chat/completions"
RELAYED = (CHAT, "/v1/completions", "/v1/embeddings")
COMPRESSED_HEADER = "x-vllm-tune-compressed"
REFRESH_EVERY_S = 5.0  # an unknown model re-reads the upstreams' listings at most this often
# headers that belong to one connection, not to the request or response relayed over it
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_SENT_ON = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}


def error_response(message: str, kind: str, code: int, param: str | None = None) -> JSONResponse:
    """The OpenAI error shape vLLM answers with."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, code)


class Router:
    """The routing table in use, the requests in flight per upstream, and the table's refresh."""

    def __init__(
        self,
        table: RoutingTable,
        discover: Callable[[], Awaitable[RoutingTable]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.discover = discover
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self._turn = 0
        self._refreshed = clock()

    async def upstream_for(self, model: str) -> str | None:
        urls = self.table.serving(model)
        if not urls and self.discover is not None and self.clock() - self._refreshed >= REFRESH_EVERY_S:
            self._refreshed = self.clock()
            self.table = await self.discover()
            urls = self.table.serving(model)
        if not urls:
            return None
        self._turn += 1
        return pick(urls, self.in_flight, self._turn)

    def begin(self, url: str) -> None:
        self.in_flight[url] = self.in_flight.get(url, 0) + 1

    def end(self, url: str) -> None:
        self.in_flight[url] = max(0, self.in_flight.get(url, 0) - 1)


class RelayedResponse(StreamingResponse):
    """An upstream's response relayed as its bytes arrive; the upstream is closed however it ends (a
    client that disconnects closes it at once, which is how vLLM learns to abort the request)."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: Mapping[str, str],
        on_close: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        super().__init__(self._chunks(upstream, on_error), status_code=upstream.status_code, headers=headers)
        self.upstream = upstream
        self.on_close = on_close

    @staticmethod
    async def _chunks(upstream: httpx.Response, on_error: Callable[[Exception], None]):
        try:
            if upstream.is_stream_consumed:  # an error answer the proxy read to judge it
                yield upstream.content
                return
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the upstream broke off: end the relayed body there
            on_error(exc)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_close()


@dataclass
class Proxy:
    router: Router
    upstreams: Upstreams
    keeper: ContextKeeper
    metrics: ProxyMetrics
    log: logging.Logger
    uncounted: set[str] = field(default_factory=set)  # upstreams whose /tokenize failed (warned once)

    # ---------------------------------------------------------------------------------------- own routes

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self.router.table.entries()})

    async def health(self, request: Request) -> Response:
        urls = [u.url for u in self.router.table.upstreams]
        states = await asyncio.gather(*(self.upstreams.healthy(u) for u in urls))
        upstreams = {u: "healthy" if ok else "unhealthy" for u, ok in zip(urls, states, strict=True)}
        healthy = bool(urls) and all(states)
        return JSONResponse(
            {"status": "healthy" if healthy else "unhealthy", "upstreams": upstreams}, 200 if healthy else 503
        )

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(self.router.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------------------ relayed routes

    async def relay(self, request: Request) -> Response:
        """Parse, route, then answer until the client leaves."""
        route = request.url.path
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._count(route, "", error_response(f"Invalid JSON body: {exc}", "BadRequestError", 400))
        if not isinstance(body, dict):
            return self._count(
                route, "", error_response("The request body must be a JSON object", "BadRequestError", 400)
            )
        model = self.router.table.resolve(body.get("model"))
        if model is None:
            names = ", ".join(self.router.table.names())
            return self._count(
                route,
                "",
                error_response(
                    f"Field required: model (this proxy serves {names})", "BadRequestError", 400, "model"
                ),
            )
        url = await self.router.upstream_for(model)
        if url is None:
            names = ", ".join(self.router.table.names())
            message = f"The model `{model}` does not exist. Valid aliases: {names}."
            # counted without the name: a client's made-up names must not make a series each
            return self._count(route, "", error_response(message, "NotFoundError", 404, "model"))
        self.router.begin(url)
        answered: Response | None = None
        try:
            answered = await until_disconnected(
                request, self._answer(route, url, model, body, raw, request.headers)
            )
        except httpx.TimeoutException as exc:
            answered = self._upstream_failed(url, "timeout", f"upstream {url} timed out: {exc!r}", 504)
        except httpx.HTTPError as exc:
            answered = self._upstream_failed(
                url, "unreachable", f"upstream {url} is unreachable: {exc!r}", 502
            )
        except Exception as exc:  # a bug: one line in the log, the OpenAI shape to the client
            self.log.error("%s %s: internal error %r", route, model, exc)
            answered = error_response(f"vllm-tune proxy internal error: {exc!r}", "InternalServerError", 500)
        finally:
            if not isinstance(answered, RelayedResponse):
                self.router.end(url)
        if answered is None:  # the client left
            return Response(status_code=499)
        return self._count(route, model, answered)

    async def _answer(
        self, route: str, url: str, model: str, body: dict, raw: bytes, headers: Mapping[str, str]
    ) -> Response:
        fitted: Fitted | None = None
        messages = body.get("messages")
        if (
            route == CHAT
            and isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) for m in messages)
        ):
            try:
                fitted = await self._fit(url, model, body)
            except TooLong as exc:
                return self._too_long(model, str(exc))
        response = await self._send(route, url, body, raw, headers, fitted)
        try:
            if fitted is not None and response.status_code == 400:
                said = length_error(await _error_message(response))
                if said is not None:  # counted to fit, refused as too long: compress tighter, once
                    self.metrics.add("length_retries_total", model=model)
                    over = said.prompt - fitted.after if said.prompt else fitted.max_len // 20
                    try:
                        refit = await self._fit(url, model, body, tighter_by=max(0, over) + MARGIN_TOKENS)
                    except TooLong as exc:
                        await response.aclose()
                        return self._too_long(model, str(exc))
                    if refit is not None:
                        await response.aclose()
                        fitted = refit
                        response = await self._send(route, url, body, raw, headers, fitted)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await response.aclose()
            raise
        return self._relayed(url, model, response, fitted)

    async def _fit(self, url: str, model: str, body: dict, *, tighter_by: int = 0) -> Fitted | None:
        """The chat fitted to ``url``'s context; None when it cannot be counted (sent as it came)."""
        try:
            return await self.keeper.fit(url, model, body, tighter_by=tighter_by)
        except CountRefused:  # the request is malformed: the upstream's own answer will say how
            return None
        except CountUnavailable as exc:
            self.metrics.add("uncounted_total", model=model)
            if url not in self.uncounted:
                self.uncounted.add(url)
                self.log.warning("chats to %s go uncounted: %s", url, exc)
            return None

    async def _send(
        self, route: str, url: str, body: dict, raw: bytes, headers: Mapping[str, str], fitted: Fitted | None
    ) -> httpx.Response:
        content = raw
        if fitted is not None and fitted.messages is not None:
            content = json.dumps({**body, "messages": fitted.messages}).encode()
        sent = {k: v for k, v in headers.items() if k.lower() not in NOT_SENT_ON}
        sent["accept-encoding"] = "identity"  # bytes relayed as they come are the bytes the client reads
        return await self.upstreams.open(url, route, content, sent)

    def _relayed(
        self, url: str, model: str, response: httpx.Response, fitted: Fitted | None
    ) -> RelayedResponse:
        headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        if fitted is not None and fitted.messages is not None:
            headers[COMPRESSED_HEADER] = fitted.note
            self.metrics.add("compressed_total", model=model, strategy=fitted.strategy)
            self.metrics.add("compressed_prompt_tokens_before_total", fitted.before, model=model)
            self.metrics.add("compressed_prompt_tokens_after_total", fitted.after, model=model)
            self.metrics.add("compressed_turns_total", fitted.turns, model=model)
            self.log.info(
                "%s: compressed a chat %s (%s, max-model-len %d); %s answered %d",
                model, fitted.note, fitted.strategy, fitted.max_len, url, response.status_code,
            )  # fmt: skip

        def broke_off(exc: Exception) -> None:
            self.metrics.add("upstream_errors_total", upstream=url, kind="broken_off")
            self.log.warning("upstream %s broke off a %s reply: %r", url, model, exc)

        return RelayedResponse(response, headers, on_close=lambda: self.router.end(url), on_error=broke_off)

    def _too_long(self, model: str, message: str) -> Response:
        self.metrics.add("too_long_total", model=model)
        self.log.info("%s: refused a chat: %s", model, message)
        return error_response(message, "BadRequestError", 400, "input_tokens")

    def _upstream_failed(self, url: str, kind: str, message: str, code: int) -> Response:
        self.metrics.add("upstream_errors_total", upstream=url, kind=kind)
        self.log.warning("%s", message)
        return error_response(message, "BadGatewayError" if code == 502 else "GatewayTimeoutError", code)

    def _count(self, route: str, model: str, response: Response) -> Response:
        self.metrics.add("requests_total", route=route, model=model, status=str(response.status_code))
        return response


async def _error_message(response: httpx.Response) -> str:
    """The message of an upstream's error answer (its body read; the response stays open to relay)."""
    text = (await response.aread()).decode(errors="replace")
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, LookupError, TypeError):
        return text


async def until_disconnected(request: Request, work: Coroutine[object, object, Response]) -> Response | None:
    """``work``'s response, or None when the client disconnects first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - whatever the cancelled work raised, the client is gone
        pass
    return None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(proxy: Proxy) -> Starlette:
    routes = [
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/health", proxy.health, methods=["GET"]),
        Route("/metrics", proxy.prometheus, methods=["GET"]),
        *(Route(path, proxy.relay, methods=["POST"]) for path in RELAYED),
    ]
    return Starlette(routes=routes)
