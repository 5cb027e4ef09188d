"""A tiny tokenizer for the real-vLLM tier, trained here so ``/tokenize`` and chat completions are real:
a byte-level BPE learnt from a few KB of generated English, and a simple ChatML chat template in
``tokenizer_config.json``. It needs the ``tokenizers`` library, which the CPU build of vLLM's venv has:

    $VLLM_TUNE_REAL_VLLM/bin/python tests/tiny_tokenizer.py MODEL_FOLDER   # prints the vocabulary size
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # <s> = 1 and </s> = 2, as tiny_llama says
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 1024

_SUBJECTS = [
    "the server",
    "a model",
    "the cache",
    "every request",
    "the proxy",
    "our user",
    "the GPU",
    "a token",
]
_VERBS = ["holds", "reads", "sends", "counts", "drops", "keeps", "writes", "answers"]
_OBJECTS = [
    "the context",
    "long prompts",
    "a summary",
    "new turns",
    "its memory",
    "the reply",
    "old messages",
]
_TAILS = ["today.", "again and again.", "before the limit.", "within a second.", "as it should.", "quickly."]


def corpus() -> list[str]:
    """About 20 KB of plain sentences, the same every time."""
    sentences = [
        f"{s.capitalize()} {v} {o} {t}"
        for s, v, o, t in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS)
    ]
    return [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]


def build(folder: Path) -> int:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``folder``; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tokenizer.get_vocab_size()


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
