"""Files for media tests: image bytes, real PDFs (written with pypdf), and a connector serving them.

`MediaConnector` implements parley's own `bots.media.MediaSource` protocol over an in-memory
dict (ref -> bytes), beside the in-memory Outbox: the platform side of downloads (PTB's
`get_file`, discord.py's `Attachment.read`) is tested against the fake Telegram and Discord;
these tests are about what parley does with the bytes once it has them.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os

from pypdf import PdfWriter
from pypdf.generic import ContentStream, DictionaryObject, NameObject

from bots.media import Attachment, MediaTooLarge, MediaUnavailable
from bots.pacing import Budget, Pacing, PacingPolicy
from tests.support.memory_outbox import MemoryOutbox

_refs = itertools.count(1)


def jpeg(size: int = 2048, seed: int = 0) -> bytes:
    """Bytes that start like a JPEG (SOI + APP0), then deterministic filler."""
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
    n = max(0, size - len(head) - 2)
    pattern = bytes((i * 31 + seed * 7) % 256 for i in range(256))
    filler = (pattern * (n // 256 + 1))[:n]
    return head + filler + b"\xff\xd9"


def png(size: int = 256) -> bytes:
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    return head + os.urandom(max(0, size - len(head)))


def pdf(*pages: str, password: str | None = None) -> bytes:
    """A real PDF with one line of text per page (Helvetica), optionally password-protected."""
    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        stream = ContentStream(None, writer)
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1"))
        page.replace_contents(stream)
    if password is not None:
        writer.encrypt(user_password=password, owner_password=None, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


class MediaConnector:
    """The gateway's Connector protocol over the in-memory Outbox, with files to download."""

    platform = "memory"
    drafts = False
    connected = True

    def __init__(self) -> None:
        self.outbox = MemoryOutbox(limit=4096)
        fast = Budget(rate=1000.0, burst=100)
        self.pacing = Pacing(PacingPolicy(private=fast, group=fast, platform=fast))
        self.files: dict[str, bytes] = {}
        self.downloads: list[tuple[str, int, float]] = []  # (ref, max_bytes, timeout) per call
        self.gate: asyncio.Event | None = None  # set: downloads wait for it
        self.waiting = asyncio.Event()  # a download is waiting at the gate

    def add(self, kind: str, data: bytes, *, name: str | None = None, mime: str | None = None,
            size: int | None = -1, what: str | None = None, duration: float | None = None) -> Attachment:
        """Serve `data` and return the attachment a connector would report for it."""
        ref = f"file-{next(_refs)}"
        self.files[ref] = data
        return Attachment(kind, ref, mime=mime, size=len(data) if size == -1 else size, name=name, what=what,
                          duration=duration)  # fmt: skip

    def texts(self) -> list[str]:
        return self.outbox.texts()

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        self.downloads.append((attachment.ref, max_bytes, timeout))
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        data = self.files.get(attachment.ref)
        if data is None:
            raise MediaUnavailable("The file is no longer available.")
        if len(data) > max_bytes:
            raise MediaTooLarge(f"The file is larger than {max_bytes} bytes.")
        return data

    async def start(self, gateway: object) -> None:
        pass

    async def stop_receiving(self) -> None:
        pass

    async def stop(self) -> None:
        pass
