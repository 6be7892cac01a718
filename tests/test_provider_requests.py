"""A slow provider is asked once: parley's clocks decide, never the SDK's (issue 12, point 8).

A provider that takes its time before the first byte used to be sent the same request
again: a transport read timeout, which the openai SDK answers with a retry, could expire
before parley's own first-token deadline. These tests drive the real SDK (both HTTP
transports, both APIs) against the fake provider, count what reaches it, and check that
every request parley sends -- SDK retries and fallbacks included -- is reported for
`/metrics`. Assertions are on the fake's records and the observer's log, never on timing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent import Agent, ProviderConfig, ProviderTimeout, Timeouts, ToolRegistry
from bots.live_reply import STILL_WORKING_TEXT
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.llm_fixtures import RecordingEvents
from tests.support.stack import OWNER_TG

TEXT = "A considered answer, after a long think."
APIS = ["chat_completions", "responses"]
TRANSPORTS = ["aiohttp", "httpx"]
PATHS = {"chat_completions": "/v1/chat/completions", "responses": "/v1/responses"}


class Requests:
    """A `RequestObserver` that keeps every (kind, attempt) it hears of, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def __call__(self, kind: str, attempt: str) -> None:
        self.log.append((kind, attempt))


def agent_for(fake: FakeLLM, observer: Callable[[str, str], None] | None = None, **cfg: Any) -> Agent:
    config: ProviderConfig = fake.config(**cfg)
    return Agent(config, tools=ToolRegistry(), on_request=observer)


async def all_answered(fake: FakeLLM) -> None:
    """Wait until the fake finished (or saw the client abandon) every request it got."""
    await fake.wait_for(lambda: all(r.t_done is not None for r in fake.requests))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("api", APIS)
async def test_a_late_first_byte_within_first_token_is_one_request(
    fake_llm: FakeLLM, api: str, transport: str, stream: bool
) -> None:
    """Headers after 1 s, first-token clock 2 s, idle clock 0.5 s, SDK retries on: asked once."""
    fake_llm.script(Reply.text(TEXT, fault="first_byte_late;late=1"))
    seen = Requests()
    timeouts = Timeouts(connect=1, first_token=2, idle=0.5, total=5)
    async with agent_for(fake_llm, seen, api=api, transport=transport, stream=stream, timeouts=timeouts, max_retries=2) as agent:
        result = await agent.run_turn([], "think hard", RecordingEvents())
    assert result.text == TEXT and not result.fell_back
    assert [(r.stream, r.sdk_retry) for r in fake_llm.requests] == [(stream, 0)]
    assert seen.log == [("stream" if stream else "request", "first")]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("api", APIS)
