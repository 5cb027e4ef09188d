"""Constants that several modules use are declared once: the others read them."""

from vllm_tuner.deploy import plan
from vllm_tuner.devices import CPU, CUDA
from vllm_tuner.estimate import OVERHEADS
from vllm_tuner.find import context_guess


def test_the_cuda_context_is_one_value_the_estimator_and_the_plan_count_and_find_halves():
    assert OVERHEADS["cuda_context"]["bytes"] == CUDA.context_overhead_bytes
    assert plan.CUDA_CONTEXT_BYTES == CUDA.context_overhead_bytes
    # find's up-front checks are optimistic on purpose: a wrong guess fails in seconds
    assert context_guess(CUDA) == CUDA.context_overhead_bytes // 2 == 256 << 20
    assert context_guess(CPU) == 0
