"""What a simulated pooling server answers, from the request bodies of vLLM 0.32's pooling API. Pure.

The shapes are vLLM's (``entrypoints/pooling``): ``/v1/embeddings`` takes ``input`` (a text, texts, token
ids, or lists of them) and answers ``{"object": "list", "data": [{"index", "object": "embedding",
"embedding"}], "usage"}``; ``/score`` pairs ``queries``/``documents`` (or ``queries``/``items``,
``data_1``/``data_2``, ``text_1``/``text_2``) 1:1, 1:N or N:N and answers one ``{"index", "object":
"score", "score"}`` per pair; ``/rerank`` takes ``query``, ``documents`` and ``top_n`` and answers
``results`` ``{"index", "document": {"text"}, "relevance_score"}`` sorted best first.

The numbers only have to behave like a model's: an embedding is a hashed bag of words, normalized
(texts that share words point the same way); an embedding model scores a pair by cosine similarity
(a bi-encoder, -1..1), a one-label classifier by a sigmoid of the query words a document holds (a
cross-encoder, 0..1).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from typing import Any

SCORE_FIELDS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class BadRequest(ValueError):
    """A request vLLM answers with 400; ``str()`` is its message, ``param`` the field it names."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def text_tokens(text: str) -> int:
    """The simulator's tokenizer: about four characters a token."""
    return max(1, len(text) // 4)


def tokens_of(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else text_tokens(item)


def _words(item: str | list[int]) -> list[str]:
    if isinstance(item, list):
        return [str(t) for t in item]
    return re.findall(r"\w+", item.lower())


def embedding(item: str | list[int], size: int) -> list[float]:
    """A unit vector of ``size`` floats: each word adds ±1 to a bucket picked by its hash."""
    vec = [0.0] * size
    for word in _words(item) or [""]:
        digest = hashlib.sha256(word.encode()).digest()
        vec[int.from_bytes(digest[:4], "little") % size] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def relevance(query: str | list[int], document: str | list[int]) -> float:
    """A cross-encoder's probability that ``document`` answers ``query``: the share of the query's
    words the document holds, through a sigmoid."""
    wanted = set(_words(query))
    share = len(wanted & set(_words(document))) / len(wanted) if wanted else 0.0
    return 1 / (1 + math.exp(-(8 * share - 4)))


def embedding_inputs(body: dict) -> list[str | list[int]]:
    """``input`` as a list of prompts (a text or a list of token ids each)."""
    if "input" not in body:
        raise BadRequest("Field required: input", "input")
    value = body["input"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(t, (str, list)) for t in value):
        return [v if isinstance(v, str) else [int(t) for t in v] for v in value]
    raise BadRequest("input must be a string, a list of strings, or token ids", "input")


def embedding_size(body: dict, size: int, matryoshka: bool, model: str) -> int:
    """The length the embeddings are cut to: ``dimensions`` when the model allows it (PoolingParams)."""
    dimensions = body.get("dimensions")
    if dimensions is None:
        return size
    if not matryoshka:
        raise BadRequest(
            f"Model {model!r} does not support Matryoshka embeddings; dimensions must be unset "
            f"(received dimensions={dimensions}).",
            "dimensions",
        )
    if not 1 <= int(dimensions) <= size:
        raise BadRequest(
            f"Model {model!r} only supports dimensions in range [1, {size}], got {dimensions}.", "dimensions"
        )
    return int(dimensions)


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """``float`` as JSON numbers, ``base64`` as little-endian float32 bytes (vLLM's two JSON formats)."""
    if encoding_format == "float":
        return vector
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    raise BadRequest(
        f"encoding_format must be 'float' or 'base64', got {encoding_format!r}", "encoding_format"
    )


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def score_pairs(body: dict) -> list[tuple[str | list[int], str | list[int]]]:
    """The (query, document) pairs of a score request: one query against N documents, or N against N."""
    for first, second in SCORE_FIELDS:
        if first in body and second in body:
            return pair_up(_as_list(body[first]), _as_list(body[second]))
    raise BadRequest("Field required: queries and documents (or data_1 and data_2, text_1 and text_2)", None)


def rerank_pairs(body: dict) -> list[tuple[str | list[int], str | list[int]]]:
    if "query" not in body or "documents" not in body:
        raise BadRequest("Field required: query and documents", None)
    top_n = body.get("top_n", 0)
    if not isinstance(top_n, int) or top_n < 0:
        raise BadRequest("top_n: Input should be greater than or equal to 0", "top_n")
    return pair_up([body["query"]], _as_list(body["documents"]))


def pair_up(first: list, second: list) -> list[tuple]:
    """vLLM's ``_validate_score_input_lens``: 1:1, 1:N or N:N."""
    if len(first) > 1 and len(first) != len(second):
        raise BadRequest("Input lengths must be either 1:1, 1:N or N:N")
    if not first:
        raise BadRequest("At least one text element must be given")
    if not second:
        raise BadRequest("At least one text_pair element must be given")
    if len(first) == 1:
        first = first * len(second)
    return list(zip(first, second, strict=True))


def rerank_results(pairs: list[tuple], scores: list[float], top_n: int) -> list[dict]:
    """Best first, the first ``top_n`` (all when 0), each naming its document's index in the request."""
    results: list[dict[str, Any]] = [
        {
            "index": i,
            "document": {"text": doc, "multi_modal": None}
            if isinstance(doc, str)
            else {"text": None, "multi_modal": doc},
            "relevance_score": score,
        }
        for i, ((_, doc), score) in enumerate(zip(pairs, scores, strict=True))
    ]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    return results[:top_n] if 0 < top_n < len(results) else results
