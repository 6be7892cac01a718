"""Split messages become one turn: the coalescing window.

Why: a Telegram client splits a paste longer than 4096 characters into several
messages, and an album arrives as one update per photo (sharing a `media_group_id`).
Answered one by one, a paste would start three turns, each seeing a third of the
question. So the gateway holds a message that *might* be the first part of such a split
for a short window (`chat.coalesce_window`, per platform), and merges what the same
person sends in the same chat meanwhile into that one turn.

The rules, chosen so that a message which cannot be part of a split never waits:

- Only a message that might be split starts a wait: one of at least `SPLIT_MIN` UTF-16
  units (Telegram splits at 4096), or an album item. Anything else, with nothing of the
  sender held, goes on at once -- no timer is armed, nothing is added but this check.
- A message from the same person in the same chat arriving within the window of the
  last one held joins the group. A joining message that clearly ends the split (short
  and not an album item: the tail of a paste) closes the group at once; otherwise the
  window starts again from it. So a lone long message waits at most one window, and a
  split paste waits one window only when its last part is long itself.
- Commands never join: the gateway flushes the chat's held groups before running one
  (order preserved). Edits never join either: they revise the part they edit.
- Albums are always merged: with the window at 0 (coalescing off), an album item still
  waits `ALBUM_WINDOW` for the rest of its album.

The state here is synchronous (no awaits), so the gateway changes it under the chat's
routing lock with nothing in between; the waiting itself is one task per group on the
gateway's injected clock (`bots.clock`), so tests drive it without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bots.inbound import Inbound

SPLIT_MIN = 3000
"""UTF-16 units from which a message may be the first part of a split paste. Telegram
cuts at 4096; clients cut at a line or word break before that, never this far before."""

ALBUM_WINDOW = 1.0
"""Seconds an album item waits for the rest of its album when coalescing is off."""

JOINER = "\n"
"""Between the texts of merged parts: where a client cut a paste it dropped a line or
word break, and a newline keeps the words apart without inventing a paragraph."""


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (its 4096 limit is in UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def might_be_split(inbound: Inbound) -> bool:
    """Whether more of this message may follow: a long text, or an item of an album."""
    return inbound.media_group_id is not None or utf16_len(inbound.text) >= SPLIT_MIN


def merge(parts: Sequence[Inbound]) -> Inbound:
    """Parts of one split message (or album) as one message, in order.

    The first part is the base: the reply quotes the start of the paste (for an album,
    its first item, which is how Telegram shows the album). Texts are joined, the
    attachments of every part kept in order, and every part's inbox id carried, so the
    turn settles them all (the durable inbox never loses a part).
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return replace(
        first,
        text=JOINER.join(p.text for p in parts if p.text),
        attachments=tuple(a for p in parts for a in p.attachments),
        inbox_ids=tuple(i for p in parts for i in p.inbox_ids),
        mentions_bot=any(p.mentions_bot for p in parts),
        reply_to_bot=any(p.reply_to_bot for p in parts),
    )


@dataclass(eq=False)
class _Group:
    chat_key: str
    parts: list[Inbound]
    deadline: float
    order: int  # when the group started, to flush a chat's groups in arrival order


@dataclass(frozen=True, slots=True)
class Offered:
    """What `Coalescer.offer` decided."""

    ready: list[Inbound]  # (merged) messages to hand to the lane now, in order
    started: str | None = None  # a new group waits under this key: the caller arms its hold


