"""The fake Telegram's inline keyboards and callback queries, through the real python-telegram-bot.

What parley's Telegram buttons are tested against: a message keeps its keyboard,
editMessageText replaces it (and drops it when given none), "message is not modified"
only when text, entities and keyboard are all unchanged, editMessageReplyMarkup,
presses delivered as `callback_query` updates (getUpdates and webhook), and
answerCallbackQuery's rules (once, in time, at most 200 characters).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import telegram
from aiohttp import web
from telegram import InlineKeyboardButton, InlineKeyboardMarkup
from telegram.error import BadRequest

from tests.fakes.telegram import NOT_MODIFIED, QUERY_TOO_OLD, TEXT_BUTTONS_UNALLOWED, FakeTelegram, TelegramLimits

NO_LIMITS = TelegramLimits(enabled=False)


def keyboard(*buttons: tuple[str, str]) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton(label, callback_data=data) for label, data in buttons]])


@contextlib.asynccontextmanager
async def running_bot(fake: FakeTelegram) -> AsyncIterator[telegram.Bot]:
    bot = telegram.Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)
    await bot.initialize()
    try:
        yield bot
    finally:
        await bot.shutdown()


async def raw(fake: FakeTelegram, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
    """One Bot API call as JSON, bypassing PTB (to see the exact status and description)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}{fake.token}/{method}", json=params) as resp:
            return resp.status, await resp.json()


async def bad_request(call: Any) -> str:
    with pytest.raises(BadRequest) as info:
        await call
    return str(info.value).lower()


@pytest.fixture
async def fake(make_fake_telegram: Any) -> FakeTelegram:
    return await make_fake_telegram(limits=NO_LIMITS)


# --------------------------------------------------------------------------- keyboards on messages


async def test_a_message_keeps_its_keyboard_and_tests_can_read_it(fake: FakeTelegram) -> None:
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "ap:1:y"), ("No", "ap:1:n")))
        plain = await bot.send_message(chat.id, "no buttons")
    # PTB reads the keyboard back from the answer.
    assert sent.reply_markup is not None
    assert [[b.text for b in row] for row in sent.reply_markup.inline_keyboard] == [["Yes", "No"]]
    assert fake.buttons(chat.id, sent.message_id) == [("Yes", "ap:1:y"), ("No", "ap:1:n")]
    assert fake.message(chat.id, sent.message_id).button_rows == [[("Yes", "ap:1:y"), ("No", "ap:1:n")]]
    assert fake.message(chat.id, sent.message_id).has_buttons
    assert fake.buttons(chat.id, plain.message_id) == []
    assert not fake.message(chat.id, plain.message_id).has_buttons
    assert plain.reply_markup is None


async def test_buttons_are_validated_like_the_bot_api(fake: FakeTelegram) -> None:
    chat = fake.private_chat(fake.user(77, "Ann"))

    def markup(*buttons: dict[str, Any]) -> dict[str, Any]:
        return {"inline_keyboard": [list(buttons)]}

    cases = [
        (markup({"text": "A", "callback_data": "x" * 65}), "Bad Request: BUTTON_DATA_INVALID"),
        (markup({"text": "A", "callback_data": "é" * 33}), "Bad Request: BUTTON_DATA_INVALID"),  # 66 bytes
        (markup({"text": "A", "callback_data": ""}), "Bad Request: " + TEXT_BUTTONS_UNALLOWED),
        (markup({"text": "A"}), "Bad Request: " + TEXT_BUTTONS_UNALLOWED),
        (markup({"callback_data": "a"}), "Bad Request: can't parse inline keyboard button: Can't find field \"text\""),
        (markup({"text": 5, "callback_data": "a"}),
         "Bad Request: can't parse inline keyboard button: Field \"text\" must be of type String"),
        (markup({"text": "A", "callback_data": "a", "url": "https://example.com"}),
         "Bad Request: can't parse inline keyboard button: exactly one of the optional fields must be used"),
    ]  # fmt: skip
    for reply_markup, description in cases:
        status, body = await raw(fake, "sendMessage", chat_id=chat.id, text="pick", reply_markup=reply_markup)
        assert (status, body["description"]) == (400, description), reply_markup
    assert fake.bot_texts(chat.id) == []  # nothing refused was sent
    # 64 bytes exactly, and a URL button, are fine.
    ok = markup({"text": "A", "callback_data": "é" * 32}, {"text": "Docs", "url": "https://example.com"})
    status, body = await raw(fake, "sendMessage", chat_id=chat.id, text="pick", reply_markup=ok)
    assert status == 200
    assert fake.buttons(chat.id, body["result"]["message_id"]) == [("A", "é" * 32), ("Docs", None)]
    # The same through PTB: the description, munged as PTB does.
    async with running_bot(fake) as bot:
        reason = await bad_request(bot.send_message(chat.id, "pick", reply_markup=keyboard(("A", "y" * 65))))
    assert reason == "button_data_invalid"


