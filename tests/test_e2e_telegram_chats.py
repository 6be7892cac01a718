"""Telegram end to end: groups, topics, drafts, webhook mode, typing, and pacing at the real limits."""

from __future__ import annotations

import asyncio
import socket


from tests.fakes.llm import Reply, bench_text
from tests.support.stack import OWNER_TG


def bot_msgs(fake, chat_id: int):  # noqa: ANN001, ANN201
    return [m for m in fake.messages(chat_id) if m.from_bot and not m.deleted]


async def test_group_answers_mentions_replies_and_commands_only(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    group = fast_telegram.supergroup("Team")
    key = f"telegram:{group.id}"

    fast_telegram.user_says(group, owner, "just chatting with the humans here")
    fake_llm.script(Reply.text("Answer to the mention."), Reply.text("Answer to the reply."))
    fast_telegram.user_says(group, owner, "@parley_bot what do you think?")
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, group.id)) == 1, timeout=10)
    await p.gateway.settle(key)
    first = bot_msgs(fast_telegram, group.id)[0]
    assert first.text == "Answer to the mention."
    assert first.reply_to is not None  # in groups the reply quotes the message it answers
    # Only the mention reached the model, with the mention itself removed.
    assert len(fake_llm.requests) == 1
    assert fake_llm.requests[0].messages[-1]["content"] == "what do you think?"

    fast_telegram.user_says(group, owner, "and what about this?", reply_to=first.message_id)
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, group.id)) == 2, timeout=10)
    await p.gateway.settle(key)
    assert bot_msgs(fast_telegram, group.id)[1].text == "Answer to the reply."

    fast_telegram.user_says(group, owner, "/help@parley_bot")
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, group.id)) == 3, timeout=10)
    assert "/model" in bot_msgs(fast_telegram, group.id)[2].text
    # A command addressed to another bot is not ours.
    fast_telegram.user_says(group, owner, "/help@other_bot")
    fast_telegram.user_says(group, owner, "@parley_bot ping")
    fake_llm.script(Reply.text("pong"))
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, group.id)) == 4, timeout=10)
    await p.gateway.settle(key)
    assert bot_msgs(fast_telegram, group.id)[3].text == "pong"
    assert len(fake_llm.requests) == 3


async def test_group_trigger_all_answers_every_message(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides={"telegram": {"group_trigger": "all"}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    group = fast_telegram.group("Small team")
    fake_llm.script(Reply.text("Heard you."))
    fast_telegram.user_says(group, owner, "no mention at all")
    await fast_telegram.wait_for(lambda: [m.text for m in bot_msgs(fast_telegram, group.id)] == ["Heard you."], timeout=10)
    await p.gateway.settle(f"telegram:{group.id}")


async def test_group_trigger_per_chat_override(fast_telegram, fake_llm, parley) -> None:
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chatty, quiet = fast_telegram.group("Chatty"), fast_telegram.group("Quiet")
    p = await parley(telegram=fast_telegram, overrides={"telegram": {"group_triggers": {str(chatty.id): "all"}}})
    fake_llm.script(Reply.text("Answered without a mention."))
    fast_telegram.user_says(quiet, owner, "no mention here")
    fast_telegram.user_says(chatty, owner, "no mention here either")
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, chatty.id)) == 1, timeout=10)
    await p.gateway.settle(f"telegram:{chatty.id}")
    await p.gateway.settle(f"telegram:{quiet.id}")
    assert bot_msgs(fast_telegram, quiet.id) == []
    assert len(fake_llm.requests) == 1


async def test_forum_topic_replies_stay_in_the_topic(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    forum = fast_telegram.supergroup("Forum", forum=True)
    topic_a = fast_telegram.topic(forum, "Alpha")
    topic_b = fast_telegram.topic(forum, "Beta")
    fake_llm.script(Reply.text("Reply in alpha, streamed " + "a " * 30, chunk=7, delay=0.01), Reply.text("Reply in beta."))
    fast_telegram.user_says(forum, owner, "@parley_bot first", thread=topic_a)
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, forum.id)) == 1, timeout=10)
    await p.gateway.settle(f"telegram:{forum.id}:{topic_a}")
    fast_telegram.user_says(forum, owner, "@parley_bot second", thread=topic_b)
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, forum.id)) == 2, timeout=10)
    await p.gateway.settle(f"telegram:{forum.id}:{topic_b}")
    a, b = bot_msgs(fast_telegram, forum.id)
    assert a.thread_id == topic_a and a.text.startswith("Reply in alpha")
    assert b.thread_id == topic_b and b.text == "Reply in beta."
    # Every call for the alpha reply (send, edits, typing) targeted its topic.
    sends = fast_telegram.calls_to("sendMessage", chat_id=forum.id)
    assert [str(c.params.get("message_thread_id")) for c in sends] == [str(topic_a), str(topic_b)]
    # The two topics are separate conversations: the second request carries no alpha history.
    assert all("first" not in str(m.get("content")) for m in fake_llm.requests[1].messages)


async def test_drafts_stream_privately_then_one_message_persists(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides={"telegram": {"drafts": True}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    answer = " ".join(f"draftword{i}" for i in range(60))
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.02))
    fast_telegram.user_says(chat, owner, "draft it")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(f"telegram:{chat.id}")
    drafts = fast_telegram.drafts(chat.id)
    assert len(drafts) >= 2, "the reply was not streamed as a draft"
    assert [m.text for m in bot_msgs(fast_telegram, chat.id)] == [answer]
    assert not fast_telegram.calls_to("editMessageText", chat_id=chat.id), "drafts replace edits"
    assert len(fast_telegram.calls_to("sendMessage", chat_id=chat.id)) == 1


