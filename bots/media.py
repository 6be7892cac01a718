"""Media people send: what a connector hands the gateway, and how parley fetches the bytes.

A photo, voice note or file arrives as an `Attachment` on the `Inbound`: a platform
reference (Telegram `file_id`, Discord attachment URL), never the bytes. The inbox stores
the message as JSON before it is acknowledged, so the reference must be enough to fetch
the file again after a restart. The bytes are fetched only when the turn runs, through
the connector's `MediaSource`, bounded in size and time.

This module is the contract between the connectors (which fill in attachments and fetch
bytes through their platform library) and the code that turns media into model input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Protocol

from bots.errors import ParleyError

MediaKind = Literal["image", "audio", "document", "other"]
"""image: a photo or image file; audio: a voice note, audio file or video note (its sound);
document: a file whose text may be readable; other: something parley cannot read
(sticker, video, archive...) -- `Attachment.what` names it for the reply."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file in a message, as a reference the platform can resolve again later."""

    kind: MediaKind
    ref: str  # Telegram: file_id; Discord: the attachment's CDN URL
    mime: str | None = None  # as the platform reports it (or guessed from the name)
    size: int | None = None  # bytes, when the platform says
    name: str | None = None  # the file name, when there is one
    what: str | None = None  # what it is, in words, for kind "other": "sticker", "video", "archive"
    duration: float | None = None  # seconds, for audio when the platform says
    unique_id: str | None = None  # a stable id across bots/refs (Telegram file_unique_id), for history


def attachment_to_json(attachment: Attachment) -> dict[str, Any]:
    """The attachment as JSON (the inbox stores every message before it is answered)."""
    return {k: v for k, v in asdict(attachment).items() if v is not None}


def attachment_from_json(data: Mapping[str, Any]) -> Attachment:
    """`attachment_to_json` reversed; unknown keys (from a newer parley) are ignored."""
    known = set(Attachment.__dataclass_fields__)
    return Attachment(**{k: v for k, v in data.items() if k in known})


class MediaError(ParleyError):
    """A file could not be fetched; the message is one short line a person can read."""


class MediaTooLarge(MediaError):
    """The file is larger than parley (or the platform's download API) accepts."""


class MediaUnavailable(MediaError):
    """The platform would not give the file (expired, deleted, network failure after retries)."""


class MediaSource(Protocol):
    """What a connector offers for fetching the bytes of an attachment it reported."""

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        """The file's bytes; `MediaTooLarge` beyond `max_bytes` (checked before and while
        reading), `MediaUnavailable` when the platform cannot deliver it within `timeout`."""
        ...
