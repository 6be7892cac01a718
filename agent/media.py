"""Model input beyond text: image content parts, and audio turned into text.

A user message may be a string or a list of Chat Completions content parts; this module
builds those parts, so the gateway never spells provider JSON by hand, and `agent.provider`
converts them for the Responses API (`input_text` / `input_image`). Images travel as
`data:` URLs: a chat platform's file URL is either private (Telegram's carries the bot
token) or short-lived (Discord's CDN signs it), so the provider must get the bytes
themselves.

Voice notes become text through the provider's transcription endpoint
(`POST /audio/transcriptions`, Whisper-style multipart) -- by default through the very
client the turns use (same base_url, key, transport), or through a client of its own when
transcription lives elsewhere (`TranscriptionConfig.base_url`). Every failure is one typed
`TranscriptionFailed`, so the chat can say one clear line.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from .config import TRANSPORT_GRACE
from .errors import (
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    TranscriptionFailed,
)

__all__ = [
    "Transcriber",
    "TranscriptionConfig",
    "UserContent",
    "data_url",
    "has_images",
    "image_part",
    "text_part",
    "user_content",
]

log = logging.getLogger(__name__)

UserContent = str | list[dict[str, Any]]
"""What a user message carries: plain text, or Chat Completions content parts."""

IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})


def text_part(text: str) -> dict[str, Any]:
    """A Chat Completions text part."""
    return {"type": "text", "text": text}


def data_url(data: bytes, mime: str) -> str:
    """`data:<mime>;base64,<bytes>`: how an image reaches a provider that cannot fetch it."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(data: bytes, mime: str, *, detail: str = "auto") -> dict[str, Any]:
    """A Chat Completions image part carrying the bytes as a `data:` URL."""
    return {"type": "image_url", "image_url": {"url": data_url(data, mime), "detail": detail}}


def user_content(message: str | Sequence[Mapping[str, Any]]) -> UserContent:
    """A user message's content, checked: a string, or a list of typed content parts.

    Parts are copied (the caller may reuse its list) and must each be a mapping with a
    `type`; a malformed part is a programming error, raised here rather than as a
    provider's 400 in the middle of a conversation.
    """
    if isinstance(message, str):
        return message
    parts: list[dict[str, Any]] = []
    for part in message:
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise TypeError(f"a content part must be a mapping with a 'type', got {part!r:.80}")
        parts.append(dict(part))
    if not parts:
        raise ValueError("a user message needs at least one content part")
    return parts


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message carries an image part (decides how a 400 is read)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
                    return True
    return False


# ---------------------------------------------------------------------------
# Transcription


@dataclass(slots=True)
class TranscriptionConfig:
    """Where and how voice notes are transcribed.

    `base_url` None: the turns' own provider client (same endpoint, key and transport).
    Set it (and `api_key`) when transcription is served elsewhere, e.g. OpenAI's Whisper
    next to a local chat model. `timeout` bounds one transcription, SDK retries included.
    """

    model: str = "whisper-1"
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("TranscriptionConfig.model must not be empty")
        if self.timeout <= 0:
            raise ValueError("TranscriptionConfig.timeout must be > 0")
        if self.max_retries < 0:
            raise ValueError("TranscriptionConfig.max_retries must be >= 0")

    def __repr__(self) -> str:  # never print the API key
        return f"TranscriptionConfig(model={self.model!r}, base_url={self.base_url!r}, timeout={self.timeout})"


class Transcriber:
    """Turns audio bytes into text through an OpenAI-compatible transcription endpoint."""

    def __init__(self, cfg: TranscriptionConfig, *, client: openai.AsyncOpenAI | None = None, api_key: str = "") -> None:
        """`client`: share an existing client (the provider's); without one, a client of
        its own is built from `cfg.base_url`/`cfg.api_key` and closed by `aclose`.
        `api_key` is the key to scrub from error messages when sharing."""
        self.cfg = cfg
        self._owned = client is None
        if client is None:
            if cfg.base_url is None:
                raise ValueError("a Transcriber without a client needs TranscriptionConfig.base_url")
            client = openai.AsyncOpenAI(
                base_url=cfg.base_url, api_key=cfg.api_key or "no-key", max_retries=cfg.max_retries
            )
        self._client = client
        self._secret = cfg.api_key if self._owned and cfg.api_key else api_key
        connect = min(10.0, cfg.timeout)
        # A backstop behind parley's own clock, like the provider's (agent.config.Timeouts).
        self._http_timeout = openai.Timeout(cfg.timeout + TRANSPORT_GRACE, connect=connect)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.close()

    async def transcribe(self, audio: bytes, *, filename: str, mime: str | None = None) -> str:
        """The text spoken in `audio` (may be empty: silence); `TranscriptionFailed` otherwise.

        `filename` matters: Whisper-style servers tell the format by its extension
        (`voice.ogg`, `note.m4a`), so give one that names the real format.
        """
        from .provider import _calling, to_provider_error  # the request hook labels it; no import cycle

        file = (filename, audio, mime) if mime else (filename, audio)
        try:
            with _calling("transcription"):
                async with asyncio.timeout(self.cfg.timeout):
                    result = await self._client.audio.transcriptions.create(
                        model=self.cfg.model, file=file, timeout=self._http_timeout
                    )
        except TimeoutError as exc:
            raise TranscriptionFailed(
                f"transcription timed out after {self.cfg.timeout:g}s", reason="timeout", code="total_timeout"
            ) from exc
        except Exception as exc:
            error = to_provider_error(exc, self._secret)
            raise TranscriptionFailed(
                f"transcription failed: {error.message}",
                reason=_reason(error),
                status_code=error.status_code,
                code=error.code,
                provider_message=error.provider_message,
            ) from exc
        text = getattr(result, "text", result if isinstance(result, str) else None)
        if not isinstance(text, str):
            raise TranscriptionFailed(
                f"transcription answered without text ({type(result).__name__})", reason="bad_response"
            )
        return text.strip()


def _reason(error: ProviderError) -> str:
    if isinstance(error, ProviderTimeout):
        return "timeout"
    if isinstance(error, ProviderAuthError):
        return "auth"
    if isinstance(error, ProviderRateLimited):
        return "rate_limited"
    if isinstance(error, ProviderUnavailable):
        return "unavailable"
    if isinstance(error, ProviderBadRequest):
        return "rejected"
    return "bad_response"