async def test_drafts_failing_fall_back_to_edit_streaming(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram, overrides={"telegram": {"drafts": True}})
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.inject("error", method="sendMessageDraft", times=None, status=400,
                         description="Bad Request: TEXTDRAFT_PEER_INVALID")
    answer = " ".join(f"w{i}" for i in range(80))
    fake_llm.script(Reply.text(answer, chunk=10, delay=0.02))
    fast_telegram.user_says(chat, owner, "go")
    await fake_llm.wait_for(lambda: fake_llm.pending == 0)
    await p.gateway.settle(f"telegram:{chat.id}")
    assert [m.text for m in bot_msgs(fast_telegram, chat.id)] == [answer]
    assert len(fast_telegram.calls_to("sendMessageDraft", chat_id=chat.id)) == 1


async def test_typing_shows_until_the_first_text(fast_telegram, fake_llm, parley) -> None:
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("Finally.", hold=gate))
    fast_telegram.user_says(chat, owner, "think hard")
    await fast_telegram.wait_for(lambda: len(fast_telegram.chat_actions(chat.id)) >= 1, timeout=10)
    assert fast_telegram.chat_actions(chat.id)[0][1] == "typing"
    assert bot_msgs(fast_telegram, chat.id) == []
    gate.set()
    await fast_telegram.wait_for(lambda: [m.text for m in bot_msgs(fast_telegram, chat.id)] == ["Finally."], timeout=10)
    await p.gateway.settle(f"telegram:{chat.id}")
    first_send = fast_telegram.calls_to("sendMessage", chat_id=chat.id)[0].t_received
    assert all(t <= first_send for t, _, _ in fast_telegram.chat_actions(chat.id))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_webhook_mode_with_secret_token(fast_telegram, fake_llm, parley) -> None:
    port = _free_port()
    p = await parley(
        telegram=fast_telegram,
        overrides={
            "telegram": {
                "mode": "webhook",
                "webhook": {
                    "url": f"http://127.0.0.1:{port}/tg-hook",
                    "listen": f"127.0.0.1:{port}",
                    "path": "/tg-hook",
                    "secret_token": "s3cret-Token_1",
                },
            }
        },
    )
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fake_llm.script(Reply.text("Delivered by webhook."))
    fast_telegram.user_says(chat, owner, "hi")
    await fast_telegram.wait_for(lambda: [m.text for m in bot_msgs(fast_telegram, chat.id)] == ["Delivered by webhook."], timeout=10)
    await p.gateway.settle(f"telegram:{chat.id}")
    (delivery,) = fast_telegram.webhook_deliveries
    assert delivery.headers.get("X-Telegram-Bot-Api-Secret-Token") == "s3cret-Token_1"
    assert not fast_telegram.calls_to("getUpdates")


async def test_ten_chats_streaming_at_once_stay_under_default_limits(fake_telegram, fake_llm, parley) -> None:
    """Default fake limits (Telegram's) and parley's default pacing: zero 429s, every reply exact."""
    p = await parley(telegram=fake_telegram, fast=False, overrides={"access": {"allow_everyone": True}})
    chats = []
    for i in range(10):
        user = fake_telegram.user(OWNER_TG if i == 0 else 100 + i, f"U{i}")
        chats.append((fake_telegram.private_chat(user), user))
    text = bench_text(60, 3)
    fake_llm.script(*[Reply.text(text, chunk=12, delay=0.05) for _ in chats])  # ~3 s of streaming each
    for chat, user in chats:
        fake_telegram.user_says(chat, user, "stream please")
    for chat, _ in chats:
        await fake_telegram.wait_for(lambda c=chat: [m.text for m in bot_msgs(fake_telegram, c.id)] == [text], timeout=40)
    for chat, _ in chats:
        await p.gateway.settle(f"telegram:{chat.id}")
    assert fake_telegram.count_429() == 0
    edits = sum(len(fake_telegram.calls_to("editMessageText", chat_id=c.id)) for c, _ in chats)
    assert edits >= 10, "replies were streamed with edits, not sent once"


async def test_a_chat_stuck_in_routing_does_not_hold_up_the_others(fast_telegram, fake_llm, parley) -> None:
    """Updates are routed concurrently (one chat's still in order): a message whose routing
    waits -- here on a slow store read -- never delays another chat's answer."""
    p = await parley(telegram=fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    private, group = fast_telegram.private_chat(owner), fast_telegram.group("Team")
    store, release = p.gateway.store, asyncio.Event()
    real_settings = store.chat_settings

    async def slow_for_the_private_chat(chat_key: str):  # noqa: ANN202
        if chat_key == f"telegram:{private.id}":
            await release.wait()
        return await real_settings(chat_key)

    store.chat_settings = slow_for_the_private_chat
    fake_llm.script(Reply.text("Answer in the group."), Reply.text("Answer in private."))
    fast_telegram.user_says(private, owner, "first, in private")
    fast_telegram.user_says(group, owner, "@parley_bot then in the group")
    try:
        await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, group.id)) == 1, timeout=10)
        assert bot_msgs(fast_telegram, private.id) == []  # still held up, yet the group was answered
    finally:
        release.set()  # also on failure, so the stuck update cannot hang the teardown
    await fast_telegram.wait_for(lambda: len(bot_msgs(fast_telegram, private.id)) == 1, timeout=10)
    await p.gateway.settle_all()
    assert [m.text for m in bot_msgs(fast_telegram, group.id)] == ["Answer in the group."]
    assert [m.text for m in bot_msgs(fast_telegram, private.id)] == ["Answer in private."]
