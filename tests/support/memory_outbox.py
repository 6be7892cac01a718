"""An in-memory Outbox (parley's own protocol) for unit tests of LiveReply and the gateway.

Not a stand-in for a platform library: the connector tests drive the real libraries
against the fake servers. This one exists to test platform-neutral logic on a virtual
clock, with failures injected at exact points.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Callable

from bots.errors import NotModified, OutboxError, TargetGone, TooLong
from bots.orphans import SendLedger
from bots.outbox import Button, ChatRef, MessageRef, PlatformLimits
from bots.render import text_length


@dataclass
class Msg:
    id: str
    chat: ChatRef
    text: str
    markdown: bool
    reply_to: str | None
    deleted: bool = False
    history: list[tuple[float, str, bool]] = field(default_factory=list)
    from_bot: bool = True
    buttons: tuple[Button, ...] = ()  # under the message now


@dataclass
class Call:
    t: float
    kind: str
    target: str | None
    text: str | None
    ok: bool


def render_markdown(text: str) -> str:
    """A toy renderer: bold markers disappear, like entities would make them."""
    return text.replace("**", "")


class MemoryOutbox:
    platform = "memory"

    def __init__(
        self,
        *,
        limit: int = 100,
        utf16: bool = False,
        typing_interval: float = 4.0,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.limits = PlatformLimits(max_message_len=limit, utf16=utf16, typing_interval=typing_interval)
        self._now = now or (lambda: asyncio.get_running_loop().time())
        self._ids = itertools.count(1)
        self.messages: dict[str, Msg] = {}
        self.calls: list[Call] = []
        self.drafts: dict[tuple[str, int], str] = {}
        self._faults: deque[tuple[str, OutboxError, bool]] = deque()
        self.changed = asyncio.Event()
        self.ledger = SendLedger()  # like Telegram's: ids grow, so lost sends can be looked for

    # test controls ---------------------------------------------------------------
    def fail_next(self, kind: str, error: OutboxError, times: int = 1, *, applied: bool = False) -> None:
        """The next `times` calls of `kind` ("send", "edit", "delete", "typing", "draft", "any") raise `error`.

        `applied`: the call takes effect first and only its answer is lost (a send's
        outcome is unknown to the caller, yet the message exists).
        """
        for _ in range(times):
            self._faults.append((kind, error, applied))

    def user_deletes(self, message_id: str) -> None:
        self.messages[message_id].deleted = True

    def user_says(self, chat: ChatRef, text: str) -> Msg:
        """A person's message in the chat: the bot can neither edit it ("message can't be edited")."""
        mid = str(next(self._ids))
        self.messages[mid] = Msg(mid, chat, text, False, None, history=[(self._now(), text, False)], from_bot=False)
        return self.messages[mid]

    def visible(self, chat: ChatRef | None = None) -> list[Msg]:
        return [m for m in self.messages.values() if not m.deleted and (chat is None or m.chat == chat)]

    def texts(self) -> list[str]:
        return [render_markdown(m.text) if m.markdown else m.text for m in self.visible()]

    def count(self, kind: str, *, ok: bool | None = None) -> int:
        return sum(1 for c in self.calls if c.kind == kind and (ok is None or c.ok == ok))

    # Outbox ----------------------------------------------------------------------
    def _fault(self, kind: str, *, applied: bool = False) -> OutboxError | None:
        for i, (k, err, after) in enumerate(self._faults):
            if k in (kind, "any") and after == applied:
                del self._faults[i]
                return err
        return None

    def _record(self, kind: str, target: str | None, text: str | None, ok: bool) -> None:
        self.calls.append(Call(self._now(), kind, target, text, ok))
        self.changed.set()

    def _check(self, kind: str, target: str | None, text: str | None) -> None:
        err = self._fault(kind)
        if err is not None:
            self._record(kind, target, text, False)
            raise err

    async def send(
        self,
        chat: ChatRef,
        text: str,
        *,
        markdown: bool = False,
        reply_to: str | None = None,
        private: bool = False,
        buttons: Sequence[Button] = (),
    ) -> MessageRef:
        async with self.ledger.sending(chat) as sent:
            await asyncio.sleep(0)
            self._check("send", None, text)
            if self.measure(text, markdown=markdown) > self.limits.max_message_len or not text.strip():
                self._record("send", None, text, False)
                raise TooLong("too long")
            mid = str(next(self._ids))
            self.messages[mid] = Msg(
                mid, chat, text, markdown, reply_to, history=[(self._now(), text, markdown)], buttons=tuple(buttons)
            )
            lost = self._fault("send", applied=True)
            self._record("send", mid, text, lost is None)
            if lost is not None:
                raise lost
            sent.id = mid
        return MessageRef(chat, mid)

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False, buttons: Sequence[Button] = ()) -> None:
        await asyncio.sleep(0)
        self._check("edit", ref.message_id, text)
        msg = self.messages.get(ref.message_id)
        if msg is None or msg.deleted:
            self._record("edit", ref.message_id, text, False)
            raise TargetGone("message to edit not found")
        if not msg.from_bot:
            self._record("edit", ref.message_id, text, False)
            raise TargetGone("message can't be edited")
        if self.measure(text, markdown=markdown) > self.limits.max_message_len:
            self._record("edit", ref.message_id, text, False)
            raise TooLong("too long")
        if msg.text == text and msg.markdown == markdown and msg.buttons == tuple(buttons):
            self._record("edit", ref.message_id, text, False)
            raise NotModified("message is not modified")
        msg.text, msg.markdown, msg.buttons = text, markdown, tuple(buttons)
        msg.history.append((self._now(), text, markdown))
        self._record("edit", ref.message_id, text, True)

    async def delete(self, ref: MessageRef) -> None:
        await asyncio.sleep(0)
        self._check("delete", ref.message_id, None)
        msg = self.messages.get(ref.message_id)
        if msg is None or msg.deleted:
            self._record("delete", ref.message_id, None, False)
            raise TargetGone("message to delete not found")
        msg.deleted = True
        self._record("delete", ref.message_id, None, True)

    async def typing(self, chat: ChatRef) -> None:
        await asyncio.sleep(0)
        self._check("typing", None, None)
        self._record("typing", None, None, True)

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        await asyncio.sleep(0)
        self._check("draft", str(draft_id), text)
        self.drafts[(chat.chat_id, draft_id)] = text
        self._record("draft", str(draft_id), text, True)

    def measure(self, text: str, *, markdown: bool) -> int:
        return text_length(render_markdown(text) if markdown else text, utf16=self.limits.utf16)

    def plain(self, text: str) -> str:
        return render_markdown(text)
