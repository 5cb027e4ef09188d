"""The proxy's pure parts over plain data: the routing table, the compression plan over token counts,
the compressed messages, the error parsing and the metrics text."""

from __future__ import annotations

import pytest

from vllm_tuner.errors import ProbeError
from vllm_tuner.proxy.context import (
    CUT_NOTE_TOKENS,
    MIN_CUT_TOKENS,
    SUMMARY_HEADER,
    FitPlan,
    Shape,
    Sizes,
    apply_plan,
    conversation_shape,
    cut_text,
    message_text,
    minimal_plan,
    plan_fit,
    prefix_keys,
    reply_tokens,
    summary_chunks,
    tokenize_request,
)
from vllm_tuner.proxy.fit import length_error, too_long_message
from vllm_tuner.proxy.metrics import ProxyMetrics
from vllm_tuner.proxy.routing import base_url, pick, routing_table


def chat(turns: int, *, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for n in range(turns):
        messages += [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]
    return messages + [{"role": "user", "content": "last"}]


# --------------------------------------------------------------------------------------------- routing


def test_routing_table_lists_each_name_once_and_finds_replicas():
    table = routing_table(
        {
            "http://a:1": {"data": [{"id": "chat", "max_model_len": 4096}, {"id": "chat-lora"}]},
            "http://b:2": {"data": [{"id": "coder", "max_model_len": 8192}]},
            "http://c:3": {"data": [{"id": "chat", "max_model_len": 2048}]},
        }
    )
    assert table.names() == ["chat", "chat-lora", "coder"]
    assert table.serving("chat") == ("http://a:1", "http://c:3")
    assert table.serving("nope") == ()
    assert [e.get("max_model_len") for e in table.entries()] == [4096, None, 8192]  # the first listing wins
    assert table.resolve("coder") == "coder" and table.resolve(None) is None
    only = routing_table({"http://b:2": {"data": [{"id": "coder"}]}})
    assert only.resolve(None) == "coder" and only.resolve("") == "coder"


def test_a_listing_that_is_not_an_openai_model_list_is_refused():
    for listing in ({"detail": "Not Found"}, [1], {"data": [{"name": "x"}]}):
        with pytest.raises(ProbeError, match="http://a:1/v1/models did not answer an OpenAI model list"):
            routing_table({"http://a:1": listing})


def test_pick_takes_the_least_busy_and_rotates_among_equals():
    urls = ("a", "b", "c")
    assert pick(urls, {"a": 2, "b": 1, "c": 1}, 0) == "b"
    assert pick(urls, {"a": 2, "b": 1, "c": 1}, 1) == "c"
    assert [pick(urls, {}, t) for t in range(4)] == ["a", "b", "c", "a"]


def test_base_url_takes_what_users_paste():
    assert base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert base_url(" http://h:1 ") == "http://h:1"


# ----------------------------------------------------------------------------------------- the request


def test_reply_room_is_what_the_request_asks_else_a_default_within_a_quarter():
    assert reply_tokens({"max_tokens": 300}, 4096) == 300
    assert reply_tokens({"max_completion_tokens": 200, "max_tokens": 300}, 4096) == 200
    assert reply_tokens({}, 32768) == 1024
    assert reply_tokens({"max_tokens": None}, 2048) == 512
    assert reply_tokens({"max_tokens": True}, 400) == 100


def test_tokenize_request_keeps_what_changes_the_rendering():
    body = {
        "model": "m",
        "messages": [1],
        "tools": [{"type": "function"}],
        "temperature": 0.2,
        "stream": True,
    }
    assert tokenize_request(body, [2]) == {"model": "m", "messages": [2], "tools": [{"type": "function"}]}


def test_message_text_reads_parts_and_tool_calls():
    assert (
        message_text({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]})
        == "a"
    )
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]}
    assert message_text(call) == '\n[{"id":"1","function":{"name":"f"}}]'


# ---------------------------------------------------------------------------------------- the plan


def test_shape_keeps_leading_system_messages_and_starts_a_turn_at_each_user_message():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert conversation_shape(messages) == Shape(system=(0, 1), turns=((2,), (3, 4, 5, 6), (7,)))
    assert conversation_shape([]) == Shape((), ())


def sizes(texts: list[int], frame: int = 5, cuttable: list[bool] | None = None) -> Sizes:
    return Sizes(tuple(texts), frame, tuple(cuttable if cuttable is not None else [True] * len(texts)))


def test_sizes_share_the_template_tokens_out_over_the_messages():
    messages = chat(1)
    measured = Sizes.of(messages, [2, 1, 1, 1], total=27)
    assert measured.frame == 6 and measured.text == (2, 1, 1, 1)  # (27 - 5) / 4, rounded up
    assert measured.whole(0) == 8


