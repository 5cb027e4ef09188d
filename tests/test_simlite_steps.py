"""The simulated engine's step model and scheduler, driven directly in simulated seconds (no server)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from vllm_tuner.simlite import groundtruth, oracle, scheduler, steptime
from vllm_tuner.simlite.activate import load_scenario_file, resolve
from vllm_tuner.simlite.scheduler import LoadResult, Scheduler, Seq

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def launch(scenario: str, *flags: str, model: str = MODEL) -> tuple[groundtruth.Boot, steptime.StepModel]:
    """Boot ``model`` with ``flags`` on the scenario's first GPUs: the pool and the step model."""
    resolved = resolve(load_scenario_file(scenario))
    prepared = oracle.prepare(oracle.parse([model, *flags]), resolved)
    gpu = resolved["gpus"][0]
    boot = groundtruth.boot(
        prepared.model,
        prepared.launch,
        total_bytes=gpu["total_bytes"],
        others_bytes=0,
        gpu_name=gpu["name"],
        truth=prepared.truth,
    )
    assert boot.category == "success"
    return boot, oracle.step_model(prepared, boot, gpu["name"])


def closed_loop(
    boot: groundtruth.Boot,
    model: steptime.StepModel,
    clients: int,
    *,
    prompt: int,
    output: int,
    seconds: float = 60.0,
    warmup: float = 10.0,
    batched: int | None = None,
) -> LoadResult:
    """:func:`scheduler.closed_loop` on this pool, with another token budget if ``batched``."""
    sched = Scheduler(
        num_blocks=boot.num_blocks,
        block_size=boot.block_size,
        max_num_seqs=boot.max_num_seqs,
        max_num_batched_tokens=batched or boot.max_num_batched_tokens,
        step_time=model.seconds,
    )
    return scheduler.closed_loop(sched, clients, [(prompt, output)], seconds=seconds, warmup=warmup)


def p50(values: list[float]) -> float:
    return statistics.median(values)


# -- the step model -------------------------------------------------------------------------------
def test_a_decode_step_reads_the_weights_and_a_prefill_is_bound_by_compute():
    _, model = launch("h100", "--max-model-len", "8192")
    hw = model.hardware
    weights_read = model.weights_bytes / (hw.bandwidth_bytes_s * model.bandwidth_efficiency)
    assert model.seconds([(100, 1)]) == pytest.approx(weights_read + model.overhead_s, rel=0.01)
    # a longer context reads more KV
    assert model.seconds([(8000, 1)] * 32) > model.seconds([(100, 1)] * 32)
    # 4096 prompt tokens in one step: far past the weights' read time, and linear in the tokens
    prefill = model.seconds([(0, 4096)]) - model.overhead_s
    assert prefill > 5 * weights_read
    assert model.seconds([(0, 2048)]) - model.overhead_s == pytest.approx(prefill / 2, rel=0.1)


def test_tensor_parallel_splits_the_work_and_pays_all_reduces():
    _, one = launch("a100-80g", "--max-model-len", "8192")
    _, two = launch("a100-80g", "--max-model-len", "8192", "--tensor-parallel-size", "2")
    assert two.linear_flops_per_token == pytest.approx(one.linear_flops_per_token / 2)
    assert two.weights_bytes < 0.6 * one.weights_bytes
    assert two.overhead_s > one.overhead_s
    assert two.seconds([(0, 4096)]) < 0.6 * one.seconds([(0, 4096)])


def test_gpu_peaks_come_from_the_profiles():
    specs = steptime.load_gpu_specs()
    h100 = steptime.hardware_of("NVIDIA H100 80GB HBM3", specs)
    assert (h100.bandwidth_bytes_s, h100.flops) == (3350e9, 989e12)
    assert steptime.hardware_of("NVIDIA GeForce RTX 3090 Ti", specs).bandwidth_bytes_s == 1008e9
    assert steptime.hardware_of("NVIDIA GeForce RTX 3090", specs).bandwidth_bytes_s == 936e9
    assert all(g["bandwidth_gbs"] > 0 and g["bf16_tflops"] > 0 and g["perf_source"] for g in specs)


