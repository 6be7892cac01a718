"""Floods end to end: the real python-telegram-bot against the fake Telegram, parley from a
real config file with its defaults (`chat.queue_max: 5`, `access.user_rate: 20/minute`).

Issue 12.4: 200 messages in 10 s from one user produced 194 "queue full" notices, and 40
spam messages in a group made another member wait 116 s. Here the first turn is held on a
gate in the fake provider until every message was routed, so what is counted is exact.
"""

from __future__ import annotations

import asyncio

from bots.gateway import QUEUE_FULL_TEXT, QUEUED_TEXT, RATE_LIMITED_TEXT
from tests.fakes.llm import Reply

RATE_NOTICE = RATE_LIMITED_TEXT.format(rate="20 per minute")
NOTICES = (QUEUED_TEXT, QUEUE_FULL_TEXT, RATE_NOTICE)


def bot_msgs(fake, chat_id: int):  # noqa: ANN001, ANN201
    return [m for m in fake.messages(chat_id) if m.from_bot and not m.deleted]


def asked(fake_llm) -> list[str]:  # noqa: ANN001
    return [r.messages[-1]["content"] for r in fake_llm.requests]


def counter(p, name: str) -> float:  # noqa: ANN001
    return p.app.metrics.registry.get_sample_value(name, {"platform": "telegram"}) or 0.0


async def test_a_group_flooder_delays_another_member_by_one_turn_at_most(fast_telegram, fake_llm, parley) -> None:
    group = fast_telegram.supergroup("Team")
    flooder, member = fast_telegram.user(66, "Flooder"), fast_telegram.user(77, "Member")
    p = await parley(telegram=fast_telegram, overrides={"access": {"allowed_chats": [f"telegram:{group.id}"]}})
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Answer to spam 0.", hold=gate))
    fast_telegram.user_says(group, flooder, "@parley_bot spam 0")
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1, timeout=10)
    for i in range(1, 41):
        fast_telegram.user_says(group, flooder, f"@parley_bot spam {i}")
    fast_telegram.user_says(group, member, "@parley_bot what time is the meeting?")
    # The member's acknowledgement means every message before theirs was routed too.
    await fast_telegram.wait_for(
        lambda: [m.text for m in bot_msgs(fast_telegram, group.id)].count(QUEUED_TEXT) == 2, timeout=20
    )
    gate.set()
    await fast_telegram.wait_for(lambda: fake_llm.pending == 0 and len(fake_llm.requests) == 7, timeout=30)
    await p.gateway.settle(f"telegram:{group.id}")

    turns = asked(fake_llm)
    # The member's question is the very next turn after the one running when they asked.
    assert turns[:2] == ["spam 0", "what time is the meeting?"]
    assert turns[2:] == [f"spam {i}" for i in range(1, 6)], "the flooder's own five waiting, in order"
    texts = [m.text for m in bot_msgs(fast_telegram, group.id)]
    assert "You said: what time is the meeting?" in texts
    # The flooder: one acknowledgement, one "queue full", one rate notice -- not 35 notices.
    assert texts.count(QUEUED_TEXT) == 2  # one each
    assert texts.count(QUEUE_FULL_TEXT) == 1 and texts.count(RATE_NOTICE) == 1
    assert len(texts) == 4 + 7, f"bounded: four notices, seven answers; got {len(texts)}"
    assert counter(p, "parley_queue_full_total") == 14  # spam 6..19 (1 running + 5 waiting let in first)
    assert counter(p, "parley_inbound_rate_limited_total") == 21  # spam 20..40: over 20 a minute
    assert await p.store.unfinished_messages() == []


async def test_two_hundred_messages_in_private_get_a_handful_of_replies(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides={"access": {"allow_everyone": True}})
    user = fast_telegram.user(500, "Flooder")
    chat = fast_telegram.private_chat(user)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Answer to 0.", hold=gate))
    for i in range(200):
        fast_telegram.user_says(chat, user, f"message {i}")
    await fast_telegram.wait_for(
        lambda: counter(p, "parley_inbound_rate_limited_total") == 180 and counter(p, "parley_queue_full_total") == 14,
        timeout=30,
    )
    gate.set()
    await fast_telegram.wait_for(lambda: fake_llm.pending == 0 and len(fake_llm.requests) == 6, timeout=30)
    await p.gateway.settle(f"telegram:{chat.id}")
    assert asked(fake_llm) == [f"message {i}" for i in range(6)]
    texts = [m.text for m in bot_msgs(fast_telegram, chat.id)]
    assert sorted(t for t in texts if t in NOTICES) == sorted(NOTICES), "each notice once"
    assert len(texts) == 3 + 6, f"three notices and six answers, not 194 notices; got {len(texts)}"
    assert await p.store.unfinished_messages() == []


async def test_an_owner_is_never_rate_limited(fast_telegram, fake_llm, parley) -> None:
    from tests.support.stack import OWNER_TG

    p = await parley(telegram=fast_telegram, overrides={"chat": {"queue_max": 40}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    for i in range(30):
        fast_telegram.user_says(chat, owner, f"owner {i}")
    await fast_telegram.wait_for(lambda: len(fake_llm.requests) == 30 and fake_llm.pending == 0, timeout=60)
    await p.gateway.settle(f"telegram:{chat.id}")
    assert counter(p, "parley_inbound_rate_limited_total") == 0
    assert asked(fake_llm) == [f"owner {i}" for i in range(30)]
