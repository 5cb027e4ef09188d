"""Constants that several modules use are declared once: the others read them."""

from vllm_tuner.deploy import plan
from vllm_tuner.devices import CPU, CUDA
from vllm_tuner.estimate import OVERHEADS
from vllm_tuner.find import context_guess
from vllm_tuner.hashkey import stable_key


def test_the_cuda_context_is_one_value_the_estimator_and_the_plan_count_and_find_halves():
    assert OVERHEADS["cuda_context"]["bytes"] == CUDA.context_overhead_bytes
    assert CUDA.context_overhead_bytes == plan.CUDA_CONTEXT_BYTES
    # find's up-front checks are optimistic on purpose: a wrong guess fails in seconds
    assert context_guess(CUDA) == CUDA.context_overhead_bytes // 2 == 256 << 20
    assert context_guess(CPU) == 0


def test_the_hash_key_keeps_the_strings_stored_runs_are_found_by():
    """find's request keys and environment fingerprints hash JSON's default form, the store's keys the
    compact one; both strings are what earlier releases stored."""
    value = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    assert stable_key(value) == "e36f9aaa907c2cb2"
    assert stable_key(value, compact=False) == "70d03823b2821be7"
    assert stable_key({"a": 1, "b": 2}) == stable_key({"b": 2, "a": 1})
