"""The Outbox: what every connector offers the rest of parley for writing to a chat.

A connector (Telegram, Discord, console) implements `Outbox`; LiveReply, the gateway and
the command replies only ever talk to this protocol. Every call may raise one of the
errors in `bots.errors`; none may raise a platform library's exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True, slots=True)
class ChatRef:
    """Where a reply goes: one chat, optionally one thread/topic in it."""

    platform: str
    chat_id: str
    thread_id: str | None = None
    is_private: bool = True

    @property
    def key(self) -> str:
        """A stable string naming this chat (and thread) across restarts."""
        base = f"{self.platform}:{self.chat_id}"
        return f"{base}:{self.thread_id}" if self.thread_id else base


@dataclass(frozen=True, slots=True)
class MessageRef:
    """A message parley sent; `handle` is connector-private (e.g. a cached platform object)."""

    chat: ChatRef
    message_id: str
    handle: Any = None


@dataclass(frozen=True, slots=True)
class Button:
    """One button under a message (Telegram inline keyboard, Discord message component).

    `data` comes back in the `ButtonPress` when someone presses it: at most 64 bytes of
    UTF-8 (Telegram's `callback_data` limit; Discord's `custom_id` allows 100), opaque to
    the connector. `style` is a hint: Discord colours buttons, Telegram does not.
    """

    label: str
    data: str
    style: Literal["primary", "secondary", "success", "danger"] = "secondary"

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a button needs a label")
        if not self.data or len(self.data.encode()) > 64:
            raise ValueError(f"button data must be 1-64 bytes, got {len(self.data.encode())}")


@dataclass(frozen=True, slots=True)
class PlatformLimits:
    """Hard facts of a platform that shape how replies are laid out."""

    max_message_len: int
    utf16: bool  # measure text in UTF-16 code units (Telegram) rather than code points
    typing_interval: float  # how often to refresh the typing indicator, seconds


class Outbox(Protocol):
    """Write access to one platform.

    `markdown=True` asks the connector to render the text's Markdown natively
    (Telegram: entities; Discord: as-is). `markdown=False` sends it verbatim.

    `buttons` go under the message, in order, laid out as the platform suits (Telegram:
    up to three in a row, more one per row; Discord: rows of five, 25 at most); pressing
    one reaches `Gateway.on_button` as a `bots.inbound.ButtonPress`.

    `private=True` marks an answer that concerns the person who asked alone (an access
    denial, a usage error, their /usage): a connector that can show a message to one
    person only does so (Discord: an ephemeral answer to a slash command) and never
    posts it publicly instead; the others (Telegram, the console) send it as usual.

    Optionally an outbox has a `ledger` (`bots.orphans.SendLedger`) that every `send`
    goes through, when its platform's message ids grow per chat and a lost send can be
    looked for (Telegram). A `send` that raises `Transient` may have created the message.
    """

    platform: str
    limits: PlatformLimits

    async def send(
        self,
        chat: ChatRef,
        text: str,
        *,
        markdown: bool = False,
        reply_to: str | None = None,
        private: bool = False,
        buttons: Sequence[Button] = (),
    ) -> MessageRef: ...

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False, buttons: Sequence[Button] = ()) -> None:
        """Replace the message's text *and* its buttons: `buttons` are the ones it has
        afterwards, so an edit without them removes any it had (as Telegram's
        editMessageText does; Discord is told `components: []`). Raises `NotModified`
        only when neither text nor buttons changed."""
        ...

    async def delete(self, ref: MessageRef) -> None: ...

    async def typing(self, chat: ChatRef) -> None: ...

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        """Show an ephemeral, animated draft (Telegram private chats); others raise Undeliverable."""
        ...

    def measure(self, text: str, *, markdown: bool) -> int:
        """The length the platform will count for `text` once rendered."""
        ...

    def plain(self, text: str) -> str:
        """Readable plain text for Markdown `text`, used when the platform rejects formatting."""
        ...