async def test_with_the_first_token_clock_off_the_idle_clock_does_not_cut_the_wait_for_headers(
    fake_llm: FakeLLM, api: str, transport: str
) -> None:
    """`idle` measures gaps between chunks; it used to become the SDK's read timeout while
    waiting for the headers too, so a 1 s first byte met a 0.3 s timeout and three requests."""
    fake_llm.script(Reply.text(TEXT, fault="first_byte_late;late=1"))
    timeouts = Timeouts(connect=1, first_token=None, idle=0.3, total=5)
    async with agent_for(fake_llm, api=api, transport=transport, timeouts=timeouts, max_retries=2) as agent:
        result = await agent.run_turn([], "think hard", RecordingEvents())
    assert result.text == TEXT and not result.fell_back
    assert [(r.stream, r.sdk_retry) for r in fake_llm.requests] == [(True, 0)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("api", APIS)
async def test_the_transport_read_timeout_is_later_than_every_parley_clock(
    fake_llm: FakeLLM, api: str, transport: str
) -> None:
    """What the SDK announces to the provider (`x-stainless-read-timeout`) is the timer its
    retry answers; it must never expire first, or a slow provider is asked twice."""
    timeouts = Timeouts(connect=1, first_token=2, idle=2, total=3)
    async with agent_for(fake_llm, api=api, transport=transport, timeouts=timeouts) as agent:
        await agent.run_turn([], "streamed", RecordingEvents())
        await agent.run_turn([], "not streamed", RecordingEvents(wants_deltas=False))
    streamed, plain = fake_llm.requests
    assert streamed.stream and not plain.stream
    assert streamed.read_timeout is not None and streamed.read_timeout > max(2, 2)
    assert plain.read_timeout is not None and plain.read_timeout > 3


@pytest.mark.parametrize("first_token", [0.5, None], ids=["first_token", "no_first_token"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_hung_provider_is_asked_once_per_request_kind_and_never_twice_at_once(
    fake_llm: FakeLLM, transport: str, first_token: float | None
) -> None:
    """No byte ever comes: the stream is cut by parley's clock, its one non-streaming
    fallback by `total`; no SDK retry, and each request ended before the next one left."""
    fake_llm.script(Reply.text(TEXT, fault="first_byte_late;late=3600"))
    seen = Requests()
    max_retries = 2
    timeouts = Timeouts(connect=1, first_token=first_token, idle=0.3, total=1)
    async with agent_for(fake_llm, seen, transport=transport, timeouts=timeouts, max_retries=max_retries) as agent:
        with pytest.raises(ProviderTimeout):
            await agent.run_turn([], "anyone there?", RecordingEvents())
    await all_answered(fake_llm)
    assert len(fake_llm.requests) <= 1 + max_retries
    # On a loaded machine parley's 0.5 s clock may cut the stream before its request has
    # reached the fake at all; what must never happen is a retry or a second request of a
    # kind. The client side (`seen`, below) saw both leave, in this order.
    assert [(r.stream, r.sdk_retry) for r in fake_llm.requests] in ([(True, 0), (False, 0)], [(False, 0)])
    assert fake_llm.max_in_flight == {PATHS["chat_completions"]: 1}
    assert all(r.disconnected for r in fake_llm.requests)  # each one abandoned, and closed
    assert seen.log == [("stream", "first"), ("request", "fallback")]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("api", APIS)
async def test_sdk_retries_are_sequential_and_counted(fake_llm: FakeLLM, api: str, transport: str) -> None:
    """A 429 is the SDK's to retry: the retry leaves after the first answer, and is seen."""
    fake_llm.script(Reply.text(TEXT, fault="429"))
    seen = Requests()
    async with agent_for(fake_llm, seen, api=api, transport=transport, max_retries=2) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT
    assert [(r.status, r.sdk_retry) for r in fake_llm.requests] == [(429, 0), (200, 1)]
    assert fake_llm.max_in_flight == {PATHS[api]: 1}
    assert seen.log == [("stream", "first"), ("stream", "retry")]


async def test_a_fallback_is_counted_as_a_fallback(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.text(TEXT, chunk=6, fault="abort_midstream"))
    seen = Requests()
    async with agent_for(fake_llm, seen) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.fell_back and result.text == TEXT
    assert seen.log == [("stream", "first"), ("request", "fallback")]


async def test_an_observer_that_raises_changes_nothing(fake_llm: FakeLLM) -> None:
    def broken(kind: str, attempt: str) -> None:
        raise RuntimeError("metrics are down")

    fake_llm.script(Reply.text(TEXT))
    async with agent_for(fake_llm, broken) as agent:
        result = await agent.run_turn([], "hi", RecordingEvents())
    assert result.text == TEXT and len(fake_llm.requests) == 1


async def test_metrics_count_every_provider_request_of_a_running_gateway(fast_telegram, fake_llm, parley) -> None:  # noqa: ANN001
    """The real App wires the agent's observer into /metrics: a 429 and its retry are two."""
    p = await parley(telegram=fast_telegram, overrides={"provider": {"max_retries": 2}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text(TEXT, fault="429"))
    fast_telegram.user_says(chat, owner, "hello")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [TEXT], timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    registry = p.app.metrics.registry

    def requests(kind: str, attempt: str) -> float | None:
        return registry.get_sample_value("parley_provider_requests_total", {"kind": kind, "attempt": attempt})

    assert (requests("stream", "first"), requests("stream", "retry")) == (1.0, 1.0)
    assert requests("request", "fallback") is None
    assert b"parley_provider_requests_total" in p.app.metrics.exposition()


async def test_a_slow_first_byte_says_still_working_then_answers_once(fast_telegram, fake_llm, parley) -> None:  # noqa: ANN001
    """Through the real gateway and Telegram client: `chat.still_working_after` reaches the
    live message, the answer replaces the note in the same message, and the provider was
    asked once. (The note is due 0.1 s into the turn; the provider's first byte leaves 2 s
    after it got the request.)"""
    p = await parley(
        telegram=fast_telegram,
        overrides={
            "chat": {"still_working_after": 0.1},
            "provider": {"max_retries": 2, "timeouts": {"connect": 1, "first_token": 5, "idle": 1, "total": 20}},
        },
    )
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text(TEXT, fault="first_byte_late;late=2"))
    fast_telegram.user_says(chat, owner, "hello")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [STILL_WORKING_TEXT], timeout=15)
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [TEXT], timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    (message,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    versions = [text for _, text, _ in message.edits]
    assert versions[0] == STILL_WORKING_TEXT and versions[-1] == TEXT
    assert [(r.stream, r.sdk_retry) for r in fake_llm.requests] == [(True, 0)]
