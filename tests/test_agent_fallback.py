"""Streaming failures never reach the user: fallback, typed errors, cooldown, timeouts."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from agent import (
    Agent,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    Timeouts,
    ToolRegistry,
    tool,
)
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents

APIS = ["chat_completions", "responses"]
TEXT = "The complete answer, in several chunks."


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    return request.param


def make_agent(fake: FakeLLM, api: str = "chat_completions", *, clock: Any = None, tools: Any = None, **cfg: Any) -> Agent:
    kwargs = {"clock": clock} if clock is not None else {}
    return Agent(fake.config(api=api, **cfg), tools=tools if tools is not None else ToolRegistry(), **kwargs)


def recording_lookup() -> tuple[Any, list[str]]:
    """A `lookup` tool that records each query it runs (to count tool runs across fallbacks)."""
    ran: list[str] = []

    @tool
    async def lookup(q: str) -> str:
        ran.append(q)
        return "found"

    return lookup, ran


def stream_flags(fake: FakeLLM) -> list[bool]:
    return [r.stream for r in fake.requests]


async def test_stream_not_supported_falls_back_to_one_plain_request(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.text(TEXT, fault="reject_stream"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "hi", events)
    assert result.text == TEXT
    assert result.fell_back and result.fallback_causes == ["stream_rejected"]
    assert stream_flags(fake_llm) == [True, False]  # exactly one non-streaming request followed
    assert not fake_llm.requests[1].stream_options
    assert events.fallbacks == [TEXT]
    assert events.deltas == [] and events.first_deltas == 1
    assert fake_llm.pending == 0


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("abort_midstream", "connection_dropped"),
        ("connection_lost_error", "in_band_error"),
        ("midstream_error", "in_band_error"),
        ("junk_data", "malformed_chunk"),
        ("200_error_json", "in_band_error"),
        ("last_event_unterminated", "truncated"),
        ("eof_no_done", "truncated"),
        ("llamacpp_error_field", "empty_stream"),
    ],
)
async def test_any_other_stream_error_falls_back(fake_llm: FakeLLM, fault: str, cause: str) -> None:
    fake_llm.script(Reply.text(TEXT, chunk=6, fault=fault), Reply.text("next turn"))
    events = RecordingEvents()
    async with make_agent(fake_llm) as agent:
        result = await agent.run_turn([], "hi", events)
        after = await agent.run_turn([], "again", RecordingEvents())
    assert result.text == TEXT  # the fallback got the same scripted reply, complete
    assert result.fallback_causes == [cause]
    assert events.fallbacks == [TEXT]
    assert TEXT.startswith(events.text)  # whatever streamed was a prefix of the final text
    assert after.text == "next turn" and not after.fell_back  # the entry was consumed exactly once
    assert stream_flags(fake_llm) == [True, False, True]


@pytest.mark.parametrize("fault", ["comment_after_id", "retry_directive", "event_ping_nodata", "data_comment"])
async def test_empty_data_events_are_keepalives_not_failures(fake_llm: FakeLLM, api: str, fault: str) -> None:
    """They broke the SDK's stream (JSONDecodeError) and forced a fallback; now they are skipped."""
    fake_llm.script(Reply.text(TEXT, chunk=6, fault=fault), Reply.text("next turn"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "hi", events)
        after = await agent.run_turn([], "again", RecordingEvents())
    assert result.text == events.text == TEXT and not result.fell_back
    assert after.text == "next turn"
    assert stream_flags(fake_llm) == [True, True]


async def test_a_json_answer_to_a_stream_request_is_used_whole(fake_llm: FakeLLM, api: str) -> None:
    """A relay that ignores `stream`: its complete answer is the answer -- no second request."""
    lookup, ran = recording_lookup()
    fake_llm.script(
        Reply.tool_calls([("lookup", {"q": "x"})], text_before="Looking. ", reasoning="plan", fault="ignore_stream"),
        Reply.text("Here it is.", fault="ignore_stream"),
    )
    events = RecordingEvents()
    async with make_agent(fake_llm, api, tools=ToolRegistry([lookup])) as agent:
        result = await agent.run_turn([], "find x", events)
    assert ran == ["x"]
    assert result.text == "Here it is." and not result.fell_back
    assert events.deltas == ["Looking. ", "Here it is."]  # each step's text as one delta
    assert events.reasoning == "plan" and events.first_deltas == 2
    assert events.fallbacks == []
    assert stream_flags(fake_llm) == [True, True]
    assert result.usage.total_tokens > 0


async def test_a_json_error_answer_to_a_stream_request_falls_back(fake_llm: FakeLLM, api: str, caplog: Any) -> None:
    """llama.cpp's 200 `application/json` error: the provider's error, answered like any in-band
    error (one non-streaming request; a provider that fails there too raises that error)."""
    caplog.set_level(logging.INFO, logger="agent")
    fake_llm.script(Reply.text(TEXT, fault="200_error_json"))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        result = await agent.run_turn([], "hi", events)
        with pytest.raises(ProviderBadRequest, match="maximum context length"):
            await agent.run_turn([], "hi", RecordingEvents(), model="fault:200_error_json+nonstream_400")
    assert result.text == TEXT and result.fallback_causes == ["in_band_error"]
    assert events.fallbacks == [TEXT] and events.deltas == []
    assert any("exceeds the available context size" in r.getMessage() for r in caplog.records)


async def test_stall_past_idle_timeout_falls_back(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.text(TEXT, fault="stall;stall=30"))
    async with make_agent(fake_llm, api, timeouts=Timeouts(connect=5, first_token=5, idle=0.2, total=30)) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT and result.fallback_causes == ["idle_timeout"]
    assert fake_llm.requests[0].disconnected


async def test_first_token_timeout_counts_keepalives_as_nothing(fake_llm: FakeLLM, api: str) -> None:
    fake_llm.script(Reply.text(TEXT, fault="keepalive_only;keepalive=30"))
    async with make_agent(fake_llm, api, timeouts=Timeouts(connect=5, first_token=0.2, idle=5, total=30)) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT and result.fallback_causes == ["first_token_timeout"]


async def test_late_headers_hit_the_first_token_timeout(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text(TEXT, fault="headers_late;late=30"))
    async with make_agent(fake_llm, timeouts=Timeouts(connect=5, first_token=0.2, idle=5, total=30)) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT and result.fallback_causes == ["first_token_timeout"]


async def test_total_timeout_of_a_slow_stream_falls_back(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text(TEXT, chunk=1, fault="slow_drip;drip=0.05"))
    async with make_agent(fake_llm, timeouts=Timeouts(connect=5, first_token=5, idle=5, total=0.3)) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT and result.fallback_causes == ["total_timeout"]


async def test_slow_but_steady_stream_is_not_a_stall(fake_llm: FakeLLM) -> None:
    """The idle clock is per chunk: gaps shorter than it pass, however long the reply."""
    fake_llm.script(Reply.text("slow and steady", chunk=3, delay=0.03))
    async with make_agent(fake_llm, timeouts=Timeouts(connect=5, first_token=5, idle=0.5, total=30)) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == "slow and steady" and not result.fell_back


async def test_non_streaming_request_past_total_timeout_raises(fake_llm: FakeLLM) -> None:
    never = asyncio.Event()
    fake_llm.script(Reply.text(TEXT, hold=never))
    async with make_agent(fake_llm, stream=False, timeouts=Timeouts(connect=5, first_token=5, idle=5, total=0.2)) as agent:
        with pytest.raises(ProviderTimeout):
            await agent.run_turn([], "hi", RecordingEvents())


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        ("abort_midstream+nonstream_500", ProviderUnavailable, None),
        ("abort_midstream+nonstream_400", ProviderBadRequest, "context_length_exceeded"),
        ("junk_data+nonstream_429", ProviderRateLimited, "rate_limit_exceeded"),
        ("abort_midstream+nonstream_200_error", ProviderBadResponse, {"responses": "server_error"}),
    ],
)
async def test_when_the_fallback_fails_its_error_propagates(
    fake_llm: FakeLLM, api: str, fault: str, error: type[Exception], code: Any
) -> None:
    if isinstance(code, dict):
        code = code.get(api)
    fake_llm.script(Reply.text(TEXT, fault=fault))
    events = RecordingEvents()
    async with make_agent(fake_llm, api) as agent:
        with pytest.raises(error) as info:
            await agent.run_turn([], "hi", events)
    assert stream_flags(fake_llm) == [True, False]
    assert info.value.code == code  # type: ignore[attr-defined]
    assert info.value.provider_message  # type: ignore[attr-defined]
    assert events.fallbacks == []


