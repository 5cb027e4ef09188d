"""Which model runner a launch gets and what a pooling server serves: the simulator's own reading.

vLLM 0.32 resolves ``--runner`` and ``--convert`` in ``ModelConfig`` (``_get_runner_type``,
``_get_convert_type``, the ``_RUNNER_CONVERTS`` checks): a ``*ForCausalLM`` checkpoint generates by
default and becomes an embedding model under ``--runner pooling`` (``--convert auto`` → ``embed``), a
``*Model`` / ``*ForSequenceClassification`` checkpoint is a pooling model of its own. The pooling task
decides the routes (``/v1/embeddings`` for ``embed``; ``/score`` and ``/rerank`` for ``embed`` and for
``classify`` with one label); a bidirectional encoder (BERT-like) keeps no KV cache and cannot chunk
its prefill. Pure: reads the model's config dict, never the tuner's estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RUNNERS = ["auto", "generate", "pooling", "draft"]
CONVERTS = ["auto", "none", "embed", "classify"]

# vLLM's _SUFFIX_TO_DEFAULTS, first match wins: (suffix, runner, convert)
SUFFIX_DEFAULTS = (
    ("ForCausalLM", "generate", "none"),
    ("ForConditionalGeneration", "generate", "none"),
    ("ChatModel", "generate", "none"),
    ("LMHeadModel", "generate", "none"),
    ("ForTextEncoding", "pooling", "embed"),
    ("EmbeddingModel", "pooling", "embed"),
    ("ForSequenceClassification", "pooling", "classify"),
    ("ForTokenClassification", "pooling", "classify"),
    ("ClassificationModel", "pooling", "classify"),
    ("ForRewardModeling", "pooling", "embed"),
    ("RewardModel", "pooling", "embed"),
    ("Model", "pooling", "embed"),
)
# model types whose attention is bidirectional: CLS pooling, vLLM's attn_type "encoder_only"
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "modernbert",
        "nomic_bert",
        "new",
        "deberta-v2",
    }
)
TASKS = {
    "generate": ["generate"],
    "embed": ["embed", "token_embed"],
    "classify": ["classify", "token_classify"],
}


class RunnerError(ValueError):
    """A runner/convert combination vLLM's ModelConfig refuses; ``str()`` is its message."""


@dataclass(frozen=True)
class Runner:
    kind: str  # "generate" | "pooling" | "draft"
    convert: str  # "none" | "embed" | "classify": the adapter applied to the checkpoint
    task: str  # "generate", or the pooling task: "embed" | "classify"
    encoder_only: bool = False  # bidirectional attention: no KV cache, no chunked prefill
    num_labels: int = 0  # classify: the classifier's outputs
    embedding_size: int = 0  # embed: the length of one embedding
    matryoshka: bool = False  # embed: "dimensions" may shorten it
    resolved: tuple[str, ...] = ()  # vLLM's "Resolved `--runner auto` to ..." lines

    @property
    def pooling(self) -> bool:
        return self.kind == "pooling"

    @property
    def supported_tasks(self) -> list[str]:
        return TASKS[self.task]

    @property
    def keeps_kv_cache(self) -> bool:
        return not (self.pooling and self.encoder_only)

    @property
    def chunked_prefill(self) -> bool:
        """Decoder embedders pool the last token and chunk their prefill; bidirectional encoders cannot."""
        return not (self.pooling and self.encoder_only)

    @property
    def scoring(self) -> bool:
        """vLLM's ``enable_scoring_api``: ``/score`` and ``/rerank`` for embed, and classify with one label."""
        return self.task == "embed" or (self.task == "classify" and self.num_labels == 1)

    @property
    def builds_lm_head(self) -> bool:
        """A converted checkpoint (``--convert embed|classify``) is built without its LM head."""
        return self.convert == "none"


def _suffix_default(architectures: list[str]) -> tuple[str, str]:
    for arch in architectures:
        for suffix, runner, convert in SUFFIX_DEFAULTS:
            if arch.endswith(suffix):
                return runner, convert
    return "generate", "none"


def resolve(config: Mapping, runner: str = "auto", convert: str = "auto") -> Runner:
    """``--runner``/``--convert`` and the model's config → the runner vLLM builds. Raises RunnerError."""
    text = config.get("text_config") or config
    architectures = [str(a) for a in config.get("architectures") or []]
    native_runner, native_convert = _suffix_default(architectures)
    generative = native_runner == "generate"
    resolved: list[str] = []
    if runner == "auto":
        kind = native_runner if convert in ("auto", "none") else "pooling"
        if kind != "generate":
            resolved.append(
                f"Resolved `--runner auto` to `--runner {kind}`. Pass the value explicitly to silence this message."
            )
    else:
        kind = runner
    if not generative and kind in ("generate", "draft"):
        raise RunnerError(
            f"Embedding models do not support `--runner {kind}`. Use `--runner pooling` or `--runner auto` for "
            "embedding models."
        )
    if convert != "auto":
        adapter = convert
    elif kind == "pooling":
        adapter = "none" if not generative else "embed"
        if adapter != "none":
            resolved.append(
                f"Resolved `--convert auto` to `--convert {adapter}`. Pass the value explicitly to silence this message."
            )
    else:
        adapter = "none"
    if kind == "pooling" and generative and adapter == "none":
        raise RunnerError(
            "This model does not support `--runner pooling`. You can pass `--convert <embed|classify> to adapt it "
            "into a pooling model."
        )
    if kind != "pooling":
        return Runner(kind, adapter, "generate", resolved=tuple(resolved))
    task = adapter if adapter != "none" else native_convert
    model_type = str(text.get("model_type") or config.get("model_type") or "").lower()
    encoder_only = text.get("is_causal") is False or model_type in ENCODER_TYPES
    tokens = text.get("classifier_from_token") or config.get("classifier_from_token")
    if tokens:
        labels = 1 if len(tokens) == 2 else len(tokens)  # two tokens: the 2-way softmax's one score
    else:
        labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    return Runner(
        "pooling",
        adapter,
        task,
        encoder_only=encoder_only,
        num_labels=labels,
        embedding_size=int(config.get("embedding_size") or text.get("hidden_size") or 0),
        matryoshka=bool(config.get("matryoshka_dimensions") or config.get("is_matryoshka")),
        resolved=tuple(resolved),
    )
