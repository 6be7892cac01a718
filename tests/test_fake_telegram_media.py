"""The fake Telegram's media: what people send, getFile and file downloads, through real PTB.

The shapes are the Bot API's (PTB builds its objects with ``cls(**data)``, so a missing
required field would fail here), and the limits are Telegram's: 20 MB for a bot's
download, "file is too big" beyond it, "wrong file_id ..." for a file that is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import telegram
from telegram.error import BadRequest

from tests.fakes.telegram import FakeTelegram

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@contextlib.asynccontextmanager
async def _bot(fake: FakeTelegram) -> AsyncIterator[telegram.Bot]:
    bot = telegram.Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)
    await bot.initialize()
    try:
        yield bot
    finally:
        await bot.shutdown()


async def _updates(bot: telegram.Bot) -> tuple[telegram.Update, ...]:
    return await bot.get_updates(allowed_updates=["message", "edited_message"])


async def test_a_photo_with_caption_arrives_in_sizes_and_downloads_exactly(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    sent = fake.user_sends_photo(chat, chat.user, PNG, caption="what is this @parley_bot #cat")
    async with _bot(fake) as bot:
        (update,) = await _updates(bot)
        msg = update.message
        assert msg is not None and msg.text is None
        assert msg.caption == "what is this @parley_bot #cat"
        assert [e.type for e in msg.caption_entities] == ["mention", "hashtag"]
        assert len(msg.photo) == 3 and msg.photo[-1].width == 1280
        assert [p.file_size for p in msg.photo] == sorted(p.file_size for p in msg.photo)
        largest = msg.photo[-1]
        assert largest.file_size == len(PNG) and largest.file_id == sent["photo"][-1]["file_id"]
        file = await bot.get_file(largest.file_id)
        assert file.file_size == len(PNG)
        assert file.file_path == f"{fake.base_file_url}{fake.token}/{fake.file(largest.file_id).file_path}"
        assert file.file_path.endswith(".jpg") and "/photos/file_" in file.file_path
        assert bytes(await file.download_as_bytearray()) == PNG
    assert fake.file(largest.file_id).downloads == 1
    assert [c.method for c in fake.calls if c.method == "getFile"] == ["getFile"]


async def test_every_kind_of_media_parses_in_ptb(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    fake.user_sends_document(chat, chat.user, b"%PDF-1.7 ...", file_name="report.pdf", mime_type="application/pdf",
                             caption="/summarize this")
    fake.user_sends_voice(chat, chat.user, b"OggS voice", duration=4)
    fake.user_sends_audio(chat, chat.user, b"ID3 song", duration=200, title="Song", performer="Band")
    fake.user_sends_video_note(chat, chat.user, b"round", duration=7)
    fake.user_sends_video(chat, chat.user, b"mp4 video", duration=12, caption="look")
    fake.user_sends_animation(chat, chat.user, b"gif")
    fake.user_sends_sticker(chat, chat.user, emoji="😂")
    async with _bot(fake) as bot:
        doc, voice, audio, note, video, animation, sticker = [u.message for u in await _updates(bot)]
    assert doc.document.file_name == "report.pdf" and doc.document.mime_type == "application/pdf"
    assert doc.document.file_size == len(b"%PDF-1.7 ...")
    assert doc.caption == "/summarize this"
    assert [e.type for e in doc.caption_entities] == ["bot_command"], "Telegram marks commands in captions too"
    assert doc.entities == () and doc.text is None
    assert voice.voice.mime_type == "audio/ogg" and voice.voice.file_size == len(b"OggS voice")
    assert audio.audio.title == "Song" and audio.audio.mime_type == "audio/mpeg"
    assert note.video_note.length == 384 and note.caption is None
    assert video.video.mime_type == "video/mp4" and video.caption == "look"
    assert animation.animation is not None and animation.document is not None, "an animation carries document too"
    assert animation.animation.file_id == animation.document.file_id
    assert sticker.sticker.emoji == "😂" and sticker.sticker.is_animated is False
    for message, seconds in ((voice, 4), (audio, 200), (note, 7), (video, 12)):
        media = message.effective_attachment
        assert media._duration.total_seconds() == seconds  # noqa: SLF001 -- no deprecation warning


async def test_an_album_is_several_messages_sharing_one_media_group_id(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    fake.user_sends_album(chat, chat.user, [PNG, PNG[:500], PNG[:900]], caption="compare these")
    async with _bot(fake) as bot:
        updates = await _updates(bot)
        assert len(updates) == 3
        messages = [u.message for u in updates]
        assert len({m.media_group_id for m in messages}) == 1 and messages[0].media_group_id
        assert [m.caption for m in messages] == ["compare these", None, None]
        assert [m.photo[-1].file_size for m in messages] == [len(PNG), 500, 900]
        data = await (await bot.get_file(messages[1].photo[-1].file_id)).download_as_bytearray()
        assert bytes(data) == PNG[:500]


async def test_get_file_refuses_files_over_20_mb_with_telegrams_words(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    big = fake.user_sends_document(chat, chat.user, None, size=20 * 1024 * 1024 + 1, file_name="big.zip")
    edge = fake.user_sends_document(chat, chat.user, None, size=20 * 1024 * 1024, file_name="edge.zip")
    async with _bot(fake) as bot:
        with pytest.raises(BadRequest, match="(?i)^file is too big$"):
            await bot.get_file(big["document"]["file_id"])
        file = await bot.get_file(edge["document"]["file_id"])  # exactly 20 MB is allowed
        assert file.file_size == 20 * 1024 * 1024
    (refused,) = [c for c in fake.calls if c.method == "getFile" and c.status == 400]
    assert refused.description == "Bad Request: file is too big"
    assert fake.file(big["document"]["file_id"]).downloads == 0


async def test_unknown_malformed_and_expired_files_are_refused(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    sent = fake.user_sends_voice(chat, chat.user, b"OggS")
    file_id = sent["voice"]["file_id"]
    async with _bot(fake) as bot:
        file = await bot.get_file(file_id)
        url = file.file_path
        with pytest.raises(BadRequest, match="(?i)^invalid file_id$"):
            await bot.get_file("nope")
        with pytest.raises(BadRequest, match="(?i)^wrong file_id or the file is temporarily unavailable$"):
            await bot.get_file("AwACAgIAAxkBAAI" + "x" * 32)
        fake.expire_file(file_id)
        with pytest.raises(BadRequest, match="(?i)^wrong file_id or the file is temporarily unavailable$"):
            await bot.get_file(file_id)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 404
            assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
        wrong_token = url.replace(fake.token, "1:WRONG")
        async with session.get(wrong_token) as resp:
            assert resp.status == 404


async def test_filler_files_and_a_server_that_reports_less_than_it_sends(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    filler = fake.user_sends_document(chat, chat.user, None, size=300_000, file_name="zeros.bin")
    lying = fake.user_sends_document(chat, chat.user, b"y" * 5000, size=10, file_name="liar.txt")
    async with _bot(fake) as bot:
        data = await (await bot.get_file(filler["document"]["file_id"])).download_as_bytearray()
        assert bytes(data) == bytes(300_000)
        file = await bot.get_file(lying["document"]["file_id"])
        assert file.file_size == 10
        assert len(await file.download_as_bytearray()) == 5000


async def test_editing_a_caption_sends_an_edited_message(fake_telegram: FakeTelegram) -> None:
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    sent = fake.user_sends_photo(chat, chat.user, PNG, caption="frist")
    fake.user_edits(chat, sent["message_id"], "first @parley_bot")
    async with _bot(fake) as bot:
        original, edited = await _updates(bot)
    assert original.message.caption == "frist"
    assert edited.edited_message is not None and edited.message is None
    assert edited.edited_message.message_id == sent["message_id"]
    assert edited.edited_message.caption == "first @parley_bot" and edited.edited_message.photo
    assert edited.edited_message.edit_date is not None
    assert [e.type for e in edited.edited_message.caption_entities] == ["mention"]


async def test_media_sent_through_the_control_api(fake_telegram: FakeTelegram) -> None:
    import base64

    fake = fake_telegram
    async with aiohttp.ClientSession() as session:
        body = {"chat_id": 77, "user": 77, "kind": "photo", "data_b64": base64.b64encode(PNG).decode(), "caption": "hi"}
        async with session.post(f"{fake.url}/_fake/user_sends", json=body) as resp:
            assert resp.status == 200
            message = (await resp.json())["result"]
    assert message["caption"] == "hi" and fake.file(message["photo"][-1]["file_id"]).data == PNG


def test_captions_longer_than_telegram_allows_cannot_be_sent() -> None:
    fake = FakeTelegram()
    chat = fake.private_chat(fake.user(77, "Ann"))
    with pytest.raises(ValueError, match="1024"):
        fake.user_sends_photo(chat, chat.user, PNG, caption="x" * 1025)
