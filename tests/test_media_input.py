"""Reading files into model input (`bots.media_input`) and rendering them from history (`bots.history`).

Pure pieces -- sniffing, decoding, naming, quoting, rendering -- and `prepare` itself over
an in-memory `MediaSource` and a transcriber function; the gateway tests drive the same
code through a real turn.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import pytest

from bots import history as hist
from bots.media import Attachment
from bots.media_input import (
    CAN_READ,
    MediaOptions,
    MediaRefused,
    audio_filename,
    decode_text,
    prepare,
    sniff_image,
    transcript_quote,
)
from tests.support.media import MediaConnector, jpeg, pdf, png


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (jpeg(100), "image/jpeg"),
        (png(100), "image/png"),
        (b"GIF89a" + bytes(20), "image/gif"),
        (b"GIF87a" + bytes(20), "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(20), "image/webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(20), None),  # RIFF, but sound
        (b"\x89PNG\r\n\x1a\n", None),  # a PNG signature and nothing after it
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"", None),
    ],
)
def test_images_are_told_by_their_bytes(data: bytes, mime: str | None) -> None:
    assert sniff_image(data) == mime


def test_text_is_decoded_by_bom_or_as_utf8_and_binary_is_refused() -> None:
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text(codecs.BOM_UTF8 + "bom".encode()) == "bom"
    assert decode_text(codecs.BOM_UTF16_LE + "wide".encode("utf-16-le")) == "wide"
    assert decode_text(b"caf\xe9 au lait, s'il vous pla\xeet, with enough text around it") is not None
    assert decode_text(b"PK\x03\x04\x00\x00") is None  # a NUL: binary
    assert decode_text(bytes(range(128, 256)) * 4) is None  # mostly undecodable


@pytest.mark.parametrize(
    ("attachment", "name"),
    [
        (Attachment("audio", "r", mime="audio/ogg"), "voice.ogg"),  # a Telegram voice note has no name
        (Attachment("audio", "r", mime="audio/ogg", name="voice-message.ogg"), "voice-message.ogg"),
        (Attachment("audio", "r", mime="audio/mpeg", name="song"), "song.mp3"),
        (Attachment("audio", "r", mime="audio/x-m4a", name="memo.caf"), "memo.m4a"),
        (Attachment("audio", "r", mime="video/mp4"), "voice.mp4"),  # a video note's sound
        (Attachment("audio", "r", mime="audio/x-unknown", name="take.xyz"), "take.xyz"),
    ],
)
def test_audio_gets_a_file_name_that_names_its_format(attachment: Attachment, name: str) -> None:
    assert audio_filename(attachment) == name


def test_the_transcript_quote_is_one_short_escaped_line() -> None:
    assert transcript_quote("Hi there") == "🎤 “Hi there”"
    assert transcript_quote("first line\nsecond line") == "🎤 “first line…”"
    assert transcript_quote("x" * 100) == f"🎤 “{'x' * 80}…”"
    assert transcript_quote("use *stars* and _under_ [link](x)") == "🎤 “use \\*stars\\* and \\_under\\_ \\[link\\](x)”"


# ---- history -----------------------------------------------------------------------------


STORED = {
    "role": "user",
    "content": "what about these?",
    "attachments": [
        {"kind": "image", "ref": "a", "mime": "image/jpeg", "size": 1_234_567, "name": "photo.jpg"},
        {"kind": "audio", "ref": "b", "mime": "audio/ogg", "size": 3000, "transcript": "and the noise"},
        {"kind": "document", "ref": "c", "name": "notes.txt", "size": 12, "text": "hello notes"},
        {"kind": "image", "ref": "d", "mime": "image/png", "size": 900},
        {"kind": "image", "ref": "e", "skipped": True},
    ],
}


def test_a_stored_message_renders_placeholders_transcripts_and_documents() -> None:
    assert hist.user_content(STORED) == (
        "what about these?\n\n[image: photo.jpg, 1.2 MB]\n\nand the noise\n\n"
        "[file: notes.txt]\nhello notes\n[end of file]\n\n[image: 900 bytes]\n\n[1 more image attached but not shown]"
    )


def test_images_at_hand_become_parts_after_the_text() -> None:
    content = hist.user_content(STORED, images={3: "data:image/png;base64,AAAA"})
    assert isinstance(content, list)
    assert content[0]["type"] == "text" and "[image: photo.jpg, 1.2 MB]" in content[0]["text"]
    assert content[1:] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}}]


def test_a_cut_document_says_so_to_the_model() -> None:
    block = hist.document_block({"name": "big.csv", "text": "a,b\n1,2", "truncated": True})
    assert block == "[file: big.csv]\na,b\n1,2\n[end of file: cut after 7 characters; the rest was not included]"


@pytest.mark.parametrize("status", ["ok", "interrupted", "error", "running"])
def test_no_turn_sends_the_stored_attachments_key_to_a_provider(status: str) -> None:
    turn = [STORED, {"role": "assistant", "content": "partial"}]
    rendered = hist.turn_for_model(turn, status)
    assert all("attachments" not in m for m in rendered)
    assert rendered[0]["content"].startswith("what about these?\n\n[image: photo.jpg")
    replayed = hist.turn_for_model(turn, status, {0: {0: "data:image/jpeg;base64,BBBB"}})
    assert replayed[0]["content"][-1]["image_url"]["url"] == "data:image/jpeg;base64,BBBB"


def test_sizes_read_like_people_write_them() -> None:
    assert [hist.human_size(n) for n in (512, 340_000, 1_234_567)] == ["512 bytes", "340 KB", "1.2 MB"]


# ---- prepare -----------------------------------------------------------------------------


class Transcriber:
    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls: list[tuple[bytes, str, str | None]] = []

    async def __call__(self, audio: bytes, *, filename: str, mime: str | None = None) -> str:
        self.calls.append((audio, filename, mime))
        return self.texts.pop(0)


async def test_a_message_with_every_kind_is_read_in_order_and_stored_without_bytes() -> None:
    source = MediaConnector()
    photo = jpeg(3000)
    files = [
        source.add("image", photo, mime="image/jpeg"),
        source.add("audio", b"OggS-voice", mime="audio/ogg"),
        source.add("document", pdf("Page one text."), name="a.pdf", mime="application/pdf"),
        source.add("document", b'{"k": 1}', name="data.json", mime="application/json"),
    ]
    transcriber = Transcriber("spoken words")
    prepared = await prepare("look", files, source=source, transcribe=transcriber, options=MediaOptions())

    assert prepared.images == 1
    assert prepared.header == "🎤 “spoken words”"
    assert transcriber.calls == [(b"OggS-voice", "voice.ogg", "audio/ogg")]
    text, image = prepared.content
    assert text["text"] == (
        "look\n\nspoken words\n\n[file: a.pdf]\nPage one text.\n[end of file]\n\n[file: data.json]\n{\"k\": 1}\n[end of file]"
    )
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    stored = json.dumps(prepared.stored)
    assert "base64" not in stored and "data:" not in stored
    assert [a["ref"] for a in prepared.stored["attachments"]] == [f.ref for f in files]
    assert hist.user_content(prepared.stored, images={0: image["image_url"]["url"]}) == prepared.content


async def test_what_cannot_be_read_is_refused_before_anything_is_downloaded() -> None:
    source = MediaConnector()
    files = [source.add("image", jpeg(), mime="image/jpeg"), source.add("other", b"x", what="video")]
    with pytest.raises(MediaRefused) as refused:
        await prepare("", files, source=source, transcribe=Transcriber(), options=MediaOptions())
    assert refused.value.line == f"📎 {CAN_READ}; I can't open videos."
    assert source.downloads == []


async def test_downloads_are_bounded_by_the_configured_bytes_and_time() -> None:
    source = MediaConnector()
    files = [source.add("image", jpeg(), mime="image/jpeg"), source.add("document", b"text", name="t.txt")]
    options = MediaOptions(max_image_bytes=5000, max_download_bytes=7000, download_timeout=3.5)
    await prepare("", files, source=source, transcribe=Transcriber(), options=options)
    assert sorted(source.downloads) == sorted([(files[0].ref, 5000, 3.5), (files[1].ref, 7000, 3.5)])


async def test_a_connector_that_cannot_download_gets_one_line() -> None:
    files = [Attachment("image", "x", mime="image/jpeg")]
    with pytest.raises(MediaRefused) as refused:
        await prepare("", files, source=None, transcribe=Transcriber(), options=MediaOptions())
    assert refused.value.reason == "no_download"


async def test_a_pdf_without_text_asks_for_photos() -> None:
    source = MediaConnector()
    files = [source.add("document", pdf(""), name="scan.pdf", mime="application/pdf")]
    with pytest.raises(MediaRefused) as refused:
        await prepare("", files, source=source, transcribe=Transcriber(), options=MediaOptions())
    assert refused.value.line == "📄 scan.pdf has no text I can read (a scanned PDF?). Please send its pages as photos."


async def test_a_long_pdf_is_cut_at_the_limit() -> None:
    source = MediaConnector()
    pages = [f"Page {n} " + "words " * 30 for n in range(20)]
    files = [source.add("document", pdf(*pages), name="long.pdf", mime="application/pdf")]
    prepared = await prepare("", files, source=source, transcribe=Transcriber(), options=MediaOptions(max_document_chars=500))
    stored: dict[str, Any] = prepared.stored["attachments"][0]
    assert stored["truncated"] is True and len(stored["text"]) == 500
    assert prepared.header == "📄 long.pdf is long: I read only its first 500 characters."
