"""When things go wrong, end to end on Telegram: provider errors, error lines in groups, shutdown.

A chat never shows a stack trace or a raw exception; error lines in groups are
rate-limited; a message that arrives while parley shuts down is answered, not dropped.
"""

from __future__ import annotations

import asyncio

from bots.gateway import QUEUED_TEXT, RESTARTING_TEXT
from bots.history import FAILED_NOTE
from bots.inbound import Inbound
from bots.live_reply import STOPPED_MARKER
from bots.outbox import ChatRef
from tests.fakes.llm import Reply
from tests.support.conversations import contents, key, last_request_messages, start

FAILING = "200_error_json+nonstream_500"  # an empty stream, then the fallback request fails too
BANNED = ("Traceback", "Error:", "Exception", "500", "InternalServerError", "sk-", "File \"")


async def test_provider_failure_is_one_friendly_line_and_the_question_stays_in_history(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    chat = s.owner_chat()
    fake_llm.script(Reply.text("never shown", fault=FAILING))
    line = await s.turn(chat, s.owner, "what is 2+2?")
    assert line.startswith("⚠️") and "try again" in line.lower()
    for banned in BANNED:
        assert banned not in line
    await s.turn(chat, s.owner, "hello?")
    assert contents(last_request_messages(fake_llm))[1:] == [
        ("user", "what is 2+2?"),
        ("assistant", FAILED_NOTE),
        ("user", "hello?"),
    ], "the model learns the earlier question went unanswered"


async def test_error_lines_in_groups_are_rate_limited(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    s = await start(parley, fast_telegram, fake_llm, access={"allowed_chats": [key(group)]}, chat={"error_cooldown": 600})
    fake_llm.script(*(Reply.text("never shown", fault=FAILING) for _ in range(3)))
    for i in range(3):
        s.say(group, s.owner, f"@parley_bot question {i}")
        await fake_llm.wait_for(lambda i=i: sum(not r.stream for r in fake_llm.requests) == i + 1, timeout=10)
        await s.settle(group)
    assert len(s.bot_texts(group)) == 1
    assert s.bot_texts(group)[0].startswith("⚠️")
    # In a private chat every failure is explained.
    chat = s.owner_chat()
    fake_llm.script(*(Reply.text("never shown", fault=FAILING) for _ in range(2)))
    for i in range(2):
        await s.turn(chat, s.owner, f"question {i}")
    assert [t[:2] for t in s.bot_texts(chat)] == ["⚠️", "⚠️"]


async def test_shutdown_stops_long_turns_visibly_and_keeps_queued_messages_for_the_next_start(
    fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm, shutdown_timeout=0.3)
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("A very long answer that will not finish.", chunk=7, hold=gate, hold_at=1))
    s.say(chat, s.owner, "long one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["A very"], timeout=10)
    s.say(chat, s.owner, "and another")
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 2, timeout=10)  # queued, acknowledged
    await s.p.stop()
    assert s.bot_texts(chat) == [f"A very\n\n{STOPPED_MARKER}", QUEUED_TEXT], "nobody is told to resend"
    assert fake_llm.requests[0].disconnected
    gate.set()
    # The queued message waited in the inbox: the next process answers it before anything new,
    # and remembers the cut-off turn as interrupted.
    s2 = await start(parley, fast_telegram, fake_llm)
    await fast_telegram.wait_for(lambda: len(s.bot_msgs(chat)) == 3, timeout=10)
    answer = s.bot_msgs(chat)[2]
    assert answer.reply_to == [m for m in fast_telegram.messages(chat.id) if m.text == "and another"][0].message_id
    assert contents(last_request_messages(fake_llm))[-1] == ("user", "and another")
    assert ("assistant", "A very\n\n[interrupted by the user]") in contents(last_request_messages(fake_llm))
    await s2.turn(chat, s2.owner, "back?")
    assert len(fake_llm.requests) == 3


async def test_a_message_arriving_during_shutdown_is_answered_not_dropped(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, shutdown_timeout=10)
    chat = s.owner_chat()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Finishing up nicely.", chunk=10, hold=gate, hold_at=1))
    s.say(chat, s.owner, "one")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["Finishing"], timeout=10)
    stopping = asyncio.create_task(s.p.stop())
    await fast_telegram.wait_for(lambda: not s.gateway.accepting, timeout=10)
    # A message the connector hands over while parley stops (Discord keeps delivering).
    message = fast_telegram.user_says(chat, s.owner, "late message")
    late = Inbound(
        chat=ChatRef("telegram", str(chat.id), is_private=True),
        user_id=str(s.owner.id),
        text="late message",
        message_id=str(message["message_id"]),
        update_id=str(fast_telegram.pending_updates[-1]["update_id"]),  # the next start polls it again
    )
    await s.gateway.handle(late)  # stored: the platform may consider it delivered
    gate.set()
    await stopping
    assert s.bot_texts(chat) == ["Finishing up nicely.", RESTARTING_TEXT]
    assert len(fake_llm.requests) == 1
    s2 = await start(parley, fast_telegram, fake_llm)  # ...and the next start answers it
    await fast_telegram.wait_for(lambda: len(s.bot_texts(chat)) == 3, timeout=10)
    assert contents(last_request_messages(fake_llm))[-1] == ("user", "late message")
    await s2.p.stop()
