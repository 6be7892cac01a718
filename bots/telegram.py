"""The Telegram connector (python-telegram-bot).

It turns Telegram updates into `Inbound` messages for the gateway and implements the
`Outbox` for Telegram: Markdown goes out as entities (see `telegram_format`), every
python-telegram-bot exception becomes one of parley's neutral errors, and no call is
made without the chat's pacer having allowed it (the callers take the token).

Receiving is long polling by default, or a webhook with a secret token. The API base is
configurable (`telegram.api_base`) for local Bot API servers.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    LinkPreviewOptions,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import Application, ApplicationBuilder, ContextTypes, TypeHandler

from bots import telegram_format
from bots.clock import REAL_CLOCK, Clock
from bots.commands import Command
from bots.errors import (
    BadFormatting,
    NotModified,
    OutboxError,
    RateLimited,
    TargetGone,
    TooLong,
    Transient,
    Undeliverable,
)
from bots.inbound import GroupTrigger, Inbound
from bots.outbox import ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy
from bots.render import text_length

if TYPE_CHECKING:
    from bots.gateway import Gateway

log = logging.getLogger(__name__)

# python-telegram-bot 22 warns on *every* flood-control answer that `retry_after` will become a
# timedelta; translate_error() reads it either way, so the warning is noise in parley's logs.
warnings.filterwarnings("ignore", message=r".*`retry_after` will be of type", category=DeprecationWarning)

TELEGRAM_LIMITS = PlatformLimits(max_message_len=4096, utf16=True, typing_interval=4.0)

DEFAULT_PACING = PacingPolicy(
    private=Budget(rate=1.0, burst=2),  # "avoid more than one message per second" in a chat
    group=Budget(rate=0.3, burst=2),  # 20 per minute per group, with headroom
    platform=Budget(rate=25.0, burst=25),  # about 30 per second per bot, with headroom
)


def translate_error(exc: TelegramError) -> OutboxError:
    """Map a python-telegram-bot exception to parley's neutral error (texts are case-mangled by PTB)."""
    if isinstance(exc, RetryAfter):
        raw = getattr(exc, "_retry_after", None)
        seconds = raw.total_seconds() if isinstance(raw, timedelta) else float(exc.retry_after)  # type: ignore[arg-type]
        return RateLimited(seconds)
    if isinstance(exc, BadRequest):
        text = exc.message.lower()
        if "not modified" in text:
            return NotModified(exc.message)
        if "to edit not found" in text or "to delete not found" in text or "can't be edited" in text:
            return TargetGone(exc.message)
        if "can't be deleted" in text:
            return TargetGone(exc.message)
        if "too long" in text or "message_too_long" in text:
            return TooLong(exc.message)
        if "parse" in text and "entit" in text or "parse_mode" in text:
            return BadFormatting(exc.message)
        return Undeliverable(f"Telegram refused the call: {exc.message}")
    if isinstance(exc, (Forbidden, ChatMigrated, InvalidToken, Conflict)):
        return Undeliverable(str(exc))
    if isinstance(exc, (TimedOut, NetworkError)):
        return Transient(str(exc) or type(exc).__name__)
    return Transient(str(exc))


