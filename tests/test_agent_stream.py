"""Unit tests of the accumulators (agent/stream.py), fed what the provider feeds them.

Chunks and events are plain dicts, exactly what `json.loads` makes of each SSE `data:`
line, so a provider's odd shapes (`choices: null`, no `index`, integer ids) arrive here
as they would in production.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import ProviderBadResponse
from agent.stream import (
    ChatAccumulator,
    ResponsesAccumulator,
    StreamBroken,
    Usage,
    final_finish_reason,
    response_from_chat_completion,
    response_from_responses,
)


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    body.update(top)
    return body


def tc(**fields: Any) -> dict[str, Any]:
    return {"tool_calls": [fields]}


class Rec:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.first = 0

    def acc(self) -> ChatAccumulator:
        return ChatAccumulator(self.text.append, self.reasoning.append, self.on_first)

    def on_first(self) -> None:
        self.first += 1


def feed(acc: Any, *chunks: Any) -> Any:
    for c in chunks:
        acc.feed(c)
    return acc.result()


def test_text_accumulates_with_finish_and_usage() -> None:
    rec = Rec()
    result = feed(
        rec.acc(),
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
    )
    assert result.content == "Hello"
    assert result.finish_reason == "stop"
    assert result.complete
    assert result.usage == Usage(5, 3, 0, 8)
    assert rec.text == ["Hel", "lo"]
    assert rec.first == 1


def test_tool_arguments_split_across_deltas_accumulate_with_id_and_name() -> None:
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id="call_a", type="function", function={"name": "search", "arguments": ""})),
        chunk(tc(index=0, function={"arguments": '{"qu'})),
        chunk(tc(index=0, function={"arguments": 'ery": "x"}'})),
        chunk(tc(index=1, id="call_b", type="function", function={"name": "weather", "arguments": ""})),
        chunk(tc(index=1, function={"arguments": "{}"})),
        chunk({}, "tool_calls"),
    )
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_a", "search", '{"query": "x"}'),
        ("call_b", "weather", "{}"),
    ]
    assert result.finish_reason == "tool_calls"


def test_text_after_first_tool_delta_is_kept_but_not_emitted() -> None:
    rec = Rec()
    result = feed(
        rec.acc(),
        chunk({"content": "Let me check. "}),
        chunk(tc(index=0, id="c", function={"name": "t", "arguments": "{}"})),
        chunk({"content": "(hidden)"}),
        chunk({}, "tool_calls"),
    )
    assert rec.text == ["Let me check. "]
    assert result.content == "Let me check. (hidden)"
    assert result.visible_text == "Let me check. "


def test_tool_only_stream_emits_no_text_but_fires_first_delta_once() -> None:
    rec = Rec()
    feed(
        rec.acc(),
        chunk({"role": "assistant", "content": None}),
        chunk(tc(index=0, id="c", function={"name": "t", "arguments": ""})),
        chunk(tc(index=0, function={"arguments": "{}"})),
        chunk({}, "tool_calls"),
    )
    assert rec.text == []
    assert rec.first == 1


def test_missing_index_continues_the_open_call() -> None:
    result = feed(
        Rec().acc(),
        chunk(tc(id="call_a", function={"name": "get_weather", "arguments": '{"city"'})),
        chunk(tc(function={"arguments": ': "Paris"}'})),
        chunk(tc(id="call_b", function={"name": "get_time", "arguments": "{}"})),
        chunk({}, "tool_calls"),
    )
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_time", "{}"),
    ]


def test_repeated_id_name_and_type_are_assigned_not_concatenated() -> None:
    head = {"index": 0, "id": "call_abc", "type": "function"}
    result = feed(
        Rec().acc(),
        chunk({"role": "assistant"}),
        chunk({"role": "assistant", **tc(**head, function={"name": "read_file", "arguments": '{"pa'})}),
        chunk({"role": "assistant", **tc(**head, function={"name": "read_file", "arguments": 'th": "a"}'})}),
        chunk({}, "tool_calls"),
    )
    (call,) = result.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_abc", "read_file", '{"path": "a"}')


def test_ollama_parallel_calls_on_index_zero_stay_separate() -> None:
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id="call_a", function={"name": "get_weather", "arguments": '{"city":"Paris"}'})),
        chunk(tc(index=0, id="call_b", function={"name": "get_time", "arguments": "{}"})),
        chunk({}, "tool_calls"),
    )
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}'),
        ("call_b", "get_time", "{}"),
    ]


def test_changed_id_without_a_name_continues_the_call() -> None:
    """Poolside: a different id on later chunks of the same call must not split it."""
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id="first", function={"name": "t", "arguments": '{"a"'})),
        chunk(tc(index=0, id="second", function={"arguments": ": 1}"})),
        chunk({}, "tool_calls"),
    )
    (call,) = result.tool_calls
    assert (call.id, call.arguments) == ("first", '{"a": 1}')


def test_integer_ids_become_strings_and_dict_arguments_json() -> None:
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id=7, function={"name": "t", "arguments": {"x": 1}})),
        chunk({}, "tool_calls"),
    )
    (call,) = result.tool_calls
    assert call.id == "7"
    assert call.arguments == '{"x": 1}'


def test_extra_tool_call_keys_are_kept_for_round_tripping() -> None:
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id="c", function={"name": "t", "arguments": "{}"}, extra_content={"google": {"s": "x"}})),
        chunk({}, "tool_calls"),
    )
    assert result.tool_calls[0].extra == {"extra_content": {"google": {"s": "x"}}}
    assert result.assistant_message()["tool_calls"][0]["extra_content"] == {"google": {"s": "x"}}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_from_either_field_is_separate_from_text(field: str) -> None:
    rec = Rec()
    result = feed(rec.acc(), chunk({field: "think "}), chunk({field: "hard"}), chunk({"content": "42"}), chunk({}, "stop"))
    assert result.reasoning == "think hard"
    assert result.content == "42"
    assert rec.reasoning == ["think ", "hard"]
    assert rec.text == ["42"]
    assert rec.first == 1


def test_mirrored_reasoning_fields_count_once() -> None:
    rec = Rec()
    result = feed(rec.acc(), chunk({"reasoning_content": "a", "reasoning": "a"}), chunk({}, "stop"))
    assert result.reasoning == "a"
    assert rec.reasoning == ["a"]


def test_usage_is_replaced_by_the_latest_never_summed() -> None:
    result = feed(
        Rec().acc(),
        chunk({"content": "a"}, usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
        chunk({"content": "b"}, usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
        chunk({}, "stop", usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                 "completion_tokens_details": {"reasoning_tokens": 1}}),
    )
    assert result.usage == Usage(5, 3, 1, 8)


@pytest.mark.parametrize(
    ("seen", "has_calls", "expected"),
    [
        ([], False, None),
        (["stop"], False, "stop"),
        (["stop"], True, "tool_calls"),  # gpt-4o with forced tool_choice says "stop"
        (["tool_calls", "stop"], True, "tool_calls"),  # ChatMock double finish
        (["length"], True, "length"),
        (["content_filter", "stop"], False, "content_filter"),
        (["stop", "error"], False, "error"),
    ],
)
def test_final_finish_reason_rules(seen: list[str], has_calls: bool, expected: str | None) -> None:
    assert final_finish_reason(seen, has_calls) == expected


def test_stream_without_finish_reason_is_not_complete() -> None:
    result = feed(Rec().acc(), chunk({"content": "partial"}))
    assert not result.complete
    assert result.finish_reason is None


def test_empty_finish_reason_string_is_ignored() -> None:
    acc = Rec().acc()
    feed(acc, chunk({"content": "a"}, ""))
    assert not acc.has_finish


def test_non_data_chunks_are_skipped() -> None:
    rec = Rec()
    result = feed(
        rec.acc(),
        chunk(choices=[], prompt_filter_results=[{"prompt_index": 0}]),  # Azure prompt filter
        {"id": "x", "choices": None},  # proxies in front of Claude
        {"id": "x", "usage": {"prompt_tokens": 1}},  # DeepInfra: no `choices` key at all
        {  # Azure async content filter: no delta
            "id": "", "object": "", "choices": [{"index": 0, "finish_reason": None, "content_filter_results": {}}]
        },
        chunk({"content": "ok"}),
        {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "delta": {"content": "!"}}]},  # mislabelled
        chunk({}, "stop"),
    )
    assert result.content == "ok!"
    assert rec.text == ["ok", "!"]


@pytest.mark.parametrize(
    "bad",
    [
        {"id": "x", "choices": [{"index": 0, "delta": "not a dict"}]},
        {"id": "x", "choices": [{"index": 0, "delta": {"content": ["a", "list"]}}]},
        {"id": "x", "choices": {"index": 0}},
        {"id": "x", "choices": ["not a dict"]},
    ],
)
def test_malformed_chunk_raises_a_plain_python_error(bad: dict[str, Any]) -> None:
    """The provider maps these to `malformed_chunk` (a fallback), never to a crash."""
    acc = Rec().acc()
    with pytest.raises((TypeError, AttributeError, KeyError)):
        acc.feed(bad)


# -- Responses events ------------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "sequence_number": 0, **fields}


def test_responses_text_tool_call_reasoning_and_usage() -> None:
    rec = Rec()
    acc = ResponsesAccumulator(rec.text.append, rec.reasoning.append, rec.on_first)
    result = feed(
        acc,
        event("response.created", response={"id": "r", "model": "m1", "status": "in_progress", "output": []}),
        event("response.reasoning_summary_text.delta", item_id="rs", output_index=0, summary_index=0, delta="hmm"),
        event("response.output_text.delta", item_id="msg", output_index=1, content_index=0, delta="Hi "),
        event("response.output_item.added", output_index=2,
              item={"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "t", "arguments": ""}),
        event("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta='{"a"'),
        event("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta=": 1}"),
        event("response.output_text.delta", item_id="msg2", output_index=3, content_index=0, delta="later"),
        event("response.completed", response={"id": "r", "model": "m1", "status": "completed", "output": [],
                                              "usage": {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10,
                                                        "output_tokens_details": {"reasoning_tokens": 2}}}),
    )
    assert rec.text == ["Hi "]
    assert rec.reasoning == ["hmm"]
    assert rec.first == 1
    assert result.content == "Hi later"
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_1", "t", '{"a": 1}')]
    assert result.finish_reason == "tool_calls"
    assert result.usage == Usage(4, 6, 2, 10)
    assert result.model == "m1"


def test_responses_incomplete_is_a_length_finish() -> None:
    acc = ResponsesAccumulator()
    result = feed(
        acc,
        event("response.output_text.delta", item_id="m", output_index=0, content_index=0, delta="cut"),
        event("response.incomplete", response={"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}),
    )
    assert result.complete and result.finish_reason == "length" and result.content == "cut"


@pytest.mark.parametrize(
    "terminal",
    [
        event("response.failed", response={"status": "failed", "error": {"code": "server_error", "message": "boom"}}),
        event("error", code="server_error", message="boom", param=None),
    ],
)
def test_responses_failed_and_error_events_break_the_stream(terminal: Any) -> None:
    acc = ResponsesAccumulator()
    acc.feed(event("response.output_text.delta", item_id="m", output_index=0, content_index=0, delta="x"))
    with pytest.raises(StreamBroken) as info:
        acc.feed(terminal)
    assert info.value.cause == "in_band_error"
    assert "boom" in str(info.value)


def test_responses_stream_without_terminal_event_is_not_complete() -> None:
    result = feed(ResponsesAccumulator(), event("response.output_text.delta", item_id="m", output_index=0,
                                                content_index=0, delta="x"))
    assert not result.complete


# -- non-streaming shapes -----------------------------------------------------------


def test_chat_completion_with_error_body_is_a_bad_response() -> None:
    with pytest.raises(ProviderBadResponse, match="context size"):
        response_from_chat_completion({"error": {"message": "exceeds the available context size"}})


def test_chat_completion_to_model_response() -> None:
    result = response_from_chat_completion(
        {
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "hi", "reasoning_content": "r",
                "tool_calls": [{"id": 5, "type": "function", "function": {"name": "t", "arguments": {"a": 1}}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    )
    assert (result.content, result.reasoning, result.finish_reason) == ("hi", "r", "tool_calls")
    assert [(c.id, c.arguments) for c in result.tool_calls] == [("5", '{"a": 1}')]


def test_failed_response_object_is_a_bad_response() -> None:
    with pytest.raises(ProviderBadResponse, match="overloaded"):
        response_from_responses({"status": "failed", "error": {"code": "server_error", "message": "overloaded"}})


# -- reconciliation with closing objects (agent/stream.py "Reconciliation") -----------------


def responses_rec() -> tuple[Rec, ResponsesAccumulator]:
    rec = Rec()
    return rec, ResponsesAccumulator(rec.text.append, rec.reasoning.append, rec.on_first)


def text_delta(text: str, item: str | None = "msg", index: int = 0) -> dict[str, Any]:
    fields: dict[str, Any] = {"output_index": 0, "content_index": index, "delta": text}
    if item is not None:
        fields["item_id"] = item
    return event("response.output_text.delta", **fields)


def message_item(text: str, item: str = "msg") -> dict[str, Any]:
    return {"id": item, "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def completed(*output: dict[str, Any]) -> dict[str, Any]:
    return event("response.completed", response={"status": "completed", "output": list(output)})


def test_responses_text_in_every_closing_event_counts_once() -> None:
    rec, acc = responses_rec()
    result = feed(
        acc,
        text_delta("Hel"),
        text_delta("lo"),
        event("response.output_text.done", item_id="msg", output_index=0, content_index=0, text="Hello"),
        event("response.content_part.done", item_id="msg", output_index=0, content_index=0,
              part={"type": "output_text", "text": "Hello"}),
        event("response.output_item.done", output_index=0, item=message_item("Hello")),
        completed(message_item("Hello")),
    )
    assert result.content == "Hello"
    assert rec.text == ["Hel", "lo"]


@pytest.mark.parametrize(
    "closing",
    [
        event("response.output_text.done", item_id="msg", output_index=0, content_index=0, text="Hello world"),
        event("response.content_part.done", item_id="msg", output_index=0, content_index=0,
              part={"type": "output_text", "text": "Hello world"}),
        event("response.output_item.done", output_index=0, item=message_item("Hello world")),
        completed(message_item("Hello world")),
    ],
    ids=["output_text.done", "content_part.done", "output_item.done", "completed"],
)
def test_responses_missing_tail_comes_from_any_closing_event(closing: dict[str, Any]) -> None:
    rec, acc = responses_rec()
    result = feed(acc, text_delta("Hello wor"), closing, completed(message_item("Hello world")))
    assert result.content == result.visible_text == "Hello world"
    assert rec.text == ["Hello wor", "ld"]
    assert rec.first == 1


def test_responses_closing_only_text_is_emitted_and_fires_first_delta() -> None:
    rec, acc = responses_rec()
    result = feed(acc, event("response.output_text.done", item_id="msg", output_index=0, content_index=0, text="Hi"),
                  completed(message_item("Hi")))
    assert (result.content, rec.text, rec.first) == ("Hi", ["Hi"], 1)


def test_responses_contradicting_closing_text_keeps_the_deltas(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="agent.stream")
    rec, acc = responses_rec()
    result = feed(acc, text_delta("Hello"), completed(message_item("Goodbye")))
    assert result.content == "Hello" and rec.text == ["Hello"]
    assert [r.levelname for r in caplog.records if r.name == "agent.stream"] == ["DEBUG"]


def test_responses_parts_are_reconciled_each_on_their_own() -> None:
    """Two messages around a call, each short of its tail; the second is found after the
    call, so it is kept but not shown."""
    rec, acc = responses_rec()
    call = {"id": "fc", "type": "function_call", "call_id": "call_1", "name": "t", "arguments": "{}"}
    result = feed(
        acc,
        text_delta("Let me ", "m1"),
        event("response.output_item.added", output_index=1, item=dict(call, arguments="")),
        text_delta("after", "m2"),
        completed(message_item("Let me check. ", "m1"), call, message_item("after all", "m2")),
    )
    assert result.content == "Let me check. after all"
    assert rec.text == ["Let me "]  # "check. " and " all" were found after the call
    assert [(c.id, c.arguments) for c in result.tool_calls] == [("call_1", "{}")]


def test_responses_closing_only_part_keeps_its_place_in_the_output_order() -> None:
    """The first message only in response.completed, the second streamed: the content reads
    in output order, as the non-streaming path reads it."""
    rec, acc = responses_rec()
    output = (message_item("First. ", "m1"), message_item("Second.", "m2"))
    result = feed(acc, text_delta("Second.", "m2"), completed(*output))
    assert result.content == response_from_responses({"status": "completed", "output": list(output)}).content
    assert result.content == "First. Second."
    assert rec.text == ["Second."]  # found before text already shown: only the final text carries it


def test_responses_parts_without_added_events_are_told_apart_by_their_done_events() -> None:
    """A terse provider: no output_item.added / content_part.added, only deltas, each
    part's output_text.done, and response.completed."""
    rec, acc = responses_rec()
    result = feed(
        acc,
        text_delta("One, ", "m1"),
        event("response.output_text.done", item_id="m1", output_index=0, content_index=0, text="One, "),
        text_delta("tw", "m2"),
        completed(message_item("One, ", "m1"), message_item("two.", "m2")),
    )
    assert result.content == "One, two."
    assert rec.text == ["One, ", "tw", "o."]


