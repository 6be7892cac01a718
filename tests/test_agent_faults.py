"""Every fault mode of the fake provider has a test of the turn's outcome.

The tests are parametrized over the fake's own catalogues (`CHAT_FAULTS`,
`RESPONSES_FAULTS`): adding a mode to the fake without an expected outcome here fails
the suite.
"""

from __future__ import annotations

import asyncio
import math
import socket
from typing import Any

import pytest

from agent import (
    Agent,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    Timeouts,
    ToolRegistry,
    tool,
)
from tests.fakes.llm import CHAT_FAULTS, FAULT_REASONING, FAULT_TEXT, RESPONSES_FAULTS, FakeLLM
from tests.fakes.llm_fixtures import RecordingEvents

OK = ("ok",)
TOOLS = ("tools",)
REASONING = ("reasoning",)
INTERRUPT = ("interrupt",)
WHOLE = ("whole",)  # a complete JSON answer to a stream request: one delta, one request


def fallback(cause: str) -> tuple[str, str]:
    return ("fallback", cause)


SHARED_EXPECTED: dict[str, tuple[Any, ...]] = {
    "normal": OK,
    "crlf": OK,
    "byte_by_byte": OK,
    "multi_data_lines": OK,
    "text_plain": OK,
    "comment_keepalive": OK,
    # Empty-data events and re-wrapped comments are keepalives to the lean SSE reader (they
    # broke the SDK's stream with a JSONDecodeError and forced a fallback).
    "comment_after_id": OK,
    "retry_directive": OK,
    "event_ping_nodata": OK,
    "data_comment": OK,
    "junk_data": fallback("malformed_chunk"),
    # A JSON body answering a stream request is read as what it is: the provider's error
    # (fall back) or the complete answer (used whole, no second request).
    "200_error_json": fallback("in_band_error"),
    "ignore_stream": WHOLE,
    "last_event_unterminated": fallback("truncated"),
    "abort_midstream": fallback("connection_dropped"),
    "stall": fallback("idle_timeout"),
    "slow_drip": OK,
    "keepalive_only": OK,
    "headers_late": OK,
    "first_byte_late": OK,  # late headers below first_token: one request, streamed
    "slow_cancel": INTERRUPT,
    "429": ("error", ProviderRateLimited),
    "reject_stream": fallback("stream_rejected"),
    "reasoning": REASONING,
    "tool_std": TOOLS,
    # the stream is healthy, so the non-streaming faults never come into play
    "nonstream_500": OK,
    "nonstream_400": OK,
    "nonstream_429": OK,
    "nonstream_200_error": OK,
}

