"""The fake Telegram Bot API, driven by the real python-telegram-bot over 127.0.0.1.

Each error string is checked through PTB (which capitalises it, so comparisons are
case-insensitive) and a few envelopes are checked raw with aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import telegram
from aiohttp import web
from telegram import MessageEntity, ReplyParameters
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter, TimedOut
from telegram.ext import ApplicationBuilder, CommandHandler, ContextTypes, MessageHandler, filters

from tests.fakes.telegram import DEFAULT_TOKEN, NOT_MODIFIED, FakeTelegram, TelegramLimits
from tests.support.fakeclock import FakeClock

NO_LIMITS = TelegramLimits(enabled=False)


def _bot(fake: FakeTelegram, token: str | None = None) -> telegram.Bot:
    return telegram.Bot(token or fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)


@contextlib.asynccontextmanager
async def _running_bot(fake: FakeTelegram) -> AsyncIterator[telegram.Bot]:
    bot = _bot(fake)
    await bot.initialize()
    try:
        yield bot
    finally:
        await bot.shutdown()


async def _bad_request(call: Any) -> str:
    """Await ``call`` expecting BadRequest; return its message lower-cased."""
    with pytest.raises(BadRequest) as info:
        await call
    return str(info.value).lower()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- PTB end to end


async def test_ptb_application_echoes_messages_and_commands_over_polling(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    ann = fake.user(77, "Ann", username="ann")
    chat = fake.private_chat(ann)

    async def echo(update: telegram.Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text(update.message.text or "", do_quote=True)

    async def start(update: telegram.Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text(f"started with {context.args}")

    app = ApplicationBuilder().token(fake.token).base_url(fake.base_url).base_file_url(fake.base_file_url).build()
    app.add_handler(CommandHandler("start", start))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(poll_interval=0.0, timeout=5)
        fake.user_says(chat, ann, "hello there")
        fake.user_says(chat, ann, "/start@parley_bot x y")
        await fake.wait_for(lambda: len(fake.bot_texts(chat.id)) == 2, what="two replies")
        await app.updater.stop()
        await app.stop()

    assert fake.bot_texts(chat.id) == ["hello there", "started with ['x', 'y']"]
    assert [c.method for c in fake.calls][:3] == ["getMe", "deleteWebhook", "getUpdates"]
    replies = [m for m in fake.messages(chat.id) if m.from_bot]
    assert [m.reply_to for m in replies] == [1, None]  # do_quote=True -> reply_parameters
    assert fake.pending_updates == []  # PTB confirmed everything on stop


async def test_ptb_webhook_receives_updates_with_the_secret(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(5, "Bo"))
    port = _free_port()

    async def echo(update: telegram.Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text("webhook: " + (update.message.text or ""))

    app = ApplicationBuilder().token(fake.token).base_url(fake.base_url).base_file_url(fake.base_file_url).build()
    app.add_handler(MessageHandler(filters.TEXT, echo))
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_webhook(
            listen="127.0.0.1",
            port=port,
            url_path="hook",
            webhook_url=f"http://127.0.0.1:{port}/hook",
            secret_token="s3cr3t-token_1",
        )
        fake.user_says(chat, None, "ping")
        await fake.wait_for(lambda: fake.bot_texts(chat.id) == ["webhook: ping"], what="webhook echo")
        await app.updater.stop()
        await app.stop()
    assert fake.webhook_deliveries[0].status == 200
    assert fake.webhook_deliveries[0].headers["X-Telegram-Bot-Api-Secret-Token"] == "s3cr3t-token_1"


async def test_webhook_delivery_headers_and_retry_until_2xx(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    received: list[tuple[dict[str, str], dict[str, Any]]] = []
    answers = iter([500, 502, 200])

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.json()))
        return web.Response(status=next(answers))

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with _running_bot(fake) as bot:
            assert await bot.set_webhook(f"http://127.0.0.1:{port}/hook", secret_token="abc_DEF-1")
            info = await bot.get_webhook_info()
            assert info.url == f"http://127.0.0.1:{port}/hook"
            chat = fake.private_chat(fake.user(9, "Cy"))
            sent = fake.user_says(chat, chat.user, "hi")
            await fake.wait_for(lambda: len(received) == 3 and not fake.pending_updates, what="3 deliveries")
            with pytest.raises(Conflict, match="(?i)can't use getUpdates method while webhook is active"):
                await bot.get_updates()
    finally:
        await runner.cleanup()
    update_ids = {body["update_id"] for _, body in received}
    assert len(update_ids) == 1  # the same update, retried
    for headers, body in received:
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Telegram-Bot-Api-Secret-Token"] == "abc_DEF-1"
        assert body["message"] == sent
    assert [d.status for d in fake.webhook_deliveries] == [500, 502, 200]


# --------------------------------------------------------------------------- errors through PTB


async def test_error_strings_through_ptb(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    group = fake.group("G")
    async with _running_bot(fake) as bot:
        first = await bot.send_message(chat.id, "first")

        assert await _bad_request(bot.send_message(chat.id, "x" * 4097)) == "message is too long"
        assert await _bad_request(bot.edit_message_text("x" * 4097, chat.id, first.message_id)) == "message_too_long"
        assert await _bad_request(bot.send_message(chat.id, "")) == "message text is empty"
        assert await _bad_request(bot.send_message(chat.id, "   ")) == "message must be non-empty"
        assert await _bad_request(bot.send_message(chat.id, "1.5", parse_mode="MarkdownV2")) == (
            "can't parse entities: character '.' is reserved and must be escaped with the preceding '\\'"
        )
        assert await _bad_request(bot.send_message(chat.id, "*half", parse_mode="MarkdownV2")) == (
            "can't parse entities: can't find end of bold entity at byte offset 0"
        )
        assert await _bad_request(bot.send_message(chat.id, "<x>", parse_mode="HTML")) == (
            'can\'t parse entities: unsupported start tag "x" at byte offset 0'
        )
        assert await _bad_request(bot.send_message(chat.id, "hi", parse_mode="XML")) == "unsupported parse_mode"
        assert await _bad_request(
            bot.send_message(chat.id, "hi", entities=[MessageEntity("spark", 0, 1)])
        ) == "can't parse messageentity: unsupported type specified"
        assert await _bad_request(
            bot.send_message(chat.id, "hi", entities=[MessageEntity("bold", 0, 5)])
        ) == "entity beginning at utf-16 offset 0 ends after the end of the text at utf-16 offset 5"
        assert await _bad_request(bot.edit_message_text("first", chat.id, first.message_id)) == NOT_MODIFIED
        assert await _bad_request(bot.edit_message_text("x", chat.id, 999)) == "message to edit not found"
        assert await _bad_request(bot.edit_message_text("x", chat.id, 1 + 999)) == "message to edit not found"
        user_message = fake.user_says(chat, ann, "mine")
        assert await _bad_request(
            bot.edit_message_text("x", chat.id, user_message["message_id"])
        ) == "message can't be edited"
        assert await _bad_request(bot.delete_message(chat.id, 999)) == "message to delete not found"
        assert await _bad_request(
            bot.send_message(chat.id, "r", reply_parameters=ReplyParameters(999))
        ) == "message to be replied not found"
        assert await _bad_request(bot.send_message(424242, "x")) == "chat not found"
        assert await _bad_request(bot.send_message_draft(group.id, 1, "x")) == "textdraft_peer_invalid"
        assert await _bad_request(bot.send_chat_action(chat.id, "dancing")) == "wrong parameter action in request"
        assert await _bad_request(
            bot.set_my_commands([telegram.BotCommand("Bad-Name", "d")])
        ) == "bot_command_invalid"
        assert await _bad_request(bot.answer_callback_query("nope")) == (
            "query is too old and response timeout expired or query id is invalid"
        )

        # the user deletes the bot's live message mid-stream
        live = await bot.send_message(chat.id, "streaming…")
        fake.user_deletes(chat, live.message_id)
        assert await _bad_request(bot.edit_message_text("more", chat.id, live.message_id)) == (
            "message to edit not found"
        )

        fake.user_blocks_bot(ann)
        with pytest.raises(Forbidden, match="(?i)^forbidden: bot was blocked by the user$"):
            await bot.send_message(chat.id, "x")

    # a valid edit is accepted; "not modified" also compares entities and markup
    fake.user_blocks_bot(ann, blocked=False)
    async with _running_bot(fake) as bot:
        await bot.edit_message_text("first", chat.id, first.message_id, entities=[MessageEntity("bold", 0, 5)])
        assert fake.message(chat.id, first.message_id).entities == [{"offset": 0, "length": 5, "type": "bold"}]


async def test_wrong_token_and_unknown_method(fake_telegram: FakeTelegram) -> None:
    with pytest.raises(InvalidToken):
        await _bot(fake_telegram, "999:WRONG").get_me()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake_telegram.base_url}999:WRONG/getMe") as resp:
            assert resp.status == 401
            assert await resp.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        async with http.post(f"{fake_telegram.base_url}not-a-token/getMe") as resp:
            assert (await resp.json())["description"] == "Unauthorized: invalid token specified"
        async with http.post(f"{fake_telegram.base_url}{DEFAULT_TOKEN}/flyToTheMoon") as resp:
            assert resp.status == 404
            assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}


async def test_raw_envelopes_encodings_and_case_insensitive_methods(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    fake.limits = NO_LIMITS  # forced 429s (inject) still happen
    chat = fake.private_chat(fake.user(77, "Ann"))
    root = f"{fake.base_url}{fake.token}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{root}/GETME") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            body = await resp.json()
            assert body["ok"] is True and body["result"]["username"] == "parley_bot"
        async with http.post(f"{root}/sendmessage", json={"chat_id": chat.id, "text": "json body"}) as resp:
            assert (await resp.json())["result"]["text"] == "json body"
        async with http.post(f"{root}/sendMessage", data={"chat_id": str(chat.id), "text": "form"}) as resp:
            assert (await resp.json())["result"]["text"] == "form"
        async with http.get(f"{root}/sendMessage", params={"chat_id": str(chat.id), "text": "query"}) as resp:
            assert (await resp.json())["result"]["text"] == "query"
        form = aiohttp.FormData()
        form.add_field("chat_id", str(chat.id))
        form.add_field("text", "multipart")
        form.add_field("reply_markup", json.dumps({"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]}))
        async with http.post(f"{root}/sendMessage", data=form) as resp:
            assert (await resp.json())["result"]["reply_markup"]["inline_keyboard"][0][0]["text"] == "A"
        async with http.post(f"{root}/editMessageText", data={"chat_id": str(chat.id), "message_id": "1",
                                                              "text": "json body"}) as resp:  # fmt: skip
            assert resp.status == 400
            assert await resp.json() == {"ok": False, "error_code": 400, "description": "Bad Request: " + NOT_MODIFIED}
        fake.inject("429", method="sendMessage", retry_after=7)
        async with http.post(f"{root}/sendMessage", data={"chat_id": str(chat.id), "text": "x"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "7"
            assert await resp.json() == {
                "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7",
                "parameters": {"retry_after": 7},
            }  # fmt: skip
    assert fake.bot_texts(chat.id) == ["json body", "form", "query", "multipart"]
    assert [c.method for c in fake.calls][:2] == ["getMe", "sendMessage"]  # canonical case in the log
    assert fake.calls[1].params == {"chat_id": str(chat.id), "text": "json body"}  # as a form would carry it
    assert fake.calls[4].params["reply_markup"] == {"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]}


# --------------------------------------------------------------------------- getUpdates


async def test_get_updates_offset_limit_and_redelivery(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    for text in ("one", "two", "three"):
        fake.user_says(chat, chat.user, text)
    async with _running_bot(fake) as bot:
        first = await bot.get_updates(limit=2)
        assert [u.message.text for u in first if u.message] == ["one", "two"]
        again = await bot.get_updates()  # nothing confirmed yet
        assert len(again) == 3
        rest = await bot.get_updates(offset=first[-1].update_id + 1)
        assert [u.message.text for u in rest if u.message] == ["three"]
        assert await bot.get_updates(offset=rest[-1].update_id + 1) == ()
        assert fake.pending_updates == []

        fake.redeliver(rest[-1].update_id)
        duplicate = await bot.get_updates(offset=rest[-1].update_id + 1)
        assert [u.update_id for u in duplicate] == [rest[-1].update_id]

        fake.user_says(chat, chat.user, "four")
        fake.user_says(chat, chat.user, "five")
        last = await bot.get_updates(offset=-1)
        assert [u.message.text for u in last if u.message] == ["five"]


async def test_long_poll_returns_when_an_update_arrives(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        poll = asyncio.create_task(bot.get_updates(timeout=30))
        await fake.wait_for(lambda: fake.waiting_polls == 1, what="a waiting long poll")
        fake.user_says(chat, chat.user, "wake up")
        updates = await asyncio.wait_for(poll, 5)
    assert [u.message.text for u in updates if u.message] == ["wake up"]


async def test_second_poller_terminates_the_first_with_409(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    async with _running_bot(fake) as first, _running_bot(fake) as second:
        older = asyncio.create_task(first.get_updates(timeout=30))
        await fake.wait_for(lambda: fake.waiting_polls == 1, what="the first long poll")
        newer = asyncio.create_task(second.get_updates(timeout=0))
        with pytest.raises(Conflict) as info:
            await asyncio.wait_for(older, 5)
        assert str(info.value) == (
            "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
        )
        assert await asyncio.wait_for(newer, 5) == ()


async def test_allowed_updates_filter_new_updates(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        assert await bot.get_updates(allowed_updates=["callback_query"]) == ()
        fake.user_says(chat, chat.user, "ignored")
        sent = await bot.send_message(chat.id, "pick", reply_markup=telegram.InlineKeyboardMarkup(
            [[telegram.InlineKeyboardButton("A", callback_data="a")]]))  # fmt: skip
        fake.user_clicks(chat, chat.user, sent.message_id, "a")
        updates = await bot.get_updates()
        assert len(updates) == 1 and updates[0].callback_query is not None
        assert updates[0].callback_query.data == "a"
        assert await bot.answer_callback_query(updates[0].callback_query.id, text="ok")
        assert fake.callback_answers[updates[0].callback_query.id]["text"] == "ok"


# --------------------------------------------------------------------------- chats, topics, drafts


async def test_groups_topics_mentions_and_replies(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    ann = fake.user(77, "Ann", username="ann_x")
    forum = fake.supergroup("Forum", forum=True)
    topic = fake.topic(forum, "Ideas")
    message = fake.user_says(forum, ann, "hey @parley_bot see #idea", thread=topic)
    assert message["chat"]["type"] == "supergroup" and message["chat"]["is_forum"] is True
    assert message["message_thread_id"] == topic and message["is_topic_message"] is True
    assert message["reply_to_message"]["forum_topic_created"]["name"] == "Ideas"
    assert [e["type"] for e in message["entities"]] == ["mention", "hashtag"]

    async with _running_bot(fake) as bot:
        updates = await bot.get_updates()
        ptb_message = updates[0].message
        assert ptb_message is not None and ptb_message.is_topic_message and ptb_message.message_thread_id == topic
        reply = await bot.send_message(forum.id, "in topic", message_thread_id=topic,
                                       reply_parameters=ReplyParameters(message["message_id"]))  # fmt: skip
        assert reply.message_thread_id == topic and reply.reply_to_message is not None
        assert await _bad_request(bot.send_message(forum.id, "x", message_thread_id=999)) == "message thread not found"
        full = await bot.get_chat(forum.id)
        assert full.is_forum and full.title == "Forum"

    seen = fake.messages(forum.id)
    assert [(m.from_bot, m.thread_id, m.reply_to) for m in seen] == [(False, topic, None), (True, topic, 2)]


async def test_privacy_mode_delivers_only_commands_mentions_and_replies(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(privacy_mode=True)
    group = fake.group("G")
    ann = fake.user(77, "Ann")
    fake.user_says(group, ann, "just chatting")
    fake.user_says(group, ann, "/help")
    fake.user_says(group, ann, "hi @parley_bot")
    async with _running_bot(fake) as bot:
        texts = [u.message.text for u in await bot.get_updates() if u.message]
    assert texts == ["/help", "hi @parley_bot"]
    assert len(fake.messages(group.id)) == 3  # the person still sees every message


async def test_drafts_are_private_ephemeral_and_replaced_by_the_final_message(make_fake_telegram: Any) -> None:
    clock = FakeClock()
    fake: FakeTelegram = await make_fake_telegram(clock=clock.now)
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        assert await bot.send_message_draft(chat.id, 1, "Thinking about")
        assert fake.current_draft(chat.id) == "Thinking about"
        assert await _bad_request(bot.send_message_draft(chat.id, 0, "x")) == "draft_id must be non-zero"
        await clock.advance(30.0)
        assert fake.current_draft(chat.id) is None  # expired 30 s after the last update
        await clock.advance(5.0)
        assert await bot.send_message_draft(chat.id, 1, "")
        assert fake.current_draft(chat.id) == ""  # the "Thinking..." placeholder
        await bot.send_message(chat.id, "final answer")
        assert fake.current_draft(chat.id) is None
    assert [d.text for d in fake.drafts(chat.id)] == ["Thinking about", ""]
    assert fake.bot_texts(chat.id) == ["final answer"]


async def test_chat_as_a_person_sees_it(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    fake.limits = NO_LIMITS
    async with _running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Hel")
        await bot.edit_message_text("Hello", chat.id, sent.message_id)
        await bot.edit_message_text("Hello *world*", chat.id, sent.message_id, parse_mode="MarkdownV2")
        gone = await bot.send_message(chat.id, "temporary")
        assert await bot.delete_message(chat.id, gone.message_id)
        assert await bot.send_chat_action(chat.id, "typing")
        await bot.set_my_commands([telegram.BotCommand("new", "Start over")])
        assert [c.command for c in await bot.get_my_commands()] == ["new"]
    first, second = fake.messages(chat.id)
    assert (first.text, first.entities) == ("Hello world", [{"offset": 6, "length": 5, "type": "bold"}])
    assert [text for _, text, _ in first.edits] == ["Hel", "Hello", "Hello world"]
    assert first.edit_count == 2 and first.edits[0][0] <= first.edits[1][0] <= first.edits[2][0]
    assert second.deleted and second.deleted_by == "bot"
    assert fake.bot_texts(chat.id) == ["Hello world"]
    assert [action for _, action, _ in fake.chat_actions(chat.id)] == ["typing"]
    assert fake.commands() == [{"command": "new", "description": "Start over"}]
    assert fake.pending_updates == []  # the bot's own messages never come back as updates


async def test_length_is_counted_after_parsing_in_code_points_or_strict_utf16(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS)
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        await bot.send_message(chat.id, "*" + "x" * 4096 + "*", parse_mode="MarkdownV2")  # 4098 raw, 4096 parsed
        await bot.send_message(chat.id, "😀" * 4096)  # 8192 UTF-16 units, 4096 code points
        fake.limits = TelegramLimits(enabled=False, strict_utf16=True)
        assert await _bad_request(bot.send_message(chat.id, "😀" * 4096)) == "message is too long"
        await bot.send_message(chat.id, "😀" * 2048)
    assert [len(t) for t in fake.bot_texts(chat.id)] == [4096, 4096, 2048]


async def test_user_edits_and_exotic_updates_reach_the_bot(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    first = fake.user_says(chat, chat.user, "helo")
    fake.user_edits(chat, first["message_id"], "hello")
    custom = {"message_id": 99, "date": 1, "chat": {"id": chat.id, "type": "private"}, "text": "no sender"}
    pushed = fake.push_update({"message": custom})
    async with _running_bot(fake) as bot:
        updates = await bot.get_updates()
    assert [u.update_id for u in updates][-1] == pushed
    assert updates[1].edited_message is not None and updates[1].edited_message.text == "hello"
    assert updates[2].message is not None and updates[2].message.from_user is None
    assert [text for _, text, _ in fake.messages(chat.id)[0].edits] == ["helo", "hello"]


async def test_latency_delays_processing_until_the_round_trip_ends(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(latency=0.2)
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        send = asyncio.create_task(bot.send_message(chat.id, "late"))
        await fake.wait_for(lambda: fake.in_flight == 1, what="the call arrived")
        assert fake.bot_texts(chat.id) == []  # received, not yet applied
        await send
    assert fake.bot_texts(chat.id) == ["late"]


# --------------------------------------------------------------------------- faults


async def test_faults_5xx_drop_and_ambiguous_drop_after_apply(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS)
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with _running_bot(fake) as bot:
        fake.inject("5xx", method="sendMessage", status=502)
        with pytest.raises(NetworkError, match="Bad Gateway"):
            await bot.send_message(chat.id, "lost in a 502")
        fake.inject("drop", method="sendmessage")
        with pytest.raises(NetworkError):
            await bot.send_message(chat.id, "never applied")
        fake.inject("drop_after_apply", method="sendMessage", chat_id=chat.id)
        with pytest.raises(NetworkError):
            await bot.send_message(chat.id, "applied but unanswered")
        await bot.send_message(chat.id, "normal")
    assert fake.bot_texts(chat.id) == ["applied but unanswered", "normal"]
    assert [c.fault for c in fake.calls_to("sendMessage")] == ["5xx", "drop", "drop_after_apply", None]
    assert [c.status for c in fake.calls_to("sendMessage")] == [502, None, None, 200]


async def test_fault_timeout_holds_past_the_client_timeout(make_fake_telegram: Any) -> None:
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS)
    chat = fake.private_chat(fake.user(77, "Ann"))
    fake.inject("timeout", method="sendMessage", hold=30.0)
    async with _running_bot(fake) as bot:
        with pytest.raises(TimedOut):
            await bot.send_message(chat.id, "slow", read_timeout=0.2)
    assert fake.bot_texts(chat.id) == []


@pytest.mark.filterwarnings("ignore:Deprecated since version v22.2")  # PTB's own RetryAfter migration warning
async def test_forced_429_storm_in_a_time_window(make_fake_telegram: Any) -> None:
    clock = FakeClock()
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS, clock=clock.now)
    chat = fake.private_chat(fake.user(77, "Ann"))
    fake.inject("429", chat_id=chat.id, times=None, start=clock.now() + 10, end=clock.now() + 20, retry_after=11)
    async with _running_bot(fake) as bot:
        await bot.send_message(chat.id, "before")
        await clock.advance(10)
        for _ in range(3):
            with pytest.raises(RetryAfter) as info:
                await bot.send_message(chat.id, "during")
            assert str(info.value) == "Flood control exceeded. Retry in 11 seconds"
        await clock.advance(10)
        await bot.send_message(chat.id, "after")
    assert fake.bot_texts(chat.id) == ["before", "after"]
    assert fake.count_429() == 3 and fake.count_429("sendMessage", chat.id) == 3 and fake.count_429("getMe") == 0


# --------------------------------------------------------------------------- wait_for, control API, CLI


async def test_wait_for_times_out_with_a_description(fake_telegram: FakeTelegram) -> None:
    with pytest.raises(TimeoutError, match="never true not true after 0.05s; messages per chat"):
        await fake_telegram.wait_for(lambda: False, timeout=0.05, what="never true")


async def test_control_endpoints(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.url}/_fake/user_says",
                             json={"chat_id": 501, "user": {"id": 501, "first_name": "Q"}, "text": "/start"}) as resp:
            message = (await resp.json())["result"]
        assert message["entities"] == [{"offset": 0, "length": 6, "type": "bot_command"}]
        config = {"latency": 0.0, "limits": {"per_chat_burst": 5}}
        async with http.post(f"{fake.url}/_fake/config", json=config) as resp:
            assert (await resp.json())["result"]["limits"]["per_chat_burst"] == 5
        async with _running_bot(fake) as bot:
            await bot.send_message(501, "pong")
        async with http.get(f"{fake.url}/_fake/messages", params={"chat_id": "501"}) as resp:
            assert [m["text"] for m in (await resp.json())["result"]] == ["/start", "pong"]
        async with http.get(f"{fake.url}/_fake/stats") as resp:
            stats = (await resp.json())["result"]
        assert stats["calls"]["sendMessage"] == 1 and stats["bot_messages"] == 1 and stats["429"] == 0
        async with http.get(f"{fake.url}/_fake/calls", params={"method": "sendMessage"}) as resp:
            assert [c["params"]["text"] for c in (await resp.json())["result"]] == ["pong"]
        async with http.post(f"{fake.url}/_fake/reset") as resp:
            assert (await resp.json())["ok"] is True
    assert fake.messages(501) == [] and fake.calls == []


async def test_cli_serves_until_killed() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.telegram", "--port", "0", "--latency", "0.01", "--no-limits",
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("http://127.0.0.1:") and line.endswith("/bot")
        async with aiohttp.ClientSession() as http, http.post(f"{line}{DEFAULT_TOKEN}/getMe") as resp:
            assert (await resp.json())["result"]["is_bot"] is True
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
