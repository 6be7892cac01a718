"""Media end to end (issue 14): a person sends a photo, an album, a voice note, a PDF, a
sticker or a file that is too large, in the fake Telegram (through the real
python-telegram-bot) or the fake Discord (through the real discord.py); the real App
from a real config downloads it, turns it into the model request (the real openai SDK
against the fake provider), and the answer shows up in the chat.

The pieces are tested on their own elsewhere: what the connectors receive and download
(test_e2e_telegram_media.py, test_e2e_discord_media.py) and what the gateway makes of
the bytes (test_gateway_media.py). Here only the whole path: how many model requests,
what they carried, what the chat shows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bots.gateway import NO_VISION_TEXT
from bots.media_input import CAN_READ
from tests.fakes.discord import FakeDiscord, Upload
from tests.fakes.llm import DEFAULT_MODEL, FakeLLM, RequestRecord, TranscriptionRecord
from tests.fakes.telegram import FakeTelegram
from tests.support.media import jpeg, pdf
from tests.support.stack import OWNER_DC, OWNER_TG

MB = 1024 * 1024

Start = Callable[..., Awaitable[Any]]


@dataclass
class Outcome:
    requests: list[RequestRecord]  # model requests (transcriptions are not among them)
    transcriptions: list[TranscriptionRecord]
    texts: list[str]  # what the bot's messages in the chat say now

    def user_content(self) -> Any:
        (request,) = self.requests
        return [m for m in request.messages if m.get("role") == "user"][-1]["content"]

    def user_text(self) -> str:
        content = self.user_content()
        if isinstance(content, str):
            return content
        return "\n".join(part.get("text", "") for part in content if part.get("type") in ("text", "input_text"))


async def on_telegram(parley: Start, tg: FakeTelegram, llm: FakeLLM, send: Callable[..., Any],
                      **overrides: Any) -> Outcome:
    """Start parley, let the owner `send(tg, chat, owner)` in their private chat, wait for
    the bot's answer and for the chat to go idle; what the model and the chat saw."""
    p = await parley(telegram=tg, overrides=overrides or None)
    owner = tg.user(OWNER_TG, "Owner")
    chat = tg.private_chat(owner)
    send(tg, chat, owner)
    await tg.wait_for(lambda: tg.bot_texts(chat.id), timeout=15, what="the bot answers")
    await p.gateway.settle(f"telegram:{chat.id}")
    return Outcome(list(llm.requests), list(llm.transcriptions), tg.bot_texts(chat.id))


async def on_discord(parley: Start, dc: FakeDiscord, llm: FakeLLM, send: Callable[..., Any],
                     **overrides: Any) -> Outcome:
    """As `on_telegram`, in the owner's DM with the bot on Discord."""
    p = await parley(discord=dc, overrides=overrides or None)
    owner = dc.user(OWNER_DC, "owner")
    dm = dc.dm_channel(owner)
    send(dc, dm, owner)
    await dc.wait_for(lambda: dc.bot_texts(dm), timeout=15, what="the bot answers")
    await p.gateway.settle(f"discord:{dm.id}")
    return Outcome(list(llm.requests), list(llm.transcriptions), dc.bot_texts(dm))


# ---- photo with a caption ---------------------------------------------------------------------


PHOTO = jpeg(40_000)


def assert_one_answer_about_the_photo(seen: Outcome) -> None:
    (request,) = seen.requests
    assert request.image_bytes() == [PHOTO]
    assert seen.user_text() == "what is in this picture?"
    assert seen.texts == ["You said: what is in this picture?"]


async def test_telegram_photo_with_caption(fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start) -> None:
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_photo(
        chat, user, PHOTO, caption="what is in this picture?"))
    assert_one_answer_about_the_photo(seen)


async def test_discord_image_with_text(fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start) -> None:
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "what is in this picture?", attachments=[Upload(PHOTO, "cat.jpg", "image/jpeg")]))
    assert_one_answer_about_the_photo(seen)


# ---- three photos at once ---------------------------------------------------------------------


PHOTOS = [jpeg(10_000, seed=n) for n in range(3)]


def assert_one_answer_about_three_photos(seen: Outcome) -> None:
    (request,) = seen.requests
    assert request.image_bytes() == PHOTOS
    assert seen.user_text() == "which is best?"
    assert seen.texts == ["You said: which is best?"]


async def test_telegram_album_of_three_is_one_request(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start
) -> None:
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_album(
        chat, user, PHOTOS, caption="which is best?"))
    assert_one_answer_about_three_photos(seen)


async def test_discord_three_images_in_one_message(fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start) -> None:
    uploads = [Upload(data, f"{n}.jpg", "image/jpeg") for n, data in enumerate(PHOTOS)]
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "which is best?", attachments=uploads))
    assert_one_answer_about_three_photos(seen)


# ---- voice note -------------------------------------------------------------------------------


VOICE = b"OggS\x00\x02" + bytes(range(256)) * 4
SAID = "Remind me to water the plants"


def assert_transcribed_then_answered(seen: Outcome) -> None:
    (transcription,) = seen.transcriptions
    assert transcription.data == VOICE
    (request,) = seen.requests
    assert seen.user_content() == SAID
    assert request.images == []
    assert seen.texts == [f"🎤 “{SAID}”\n\nYou said: {SAID}"]


async def test_telegram_voice_note(fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start) -> None:
    fake_llm.script_transcripts(SAID)
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_voice(
        chat, user, VOICE, duration=2))
    assert_transcribed_then_answered(seen)


