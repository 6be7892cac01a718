"""The streamed answer equals the non-streamed answer (issue 16, point 4).

Providers put part or all of an answer only in closing objects: Responses text only in
`output_text.done`, `content_part.done`, a message's `output_item.done` or
`response.completed`'s output; a function call only in `response.completed`; Chat
Completions proxies that send the whole message in one chunk, or under
`choices[0].message` in the last chunk, or the tool calls only in the finish chunk. The
fake provider plays each shape over real SSE (its `fault=` quirk modes); the real
openai SDK sends every request. Each scenario runs twice against the same script --
streaming, and with streaming off (`ProviderConfig(stream=False)`) -- and the two
`TurnResult`s must agree, while the chat (a `RecordingEvents`) saw every piece of
visible text once, in order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import openai
import pytest

from agent import Agent, ToolRegistry, TurnResult, tool
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents

pytestmark = pytest.mark.timeout(60)

TEXT = "Hello world, this answer arrives in closing events."
BEFORE = "Let me check the weather. "
AFTER = "Sunny in Oslo at noon."
THOUGHT = "The user wants the weather; call the tool."
CALLS = [("get_weather", {"city": "Oslo"}, "call_w1"), ("get_time", {}, "call_t1")]

CHAT_MODES = ["whole_message_chunk", "message_only_chunk", "message_in_last_chunk", "tool_calls_in_last_chunk"]
RESPONSES_MODES = [
    "text_in_done",
    "text_in_part_done",
    "text_in_item_done",
    "text_in_completed",
    "text_tail_in_done",
    "call_in_completed",
    "call_tail_in_completed",
    "reasoning_in_done",
    "reasoning_in_completed",
]
API = {"chat": "chat_completions", "responses": "responses"}


@tool
async def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


@tool
async def get_time() -> str:
    """The time."""
    return "noon"


def text_reply(mode: str | None) -> list[Reply]:
    return [Reply.text(TEXT, chunk=7, fault=mode)]


def reasoning_reply(mode: str | None) -> list[Reply]:
    return [Reply.text(TEXT, chunk=7, reasoning=THOUGHT, fault=mode)]


def tools_reply(mode: str | None) -> list[Reply]:
    return [
        Reply.tool_calls(CALLS, text_before=BEFORE, chunk=4, fault=mode),
        Reply.text(AFTER, chunk=5, fault=mode),
    ]


async def run(
    fake: FakeLLM, api: str, replies: list[Reply], *, stream: bool, events: RecordingEvents | None = None
) -> tuple[TurnResult, RecordingEvents]:
    fake.reset()
    fake.script(*replies)
    events = events if events is not None else RecordingEvents()
    agent = Agent(fake.config(api=api, stream=stream), tools=ToolRegistry([get_weather, get_time]))
    async with agent:
        result = await agent.run_turn([], "weather?", events)
    assert [r.stream for r in fake.requests] == [stream] * len(replies)
    assert fake.pending == 0
    return result, events


def finished(events: RecordingEvents) -> list[tuple[str, str]]:
    return sorted((call.name, call.arguments) for call, _ in events.finished)


def assert_same_answer(streamed: TurnResult, plain: TurnResult) -> None:
    assert not streamed.fell_back, streamed.fallback_causes
    assert not plain.fell_back
    assert streamed.text == plain.text
    assert streamed.messages == plain.messages
    assert streamed.usage == plain.usage
    assert streamed.steps == plain.steps


def assert_shown_once_in_order(events: RecordingEvents, before: str, final: str) -> None:
    """What the chat saw: a prefix of the pre-tool text (once) before the tools started,
    then the final answer (once)."""
    cut = events.kinds().index("tool_started")
    shown_before = "".join(entry[1] for entry in events.log[:cut] if entry[0] == "text")
    shown_after = "".join(entry[1] for entry in events.log[cut:] if entry[0] == "text")
    assert before.startswith(shown_before), shown_before
    assert shown_after == final


SCENARIOS: list[tuple[str, str, Callable[[str | None], list[Reply]]]] = [
    *((api, mode, kind) for api, modes in (("chat", CHAT_MODES), ("responses", RESPONSES_MODES)) for mode in modes
      for kind in (text_reply, tools_reply, reasoning_reply)),
]


@pytest.mark.parametrize(
    ("api", "mode", "kind"), SCENARIOS, ids=[f"{a}-{m}-{k.__name__}" for a, m, k in SCENARIOS]
)
async def test_streamed_answer_equals_the_non_streamed_answer(
    fake_llm: FakeLLM, api: str, mode: str, kind: Callable[[str | None], list[Reply]]
) -> None:
    streamed, events = await run(fake_llm, API[api], kind(mode), stream=True)
    plain, plain_events = await run(fake_llm, API[api], kind(mode), stream=False)
    assert_same_answer(streamed, plain)
    assert finished(events) == finished(plain_events)
    assert events.first_deltas == streamed.steps  # once per model call
    if kind is tools_reply:
        assert finished(events) == [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')]
        assert streamed.text == AFTER and streamed.steps == 2
        assert streamed.messages[0]["content"] == BEFORE
        assert [c["id"] for c in streamed.messages[0]["tool_calls"]] == ["call_w1", "call_t1"]
        assert_shown_once_in_order(events, BEFORE, AFTER)
    else:
        assert streamed.text == events.text == TEXT
        assert streamed.steps == 1 and events.started == []
    if kind is reasoning_reply:
        assert events.reasoning == THOUGHT
        if mode != "reasoning_in_completed":  # there it is found after the text, at the end
            assert events.kinds().index("reasoning") < events.kinds().index("text")
    else:
        assert events.reasoning == ""


# --------------------------------------------------------------------------- Responses: text only in closing events


@pytest.mark.parametrize("mode", ["text_in_done", "text_in_part_done", "text_in_item_done", "text_in_completed"])
async def test_closing_only_text_reaches_the_chat_as_one_delta(fake_llm: FakeLLM, mode: str) -> None:
    result, events = await run(fake_llm, "responses", text_reply(mode), stream=True)
    assert result.text == TEXT
    assert events.log == [("first",), ("text", TEXT)]
    assert fake_llm.requests[0].faults == [mode]


async def test_deltas_and_every_closing_event_give_the_text_once(fake_llm: FakeLLM) -> None:
    """A well-formed Responses stream repeats each text in output_text.done,
    content_part.done, output_item.done and response.completed: shown and kept once."""
    result, events = await run(fake_llm, "responses", reasoning_reply(None), stream=True)
    assert result.text == TEXT
    assert events.deltas == [TEXT[i : i + 7] for i in range(0, len(TEXT), 7)]
    assert events.reasoning_deltas == [THOUGHT[i : i + 7] for i in range(0, len(THOUGHT), 7)]


async def test_deltas_short_of_the_tail_get_it_from_the_done_event(fake_llm: FakeLLM) -> None:
    """Deltas "Hello wor", done "Hello world": the chat gets "ld" when the done event arrives."""
    result, events = await run(fake_llm, "responses", [Reply.text("Hello world", chunk=9, fault="text_tail_in_done")],
                               stream=True)
    assert result.text == "Hello world"
    assert events.deltas == ["Hello wor", "ld"]
    assert events.log == [("first",), ("text", "Hello wor"), ("text", "ld")]


async def test_closing_text_that_contradicts_the_deltas_loses_to_them(
    fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.stream")
    result, events = await run(fake_llm, "responses", text_reply("text_done_differs"), stream=True)
    assert result.text == events.text == TEXT
    assert not result.fell_back
    assert any("differs from the streamed text" in r.getMessage() for r in caplog.records if r.name == "agent.stream")


async def test_text_found_after_a_tool_call_is_kept_but_not_shown(fake_llm: FakeLLM) -> None:
    """text_in_completed with a streamed call: the pre-tool text is found only in
    response.completed, after the call -- kept in the history, not sent to the chat."""
    replies = [
        Reply.tool_calls(CALLS[:1], text_before=BEFORE, fault="text_in_completed"),
        Reply.text(AFTER, chunk=5),
    ]
    result, events = await run(fake_llm, "responses", replies, stream=True)
    assert result.messages[0]["content"] == BEFORE
    assert events.text == AFTER
    assert finished(events) == [("get_weather", '{"city": "Oslo"}')]


# --------------------------------------------------------------------------- Responses: function calls only in response.completed


async def test_a_call_only_in_response_completed_runs_and_the_loop_continues(fake_llm: FakeLLM) -> None:
    replies = [Reply.tool_calls(CALLS[:1], fault="call_in_completed"), Reply.text(AFTER)]
    result, events = await run(fake_llm, "responses", replies, stream=True)
    assert finished(events) == [("get_weather", '{"city": "Oslo"}')]
    assert result.steps == 2 and result.text == AFTER
    assert result.messages[1] == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny in Oslo"}
    second = fake_llm.requests[1].messages
    assert {"type": "function_call_output", "call_id": "call_w1", "output": "sunny in Oslo"} in second


async def test_a_streamed_call_also_in_response_completed_counts_once_with_full_arguments(fake_llm: FakeLLM) -> None:
    arguments = json.dumps({"city": "Oslo, the capital of Norway"})
    replies = [Reply.tool_calls([("get_weather", arguments, "call_w1")], chunk=4, fault="call_tail_in_completed"),
               Reply.text(AFTER)]
    result, events = await run(fake_llm, "responses", replies, stream=True)
    (call,) = result.messages[0]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": arguments}
    assert finished(events) == [("get_weather", arguments)]


# --------------------------------------------------------------------------- Chat Completions: the message in one chunk


async def test_whole_message_in_one_chunk_is_one_delta(fake_llm: FakeLLM) -> None:
    result, events = await run(fake_llm, "chat_completions", text_reply("whole_message_chunk"), stream=True)
    assert result.text == TEXT
    assert events.log == [("first",), ("text", TEXT)]


async def test_message_under_choices_message_is_read_whole(fake_llm: FakeLLM) -> None:
    result, events = await run(fake_llm, "chat_completions", reasoning_reply("message_only_chunk"), stream=True)
    assert result.text == TEXT
    assert events.log == [("first",), ("reasoning", THOUGHT), ("text", TEXT)]


async def test_message_in_the_last_chunk_adds_only_what_the_deltas_lacked(fake_llm: FakeLLM) -> None:
    result, events = await run(fake_llm, "chat_completions", [Reply.text("Hello world", chunk=9,
                                                                          fault="message_in_last_chunk")], stream=True)
    assert result.text == "Hello world"
    assert events.log == [("first",), ("text", "Hello wor"), ("text", "ld")]


async def test_message_in_the_last_chunk_does_not_double_streamed_tool_calls(fake_llm: FakeLLM) -> None:
    result, events = await run(fake_llm, "chat_completions", tools_reply("message_in_last_chunk"), stream=True)
    assert [c["id"] for c in result.messages[0]["tool_calls"]] == ["call_w1", "call_t1"]
    assert len(events.finished) == 2


async def test_tool_calls_only_in_the_finish_chunk_run(fake_llm: FakeLLM) -> None:
    result, events = await run(fake_llm, "chat_completions", tools_reply("tool_calls_in_last_chunk"), stream=True)
    assert finished(events) == [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')]
    assert events.text == BEFORE + AFTER  # the text streamed before the calls arrived
    assert result.text == AFTER


# --------------------------------------------------------------------------- the fake plays the shapes it claims


async def wire_events(fake: FakeLLM, api: str, reply: Reply) -> list[dict[str, Any]]:
    """The `data:` objects of one streamed answer, read through the openai SDK's raw response."""
    fake.reset()
    fake.script(reply)
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    async with client:
        if api == "responses":
            opener = client.responses.with_streaming_response.create(model="fake-model", input="hi", stream=True)
        else:
            opener = client.chat.completions.with_streaming_response.create(
                model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        async with opener as raw:
            lines = [line async for line in raw.iter_lines()]
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def carriers(events: list[dict[str, Any]], needle: str) -> list[str]:
    """The events whose JSON holds `needle` whole."""
    return [e.get("type", "chunk") for e in events if needle in json.dumps(e)]


@pytest.mark.parametrize(
    ("mode", "carrier"),
    [
        ("text_in_done", "response.output_text.done"),
        ("text_in_part_done", "response.content_part.done"),
        ("text_in_item_done", "response.output_item.done"),
        ("text_in_completed", "response.completed"),
    ],
)
async def test_fake_responses_text_only_in_one_closing_event(fake_llm: FakeLLM, mode: str, carrier: str) -> None:
    events = await wire_events(fake_llm, "responses", Reply.text(TEXT, fault=mode))
    assert carriers(events, TEXT) == [carrier]
    assert not [e for e in events if e["type"] == "response.output_text.delta"]


async def test_fake_responses_text_tail_only_in_closing_events(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "responses", Reply.text("Hello world", chunk=9, fault="text_tail_in_done"))
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hello wor"]
    assert carriers(events, "Hello world") == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"
    ]


