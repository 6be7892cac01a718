"""pytest fixtures for the fake Telegram Bot API (registered as a plugin by tests/conftest.py).

- ``fake_telegram``: a ``FakeTelegram`` on a free 127.0.0.1 port with the default limits,
  stopped after the test.
- ``make_fake_telegram``: a factory, ``await make_fake_telegram(limits=..., latency=...,
  clock=...)``, for custom limits, latency, privacy mode or an injected clock; every fake it
  made is stopped afterwards.
- ``telegram_bot``: an initialised ``telegram.Bot`` pointed at ``fake_telegram`` (the
  real library, no monkeypatching), shut down after the test.

Typical use::

    async def test_reply(fake_telegram, telegram_bot):
        chat = fake_telegram.private_chat(fake_telegram.user(77, "Ann"))
        await telegram_bot.send_message(chat.id, "hi")
        assert fake_telegram.bot_texts(chat.id) == ["hi"]

Media a person sends (``user_sends_photo``, ``user_sends_document``, ``user_sends_voice``,
``user_sends_album``, ...) is kept by the fake; ``telegram_bot.get_file(file_id)`` and the
returned ``File.download_as_bytearray()`` fetch it back::

    sent = fake_telegram.user_sends_photo(chat, chat.user, b"...", caption="what is this?")
    file = await telegram_bot.get_file(sent["photo"][-1]["file_id"])

Buttons: a message keeps its inline keyboard (``fake_telegram.buttons(chat_id, message_id)``
gives ``[(label, callback_data), ...]``); a person presses one with ``user_presses``, which
returns the callback query id whose answer lands in ``callback_answers``::

    query_id = fake_telegram.user_presses(chat, chat.user, message_id, "ap:1:y")
    answer = await fake_telegram.wait_for(lambda: fake_telegram.callback_answers.get(query_id))

For an ``Application``::

    app = (ApplicationBuilder().token(fake.token).base_url(fake.base_url)
           .base_file_url(fake.base_file_url).build())
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.fakes.telegram import FakeTelegram


@pytest.fixture
async def fake_telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram()
    await fake.start(host="127.0.0.1", port=0)
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def make_fake_telegram() -> AsyncIterator[Callable[..., Awaitable[FakeTelegram]]]:
    made: list[FakeTelegram] = []

    async def factory(**kwargs: Any) -> FakeTelegram:
        fake = FakeTelegram(**kwargs)
        await fake.start(host="127.0.0.1", port=0)
        made.append(fake)
        return fake

    try:
        yield factory
    finally:
        for fake in reversed(made):
            await fake.stop()


@pytest.fixture
async def telegram_bot(fake_telegram: FakeTelegram) -> AsyncIterator[Any]:
    import telegram  # imported lazily: only tests that use PTB pay for it

    bot = telegram.Bot(fake_telegram.token, base_url=fake_telegram.base_url, base_file_url=fake_telegram.base_file_url)
    await bot.initialize()
    try:
        yield bot
    finally:
        await bot.shutdown()
