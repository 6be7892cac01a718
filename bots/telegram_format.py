"""Markdown to Telegram text + entities (via telegramify-markdown).

Telegram formatting is sent as `entities` (offsets in UTF-16 code units), never as
hand-escaped MarkdownV2: entities cannot fail on a stray `.` or an unclosed `*` the way
MarkdownV2 parsing does, and telegramify-markdown is a maintained CommonMark-based
converter that produces exactly that shape. Headings render as bold, underlined text
without telegramify's decorative emoji, so a reply reads like the model wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import telegramify_markdown
from telegramify_markdown.config import RenderConfig

from bots.render import text_length


@dataclass(frozen=True, slots=True)
class Entity:
    type: str
    offset: int
    length: int
    url: str | None = None
    language: str | None = None
    custom_emoji_id: str | None = None


@lru_cache(maxsize=1)
def _config() -> RenderConfig:
    config = RenderConfig.isolated()
    symbols = config.markdown_symbol
    for level in range(1, 7):
        setattr(symbols, f"heading_level_{level}", "")
    return config


@lru_cache(maxsize=256)
def render(markdown: str) -> tuple[str, tuple[Entity, ...]]:
    """Telegram (text, entities) for Markdown; cached because layout measures repeatedly."""
    text, entities = telegramify_markdown.convert(markdown, latex_escape=False, config=_config())
    return text, tuple(
        Entity(e.type, e.offset, e.length, e.url, e.language, e.custom_emoji_id) for e in entities
    )


def rendered_length(markdown: str) -> int:
    """What Telegram counts against its 4096 limit for this Markdown (UTF-16 units)."""
    return text_length(render(markdown)[0], utf16=True)


def plain(markdown: str) -> str:
    """Readable text without markup, for when Telegram rejects the entities."""
    return render(markdown)[0]