@pytest.mark.parametrize(("mode", "carrier"), [("reasoning_in_done", "response.reasoning_summary_text.done"),
                                               ("reasoning_in_completed", "response.completed")])
async def test_fake_responses_reasoning_only_in_one_closing_event(fake_llm: FakeLLM, mode: str, carrier: str) -> None:
    events = await wire_events(fake_llm, "responses", Reply.text(TEXT, reasoning=THOUGHT, fault=mode))
    assert carriers(events, THOUGHT) == [carrier]


async def test_fake_responses_calls_only_in_completed(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "responses", Reply.tool_calls(CALLS, fault="call_in_completed"))
    assert carriers(events, "get_weather") == ["response.completed"]
    assert carriers(events, "call_w1") == ["response.completed"]


async def test_fake_responses_call_arguments_whole_only_in_completed(fake_llm: FakeLLM) -> None:
    arguments = json.dumps({"city": "Oslo"})
    events = await wire_events(fake_llm, "responses",
                               Reply.tool_calls([("get_weather", arguments, "c")], chunk=4, fault="call_tail_in_completed"))
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert streamed and arguments.startswith(streamed) and streamed != arguments
    assert [e["type"] for e in events if "call_id" in json.dumps(e)] == ["response.output_item.added", "response.completed"]