def test_responses_deltas_without_item_id_are_claimed_by_the_first_closing_part() -> None:
    rec, acc = responses_rec()
    result = feed(
        acc,
        text_delta("Hello wor", item=None),
        event("response.output_text.done", item_id="msg", output_index=0, content_index=0, text="Hello world"),
        completed(message_item("Hello world")),
    )
    assert result.content == "Hello world"
    assert rec.text == ["Hello wor", "ld"]


def test_responses_refusal_only_in_closing_events() -> None:
    rec, acc = responses_rec()
    refusal = {"id": "msg", "type": "message", "content": [{"type": "refusal", "refusal": "I can't help."}]}
    result = feed(acc, event("response.refusal.done", item_id="msg", output_index=0, content_index=0,
                             refusal="I can't help."), completed(refusal))
    assert result.content == "I can't help." and rec.text == ["I can't help."]


def test_responses_function_call_only_in_completed_is_added() -> None:
    rec, acc = responses_rec()
    call = {"id": "fc", "type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": "{}"}
    result = feed(acc, completed(call))
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_1", "get_time", "{}")]
    assert result.finish_reason == "tool_calls"
    assert rec.first == 1 and rec.text == []


@pytest.mark.parametrize("completed_id", ["fc", None])
def test_responses_streamed_call_also_in_completed_counts_once_with_full_arguments(completed_id: str | None) -> None:
    acc = ResponsesAccumulator()
    call = {"id": completed_id, "type": "function_call", "call_id": "call_1", "name": "t", "arguments": '{"a": 12}'}
    result = feed(
        acc,
        event("response.output_item.added", output_index=0, item=dict(call, id="fc", arguments="")),
        event("response.function_call_arguments.delta", item_id="fc", output_index=0, delta='{"a": 1'),
        completed(call),
    )
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_1", "t", '{"a": 12}')]


