"""``vllm-tune proxy``: one OpenAI-compatible endpoint in front of tuned vLLM servers, routing by model
and keeping every chat inside its server's max-model-len.

    routing.py  the routing table from the upstreams' /v1/models (pure)
    context.py  the conversation's shape and the compression plan over token counts (pure)
    metrics.py  the proxy's /metrics as Prometheus text (pure)
    fit.py      one chat fitted: exact counts, plans, summaries, vLLM's 400 when it cannot fit
    upstream.py the HTTP to the upstreams (httpx, injected)
    app.py      the Starlette app: routes, relaying, disconnects
    serve.py    discovery, the socket, uvicorn
"""