CHAT_EXPECTED: dict[str, tuple[Any, ...]] = {
    **SHARED_EXPECTED,
    "done_nospace": OK,
    "trailing_after_done": OK,
    "midstream_error": fallback("in_band_error"),
    "midstream_error_event": fallback("in_band_error"),
    "midstream_error_string": fallback("in_band_error"),
    "connection_lost_error": fallback("in_band_error"),
    "openrouter_error_chunk": fallback("in_band_error"),
    "llamacpp_error_field": fallback("empty_stream"),
    "eof_no_done": fallback("truncated"),
    "reject_stream_403": fallback("stream_rejected"),
    "reject_stream_options": fallback("stream_options_rejected"),
    "reject_stream_options_422": fallback("stream_options_rejected"),
    "reject_stream_options_500": fallback("stream_options_rejected"),
    "null_choices": OK,
    "empty_choices_mid": OK,
    "azure_filter": OK,
    "role_every_chunk": OK,
    "usage_every_chunk": OK,  # usage replaced, not summed: checked with every OK outcome
    "empty_finish_reason": OK,
    "reasoning_openrouter": REASONING,
    "reasoning_mirrored": REASONING,
    "think_in_content": ("text", "<think>plan</think>" + FAULT_TEXT),  # not split out (documented gap)
    "tool_all_at_once": TOOLS,
    "stop_with_tools": TOOLS,
    "double_finish": TOOLS,
    "tool_repeat_id_name": TOOLS,
    "tool_no_index": TOOLS,
    "tool_ollama_index0": TOOLS,
    "tool_int_id": TOOLS,
    "tool_args_dict": TOOLS,
    "hermes_xml": ("text", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    # the answer in one chunk, or under `message` in the last chunk: reconciled, streamed, complete
    "whole_message_chunk": OK,
    "message_only_chunk": OK,
    "message_in_last_chunk": OK,
    "tool_calls_in_last_chunk": TOOLS,
}

RESPONSES_EXPECTED: dict[str, tuple[Any, ...]] = {
    **SHARED_EXPECTED,
    "failed": fallback("in_band_error"),
    "incomplete": ("partial", FAULT_TEXT[:16]),  # response.incomplete is an answer (finish "length")
    "error_event": fallback("in_band_error"),
    "error_event_nested": fallback("in_band_error"),
    "eof": fallback("truncated"),
    "no_created": OK,
    "done_marker": OK,
    "seq_dup": OK,
    "delta_before_item": OK,
    # the answer only (or partly) in closing events: reconciled with the deltas, shown, no fallback
    "text_in_done": OK,
    "text_in_part_done": OK,
    "text_in_item_done": OK,
    "text_in_completed": OK,
    "text_tail_in_done": OK,
    "text_done_differs": OK,  # the deltas count
    "call_in_completed": TOOLS,
    "call_tail_in_completed": TOOLS,
    "reasoning_in_done": REASONING,
    "reasoning_in_completed": REASONING,
}

# Timings shortened for the suite (seconds); stall uses the default 30 s and must be cut by idle.
MODEL_SUFFIX = {"slow_drip": ";drip=0.01", "keepalive_only": ";keepalive=0.2", "headers_late": ";late=0.2",
                "first_byte_late": ";late=0.2", "slow_cancel": ";interval=0.05"}
TIMEOUTS = Timeouts(connect=5, first_token=5, idle=0.3, total=20)
EXPECTED_COMPLETION_TOKENS = math.ceil(len(FAULT_TEXT) / 8)  # the fake streams FAULT_TEXT in 8-char pieces


def test_every_fault_mode_has_an_expected_outcome() -> None:
    assert set(CHAT_EXPECTED) == set(CHAT_FAULTS)
    assert set(RESPONSES_EXPECTED) == set(RESPONSES_FAULTS)


@tool
async def get_weather(city: str) -> str:
    return f"sunny in {city}"


@tool
async def get_time() -> str:
    return "noon"


async def run_mode(fake: FakeLLM, api: str, mode: str, expected: tuple[Any, ...], transport: str) -> None:
    agent = Agent(fake.config(api=api, timeouts=TIMEOUTS, transport=transport), tools=ToolRegistry([get_weather, get_time]))
    events = RecordingEvents()
    model = f"fault:{mode}{MODEL_SUFFIX.get(mode, '')}"
    kind = expected[0]
    async with agent:
        if kind == "error":
            with pytest.raises(expected[1]):
                await agent.run_turn([], "hi", events, model=model)
            return
        if kind == "interrupt":
            interrupt = asyncio.Event()
            task = asyncio.create_task(agent.run_turn([], "hi", events, model=model, interrupt=interrupt))
            await events.wait_for(lambda: len(events.deltas) >= 2)
            interrupt.set()
            result = await asyncio.wait_for(task, 5)
            assert result.interrupted and not result.fell_back
            assert result.text == "".join(events.deltas)
            await fake.wait_for(lambda: fake.requests[0].disconnected)
            assert len(fake.requests) == 1
            return
        result = await agent.run_turn([], "hi", events, model=model)

    assert not result.interrupted
    if kind == "fallback":
        assert result.fell_back and result.fallback_causes == [expected[1]]
        assert result.text == FAULT_TEXT
        assert events.fallbacks == [FAULT_TEXT]
        assert FAULT_TEXT.startswith(events.text)  # only a prefix of the answer was previewed
        assert [r.stream for r in fake.requests][-1] is False
        return
    assert not result.fell_back, result.fallback_causes
    assert all(r.stream for r in fake.requests)
    if kind == "ok":
        assert result.text == events.text == FAULT_TEXT
        assert result.usage.completion_tokens == EXPECTED_COMPLETION_TOKENS
    elif kind == "whole":
        assert result.text == FAULT_TEXT and events.deltas == [FAULT_TEXT] and events.first_deltas == 1
        assert result.usage.completion_tokens == EXPECTED_COMPLETION_TOKENS
        assert len(fake.requests) == 1
    elif kind == "text":
        assert result.text == events.text == expected[1]
        assert events.started == []
    elif kind == "partial":
        assert result.text == expected[1]
    elif kind == "reasoning":
        assert result.text == events.text == FAULT_TEXT
        assert events.reasoning == FAULT_REASONING
    elif kind == "tools":
        assert [(c.name, c.arguments) for c, _ in sorted(events.finished, key=lambda x: x[0].name)] == [
            ("get_time", "{}"),
            ("get_weather", '{"city": "Paris"}'),
        ]
        assert result.text == "Done: sunny in Paris; noon"
        assert result.steps == 2
        calls = result.messages[0]["tool_calls"]
        assert len(calls) == 2 and len({c["id"] for c in calls}) == 2
    else:  # pragma: no cover - a typo in the tables
        raise AssertionError(f"unknown expectation {expected}")


# Both HTTP transports under the SDK (agent/config.py `transport`): the body reader is the
# same, but each names transport failures its own way.
TRANSPORTS = ["aiohttp", "httpx"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", sorted(CHAT_FAULTS))
async def test_chat_completions_fault_mode(fake_llm: FakeLLM, mode: str, transport: str) -> None:
    await run_mode(fake_llm, "chat_completions", mode, CHAT_EXPECTED[mode], transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", sorted(RESPONSES_FAULTS))
async def test_responses_fault_mode(fake_llm: FakeLLM, mode: str, transport: str) -> None:
    await run_mode(fake_llm, "responses", mode, RESPONSES_EXPECTED[mode], transport)


# --------------------------------------------------------------------------- the errors that propagate, named by their cause


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_connection_is_unavailable_and_named_by_its_root_cause(
    fake_llm: FakeLLM, transport: str, stream: bool
) -> None:
    """The aiohttp transport reports a refused connect as `APITimeoutError("Request timed
    out.")`, httpx as "All connection attempts failed": both are a refused connection."""
    port = closed_port()
    cfg = fake_llm.config(base_url=f"http://127.0.0.1:{port}/v1", transport=transport, stream=stream, max_retries=1,
                          timeouts=TIMEOUTS)
    async with Agent(cfg) as agent:
        with pytest.raises(ProviderUnavailable) as info:
            await agent.run_turn([], "hi", RecordingEvents())
    error = info.value
    assert not isinstance(error, (ProviderTimeout, ProviderServerError))
    assert error.describe().startswith(
        "ProviderUnavailable: couldn't connect to the provider: connection refused "
        f"(ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', {port}))"
    ), error.describe()
    assert "timed out" not in error.describe().lower() and "timed out" not in error.provider_message.lower()
    assert error.log_fields() == {"provider": f"127.0.0.1:{port}", "model": "fake-model", "cause": "ConnectionRefusedError"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_http_500_is_a_server_error_with_its_status_provider_and_model(fake_llm: FakeLLM, transport: str) -> None:
    """The provider answered -- with an error of its own: not "unreachable"."""
    async with Agent(fake_llm.config(transport=transport, max_retries=0, timeouts=TIMEOUTS)) as agent:
        with pytest.raises(ProviderServerError) as info:
            await agent.run_turn([], "hi", RecordingEvents(), model="fault:abort_midstream+nonstream_500")
    error = info.value
    assert error.describe() == (
        "ProviderServerError: provider returned HTTP 500: The server had an error while processing your request."
    )
    host = fake_llm.base_url.split("//")[1].split("/")[0]
    assert error.log_fields() == {"provider": host, "model": "fault:abort_midstream+nonstream_500", "status": 500}