def test_responses_streamed_arguments_win_over_contradicting_completed_ones() -> None:
    acc = ResponsesAccumulator()
    call = {"id": "fc", "type": "function_call", "call_id": "call_1", "name": "t", "arguments": '{"b": 2}'}
    result = feed(
        acc,
        event("response.output_item.added", output_index=0, item=dict(call, arguments="")),
        event("response.function_call_arguments.delta", item_id="fc", output_index=0, delta='{"a": 1}'),
        completed(call),
    )
    assert [c.arguments for c in result.tool_calls] == ['{"a": 1}']


def test_responses_call_closed_by_its_done_event_is_not_touched_by_completed() -> None:
    acc = ResponsesAccumulator()
    call = {"id": "fc", "type": "function_call", "call_id": "call_1", "name": "t", "arguments": '{"a": 1}'}
    result = feed(
        acc,
        event("response.output_item.done", output_index=0, item=call),
        completed(dict(call, arguments='{"a": 1, "b": 2}')),
    )
    assert [c.arguments for c in result.tool_calls] == ['{"a": 1}']


def test_responses_reasoning_tail_and_closing_only_reasoning() -> None:
    rec, acc = responses_rec()
    reasoning = {"id": "rs", "type": "reasoning", "summary": [{"type": "summary_text", "text": "think hard"}],
                 "content": [{"type": "reasoning_text", "text": "raw"}]}
    result = feed(
        acc,
        event("response.reasoning_summary_text.delta", item_id="rs", output_index=0, summary_index=0, delta="think"),
        event("response.reasoning_summary_text.done", item_id="rs", output_index=0, summary_index=0, text="think hard"),
        event("response.reasoning_summary_part.done", item_id="rs", output_index=0, summary_index=0,
              part={"type": "summary_text", "text": "think hard"}),
        completed(reasoning),
    )
    assert result.reasoning == "think hardraw"
    assert rec.reasoning == ["think", " hard", "raw"]


