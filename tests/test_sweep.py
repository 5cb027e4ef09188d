"""The concurrency-sweep policy against toy worlds (plain data, no server)."""

from __future__ import annotations

from vllm_tuner.slo import parse_slo
from vllm_tuner.sweep import Level, choose, next_level


def world(peak: float, half: float, ttft_per_client: float):
    """Throughput saturating at ``peak`` (half of it at ``half`` clients); p95 TTFT growing linearly."""

    def measure(c: int, slo) -> Level:
        stats = {"ttft_p95": ttft_per_client * c, "itl_p95": 0.02}
        return Level(c, peak * c / (c + half), tuple(slo.broken(stats)), stats)

    return measure


def sweep(measure, slo, cap=1024, start=1):
    levels: list[Level] = []
    while (c := next_level(levels, cap=cap, start=start)) is not None:
        assert c not in {lv.concurrency for lv in levels}, "a level is never measured twice"
        assert 1 <= c <= cap
        levels.append(measure(c, slo))
        assert len(levels) < 30
    return levels


def exhaustive_best(measure, slo, cap):
    held = [measure(c, slo) for c in range(1, cap + 1)]
    return max((lv for lv in held if lv.held), key=lambda lv: lv.output_tokens_per_s)


def test_the_slo_edge_is_bisected_to_within_an_eighth():
    slo = parse_slo("ttft:p95<=2s")
    measure = world(peak=10000, half=2000, ttft_per_client=2.0 / 100)  # the edge is at exactly 100
    levels = sweep(measure, slo)
    chosen = choose(levels, cap=1024).level
    assert 88 <= chosen.concurrency <= 100
    assert chosen.output_tokens_per_s >= 0.95 * exhaustive_best(measure, slo, 256).output_tokens_per_s
    assert len(levels) <= 12  # doubling to 128, then a few bisections


def test_without_an_slo_the_knee_is_where_throughput_stops_growing():
    slo = parse_slo(None)
    measure = world(peak=5000, half=16, ttft_per_client=0.01)
    levels = sweep(measure, slo, cap=4096)
    chosen = choose(levels, cap=4096).level
    best = max(lv.output_tokens_per_s for lv in levels)
    assert chosen.output_tokens_per_s >= 0.98 * best
    # fewer clients than the flat top: the knee, not the cap
    assert chosen.concurrency < max(lv.concurrency for lv in levels)
    # growth under 5% at 512 (+3%) and again at 1024 (+1.5%): the doubling stops there
    assert max(lv.concurrency for lv in levels) == 1024


def test_one_level_that_does_not_grow_does_not_stop_the_doubling():
    # bench scenario 4090-7b-code-knee before its windows counted streamed tokens: requests of up to
    # 1,500 output tokens finished too rarely in the window, C=2 measured barely more than C=1 and the
    # sweep stopped there, at a third of the best goodput
    measured = {1: 37.8, 2: 39.1, 4: 124.0, 8: 195.9, 16: 243.5, 32: 240.0, 64: 238.0}
    levels: list[Level] = []
    while (c := next_level(levels, cap=256)) is not None:
        levels.append(Level(c, measured.get(c, measured[min(measured, key=lambda k: abs(k - c))])))
    assert [lv.concurrency for lv in levels][:5] == [1, 2, 4, 8, 16]
    assert choose(levels, cap=256).level.concurrency >= 12


def test_two_levels_in_a_row_that_do_not_grow_stop_the_doubling():
    measured = {1: 100.0, 2: 101.0, 4: 101.5}
    levels: list[Level] = []
    while (c := next_level(levels, cap=256)) is not None:
        levels.append(Level(c, measured[c]))
    assert max(lv.concurrency for lv in levels) == 4
    assert choose(levels, cap=256).level.concurrency == 1