async def test_edit_message_text_replaces_or_drops_the_keyboard(fake: FakeTelegram) -> None:
    chat = fake.private_chat(fake.user(77, "Ann"))
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "ap:1:y"), ("No", "ap:1:n")))
        mid = sent.message_id
        await bot.edit_message_text("Run it? (2)", chat_id=chat.id, message_id=mid,
                                    reply_markup=keyboard(("Sure", "ap:1:s")))  # fmt: skip
        assert fake.buttons(chat.id, mid) == [("Sure", "ap:1:s")]
        # The same text and keyboard again: not modified.
        same = keyboard(("Sure", "ap:1:s"))
        reason = await bad_request(bot.edit_message_text("Run it? (2)", chat_id=chat.id, message_id=mid, reply_markup=same))
        assert reason == NOT_MODIFIED.lower()
        # The same text, another keyboard: an edit.
        await bot.edit_message_text("Run it? (2)", chat_id=chat.id, message_id=mid,
                                    reply_markup=keyboard(("Sure", "ap:1:t")))  # fmt: skip
        assert fake.buttons(chat.id, mid) == [("Sure", "ap:1:t")]
        # The same text without a keyboard: the keyboard goes, and that is no "not modified".
        edited = await bot.edit_message_text("Run it? (2)", chat_id=chat.id, message_id=mid)
        assert edited.reply_markup is None
        assert fake.buttons(chat.id, mid) == [] and not fake.message(chat.id, mid).has_buttons
        # Now text and (no) keyboard are unchanged.
        reason = await bad_request(bot.edit_message_text("Run it? (2)", chat_id=chat.id, message_id=mid))
        assert reason == NOT_MODIFIED.lower()
        # An empty keyboard is no keyboard.
        reason = await bad_request(bot.edit_message_text(
            "Run it? (2)", chat_id=chat.id, message_id=mid, reply_markup=InlineKeyboardMarkup([])))
        assert reason == NOT_MODIFIED.lower()
    assert fake.message(chat.id, mid).text == "Run it? (2)"


async def test_edit_message_reply_markup(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    theirs = fake.user_says(chat, ann, "hello")
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Pick one", reply_markup=keyboard(("A", "m:a")))
        mid = sent.message_id
        await bot.edit_message_reply_markup(chat.id, mid, reply_markup=keyboard(("B", "m:b"), ("C", "m:c")))
        assert fake.buttons(chat.id, mid) == [("B", "m:b"), ("C", "m:c")]
        assert fake.message(chat.id, mid).text == "Pick one"
        reason = await bad_request(
            bot.edit_message_reply_markup(chat.id, mid, reply_markup=keyboard(("B", "m:b"), ("C", "m:c")))
        )
        assert reason == NOT_MODIFIED.lower()
        await bot.edit_message_reply_markup(chat.id, mid)  # none given: removed
        assert fake.buttons(chat.id, mid) == []
        assert await bad_request(bot.edit_message_reply_markup(chat.id, mid)) == NOT_MODIFIED.lower()
        assert await bad_request(bot.edit_message_reply_markup(chat.id, 999)) == "message to edit not found"
        reason = await bad_request(bot.edit_message_reply_markup(chat.id, theirs["message_id"]))
        assert reason == "message can't be edited"
    assert [c.method for c in fake.calls if c.method.startswith("edit")] == ["editMessageReplyMarkup"] * 6


# --------------------------------------------------------------------------- presses


async def test_a_press_arrives_through_get_updates_with_the_message_as_it_is(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann", username="ann_x")
    chat = fake.private_chat(ann)
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "ap:1:y"), ("No", "ap:1:n")))
        query_id = fake.user_presses(chat, ann, sent.message_id, "ap:1:n")
        (update,) = await bot.get_updates(timeout=1)
        query = update.callback_query
        assert query is not None and update.message is None
        assert query.id == query_id and query.data == "ap:1:n"
        assert (query.from_user.id, query.from_user.username) == (77, "ann_x")
        assert query.message is not None and query.message.is_accessible
        assert query.message.message_id == sent.message_id and query.message.chat.id == chat.id
        assert query.message.text == "Run it?"
        assert query.message.reply_markup is not None
        assert await bot.answer_callback_query(query_id, text="Declined", show_alert=True)
    assert fake.callback_answers[query_id]["text"] == "Declined"
    assert fake.callback_answers[query_id]["show_alert"] is True


