"""When did each word of a reply become visible to the person in the chat?

The fake Telegram stamps every version of every bot message with the moment it applied
the call (its `time.monotonic()`, after the injected round-trip latency). From those
versions this module rebuilds what the chat showed over time and answers, for each word
of the expected reply, the first moment it was on screen. "Visible" means: the chat's
bot messages (not deleted), in order, read as words, start with the reply's first k+1
words exactly -- a half-shown or reordered word does not count.

Pure functions over plain data, so the measurement itself is unit-tested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Change:
    """One change to what the chat shows: message `message_id` now reads `text` (None: deleted)."""

    t: float
    message_id: int
    text: str | None


def changes_from_fake(messages: Iterable[Mapping[str, Any]]) -> list[Change]:
    """The bot's message changes from `GET /_fake/messages` (the fake must keep history)."""
    out: list[Change] = []
    for m in messages:
        if not m.get("from_bot"):
            continue
        for t, text, _entities in m["edits"]:
            if text is None:
                raise ValueError("the fake ran with --light: it kept no text per version")
            out.append(Change(float(t), int(m["message_id"]), text))
        if m.get("deleted") and m.get("deleted_at") is not None:
            out.append(Change(float(m["deleted_at"]), int(m["message_id"]), None))
    out.sort(key=lambda c: c.t)  # stable: same-instant changes keep message order
    return out


def matched_words(shown: Sequence[str], expected: Sequence[str]) -> int:
    """How many leading words of `expected` the chat shows, exactly and in order."""
    n = 0
    for have, want in zip(shown, expected):
        if have != want:
            break
        n += 1
    return n


def visible_times(changes: Sequence[Change], expected: str) -> list[float | None]:
    """For each word of `expected`, when it first became visible (None: never)."""
    words = expected.split()
    times: list[float | None] = [None] * len(words)
    current: dict[int, str] = {}
    best = 0
    for change in changes:
        if change.text is None:
            current.pop(change.message_id, None)
        else:
            current[change.message_id] = change.text
        shown = " ".join(current[mid] for mid in sorted(current)).split()
        n = matched_words(shown, words)
        for k in range(best, n):
            times[k] = change.t
        best = max(best, n)
    return times


def final_words(changes: Sequence[Change]) -> str:
    """What the chat shows at the end, as one space-joined text of its messages' words."""
    current: dict[int, str] = {}
    for change in changes:
        if change.text is None:
            current.pop(change.message_id, None)
        else:
            current[change.message_id] = change.text
    return " ".join(" ".join(current[mid] for mid in sorted(current)).split())


def lags(times: Sequence[float | None], t_first: float, rate: float, t_end: float) -> list[float]:
    """Per word k: visible time minus generated time (`t_first + k / rate`).

    A word that never became visible counts as visible at `t_end` (the end of
    observation), so a strategy that loses text is charged at least that much.
    """
    return [(t if t is not None else t_end) - (t_first + k / rate) for k, t in enumerate(times)]
