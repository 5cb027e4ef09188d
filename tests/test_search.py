"""The search policy, driven with plain data: a toy linear memory model stands in for the estimator."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_tuner.search import GIB, Finish, Launch, Observation, Policy, ProbeSummary, Request
from vllm_tuner.serveconfig import ServeConfig

TOTAL = 32 * GIB
BYTES_PER_TOKEN = 131072  # Llama-3.1-8B, bf16, TP1


@dataclass
class ToyEstimate:
    kv_pool_bytes: int
    kv_bytes_per_token: int
    weights_bytes: int = 14 * GIB
    cudagraph_bytes: int = GIB // 2
    non_kv_bytes: int = 15 * GIB

    def max_context(self, seqs: int) -> int:
        return max(0, self.kv_pool_bytes // (self.kv_bytes_per_token * seqs))

    def max_seqs(self, context: int) -> int:
        return max(0, self.kv_pool_bytes // (self.kv_bytes_per_token * context))


def toy_model(fixed_bytes: int):
    """pool = total * util - fixed - cudagraph; a calibration replaces ``fixed`` by the measured one."""

    def estimate(cfg: ServeConfig, calibration) -> ToyEstimate:
        fixed = calibration if calibration is not None else fixed_bytes
        graphs = 0 if cfg.enforce_eager else GIB // 2
        per_token = BYTES_PER_TOKEN // (2 if cfg.kv_cache_dtype == "fp8" else 1)
        offload = int(cfg.cpu_offload_gb * GIB)  # weights moved to CPU memory free their GPU bytes
        pool = int(TOTAL * (cfg.gpu_memory_utilization or 0.92)) - fixed - graphs + offload
        return ToyEstimate(
            pool,
            per_token,
            weights_bytes=14 * GIB - offload,
            cudagraph_bytes=graphs,
            non_kv_bytes=fixed - offload,
        )

    def calibrate(facts: dict, cfg: ServeConfig) -> int:
        if "available_kv_gib" not in facts:  # it got as far as the weights: they were that much off
            return fixed_bytes + int(facts["weights_gib"] * GIB) - (14 * GIB - int(cfg.cpu_offload_gb * GIB))
        graphs = 0 if cfg.enforce_eager else GIB // 2
        offload = int(cfg.cpu_offload_gb * GIB)
        return (
            int(TOTAL * cfg.gpu_memory_utilization) - int(facts["available_kv_gib"] * GIB) - graphs + offload
        )

    return estimate, calibrate


class World:
    """The 'real GPU' for these tests: the true fixed cost differs from the estimate."""

    def __init__(
        self,
        true_fixed: int,
        *,
        graph_edge: float = 1.0,
        runtime_spike: int = 0,
        dies_below: int | None = None,
        token_bytes_factor: float = 1.0,
    ) -> None:
        self.true_fixed = true_fixed
        self.graph_edge = graph_edge
        self.runtime_spike = runtime_spike
        self.dies_below = dies_below  # headroom under load below which the server dies (no reading)
        self.token_bytes_factor = token_bytes_factor  # real KV bytes per token / the estimate's

    def run(self, cfg: ServeConfig) -> Observation:
        util = cfg.gpu_memory_utilization
        graphs = 0 if cfg.enforce_eager else GIB // 2
        per_token = int(BYTES_PER_TOKEN * self.token_bytes_factor) // (
            2 if cfg.kv_cache_dtype == "fp8" else 1
        )
        pool = int(TOTAL * util) - self.true_fixed - graphs
        facts = {"available_kv_gib": pool / GIB, "total_gib": TOTAL / GIB, "gpu_memory_utilization": util}
        need = cfg.max_model_len * per_token
        if pool < need:
            facts["estimated_max_model_len"] = pool // per_token
            return Observation(cfg, "kv_cache_insufficient_for_max_len", facts)
        if util >= self.graph_edge and not cfg.enforce_eager:
            return Observation(cfg, "oom_cudagraph_capture", facts)
        facts["kv_cache_tokens"] = pool // per_token
        used = self.true_fixed + graphs + pool + self.runtime_spike
        headroom = TOTAL - used
        if self.dies_below is not None and headroom < self.dies_below:
            return Observation(cfg, "success", facts, ProbeSummary(ok=False, server_died=True))
        probe = ProbeSummary(ok=headroom >= GIB, min_headroom_bytes=headroom)
        return Observation(cfg, "success", facts, probe)


def drive(policy: Policy, world: World, limit: int = 12):
    history: list[Observation] = []
    for _ in range(limit):
        decision = policy.next(history)
        if isinstance(decision, Finish):
            return decision, history
        obs = world.run(decision.config)
        if obs.booted and not policy.probe_after_boot(history, obs.config, obs.facts):
            obs = Observation(obs.config, obs.category, obs.facts, None)
        history.append(obs)
    raise AssertionError(f"no decision after {limit} launches: {[o.verdict for o in history]}")


def best_context(true_fixed: int, util: float, seqs: int = 1) -> int:
    pool = int(TOTAL * util) - true_fixed - GIB // 2
    return pool // (BYTES_PER_TOKEN * seqs)


BASE = ServeConfig(model="Qwen/Qwen2.5-7B-Instruct")


def test_first_candidate_comes_from_the_estimate():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    assert isinstance(first, Launch)
    assert first.config.gpu_memory_utilization == 0.95
    assert first.config.max_num_seqs == 1
    expected = best_context(20 * GIB, 0.95) // 16 * 16
    assert first.config.max_model_len == expected
    assert "estimated" in first.reason


def test_estimate_too_optimistic_converges_from_measured_numbers():
    estimate, calibrate = toy_model(18 * GIB)  # the estimate believes 2 GiB more is free than is
    world = World(true_fixed=20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    assert finish.winner is not None and finish.winner.stable
    assert len(history) == 2
    assert history[0].category == "kv_cache_insufficient_for_max_len"
    true_best = best_context(20 * GIB, 0.95)
    assert true_best * 0.98 <= finish.winner.config.max_model_len <= true_best


def test_estimate_too_pessimistic_relaunches_bigger_without_probing_the_small_one():
    estimate, calibrate = toy_model(22 * GIB)  # believes 2 GiB less is free
    world = World(true_fixed=20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    assert [o.verdict for o in history] == ["boots", "stable"]
    assert finish.winner.config.max_model_len > history[0].config.max_model_len


def test_graph_capture_edge_backs_off_utilization_by_one_step():
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB, graph_edge=0.95)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    assert history[0].category == "oom_cudagraph_capture"
    assert finish.winner.config.gpu_memory_utilization == 0.94


def test_unstable_under_load_lowers_utilization_until_headroom_holds():
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB, runtime_spike=int(1.2 * GIB))
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    assert any(o.verdict == "unstable" for o in history)
    winner = finish.winner
    assert winner.stable and winner.probe.min_headroom_bytes >= GIB
    assert winner.config.gpu_memory_utilization < 0.95


def test_a_cautious_step_down_climbs_back_while_a_stable_probe_shows_spare_headroom():
    # at 0.95 the server dies under load (no headroom reading), so the policy steps down blind, by the
    # headroom asked for (1 GiB of 32 → 0.04); 0.91 holds with 1.68 GiB, which buys two 0.01 steps back
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB, runtime_spike=int(1.2 * GIB), dies_below=GIB // 2)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    utils = [o.config.gpu_memory_utilization for o in history if o.probe is not None]
    assert utils == [0.95, 0.91, 0.93]
    assert [o.verdict for o in history if o.probe is not None] == ["unstable", "stable", "stable"]
    # the highest utilization with 1 GiB headroom: 32 GiB × (1 − u) − 1.2 GiB ≥ 1 GiB ⇒ u ≤ 0.931
    assert finish.winner.config.gpu_memory_utilization == 0.93


def test_the_climb_back_never_reaches_a_step_that_failed():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    cfg = BASE.replace(max_model_len=8192, max_num_seqs=1)
    facts = {"available_kv_gib": 8.0, "total_gib": 32.0, "kv_cache_tokens": 65536}
    history = [
        Observation(cfg.replace(gpu_memory_utilization=0.93), "success", facts, ProbeSummary(ok=False)),
        Observation(
            cfg.replace(gpu_memory_utilization=0.90),
            "success",
            facts,
            ProbeSummary(ok=True, min_headroom_bytes=3 * GIB),  # would buy six steps
        ),
    ]
    assert policy.caps(history).util == 0.92


def test_a_measured_pool_is_carried_to_a_lower_utilization():
    # the estimate's KV bytes per token are 10% low, so only vLLM's own numbers size the context: after
    # the failure under load, the next length comes from the measured pool less 0.03 × the card
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB, runtime_spike=int(1.2 * GIB), token_bytes_factor=1.1)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    finish, history = drive(policy, world)
    assert [o.category for o in history].count("kv_cache_insufficient_for_max_len") == 1  # the first only
    assert all(o.probe is not None for o in history if o.booted)  # every boot was worth its probe
    winner = finish.winner.config
    per_token = int(BYTES_PER_TOKEN * 1.1)
    true_best = (int(TOTAL * winner.gpu_memory_utilization) - 20 * GIB - GIB // 2) // per_token
    assert true_best * 0.98 <= winner.max_model_len <= true_best


def test_native_maximum_reached_then_concurrency_grows():
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB)
    policy = Policy(Request(native_max_len=32768), BASE, estimate=estimate, calibrate=calibrate)
    finish, _ = drive(policy, world)
    cfg = finish.winner.config
    assert cfg.max_model_len == 32768
    assert cfg.max_num_seqs == best_context(20 * GIB, 0.95) // 32768


def test_concurrency_objective_keeps_the_context_floor():
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB)
    req = Request(objective="concurrency", min_context=8192, native_max_len=32768)
    finish, _ = drive(Policy(req, BASE, estimate=estimate, calibrate=calibrate), world)
    cfg = finish.winner.config
    assert cfg.max_model_len == 8192
    assert cfg.max_num_seqs == best_context(20 * GIB, 0.95) // 8192


def test_targets_out_of_reach_say_what_would_help_and_launch_nothing():
    estimate, calibrate = toy_model(20 * GIB)
    req = Request(objective="targets", target_context=65536, target_seqs=2, native_max_len=131072)
    decision = Policy(req, BASE, estimate=estimate, calibrate=calibrate).next([])
    assert isinstance(decision, Finish) and decision.winner is None
    assert any("--allow fp8-kv" in line for line in decision.missing)


def test_out_of_reach_says_by_how_many_gib():
    estimate, calibrate = toy_model(20 * GIB)
    req = Request(objective="targets", target_context=65536, target_seqs=2, native_max_len=131072)
    decision = Policy(req, BASE, estimate=estimate, calibrate=calibrate).next([])
    pool = int(TOTAL * 0.95) - 20 * GIB - GIB // 2
    need = 2 * 65536 * BYTES_PER_TOKEN
    assert f"need {need / GIB:.2f} GiB of KV cache, the pool has {pool / GIB:.2f} GiB" in decision.reason
    assert f"{(need - pool) / GIB:.2f} GiB short" in decision.reason


def test_a_winner_comes_with_what_each_lossy_knob_not_allowed_would_add():
    estimate, calibrate = toy_model(20 * GIB)
    req = Request(native_max_len=131072, offload_flag=None)
    finish, _ = drive(Policy(req, BASE, estimate=estimate, calibrate=calibrate), World(true_fixed=20 * GIB))
    assert finish.winner is not None and finish.missing == ()
    won = finish.winner.config.max_model_len
    (eager, fp8) = finish.gains  # offload: this vLLM has no flag for it
    assert eager.startswith("--allow eager would reach --max-model-len ") and "slower decoding" in eager
    assert fp8.startswith("--allow fp8-kv would reach --max-model-len ") and "accuracy" in fp8
    assert int(fp8.split()[5]) > int(eager.split()[5]) > won * 1.02  # fp8 halves the KV bytes
    allowed = Request(native_max_len=131072, offload_flag=None, allow=frozenset({"eager", "fp8-kv"}))
    finish, _ = drive(
        Policy(allowed, BASE, estimate=estimate, calibrate=calibrate), World(true_fixed=20 * GIB)
    )
    assert finish.gains == ()  # allowed knobs are used where they help, not advertised


def test_targets_reached_with_the_allowed_lossy_knobs_added_in_the_knob_order():
    """The guides' ladder: eager first, then an fp8 KV cache (each added on top of the one before)."""
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB)
    req = Request(
        objective="targets",
        target_context=65536,
        target_seqs=2,
        native_max_len=131072,
        allow=frozenset({"eager", "fp8-kv"}),
    )
    finish, _ = drive(Policy(req, BASE, estimate=estimate, calibrate=calibrate), world)
    cfg = finish.winner.config
    assert cfg.kv_cache_dtype == "fp8" and cfg.max_model_len == 65536 and cfg.max_num_seqs == 2
    assert cfg.enforce_eager  # eager alone is short, so fp8 KV comes on top of it
    # --knob-order puts the KV dtype first: fp8 alone reaches the target, eager is never added
    fp8_first = Request(**{**req.__dict__, "knob_order": ("kv-cache-dtype", "enforce-eager")})
    finish, _ = drive(Policy(fp8_first, BASE, estimate=estimate, calibrate=calibrate), world)
    cfg = finish.winner.config
    assert cfg.kv_cache_dtype == "fp8" and not cfg.enforce_eager


