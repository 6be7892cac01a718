"""Cutting a reply into messages that fit the platform, without ever truncating it.

A reply is one growing document. `Layout` cuts it into pieces, each of which fits one
platform message: at a paragraph break if it can, else a line break, a sentence end, a
word gap, and only as a last resort mid-word. A cut inside a fenced code block closes the
fence in the first piece and reopens it, with its language, in the next.

Pieces that have been cut off are *committed*: while the document keeps growing they
never move again, so the message being edited stays the same one (moving the edit target
every tick is how other gateways built infinite duplication loops). If an earlier part of
the document changes (tool output hides pre-tool text, a fallback replaces a preview),
the committed pieces that no longer match are dropped and laid out anew.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Measure = Callable[[str], int]

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"')\]]*\s")


def text_length(text: str, *, utf16: bool) -> int:
    """Length as a platform counts it: UTF-16 code units (Telegram) or code points."""
    if not utf16 or text.isascii():
        return len(text)
    return len(text.encode("utf-16-le")) // 2


def open_fence(text: str) -> tuple[str, str] | None:
    """The fence (marker, info string) still open at the end of `text`, if any."""
    current: tuple[str, str] | None = None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if not m:
            continue
        marker, info = m.group(1), m.group(2).strip()
        if current is None:
            if marker[0] == "`" and "`" in info:
                continue  # an inline code span, not a fence
            current = (marker, info)
        elif marker[0] == current[0][0] and len(marker) >= len(current[0]) and not info:
            current = None
    return current


def best_cut(text: str, max_chars: int) -> int:
    """Where to cut `text` so the first part has at most `max_chars` characters.

    Prefers, in order: a blank line, a line break, a sentence end, a space -- each only if
    it keeps the piece at least half full, so a stray early newline cannot produce a
    sliver of a message. The cut lands *after* the separator.
    """
    if len(text) <= max_chars:
        return len(text)
    window = text[:max_chars]
    floor = max_chars // 2
    pos = window.rfind("\n\n")
    if pos >= floor:
        return pos + 2
    pos = window.rfind("\n")
    if pos >= floor:
        return pos + 1
    best = -1
    for m in _SENTENCE_END.finditer(window):
        best = m.end()
    if best >= floor:
        return best
    pos = max(window.rfind(" "), window.rfind("\t"))
    if pos >= max_chars // 3:
        return pos + 1
    return max(1, max_chars)


def _fit_chars(text: str, limit: int, measure: Measure) -> int:
    """How many leading characters of `text` fit in `limit` (measure is monotone in length)."""
    if measure(text) <= limit:
        return len(text)
    lo, hi = 0, min(len(text), max(limit, 0))
    # measure(text[:k]) >= k for both counting schemes, so the answer is at most `limit`.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class Piece:
    """One message's worth of the document."""

    start: int  # span of the document this piece shows
    end: int
    text: str  # what the message shows, fence repairs included
    committed: bool  # cut off: will not change while the document grows
    reopen: str = ""  # fence opener the next piece starts with


class Layout:
    """Lays a document out over messages of at most `limit` (platform-measured)."""

    def __init__(self, limit: int, measure_plain: Measure, measure_final: Measure) -> None:
        self.limit = limit
        self._plain = measure_plain
        self._final = measure_final
        self._committed: list[tuple[Piece, str]] = []  # piece, source slice it was cut from

    def shrink(self) -> None:
        """The platform said a piece was too long after all: leave more headroom from now on."""
        self.limit = max(64, int(self.limit * 0.9))

    def uncommit(self, index: int) -> None:
        """Forget committed pieces from `index` on, so they are cut again."""
        del self._committed[index:]

    def pieces(self, doc: str, *, final: bool) -> list[Piece]:
        """All pieces of `doc`: the committed ones, then the live tail (if it has content)."""
        kept: list[Piece] = []
        pos, reopen = 0, ""
        for i, (piece, source) in enumerate(self._committed):
            if piece.start != pos or doc[piece.start : piece.end] != source:
                del self._committed[i:]
                break
            kept.append(piece)
            pos, reopen = piece.end, piece.reopen
        while True:
            rest = doc[pos:]
            if not rest.strip():
                return kept
            text = reopen + rest
            if self._fits(text, final):
                kept.append(Piece(pos, len(doc), text, committed=False))
                return kept
            piece = self._cut(pos, reopen, rest)
            self._committed.append((piece, doc[piece.start : piece.end]))
            kept.append(piece)
            pos, reopen = piece.end, piece.reopen

    def _fits(self, text: str, final: bool) -> bool:
        if self._plain(text) > self.limit:
            return False
        return not final or self._final(text) <= self.limit

    def _cut(self, pos: int, reopen: str, rest: str) -> Piece:
        budget = self.limit - self._plain(reopen) - 8  # room for a closing fence
        while True:
            chars = best_cut(rest, max(1, _fit_chars(rest, max(1, budget), self._plain)))
            body = reopen + rest[:chars]
            fence = open_fence(body)
            text, next_open = body, ""
            if fence is not None:
                marker, info = fence
                text = body + ("" if body.endswith("\n") else "\n") + marker
                next_open = f"{marker}{info}\n"
            overshoot = max(self._plain(text), self._final(text)) - self.limit
            if overshoot <= 0 or budget <= 1:
                return Piece(pos, pos + chars, text, committed=True, reopen=next_open)
            budget -= max(overshoot, budget // 10, 1)
