"""The proxy's app in-process: its routes called through httpx's ASGI transport, its upstreams a plain
function behind httpx's mock transport (no sockets)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx

from vllm_tuner.proxy.app import COMPRESSED_HEADER, REFRESH_EVERY_S, Proxy, Router, create_app
from vllm_tuner.proxy.cache import Lru
from vllm_tuner.proxy.fit import ContextKeeper
from vllm_tuner.proxy.metrics import ProxyMetrics
from vllm_tuner.proxy.serve import discover
from vllm_tuner.proxy.upstream import Upstreams
from vllm_tuner.simlite.tokenize import answer

A, B = "http://a:8001", "http://b:8002"


class Upstream:
    """A vLLM-like server as a function of the request: /v1/models, /health, /tokenize, chat (it answers
    with the messages it got), completions and embeddings (they echo the body and headers)."""

    def __init__(self, name: str, max_len: int = 512, *, undercount: int = 0, tokenize: bool = True) -> None:
        self.name, self.max_len, self.undercount, self.tokenize = name, max_len, undercount, tokenize
        self.healthy = True
        self.received: list[tuple[str, dict, httpx.Headers]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": self.name, "max_model_len": self.max_len}]}
            )
        if path == "/health":
            return httpx.Response(200 if self.healthy else 503)
        body = json.loads(request.content)
        self.received.append((path, body, request.headers))
        if not all(isinstance(m, dict) for m in body.get("messages", [])):  # vLLM's validation error
            error = {
                "message": "messages.0: Input should be a valid dictionary",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
            return httpx.Response(400, json={"error": error})
        if path == "/tokenize":
            if not self.tokenize:
                return httpx.Response(404, json={"detail": "Not Found"})
            status, counted = answer(body, self.name, self.max_len)
            if status == 200:
                counted["count"] -= self.undercount
            return httpx.Response(status, json=counted)
        if path == "/v1/chat/completions":
            prompt = answer({"messages": body["messages"]}, self.name, self.max_len)[1]["count"]
            if prompt > self.max_len - int(body.get("max_tokens") or 1):
                message = (
                    f"This model's maximum context length is {self.max_len} tokens. However, your prompt contains "
                    f"{prompt} input tokens, which exceeds this limit even without any output tokens. Please "
                    "reduce the length of the input prompt."
                )
                error = {"message": message, "type": "BadRequestError", "param": "input_tokens", "code": 400}
                return httpx.Response(400, json={"error": error})
            return httpx.Response(
                200, json={"model": self.name, "messages": len(body["messages"]), "prompt": prompt}
            )
        return httpx.Response(
            200, json={"path": path, "body": body, "auth": request.headers.get("authorization")}
        )


def run(
    upstreams: dict[str, Upstream], exchange, *, strategy: str = "trim", keeper_type=ContextKeeper, clock=None
):
    """Build the proxy over ``upstreams`` and run ``exchange(client, proxy)`` against it."""

    async def main():
        def route(request: httpx.Request) -> httpx.Response:
            url = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
            if url not in upstreams:
                raise httpx.ConnectError("connection refused", request=request)
            return upstreams[url](request)

        async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as http:
            upstream = Upstreams(http)
            table = await discover(tuple(upstreams), upstream, strict=True)
            metrics = ProxyMetrics()
            log = logging.getLogger("test-proxy")
            keeper = keeper_type(upstream, strategy=strategy, summaries=Lru(16), metrics=metrics, log=log)
            router = Router(
                table,
                lambda: discover(tuple(upstreams), upstream, strict=False),
                **({"clock": clock} if clock else {}),
            )
            proxy = Proxy(router, upstream, keeper, metrics, log)
            transport = httpx.ASGITransport(app=create_app(proxy))
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
                return await exchange(client, proxy)

    return asyncio.run(main())


def long_chat(turns: int = 12) -> list[dict]:
    messages = [{"role": "system", "content": "Be exact."}]
    for n in range(turns):
        messages += [
            {"role": "user", "content": f"q{n} " + "alpha beta " * 20},
            {"role": "assistant", "content": f"a{n} " + "gamma delta " * 20},
        ]
    return messages + [{"role": "user", "content": "so?"}]


def test_models_health_and_metrics():
    a, b = Upstream("chat"), Upstream("coder", 1024)

    async def exchange(client, proxy):
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("chat", 512), ("coder", 1024)]
        healthy = await client.get("/health")
        assert healthy.status_code == 200
        assert healthy.json() == {"status": "healthy", "upstreams": {A: "healthy", B: "healthy"}}
        b.healthy = False
        sick = await client.get("/health")
        assert sick.status_code == 503 and sick.json()["upstreams"][B] == "unhealthy"
        await client.post("/v1/completions", json={"model": "coder", "prompt": "x"})
        metrics = await client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert (
            'vllm_tune_proxy_requests_total{model="coder",route="/v1/completions",status="200"} 1.0'
            in metrics.text
        )

    run({A: a, B: b}, exchange)


def test_bad_requests_get_the_openai_error_shape():
    async def exchange(client, proxy):
        bad = await client.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [')
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400
        assert error["message"].startswith("Invalid JSON body")
        assert (await client.post("/v1/completions", content=b"[1, 2]")).status_code == 400
        unknown = await client.post("/v1/embeddings", json={"model": "gpt-4", "input": "x"})
        assert unknown.status_code == 404
        assert unknown.json() == {
            "error": {
                "message": "The model `gpt-4` does not exist. Valid aliases: chat, coder.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        missing = await client.post("/v1/completions", json={"prompt": "x"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"

    run({A: Upstream("chat"), B: Upstream("coder")}, exchange)


def test_requests_are_routed_by_model_with_their_body_and_headers():
    a, b = Upstream("chat"), Upstream("coder")

    async def exchange(client, proxy):
        raw = b'{"model": "coder", "input": ["x", "y"],   "extra": 1}'
        sent = await client.post(
            "/v1/embeddings",
            content=raw,
            headers={"authorization": "Bearer k", "content-type": "application/json"},
        )
        assert sent.json() == {
            "path": "/v1/embeddings",
            "body": {"model": "coder", "input": ["x", "y"], "extra": 1},
            "auth": "Bearer k",
        }
        done = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert done.json()["model"] == "chat" and COMPRESSED_HEADER not in done.headers

    run({A: a, B: b}, exchange)
    assert [p for p, _, _ in b.received] == ["/v1/embeddings"]
    assert [p for p, _, _ in a.received] == ["/tokenize", "/v1/chat/completions"]


def test_a_chat_over_the_context_is_compressed_and_says_so():
    a = Upstream("chat", 512)

    async def exchange(client, proxy):
        body = {"model": "chat", "messages": long_chat(14), "max_tokens": 64}
        done = await client.post("/v1/chat/completions", json=body)
        assert done.status_code == 200
        before, rest = done.headers[COMPRESSED_HEADER].split("->")
        after = int(rest.split(" tokens, ")[0])
        assert int(before) > 3 * 512 and after == done.json()["prompt"] <= 512 - 64
        assert rest.endswith(" turns")
        metrics = (await client.get("/metrics")).text
        assert 'vllm_tune_proxy_compressed_total{model="chat",strategy="trim"} 1.0' in metrics
        assert (
            f'vllm_tune_proxy_compressed_prompt_tokens_after_total{{model="chat"}} {float(after)}' in metrics
        )

    run({A: a}, exchange)
    chat_sent = [body for path, body, _ in a.received if path == "/v1/chat/completions"]
    assert len(chat_sent) == 1 and chat_sent[0]["messages"][-1] == {"role": "user", "content": "so?"}
    assert chat_sent[0]["max_tokens"] == 64  # the rest of the request as it came


def test_a_chat_that_cannot_fit_gets_vllms_400():
    async def exchange(client, proxy):
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "word " * 1000}]
        refused = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 10}
        )
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (
            error["type"] == "BadRequestError" and error["param"] == "input_tokens" and error["code"] == 400
        )
        assert error["message"].startswith("This model's maximum context length is 512 tokens.")
        assert "tokens too many" in error["message"]

    run({A: Upstream("chat")}, exchange)


def test_an_upstream_400_about_length_is_retried_once_compressed():
    a = Upstream("chat", 512, undercount=200)  # its /tokenize says 200 fewer than it generates from

    async def exchange(client, proxy):
        messages = long_chat(5)  # 628 tokens, counted as 428: sent whole, refused, retried compressed
        done = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 32}
        )
        assert done.status_code == 200, done.text
        assert COMPRESSED_HEADER in done.headers
        assert proxy.metrics.value("length_retries_total", model="chat") == 1

    run({A: a}, exchange)
    assert [p for p, _, _ in a.received].count("/v1/chat/completions") == 2


def test_an_upstream_that_cannot_count_gets_the_chat_as_it_came():
    a = Upstream("chat", tokenize=False)

    async def exchange(client, proxy):
        refused = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": long_chat(), "max_tokens": 8}
        )
        assert refused.status_code == 400  # the upstream's own answer, relayed
        assert refused.json()["error"]["param"] == "input_tokens" and COMPRESSED_HEADER not in refused.headers
        assert proxy.metrics.value("uncounted_total", model="chat") == 1

    run({A: a}, exchange)


def test_an_unreachable_upstream_is_a_502_and_a_bug_a_500_never_a_traceback():
    class Broken(ContextKeeper):
        async def fit(self, url, model, body, *, tighter_by=0):
            raise RuntimeError("boom")

    async def exchange(client, proxy):
        proxy.router.table = proxy.router.table.__class__(
            tuple(u.__class__("http://gone:1", u.models) for u in proxy.router.table.upstreams)
        )
        gone = await client.post("/v1/completions", json={"model": "chat", "prompt": "x"})
        assert gone.status_code == 502 and gone.json()["error"]["type"] == "BadGatewayError"
        assert "http://gone:1 is unreachable" in gone.json()["error"]["message"]
        assert proxy.metrics.value("upstream_errors_total", upstream="http://gone:1", kind="unreachable") == 1
        assert proxy.router.in_flight["http://gone:1"] == 0
        proxy.router.table = await discover((A,), proxy.upstreams, strict=True)
        bug = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        )
        assert bug.status_code == 500
        assert bug.json()["error"] == {
            "message": "vllm-tune proxy internal error: RuntimeError('boom')",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }

    run({A: Upstream("chat")}, exchange, keeper_type=Broken)


def test_an_unknown_model_rereads_the_upstreams_at_most_every_few_seconds():
    now = [100.0]
    upstreams = {A: Upstream("chat")}

    async def exchange(client, proxy):
        upstreams[A].name = "chat-v2"  # the server was restarted with another name
        assert (
            await client.post("/v1/completions", json={"model": "chat-v2", "prompt": "x"})
        ).status_code == 404
        now[0] += REFRESH_EVERY_S
        found = await client.post("/v1/completions", json={"model": "chat-v2", "prompt": "x"})
        assert found.status_code == 200
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["chat-v2"]

    run(upstreams, exchange, clock=lambda: now[0])


def test_a_malformed_chat_gets_the_upstreams_own_400_and_counts_nothing():
    a = Upstream("chat")

    async def exchange(client, proxy):
        for messages in (["hello"], [{"role": "user", "content": "hi"}, 3]):
            refused = await client.post("/v1/chat/completions", json={"model": "chat", "messages": messages})
            assert refused.status_code == 400
            assert refused.json()["error"]["message"] == "messages.0: Input should be a valid dictionary"
        # /tokenize refuses it (both flags): the upstream's chat route answers for itself, no warning
        both = {"add_generation_prompt": True, "continue_final_message": True}
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **both}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        assert proxy.metrics.value("uncounted_total", model="chat") == 0 and not proxy.uncounted

    run({A: a}, exchange)
    assert [p for p, _, _ in a.received] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/v1/chat/completions",
    ]