# -- throughput and latency under load --------------------------------------------------------------
def test_throughput_rises_with_concurrency_then_flattens():
    boot, model = launch("h100", "--max-model-len", "8192", "--max-num-seqs", "1024")
    rate = {
        c: closed_loop(boot, model, c, prompt=512, output=256, seconds=30, warmup=5).output_tokens_per_s
        for c in (1, 4, 256, 1024)
    }
    assert rate[4] > 3 * rate[1]  # a small batch costs what one sequence costs: nearly linear
    assert rate[256] > 10 * rate[4]
    assert rate[1024] < 1.3 * rate[256]  # four times the clients, little more: past the knee


def test_throughput_counts_the_tokens_streamed_in_the_window_not_only_finished_requests():
    # each request streams 100 tokens at one per second, so in a 30 s window after 5 s of warm-up
    # no request of one client finishes, yet it streams 30 tokens there
    sched = Scheduler(
        num_blocks=1000, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, step_time=lambda w: 1.0
    )
    result = scheduler.closed_loop(sched, 1, [(10, 100)], seconds=35, warmup=5)
    assert result.requests_per_s == 0
    assert result.output_tokens_per_s == pytest.approx(1.0, rel=0.05)


def test_time_to_first_token_grows_with_load():
    boot, model = launch("h100", "--max-model-len", "8192", "--max-num-seqs", "512")
    ttft = {c: p50(closed_loop(boot, model, c, prompt=2048, output=128).ttft_s) for c in (1, 16, 256)}
    assert ttft[1] < ttft[16] < ttft[256]
    assert ttft[256] > 5 * ttft[1]


def test_a_larger_token_budget_lowers_ttft_under_long_prompts():
    boot, model = launch("h100", "--max-model-len", "16384", "--max-num-seqs", "64")
    small = closed_loop(boot, model, 32, prompt=12000, output=64, batched=512)
    large = closed_loop(boot, model, 32, prompt=12000, output=64, batched=8192)
    assert p50(large.ttft_s) < 0.8 * p50(small.ttft_s)


def test_a_prompt_longer_than_the_budget_takes_several_steps():
    sched = Scheduler(
        num_blocks=1000, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, step_time=lambda w: 1.0
    )
    seq = Seq(1200, 4)
    sched.add(seq)
    steps = [sched.step(float(t)) for t in range(3)]
    assert [s.scheduled_tokens for s in steps] == [512, 512, 176]
    assert [len(s.sampled) for s in steps] == [0, 0, 1] and seq.first_token_at == 3.0


def test_prefill_chunks_share_a_step_with_decodes():
    sched = Scheduler(
        num_blocks=1000, block_size=16, max_num_seqs=8, max_num_batched_tokens=512, step_time=lambda w: 1.0
    )
    decoding = Seq(10, 100)
    sched.add(decoding)
    sched.step(0.0)  # its prompt, and its first token
    sched.add(Seq(5000, 4))
    step = sched.step(1.0)
    assert step.scheduled_tokens == 512 and step.sampled == [decoding]


# -- preemption by recompute ---------------------------------------------------------------------
def run_to_end(usable_blocks: int, seqs: list[Seq]) -> Scheduler:
    sched = Scheduler(
        num_blocks=usable_blocks + 1,
        block_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        step_time=lambda w: 0.01,
    )
    for seq in seqs:
        sched.add(seq)
    now = 0.0
    while (step := sched.step(now)) is not None:
        now = step.ends
    return sched


def test_no_preemption_while_the_pool_holds_every_running_sequence():
    # each sequence ends holding ceil((100 + 60 - 1) / 16) = 10 blocks: 40 for the four
    seqs = [Seq(100, 60) for _ in range(4)]
    sched = run_to_end(40, seqs)
    assert sched.preemptions == 0
    assert all(s.generated == 60 for s in seqs)
    assert sched.free_blocks == 40