def test_weights_that_do_not_fit_end_the_search():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=32768), BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    failed = Observation(first.config, "oom_weights_load", {"tried_to_allocate_gib": 0.9})
    decision = policy.next([failed])
    assert isinstance(decision, Finish) and decision.winner is None
    assert "weights" in decision.reason


def test_free_memory_check_caps_utilization_from_the_numbers():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    failed = Observation(
        first.config, "startup_free_memory_below_utilization", {"free_gib": 28.0, "total_gib": 32.0}
    )
    decision = policy.next([failed])
    assert isinstance(decision, Launch)
    assert decision.config.gpu_memory_utilization == 0.87  # ceil(32 GiB x 0.87) <= 28 GiB free


def test_a_known_failure_is_never_relaunched():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    # vLLM failed for a reason the model cannot explain (no numbers): the next candidate must differ.
    failed = Observation(first.config, "oom_during_profiling", {})
    decision = policy.next([failed])
    assert isinstance(decision, Launch)
    assert decision.config.key() != first.config.key()


def test_decisions_are_deterministic_for_resume():
    estimate, calibrate = toy_model(18 * GIB)
    world = World(true_fixed=20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    _, history = drive(policy, world)
    again = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    assert again.next(history[:1]) == policy.next(history[:1])


def test_knob_order_decides_which_lossy_knob_is_tried_first():
    # each of eager and fp8 alone would reach this target; the user's order picks which one is used
    estimate, calibrate = toy_model(20 * GIB)
    world = World(true_fixed=20 * GIB)
    base = dict(
        objective="targets",
        target_context=40960,
        target_seqs=2,
        native_max_len=131072,
        allow=frozenset({"eager", "fp8-kv"}),
    )
    fp8_first = Request(**base, knob_order=("kv-cache-dtype", "enforce-eager"))
    finish, _ = drive(Policy(fp8_first, BASE, estimate=estimate, calibrate=calibrate), world)
    assert finish.winner.config.kv_cache_dtype == "fp8" and not finish.winner.config.enforce_eager
    eager_first = Request(**base)
    finish, _ = drive(Policy(eager_first, BASE, estimate=estimate, calibrate=calibrate), world)
    assert finish.winner.config.enforce_eager and finish.winner.config.kv_cache_dtype == "auto"


def test_a_stop_that_is_not_about_memory_suggests_no_lossy_knob():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(
        Request(native_max_len=131072, allow=frozenset()), BASE, estimate=estimate, calibrate=calibrate
    )
    first = policy.next([])
    hung = Observation(first.config, "startup_timeout", {})
    finish = policy.next([hung])
    assert isinstance(finish, Finish) and finish.winner is None
    assert "did not become ready" in finish.reason and finish.missing == ()


def test_profiling_oom_halves_batched_tokens_down_to_a_floor_then_stops():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    history: list[Observation] = []
    tried = []
    for _ in range(10):
        decision = policy.next(history)
        if isinstance(decision, Finish):
            break
        tried.append(decision.config.max_num_batched_tokens)
        history.append(Observation(decision.config, "oom_during_profiling", {"max_num_batched_tokens": 2048}))
    assert tried == [None, 1024, 512, 256]  # vLLM's default (2048 here), then halved to the floor
    assert decision.winner is None and "even at 256 batched tokens" in decision.reason


def test_offload_is_the_least_that_reaches_the_target_and_grows_by_what_a_launch_loaded_beyond_it():
    estimate, calibrate = toy_model(30 * GIB)  # -0.1 GiB of KV left at 0.95: 4096 tokens need 0.5
    req = Request(objective="targets", target_context=4096, target_seqs=1, allow=frozenset({"offload"}))
    policy = Policy(req, BASE, estimate=estimate, calibrate=calibrate)
    first = policy.next([])
    assert first.config.cpu_offload_gb == 1.0  # the fewest whole GiB that hold one 4096-token sequence
    loaded = 14 - 1 + 6  # the weights were 6 GiB larger than estimated
    second = policy.next([Observation(first.config, "oom_during_profiling", {"weights_gib": loaded})])
    assert second.config.cpu_offload_gb == 1.0 + 6
    floor = Request(objective="targets", target_context=16384, target_seqs=2, allow=frozenset({"offload"}))
    deep = Policy(floor, BASE, estimate=estimate, calibrate=calibrate).next([])
    assert deep.config.cpu_offload_gb == 5.0  # 4 GiB of KV: 4.9 GiB of pool at 5, 3.9 at 4


def test_memory_freed_after_the_start_is_climbed_back_from_a_stable_probe():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(
        Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate, start_util_cap=0.76
    )
    first = policy.next([])
    assert first.config.gpu_memory_utilization == 0.76  # a co-tenant held the rest when the search began
    facts = {"available_kv_gib": 4.0, "total_gib": TOTAL / GIB, "kv_cache_tokens": 4 * GIB // BYTES_PER_TOKEN}
    spare = ProbeSummary(ok=True, min_headroom_bytes=GIB + int(0.055 * TOTAL))  # 5.5 steps above 1 GiB
    climbed = policy.next([Observation(first.config, "success", facts, spare)])
    assert isinstance(climbed, Launch) and climbed.config.gpu_memory_utilization == 0.81
    failed = Observation(climbed.config, "oom_cudagraph_capture", dict(facts, gpu_memory_utilization=0.81))
    after = policy.next([Observation(first.config, "success", facts, spare), failed])
    assert isinstance(after, Launch) and after.config.gpu_memory_utilization == 0.80  # never a failed step


def test_a_start_that_finds_the_memory_taken_again_limits_the_climb_at_once():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(
        Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate, start_util_cap=0.76
    )
    first = policy.next([])
    facts = {"available_kv_gib": 4.0, "total_gib": TOTAL / GIB, "kv_cache_tokens": 4 * GIB // BYTES_PER_TOKEN}
    stable = Observation(
        first.config, "success", facts, ProbeSummary(ok=True, min_headroom_bytes=GIB + int(0.055 * TOTAL))
    )
    climbed = policy.next([stable])
    assert climbed.config.gpu_memory_utilization == 0.81
    back = {"free_gib": 0.765 * TOTAL / GIB, "total_gib": TOTAL / GIB}  # the co-tenant came back
    refused = Observation(climbed.config, "startup_free_memory_below_utilization", back)
    after = policy.next([stable, refused])
    assert not isinstance(after, Launch) or after.config.gpu_memory_utilization <= 0.76  # not 0.80, 0.79, ...


def test_lossy_knobs_are_not_used_for_concurrency_past_vllms_usual_default():
    estimate, calibrate = toy_model(10 * GIB)  # ~20 GiB of KV: thousands of 512-token sequences
    req = Request(objective="concurrency", min_context=512, allow=frozenset({"eager", "fp8-kv"}))
    first = Policy(req, BASE, estimate=estimate, calibrate=calibrate).next([])
    pool = int(TOTAL * 0.95) - 10 * GIB - GIB // 2
    assert first.config.max_num_seqs == pool // (512 * BYTES_PER_TOKEN) > 256  # past 256: no lossy knob
    assert not first.config.enforce_eager and first.config.kv_cache_dtype == "auto"


def test_all_three_lossy_knobs_are_added_in_the_guides_order_and_offload_only_as_far_as_needed():
    """Guide 004's ladder: --enforce-eager, then --kv-cache-dtype fp8, then --cpu-offload-gb, and only as
    many GiB as the goal needs with the other two on (before: offload alone, a quarter of the weights)."""
    estimate, calibrate = toy_model(30 * GIB)  # -0.1 GiB of KV at 0.95 with graphs: nothing fits
    req = Request(native_max_len=32768, allow=frozenset({"eager", "fp8-kv", "offload"}))
    first = Policy(req, BASE, estimate=estimate, calibrate=calibrate).next([])
    cfg = first.config
    assert cfg.enforce_eager and cfg.kv_cache_dtype == "fp8" and cfg.max_model_len == 32768
    # eager frees the 0.5 GiB of graphs (0.4 GiB of pool), fp8 halves the 4 GiB 32768 tokens need: 2 GiB,
    # 1.6 GiB short, so 2 whole GiB of offload
    assert cfg.cpu_offload_gb == 2.0
    assert first.reason.endswith("using eager, fp8-kv, offload")
    offload_first = Request(**{**req.__dict__, "knob_order": ("offload", "enforce-eager", "kv-cache-dtype")})
    cfg = Policy(offload_first, BASE, estimate=estimate, calibrate=calibrate).next([]).config
    assert not cfg.enforce_eager and cfg.kv_cache_dtype == "auto" and cfg.cpu_offload_gb == 5.0


def test_what_an_unallowed_knob_would_reach_comes_from_the_measured_numbers():
    """The estimate thinks 2 GiB less is held than is: after a launch measured the truth, the eager hint
    is what eager buys on top of the measurement, not on top of the estimate."""
    estimate, calibrate = toy_model(18 * GIB)
    world = World(true_fixed=20 * GIB)
    req = Request(native_max_len=131072, offload_flag=None)
    finish, _ = drive(Policy(req, BASE, estimate=estimate, calibrate=calibrate), world)
    eager = next(line for line in finish.gains if line.startswith("--allow eager"))
    reached = int(eager.split()[5])
    measured = (int(TOTAL * 0.95) - 20 * GIB) // BYTES_PER_TOKEN  # the true pool without graphs
    raw = (int(TOTAL * 0.95) - 18 * GIB) // BYTES_PER_TOKEN  # what the estimate alone would say
    assert measured * 0.98 <= reached <= measured < raw


def test_a_floor_short_by_less_than_the_estimates_error_is_launched_and_then_measured():
    estimate, calibrate = toy_model(20 * GIB)
    pool = int(TOTAL * 0.95) - 20 * GIB - GIB // 2  # 9.9 GiB
    near = pool // BYTES_PER_TOKEN // 16 * 16 + 2048  # 0.25 GiB more than the estimated pool holds
    req = Request(objective="targets", target_context=near, target_seqs=1, native_max_len=131072)
    policy = Policy(req, BASE, estimate=estimate, calibrate=calibrate)
    launch = policy.next([])
    assert isinstance(launch, Launch) and launch.config.max_model_len == near
    assert "short, within its own error" in launch.reason and "launched to measure" in launch.reason
    # the truth is kinder than the estimate: it fits
    finish, history = drive(policy, World(true_fixed=19 * GIB))
    assert finish.winner is not None and finish.winner.config.max_model_len == near and len(history) == 1
    # the truth is as the estimate said: one launch, then the refusal speaks of the measured pool
    finish, history = drive(policy, World(true_fixed=20 * GIB))
    assert finish.winner is None and len(history) == 1 and "measured KV pool" in finish.reason
    # far beyond the estimate's error (5% of the 14.5 GiB of weights and graphs): no launch
    far = Request(objective="targets", target_context=2 * near, target_seqs=1, native_max_len=131072)
    assert isinstance(Policy(far, BASE, estimate=estimate, calibrate=calibrate).next([]), Finish)


def test_weights_far_from_the_estimate_are_named_and_close_ones_are_not():
    estimate, calibrate = toy_model(20 * GIB)
    policy = Policy(Request(native_max_len=131072), BASE, estimate=estimate, calibrate=calibrate)
    cfg = policy.next([]).config
    close = Observation(cfg, "success", {"weights_gib": 14 * 1.14})
    far = Observation(cfg, "success", {"weights_gib": 14 * 1.3})
    assert policy.misestimates([close]) == ()
    (warning,) = policy.misestimates([close, far])
    assert warning.startswith(
        "vLLM loaded 18.20 GiB of weights per GPU, the estimate said 14.00 GiB (30% more)"
    )
    (gone,) = policy.misestimates(
        [Observation(cfg.replace(cpu_offload_gb=7.0), "success", {"weights_gib": 0.0})]
    )
    assert "0.00 GiB of weights per GPU, the estimate said 7.00 GiB (100% less)" in gone


def test_a_floor_that_is_not_a_whole_number_of_blocks_is_launched_as_given():
    """Like guide 004's 82000 tokens with MLA's 64-token blocks (81984 + 16): the floor is the user's
    length, never rounded below itself into a refusal."""
    estimate, calibrate = toy_model(20 * GIB)
    for req in (
        Request(
            objective="targets", target_context=41000, target_seqs=1, native_max_len=131072, block_size=64
        ),
        Request(objective="concurrency", min_context=41000, native_max_len=131072, block_size=64),
        Request(min_context=41000, min_seqs=1, native_max_len=41010, block_size=64),
    ):
        first = Policy(req, BASE, estimate=estimate, calibrate=calibrate).next([])
        assert isinstance(first, Launch) and first.config.max_model_len >= 41000, req
