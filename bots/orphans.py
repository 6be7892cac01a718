"""No orphans: remove the copy a send with an unknown outcome may have left in the chat.

A send can reach the platform and still fail for parley: the connection drops, or the
answer times out, after the request left. LiveReply then sends the piece again, so the
chat may show the piece twice -- a fragment ("You sa…") above the complete reply. The
Telegram Bot API has no idempotency key and cannot list a chat's messages, but message ids
grow in each chat, and an edit answers differently depending on whose message it hits:

- "message is not modified" when it carries exactly what the message shows, and only a
  message of the bot can answer that;
- "message can't be edited" / "message to edit not found" for a person's message, another
  bot's, or nothing at all (`TargetGone`): skipped, untouched.

So once a later send of the same reply succeeded with id N, the fragment, if it exists,
lies between the largest id known before the lost send and N. `remove_fragments` probes
the ids just below N (at most `MAX_PROBES` per fragment) with an edit carrying the
fragment's exact text and formatting, and deletes the one that answers "not modified".

The probe must never *change* a message someone still wants: an edit that succeeds
changes the message it hits. That is what the `SendLedger` is for. The outbox keeps one
(`outbox.ledger`, Telegram and the in-memory test outbox; Discord needs none: a piece's
sends carry one enforced nonce, the key given by `sending_as` and kept in the reply's
journal, so sending it again -- after a restart too -- returns the message a lost send
created) and
passes every send through it, whoever makes it (replies, acknowledgements, command
output). Per chat it knows the ids it sent in this process and, for every send in flight
or lost, the range its message may occupy. An id is probed only if it is not a known
message and lies in no other sender's range; so among the bot's messages, only this
reply's own fragments can be there.

A reply that is cut off by a crash in the middle of a send leaves its "sending" entry in
its journal, and the next process hands it to the new reply. That process knows nothing
of its predecessor's other sends, so the entry carries `clean`: true only while no other
sender wrote to the chat since the entry's lower bound (the reply watches the ledger and
writes `clean: false` into its journal *before* such a send leaves). Only clean entries
are probed after a restart: by the new reply once it sent a message, or by
`remove_leftovers` when the message is given up on (its notice bounds the range).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from bots.clock import REAL_CLOCK, Clock
from bots.errors import NotModified, OutboxError, RateLimited, TargetGone, Transient
from bots.outbox import ChatRef, MessageRef
from bots.pacing import Pacer, Priority

log = logging.getLogger(__name__)

MAX_PROBES = 5  # edits per fragment: the ids just below the next successful send
MAX_SPAN = 50  # ids looked at below it (known ids are skipped without a call)
WAIT_IN_FLIGHT = 30.0  # how long a probe waits for another send in flight to be answered
WATCH_TIMEOUT = 3.0  # how long a send waits for a watcher to write down that it happens

_owner: ContextVar[object | None] = ContextVar("parley_send_owner", default=None)
_key: ContextVar[str | None] = ContextVar("parley_send_key", default=None)


@contextlib.contextmanager
def sending_as(owner: object, key: str | None = None) -> Iterator[None]:
    """Sends made inside this block are `owner`'s (a LiveReply): not foreign to it.

    `key` identifies the message being sent across retries and restarts: an outbox whose
    platform de-duplicates sends (Discord's nonce) uses it, so the same key never creates a
    second message (`send_key`).
    """
    owner_token, key_token = _owner.set(owner), _key.set(key)
    try:
        yield
    finally:
        _key.reset(key_token)
        _owner.reset(owner_token)


def send_key() -> str | None:
    """The idempotency key of the send being made (see `sending_as`), if its sender gave one."""
    return _key.get()


@contextlib.contextmanager
def without_key() -> Iterator[None]:
    token = _key.set(None)
    try:
        yield
    finally:
        _key.reset(token)


def as_id(value: Any) -> int | None:
    """A message id as an int, when it is one (Telegram's are; interaction keys are not)."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


@dataclass(eq=False, slots=True)
class SendWindow:
    """Where the message of one send may be: above `base`, and below `top` once known."""

    owner: object | None
    base: int
    started: int  # ledger sequence number when the send began
    failed: int | None = None  # sequence number when its unknown outcome was seen; None: in flight
    top: int | None = None  # the id of a message sent after the failure: this one is below it

    def covers(self, message_id: int) -> bool:
        return self.base < message_id and (self.top is None or message_id < self.top)

    def reaches_above(self, after: int) -> bool:
        return self.top is None or self.top > after + 1

    @property
    def in_flight(self) -> bool:
        return self.failed is None


Watcher = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class SentId:
    """Filled in by the outbox inside `SendLedger.sending` once the platform answered."""

    id: Any = None


@dataclass(slots=True)
class _ChatLedger:
    known: set[int] = field(default_factory=set)
    high: int = 0  # the largest id known to exist in the chat
    first_sent: int | None = None  # the first id this process sent here (above any predecessor's)
    forgot: int = 0  # what was known at or below this id was dropped to bound memory: never probed
    windows: list[SendWindow] = field(default_factory=list)
    watchers: dict[int, tuple[object, Watcher]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class SendLedger:
    """What one outbox knows about the messages it sent, per chat, in this process."""

    MAX_CHATS = 20_000
    MAX_WINDOWS = 64
    MAX_KNOWN = 2048

    def __init__(self) -> None:
        self._chats: OrderedDict[str, _ChatLedger] = OrderedDict()
        self._seq = itertools.count(1)

    @staticmethod
    def _key(chat: ChatRef) -> str:
        return f"{chat.platform}:{chat.chat_id}"  # ids are per chat; forum topics share them

    def _chat(self, chat: ChatRef) -> _ChatLedger:
        key = self._key(chat)
        ledger = self._chats.get(key)
        if ledger is None:
            ledger = self._chats[key] = _ChatLedger()
            if len(self._chats) > self.MAX_CHATS:
                for old in list(self._chats)[: len(self._chats) // 10]:
                    if not self._chats[old].windows and not self._chats[old].watchers:
                        del self._chats[old]
        else:
            self._chats.move_to_end(key)
        return ledger

    # ---- what is known ---------------------------------------------------------------

    def high(self, chat: ChatRef) -> int:
        """The largest message id known to exist in the chat (0: none)."""
        ledger = self._chats.get(self._key(chat))
        return ledger.high if ledger is not None else 0

    def first_sent(self, chat: ChatRef) -> int | None:
        """The first id this process sent in the chat: above every message of an earlier process."""
        ledger = self._chats.get(self._key(chat))
        return ledger.first_sent if ledger is not None else None

    def active(self, chat: ChatRef) -> bool:
        """Whether this process sent (or tries to send) anything in the chat."""
        ledger = self._chats.get(self._key(chat))
        return ledger is not None and (ledger.first_sent is not None or bool(ledger.windows))

    def know(self, chat: ChatRef, ids: Iterable[Any]) -> None:
        """Messages of the bot known from elsewhere (adopted after a restart): never probed."""
        ledger = self._chat(chat)
        for value in ids:
            mid = as_id(value)
            if mid is not None:
                ledger.known.add(mid)
                ledger.high = max(ledger.high, mid)
        self._prune(ledger)

    def window(self, chat: ChatRef, owner: object) -> SendWindow | None:
        """`owner`'s most recent lost send in the chat."""
        ledger = self._chats.get(self._key(chat))
        if ledger is None:
            return None
        mine = [w for w in ledger.windows if w.owner is owner and not w.in_flight]
        return mine[-1] if mine else None

    # ---- the life of a send (called by the outbox) -----------------------------------

    async def begin(self, chat: ChatRef) -> SendWindow:
        """A send is about to leave. Watchers other than its owner hear of it first."""
        ledger = self._chat(chat)
        owner = _owner.get()
        watchers = [w for o, w in ledger.watchers.values() if o is not owner]
        for watcher in watchers:
            try:
                await asyncio.wait_for(watcher(), WATCH_TIMEOUT)
            except Exception as exc:  # the send matters more than the note about it
                log.info("chat %s: a watcher of sends failed: %s", chat.key, exc)
        window = SendWindow(owner, ledger.high, next(self._seq))
        ledger.windows.append(window)
        ledger.touch()
        return window

    @contextlib.asynccontextmanager
    async def sending(self, chat: ChatRef) -> AsyncIterator[SentId]:
        """Wrap one send: `async with ledger.sending(chat) as sent: ...; sent.id = new id`.

        A `Transient` error (or any other exception, a cancellation included) leaves the
        outcome unknown; the other outbox errors are refusals: nothing was created.
        """
        window = await self.begin(chat)
        result = SentId()
        try:
            yield result
        except Transient:
            self.lost(chat, window)
            raise
        except OutboxError:
            self.failed(chat, window)
            raise
        except BaseException:
            self.lost(chat, window)
            raise
        if result.id is None:
            self.failed(chat, window)
        else:
            self.sent(chat, window, result.id)

    def sent(self, chat: ChatRef, window: SendWindow, message_id: Any) -> None:
        """The send succeeded: its message is known, and bounds every send lost before it began."""
        ledger = self._chat(chat)
        with contextlib.suppress(ValueError):
            ledger.windows.remove(window)
        mid = as_id(message_id)
        if mid is not None:
            ledger.known.add(mid)
            ledger.high = max(ledger.high, mid)
            if ledger.first_sent is None:
                ledger.first_sent = mid
            for w in ledger.windows:
                if w.failed is not None and w.failed < window.started and (w.top is None or mid < w.top):
                    w.top = mid
        self._prune(ledger)
        ledger.touch()

    def lost(self, chat: ChatRef, window: SendWindow) -> None:
        """The send's outcome is unknown: its message may exist, somewhere in its window."""
        ledger = self._chat(chat)
        window.failed = next(self._seq)
        self._prune(ledger)
        ledger.touch()

    def failed(self, chat: ChatRef, window: SendWindow) -> None:
        """The send was refused: no message."""
        ledger = self._chat(chat)
        with contextlib.suppress(ValueError):
            ledger.windows.remove(window)
        ledger.touch()

    def settle(self, chat: ChatRef, windows: Iterable[SendWindow]) -> None:
        """Their owner looked for these lost sends: they no longer stand in anyone's way."""
        ledger = self._chats.get(self._key(chat))
        gone = {id(w) for w in windows}
        if ledger is not None and gone:
            ledger.windows = [w for w in ledger.windows if id(w) not in gone]
            self._prune(ledger)
            ledger.touch()

    # ---- watching --------------------------------------------------------------------

    def watch(self, chat: ChatRef, owner: object, watcher: Watcher) -> None:
        """Call `watcher` (and wait for it) before any send in the chat that is not `owner`'s."""
        self._chat(chat).watchers[id(owner)] = (owner, watcher)

    def unwatch(self, chat: ChatRef, owner: object) -> None:
        ledger = self._chats.get(self._key(chat))
        if ledger is not None:
            ledger.watchers.pop(id(owner), None)

    def foreign_since(self, chat: ChatRef, after: int, owner: object) -> bool:
        """Whether a send not `owner`'s may have put a message above `after` that is not known."""
        ledger = self._chats.get(self._key(chat))
        if ledger is None:
            return False
        return ledger.forgot > after or any(w.owner is not owner and w.reaches_above(after) for w in ledger.windows)

    # ---- probing ---------------------------------------------------------------------

    def candidates(
        self, chat: ChatRef, after: int, before: int, owner: object, keep: Iterable[int] = ()
    ) -> tuple[list[int], bool]:
        """The ids below `before` and above `after` that may hold `owner`'s lost message and
        nothing else of the bot's, highest first (at most `MAX_PROBES`); and whether a send
        still in flight hides some (wait and ask again). `keep`: ids never to probe."""
        ledger = self._chats.get(self._key(chat))
        known = (ledger.known if ledger is not None else set()) | set(keep)
        # Any other sender's range, and the owner's own sends in flight, may hide a message
        # someone wants; only the owner's own *lost* sends are what is looked for.
        windows = [w for w in ledger.windows if w.owner is not owner or w.in_flight] if ledger is not None else []
        lowest = max(after, ledger.forgot if ledger is not None else 0, before - 1 - MAX_SPAN)
        out: list[int] = []
        blocked = False
        for mid in range(before - 1, lowest, -1):
            if mid in known:
                continue
            hidden = [w for w in windows if w.covers(mid)]
            if hidden:
                blocked = blocked or any(w.in_flight for w in hidden)
                continue
            out.append(mid)
            if len(out) >= MAX_PROBES:
                break
        return out, blocked

    async def changed(self, chat: ChatRef, timeout: float) -> None:
        ledger = self._chat(chat)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ledger.changed.wait(), timeout)

    def _prune(self, ledger: _ChatLedger) -> None:
        """Bound the memory of a busy chat: the oldest ids and closed ranges are dropped, and
        nothing at or below what was dropped is ever probed again (`forgot`)."""
        if len(ledger.windows) > self.MAX_WINDOWS:
            closed = [w for w in ledger.windows if w.top is not None]
            drop = {id(w) for w in closed[: len(ledger.windows) - self.MAX_WINDOWS]}
            for w in ledger.windows:
                if id(w) in drop and w.top is not None:
                    ledger.forgot = max(ledger.forgot, w.top)
            ledger.windows = [w for w in ledger.windows if id(w) not in drop]
        if len(ledger.known) > self.MAX_KNOWN:
            ordered = sorted(ledger.known)
            cut = len(ordered) - self.MAX_KNOWN // 2
            ledger.forgot = max(ledger.forgot, ordered[cut - 1])
            ledger.known = set(ordered[cut:])


@dataclass(slots=True)
class Fragment:
    """A piece of a reply whose send had an unknown outcome: it may be in the chat."""

    index: int
    text: str
    markdown: bool
    after: int | None  # its id, if it exists, is above this
    before: int | None = None  # ... and below this (an id sent after it was lost)
    clean: bool = True  # no other sender wrote to the chat since `after` (for a successor)
    earlier: bool = False  # left by an earlier process (from the journal)
    trusted: bool = True  # may be looked for here (an earlier process's: only if it was clean)
    key: str | None = None  # the send's idempotency key (a Discord nonce): a retry reuses it
    window: SendWindow | None = None  # its range in this process's ledger

    def bound(self, ledger: SendLedger, chat: ChatRef) -> int | None:
        """An id known to be above the fragment, once there is one."""
        if self.before is not None:
            return self.before
        if self.window is not None:
            return self.window.top
        if self.earlier:
            return ledger.first_sent(chat)
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index, "text": self.text, "markdown": self.markdown,
                                "after": self.after, "clean": self.clean}
        before = self.before if self.before is not None else self.window.top if self.window is not None else None
        if before is not None:
            data["before"] = before
        if self.key is not None:
            data["key"] = self.key
        return data

    @classmethod
    def from_json(cls, data: Any) -> Fragment | None:
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            return None
        try:
            index = int(data.get("index") or 0)
        except (TypeError, ValueError):
            index = 0
        clean = data.get("clean") is True
        return cls(
            index, data["text"], bool(data.get("markdown")), as_id(data.get("after")),
            before=as_id(data.get("before")), clean=clean, earlier=True, trusted=clean,
            key=data["key"] if isinstance(data.get("key"), str) else None,
        )


async def remove_fragments(
    outbox: Any,
    pacer: Pacer,
    chat: ChatRef,
    fragments: list[Fragment],
    *,
    owner: object,
    keep: Iterable[int] = (),
    clock: Clock = REAL_CLOCK,
) -> None:
    """Look for each fragment (newest first) below its bound and delete it where it is found.

    Fragments without a ledger, without bounds, or left by an earlier process that lost
    track of the chat (`clean` false) are not looked for. `keep`: ids never to touch (the
    messages the reply shows).
    """
    ledger: SendLedger | None = getattr(outbox, "ledger", None)
    if ledger is None:
        return
    done: set[int] = set(keep)
    for fragment in sorted(fragments, key=lambda f: f.window.started if f.window else -1, reverse=True):
        before = fragment.bound(ledger, chat)
        if fragment.after is None or before is None or not fragment.trusted:
            log.info("chat %s: a message whose sending was cut off may remain (cannot look for it safely)",
                     chat.key)
            continue
        found = await _probe(outbox, pacer, clock, chat, ledger, fragment, fragment.after, before, owner, done)
        if found is None:
            log.info("chat %s: no copy of a lost send found between #%d and #%d", chat.key, fragment.after, before)


async def remove_leftovers(
    outbox: Any, pacer: Pacer, chat: ChatRef, entries: Iterable[Any], *, clock: Clock = REAL_CLOCK
) -> None:
    """Look for the copies that sends of an earlier process left (the journal entries of
    `bots.live_reply.leftover_sends`) when no reply continues them -- once this process
    has sent a message in the chat (e.g. a failure line), which bounds where they are."""
    fragments = [f for f in (Fragment.from_json(e) for e in entries) if f is not None]
    if fragments:
        await remove_fragments(outbox, pacer, chat, fragments, owner=object(), clock=clock)


async def _probe(
    outbox: Any, pacer: Pacer, clock: Clock, chat: ChatRef, ledger: SendLedger, fragment: Fragment,
    after: int, before: int, owner: object, done: set[int],
) -> int | None:
    waited = 0.0
    while True:
        ids, blocked = ledger.candidates(chat, after, before, owner, keep=done)
        if not blocked or waited >= WAIT_IN_FLIGHT:
            break
        await ledger.changed(chat, 1.0)  # a send in flight may land there: wait for its answer
        waited += 1.0
    for mid in ids:
        if mid in done:
            continue
        ref = MessageRef(chat, str(mid))
        try:
            changed = await _call(pacer, clock, lambda: outbox.edit(ref, fragment.text, markdown=fragment.markdown))
        except NotModified:
            changed = False
        except TargetGone:
            continue  # a person's message, another bot's, or none: not ours, untouched
        except OutboxError as exc:
            log.info("chat %s: looking for a lost send failed at #%d: %s", chat.key, mid, exc)
            return None
        if changed:
            # Only the bot can edit a message, and no other sender's message can be here:
            # this is another lost copy of this reply, just with an older text.
            log.info("chat %s: #%d was an older copy of a lost send", chat.key, mid)
        try:
            await _call(pacer, clock, lambda: outbox.delete(ref))
        except TargetGone:
            pass
        except OutboxError as exc:
            log.warning("chat %s: could not delete #%d, a duplicate of a lost send: %s", chat.key, mid, exc)
            return None
        done.add(mid)
        log.info("chat %s: deleted #%d, a copy of a send whose answer was lost", chat.key, mid)
        return mid
    return None


async def _call(pacer: Pacer, clock: Clock, make: Callable[[], Awaitable[None]], attempts: int = 4) -> bool:
    """One paced call, retried through rate limits and transient failures. True when it went through."""
    delay = 0.5
    for attempt in range(attempts):
        async with pacer.sending(Priority.INTERIM):
            try:
                await make()
                return True
            except RateLimited as exc:
                pacer.pause(exc.retry_after, scope=exc.scope)
                error: OutboxError = exc
            except Transient as exc:
                error = exc
        if attempt + 1 < attempts and isinstance(error, Transient):
            await clock.sleep(delay)
            delay *= 2
    raise error