async def test_fake_chat_whole_message_chunk(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "chat", Reply.tool_calls(CALLS, text_before=BEFORE, fault="whole_message_chunk"))
    (chunk,) = events
    (choice,) = chunk["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["delta"]["content"] == BEFORE
    assert [c["function"]["name"] for c in choice["delta"]["tool_calls"]] == ["get_weather", "get_time"]


async def test_fake_chat_message_only_chunk(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "chat", Reply.text(TEXT, fault="message_only_chunk"))
    (chunk,) = events
    (choice,) = chunk["choices"]
    assert "delta" not in choice and choice["message"]["content"] == TEXT and choice["finish_reason"] == "stop"


async def test_fake_chat_message_in_last_chunk(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "chat", Reply.text("Hello world", chunk=9, fault="message_in_last_chunk"))
    deltas = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert deltas == "Hello wor"
    last = events[-1]["choices"][0]
    assert "delta" not in last and last["message"]["content"] == "Hello world" and last["finish_reason"] == "stop"


async def test_fake_chat_tool_calls_in_last_chunk(fake_llm: FakeLLM) -> None:
    events = await wire_events(fake_llm, "chat", Reply.tool_calls(CALLS, text_before=BEFORE, fault="tool_calls_in_last_chunk"))
    with_calls = [e for e in events if e["choices"][0]["delta"].get("tool_calls")]
    assert with_calls == [events[-1]] and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["function"]["arguments"] for c in events[-1]["choices"][0]["delta"]["tool_calls"]] == ['{"city": "Oslo"}', "{}"]
