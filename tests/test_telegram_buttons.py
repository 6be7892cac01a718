"""Buttons on Telegram (issue 15): the connector's outbox draws inline keyboards, and a
press comes back to `Gateway.on_button` as a `ButtonPress`, answered through
answerCallbackQuery.

The real App (from a real config file), the real TelegramConnector and python-telegram-bot
against the fake Telegram on 127.0.0.1, in polling and in webhook mode. The tests play
the button's owner through `gateway.buttons.register(prefix, handler)`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bots.app import App
from bots.backoff import Backoff
from bots.config import load_config
from bots.errors import NotModified
from bots.inbound import ButtonPress, Inbound
from bots.outbox import Button, ChatRef
from bots.telegram import TelegramConnector, WebhookOptions, cut_answer
from tests.fakes.llm import FakeLLM, Reply
from tests.fakes.telegram import QUERY_TOO_OLD, FakeTelegram, FakeUser
from tests.support.stack import FAST_PACING, OWNER_TG, parley_config

FAST = Backoff(initial=0.05, cap=0.2)
NO_LONGER_WAITING = "This is no longer waiting for an answer."

Start = Callable[..., Awaitable[App]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def start(tmp_path: Path, fake_llm: FakeLLM) -> AsyncIterator[Start]:
    """`await start(fake, webhook=False)`: the App with a TelegramConnector polling (or
    behind a webhook on a free 127.0.0.1 port); stopped after the test."""
    started: list[App] = []

    async def run(telegram: FakeTelegram, *, webhook: bool = False) -> App:
        config = parley_config(tmp_path, fake_llm, overrides={"telegram": {"pacing": FAST_PACING}})
        path = tmp_path / "parley.yaml"
        path.write_text(yaml.safe_dump(config))
        app = await App.create(load_config(path, env={}, env_file=None))
        started.append(app)
        hook = None
        if webhook:
            port = free_port()
            hook = WebhookOptions(url=f"http://127.0.0.1:{port}/tg", listen="127.0.0.1", port=port, path="/tg",
                                  secret_token="s3cret-Token_1")  # fmt: skip
        connector = TelegramConnector(
            telegram.token, api_base=telegram.url, webhook=hook, pacing=app.settings.telegram.pacing.policy(),
            poll_timeout=1, backoff=FAST, store_backoff=FAST,
        )  # fmt: skip
        await app.start([connector])
        if not webhook:  # the first long poll set the allowed updates: presses are no longer let in by default
            await telegram.wait_for(lambda: telegram.waiting_polls > 0, what="polling")
        return app

    try:
        yield run
    finally:
        for app in reversed(started):
            await app.stop()


class Handler:
    """A button owner for the tests: records every press, answers as told."""

    def __init__(self, answers: list[tuple[str | None, bool]] | None = None, *, handled: bool = True) -> None:
        self.answers = [("ok", False)] if answers is None else answers
        self.handled = handled
        self.presses: list[tuple[ButtonPress, str]] = []
        self.errors: list[BaseException] = []
        self.done = asyncio.Event()
        self.release: asyncio.Event | None = None

    async def __call__(self, press: ButtonPress, rest: str) -> bool:
        self.presses.append((press, rest))
        if self.release is not None:
            await self.release.wait()
        try:
            for text, alert in self.answers:
                await press.answer(text, alert)
        except BaseException as exc:  # answer must never raise: the test says so
            self.errors.append(exc)
        self.done.set()
        return self.handled


def record_receive(app: App) -> list[list[Inbound]]:
    """Every batch `Gateway.receive` and `Gateway.handle` get (they must never see a press)."""
    gateway = app.gateway
    batches: list[list[Inbound]] = []
    real_receive, real_handle = gateway.receive, gateway.handle

    async def receive(inbounds: list[Inbound]) -> None:
        batches.append(list(inbounds))
        await real_receive(inbounds)

    async def handle(inbound: Inbound) -> None:
        batches.append([inbound])
        await real_handle(inbound)

    gateway.receive = receive  # type: ignore[method-assign]
    gateway.handle = handle  # type: ignore[method-assign]
    return batches


def offsets(fake: FakeTelegram) -> list[int]:
    return [int(c.params.get("offset") or 0) for c in fake.calls_to("getUpdates")]


async def answered(fake: FakeTelegram, query_id: str) -> dict[str, Any]:
    """The answer the press got (waits for it)."""
    return await fake.wait_for(lambda: fake.callback_answers.get(query_id), what=f"press {query_id} answered")


def outbox(app: App) -> Any:
    return app.connectors[0].outbox


# --------------------------------------------------------------------------- the outbox


async def test_buttons_are_sent_replaced_and_removed_by_edits(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake)
    chat = fake.private_chat(fake.user(OWNER_TG, "Owner"))
    where = ChatRef("telegram", str(chat.id))
    box = outbox(app)

    choices = [Button("Allow", "ap:7:y", "success"), Button("Deny", "ap:7:n", "danger")]
    ref = await box.send(where, "Run `rm -rf build`?", markdown=True, buttons=choices)
    mid = int(ref.message_id)
    assert fake.buttons(chat.id, mid) == [("Allow", "ap:7:y"), ("Deny", "ap:7:n")]
    assert fake.message(chat.id, mid).button_rows == [[("Allow", "ap:7:y"), ("Deny", "ap:7:n")]]  # one row
    assert fake.message(chat.id, mid).text == "Run rm -rf build?"
    assert [e["type"] for e in fake.message(chat.id, mid).entities] == ["code"]  # Markdown still rendered

    # The same text and buttons: nothing to change.
    with pytest.raises(NotModified):
        await box.edit(ref, "Run `rm -rf build`?", markdown=True,
                       buttons=[Button("Allow", "ap:7:y"), Button("Deny", "ap:7:n")])  # fmt: skip
    # Other buttons replace them.
    await box.edit(ref, "Run `rm -rf build`? (asked again)", markdown=True, buttons=[Button("Allow once", "ap:8:y")])
    assert fake.buttons(chat.id, mid) == [("Allow once", "ap:8:y")]
    # The same text without buttons removes them -- a real edit, not "not modified".
    await box.edit(ref, "Run `rm -rf build`? (asked again)", markdown=True)
    assert fake.buttons(chat.id, mid) == [] and not fake.message(chat.id, mid).has_buttons
    assert fake.message(chat.id, mid).text == "Run rm -rf build? (asked again)"
    # And now that really is not modified.
    with pytest.raises(NotModified):
        await box.edit(ref, "Run `rm -rf build`? (asked again)", markdown=True)
    # Buttons come back with a plain-text edit too; a send without buttons has none.
    await box.edit(ref, "Approved.", buttons=[Button("Undo", "ap:8:u")])
    assert fake.buttons(chat.id, mid) == [("Undo", "ap:8:u")] and fake.message(chat.id, mid).entities == []
    plain = await box.send(where, "no buttons here")
    assert fake.buttons(chat.id, int(plain.message_id)) == []
    edits = fake.calls_to("editMessageText")
    assert [c.status for c in edits] == [400, 200, 200, 400, 200]
    assert "reply_markup" not in edits[2].params  # removed by leaving it out, as Telegram wants


async def test_buttons_in_a_forum_topic_and_with_a_reply(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake)
    ann = fake.user(77, "Ann")
    forum = fake.supergroup("Forum", forum=True)
    topic = fake.topic(forum, "Deploys")
    asked = fake.user_says(forum, ann, "deploy please", thread=topic)
    where = ChatRef("telegram", str(forum.id), thread_id=str(topic), is_private=False)
    ref = await outbox(app).send(where, "Deploy to prod?", reply_to=str(asked["message_id"]),
                                 buttons=[Button("Yes", "d:1:y"), Button("No", "d:1:n")])  # fmt: skip
    message = fake.message(forum.id, int(ref.message_id))
    assert (message.thread_id, message.reply_to) == (topic, asked["message_id"])
    assert message.buttons == [("Yes", "d:1:y"), ("No", "d:1:n")]


# --------------------------------------------------------------------------- presses


@pytest.mark.parametrize("mode", ["polling", "webhook"])
async def test_presses_reach_on_button_in_private_chats_groups_and_topics(
    fast_telegram: FakeTelegram, start: Start, mode: str
) -> None:
    fake = fast_telegram
    app = await start(fake, webhook=mode == "webhook")
    handler = Handler([("Noted", False)])
    app.gateway.buttons.register("t", handler)
    batches = record_receive(app)
    ann = fake.user(77, "Ann", last_name="Lee", username="ann_x")
    private = fake.private_chat(ann)
    group = fake.group("Team")
    forum = fake.supergroup("Forum", forum=True)
    topic = fake.topic(forum, "Ideas")
    places = [
        (private, ChatRef("telegram", str(private.id), is_private=True)),
        (group, ChatRef("telegram", str(group.id), is_private=False)),
        (forum, ChatRef("telegram", str(forum.id), thread_id=str(topic), is_private=False)),
    ]
    for i, (chat, where) in enumerate(places):
        ref = await outbox(app).send(where, f"Pick {i}", buttons=[Button("One", f"t:{i}:1"), Button("Two", f"t:{i}:2")])
        query_id = fake.user_presses(chat, ann, int(ref.message_id), f"t:{i}:2")
        assert await answered(fake, query_id) == {"text": "Noted", "show_alert": False, "url": None,
                                                  "t": fake.callback_answers[query_id]["t"]}  # fmt: skip
        press, rest = handler.presses[-1]
        assert rest == f"{i}:2"
        assert press.chat == where and press.chat.key == where.key
        assert (press.user_id, press.message_id, press.data) == ("77", ref.message_id, f"t:{i}:2")
        assert (press.username, press.display_name) == ("ann_x", "Ann Lee")
        assert press.platform == "telegram" and press.user_key == "telegram:77"
    assert len(handler.presses) == 3 and not handler.errors
    assert batches == []  # a press is no message: never stored, never handled as one
    if mode == "webhook":
        assert not fake.calls_to("getUpdates")
        assert [d.status for d in fake.webhook_deliveries] == [200, 200, 200]


async def test_a_press_is_acknowledged_like_any_update_and_messages_around_it_are_answered(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start: Start
) -> None:
    fake = fast_telegram
    app = await start(fake)
    handler = Handler([("Fine", False)])
    app.gateway.buttons.register("t", handler)
    batches = record_receive(app)
    owner = fake.user(OWNER_TG, "Owner")
    chat = fake.private_chat(owner)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[Button("A", "t:a")])

    # A press alone: the offset moves past it, nothing is stored.
    query_id = fake.user_presses(chat, owner, int(ref.message_id), "t:a")
    press_update = fake.pending_updates[-1]["update_id"]
    await answered(fake, query_id)
    await fake.wait_for(lambda: any(o > press_update for o in offsets(fake)), what="the press acknowledged")
    await fake.wait_for(lambda: not fake.pending_updates, what="nothing pending")

    # A message, a press and a message in a row: both messages answered, the press handled once.
    fake_llm.script(Reply.text("First answer."), Reply.text("Second answer."))
    fake.user_says(chat, owner, "one")
    second_query = fake.user_presses(chat, owner, int(ref.message_id), "t:a")
    fake.user_says(chat, owner, "two")
    await answered(fake, second_query)
    await fake.wait_for(lambda: fake.bot_texts(chat.id)[-2:] == ["First answer.", "Second answer."], timeout=15)
    await app.gateway.settle(f"telegram:{chat.id}")
    await fake.wait_for(lambda: not fake.pending_updates, what="everything acknowledged")
    received = [i.text for batch in batches for i in batch]
    assert received == ["one", "two"]
    assert len(handler.presses) == 2
    assert len(fake.calls_to("answerCallbackQuery")) == 2


async def test_a_slow_handler_never_holds_up_the_messages(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, start: Start
) -> None:
    fake = fast_telegram
    app = await start(fake)
    handler = Handler([("Done", False)])
    handler.release = asyncio.Event()
    app.gateway.buttons.register("t", handler)
    owner = fake.user(OWNER_TG, "Owner")
    chat = fake.private_chat(owner)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[Button("A", "t:a")])
    query_id = fake.user_presses(chat, owner, int(ref.message_id), "t:a")
    fake_llm.script(Reply.text("Answered while the press waits."))
    fake.user_says(chat, owner, "are you there?")
    await fake.wait_for(lambda: "Answered while the press waits." in fake.bot_texts(chat.id), timeout=15)
    assert len(handler.presses) == 1 and query_id not in fake.callback_answers  # still being handled
    handler.release.set()
    assert (await answered(fake, query_id))["text"] == "Done"


async def test_answers_toast_alert_cut_and_only_once(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake)
    toast, alert = Handler([("Saved", False)]), Handler([("Are you sure?", True)])
    twice, long = Handler([("first", False), ("second", True)]), Handler([("é" * 150 + "😀" * 100, False)])
    for prefix, handler in (("toast", toast), ("alert", alert), ("twice", twice), ("long", long)):
        app.gateway.buttons.register(prefix, handler)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[
        Button("T", "toast:x"), Button("A", "alert:x"), Button("2", "twice:x"), Button("L", "long:x")])  # fmt: skip
    ids = {p: fake.user_presses(chat, ann, int(ref.message_id), f"{p}:x") for p in ("toast", "alert", "twice", "long")}
    answers = {p: await answered(fake, q) for p, q in ids.items()}
    assert (answers["toast"]["text"], answers["toast"]["show_alert"]) == ("Saved", False)
    assert (answers["alert"]["text"], answers["alert"]["show_alert"]) == ("Are you sure?", True)
    assert (answers["twice"]["text"], answers["twice"]["show_alert"]) == ("first", False)
    cut = answers["long"]["text"]
    assert cut == "é" * 150 + "😀" * 24 + "…"  # 150 + 48 + 1 UTF-16 code units: within Telegram's 200
    await asyncio.wait_for(twice.done.wait(), 5)
    assert not twice.errors
    assert len(fake.calls_to("answerCallbackQuery")) == 4  # the second answer was never sent
    assert all(c.status == 200 for c in fake.calls_to("answerCallbackQuery"))
    assert cut_answer("short") == "short"


async def test_a_late_answer_is_logged_not_raised(fast_telegram: FakeTelegram, start: Start, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="bots.telegram")
    fake = fast_telegram
    fake.callback_answer_deadline = 0.0  # every answer comes too late
    app = await start(fake)
    handler = Handler([("Too late?", False), (None, False)])
    app.gateway.buttons.register("t", handler)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[Button("A", "t:a")])
    query_id = fake.user_presses(chat, ann, int(ref.message_id), "t:a")
    await asyncio.wait_for(handler.done.wait(), 10)
    assert handler.errors == []
    (call,) = fake.calls_to("answerCallbackQuery")  # once: the failed answer counts as the answer
    assert (call.status, call.description) == (400, "Bad Request: " + QUERY_TOO_OLD)
    assert call.params["callback_query_id"] == query_id and query_id not in fake.callback_answers
    late = [r for r in caplog.records if "answered too late" in r.getMessage()]
    assert len(late) == 1 and late[0].levelno == logging.INFO


async def test_a_press_nothing_waits_for_is_answered_no_longer_waiting(
    fast_telegram: FakeTelegram, start: Start
) -> None:
    fake = fast_telegram
    app = await start(fake)
    declined = Handler([], handled=False)  # registered, but the press means nothing to it any more
    app.gateway.buttons.register("old", declined)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    choices = [Button("A", "gone:1"), Button("B", "old:1"), Button("C", "noprefix")]
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=choices)
    for data in ("gone:1", "old:1", "noprefix"):
        query_id = fake.user_presses(chat, ann, int(ref.message_id), data)
        answer = await answered(fake, query_id)
        assert (answer["text"], answer["show_alert"]) == (NO_LONGER_WAITING, False)
    assert len(declined.presses) == 1


async def test_presses_that_are_not_parleys_are_only_acknowledged(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake)
    handler = Handler()
    app.gateway.buttons.register("t", handler)
    batches = record_receive(app)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[Button("A", "t:a")])
    mid = int(ref.message_id)
    silent = [
        fake.user_presses(chat, ann, mid, "t:a", inaccessible=True),  # a message too old to show the bot
        fake.user_presses(chat, ann, mid, None, stale=True),  # a button without callback_data (a game)
        fake.user_presses_inline(ann, "t:a"),  # a message sent in inline mode
    ]
    for query_id in silent:
        assert await answered(fake, query_id) == {"text": None, "show_alert": False, "url": None,
                                                  "t": fake.callback_answers[query_id]["t"]}  # fmt: skip
    assert handler.presses == [] and batches == []


async def test_presses_by_bots_are_ignored_like_their_messages(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake)
    handler = Handler()
    app.gateway.buttons.register("t", handler)
    group = fake.group("Team")
    robot = FakeUser(555, "Robot", username="other_bot", is_bot=True)
    ann = fake.user(77, "Ann")
    ref = await outbox(app).send(ChatRef("telegram", str(group.id), is_private=False), "Pick",
                                 buttons=[Button("A", "t:a")])  # fmt: skip
    by_bot = fake.user_presses(group, robot, int(ref.message_id), "t:a")
    by_ann = fake.user_presses(group, ann, int(ref.message_id), "t:a")
    await answered(fake, by_ann)  # handed over after the bot's press, which came first
    assert [p.user_id for p, _ in handler.presses] == ["77"]
    assert by_bot not in fake.callback_answers
    assert [c.params["callback_query_id"] for c in fake.calls_to("answerCallbackQuery")] == [by_ann]


async def test_a_press_delivered_twice_is_handled_once(fast_telegram: FakeTelegram, start: Start) -> None:
    fake = fast_telegram
    app = await start(fake, webhook=True)
    handler = Handler([("Once", False)])
    app.gateway.buttons.register("t", handler)
    ann = fake.user(77, "Ann")
    chat = fake.private_chat(ann)
    ref = await outbox(app).send(ChatRef("telegram", str(chat.id)), "Pick", buttons=[Button("A", "t:a")])
    query_id = fake.user_presses(chat, ann, int(ref.message_id), "t:a")
    update_id = fake.pending_updates[-1]["update_id"]
    await answered(fake, query_id)
    fake.redeliver(update_id)  # as when Telegram did not get the webhook's 200
    await fake.wait_for(lambda: len(fake.webhook_deliveries) == 2 and not fake.pending_updates, what="redelivered")
    fake.user_presses(chat, ann, int(ref.message_id), "t:a")  # a later press is handed over: the first was not
    await fake.wait_for(lambda: len(fake.callback_answers) == 2, what="the next press answered")
    assert len(handler.presses) == 2
    assert [c.params["callback_query_id"] for c in fake.calls_to("answerCallbackQuery")][0] == query_id
    assert len(fake.calls_to("answerCallbackQuery")) == 2
