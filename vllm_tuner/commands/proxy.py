"""``vllm-tune proxy DEPLOYMENT|URL...``: one OpenAI-compatible endpoint in front of tuned vLLM servers."""

from __future__ import annotations

import asyncio
import logging

import click

from ..proxy.context import STRATEGIES


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="DEPLOYMENT|URL...")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=9000, show_default=True, help="Port to listen on."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one)."
)
@click.option(
    "--compress",
    type=click.Choice(STRATEGIES),
    default="trim",
    show_default=True,
    help="How a chat over max-model-len is shortened: drop or cut the oldest turns, or have the model "
    "summarise them.",
)
def command(targets, port, host, compress):
    """Serve one OpenAI-compatible endpoint in front of vLLM servers: route by model, stream, and keep
    every chat inside its server's max-model-len.

    Each target is a vLLM server's URL or a deployment 'vllm-tune up' started (its name or file). A chat
    whose prompt plus max_tokens is over the server's max-model-len (counted by its /tokenize) is
    compressed: the system message and the newest turns kept whole, the oldest turns trimmed or
    summarised; the response then carries 'x-vllm-tune-compressed: BEFORE->AFTER tokens, N turns'.

    \b
    Examples:
      vllm-tune proxy coder-general-96gb --port 9000
      vllm-tune proxy http://127.0.0.1:8001 http://127.0.0.1:8002 --compress summarize
    """
    from ..proxy.serve import LOG, serve

    _log_to_stderr(LOG, logging.INFO)
    _log_to_stderr(logging.getLogger("uvicorn.error"), logging.WARNING)
    asyncio.run(serve(tuple(targets), host=host, port=port, strategy=compress))


def _log_to_stderr(logger: logging.Logger, level: int) -> None:
    """One line per event on stderr, with the time (once, however often the command runs in a process)."""
    logger.setLevel(level)
    if not any(getattr(h, "name", None) == "vllm-tune-proxy" for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.set_name("vllm-tune-proxy")
        handler.setFormatter(logging.Formatter("%(asctime)s proxy: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
