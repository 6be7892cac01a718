"""Usage of turns that did not finish, end to end on Telegram (issue 13.4).

A reply stopped mid-stream, a turn that fails after a tool step or after streaming part
of its answer, a turn cut by shutdown: the provider billed the prompt and what it
generated, yet these turns were booked as 0 tokens (or not at all), so /usage and
daily budgets undercounted. Now every model call is booked: with the provider's report
when it sent one (some providers report on every chunk), else with an estimate
(characters / 4, `agent.tokens`) that /usage marks as estimated. A call that failed
before generating anything is booked as nothing: providers do not bill it, and a user
should not lose budget to an outage.

Real python-telegram-bot connector, real openai SDK, real config and SQLite store,
against the fake Telegram and the fake provider. No sleeps: the fake holds the stream
open at a known point (`hold_at`) until the test has stopped it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from agent.tokens import prompt_tokens, text_tokens
from bots.live_reply import STOPPED_MARKER
from bots.store import UsageRow
from tests.fakes.llm import FakeLLM, Reply
from tests.support.conversations import Stack, start

USER_ID = 61
USER = f"telegram:{USER_ID}"
FAILING = "200_error_json+nonstream_500"  # the stream answers with an error, the fallback request fails too
CUT_THEN_FAILING = "abort_midstream+nonstream_500"  # two pieces streamed, connection cut, fallback fails


def today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def usage_of(s: Stack) -> list[UsageRow]:
    return await s.store.usage(since=today(), user_key=USER)


def prompt_estimate(llm: FakeLLM, request: int = 0) -> int:
    """What parley estimates for the prompt of a request the fake received."""
    record = llm.requests[request]
    return prompt_tokens(record.messages, record.body.get("tools"))


async def user_chat(s: Stack):  # noqa: ANN201
    await s.store.set_role(USER, "user")
    user = s.user(USER_ID, "Uma")
    return user, s.private(user)


async def stop_mid_stream(s: Stack, reply: Reply, shown: str) -> None:
    """The user asks, sees `shown` streamed, and sends /stop while the provider is still generating."""
    user, chat = await user_chat(s)
    s.llm.script(reply)
    s.say(chat, user, "tell me everything")
    await s.tg.wait_for(lambda: s.bot_texts(chat) == [shown], timeout=10, what="the streamed start")
    assert await s.ask(chat, user, "/stop") == "⏹️ Stopped."
    await s.settle(chat)
    assert s.bot_texts(chat)[0] == f"{shown}\n\n{STOPPED_MARKER}"


async def test_a_reply_stopped_mid_stream_books_an_estimate_that_usage_marks(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    gate = asyncio.Event()
    await stop_mid_stream(
        s, Reply.text("A long answer that the user stops halfway.", chunk=7, hold=gate, hold_at=2), "A long answer"
    )
    gate.set()
    prompt, completion = prompt_estimate(fake_llm), text_tokens("A long answer ")
    (row,) = await usage_of(s)
    assert (row.prompt, row.completion, row.turns) == (prompt, completion, 1)
    assert row.estimated == prompt + completion, "every number of this turn is an estimate"
    user, chat = s.user(USER_ID), s.private(s.user(USER_ID))
    shown = (await s.ask(chat, user, "/usage")).splitlines()
    assert shown[1] == f"• today: ~{prompt + completion:,} tokens in 1 turn (estimated)"
    assert shown[2] == f"    fake-model: ~{prompt:,} in / ~{completion:,} out tokens"


async def test_usage_the_provider_reported_before_the_stop_is_booked_as_reported(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    gate = asyncio.Event()
    # Gemini-style: cumulative usage on every chunk (the role chunk and two pieces: 3 so far).
    reply = Reply.text(
        "A long answer that the user stops halfway.", chunk=7, hold=gate, hold_at=2,
        usage={"prompt_tokens": 50, "completion_tokens": 30}, fault="usage_every_chunk",
    )
    await stop_mid_stream(s, reply, "A long answer")
    gate.set()
    (row,) = await usage_of(s)
    assert (row.prompt, row.completion, row.estimated) == (50, 3, 0)
    user, chat = s.user(USER_ID), s.private(s.user(USER_ID))
    assert (await s.ask(chat, user, "/usage")).splitlines()[1] == "• today: 53 tokens in 1 turn"


async def test_a_turn_failing_after_a_tool_step_books_the_completed_step(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, chat = await user_chat(s)
    fake_llm.script(
        Reply.tool_calls([("current_time", {"timezone": "UTC"})], usage={"prompt_tokens": 40, "completion_tokens": 7}),
        Reply.text("never shown", fault=FAILING),
    )
    line = await s.turn(chat, user, "what time is it?")
    assert line.endswith("⚠️ The model provider had an internal error. Please try again.")
    (row,) = await usage_of(s)
    assert (row.prompt, row.completion, row.estimated, row.turns) == (40, 7, 0, 1)


async def test_a_turn_failing_after_streaming_part_of_its_answer_books_an_estimate(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, chat = await user_chat(s)
    fake_llm.script(Reply.text("Half an answer, then the line drops.", chunk=5, fault=CUT_THEN_FAILING))
    line = await s.turn(chat, user, "explain")
    assert "⚠️" in line
    prompt, completion = prompt_estimate(fake_llm), text_tokens("Half an an")
    (row,) = await usage_of(s)
    assert (row.prompt, row.completion, row.estimated) == (prompt, completion, prompt + completion)


async def test_a_turn_failing_before_the_model_generated_anything_books_nothing(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    user, chat = await user_chat(s)
    fake_llm.script(Reply.text("never shown", fault=FAILING))
    assert (await s.turn(chat, user, "hello?")).startswith("⚠️")
    assert await usage_of(s) == [], "a request the provider failed is not billed"
    assert (await s.ask(chat, user, "/usage")).splitlines()[1] == "• today: nothing yet"


async def test_a_turn_cut_by_shutdown_books_what_it_streamed(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, shutdown_timeout=0.3)
    user, chat = await user_chat(s)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("A very long answer that will not finish.", chunk=7, hold=gate, hold_at=1))
    s.say(chat, user, "long one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["A very"], timeout=10)
    await s.p.stop()
    gate.set()
    assert s.bot_texts(chat) == [f"A very\n\n{STOPPED_MARKER}"]
    prompt, completion = prompt_estimate(fake_llm), text_tokens("A very ")
    rows = s.rows("usage")
    assert [(r[2], r[5], r[6], r[-1]) for r in rows] == [(USER, prompt, completion, prompt + completion)]


async def test_a_stopped_turn_counts_against_the_daily_budget(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    await s.store.set_budget(USER, 20)
    gate = asyncio.Event()
    await stop_mid_stream(
        s, Reply.text("A long answer that the user stops halfway.", chunk=7, hold=gate, hold_at=2), "A long answer"
    )
    gate.set()
    assert await s.store.tokens_used(USER, today()) > 20
    assert await s.store.tokens_held(USER) == 0, "the hold was settled by the booked estimate"
    user, chat = s.user(USER_ID), s.private(s.user(USER_ID))
    requests = len(fake_llm.requests)
    assert await s.ask(chat, user, "again") == "⏳ You've used your daily budget of 20 tokens. It resets at 00:00 UTC."
    await s.barrier()
    assert len(fake_llm.requests) == requests, "the model was not called"