class TelegramOutbox:
    """Send, edit, delete, typing and drafts through a PTB `Bot`."""

    platform = "telegram"
    limits = TELEGRAM_LIMITS

    def __init__(self, bot: Any) -> None:
        self._bot = bot

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except TelegramError as exc:
            raise translate_error(exc) from None

    @staticmethod
    def _text_args(text: str, markdown: bool) -> dict[str, Any]:
        if markdown:
            rendered, entities = telegram_format.render(text)
            if rendered.strip():
                return {
                    "text": rendered,
                    "entities": [
                        MessageEntity(e.type, e.offset, e.length, url=e.url, language=e.language,
                                      custom_emoji_id=e.custom_emoji_id)
                        for e in entities
                    ],
                }
        return {"text": text}

    async def send(self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None) -> MessageRef:
        kwargs = self._text_args(text, markdown)
        if chat.thread_id:
            kwargs["message_thread_id"] = int(chat.thread_id)
        if reply_to:
            kwargs["reply_parameters"] = ReplyParameters(message_id=int(reply_to), allow_sending_without_reply=True)
        msg: Message = await self._call(
            self._bot.send_message(
                chat_id=int(chat.chat_id), link_preview_options=LinkPreviewOptions(is_disabled=True), **kwargs
            )
        )
        return MessageRef(chat, str(msg.message_id))

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False) -> None:
        await self._call(
            self._bot.edit_message_text(
                chat_id=int(ref.chat.chat_id),
                message_id=int(ref.message_id),
                link_preview_options=LinkPreviewOptions(is_disabled=True),
                **self._text_args(text, markdown),
            )
        )

    async def delete(self, ref: MessageRef) -> None:
        await self._call(self._bot.delete_message(chat_id=int(ref.chat.chat_id), message_id=int(ref.message_id)))

    async def typing(self, chat: ChatRef) -> None:
        thread = int(chat.thread_id) if chat.thread_id else None
        await self._call(self._bot.send_chat_action(int(chat.chat_id), ChatAction.TYPING, message_thread_id=thread))

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        if not chat.is_private:
            raise Undeliverable("drafts exist only in private chats")
        thread = int(chat.thread_id) if chat.thread_id else None
        await self._call(
            self._bot.send_message_draft(int(chat.chat_id), draft_id, text=text, message_thread_id=thread)
        )

    def measure(self, text: str, *, markdown: bool) -> int:
        if markdown:
            return telegram_format.rendered_length(text)
        return text_length(text, utf16=True)

    def plain(self, text: str) -> str:
        return telegram_format.plain(text) or text


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    url: str
    listen: str = "127.0.0.1"
    port: int = 8443
    path: str = "/telegram"
    secret_token: str | None = None


UPDATE_CONCURRENCY = 256
"""Updates python-telegram-bot hands to the gateway at once.

One at a time (PTB's default), every update waits for the store calls of all updates
before it; under load that queued new conversations for tens of seconds (BENCHMARKS.md).
The gateway still routes one chat's messages in arrival order: PTB starts the update
tasks in order and each takes its chat's lock before its first pause.
"""


