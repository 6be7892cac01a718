"""From the files in a message to what the model reads: images, transcripts, document text.

A turn whose message carries attachments first runs `prepare`: every file is fetched
through the connector (`bots.media.MediaSource`, bounded in bytes and time, in memory --
nothing touches the disk), then

- an image (JPEG, PNG, GIF or WEBP, told by its bytes, not by what the platform claims)
  becomes a Chat Completions `image_url` part with a `data:` URL; up to `max_images` per
  message (an album is one message), the rest dropped with a note;
- a voice note or audio file is transcribed (`Agent.transcribe`) and answered as if the
  person had typed it; the reply opens with a short quote of what was heard;
- a document is read as text: UTF-8 (BOM-aware, invalid bytes replaced) for text and
  source code, `pypdf` for PDF; cut at `max_document_chars`, with a note to the model
  and to the person.

Anything that goes wrong -- a file too large, a download that fails, bytes that are no
image, a password-protected PDF, an empty or silent voice note, a file nobody can read --
is `MediaRefused`: one short line for the chat, and no turn (the whole message is refused,
so nothing is answered or stored half; the person fixes one thing and sends it again).

What history keeps is the stored user message built here: the typed text as `content`,
and each file as a reference (`bots.media.attachment_to_json`) plus what was derived from
it -- a `transcript`, a document's `text` -- never bytes or `data:` URLs. `bots.history`
renders that for the model again on later turns, an image as a short placeholder.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import TranscriptionFailed
from agent.media import UserContent, data_url
from bots import history as hist
from bots.media import Attachment, MediaError, MediaSource, MediaTooLarge, attachment_to_json

log = logging.getLogger(__name__)

CAN_READ = "I can read text, photos, voice notes and documents (PDF, text, code)"
IMAGES_OFF_TEXT = "🖼️ Reading images is turned off for this bot, so I can't look at photos. Please describe it in words."
NO_DOWNLOAD_TEXT = "⚠️ I can't receive files here. Please send your message as text."
TRANSCRIPTION_FAILED_TEXT = "⚠️ I couldn't transcribe that voice note. Please try again, or type your message."
EMPTY_AUDIO_TEXT = "🎤 That voice note is empty."
NO_SPEECH_TEXT = "🎤 I couldn't hear any words in that voice note."
TRANSCRIPT_QUOTE_CHARS = 80
DOWNLOAD_GRACE = 2.0
"""Seconds parley waits beyond `download_timeout` before giving up on a connector itself:
the connector's own clock should decide (it knows its platform); this is the backstop."""
PDF_MAX_PAGES = 300
"""Pages read from one PDF at most: extraction costs CPU, and the text limit is reached long before."""