def test_the_slo_edge_is_not_bisected_past_where_throughput_fell():
    # C=192 held but made less than C=128; C=256 broke: nothing between 192 and 256 can beat C=128
    levels = [Level(c, t) for c, t in ((1, 80), (2, 150), (4, 270), (8, 460), (16, 740), (32, 1030))]
    levels += [Level(64, 1350), Level(128, 1515), Level(256, 1230, ("preemption rate 0.56",))]
    levels += [Level(192, 1420)]
    nxt = next_level(levels, cap=256)
    assert nxt is not None and nxt < 128  # down to the knee, not up into (192, 256)


def test_the_cap_bounds_the_doubling():
    slo = parse_slo(None)
    levels = sweep(world(peak=1e6, half=1e6, ttft_per_client=0.0), slo, cap=48)
    assert max(lv.concurrency for lv in levels) == 48
    choice = choose(levels, cap=48)
    assert choice.level.concurrency == 48 and "cap" in choice.reason


def test_the_reason_names_the_level_that_broke_the_slo():
    slo = parse_slo("ttft:p95<=2s")
    levels = [
        Level(64, 3000.0, (), {"ttft_p95": 1.2}),
        Level(96, 4210.0, (), {"ttft_p95": 1.7}),
        Level(128, 4800.0, tuple(slo.broken({"ttft_p95": 2.3})), {"ttft_p95": 2.3}),
    ]
    choice = choose(levels, cap=256)
    assert choice.level.concurrency == 96
    assert (
        choice.reason == "C=96: 4,210 tok/s, p95 TTFT 1.7 s; C=128 breaks the TTFT SLO (p95 2.3 s, limit 2 s)"
    )


def test_the_reason_for_a_knee_says_what_more_clients_add():
    levels = [Level(32, 3000.0), Level(64, 3950.0), Level(128, 4000.0)]
    choice = choose(levels, cap=256)
    assert choice.level.concurrency == 64
    assert "C=128 adds only +1% (4,000 tok/s), under the 2% that would be worth its latency" in choice.reason
    # 3% more is worth it
    assert (
        choose([Level(32, 3000.0), Level(64, 3880.0), Level(128, 4000.0)], cap=256).level.concurrency == 128
    )


def test_nothing_held_when_even_one_client_breaks_the_slo():
    slo = parse_slo("ttft:p95<=10ms")
    levels = sweep(world(peak=100, half=1, ttft_per_client=1.0), slo, start=4)
    assert sorted(lv.concurrency for lv in levels) == [1, 2, 4]
    choice = choose(levels, cap=64)
    assert choice.level is None and choice.reason.startswith("no concurrency held: C=1 breaks the TTFT SLO")


def test_the_reason_says_when_more_clients_add_nothing():
    choice = choose([Level(1, 900.0), Level(2, 2400.0), Level(4, 1900.0)], cap=64)
    assert choice.level.concurrency == 2
    assert choice.reason == "C=2: 2,400 tok/s; C=4 adds nothing (1,900 tok/s)"


def test_the_token_budget_is_vllms_small_chunk_unless_itl_is_limited_and_prompts_are_longer():
    from vllm_tuner.sweep import PREFILL_CHUNK, token_budget
    from vllm_tuner.traffic import traffic_named

    chat, code = traffic_named("chat"), traffic_named("code")  # median prompt ~1,500 and ~3,500 tokens
    itl, ttft = parse_slo("itl:p95<=80ms"), parse_slo("ttft:p95<=2s")
    assert token_budget(chat, itl, 256) == PREFILL_CHUNK  # one chat prompt fits one step's chunk
    assert token_budget(code, itl, 256) is None  # a long prompt would slow several steps: vLLM's default
    assert token_budget(code, ttft, 256) == PREFILL_CHUNK  # no ITL limit: prefill rides on decode steps
    assert token_budget(traffic_named("agent"), parse_slo(None), 256) == PREFILL_CHUNK
    assert token_budget(chat, ttft, 4096) == 4096  # vLLM refuses a budget below --max-num-seqs
