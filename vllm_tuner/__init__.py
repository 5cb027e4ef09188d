"""vllm-tune: find the largest stable vLLM serve configuration for your GPUs."""

__version__ = "0.1.0"