async def test_fallback_error_carries_the_providers_message(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm) as agent:
        with pytest.raises(ProviderUnavailable, match="The server had an error while processing your request"):
            await agent.run_turn([], "hi", RecordingEvents(), model="fault:abort_midstream+nonstream_500")


async def test_fallback_in_a_tool_step_still_runs_the_tool(fake_llm: FakeLLM, api: str) -> None:
    lookup, ran = recording_lookup()
    fake_llm.script(
        Reply.tool_calls([("lookup", {"q": "x"})], text_before="Looking. ", fault="abort_midstream"),
        Reply.text("Here it is."),
    )
    events = RecordingEvents()
    async with make_agent(fake_llm, api, tools=ToolRegistry([lookup])) as agent:
        result = await agent.run_turn([], "find x", events)
    assert ran == ["x"]  # exactly once, from the complete fallback response
    assert result.text == "Here it is."
    assert result.fallback_causes == ["connection_dropped"]
    assert events.fallbacks == ["Looking. "]


async def test_rejected_stream_options_are_remembered(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text("one", fault="reject_stream_options"), Reply.text("two", fault="reject_stream_options"))
    async with make_agent(fake_llm) as agent:
        first = await agent.run_turn([], "a", RecordingEvents())
        second = await agent.run_turn([], "b", RecordingEvents())
        health = agent.health()["models"]["fake-model"]
    assert first.fallback_causes == ["stream_options_rejected"] and first.text == "one"
    assert second.text == "two" and not second.fell_back  # streamed, without stream_options
    assert [(r.stream, r.stream_options) for r in fake_llm.requests] == [(True, True), (False, False), (True, False)]
    assert health["stream_options"] is False and health["streaming"] == "ok"


