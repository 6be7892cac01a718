"""A chat message as the gateway sees it, whatever platform it came from."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from bots.media import Attachment, attachment_from_json, attachment_to_json
from bots.outbox import ChatRef


@dataclass(frozen=True, slots=True)
class Inbound:
    """One user message (or slash command) handed from a connector to the gateway.

    Connectors fill this in from their platform's update; nothing else in parley ever
    sees a platform object. `text` has the bot's own mention removed. For a command,
    `command` is its canonical lower-case name (no slash, prefix or @botname) and `args`
    the raw text after it.
    """

    chat: ChatRef
    user_id: str
    text: str
    message_id: str
    update_id: str
    username: str | None = None  # without "@"
    display_name: str | None = None
    command: str | None = None
    args: str = ""
    mentions_bot: bool = False
    reply_to_bot: bool = False
    reply_to_user_id: str | None = None  # author of the message this one replies to
    reply_to_username: str | None = None
    expects_answer: bool = False  # the platform shows a pending state until answered (slash commands)
    listening: bool = False  # the bot answers every message in this group (group_trigger: all)
    inbox_ids: tuple[int, ...] = ()  # set by the gateway once stored: the inbox rows this message is
    attachments: tuple[Attachment, ...] = ()  # photos, voice notes, files (references, not bytes)
    media_group_id: str | None = None  # Telegram albums: the updates of one album share it
    edit_of: str | None = None  # an edit of the message with this id (text is the new text)
    received_at: float = 0.0  # when parley received it (epoch seconds; set by the gateway): queue wait

    @property
    def platform(self) -> str:
        return self.chat.platform

    @property
    def user_key(self) -> str:
        return f"{self.chat.platform}:{self.user_id}"

    @property
    def addressed(self) -> bool:
        """Whether the message is meant for the bot in a group (mention, reply or command)."""
        return (
            self.chat.is_private or self.listening or self.mentions_bot or self.reply_to_bot or self.command is not None
        )


PressAnswer = Callable[[str | None, bool], Awaitable[None]]
"""`answer(text, alert)`: acknowledge a button press (see `ButtonPress.answer`)."""


@dataclass(frozen=True, slots=True)
class ButtonPress:
    """Someone pressed a button parley put under one of its messages (`bots.outbox.Button`).

    Connectors fill this in from a Telegram `callback_query` or a Discord component
    interaction and hand it to `Gateway.on_button`, which must call `answer` exactly once,
    quickly: `answer(None, False)` just acknowledges (Telegram: answerCallbackQuery with no
    text; Discord: a deferred update, the message is edited later through the usual
    path); `answer(text, False)` shows a short toast (Telegram) or an ephemeral message
    (Discord); `answer(text, True)` an alert (Telegram) or an ephemeral message (Discord).
    Connectors make `answer` safe: a press answered too late ("query is too old",
    "already acknowledged") is logged, never raised. Discord wants an answer within 3 s:
    its connector defers on its own if the gateway has not answered after 2 s, and a later
    `answer` with text then becomes an ephemeral follow-up.
    """

    chat: ChatRef
    user_id: str
    message_id: str  # the message the button is under
    data: str  # the `Button.data` pressed
    answer: PressAnswer
    username: str | None = None
    display_name: str | None = None

    @property
    def platform(self) -> str:
        return self.chat.platform

    @property
    def user_key(self) -> str:
        return f"{self.chat.platform}:{self.user_id}"


def to_json(inbound: Inbound) -> dict[str, Any]:
    """The message as JSON, for the inbox (everything needed to answer it after a restart)."""
    data = {
        f.name: getattr(inbound, f.name) for f in fields(inbound) if f.name not in ("chat", "inbox_ids", "attachments")
    }
    if inbound.attachments:
        data["attachments"] = [attachment_to_json(a) for a in inbound.attachments]
    chat = inbound.chat
    data["chat"] = {
        "platform": chat.platform,
        "chat_id": chat.chat_id,
        "thread_id": chat.thread_id,
        "is_private": chat.is_private,
    }
    return data


def from_json(data: Mapping[str, Any], inbox_ids: tuple[int, ...] = ()) -> Inbound:
    """`to_json` reversed; unknown keys (from a newer parley) are ignored."""
    known = {f.name for f in fields(Inbound)} - {"chat", "inbox_ids", "attachments"}
    values = {k: v for k, v in data.items() if k in known}
    attachments = tuple(attachment_from_json(a) for a in data.get("attachments") or ())
    return Inbound(chat=ChatRef(**data["chat"]), inbox_ids=inbox_ids, attachments=attachments, **values)


@dataclass(frozen=True, slots=True)
class GroupTrigger:
    """When the bot speaks in a group: only when addressed ("mention"), or to everything ("all").

    `default` applies to every group; `overrides` maps a chat (or channel) id to its own mode.
    """

    default: str = "mention"
    overrides: Mapping[str, str] = field(default_factory=dict)

    def listens(self, chat_id: str) -> bool:
        return self.overrides.get(chat_id, self.default) == "all"