async def test_only_buttons_the_message_shows_can_be_pressed_unless_stale(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    said = fake.user_says(chat, ann, "hi")
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "ap:1:y")))
        await bot.get_updates(timeout=0)  # the "hi"
        with pytest.raises(ValueError, match="shows no button"):
            fake.user_presses(chat, ann, sent.message_id, "ap:1:n")
        with pytest.raises(ValueError, match="shows no button"):
            fake.user_presses(chat, ann, said["message_id"], "ap:1:y")
        with pytest.raises(ValueError, match="cannot press buttons in the private chat"):
            fake.user_presses(chat, fake.user(78, "Bob"), sent.message_id, "ap:1:y")
        await bot.edit_message_text("Done.", chat_id=chat.id, message_id=sent.message_id)
        # The person's app still showed the button: the query carries the message as it is now.
        query_id = fake.user_presses(chat, ann, sent.message_id, "ap:1:y", stale=True)
        updates = await bot.get_updates(offset=-1, timeout=1)
    query = updates[-1].callback_query
    assert query is not None and query.id == query_id and query.data == "ap:1:y"
    assert query.message.text == "Done." and query.message.reply_markup is None


async def test_presses_without_a_readable_message_or_without_data(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "old", reply_markup=keyboard(("Yes", "y")))
        old = fake.user_presses(chat, ann, sent.message_id, "y", inaccessible=True)
        game = fake.user_presses(chat, ann, sent.message_id, None, stale=True)
        inline = fake.user_presses_inline(ann, "z", inline_message_id="AgAAAInline1")
        updates = await bot.get_updates(timeout=1)
    by_id = {u.callback_query.id: u.callback_query for u in updates}
    assert set(by_id) == {old, game, inline}
    # PTB 22 reads it into a Message whose date is 0 (is_accessible False), not an InaccessibleMessage.
    assert by_id[old].message is not None and not by_id[old].message.is_accessible
    assert by_id[old].message.message_id == sent.message_id and by_id[old].message.chat.id == chat.id
    assert by_id[old].data == "y"
    assert by_id[game].data is None and by_id[game].game_short_name == "game"
    assert by_id[inline].message is None and by_id[inline].inline_message_id == "AgAAAInline1"