class Coalescer:
    """The groups of possibly-split messages waiting for their next part, per (chat, sender)."""

    def __init__(self, window_for: Callable[[str], float]) -> None:
        """`window_for(platform)`: seconds to wait for a next part there (0: only albums wait)."""
        self.window_for = window_for
        self._groups: dict[str, _Group] = {}
        self._started = 0

    @staticmethod
    def key(inbound: Inbound) -> str:
        return f"{inbound.chat.key}\x00{inbound.user_key}"

    def window(self, inbound: Inbound) -> float:
        """How long to wait for what may follow `inbound` (0: nothing may follow)."""
        window = self.window_for(inbound.platform)
        if inbound.media_group_id is not None:
            return window or ALBUM_WINDOW
        return window if might_be_split(inbound) else 0.0

    def offer(self, parts: Sequence[Inbound], now: float) -> Offered:
        """A message (or a group recovered after a restart, `parts` in order) from a sender.

        Returns what is ready to run now -- groups of the chat whose window passed first,
        so a chat's order holds -- and whether a new group now waits.
        """
        last = parts[-1]
        ready = self.take_due(last.chat.key, now)
        key = self.key(last)
        group = self._groups.get(key)
        if group is not None:
            group.parts.extend(parts)
            window = self.window(last)
            if window <= 0:  # the split ended with this part
                del self._groups[key]
                ready.append(merge(group.parts))
            else:
                group.deadline = now + window
            return Offered(ready)
        window = self.window(last)
        if window <= 0:
            ready.append(merge(parts))
            return Offered(ready)
        self._groups[key] = _Group(last.chat.key, list(parts), now + window, self._started)
        self._started += 1
        return Offered(ready, started=key)

    def deadline(self, key: str) -> float | None:
        """When the group under `key` stops waiting (None: it is gone)."""
        group = self._groups.get(key)
        return None if group is None else group.deadline

    def take_if_due(self, key: str, now: float) -> Inbound | None:
        """The group under `key`, merged, if its window has passed."""
        group = self._groups.get(key)
        if group is None or now < group.deadline:
            return None
        del self._groups[key]
        return merge(group.parts)

    def take_due(self, chat_key: str, now: float) -> list[Inbound]:
        """Every group of a chat whose window has passed, merged, in arrival order."""
        return self._take(lambda g: g.chat_key == chat_key and now >= g.deadline)

    def take_chat(self, chat_key: str) -> list[Inbound]:
        """Every group of a chat, merged, in arrival order (a command is next: they go first)."""
        return self._take(lambda g: g.chat_key == chat_key)

    def take_all(self) -> list[Inbound]:
        """Every group, merged, in arrival order (shutting down)."""
        return self._take(lambda g: True)

    def revise(self, part: Inbound) -> bool:
        """Replace a held part by its edited version (same inbox id); False: not held."""
        for group in self._groups.values():
            for i, held in enumerate(group.parts):
                if held.inbox_ids == part.inbox_ids and held.chat.key == part.chat.key:
                    group.parts[i] = part
                    return True
        return False

    def held(self, chat_key: str | None = None) -> int:
        """Groups waiting (in one chat, or everywhere)."""
        return sum(1 for g in self._groups.values() if chat_key is None or g.chat_key == chat_key)

    def _take(self, which: Callable[[_Group], bool]) -> list[Inbound]:
        taken = sorted(((k, g) for k, g in self._groups.items() if which(g)), key=lambda kg: kg[1].order)
        for k, _ in taken:
            del self._groups[k]
        return [merge(g.parts) for _, g in taken]


def regroup(stored: Sequence[tuple[Inbound, float]], window_for: Callable[[str], float]) -> list[Inbound]:
    """Stored messages not started yet, grouped as the window grouped them when they came.

    For recovery after a restart: a process killed inside a coalescing window leaves the
    parts it held in the inbox, each pending on its own. `stored` is (message, when it
    was received, in seconds), in arrival order; the same rules run again over those
    times, so parts that came within the window of each other become one turn again, and
    messages that came far apart (queued behind a long turn) stay apart. Returns the
    messages to answer, merged, each chat's in order.
    """
    sim = Coalescer(window_for)
    out: list[Inbound] = []
    for inbound, received in stored:
        if inbound.command is not None or inbound.edit_of is not None:
            out += sim.take_chat(inbound.chat.key)
            out.append(inbound)
        else:
            out += sim.offer([inbound], received).ready
    return out + sim.take_all()