class TelegramConnector:
    """Receives Telegram updates and offers the Telegram outbox."""

    platform = "telegram"

    def __init__(
        self,
        token: str,
        *,
        api_base: str = "https://api.telegram.org",
        webhook: WebhookOptions | None = None,
        drafts: bool = False,
        pacing: PacingPolicy = DEFAULT_PACING,
        owners: frozenset[str] = frozenset(),
        group_trigger: GroupTrigger = GroupTrigger(),
        clock: Clock = REAL_CLOCK,
        poll_timeout: int = 10,
    ) -> None:
        base = api_base.rstrip("/")
        self._app: Application = (
            ApplicationBuilder()
            .token(token)
            .base_url(f"{base}/bot")
            .base_file_url(f"{base}/file/bot")
            .connection_pool_size(256)
            .pool_timeout(30.0)
            .concurrent_updates(UPDATE_CONCURRENCY)
            .build()
        )
        self._app.add_handler(TypeHandler(Update, self._on_update))
        self._app.add_error_handler(self._on_error)
        self.outbox = TelegramOutbox(self._app.bot)
        self.pacing = Pacing(pacing, clock)
        self.drafts = drafts
        self._webhook = webhook
        self._owners = owners
        self._trigger = group_trigger
        self._poll_timeout = poll_timeout
        self._gateway: Gateway | None = None
        self._running = False
        self._bot_id: int | None = None
        self._username = ""

    @property
    def connected(self) -> bool:
        return self._running

    async def start(self, gateway: "Gateway") -> None:
        self._gateway = gateway
        await self._app.initialize()  # getMe: fails fast on a bad token
        me = self._app.bot
        self._bot_id, self._username = me.id, (me.username or "")
        await self._register_commands(gateway.commands.all())
        if self._webhook is not None:
            wh = self._webhook
            await self._app.updater.start_webhook(  # type: ignore[union-attr]
                listen=wh.listen,
                port=wh.port,
                url_path=wh.path.lstrip("/"),
                webhook_url=wh.url,
                secret_token=wh.secret_token,
                allowed_updates=["message"],
            )
        else:
            await self._app.updater.start_polling(  # type: ignore[union-attr]
                poll_interval=0.0,
                timeout=self._poll_timeout,
                allowed_updates=["message"],
                error_callback=self._on_poll_error,
            )
        await self._app.start()
        self._running = True
        log.info("telegram: connected as @%s (%s)", self._username, "webhook" if self._webhook else "polling")

    async def stop_receiving(self) -> None:
        """Stop polling (or the webhook): unread updates stay on Telegram's side for next time."""
        if self._app.updater is not None and self._app.updater.running:
            await self._app.updater.stop()

    async def stop(self) -> None:
        """Close everything; call after the gateway has finished its turns."""
        if not self._running:
            return
        self._running = False
        await self.stop_receiving()
        await self._app.stop()
        await self._app.shutdown()

    async def _register_commands(self, commands: list[Command]) -> None:
        from bots.access import Role

        def menu(cmds: list[Command]) -> list[BotCommand]:
            return [BotCommand(c.name, c.description[:256]) for c in cmds]

        try:
            await self._app.bot.set_my_commands(
                menu([c for c in commands if c.role <= Role.USER]), scope=BotCommandScopeDefault()
            )
            for owner in self._owners:
                platform, _, uid = owner.partition(":")
                if platform == "telegram" and uid.lstrip("-").isdigit():
                    await self._app.bot.set_my_commands(menu(commands), scope=BotCommandScopeChat(int(uid)))
        except TelegramError as exc:
            log.warning("telegram: could not register the command menu: %s", translate_error(exc))

    # ---- incoming ------------------------------------------------------------------------

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        inbound = self.to_inbound(update)
        if inbound is not None and self._gateway is not None:
            await self._gateway.handle(inbound)

    def to_inbound(self, update: Update) -> Inbound | None:
        """A Telegram update as a platform-neutral message (None: not for the gateway)."""
        msg = update.message
        if msg is None or msg.text is None or msg.from_user is None or msg.from_user.is_bot:
            return None
        chat = msg.chat
        thread = str(msg.message_thread_id) if msg.is_topic_message and msg.message_thread_id else None
        ref = ChatRef("telegram", str(chat.id), thread_id=thread, is_private=chat.type == "private")
        text = msg.text
        command, args = None, ""
        mentions = False
        for entity in msg.entities:
            fragment = msg.parse_entity(entity)
            if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
                name, _, target = fragment[1:].partition("@")
                if target and target.lower() != self._username.lower():
                    return None  # a command for another bot in this group
                command = name.lower()
                args = text[entity.offset + entity.length :].strip()
                mentions = mentions or bool(target)
            elif entity.type == MessageEntity.MENTION and fragment[1:].lower() == self._username.lower():
                mentions = True
            elif entity.type == MessageEntity.TEXT_MENTION and entity.user and entity.user.id == self._bot_id:
                mentions = True
        if mentions and command is None and self._username:
            text = re.sub(rf"@{re.escape(self._username)}\b", "", text, flags=re.IGNORECASE).strip()
        reply_to_bot, reply_user, reply_name = False, None, None
        replied = msg.reply_to_message
        # In a forum topic every message "replies" to the topic's first (service) message.
        if replied is not None and not (thread and replied.message_id == msg.message_thread_id):
            if replied.from_user is not None:
                reply_to_bot = replied.from_user.id == self._bot_id
                reply_user = str(replied.from_user.id)
                reply_name = replied.from_user.username
        user = msg.from_user
        return Inbound(
            chat=ref,
            user_id=str(user.id),
            text=text,
            message_id=str(msg.message_id),
            update_id=str(update.update_id),
            username=user.username,
            display_name=user.full_name,
            command=command,
            args=args,
            mentions_bot=mentions,
            listening=not ref.is_private and self._trigger.listens(ref.chat_id),
            reply_to_bot=reply_to_bot,
            reply_to_user_id=reply_user,
            reply_to_username=reply_name,
        )

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: error while handling an update: %s", type(context.error).__name__, exc_info=context.error)

    def _on_poll_error(self, exc: TelegramError) -> None:
        log.warning("telegram: polling error: %s", translate_error(exc))


async def check(token: str, api_base: str) -> str:
    """For `parley check`: reach the Bot API with this token (getMe); returns "@username"."""
    from telegram import Bot

    base = api_base.rstrip("/")
    bot = Bot(token, base_url=f"{base}/bot", base_file_url=f"{base}/file/bot")
    try:
        async with bot:
            return f"@{bot.username}"
    except InvalidToken:
        raise Undeliverable("the token was rejected (Unauthorized)") from None
    except TelegramError as exc:
        raise translate_error(exc) from None
