"""What `vllm serve` does when a flag is not given: the one place the tuner keeps vLLM's defaults (pure).

Section numbers are those of /work/shared/research/vllm-internals.md (vLLM 0.32/0.33).
"""

from __future__ import annotations

from .units import GIB

DEFAULT_UTILIZATION = 0.92  # CacheConfig.gpu_memory_utilization default in vLLM 0.33 (§1)
DEFAULT_BLOCK_SIZE = 16  # CacheConfig DEFAULT_BLOCK_SIZE (§1 --block-size)
MLA_BLOCK_SIZE = 64  # MLA backends' supported block size (§1 --block-size)

# The batch defaults of `vllm serve` (usage context OPENAI_API_SERVER), §1 "Batch defaults".
BATCH_DEFAULTS = ((160 * GIB, 16384, 1024), (70 * GIB, 8192, 1024), (0, 2048, 256))

# The smallest of those for `vllm serve` (GPUs under 70 GiB, and A100); H100-class cards default to 8192.
DEFAULT_BATCHED_TOKENS = BATCH_DEFAULTS[-1][1]


def batch_defaults(total_bytes: int, gpu_name: str = "") -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM picks for `vllm serve` on this device."""
    name = gpu_name.lower()
    for floor, tokens, seqs in BATCH_DEFAULTS:
        if total_bytes >= floor:
            if floor == 70 * GIB and ("a100" in name or "gb10" in name):
                continue
            return tokens, seqs
    return BATCH_DEFAULTS[-1][1:]


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, gpu_name: str = "") -> list[int]:
    """vLLM's default CUDA-graph capture sizes (§1 --cudagraph-capture-sizes)."""
    name = gpu_name.lower()
    cap = 1024 if any(b in name for b in ("b200", "b300", "gb200", "gb300")) else 512
    largest = min(max_num_seqs * 2, cap)
    sizes = [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)] if s <= largest]
    if max_num_batched_tokens <= largest and max_num_batched_tokens not in sizes:
        sizes.append(max_num_batched_tokens)
    return sizes