async def test_wrong_api_key_raises_auth_error_without_fallback(fake_llm: FakeLLM, api: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-wrong-secret-key-987654321"
    agent = Agent(fake_llm.config(api=api, api_key=secret), tools=ToolRegistry())
    async with agent:
        with pytest.raises(ProviderAuthError) as info:
            await agent.run_turn([], "hi", RecordingEvents())
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert secret not in str(info.value)
    assert secret not in caplog.text
    assert len(fake_llm.requests) == 1


async def test_rate_limit_raises_without_fallback(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm) as agent:
        with pytest.raises(ProviderRateLimited) as info:
            await agent.run_turn([], "hi", RecordingEvents(), model="fault:429")
    assert info.value.retry_after == pytest.approx(0.001)
    assert stream_flags(fake_llm) == [True]


async def test_transient_429_is_retried_by_the_sdk(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text("after the retry", fault="429"))
    async with make_agent(fake_llm, max_retries=1) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == "after the retry" and not result.fell_back
    assert [r.status for r in fake_llm.requests] == [429, 200]


async def test_fallback_is_logged_at_info_with_its_cause(fake_llm: FakeLLM, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    async with make_agent(fake_llm) as agent:
        await agent.run_turn([], "hi", RecordingEvents(), model="fault:abort_midstream")
    records = [r for r in caplog.records if r.name == "agent.provider" and r.levelno == logging.INFO]
    assert any("connection_dropped" in r.getMessage() for r in records)
    assert fake_llm.api_key not in caplog.text


# -- cooldown ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_repeated_failures_skip_streaming_for_the_cooldown(fake_llm: FakeLLM, api: str) -> None:
    clock = Clock()
    fake_llm.script(
        Reply.text("one", fault="abort_midstream"),
        Reply.text("two", fault="abort_midstream"),
        Reply.text("three"),
        Reply.text("four"),
        Reply.text("five"),
    )
    events = RecordingEvents()
    cfg = {"stream_failure_threshold": 2, "stream_cooldown": 60.0}
    async with make_agent(fake_llm, api, clock=clock, **cfg) as agent:
        results = [await agent.run_turn([], "x", RecordingEvents()) for _ in range(2)]
        assert agent.health()["models"]["fake-model"]["streaming"] == "cooldown"
        third = await agent.run_turn([], "x", events)  # in cooldown: not streamed at all
        clock.now += 61
        fourth = await agent.run_turn([], "x", RecordingEvents())  # cooldown over: streams again
        health = agent.health()["models"]["fake-model"]
        fifth = await agent.run_turn([], "x", RecordingEvents())
    assert [r.fallback_causes for r in results] == [["connection_dropped"], ["connection_dropped"]]
    assert third.text == "three" and third.fallback_causes == ["cooldown"]
    assert events.fallbacks == ["three"]  # the chat posts the complete reply
    assert fourth.text == "four" and not fourth.fell_back
    assert fifth.text == "five" and not fifth.fell_back
    assert health["streaming"] == "ok" and health["consecutive_failures"] == 0
    assert stream_flags(fake_llm) == [True, False, True, False, False, True, True]


@pytest.mark.parametrize(("transport", "error_class"), [("aiohttp", "ReadError"), ("httpx", "RemoteProtocolError")])
async def test_failure_after_the_cooldown_starts_a_new_cooldown(fake_llm: FakeLLM, transport: str, error_class: str) -> None:
    clock = Clock()
    cfg = {"stream_failure_threshold": 2, "stream_cooldown": 10.0, "transport": transport}
    async with make_agent(fake_llm, clock=clock, **cfg) as agent:
        for _ in range(2):
            await agent.run_turn([], "x", RecordingEvents(), model="fault:abort_midstream")
        clock.now += 11
        probe = await agent.run_turn([], "x", RecordingEvents(), model="fault:abort_midstream")
        after = await agent.run_turn([], "x", RecordingEvents(), model="fault:abort_midstream")
        health = agent.health()["models"]["fault:abort_midstream"]
    assert probe.fallback_causes == ["connection_dropped"]
    assert after.fallback_causes == ["cooldown"]
    assert health["streaming"] == "cooldown" and health["last_error"] == "connection_dropped"
    # the body is read without the SDK's stream wrapper: httpx2's own exception, as each transport names it
    assert health["last_error_class"] == error_class


async def test_a_model_that_rejects_streaming_is_not_asked_again(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm, stream_cooldown=300.0) as agent:
        first = await agent.run_turn([], "x", RecordingEvents(), model="fault:reject_stream")
        second = await agent.run_turn([], "x", RecordingEvents(), model="fault:reject_stream")
        other = await agent.run_turn([], "x", RecordingEvents())  # another model is unaffected
    assert first.fallback_causes == ["stream_rejected"] and second.fallback_causes == ["cooldown"]
    assert not other.fell_back
    assert stream_flags(fake_llm) == [True, False, False, True]


# -- operator helpers ---------------------------------------------------------------------


async def test_probe_lists_models(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm) as agent:
        result = await agent.probe()
        assert (result.listed, result.missing, result.verified) == (("fake-model", "other-model"), (), True)
        assert str(result) == "fake-model among the 2 models GET /models lists"


async def test_probe_names_the_models_the_provider_does_not_list(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm) as agent:
        result = await agent.probe(["gpt-nonexistent", "fake-model", "gpt-gone"])
    assert (result.missing, result.verified) == (("gpt-nonexistent", "gpt-gone"), False)
    assert str(result) == (
        "gpt-nonexistent, gpt-gone are not among the 2 models GET /models lists (fake-model, other-model)"
    )
    assert [r.api for r in fake_llm.requests] == []  # the listing was enough: no token spent


async def test_probe_without_a_models_endpoint_asks_the_model_and_says_the_rest_is_unknown(fake_llm: FakeLLM) -> None:
    fake_llm.listed_models = None
    async with make_agent(fake_llm) as agent:
        result = await agent.probe(["fake-model", "other-model"])
    assert (result.listed, result.models_status, result.verified) == (None, 404, False)
    assert str(result) == (
        "the provider has no /models endpoint (GET /models answered 404), so which models it serves is "
        "unknown; fake-model answered a 1-token request; not checked: other-model"
    )
    assert [(r.api, r.model, r.stream) for r in fake_llm.requests] == [("chat", "fake-model", False)]


async def test_probe_matches_an_untagged_ollama_name_to_its_latest_tag(fake_llm: FakeLLM) -> None:
    fake_llm.listed_models = ["llama3.2:latest", "qwen3:8b"]
    async with make_agent(fake_llm) as agent:
        result = await agent.probe(["llama3.2", "qwen3:8b", "qwen3"])
    assert result.missing == ("qwen3",)  # only `:latest` is implied by a bare name


async def test_probe_with_a_wrong_key_raises_auth_error(fake_llm: FakeLLM) -> None:
    async with Agent(fake_llm.config(api_key="sk-nope-nope-nope")) as agent:
        with pytest.raises(ProviderAuthError):
            await agent.probe()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_an_unreachable_provider_is_unavailable_not_a_timeout(transport: str) -> None:
    """aiohttp's refused connection reaches us disguised as `httpx2.ConnectTimeout`."""
    fake = FakeLLM()
    await fake.start()
    cfg = fake.config(timeouts=Timeouts(connect=1, first_token=1, idle=1, total=3), transport=transport)
    await fake.stop()  # nothing listens on that port any more
    async with Agent(cfg, tools=ToolRegistry()) as agent:
        with pytest.raises(ProviderUnavailable, match="couldn't connect to the provider: connection refused") as info:
            await agent.probe()
        with pytest.raises(ProviderUnavailable):  # streaming: one fallback, whose error propagates
            await agent.run_turn([], "hi", RecordingEvents())
        health = agent.health()["models"]["fake-model"]
    assert not isinstance(info.value, ProviderTimeout)
    assert health["last_error"] == "connect_failed"  # refused: never connected, so nothing was dropped


async def test_health_reports_no_secrets(fake_llm: FakeLLM) -> None:
    async with make_agent(fake_llm) as agent:
        await agent.run_turn([], "x", RecordingEvents(), model="fault:eof_no_done")
        health = agent.health()
    assert health["models"]["fault:eof_no_done"]["last_error"] == "truncated"
    assert health["models"]["fault:eof_no_done"]["fallbacks"] == 1
    assert fake_llm.api_key not in repr(health)
    assert fake_llm.api_key not in repr(agent.cfg)
