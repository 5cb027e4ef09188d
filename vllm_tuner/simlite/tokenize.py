"""The simulator's tokenizer and its ``/tokenize``, in vLLM 0.32's shapes. Pure.

vLLM's ``/tokenize`` (``entrypoints/serve/tokenize``) takes the completion form ``{"prompt"}`` or the chat
form ``{"messages"}`` (the chat template applied, ``add_generation_prompt`` true by default) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; it never refuses a prompt for its length (the
limit applies when generating). A ``model`` the server does not serve is vLLM's 404
``{"error": {"message": "The model `X` does not exist. Valid aliases: Y.", "type": "NotFoundError",
"param": "model", "code": 404}}``.

The tokenizer is the one the simulated generation counts with (``server.prompt_tokens``): about four
characters a token (at least one), and a chat template of four tokens a message around ``str(content)``
(``<|im_start|>``, the role, a newline, the text, ``<|im_end|>``) plus two for the generation prompt.
"""

from __future__ import annotations

import hashlib

VOCAB = 32000
SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2, "\n": 3, "system": 4, "user": 5, "assistant": 6, "tool": 7}
FIRST_TEXT_ID = 16  # ids below are the template's


def text_pieces(text: str) -> list[str]:
    """``text`` cut into ``max(1, len // 4)`` pieces of four characters, the last one taking the rest."""
    count = max(1, len(text) // 4)
    return [text[4 * i : 4 * i + 4] if i < count - 1 else text[4 * i :] for i in range(count)]


def piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
    return FIRST_TEXT_ID + int.from_bytes(digest, "little") % (VOCAB - FIRST_TEXT_ID)


def template_pieces(messages: list, *, add_generation_prompt: bool = True) -> list[str]:
    """The chat template's pieces: the template's own tokens around each message's text pieces."""
    pieces: list[str] = []
    for message in messages:
        role = str(message.get("role", "user")) if isinstance(message, dict) else "user"
        content = message.get("content", "") if isinstance(message, dict) else message
        pieces += ["<|im_start|>", role, "\n", *text_pieces(str(content)), "<|im_end|>"]
    if add_generation_prompt:
        pieces += ["<|im_start|>", "assistant"]
    return pieces


def token_id(piece: str) -> int:
    return SPECIAL.get(piece) or piece_id(piece)


def answer(body: object, served: str, max_len: int) -> tuple[int, dict]:
    """``(status, JSON body)`` of ``POST /tokenize`` for a server of ``served`` at ``max_len``."""
    if not isinstance(body, dict):
        return 400, _bad("The request body must be a JSON object")
    model = body.get("model")
    if model not in (None, "", served):
        return 404, {
            "error": {
                "message": f"The model `{model}` does not exist. Valid aliases: {served}.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
    if isinstance(body.get("messages"), list):
        if body.get("continue_final_message") and body.get("add_generation_prompt"):
            return 400, _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        generation = bool(body.get("add_generation_prompt", True)) and not body.get("continue_final_message")
        pieces = template_pieces(body["messages"], add_generation_prompt=generation)
    elif isinstance(body.get("prompt"), str):
        pieces = text_pieces(body["prompt"])
    else:
        return 400, _bad("Field required: a `prompt` string or a `messages` list")
    return 200, {
        "count": len(pieces),
        "max_model_len": max_len,
        "tokens": [token_id(p) for p in pieces],
        "token_strs": pieces if body.get("return_token_strs") else None,
    }


def _bad(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
