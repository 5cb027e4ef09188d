"""Which runner vLLM builds for a model and its flags, and what a pooling runner budgets differently. Pure.

vLLM 0.32 picks the runner in ``ModelConfig`` (``_get_runner_type``, ``_get_convert_type``): a
``*ForCausalLM`` checkpoint generates unless ``--runner pooling`` or a ``--convert`` says otherwise (then
``--convert auto`` adapts it to ``embed``), a ``*Model`` / ``*ForSequenceClassification`` checkpoint
(BERT, a cross-encoder) is a pooling model of its own. What that changes in the memory budget:

* no sampler warm-up: ``profile_run`` runs the pooler on the pooled hidden states, not the sampler on
  ``max_num_seqs x vocab`` float32 logits;
* a converted checkpoint is built without its LM head (``_create_pooling_model_cls`` skips
  ``ParallelLMHead``), so an untied model loads ``vocab x hidden`` fewer weights;
* a bidirectional encoder (vLLM's ``attn_type == "encoder_only"``: CLS pooling, ``is_causal: false``)
  has no KV cache at all (its attention layers give no KV spec; vLLM skips the memory profiling) and
  cannot chunk its prefill, so ``max_num_batched_tokens`` defaults to at least ``max_model_len``.
  A decoder embedder (last-token pooling, Qwen3-Embedding, e5-mistral) keeps a KV cache like a
  generator and chunks its prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .vllmargv import value_of

# vLLM's _SUFFIX_TO_DEFAULTS, first match wins: does an architecture of this suffix generate?
_GENERATES = (
    ("ForCausalLM", True),
    ("ForConditionalGeneration", True),
    ("ChatModel", True),
    ("LMHeadModel", True),
    ("ForTextEncoding", False),
    ("EmbeddingModel", False),
    ("ForSequenceClassification", False),
    ("ForTokenClassification", False),
    ("ClassificationModel", False),
    ("ForRewardModeling", False),
    ("RewardModel", False),
    ("Model", False),
)
# model types with bidirectional attention (BERT-like encoders, CLS pooling)
ENCODER_MODEL_TYPES = frozenset(
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


@dataclass(frozen=True)
class RunnerChoice:
    pooling: bool = False
    converted: bool = False  # a generative checkpoint adapted by --convert embed|classify
    encoder_only: bool = False  # bidirectional attention (only matters for a pooling runner)

    @property
    def keeps_kv_cache(self) -> bool:
        return not (self.pooling and self.encoder_only)

    @property
    def chunked_prefill(self) -> bool:
        return not (self.pooling and self.encoder_only)


GENERATE = RunnerChoice()


def generates_natively(config: Mapping) -> bool:
    for arch in config.get("architectures") or []:
        for suffix, generates in _GENERATES:
            if str(arch).endswith(suffix):
                return generates
    return True


def runner_of(config: Mapping, args: Sequence[str] = ()) -> RunnerChoice:
    """The runner of a model (its HF config) served with ``args`` (``--runner``, ``--convert``)."""
    runner = value_of(args, "--runner") or "auto"
    convert = value_of(args, "--convert") or "auto"
    generative = generates_natively(config)
    auto = not generative or convert not in ("auto", "none")  # a --convert picks the pooling runner
    pooling = auto if runner == "auto" else runner == "pooling"
    if not pooling:
        return GENERATE
    text = config.get("text_config") or config
    model_type = str(text.get("model_type") or config.get("model_type") or "").lower()
    encoder_only = text.get("is_causal") is False or model_type in ENCODER_MODEL_TYPES
    return RunnerChoice(pooling=True, converted=generative and convert != "none", encoder_only=encoder_only)
