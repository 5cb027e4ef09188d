"""The proxy's HTTP to its upstreams (one pooled ``httpx.AsyncClient``, injected): listings, health,
exact token counts from vLLM's ``/tokenize``, summaries written by the upstream model, and the requests it
relays. httpx's errors become :class:`UpstreamDown`, :class:`CountUnavailable` or :class:`SummaryFailed`
here; a relayed request's are the app's to answer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping

import httpx

from .cache import Lru

# generation may take minutes before its first byte (a long prefill, a non-streamed answer)
RELAY_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=60.0)
PROBE_TIMEOUT = httpx.Timeout(5.0)
COUNT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
SUMMARY_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
COUNTS_AT_ONCE = 16  # /tokenize calls one chat sends an upstream at a time


def make_http() -> httpx.AsyncClient:
    """One client for every upstream: pooled connections (enough for many concurrent streams)."""
    return httpx.AsyncClient(
        timeout=RELAY_TIMEOUT, limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    )


class UpstreamDown(Exception):
    """An upstream did not answer a probe as a vLLM server does; ``str()`` says how."""


class CountUnavailable(Exception):
    """An upstream's ``/tokenize`` did not count (not vLLM, ``--skip-tokenizer-init``, an error)."""


class CountRefused(CountUnavailable):
    """``/tokenize`` refused the request as malformed (400, 422): the chat request is."""


class SummaryFailed(Exception):
    """The upstream model did not write a summary."""


class Upstreams:
    def __init__(
        self, http: httpx.AsyncClient, *, text_counts: Lru[tuple[str, str], int] | None = None
    ) -> None:
        self.http = http
        self.text_counts = text_counts if text_counts is not None else Lru(8192)

    async def listing(self, url: str) -> object:
        """``GET /v1/models``' JSON."""
        try:
            response = await self.http.get(f"{url}/v1/models", timeout=PROBE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise UpstreamDown(_reason(exc)) from exc
        if response.status_code != 200:
            raise UpstreamDown(f"HTTP {response.status_code} {response.text[:200]!r}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamDown(f"not JSON: {response.text[:200]!r}") from exc

    async def healthy(self, url: str) -> bool:
        try:
            return (await self.http.get(f"{url}/health", timeout=PROBE_TIMEOUT)).status_code == 200
        except httpx.HTTPError:
            return False

    async def count_chat(self, url: str, request: dict) -> tuple[int, int]:
        """(prompt tokens, max-model-len) of a chat as the upstream's template renders it."""
        answer = await self._tokenize(url, request)
        return answer["count"], answer["max_model_len"]

    async def count_texts(self, url: str, model: str | None, texts: list[str]) -> list[int]:
        """Each text's tokens alone (no special tokens); remembered per upstream and text."""
        limit = asyncio.Semaphore(COUNTS_AT_ONCE)

        async def one(text: str) -> int:
            if not text:
                return 0
            key = (url, hashlib.sha256(f"{model}\0{text}".encode()).hexdigest())
            known = self.text_counts.get(key)
            if known is not None:
                return known
            request = {"prompt": text, "add_special_tokens": False, **({"model": model} if model else {})}
            async with limit:
                count = (await self._tokenize(url, request))["count"]
            self.text_counts.put(key, count)
            return count

        return list(await asyncio.gather(*(one(t) for t in texts)))

    async def _tokenize(self, url: str, request: dict) -> dict:
        try:
            response = await self.http.post(f"{url}/tokenize", json=request, timeout=COUNT_TIMEOUT)
        except httpx.HTTPError as exc:
            raise CountUnavailable(f"{url}/tokenize: {_reason(exc)}") from exc
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            refused = CountRefused if response.status_code in (400, 422) else CountUnavailable
            raise refused(f"{url}/tokenize answered HTTP {response.status_code} {response.text[:200]!r}")
        if not isinstance(answer.get("count"), int) or not isinstance(answer.get("max_model_len"), int):
            raise CountUnavailable(f"{url}/tokenize answered without count and max_model_len")
        return answer

    async def write_summary(self, url: str, model: str, messages: list[dict], max_tokens: int) -> str:
        request = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        }
        try:
            response = await self.http.post(
                f"{url}/v1/chat/completions", json=request, timeout=SUMMARY_TIMEOUT
            )
            text = (
                response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            )
        except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
            raise SummaryFailed(f"{url}: {_reason(exc)}") from exc
        if not isinstance(text, str) or not text.strip():
            raise SummaryFailed(f"{url} answered HTTP {response.status_code} {response.text[:200]!r}")
        return text

    async def open(self, url: str, path: str, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """Send a relayed request; the response is streamed (its body not yet read) and the caller's to
        close. httpx's errors propagate."""
        request = self.http.build_request("POST", f"{url}{path}", content=content, headers=dict(headers))
        return await self.http.send(request, stream=True)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