async def test_discord_voice_message(fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start) -> None:
    fake_llm.script_transcripts(SAID)
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_sends_voice(
        dm, user, VOICE, duration=2.0))
    assert_transcribed_then_answered(seen)


# ---- PDF --------------------------------------------------------------------------------------


REPORT = pdf("Quarterly revenue grew 12 percent.", "Costs stayed flat.")
READ = "summarise\n\n[file: report.pdf]\nQuarterly revenue grew 12 percent.\n\nCosts stayed flat.\n[end of file]"


def assert_the_pdf_was_read(seen: Outcome) -> None:
    assert len(seen.requests) == 1
    assert seen.user_content() == READ
    assert seen.texts == [f"You said: {READ}"]


async def test_telegram_pdf(fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start) -> None:
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_document(
        chat, user, REPORT, file_name="report.pdf", mime_type="application/pdf", caption="summarise"))
    assert_the_pdf_was_read(seen)


async def test_discord_pdf(fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start) -> None:
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "summarise", attachments=[Upload(REPORT, "report.pdf", "application/pdf")]))
    assert_the_pdf_was_read(seen)


# ---- sticker ----------------------------------------------------------------------------------


async def test_telegram_sticker_gets_one_line_and_no_model_request(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start
) -> None:
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_sticker(chat, user))
    assert seen.requests == [] and seen.transcriptions == []
    assert seen.texts == [f"📎 {CAN_READ}; I can't open stickers."]


async def test_discord_sticker_gets_one_line_and_no_model_request(
    fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start
) -> None:
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_sends_sticker(dm, user))
    assert seen.requests == [] and seen.transcriptions == []
    assert seen.texts == [f"📎 {CAN_READ}; I can't open stickers."]


# ---- too large --------------------------------------------------------------------------------


async def test_telegram_file_over_20_mb_gets_one_line_and_no_model_request(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start
) -> None:
    sent: dict[str, Any] = {}

    def send(tg: FakeTelegram, chat: Any, user: Any) -> None:
        sent.update(tg.user_sends_document(chat, user, None, size=21 * MB, file_name="film.pdf",
                                           mime_type="application/pdf", caption="read this"))

    seen = await on_telegram(parley, fast_telegram, fake_llm, send)
    assert seen.requests == []
    (line,) = seen.texts
    assert line.startswith("⚠️") and "film.pdf" in line and "too large" in line
    assert fast_telegram.file(sent["document"]["file_id"]).downloads == 0


async def test_discord_image_over_the_image_limit_gets_one_line_and_no_model_request(
    fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start
) -> None:
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "look", attachments=[Upload(jpeg(1_500_000), "big.jpg", "image/jpeg")]),
        media={"max_image_bytes": 1_000_000})
    assert seen.requests == []
    assert seen.texts == ["⚠️ big.jpg is too large (1.5 MB); I can take images up to 1.0 MB."]
    assert fast_discord.cdn_requests == [], "refused on the size Discord reported"


async def test_discord_file_over_the_download_limit_gets_one_line_and_no_model_request(
    fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start
) -> None:
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "read this", attachments=[Upload(None, "huge.pdf", "application/pdf", size=30 * MB)]))
    assert seen.requests == []
    (line,) = seen.texts
    assert line.startswith("⚠️") and "huge.pdf" in line and "too large" in line
    assert fast_discord.cdn_requests == []


# ---- a model that cannot see ------------------------------------------------------------------


async def test_telegram_photo_to_a_blind_model_gets_the_vision_line(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start
) -> None:
    fake_llm.blind_models.add(DEFAULT_MODEL)
    seen = await on_telegram(parley, fast_telegram, fake_llm, lambda tg, chat, user: tg.user_sends_photo(
        chat, user, PHOTO, caption="what is this?"))
    assert len(seen.requests) == 1 and seen.requests[0].status == 400
    assert seen.texts == [NO_VISION_TEXT]


async def test_discord_image_to_a_blind_model_gets_the_vision_line(
    fast_discord: FakeDiscord, fake_llm: FakeLLM, parley: Start
) -> None:
    fake_llm.blind_models.add(DEFAULT_MODEL)
    seen = await on_discord(parley, fast_discord, fake_llm, lambda dc, dm, user: dc.user_says(
        dm, user, "what is this?", attachments=[Upload(PHOTO, "cat.jpg", "image/jpeg")]))
    assert len(seen.requests) == 1 and seen.requests[0].status == 400
    assert seen.texts == [NO_VISION_TEXT]


async def test_telegram_photo_over_the_image_limit_is_taken_at_a_smaller_size_telegram_offers(
    fast_telegram: FakeTelegram, fake_llm: FakeLLM, parley: Start
) -> None:
    """Telegram offers every photo in several sizes; with `media.max_image_bytes` below the
    largest, parley takes the largest size within the limit instead of refusing the photo."""
    smaller: list[bytes] = []

    def send(tg: FakeTelegram, chat: Any, user: Any) -> None:
        sent = tg.user_sends_photo(chat, user, None, size=8 * MB, caption="what is this?")  # 8 MB / 1 MB / 200 KB
        middle = tg.file(sent["photo"][1]["file_id"])
        middle.data = jpeg(middle.size)  # before parley has fetched the update
        smaller.append(middle.data)

    seen = await on_telegram(parley, fast_telegram, fake_llm, send, media={"max_image_bytes": 2 * MB})
    (request,) = seen.requests
    assert request.image_bytes() == smaller
    assert seen.texts == ["You said: what is this?"]