def test_result_is_pure_and_repeatable() -> None:
    """The turn reads `result()` of a stream cut short (usage estimates): no events, no change."""
    rec, acc = responses_rec()
    acc.feed(text_delta("Hel"))
    first = acc.result()
    second = acc.result()
    assert first.content == second.content == "Hel" and rec.text == ["Hel"]


def test_chat_message_in_last_chunk_adds_only_the_missing_tail() -> None:
    rec = Rec()
    message = {"role": "assistant", "content": "Hello world", "reasoning_content": "hmm ok"}
    result = feed(
        rec.acc(),
        chunk({"reasoning_content": "hmm"}),
        chunk({"content": "Hello wor"}),
        {"id": "c1", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]},
    )
    assert (result.content, result.reasoning) == ("Hello world", "hmm ok")
    assert rec.text == ["Hello wor", "ld"] and rec.reasoning == ["hmm", " ok"]


def test_chat_message_only_chunk_reads_like_a_completion() -> None:
    rec = Rec()
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "t", "arguments": {"x": 1}}, "extra_content": {"g": 1}}]}
    result = feed(rec.acc(), {"id": "c1", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
    plain = response_from_chat_completion({"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
    assert [(c.id, c.name, c.arguments, c.extra) for c in result.tool_calls] == [
        (c.id, c.name, c.arguments, c.extra) for c in plain.tool_calls
    ]
    assert result.content == plain.content == "" and rec.text == [] and rec.first == 1


def test_chat_message_tool_calls_match_streamed_ones_by_id_then_name() -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_new", "type": "function", "function": {"name": "b", "arguments": "{}"}},
        {"id": "call_a", "type": "function", "function": {"name": "a", "arguments": '{"q": "xy"}'}},
        {"id": "second", "type": "function", "function": {"name": "c", "arguments": "{}"}},
    ]}
    result = feed(
        Rec().acc(),
        chunk(tc(index=0, id="call_a", function={"name": "a", "arguments": '{"q": "x'})),
        chunk(tc(index=1, id="first", function={"name": "c", "arguments": "{}"})),  # Poolside: id changes later
        {"id": "c1", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]},
    )
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_a", "a", '{"q": "xy"}'),  # by id, completed from the message
        ("first", "c", "{}"),  # by name (no id matched): the first id is kept
        ("call_new", "b", "{}"),  # only in the message: added
    ]


def test_chat_message_contradicting_the_deltas_keeps_them() -> None:
    rec = Rec()
    result = feed(rec.acc(), chunk({"content": "Hello"}),
                  {"id": "c1", "choices": [{"index": 0, "message": {"content": "Bye"}, "finish_reason": "stop"}]})
    assert result.content == "Hello" and rec.text == ["Hello"]


def test_chat_whole_answer_in_one_delta_thinks_before_it_speaks() -> None:
    rec = Rec()
    order: list[str] = []
    acc = ChatAccumulator(lambda t: order.append("text"), lambda r: order.append("reasoning"), rec.on_first)
    result = feed(acc, chunk({"role": "assistant", "content": "42", "reasoning_content": "hmm",
                              "tool_calls": [{"index": 0, "id": "c", "function": {"name": "t", "arguments": "{}"}}]},
                             "tool_calls"))
    assert order == ["reasoning", "text"]
    assert (result.content, result.reasoning, [c.arguments for c in result.tool_calls]) == ("42", "hmm", ["{}"])