def test_trim_keeps_the_newest_turns_whole_and_cuts_the_next_one_in_the_middle():
    messages = chat(4)  # system, 4 turns of (user, assistant), the last user message
    shape = conversation_shape(messages)
    texts = [10, 100, 300, 100, 300, 100, 300, 100, 300, 20]
    size = sizes(texts)
    whole_two = 2 * (100 + 300 + 2 * 5)
    fixed = 10 + 20 + 2 * 5
    budget = fixed + whole_two + 2 * (5 + CUT_NOTE_TOKENS) + 300
    plan = plan_fit(shape, size, budget, "trim")
    assert plan.excess == 0
    # turn 1 cut to 300 tokens of text: its question whole, its reply to 200 (the longest text goes first)
    assert plan.kept == (10, None, None, 100, 200, 100, 300, 100, 300, 20)
    assert plan.turns == 2  # one cut, one left out
    assert (
        sum(
            size.frame + k + (CUT_NOTE_TOKENS if k < t else 0)
            for k, t in zip(plan.kept, texts, strict=True)
            if k is not None
        )
        <= budget
    )


def test_trim_leaves_an_older_turn_out_rather_than_keep_a_sliver_of_it():
    shape = conversation_shape(chat(3))
    size = sizes([10, 100, 300, 100, 300, 100, 300, 20])
    fixed, whole = 10 + 20 + 10, 400 + 10
    plan = plan_fit(shape, size, fixed + whole + 2 * (5 + CUT_NOTE_TOKENS) + MIN_CUT_TOKENS - 1, "trim")
    assert plan.kept == (10, None, None, None, None, 100, 300, 20)
    assert plan.turns == 2 and plan.left_out == (1, 2, 3, 4)


def test_the_newest_turns_earlier_messages_are_cut_never_left_out():
    # an agent's turn: the question, a tool call, a huge tool result, then the newest message
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "old"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "do it"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "x" * 10},
        {"role": "assistant", "content": "next step"},
    ]
    size = Sizes.of(messages, [5, 50, 50, 20, 10, 5000, 30], total=5165 + 7 * 5)
    plan = plan_fit(conversation_shape(messages), size, 1000, "trim")
    assert plan.excess == 0 and plan.kept[1] is None and plan.kept[2] is None
    assert plan.kept[4] == 10  # a tool call (no text content) is kept as it is
    assert 0 < plan.kept[5] < 5000 and plan.kept[3] == 20 and plan.kept[6] == 30
    assert plan.turns == 2


def test_a_system_message_and_latest_message_that_cannot_fit_say_by_how_much():
    shape = conversation_shape(chat(2))
    plan = plan_fit(shape, sizes([400, 10, 10, 10, 10, 700]), 1000, "trim")
    assert plan.excess == (400 + 5) + (700 + 5) - 1000


def test_summarize_replaces_the_older_turns_and_keeps_room_for_the_summary():
    shape = conversation_shape(chat(6))
    texts = [10] + [200, 200] * 6 + [20]
    size = sizes(texts)
    plan = plan_fit(shape, size, 1500, "summarize")
    assert plan.summarized and plan.summarized == tuple(range(1, plan.summarized[-1] + 1))
    assert 32 <= plan.summary_tokens <= 512
    kept_turns = [i for i in range(1, 13) if plan.kept[i] is not None]
    assert kept_turns and kept_turns[0] == plan.summarized[-1] + 1 and plan.kept[13] == 20
    assert all(plan.kept[i] == texts[i] for i in kept_turns)  # summarize cuts no older turn
    assert plan.turns == len(plan.summarized) // 2
    used = sum(size.whole(i) for i, k in enumerate(plan.kept) if k is not None)
    assert used + plan.summary_tokens + CUT_NOTE_TOKENS <= 1500


def test_summarize_trims_when_too_little_room_is_left_for_a_summary():
    shape = conversation_shape(chat(3))
    size = sizes([10, 50, 50, 50, 50, 50, 50, 20])
    plan = plan_fit(shape, size, 10 + 20 + 10 + 110, "summarize")  # 110 left: a summary would get 27
    assert plan.summarized == () and plan.summary_tokens == 0 and plan.turns >= 1


def test_the_minimal_plan_keeps_the_system_messages_the_newest_message_and_notes():
    shape = conversation_shape(chat(2))
    plan = minimal_plan(shape, sizes([10, 10, 10, 10, 10, 10]))
    assert plan.kept == (10, None, None, None, None, 10)


