"""The fake Discord's attachments and CDN, driven by the real discord.py.

A person's files arrive as attachment objects whose signed URLs point at the fake's own
CDN route; `Attachment.read()` (discord.py's `HTTPClient.get_from_cdn`) fetches them.
Expired, forged or deleted URLs answer 404, which discord.py raises as `NotFound`.
"""

from __future__ import annotations

import re

import aiohttp
import discord
import pytest

from tests.fakes.discord import CDN_GONE, FLAG_IS_VOICE_MESSAGE, FakeDiscord, Upload
from tests.fakes.discord_fixtures import running_client

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16


def recording_client(*, message_content: bool = True) -> tuple[discord.Client, list[discord.Message]]:
    intents = discord.Intents.default()
    intents.message_content = message_content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    seen: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    return client, seen


async def test_attachments_arrive_with_signed_cdn_urls_that_read_back_exactly(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client()
    async with running_client(fake, client):
        sent = fake.user_says(fake.default_channel, None, "two files", attachments=[
            Upload(PNG, "cat.png", "image/png", width=64, height=48),
            Upload(b"%PDF-1.7 fake", "report.pdf", "application/pdf"),
        ])
        await fake.wait_for(lambda: seen)
        (message,) = seen
        image, pdf = message.attachments
        assert (image.filename, image.content_type, image.size, image.width) == ("cat.png", "image/png", len(PNG), 64)
        assert (pdf.filename, pdf.content_type, pdf.size) == ("report.pdf", "application/pdf", 13)
        assert image.url.startswith(f"{fake.base_url}/attachments/{fake.default_channel.id}/{image.id}/cat.png?")
        assert re.search(r"\?ex=[0-9a-f]+&is=[0-9a-f]+&hm=[0-9a-f]{64}&$", image.url)
        assert image.proxy_url.startswith(f"{fake.base_url}/media/attachments/")
        assert await image.read() == PNG
        assert await image.read(use_cached=True) == PNG
        assert await client.http.get_from_cdn(pdf.url) == b"%PDF-1.7 fake"
        assert not image.is_voice_message()
    assert sent["attachments"][0]["id"] == str(image.id)
    assert [(aid, status) for _, aid, status in fake.cdn_requests] == [
        (str(image.id), 200), (str(image.id), 200), (str(pdf.id), 200)
    ]


async def test_a_voice_message_has_the_flag_duration_and_waveform(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client()
    async with running_client(fake, client):
        fake.user_sends_voice(fake.default_channel, None, b"OggS voice", duration=4.5)
        await fake.wait_for(lambda: seen)
        (message,) = seen
        (voice,) = message.attachments
        assert message.flags.voice and message.flags.value & FLAG_IS_VOICE_MESSAGE
        assert message.content == ""
        assert voice.is_voice_message() and voice.duration == 4.5 and voice.waveform
        assert (voice.filename, voice.content_type) == ("voice-message.ogg", "audio/ogg")
        assert await voice.read() == b"OggS voice"


async def test_stickers_arrive_as_sticker_items(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client()
    async with running_client(fake, client):
        fake.user_sends_sticker(fake.default_channel, None, "Wave")
        await fake.wait_for(lambda: seen)
        (sticker,) = seen[0].stickers
        assert sticker.name == "Wave" and sticker.format is discord.StickerFormatType.png
        assert seen[0].attachments == []


async def test_expired_forged_and_deleted_urls_answer_404(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client()
    async with running_client(fake, client):
        fake.user_says(fake.default_channel, None, "", attachments=[Upload(PNG, "a.png", "image/png")])
        fake.user_says(fake.default_channel, None, "", attachments=[Upload(PNG, "b.png", "image/png")])
        await fake.wait_for(lambda: len(seen) == 2)
        first, second = seen[0].attachments[0], seen[1].attachments[0]
        forged = re.sub(r"hm=[0-9a-f]+", "hm=" + "0" * 64, first.url)
        with pytest.raises(discord.NotFound):
            await client.http.get_from_cdn(forged)
        fake.expire_attachment(first.id)
        with pytest.raises(discord.NotFound):
            await first.read()
        fake.user_deletes(fake.default_channel, seen[1].id)
        with pytest.raises(discord.NotFound):
            await second.read()
    async with aiohttp.ClientSession() as session, session.get(first.url) as resp:
        assert resp.status == 404 and await resp.text() == CDN_GONE


async def test_without_message_content_attachments_are_stripped(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client(message_content=False)
    async with running_client(fake, client):
        fake.user_says(fake.default_channel, None, "hidden", attachments=[Upload(PNG, "a.png", "image/png")])
        dm = fake.dm_channel(fake.default_user)
        fake.user_says(dm, None, "in a DM", attachments=[Upload(PNG, "b.png", "image/png")])
        await fake.wait_for(lambda: len(seen) == 2)
    assert seen[0].attachments == [] and seen[0].content == ""
    assert [a.filename for a in seen[1].attachments] == ["b.png"]


async def test_filler_files_and_a_cdn_that_sends_more_than_the_size_said(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    client, seen = recording_client()
    async with running_client(fake, client):
        fake.user_says(fake.default_channel, None, "", attachments=[
            Upload(None, "zeros.bin", size=200_000), Upload(b"y" * 5000, "liar.txt", "text/plain", size=10),
        ])
        await fake.wait_for(lambda: seen)
        zeros, liar = seen[0].attachments
        assert await zeros.read() == bytes(200_000)
        assert liar.size == 10 and len(await liar.read()) == 5000