async def test_answer_callback_query_rules(make_fake_telegram: Any) -> None:
    now = [100.0]
    fake: FakeTelegram = await make_fake_telegram(limits=NO_LIMITS, clock=lambda: now[0], callback_answer_deadline=15)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "y")))
        first = fake.user_presses(chat, ann, sent.message_id, "y")
        # Too long a text is refused, and the query can still be answered.
        status, body = await raw(fake, "answerCallbackQuery", callback_query_id=first, text="x" * 201)
        assert (status, body["description"]) == (400, "Bad Request: MESSAGE_TOO_LONG")
        assert first not in fake.callback_answers
        assert await bot.answer_callback_query(first)  # no text: just stops the spinner
        assert fake.callback_answers[first] == {"text": None, "show_alert": False, "url": None, "t": 100.0}
        # A second answer, and an unknown id.
        status, body = await raw(fake, "answerCallbackQuery", callback_query_id=first, text="again")
        assert (status, body["description"]) == (400, "Bad Request: " + QUERY_TOO_OLD)
        assert await bad_request(bot.answer_callback_query("123")) == QUERY_TOO_OLD.lower()
        # Within the deadline, 200 characters are fine; past it, too old.
        second = fake.user_presses(chat, ann, sent.message_id, "y")
        third = fake.user_presses(chat, ann, sent.message_id, "y")
        now[0] += 15.0
        assert await bot.answer_callback_query(second, text="y" * 200)
        now[0] += 0.5
        assert await bad_request(bot.answer_callback_query(third, text="late")) == QUERY_TOO_OLD.lower()
        fake.callback_answer_deadline = 60  # tests may move the deadline at any time
        assert await bot.answer_callback_query(third, text="in time now")
    assert fake.callback_answers[second]["text"] == "y" * 200
    assert fake.callback_answers[third]["text"] == "in time now"
    assert [c.status for c in fake.calls_to("answerCallbackQuery")] == [400, 200, 400, 400, 200, 400, 200]


async def test_presses_reach_a_webhook_and_follow_allowed_updates(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        async with running_bot(fake) as bot:
            sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "y")))
            # Without "callback_query" among the allowed updates, Telegram drops presses.
            assert await bot.get_updates(timeout=0, allowed_updates=["message"]) == ()
            fake.user_presses(chat, ann, sent.message_id, "y")
            fake.user_says(chat, ann, "after the press")
            (update,) = await bot.get_updates(timeout=1)
            assert update.message is not None and update.message.text == "after the press"
            await bot.get_updates(offset=update.update_id + 1, timeout=0)
            assert not fake.pending_updates
            assert await bot.set_webhook(f"http://127.0.0.1:{port}/hook", allowed_updates=["message", "callback_query"])
            query_id = fake.user_presses(chat, ann, sent.message_id, "y")
            await fake.wait_for(lambda: len(received) == 1, what="the press delivered")
            await bot.delete_webhook()
    finally:
        await runner.cleanup()
    query = received[0]["callback_query"]
    assert query["id"] == query_id and query["data"] == "y" and query["from"]["id"] == 77
    assert query["message"]["reply_markup"] == {"inline_keyboard": [[{"text": "Yes", "callback_data": "y"}]]}


async def test_presses_in_groups_and_topics_and_the_control_api(fake: FakeTelegram) -> None:
    ann, bob = fake.user(77, "Ann"), fake.user(78, "Bob")
    forum = fake.supergroup("Forum", forum=True)
    topic = fake.topic(forum, "Ideas")
    async with running_bot(fake) as bot:
        sent = await bot.send_message(forum.id, "Which?", message_thread_id=topic, reply_markup=keyboard(("A", "a")))
        fake.user_presses(forum, bob, sent.message_id, "a")
        async with aiohttp.ClientSession() as http:
            body = {"chat_id": forum.id, "user": ann.id, "message_id": sent.message_id, "data": "a"}
            async with http.post(f"{fake.url}/_fake/user_presses", data=json.dumps(body)) as resp:
                via_http = (await resp.json())["result"]
        updates = await bot.get_updates(timeout=1)
        await bot.answer_callback_query(via_http, text="ok")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{fake.url}/_fake/callback_answers") as resp:
                answers = (await resp.json())["result"]
    queries = [u.callback_query for u in updates]
    assert [q.from_user.id for q in queries] == [78, 77] and queries[1].id == via_http
    for q in queries:
        assert q.message.chat.id == forum.id and q.message.chat.type == "supergroup"
        assert q.message.message_thread_id == topic and q.message.is_topic_message
    assert answers[via_http]["text"] == "ok"


async def test_user_clicks_still_returns_the_query(fake: FakeTelegram) -> None:
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    async with running_bot(fake) as bot:
        sent = await bot.send_message(chat.id, "Run it?", reply_markup=keyboard(("Yes", "y")))
        query = fake.user_clicks(chat, ann, sent.message_id, "y")
        (update,) = await bot.get_updates(timeout=1)
    assert update.callback_query.id == query["id"] and query["data"] == "y"