_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_WHISPER_FORMATS = frozenset({"flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"})
_AUDIO_EXTENSIONS = {
    "audio/ogg": "ogg", "audio/opus": "ogg", "audio/x-opus+ogg": "ogg", "audio/oga": "oga",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mp4": "m4a", "audio/m4a": "m4a", "audio/x-m4a": "m4a",
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/webm": "webm", "audio/flac": "flac",
    "audio/x-flac": "flac", "video/mp4": "mp4", "video/webm": "webm", "video/mpeg": "mpeg",
}  # fmt: skip
_TEXT_EXTENSIONS = frozenset(
    "txt text md markdown rst csv tsv json jsonl ndjson yaml yml toml ini cfg conf env log xml html htm css scss "
    "js mjs cjs ts tsx jsx vue svelte py pyi rb go rs java kt kts scala c h cc cpp cxx hpp cs fs php pl lua r jl "
    "swift m sh bash zsh fish ps1 bat sql graphql proto tex bib diff patch dockerfile makefile gradle properties "
    "srt vtt ics tf hcl nix el clj ex exs erl hs ml dart zig".split()
)
_TEXT_MIMES = frozenset({
    "application/json", "application/xml", "application/x-yaml", "application/yaml", "application/javascript",
    "application/x-sh", "application/x-python", "application/sql", "application/toml", "application/x-ndjson",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class MediaOptions:
    """Config `media.*` as the gateway uses it (defaults: `bots.config.MediaSettings`)."""

    images: bool = True
    max_images: int = 4
    max_image_bytes: int = 10_000_000
    max_download_bytes: int = 20_000_000
    download_timeout: float = 30.0
    show_transcript: bool = True
    max_document_chars: int = 20_000
    replay_images: bool = False


class Transcribe(Protocol):
    """Audio bytes to text (`agent.Agent.transcribe`); raises `TranscriptionFailed`."""

    async def __call__(self, audio: bytes, *, filename: str, mime: str | None = None) -> str: ...


class MediaRefused(Exception):
    """A message whose files parley will not answer: `line` says why, in one short line.

    `reason` is for logs and metrics ("too_large", "unavailable", "not_an_image", ...).
    """

    def __init__(self, line: str, *, reason: str) -> None:
        super().__init__(line)
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PreparedInput:
    """A message ready for a turn.

    `content`: what the model reads now (text, or parts with `data:` URLs);
    `stored`: the user message history keeps (references and derived text, no bytes);
    `header`: lines the reply opens with (the transcript's quote, what was left out), or None.
    """

    content: UserContent
    stored: dict[str, Any]
    header: str | None = None
    images: int = 0


def text_input(text: str) -> PreparedInput:
    """A message without files: its text, stored as it is."""
    return PreparedInput(content=text, stored={"role": "user", "content": text})


@dataclass(slots=True)
class _Item:
    attachment: Attachment
    index: int
    limit: int
    data: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


async def prepare(
    text: str,
    attachments: Sequence[Attachment],
    *,
    source: MediaSource | None,
    transcribe: Transcribe,
    options: MediaOptions,
) -> PreparedInput:
    """Turn a message's text and files into model input; `MediaRefused` when it cannot be.

    Everything that can be refused without a download (a kind parley cannot read,
    images turned off, a size the platform reported over the limit) is, before anything
    is fetched. Files are then downloaded concurrently, and each is read in turn.
    """
    if not attachments:
        return text_input(text)
    items: list[_Item] = []
    dropped = 0
    images = 0
    for index, attachment in enumerate(attachments):
        _refuse_early(attachment, options)
        if attachment.kind == "image":
            images += 1
            if images > options.max_images:
                dropped += 1
                continue
        limit = options.max_image_bytes if attachment.kind == "image" else options.max_download_bytes
        items.append(_Item(attachment, index, limit))
    if source is None or not callable(getattr(source, "download", None)):
        raise MediaRefused(NO_DOWNLOAD_TEXT, reason="no_download")
    await _download_all(source, items, options)

    urls: dict[int, str] = {}
    header: list[str] = []
    for item in items:
        kind = item.attachment.kind
        if kind == "image":
            mime = sniff_image(item.data)
            if mime is None:
                raise MediaRefused(
                    f"⚠️ {_label(item.attachment)} doesn't look like a JPEG, PNG, GIF or WEBP image, so I can't read it.",
                    reason="not_an_image",
                )
            urls[item.index] = data_url(item.data, mime)
            item.extra = {"mime": mime, "size": len(item.data)}
        elif kind == "audio":
            transcript = await _transcribe(item, transcribe)
            item.extra = {"size": len(item.data), "transcript": transcript}
            if options.show_transcript:
                header.append(transcript_quote(transcript))
        else:
            body, truncated = await read_document(item.attachment, item.data, options.max_document_chars)
            item.extra = {"size": len(item.data), "text": body}
            if truncated:
                item.extra["truncated"] = True
                header.append(
                    f"📄 {_label(item.attachment)} is long: I read only its first {options.max_document_chars:,} characters."
                )
    if dropped:
        header.append(f"🖼️ I looked at the first {options.max_images} of your {images} images (my limit per message).")

    by_index = {item.index: item for item in items}
    stored_attachments: list[dict[str, Any]] = []
    for index, attachment in enumerate(attachments):
        entry = attachment_to_json(attachment)
        item = by_index.get(index)
        if item is None:
            entry["skipped"] = True  # over max_images: never shown to the model
        else:
            entry.update(item.extra)
        stored_attachments.append(entry)
    stored: dict[str, Any] = {"role": "user", "content": text, "attachments": stored_attachments}
    content = hist.user_content(stored, images=urls)
    return PreparedInput(content=content, stored=stored, header="\n".join(header) or None, images=len(urls))


def _refuse_early(attachment: Attachment, options: MediaOptions) -> None:
    """Refusals that need no download."""
    kind = attachment.kind
    if kind not in ("image", "audio", "document"):
        raise MediaRefused(f"📎 {CAN_READ}; I can't open {_what(attachment)}.", reason="unsupported")
    if kind == "image" and not options.images:
        raise MediaRefused(IMAGES_OFF_TEXT, reason="images_off")
    limit = options.max_image_bytes if kind == "image" else options.max_download_bytes
    if attachment.size is not None and attachment.size > limit:
        raise _too_large(attachment, limit, attachment.size)


async def _download_all(source: MediaSource, items: list[_Item], options: MediaOptions) -> None:
    """Fetch every file at once; the first failure cancels the rest and is what the chat hears."""
    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(_download(source, item, options.download_timeout))
    except* MediaRefused as refused:
        raise refused.exceptions[0] from None


async def _download(source: MediaSource, item: _Item, timeout: float) -> None:
    attachment = item.attachment
    try:
        async with asyncio.timeout(timeout + DOWNLOAD_GRACE):
            data = await source.download(attachment, max_bytes=item.limit, timeout=timeout)
    except MediaTooLarge as exc:
        log.info("attachment %s refused: %s", attachment.kind, exc)
        raise _too_large(attachment, item.limit, attachment.size) from None
    except (MediaError, TimeoutError) as exc:
        log.info("attachment %s could not be downloaded: %s", attachment.kind, exc or "timed out")
        raise MediaRefused(
            f"⚠️ I couldn't download {_label(attachment, start=False)}. Please send it again.", reason="unavailable"
        ) from None
    except Exception:
        log.exception("downloading an attachment failed unexpectedly")
        raise MediaRefused(
            f"⚠️ I couldn't download {_label(attachment, start=False)}. Please send it again.", reason="unavailable"
        ) from None
    if len(data) > item.limit:  # the connector's promise, checked: the limit bounds memory and cost
        raise _too_large(attachment, item.limit, len(data))
    item.data = bytes(data)


def _too_large(attachment: Attachment, limit: int, size: int | None) -> MediaRefused:
    what = {"image": "images", "audio": "voice notes"}.get(attachment.kind, "files")
    actual = f" ({hist.human_size(size)})" if size else ""
    return MediaRefused(
        f"⚠️ {_label(attachment)} is too large{actual}; I can take {what} up to {hist.human_size(limit)}.",
        reason="too_large",
    )


async def _transcribe(item: _Item, transcribe: Transcribe) -> str:
    attachment = item.attachment
    if not item.data:
        raise MediaRefused(EMPTY_AUDIO_TEXT, reason="empty_audio")
    try:
        text = await transcribe(item.data, filename=audio_filename(attachment), mime=attachment.mime)
    except TranscriptionFailed as exc:
        log.warning("transcription failed (%s): %s", exc.reason, exc)
        if exc.reason == "rejected" and exc.code == "audio_too_short":
            raise MediaRefused(NO_SPEECH_TEXT, reason="no_speech") from None
        raise MediaRefused(TRANSCRIPTION_FAILED_TEXT, reason="transcription_failed") from None
    if not text.strip():
        raise MediaRefused(NO_SPEECH_TEXT, reason="no_speech")
    return text.strip()


# ---- images ------------------------------------------------------------------------------


def sniff_image(data: bytes) -> str | None:
    """The image type the bytes really are (JPEG, PNG, GIF, WEBP -- what vision models take), or None.

    Platforms label files by name or by what the sender's app claimed; a provider
    rejects bytes that are not the image they say they are with an opaque 400, so the
    bytes are checked here, before any model is called.
    """
    for signature, mime in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            if mime == "image/png" and data[12:16] != b"IHDR":
                return None  # a PNG signature with no header chunk after it: cut off or forged
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and data[12:15] == b"VP8":
        return "image/webp"
    return None


async def image_url(source: MediaSource, attachment: Attachment, options: MediaOptions) -> str | None:
    """An earlier image fetched again for `media.replay_images`; None when that fails (then a placeholder)."""
    try:
        async with asyncio.timeout(options.download_timeout + DOWNLOAD_GRACE):
            data = await source.download(attachment, max_bytes=options.max_image_bytes, timeout=options.download_timeout)
    except Exception as exc:  # an old file may be gone: the placeholder says enough
        log.info("an earlier image could not be fetched again (%s)", type(exc).__name__)
        return None
    mime = sniff_image(data) if len(data) <= options.max_image_bytes else None
    return data_url(data, mime) if mime else None


# ---- audio -------------------------------------------------------------------------------


def audio_filename(attachment: Attachment) -> str:
    """A file name whose extension names the audio format (Whisper-style servers go by it).

    Telegram voice notes have no name at all (OGG/Opus); Discord's are `voice-message.ogg`.
    """
    name = attachment.name or ""
    stem, dot, extension = name.rpartition(".")
    if dot and extension.lower() in _WHISPER_FORMATS:
        return name
    mapped = _AUDIO_EXTENSIONS.get((attachment.mime or "").split(";")[0].strip().lower())
    if mapped:
        return f"{stem or name or 'voice'}.{mapped}"
    return name or "voice.ogg"


def transcript_quote(transcript: str) -> str:
    """The reply's first line for a voice note: what was heard, quoted, at most 80 characters."""
    lines = transcript.strip().splitlines()
    first = lines[0].strip() if lines else ""
    cut = len(first) > TRANSCRIPT_QUOTE_CHARS or len(lines) > 1
    if len(first) > TRANSCRIPT_QUOTE_CHARS:
        first = first[:TRANSCRIPT_QUOTE_CHARS].rstrip()
    return f"🎤 “{escape_markdown(first)}{'…' if cut else ''}”"


_MARKDOWN_SPECIAL = frozenset("\\`*_~|[]<>#")


def escape_markdown(text: str) -> str:
    """Text that renders as itself in the reply's Markdown (what someone said is not markup)."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in text)


# ---- documents ---------------------------------------------------------------------------


async def read_document(attachment: Attachment, data: bytes, limit: int) -> tuple[str, bool]:
    """A document's text, cut at `limit` characters, and whether it was cut.

    PDF (by its bytes) through `pypdf`, in a worker thread (it is CPU work); anything that
    decodes as text -- by name, type or content -- as text. Other files are refused.
    """
    if b"%PDF-" in data[:1024]:
        return await asyncio.to_thread(pdf_text, attachment, data, limit)
    text = decode_text(data) if _looks_textual(attachment, data) else None
    if text is None:
        raise MediaRefused(f"📎 {CAN_READ}; I can't open {_label(attachment, start=False)}.", reason="unsupported")
    if not text.strip():
        raise MediaRefused(f"📄 {_label(attachment)} is empty.", reason="empty_document")
    return (text[:limit], True) if len(text) > limit else (text, False)


def _looks_textual(attachment: Attachment, data: bytes) -> bool:
    mime = (attachment.mime or "").split(";")[0].strip().lower()
    extension = (attachment.name or "").rpartition(".")[2].lower()
    if mime.startswith("text/") or mime in _TEXT_MIMES or mime.endswith(("+json", "+xml")):
        return True
    if extension in _TEXT_EXTENSIONS or (attachment.name or "").lower() in _TEXT_EXTENSIONS:
        return True
    return decode_text(data[:8192], sample=True) is not None  # unknown type: text if it reads as text


def decode_text(data: bytes, *, sample: bool = False) -> str | None:
    """Bytes as text: a BOM decides UTF-8/UTF-16, else UTF-8 with invalid bytes replaced.

    None when the bytes are binary (a NUL byte in the first 8 KB without a UTF-16 BOM, or
    more than 5% undecodable): replacing those would hand the model noise. `sample`: the
    bytes may end mid-character (a prefix of the file).
    """
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", "replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", "replace")
    if b"\0" in data[:8192]:
        return None
    text = data.decode("utf-8", "replace")
    if sample:
        text = text[:-3]  # a character cut at the end of the sample is no evidence
    bad = text.count("\ufffd")
    if bad and bad * 20 > len(text):
        return None
    return text


def pdf_text(attachment: Attachment, data: bytes, limit: int) -> tuple[str, bool]:
    """The text of a PDF (`pypdf`), at most `limit` characters; `MediaRefused` when it has none to give.

    A PDF with only an owner password (copy/print restrictions) opens with the empty
    user password, as every viewer does; one that needs a password to open is refused.
    """
    from pypdf import PdfReader

    label = _label(attachment)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception:  # an encryption pypdf cannot undo without an optional library
                opened = 0
            if not opened:
                raise MediaRefused(
                    f"🔒 {label} is password-protected, so I can't read it. Please send a copy without the password.",
                    reason="encrypted_pdf",
                )
        pieces: list[str] = []
        length = 0
        truncated = False
        for number, page in enumerate(reader.pages):
            if number >= PDF_MAX_PAGES or length > limit:
                truncated = True
                break
            text = (page.extract_text() or "").strip()
            if text:
                pieces.append(text)
                length += len(text) + 2
    except MediaRefused:
        raise
    except Exception as exc:  # pypdf raises many kinds on a damaged file; all mean the same here
        log.info("a PDF could not be read: %s: %s", type(exc).__name__, exc)
        raise MediaRefused(f"⚠️ I couldn't read {_label(attachment, start=False)}: the PDF seems damaged.",
                           reason="damaged_pdf") from None
    text = "\n\n".join(pieces)
    if not text.strip():
        raise MediaRefused(
            f"📄 {label} has no text I can read (a scanned PDF?). Please send its pages as photos.", reason="pdf_no_text"
        )
    if len(text) > limit:
        return text[:limit], True
    return text, truncated


# ---- words -------------------------------------------------------------------------------


def _label(attachment: Attachment, *, start: bool = True) -> str:
    """How a line names a file: its name when it has one, else what it is."""
    if attachment.name:
        return attachment.name
    word = {"image": "image", "audio": "voice note", "document": "file"}.get(attachment.kind, "file")
    return f"{'That' if start else 'that'} {word}"


def _what(attachment: Attachment) -> str:
    if attachment.what:
        what = attachment.what.strip()
        return what if what.endswith("s") else f"{what}s"
    return attachment.name or "this kind of file"


def stored_images(message: Mapping[str, Any]) -> list[tuple[int, Attachment]]:
    """(attachment index, attachment) of the images a stored user message showed the model."""
    from bots.media import attachment_from_json

    found = []
    for index, entry in enumerate(message.get("attachments") or ()):
        if isinstance(entry, Mapping) and entry.get("kind") == "image" and not entry.get("skipped"):
            found.append((index, attachment_from_json(entry)))
    return found
