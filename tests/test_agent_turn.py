"""End-to-end turns: the real openai SDK against the fake provider, in both API modes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from agent import MAX_STEPS_MESSAGE, Agent, NullEvents, ProviderError, ToolRegistry, Usage, UsageMeter, tool
from agent.tokens import prompt_tokens, text_tokens
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents

APIS = ["chat_completions", "responses"]


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    return request.param


def make_agent(fake: FakeLLM, api: str, tools: ToolRegistry | None = None, **kwargs: Any) -> Agent:
    max_steps = kwargs.pop("max_steps", 8)
    return Agent(fake.config(api=api, **kwargs), tools=tools if tools is not None else ToolRegistry(), max_steps=max_steps)


@tool
async def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


@tool
async def get_time() -> str:
    """The time."""
    return "noon"


def weather_tools() -> ToolRegistry:
    return ToolRegistry([get_weather, get_time])


async def test_text_stream_accumulates_full_text_with_usage(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.text("Hello world, streamed.", chunk=4, usage={"prompt_tokens": 11, "completion_tokens": 6}))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "hi", events)
    assert result.text == "Hello world, streamed."
    assert events.deltas == ["Hell", "o wo", "rld,", " str", "eame", "d."]  # in order
    assert events.first_deltas == 1
    assert result.usage == Usage(11, 6, 0, 17)
    assert not result.fell_back and not result.interrupted and result.steps == 1
    assert result.messages == [{"role": "assistant", "content": "Hello world, streamed."}]
    assert result.first_token_latency is not None and result.first_token_latency >= 0
    (request,) = fake_llm.requests
    assert request.stream
    assert request.stream_options == (api == "chat_completions")


async def test_history_system_prompt_and_message_are_sent(fake_llm: FakeLLM) -> None:
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    async with make_agent(fake_llm, "chat_completions") as agent:
        result = await agent.run_turn(history, "now", RecordingEvents(), system_prompt="be brief", model="other-model")
    assert result.text == "You said: now"
    (request,) = fake_llm.requests
    assert request.model == "other-model"
    assert request.messages == [{"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "now"}]


async def test_responses_mode_sends_instructions_and_input_items(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm, "responses") as agent:
        await agent.run_turn([{"role": "assistant", "content": "before"}], "now", RecordingEvents(), system_prompt="sys")
    body = fake_llm.requests[0].body
    assert body["instructions"] == "sys"
    assert body["input"] == [{"role": "assistant", "content": "before"}, {"role": "user", "content": "now"}]


async def test_mixed_text_then_tool_call_keeps_both(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(
        Reply.tool_calls([("get_weather", {"city": "Oslo"})], text_before="Let me check. "),
        Reply.text("It is sunny in Oslo."),
    )
    events = RecordingEvents()
    async with make_agent(fake_llm, api, weather_tools()) as agent:
        result = await agent.run_turn([], "weather?", events)
    assert result.text == "It is sunny in Oslo."
    assert result.steps == 2
    first, tool_msg, final = result.messages
    assert first["content"] == "Let me check. "
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["get_weather"]
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert tool_msg == {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "sunny in Oslo"}
    assert final == {"role": "assistant", "content": "It is sunny in Oslo."}
    assert events.text == "Let me check. It is sunny in Oslo."
    assert events.first_deltas == 2  # once per model call
    assert events.kinds().index("tool_started") < events.kinds().index("tool_finished")
    # the model got the tool result back
    sent = fake_llm.requests[1].messages
    assert any(
        (m.get("role") == "tool" and m.get("content") == "sunny in Oslo")
        or (m.get("type") == "function_call_output" and m.get("output") == "sunny in Oslo")
        for m in sent
    )


async def test_tool_only_stream_fires_no_text_delta(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.tool_calls([("get_time", {})]), Reply.text("noon it is"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api, weather_tools()) as agent:
        await agent.run_turn([], "time?", events)
    first_call = events.log[: events.kinds().index("tool_started")]
    assert "text" not in [entry[0] for entry in first_call]
    assert first_call == [("first",)]


async def test_text_after_tool_call_is_suppressed_but_kept(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(
        Reply.tool_calls([("get_time", {})], text_before="Checking. ", text_after="(internal note)"),
        Reply.text("Done."),
    )
    events = RecordingEvents()
    async with make_agent(fake_llm, api, weather_tools()) as agent:
        result = await agent.run_turn([], "time?", events)
    assert "(internal note)" not in events.text
    assert events.text == "Checking. Done."
    assert result.messages[0]["content"] == "Checking. (internal note)"


async def test_reasoning_deltas_fire_and_accumulate_separately(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.text("The answer is 42.", reasoning="Let me think step by step.", chunk=6))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "q", events)
    assert events.reasoning == "Let me think step by step."
    assert events.text == result.text == "The answer is 42."
    assert events.kinds().index("reasoning") < events.kinds().index("text")
    assert events.first_deltas == 1


async def test_full_tool_loop_model_tool_model_answer(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(
        Reply.tool_calls([("get_weather", {"city": "Paris"})]),
        Reply.tool_calls([("get_time", {})]),
        Reply.text("Sunny in Paris at noon."),
    )
    events = RecordingEvents()
    async with make_agent(fake_llm, api, weather_tools()) as agent:
        result = await agent.run_turn([], "plan my day", events)
    assert result.text == "Sunny in Paris at noon."
    assert result.steps == 3
    assert [m["role"] for m in result.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert [r.content for _, r in events.finished] == ["sunny in Paris", "noon"]
    assert len(fake_llm.requests) == 3
    assert not result.fell_back and not result.hit_max_steps


async def test_usage_is_summed_over_model_calls(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Reply.tool_calls([("get_time", {})], usage={"prompt_tokens": 10, "completion_tokens": 2}),
        Reply.text("ok", usage={"prompt_tokens": 20, "completion_tokens": 3}),
    )
    async with make_agent(fake_llm, "chat_completions", weather_tools()) as agent:
        result = await agent.run_turn([], "x", RecordingEvents())
    assert result.usage == Usage(30, 5, 0, 35)


async def test_tools_of_one_response_run_concurrently(fake_llm: FakeLLM, api: str) -> None:
    a_started, b_started = asyncio.Event(), asyncio.Event()

    @tool(timeout=5)
    async def tool_a() -> str:
        a_started.set()
        await b_started.wait()  # deadlocks (and times out) unless b runs at the same time
        return "a done"

    @tool(timeout=5)
    async def tool_b() -> str:
        b_started.set()
        await a_started.wait()
        return "b done"

    fake_llm.script(Reply.tool_calls([("tool_a", {}), ("tool_b", {})]), Reply.text("both done"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api, ToolRegistry([tool_a, tool_b])) as agent:
        result = await agent.run_turn([], "go", events)
    assert [r.content for _, r in sorted(events.finished, key=lambda x: x[0].name)] == ["a done", "b done"]
    assert events.kinds()[:4] == ["first", "tool_started", "tool_started", "tool_finished"]
    # results go back in call order
    assert [m["content"] for m in result.messages if m["role"] == "tool"] == ["a done", "b done"]


async def test_invalid_json_arguments_never_execute(fake_llm: FakeLLM, api: str) -> None:
    calls: list[str] = []

    @tool
    async def delete_everything(target: str) -> str:
        calls.append(target)
        return "deleted"

    fake_llm.script(Reply.tool_calls([("delete_everything", '{"target": "all"')]), Reply.text("sorry"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api, ToolRegistry([delete_everything])) as agent:
        result = await agent.run_turn([], "go", events)
    assert calls == []
    assert events.started == []
    tool_msg = result.messages[1]
    assert tool_msg["role"] == "tool" and "not valid JSON" in tool_msg["content"]
    assert result.text == "sorry"


async def test_unknown_tool_and_missing_arguments_are_error_results(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.tool_calls([("nope", {}), ("get_weather", {})]), Reply.text("ok"))
    async with make_agent(fake_llm, "chat_completions", weather_tools()) as agent:
        result = await agent.run_turn([], "go", RecordingEvents())
    unknown, missing = (m["content"] for m in result.messages if m["role"] == "tool")
    assert "unknown tool 'nope'" in unknown
    assert "missing required argument(s): city" in missing


async def test_tool_exception_and_timeout_become_error_results(fake_llm: FakeLLM, api: str) -> None:
    never = asyncio.Event()

    @tool
    async def broken() -> str:
        raise RuntimeError("disk on fire")

    @tool(timeout=0.05)
    async def slow() -> str:
        await never.wait()
        return "never"

    fake_llm.script(Reply.tool_calls([("broken", {}), ("slow", {})]), Reply.text("recovered"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api, ToolRegistry([broken, slow])) as agent:
        result = await agent.run_turn([], "go", events)
    assert result.text == "recovered"
    contents = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert contents[0] == "Error: RuntimeError: disk on fire"
    assert "timed out" in contents[1]
    assert all(r.is_error for _, r in events.finished)


async def test_max_steps_stops_with_a_clear_message(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(*[Reply.tool_calls([("get_time", {})]) for _ in range(3)])
    events = RecordingEvents()
    async with make_agent(fake_llm, api, weather_tools(), max_steps=2) as agent:
        result = await agent.run_turn([], "loop", events)
    assert result.hit_max_steps
    assert result.steps == 2
    assert result.text == MAX_STEPS_MESSAGE.format(steps=2)
    assert events.deltas[-1] == result.text  # the user sees it
    assert result.messages[-1] == {"role": "assistant", "content": result.text}
    assert [m["role"] for m in result.messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert len(fake_llm.requests) == 2


async def test_without_a_delta_consumer_requests_are_not_streamed(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.tool_calls([("get_time", {})]), Reply.text("plain answer"))
    events = RecordingEvents(wants_deltas=False)
    async with make_agent(fake_llm, api, weather_tools()) as agent:
        result = await agent.run_turn([], "x", events)
        result_none = await agent.run_turn([], "y", None)
    assert result.text == "plain answer"
    assert result_none.text == "You said: y"
    assert not result.fell_back
    assert [r.stream for r in fake_llm.requests] == [False, False, False]
    assert events.deltas == [] and events.first_deltas == 2 and len(events.finished) == 1


async def test_stream_disabled_in_config_never_streams(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm, "chat_completions", stream=False) as agent:
        result = await agent.run_turn([], "x", RecordingEvents())
    assert result.text == "You said: x" and not result.fell_back
    assert not fake_llm.requests[0].stream


async def test_a_raising_consumer_does_not_break_the_turn(fake_llm: FakeLLM) -> None:
    class Broken(NullEvents):
        wants_deltas = True

        def on_text(self, delta: str) -> None:
            raise ValueError("consumer bug")

    async with make_agent(fake_llm, "chat_completions") as agent:
        result = await agent.run_turn([], "x", Broken())
    assert result.text == "You said: x"
    assert not result.fell_back


# -- interrupts and cancellation -----------------------------------------------------


async def test_interrupt_mid_stream_returns_partial_text_and_closes_the_stream(fake_llm: FakeLLM, api: str) -> None:
    hold = asyncio.Event()
    fake_llm.script(Reply.text("Hello world, and more to come", chunk=5, hold=hold, hold_at=2))
    events = RecordingEvents()
    interrupt = asyncio.Event()
    async with make_agent(fake_llm, api) as agent:
        task = asyncio.create_task(agent.run_turn([], "hi", events, interrupt=interrupt))
        await events.wait_for(lambda: events.text == "Hello worl")
        interrupt.set()
        result = await asyncio.wait_for(task, 5)
        # the server sees the client go away while it is still holding the rest
        await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected)
    assert result.interrupted
    assert result.text == "Hello worl"
    assert result.messages == [{"role": "assistant", "content": "Hello worl"}]
    assert len(fake_llm.requests) == 1  # no fallback, no retry
    assert events.text == "Hello worl"
    assert fake_llm.requests[0].chunks_sent < 10
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_interrupt_discards_partial_tool_calls_and_runs_no_tool(fake_llm: FakeLLM, api: str) -> None:
    ran: list[str] = []

    @tool
    async def dangerous(path: str) -> str:
        ran.append(path)
        return "done"

    hold = asyncio.Event()
    fake_llm.script(Reply.tool_calls([("dangerous", {"path": "/tmp/x"})], text_before="On it. ", hold=hold, hold_at=4))
    events = RecordingEvents()
    interrupt = asyncio.Event()
    async with make_agent(fake_llm, api, ToolRegistry([dangerous])) as agent:
        task = asyncio.create_task(agent.run_turn([], "go", events, interrupt=interrupt))
        await fake_llm.wait_for(lambda: fake_llm.requests and fake_llm.requests[0].chunks_sent >= 5)
        await events.wait_for(lambda: events.text == "On it. ")
        interrupt.set()
        result = await asyncio.wait_for(task, 5)
    assert result.interrupted
    assert ran == [] and events.started == []
    assert result.messages == [{"role": "assistant", "content": "On it. "}]
    assert len(fake_llm.requests) == 1


async def test_interrupt_cancels_running_tools(fake_llm: FakeLLM, api: str) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @tool
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    fake_llm.script(Reply.tool_calls([("long_job", {})], text_before="Working. "))
    interrupt = asyncio.Event()
    async with make_agent(fake_llm, api, ToolRegistry([long_job])) as agent:
        task = asyncio.create_task(agent.run_turn([], "go", RecordingEvents(), interrupt=interrupt))
        await asyncio.wait_for(started.wait(), 5)
        interrupt.set()
        result = await asyncio.wait_for(task, 5)
    assert cancelled.is_set()
    assert result.interrupted and result.text == "Working. "
    assert [m["role"] for m in result.messages] == ["assistant", "tool"]
    assert "interrupted" in result.messages[1]["content"]
    assert len(fake_llm.requests) == 1  # nothing runs afterwards


async def test_interrupt_set_before_the_turn_starts(fake_llm: FakeLLM) -> None:
    interrupt = asyncio.Event()
    interrupt.set()
    async with make_agent(fake_llm, "chat_completions") as agent:
        result = await agent.run_turn([], "go", RecordingEvents(), interrupt=interrupt)
    assert result.interrupted and result.text == "" and result.messages == []


async def test_cancelling_the_task_closes_the_stream_and_propagates(fake_llm: FakeLLM, api: str) -> None:
    hold = asyncio.Event()
    fake_llm.script(Reply.text("Hello world", chunk=5, hold=hold, hold_at=1))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        task = asyncio.create_task(agent.run_turn([], "hi", events, interrupt=asyncio.Event()))
        await events.wait_for(lambda: events.text == "Hello")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await fake_llm.wait_for(lambda: fake_llm.requests[0].disconnected)
    assert len(fake_llm.requests) == 1


async def test_agent_is_reusable_after_an_interrupt(fake_llm: FakeLLM) -> None:
    hold = asyncio.Event()
    fake_llm.script(Reply.text("first reply here", hold=hold, hold_at=1), Reply.text("second"))
    events = RecordingEvents()
    interrupt = asyncio.Event()
    async with make_agent(fake_llm, "chat_completions") as agent:
        task = asyncio.create_task(agent.run_turn([], "a", events, interrupt=interrupt))
        await events.wait_for(lambda: events.text == "first")
        interrupt.set()
        assert (await task).interrupted
        result = await agent.run_turn([], "b", RecordingEvents(), interrupt=asyncio.Event())
    assert result.text == "second" and not result.interrupted


# ---- usage of model calls that did not finish (issue 13.4) -----------------------------


async def test_a_broken_stream_counts_with_its_fallback(fake_llm: FakeLLM, api: str) -> None:
    """The stream that broke after two pieces was generated (and billed) too: its estimate
    is added to what the fallback request reported, and marked as estimated."""
    fake_llm.script(Reply.text("Ten chars! And the rest.", chunk=5, usage={"prompt_tokens": 20, "completion_tokens": 9},
                               fault="abort_midstream"))
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.fell_back and result.text == "Ten chars! And the rest."
    prompt, cut = prompt_tokens([{"role": "user", "content": "hi"}]), text_tokens("Ten chars!")
    assert result.usage == Usage(20 + prompt, 9 + cut, 0, 29 + prompt + cut, prompt + cut)


async def test_a_failing_turn_leaves_its_completed_steps_on_the_meter(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(
        Reply.tool_calls([("get_time", {})], usage={"prompt_tokens": 30, "completion_tokens": 4}),
        Reply.text("never", fault="200_error_json+nonstream_500"),  # fails before generating anything
    )
    meter = UsageMeter()
    async with make_agent(fake_llm, api, tools=weather_tools()) as agent:
        with pytest.raises(ProviderError):
            await agent.run_turn([], "time?", RecordingEvents(), meter=meter)
    assert meter.usage == Usage(30, 4, 0, 34) and meter.model == "fake-model"


async def test_an_interrupted_step_counts_what_it_streamed(fake_llm: FakeLLM, api: str) -> None:
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Partial answer, then stopped.", chunk=8, hold=gate, hold_at=2))
    events, interrupt = RecordingEvents(), asyncio.Event()
    async with make_agent(fake_llm, api) as agent:
        task = asyncio.create_task(agent.run_turn([], "hi", events, interrupt=interrupt))
        await events.wait_for(lambda: len(events.deltas) == 2)
        interrupt.set()
        result = await task
        gate.set()
    assert result.interrupted and result.text == "Partial answer, "
    prompt, completion = prompt_tokens([{"role": "user", "content": "hi"}]), text_tokens("Partial answer, ")
    assert result.usage == Usage(prompt, completion, 0, prompt + completion, prompt + completion)
