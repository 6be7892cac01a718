"""Discord media, platform side: what parley receives for files, voice messages and
stickers, and how the connector downloads them -- the real App from a real config, the
real discord.py, the fake Discord (REST, Gateway and CDN) on 127.0.0.1.

What the model makes of the media is not tested here; these tests look at the
`Inbound`s the connector hands the gateway and at what `DiscordConnector.download`
returns or raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bots.inbound import from_json as inbound_from_json
from bots.inbound import to_json as inbound_to_json
from bots.media import Attachment, MediaTooLarge, MediaUnavailable
from tests.fakes.discord import FakeDiscord, Upload
from tests.support.recorder import Recorder
from tests.support.stack import OWNER_DC

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
MB = 1024 * 1024

Start = Callable[..., Awaitable[Any]]


async def started(parley: Start, fake: FakeDiscord) -> tuple[Any, Recorder, Any]:
    p = await parley(discord=fake)
    return p, Recorder(p.app), p.gateway.connectors["discord"]


async def test_an_image_with_text_is_one_image_attachment_with_the_text(
    fast_discord: FakeDiscord, parley: Start
) -> None:
    p, seen, connector = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    sent = fast_discord.user_says(dm, owner, "what is this?", attachments=[Upload(PNG, "cat.png", "image/png")])
    (inbound,) = await seen.wait(1)
    attachment = sent["attachments"][0]
    assert inbound.text == "what is this?"
    assert inbound.attachments == (
        Attachment("image", attachment["url"], mime="image/png", size=len(PNG), name="cat.png",
                   unique_id=attachment["id"]),
    )
    assert await connector.download(inbound.attachments[0], max_bytes=MB, timeout=10) == PNG
    await p.gateway.settle(f"discord:{dm.id}")


async def test_several_files_voice_messages_and_stickers(fast_discord: FakeDiscord, parley: Start) -> None:
    p, seen, connector = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    fast_discord.user_says(dm, owner, "three photos", attachments=[
        Upload(PNG, "a.png", "image/png"), Upload(PNG[:100], "b.jpg", "image/jpeg"), Upload(PNG[:200], "c.webp", None),
    ])
    fast_discord.user_sends_voice(dm, owner, b"OggS voice", duration=4.25)
    fast_discord.user_says(dm, owner, "", attachments=[
        Upload(PDF, "report.pdf", "application/pdf"), Upload(b"x,y\n", "data.csv", "text/csv; charset=utf-8"),
        Upload(b"PK", "code.zip", "application/zip"), Upload(b"mp4", "clip.mp4", "video/mp4"),
        Upload(b"ID3", "song.mp3", "audio/mpeg"),
    ])
    fast_discord.user_sends_sticker(dm, owner, "Wave")
    photos, voice, files, sticker = await seen.wait(4)
    assert [(a.kind, a.mime, a.size) for a in photos.attachments] == [
        ("image", "image/png", len(PNG)), ("image", "image/jpeg", 100), ("image", "image/webp", 200),
    ]
    (note,) = voice.attachments
    assert (note.kind, note.mime, note.duration, note.name, voice.text) == (
        "audio", "audio/ogg", 4.25, "voice-message.ogg", ""
    )
    assert [(a.kind, a.what, a.mime) for a in files.attachments] == [
        ("document", None, "application/pdf"), ("document", None, "text/csv"), ("other", "archive", "application/zip"),
        ("other", "video", "video/mp4"), ("audio", None, "audio/mpeg"),
    ]
    (item,) = sticker.attachments
    assert (item.kind, item.what) == ("other", "sticker") and item.ref.endswith(".png")
    downloaded = [await connector.download(a, max_bytes=MB, timeout=10) for a in photos.attachments]
    assert downloaded == [PNG, PNG[:100], PNG[:200]]
    assert await connector.download(note, max_bytes=MB, timeout=10) == b"OggS voice"
    assert await connector.download(files.attachments[0], max_bytes=MB, timeout=10) == PDF
    await p.gateway.settle(f"discord:{dm.id}")


async def test_a_file_over_max_bytes_is_refused_before_it_is_fetched_and_after_when_it_lied(
    fast_discord: FakeDiscord, parley: Start
) -> None:
    p, seen, connector = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    fast_discord.user_says(dm, owner, "", attachments=[
        Upload(None, "huge.pdf", "application/pdf", size=30 * MB), Upload(b"y" * 50_000, "liar.txt", "text/plain",
                                                                           size=10),
    ])
    (inbound,) = await seen.wait(1)
    huge, liar = inbound.attachments
    with pytest.raises(MediaTooLarge, match="30 MB; parley accepts files up to 25 MB"):
        await connector.download(huge, max_bytes=25 * MB, timeout=10)
    assert fast_discord.cdn_requests == [], "refused on the size Discord reported, nothing fetched"
    with pytest.raises(MediaTooLarge):
        await connector.download(liar, max_bytes=1000, timeout=10)
    await p.gateway.settle(f"discord:{dm.id}")


async def test_expired_or_deleted_files_are_unavailable(fast_discord: FakeDiscord, parley: Start) -> None:
    p, seen, connector = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    fast_discord.user_says(dm, owner, "one", attachments=[Upload(PNG, "a.png", "image/png")])
    second = fast_discord.user_says(dm, owner, "two", attachments=[Upload(PNG, "b.png", "image/png")])
    first, other = await seen.wait(2)
    fast_discord.expire_attachment(first.attachments[0].unique_id)
    fast_discord.user_deletes(dm, second["id"])
    for attachment in (first.attachments[0], other.attachments[0]):
        with pytest.raises(MediaUnavailable, match="no longer serves this file"):
            await connector.download(attachment, max_bytes=MB, timeout=10)
    with pytest.raises(MediaUnavailable, match="no file"):
        await connector.download(Attachment("other", "", what="poll"), max_bytes=MB, timeout=10)
    await p.gateway.settle(f"discord:{dm.id}")


async def test_a_cdn_failure_is_retried_once_and_a_stalled_one_times_out(
    fast_discord: FakeDiscord, parley: Start
) -> None:
    p, seen, connector = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    fast_discord.user_says(dm, owner, "", attachments=[Upload(PNG, "a.png", "image/png")])
    (inbound,) = await seen.wait(1)
    attachment = inbound.attachments[0]
    # The turn for this message downloads the image too: let it finish first, so the
    # failures armed below meet only this test's own downloads.
    await p.gateway.settle(f"discord:{dm.id}")
    fast_discord.cdn_requests.clear()
    fast_discord.fail_cdn(502, times=1)
    assert await connector.download(attachment, max_bytes=MB, timeout=10) == PNG
    assert [status for _, _, status in fast_discord.cdn_requests] == [502, 200]
    fast_discord.fail_cdn(503, times=2)
    with pytest.raises(MediaUnavailable, match="answered 503"):
        await connector.download(attachment, max_bytes=MB, timeout=10)
    fast_discord.cdn_latency = 30.0  # the CDN stalls
    with pytest.raises(MediaUnavailable, match="within 0.3s"):
        await connector.download(attachment, max_bytes=MB, timeout=0.3)
    fast_discord.release_cdn()
    await p.gateway.settle(f"discord:{dm.id}")


async def test_after_a_restart_the_stored_url_still_downloads_until_it_expires(
    fast_discord: FakeDiscord, parley: Start
) -> None:
    p, seen, _ = await started(parley, fast_discord)
    owner = fast_discord.user(OWNER_DC, "owner")
    dm = fast_discord.dm_channel(owner)
    fast_discord.user_says(dm, owner, "keep this", attachments=[Upload(PDF, "r.pdf", "application/pdf")])
    (received,) = await seen.wait(1)
    await p.gateway.settle(f"discord:{dm.id}")
    stored = inbound_from_json(inbound_to_json(received))
    await p.stop()

    again = await parley(discord=fast_discord)
    connector = again.gateway.connectors["discord"]
    assert stored.attachments == received.attachments
    assert await connector.download(stored.attachments[0], max_bytes=MB, timeout=10) == PDF
    fast_discord.expire_attachment(stored.attachments[0].unique_id)
    with pytest.raises(MediaUnavailable):
        await connector.download(dataclasses.replace(stored.attachments[0]), max_bytes=MB, timeout=10)
