"""End to end: split pastes become one turn, edits restart or are ignored.

Real python-telegram-bot against the fake Telegram, real discord.py against the fake
Discord, the real openai SDK against the fake provider, the whole App from a
parley.yaml. The window's timing rules are pinned on a virtual clock in
tests/test_coalesce.py; here the window is long (a slow machine must not split what a
test sends together), and nothing waits for it: the short tail of a paste ends it.
"""

from __future__ import annotations

import asyncio

from bots.coalesce import JOINER
from bots.gateway import EDITED_TEXT
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_DC, OWNER_TG

LONG_WINDOW = {"chat": {"coalesce_window": {"telegram": 30, "discord": 30}}}


def paste_part(tag: str, size: int = 4096) -> str:
    """One part of a paste as a Telegram client sends it: up to 4096 characters."""
    return " ".join(f"{tag}{i}" for i in range(size))[:size].rstrip()


def user_texts(fake_llm) -> list[str]:  # noqa: ANN001
    return [r.messages[-1]["content"] for r in fake_llm.requests]


# ---------------------------------------------------------------------------- Telegram


async def test_a_paste_telegram_split_in_three_is_one_model_request_and_one_reply(
    fast_telegram, fake_llm, parley
) -> None:
    p = await parley(telegram=fast_telegram, overrides=LONG_WINDOW)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    parts = [paste_part("a"), paste_part("b"), "so what do you think?"]
    fake_llm.script(Reply.text("One answer to the whole paste."))
    for text in parts:
        fast_telegram.user_says(chat, owner, text)
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["One answer to the whole paste."],
                                 timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    assert user_texts(fake_llm) == [JOINER.join(parts)]
    assert fast_telegram.bot_texts(chat.id) == ["One answer to the whole paste."]
    (reply,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot]
    first_part = next(m for m in fast_telegram.messages(chat.id) if not m.from_bot)
    assert reply.reply_to == first_part.message_id


async def test_an_edit_while_streaming_on_telegram_restarts_the_turn_in_the_same_message(
    fast_telegram, fake_llm, parley
) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    old_answer, new_answer = asyncio.Event(), asyncio.Event()
    new_text = "The capital of Australia is Canberra, not Sydney."
    fake_llm.script(
        Reply.text("The capital of Austria is Vienna, a city on the Danube.", chunk=6, hold=old_answer, hold_at=3),
        Reply.text(new_text, chunk=6, delay=0.01, hold=new_answer),
    )
    asked = fast_telegram.user_says(chat, owner, "capital of austria?")
    partial = await fast_telegram.wait_for(
        lambda: next((m for m in fast_telegram.messages(chat.id) if m.from_bot and m.text), None), timeout=15
    )
    fast_telegram.user_edits(chat, asked["message_id"], "capital of australia?")
    # The old answer gives way in its own message; then the new one streams there.
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [EDITED_TEXT], timeout=15)
    new_answer.set()
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == [new_text], timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    old_answer.set()
    assert user_texts(fake_llm) == ["capital of austria?", "capital of australia?"]
    assert [m["role"] for m in fake_llm.requests[-1].messages] == ["system", "user"], "the old question is gone"
    (reply,) = [m for m in fast_telegram.messages(chat.id) if m.from_bot and not m.deleted]
    assert reply.message_id == partial.message_id, "the new answer replaced the old one in place"
    versions = [text for _, text, _ in reply.edits]
    after = versions[versions.index(EDITED_TEXT) + 1 :]
    assert all("Vienna" not in v for v in after) and after[-1] == new_text
    assert fast_telegram.bot_texts(chat.id).count(new_text) == 1


async def test_an_edit_of_an_older_message_on_telegram_gets_no_reply(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("first answer"), Reply.text("second answer"))
    first = fast_telegram.user_says(chat, owner, "first question")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["first answer"], timeout=15)
    fast_telegram.user_says(chat, owner, "second question")
    await fast_telegram.wait_for(
        lambda: fast_telegram.bot_texts(chat.id) == ["first answer", "second answer"], timeout=15
    )
    fast_telegram.user_edits(chat, first["message_id"], "first question, reworded")
    # Stored and settled "ignored": the update was taken (Telegram was told), nothing answered.
    await fast_telegram.wait_for(lambda: not fast_telegram.pending_updates, timeout=15)
    await p.gateway.settle(f"telegram:{chat.id}")
    store = p.store
    await _wait_settled(store)
    assert fast_telegram.bot_texts(chat.id) == ["first answer", "second answer"]
    assert len(fake_llm.requests) == 2
    statuses = await _statuses_by_text(store)
    assert statuses["first question, reworded"] == "ignored"


async def _wait_settled(store) -> None:  # noqa: ANN001
    """Until no inbox message is unfinished (settling is written in a task after the reply)."""
    async with asyncio.timeout(10):
        while await store.unfinished_messages():
            await asyncio.sleep(0.01)


async def _statuses_by_text(store) -> dict[str, str]:  # noqa: ANN001
    found = {}
    for inbox_id in range(1, 50):
        row = await store.inbox_message(inbox_id)
        if row is not None:
            found[row.inbound["text"]] = row.status
    return found


# ---------------------------------------------------------------------------- Discord


async def test_an_edit_while_streaming_on_discord_restarts_the_turn_in_the_same_message(
    fast_discord, fake_llm, parley
) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    old_answer, new_answer = asyncio.Event(), asyncio.Event()
    new_text = "Seven days make a week."
    fake_llm.script(
        Reply.text("Eight days make a week, says the song.", chunk=6, hold=old_answer, hold_at=3),
        Reply.text(new_text, chunk=6, delay=0.01, hold=new_answer),
    )
    asked = fast_discord.user_says(channel, owner, "how many days in a weak?")
    partial = await fast_discord.wait_for(
        lambda: next((m for m in fast_discord.messages(channel) if m.from_bot and m.content), None), timeout=15
    )
    fast_discord.user_edits(channel, asked["id"], "how many days in a week?")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [EDITED_TEXT], timeout=15)
    new_answer.set()
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == [new_text], timeout=15)
    await p.gateway.settle(f"discord:{channel.id}")
    old_answer.set()
    assert user_texts(fake_llm) == ["how many days in a weak?", "how many days in a week?"]
    (reply,) = [m for m in fast_discord.messages(channel) if m.from_bot and not m.deleted]
    assert reply.id == partial.id, "the new answer replaced the old one in place"


async def test_an_edit_of_an_older_message_on_discord_gets_no_reply(fast_discord, fake_llm, parley) -> None:
    p = await parley(discord=fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    channel = fast_discord.dm_channel(owner)
    fake_llm.script(Reply.text("first answer"))
    first = fast_discord.user_says(channel, owner, "first question")
    await fast_discord.wait_for(lambda: fast_discord.bot_texts(channel) == ["first answer"], timeout=15)
    await p.gateway.settle(f"discord:{channel.id}")
    fast_discord.user_edits(channel, first["id"], "first question, reworded")
    await _wait_stored(p.store, "first question, reworded")
    await p.gateway.settle(f"discord:{channel.id}")
    await _wait_settled(p.store)
    assert fast_discord.bot_texts(channel) == ["first answer"]
    assert len(fake_llm.requests) == 1
    assert (await _statuses_by_text(p.store))["first question, reworded"] == "ignored"


async def _wait_stored(store, text: str) -> None:  # noqa: ANN001
    """Until an update with this text is in the inbox (Discord delivers over the Gateway: no ack to watch)."""
    async with asyncio.timeout(10):
        while text not in await _statuses_by_text(store):
            await asyncio.sleep(0.01)
