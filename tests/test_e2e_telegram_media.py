"""Telegram media, platform side: what parley receives for photos, albums, voice notes,
files and stickers, and how the connector downloads them -- the real App from a real
config, the real python-telegram-bot, the fake Bot API on 127.0.0.1.

What the model makes of the media is not tested here; these tests look at the
`Inbound`s the connector hands the gateway (`tests/support/recorder.py`) and at the bytes
`TelegramConnector.download` returns, the errors it raises, and the inbox's copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bots.inbound import from_json as inbound_from_json
from bots.media import Attachment, MediaTooLarge, MediaUnavailable
from bots.telegram import ALLOWED_UPDATES
from tests.fakes.telegram import FakeTelegram
from tests.support.recorder import Recorder
from tests.support.stack import OWNER_TG

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
MB = 1024 * 1024

Start = Callable[..., Awaitable[Any]]


async def started(parley: Start, fake: FakeTelegram, **kw: Any) -> tuple[Any, Recorder]:
    p = await parley(telegram=fake, **kw)
    return p, Recorder(p.app)


def connector(p: Any) -> Any:
    return p.gateway.connectors["telegram"]


async def test_a_photo_with_a_caption_is_one_image_attachment_and_the_caption_as_text(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    sent = fast_telegram.user_sends_photo(chat, owner, PNG, caption="what is in this picture?")
    (inbound,) = await seen.wait(1)
    assert inbound.text == "what is in this picture?" and inbound.command is None
    largest = sent["photo"][-1]
    assert inbound.attachments == (
        Attachment("image", largest["file_id"], mime="image/jpeg", size=len(PNG), unique_id=largest["file_unique_id"]),
    )
    assert inbound.media_group_id is None and inbound.edit_of is None
    assert await connector(p).download(inbound.attachments[0], max_bytes=MB, timeout=10) == PNG
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_the_largest_photo_size_within_the_limit_is_chosen(fast_telegram: FakeTelegram, parley: Start) -> None:
    from bots.telegram import message_attachments
    from telegram import Message

    fake = fast_telegram
    owner = fake.user(OWNER_TG, "Owner")
    chat = fake.private_chat(owner)
    sent = fake.user_sends_photo(chat, owner, None, size=8 * MB)  # sizes: 8 MB / 1 MB / 200 KB
    message = Message.de_json(sent, None)
    assert [a.ref for a in message_attachments(message)] == [sent["photo"][2]["file_id"]]
    assert [a.ref for a in message_attachments(message, max_photo_bytes=2 * MB)] == [sent["photo"][1]["file_id"]]
    assert [a.ref for a in message_attachments(message, max_photo_bytes=100)] == [sent["photo"][0]["file_id"]]


async def test_a_caption_that_starts_with_a_slash_is_no_command(fast_telegram: FakeTelegram, parley: Start) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_document(chat, owner, PDF, file_name="notes.pdf", mime_type="application/pdf",
                                      caption="/help me read this")
    (inbound,) = await seen.wait(1)
    assert inbound.command is None and inbound.text == "/help me read this"
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_an_album_of_three_is_three_messages_with_one_media_group_all_for_the_bot(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    group = fast_telegram.supergroup("Team")
    fast_telegram.user_sends_album(group, owner, [PNG, PNG[:1000], PNG[:2000]], caption="@parley_bot which is best?")
    fast_telegram.user_sends_album(group, owner, [PNG, PNG], caption="not for the bot")
    inbounds = await seen.wait(5)
    album, other = inbounds[:3], inbounds[3:]
    assert len({i.media_group_id for i in album}) == 1 and album[0].media_group_id is not None
    assert [i.text for i in album] == ["which is best?", "", ""]
    assert [i.attachments[0].size for i in album] == [len(PNG), 1000, 2000]
    assert all(i.attachments[0].kind == "image" for i in album)
    assert all(i.addressed for i in album), "every item of an album addressed to the bot is for the bot"
    assert not any(i.addressed for i in other)
    assert other[0].media_group_id != album[0].media_group_id
    data = [await connector(p).download(i.attachments[0], max_bytes=MB, timeout=10) for i in album]
    assert data == [PNG, PNG[:1000], PNG[:2000]]
    await p.gateway.settle(f"telegram:{group.id}")


async def test_voice_audio_and_video_notes_are_audio_with_their_duration(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_voice(chat, owner, b"OggS voice note", duration=4)
    fast_telegram.user_sends_audio(chat, owner, b"ID3 song", duration=185, file_name="song.mp3")
    fast_telegram.user_sends_video_note(chat, owner, b"round video", duration=9)
    voice, audio, note = [i.attachments[0] for i in await seen.wait(3)]
    assert (voice.kind, voice.mime, voice.duration, voice.size) == ("audio", "audio/ogg", 4.0, 15)
    assert (audio.kind, audio.mime, audio.duration, audio.name) == ("audio", "audio/mpeg", 185.0, "song.mp3")
    assert (note.kind, note.mime, note.duration, note.what) == ("audio", "video/mp4", 9.0, "video note")
    assert await connector(p).download(voice, max_bytes=MB, timeout=10) == b"OggS voice note"
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_files_by_type_pdf_image_archive_and_things_that_are_no_files(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_document(chat, owner, PDF, file_name="report.pdf", mime_type="application/pdf")
    fast_telegram.user_sends_document(chat, owner, PNG, file_name="scan.png", mime_type="image/png")
    fast_telegram.user_sends_document(chat, owner, b"PK\x03\x04", file_name="code.zip", mime_type=None)
    fast_telegram.user_sends_document(chat, owner, b"a,b\n1,2\n", file_name="data.csv", mime_type="text/csv")
    fast_telegram.user_sends_sticker(chat, owner)
    fast_telegram.user_sends_video(chat, owner, b"mp4")
    fast_telegram.user_sends_animation(chat, owner, b"gif")
    fast_telegram.push_update({"message": {
        "message_id": 900, "date": 1, "chat": chat.to_dict(), "from": owner.to_dict(),
        "location": {"latitude": 52.5, "longitude": 13.4},
    }})
    fast_telegram.push_update({"message": {  # a service message: nothing a person said
        "message_id": 901, "date": 1, "chat": chat.to_dict(), "from": owner.to_dict(), "delete_chat_photo": True,
    }})
    fast_telegram.user_says(chat, owner, "and now some text")
    inbounds = await seen.wait(9)
    pdf, image, archive, csv, sticker, video, animation, location, text = inbounds
    assert pdf.attachments == (Attachment("document", pdf.attachments[0].ref, mime="application/pdf", size=len(PDF),
                                          name="report.pdf", unique_id=pdf.attachments[0].unique_id),)
    assert (image.attachments[0].kind, image.attachments[0].mime) == ("image", "image/png")
    assert (archive.attachments[0].kind, archive.attachments[0].what) == ("other", "archive")
    assert (csv.attachments[0].kind, csv.attachments[0].mime) == ("document", "text/csv")
    assert (sticker.attachments[0].kind, sticker.attachments[0].what) == ("other", "sticker")
    assert sticker.attachments[0].mime == "image/webp" and sticker.text == ""
    assert (video.attachments[0].kind, video.attachments[0].what) == ("other", "video")
    assert (animation.attachments[0].kind, animation.attachments[0].what) == ("other", "animation")
    assert location.attachments == (Attachment("other", "", what="location"),)
    assert text.text == "and now some text" and text.attachments == ()
    with pytest.raises(MediaUnavailable, match="no file"):
        await connector(p).download(location.attachments[0], max_bytes=MB, timeout=5)
    assert await connector(p).download(pdf.attachments[0], max_bytes=MB, timeout=10) == PDF
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_a_file_over_telegrams_20_mb_is_too_large_by_getfiles_own_answer(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    sent = fast_telegram.user_sends_document(chat, owner, None, size=21 * MB, file_name="film.pdf")
    (inbound,) = await seen.wait(1)
    with pytest.raises(MediaTooLarge) as info:
        await connector(p).download(inbound.attachments[0], max_bytes=100 * MB, timeout=10)
    assert "20 MB" in str(info.value) and "Telegram" in str(info.value)
    assert [c.status for c in fast_telegram.calls_to("getFile")] == [400]
    assert fast_telegram.file(sent["document"]["file_id"]).downloads == 0
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_a_file_over_max_bytes_is_refused_before_anything_is_fetched(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    sent = fast_telegram.user_sends_photo(chat, owner, PNG)
    (inbound,) = await seen.wait(1)
    attachment = inbound.attachments[0]
    with pytest.raises(MediaTooLarge, match="parley accepts files up to"):
        await connector(p).download(attachment, max_bytes=1000, timeout=10)
    assert fast_telegram.calls_to("getFile") == [], "refused on the size the message gave"
    # Without a size in the message, getFile's file_size decides -- still before the download.
    with pytest.raises(MediaTooLarge):
        await connector(p).download(dataclasses.replace(attachment, size=None), max_bytes=1000, timeout=10)
    assert len(fast_telegram.calls_to("getFile")) == 1
    assert fast_telegram.file(sent["photo"][-1]["file_id"]).downloads == 0
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_a_server_sending_more_than_it_said_is_cut_off_while_reading(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_document(chat, owner, b"x" * 300_000, size=100, file_name="small.txt")
    (inbound,) = await seen.wait(1)
    with pytest.raises(MediaTooLarge):
        await connector(p).download(inbound.attachments[0], max_bytes=10_000, timeout=10)
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_gone_or_unknown_files_are_unavailable_and_no_message_shows_the_token(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    sent = fast_telegram.user_sends_voice(chat, owner, b"OggS")
    (inbound,) = await seen.wait(1)
    fast_telegram.expire_file(sent["voice"]["file_id"])
    errors = []
    unknown, malformed = Attachment("audio", "AwACAgIAAxkBAAI" + "q" * 32), Attachment("image", "x")
    for attachment in (inbound.attachments[0], unknown, malformed):
        with pytest.raises(MediaUnavailable) as info:
            await connector(p).download(attachment, max_bytes=MB, timeout=10)
        errors.append(str(info.value))
    assert errors[0] == errors[1] == "Telegram no longer has this file"
    secret = fast_telegram.token.split(":", 1)[1]
    assert not any(secret in e for e in errors)
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_downloads_retry_a_failure_once_and_give_up_at_their_time_limit(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_photo(chat, owner, PNG)
    (inbound,) = await seen.wait(1)
    # The photo's own turn fetches it too: let that finish before faults are injected.
    await p.gateway.settle(f"telegram:{chat.id}")
    before = len(fast_telegram.calls_to("getFile"))
    fast_telegram.inject("5xx", method="getFile", status=502, times=1)
    assert await connector(p).download(inbound.attachments[0], max_bytes=MB, timeout=10) == PNG
    assert [c.status for c in fast_telegram.calls_to("getFile")][before:] == [502, 200]
    fast_telegram.inject("timeout", method="getFile", hold=30)
    with pytest.raises(MediaUnavailable, match="within 0.5s"):
        await connector(p).download(inbound.attachments[0], max_bytes=MB, timeout=0.5)
    fast_telegram.clear_faults()
    await p.gateway.settle(f"telegram:{chat.id}")


async def test_after_a_restart_the_stored_message_still_downloads(
    fast_telegram: FakeTelegram, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    fast_telegram.user_sends_photo(chat, owner, PNG, caption="keep this")
    (received,) = await seen.wait(1)
    await p.gateway.settle(f"telegram:{chat.id}")
    rows = [await p.store.inbox_message(i) for i in range(1, 4)]
    (row,) = [r for r in rows if r is not None and r.update_id == received.update_id]
    await p.stop()

    again = await parley(telegram=fast_telegram)  # a new process: new connector, new PTB Bot
    stored = inbound_from_json(row.inbound)
    assert stored.attachments == received.attachments and stored.text == "keep this"
    assert await connector(again).download(stored.attachments[0], max_bytes=MB, timeout=10) == PNG


async def test_an_edited_message_arrives_with_edit_of_and_starts_no_turn(
    fast_telegram: FakeTelegram, fake_llm: Any, parley: Start
) -> None:
    p, seen = await started(parley, fast_telegram)
    owner = fast_telegram.user(OWNER_TG, "Owner")
    chat = fast_telegram.private_chat(owner)
    sent = fast_telegram.user_says(chat, owner, "helo")
    await fast_telegram.wait_for(lambda: fast_telegram.bot_texts(chat.id) == ["You said: helo"], timeout=10)
    await p.gateway.settle(f"telegram:{chat.id}")
    fast_telegram.user_edits(chat, sent["message_id"], "hello")
    original, edit = await seen.wait(2)
    assert (edit.edit_of, edit.message_id, edit.text) == (str(sent["message_id"]), str(sent["message_id"]), "hello")
    assert edit.update_id != original.update_id and original.edit_of is None
    await p.gateway.settle(f"telegram:{chat.id}")
    rows = [await p.store.inbox_message(i) for i in range(1, 4)]
    (row,) = [r for r in rows if r is not None and r.update_id == edit.update_id]
    assert row.status == "ignored"
    assert len(fake_llm.requests) == 1 and fast_telegram.bot_texts(chat.id) == ["You said: helo"]
    polls = fast_telegram.calls_to("getUpdates")
    assert polls and all(c.params.get("allowed_updates") == ALLOWED_UPDATES for c in polls)
    assert ALLOWED_UPDATES == ["message", "edited_message", "callback_query"]
