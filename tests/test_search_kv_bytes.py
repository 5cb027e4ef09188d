"""The search policy's pool in bytes (``--kv-cache-memory-bytes``) on a device where it skips vLLM's startup
check of the fraction (vLLM 0.32's CPU worker), driven with plain data against a toy busy NUMA node."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_tuner.devices import CPU, CUDA
from vllm_tuner.search import GIB, MIB, Finish, Launch, Observation, Policy, ProbeSummary, Request
from vllm_tuner.serveconfig import ServeConfig

TOTAL = 32 * GIB
PER_TOKEN = 32768  # KV bytes a token
BLOCK = 16
ESTIMATED_NON_KV = 2 * GIB  # what the estimate says the worker holds besides its KV cache
BASE = ServeConfig(model="tiny/llama", enforce_eager=True)  # no CUDA graphs, as on the CPU backend


@dataclass
class ToyEstimate:
    kv_pool_bytes: int
    kv_bytes_per_token: int = PER_TOKEN
    weights_bytes: int = GIB
    cudagraph_bytes: int = 0
    non_kv_bytes: int = ESTIMATED_NON_KV

    def max_context(self, seqs: int) -> int:
        return max(0, self.kv_pool_bytes - BLOCK * PER_TOKEN) // (PER_TOKEN * seqs)

    def max_seqs(self, context: int) -> int:
        return max(0, self.kv_pool_bytes - BLOCK * PER_TOKEN) // (PER_TOKEN * context)

    def kv_bytes_for(self, context: int, seqs: int) -> int:
        return (seqs * math.ceil(context / BLOCK) + 1) * BLOCK * PER_TOKEN  # and the null block


def estimate(cfg: ServeConfig, calibration) -> ToyEstimate:
    if cfg.kv_cache_memory_bytes is not None:
        return ToyEstimate(cfg.kv_cache_memory_bytes)
    return ToyEstimate(math.ceil(TOTAL * (cfg.gpu_memory_utilization or 0.92)) - ESTIMATED_NON_KV)


def calibrate(facts: dict, cfg: ServeConfig) -> None:
    return None  # the toy estimate is right about the worker


class BusyNode:
    """A NUMA node other processes keep busy, as vLLM 0.32's CPU worker meets it: a fraction whose share of
    the node is more than is free is refused at startup; a pool in bytes skips that check and only has to
    be free once the worker holds its own memory (its non-KV ``held``)."""

    def __init__(self, free: int, held: int = ESTIMATED_NON_KV, spike: int = 0) -> None:
        self.free, self.held, self.spike = free, held, spike
        self.launched: list[ServeConfig] = []

    def run(self, cfg: ServeConfig) -> Observation:
        self.launched.append(cfg)
        node = {"total_gib": TOTAL / GIB}
        if cfg.kv_cache_memory_bytes is None:
            requested = math.ceil(TOTAL * cfg.gpu_memory_utilization)
            if requested > self.free:
                facts = {**node, "free_gib": round(self.free / GIB, 2)}
                return Observation(cfg, "startup_free_memory_below_utilization", facts)
            pool = requested - self.held
        else:
            pool = cfg.kv_cache_memory_bytes
            if pool > self.free - self.held:  # "on kv cache allocation is less than requested memory for kv"
                facts = {
                    **node,
                    "free_gib": round((self.free - self.held) / GIB, 2),
                    "available_kv_gib": pool / GIB,
                }
                return Observation(cfg, "startup_free_memory_below_utilization", facts)
        facts = {
            **node,
            "available_kv_gib": pool / GIB,
            "kv_cache_tokens": pool // PER_TOKEN // BLOCK * BLOCK,
        }
        if cfg.max_model_len > facts["kv_cache_tokens"] - BLOCK:
            facts["estimated_max_model_len"] = facts["kv_cache_tokens"] - BLOCK
            return Observation(cfg, "kv_cache_insufficient_for_max_len", facts)
        headroom = self.free - self.held - pool - self.spike
        return Observation(
            cfg, "success", facts, ProbeSummary(ok=headroom >= GIB, min_headroom_bytes=headroom)
        )


def drive(policy: Policy, node: BusyNode, limit: int = 10) -> tuple[Finish, list[Observation]]:
    history: list[Observation] = []
    for _ in range(limit):
        decision = policy.next(history)
        if isinstance(decision, Finish):
            return decision, history
        history.append(node.run(decision.config))
    raise AssertionError(f"no decision after {limit} launches: {[o.category for o in history]}")


def request(kind=CPU, **kw) -> Request:
    kw.setdefault("native_max_len", 4096)
    return Request(
        util_ceiling=kind.util_ceiling,
        util_floor=kind.util_floor,
        device_unit=kind.unit,
        kv_bytes_skip_free_check=kind.kv_bytes_skip_free_check,
        **kw,
    )


def test_a_refused_fraction_on_the_cpu_is_answered_with_the_pool_the_goal_needs_in_bytes():
    node = BusyNode(free=10 * GIB)
    policy = Policy(
        request(objective="targets", target_context=2048, target_seqs=2),
        BASE,
        estimate=estimate,
        calibrate=calibrate,
    )
    result, history = drive(policy, node)
    assert history[0].category == "startup_free_memory_below_utilization"
    assert history[0].config.kv_cache_memory_bytes is None  # the fraction first, as the user would
    winner = result.winner
    assert winner is not None and winner.stable and len(history) == 2
    need = ToyEstimate(0).kv_bytes_for(2048, 2)
    assert winner.config.kv_cache_memory_bytes == math.ceil(need / MIB) * MIB  # the goal, not the free memory
    assert winner.config.max_model_len == 2048 and winner.config.max_num_seqs == 2


def test_without_the_skip_a_refused_fraction_is_still_backed_off_by_fraction():
    node = BusyNode(free=30 * GIB)
    policy = Policy(request(CUDA), BASE, estimate=estimate, calibrate=calibrate)
    result, history = drive(policy, node)
    assert history[0].category == "startup_free_memory_below_utilization"
    assert all(o.config.kv_cache_memory_bytes is None for o in history)
    assert result.winner is not None and result.winner.config.gpu_memory_utilization <= 30 / 32


def test_the_context_objective_sizes_the_pool_within_what_was_free_less_the_worker_and_the_headroom():
    node = BusyNode(free=10 * GIB)
    policy = Policy(request(native_max_len=1 << 20), BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    refused = node.run(first.config)
    second = policy.next([refused])
    assert isinstance(second, Launch)
    pool = second.config.kv_cache_memory_bytes
    room = 10 * GIB - ESTIMATED_NON_KV - policy.request.headroom_bytes
    assert room - 2 * MIB - BLOCK * PER_TOKEN * 2 < pool <= room + MIB  # all the room, in whole blocks
    assert "--kv-cache-memory-bytes" in second.reason
    result, history = drive(policy, node)
    assert result.winner is not None and result.winner.stable
    assert result.winner.probe.min_headroom_bytes >= GIB


def test_a_busy_node_below_the_fraction_floor_still_serves_from_a_pool_in_bytes():
    """Where it helps: a node so busy that the fraction it has free is below the search's floor. By
    fraction the search gives up; in bytes the small pool the goal needs fits."""
    free = 12 * GIB  # 0.37 of the node, below a floor of 0.50
    goal = {"objective": "targets", "target_context": 4096, "target_seqs": 4, "util_floor": 0.5}
    by_fraction = Policy(Request(native_max_len=4096, **goal), BASE, estimate=estimate, calibrate=calibrate)
    result, _ = drive(by_fraction, BusyNode(free))
    assert result.winner is None and "fell below 0.50" in result.reason
    in_bytes = Policy(
        Request(native_max_len=4096, kv_bytes_skip_free_check=True, **goal),
        BASE,
        estimate=estimate,
        calibrate=calibrate,
    )
    result, history = drive(in_bytes, BusyNode(free))
    assert result.winner is not None and result.winner.stable
    need = ToyEstimate(0).kv_bytes_for(4096, 4)
    assert result.winner.config.kv_cache_memory_bytes == math.ceil(need / MIB) * MIB


def test_a_pool_in_bytes_unstable_under_load_comes_back_smaller_never_at_another_fraction():
    node = BusyNode(
        free=10 * GIB, spike=GIB
    )  # the server takes 1 GiB more under load than the estimate knows
    policy = Policy(request(native_max_len=1 << 20), BASE, estimate=estimate, calibrate=calibrate)
    result, history = drive(policy, node)
    pools = [o.config.kv_cache_memory_bytes for o in history[1:]]
    assert history[1].verdict == "unstable" and pools[1] < pools[0]
    assert len(set(pools)) == len(pools)  # every launch in bytes a new pool
    assert result.winner is not None and result.winner.stable


def test_a_pool_in_bytes_the_node_refuses_at_allocation_is_sized_down_to_what_it_had():
    node = BusyNode(free=10 * GIB, held=9 * GIB // 2)  # the worker holds 2.5 GiB more than the estimate says
    policy = Policy(request(native_max_len=1 << 20), BASE, estimate=estimate, calibrate=calibrate)
    result, history = drive(policy, node)
    refused = [o for o in history if o.config.kv_cache_memory_bytes and not o.booted]
    assert refused and refused[0].category == "startup_free_memory_below_utilization"
    assert result.winner is not None and result.winner.stable
    assert len(history) == 3  # the fraction, the pool the estimate had room for, the pool the node had
    assert result.winner.config.kv_cache_memory_bytes <= 10 * GIB - 9 * GIB // 2 - GIB


def test_the_dry_run_ladder_names_the_pool_in_bytes_on_the_cpu_only():
    cpu = Policy(request(), BASE, estimate=estimate, calibrate=calibrate).ladder(device="cpu")
    cuda = Policy(request(CUDA), BASE, estimate=estimate, calibrate=calibrate).ladder()
    assert cpu[-1].startswith("kv-cache-memory-bytes: once a NUMA node's free memory refuses the fraction")
    assert not any(step.startswith("kv-cache-memory-bytes") for step in cuda)


def test_a_pool_given_in_bytes_calibrates_from_its_bytes_not_from_vllms_two_decimals():
    from vllm_tuner.estimate import Calibration

    # real vLLM 0.32 on the CPU: "Explicitly set (0.0/23.54) GiB for KV cache on node 0." for a 5 MiB pool
    cfg = ServeConfig(model="tiny/llama", max_model_len=2048, max_num_seqs=2, kv_cache_memory_bytes=5 * MIB)
    facts = {"available_kv_gib": 0.0, "total_gib": 23.54, "kv_cache_tokens": 5120}
    cal = Calibration.from_facts(facts, cfg)
    assert cal.kv_pool_bytes == 5 * MIB and cal.kv_bytes_per_token == 1024