def test_one_block_short_the_newest_is_preempted_and_recomputed():
    seqs = [Seq(100, 60) for _ in range(4)]
    first_victim = []
    sched = Scheduler(
        num_blocks=40, block_size=16, max_num_seqs=8, max_num_batched_tokens=2048, step_time=lambda w: 0.01
    )
    for seq in seqs:
        sched.add(seq)
    now = 0.0
    while (step := sched.step(now)) is not None:
        now = step.ends
        if step.preempted and not first_victim:
            first_victim = list(step.preempted)
            victim = first_victim[0]
            assert victim.computed == 0 and victim.blocks == 0 and sched.waiting[0] is victim
    assert first_victim == [seqs[3]]  # the newest running request goes
    assert sched.preemptions > 0 and sched.preemptions == sum(s.preemptions for s in seqs)
    assert all(s.generated == 60 and s.finished_at is not None for s in seqs)  # recomputed, not lost
    assert sched.free_blocks == 39


def test_preemptions_appear_when_the_load_outgrows_the_pool():
    boot, model = launch("rtx-5090", "--max-model-len", "8192", "--max-num-seqs", "1024")
    pool_tokens = (boot.num_blocks - 1) * boot.block_size
    fits = pool_tokens // 1000 - 2  # each request ends at 500 + 500 tokens
    calm = closed_loop(boot, model, fits, prompt=500, output=500)
    crowded = closed_loop(boot, model, 2 * fits, prompt=500, output=500)
    assert calm.preemptions == 0
    assert crowded.preemptions > 0 and crowded.completed > 0


# -- the hidden efficiencies -------------------------------------------------------------------------
HIDDEN = ("compute_efficiency", "bandwidth_efficiency", "step_overhead_ms", "allreduce_us")


def test_the_same_card_runs_at_a_different_speed_in_another_scenario():
    _, plain = launch("rtx-3090", "--max-model-len", "4096")
    _, shared = launch("shared-3090", "--max-model-len", "4096")
    assert plain.hardware == shared.hardware
    assert plain.seconds([(1000, 1)] * 8) != shared.seconds([(1000, 1)] * 8)
    truths = [
        load_scenario_file(p.stem).get("truth", {}) for p in (steptime.profiles_dir() / "sim").glob("*.yaml")
    ]
    triples = {tuple(t.get(k) for k in HIDDEN[:3]) for t in truths if "compute_efficiency" in t}
    assert len(triples) >= 10


def test_the_tuner_never_reads_the_hidden_efficiencies():
    package = Path(steptime.__file__).resolve().parents[1]
    readers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "simlite" not in path.parts and any(key in path.read_text() for key in HIDDEN)
    ]
    assert readers == []


# -- the oracle of serving ---------------------------------------------------------------------------
def test_the_oracle_serves_a_workload_with_the_engines_own_scheduler():
    scenario = load_scenario_file("rtx-5090")
    argv = ["serve", MODEL, "--max-model-len", "8192", "--max-num-seqs", "64"]
    mix = [(3000, 200), (500, 500)]
    few = oracle.load(scenario, argv, [0], clients=4, requests=mix, seconds=60, warmup=10)
    many = oracle.load(scenario, argv, [0], clients=64, requests=mix, seconds=60, warmup=10)
    assert few is not None and many is not None
    assert many.output_tokens_per_s > 2.5 * few.output_tokens_per_s
    assert many.percentile(many.ttft_s, 95) > few.percentile(few.ttft_s, 95)
    assert few.percentile(few.itl_s, 50) < few.percentile(few.e2e_s, 50)
    assert (
        oracle.load(scenario, [*argv, "--gpu-memory-utilization", "1.5"], [0], clients=1, requests=mix)
        is None
    )