# ------------------------------------------------------------------------------------------ messages


def test_cut_text_keeps_head_and_tail_in_proportion():
    text = "".join(chr(ord("a") + i % 26) for i in range(400))
    cut = cut_text(text, tokens=100, keep=20)
    head, note, tail = cut.split("\n")
    assert note == "[... 80 tokens cut ...]"
    assert text.startswith(head) and text.endswith(tail) and len(head) + len(tail) == 80
    assert cut_text(text, 100, 100) == text


def test_apply_plan_cuts_leaves_out_and_adds_the_summary_to_the_system_message():
    messages = chat(2)
    messages[3]["content"] = "y" * 400
    size = sizes([2, 1, 1, 100, 1, 1])
    plan = FitPlan(kept=(2, None, None, 10, 1, 1), summarized=(1, 2), summary_tokens=64, turns=2)
    out = apply_plan(messages, plan, size, summary="they said q0 and a0")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == f"be brief\n\n{SUMMARY_HEADER}\nthey said q0 and a0"
    assert "[... 90 tokens cut ...]" in out[1]["content"] and len(out[1]["content"]) < 100
    assert messages[3]["content"] == "y" * 400  # the request's own messages are untouched
    no_system = chat(1, system=False)
    out = apply_plan(no_system, FitPlan(kept=(None, None, 1)), sizes([1, 1, 1]), summary="s")
    assert out == [{"role": "system", "content": f"{SUMMARY_HEADER}\ns"}, {"role": "user", "content": "last"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "x"}]}, {"role": "user", "content": "u"}]
    out = apply_plan(parts, FitPlan(kept=(1, 1)), sizes([1, 1]), summary="s")
    assert out[0]["content"][-1] == {"type": "text", "text": f"{SUMMARY_HEADER}\ns"}


def test_summary_chunks_fit_the_room_and_a_huge_text_goes_alone():
    size = sizes([100, 100, 100, 5000, 100])
    assert summary_chunks((0, 1, 2, 3, 4), size, 250) == [(0, 1), (2,), (3,), (4,)]


def test_prefix_keys_are_shared_by_a_growing_conversation():
    short, longer = chat(2), chat(3)
    keys = prefix_keys("m", longer, (1, 2, 3, 4, 5, 6))
    assert prefix_keys("m", short, (1, 2, 3, 4)) == keys[:4]
    assert prefix_keys("other", short, (1, 2))[1] != keys[1]


# --------------------------------------------------------------------------------------------- errors


def test_length_errors_are_read_from_vllms_messages():
    said = length_error(
        "This model's maximum context length is 4096 tokens. However, your prompt contains 5000 input "
        "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt."
    )
    assert said is not None and (said.prompt, said.max_len) == (5000, 4096)
    said = length_error(
        "The decoder prompt (length 4096) plus the number of requested output tokens (at least 1) is longer "
        "than the maximum model length of 4096. Make sure that `max_model_len` is no smaller than the number "
        "of text tokens (prompt + requested output tokens)."
    )
    assert said is not None and (said.prompt, said.max_len) == (4096, 4096)
    said = length_error(
        "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (2000 in the messages, 100 in the completion)."
    )
    assert said is not None and said.prompt == 2000
    assert length_error("max_tokens=5000 cannot be greater than max_model_len=4096.") is None
    assert length_error("Invalid JSON body") is None


def test_too_long_says_what_was_kept_and_by_how_much():
    message = too_long_message(4096, least=4000, reply=256, asked=True)
    assert message.startswith("This model's maximum context length is 4096 tokens.")
    assert "your messages take 4000 input tokens" in message and "160 tokens too many" in message
    assert "max_tokens asks for 256 more" in message
    assert "1024 are kept for the reply" in too_long_message(8192, 8000, 1024, asked=False)


def test_metrics_render_as_prometheus_text():
    metrics = ProxyMetrics()
    metrics.add("compressed_total", model="chat", strategy="trim")
    metrics.add("compressed_total", model="chat", strategy="trim")
    metrics.add("compressed_prompt_tokens_before_total", 41210, model='a"b')
    text = metrics.render({"http://a:1": 3})
    assert "# TYPE vllm_tune_proxy_compressed_total counter" in text
    assert 'vllm_tune_proxy_compressed_total{model="chat",strategy="trim"} 2.0' in text
    assert 'vllm_tune_proxy_compressed_prompt_tokens_before_total{model="a\\"b"} 41210.0' in text
    assert 'vllm_tune_proxy_in_flight{upstream="http://a:1"} 3.0' in text
    assert metrics.value("compressed_total", model="chat", strategy="trim") == 2
