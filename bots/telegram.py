"""The Telegram connector (python-telegram-bot).

It turns Telegram updates into `Inbound` messages for the gateway and implements the
`Outbox` for Telegram: Markdown goes out as entities (see `telegram_format`), every
python-telegram-bot exception becomes one of parley's neutral errors, and no call is
made without the chat's pacer having allowed it (the callers take the token).

Receiving is long polling by default, or a webhook with a secret token -- both parley's
own (PTB's `Bot` for the HTTP calls, no `Updater`), because an update must be acknowledged
to Telegram only after parley stored it: the next getUpdates offset, or the webhook's
200, comes after `Gateway.receive` returned. Transient failures are retried forever with
capped back-off and reported to `self.health`; a revoked token is reported as fatal. The
API base is configurable (`telegram.api_base`) for local Bot API servers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web
from telegram import (
    Bot,
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
from telegram.request import HTTPXRequest

from bots import telegram_format
from bots.backoff import PLATFORM_BACKOFF, STORE_BACKOFF, Backoff
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
from bots.health import WARN_EVERY, PlatformHealth
from bots.inbound import GroupTrigger, Inbound
from bots.orphans import SendLedger
from bots.outbox import ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy
from bots.render import text_length
from bots.store import StoreError

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
        self.ledger = SendLedger()  # every send, so a lost one can be looked for (bots.orphans)

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

    async def send(
        self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None, private: bool = False
    ) -> MessageRef:
        """`private` changes nothing: Telegram cannot show a message to one member of a group only."""
        kwargs = self._text_args(text, markdown)
        if chat.thread_id:
            kwargs["message_thread_id"] = int(chat.thread_id)
        if reply_to:
            kwargs["reply_parameters"] = ReplyParameters(message_id=int(reply_to), allow_sending_without_reply=True)
        async with self.ledger.sending(chat) as sent:
            msg: Message = await self._call(
                self._bot.send_message(
                    chat_id=int(chat.chat_id), link_preview_options=LinkPreviewOptions(is_disabled=True), **kwargs
                )
            )
            sent.id = msg.message_id
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


ALLOWED_UPDATES = ["message", "edited_message"]
"""The update types parley reads (an edit can restart its turn: `Gateway._edit`); Telegram
drops other kinds instead of delivering them."""

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

STOP_TIMEOUT = 10.0
"""Seconds `stop_receiving` waits for a batch being handed to the gateway before cancelling it."""


def token_rejected(exc: TelegramError) -> str:
    """The one line for the operator when the Bot API refuses the token after start."""
    reason = str(exc) or "Unauthorized"
    if "not found" in reason.lower():  # 404: a malformed token, or a wrong API base
        return (
            f"telegram: the Bot API answered 404 ({reason}) for this bot: the token is malformed or "
            "telegram.api_base is wrong; set telegram.token (TELEGRAM_BOT_TOKEN) to the token @BotFather "
            "shows for this bot and check telegram.api_base, then restart parley"
        )
    return (
        f"telegram: the bot token was rejected (401 {reason}); it was revoked or is wrong: set telegram.token "
        "(TELEGRAM_BOT_TOKEN) to the token @BotFather shows for this bot, then restart parley"
    )


class TelegramConnector:
    """Receives Telegram updates and offers the Telegram outbox.

    Receiving acknowledges an update to Telegram only once the gateway has stored it:
    polling moves its getUpdates offset past a batch after `Gateway.receive` returned,
    the webhook answers 200 after it returned (503 when it raised `StoreError`, so
    Telegram delivers the update again later). A process killed at any moment loses
    nothing: what was not stored is still on Telegram's side.
    """

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
        backoff: Backoff = PLATFORM_BACKOFF,
        store_backoff: Backoff = STORE_BACKOFF,
    ) -> None:
        base = api_base.rstrip("/")
        # Calls to chats and the long poll use separate connection pools (as PTB's
        # Application does), so a waiting getUpdates never holds up a reply.
        self._bot = Bot(
            token,
            base_url=f"{base}/bot",
            base_file_url=f"{base}/file/bot",
            request=HTTPXRequest(connection_pool_size=256, pool_timeout=30.0),
            get_updates_request=HTTPXRequest(connection_pool_size=2),
        )
        self.outbox = TelegramOutbox(self._bot)
        self.pacing = Pacing(pacing, clock)
        self.health = PlatformHealth(self.platform, clock=clock)
        self.drafts = drafts
        self._webhook = webhook
        self._owners = owners
        self._trigger = group_trigger
        self._poll_timeout = poll_timeout
        self._backoff = backoff
        self._store_backoff = store_backoff
        self._clock = clock
        self._gateway: Gateway | None = None
        self._running = False
        self._bot_id: int | None = None
        self._username = ""
        # Receiving state.
        self._stopping = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._long_polling = False  # the poller waits on getUpdates (safe to cancel: nothing taken yet)
        self._offset: int | None = None  # the next getUpdates offset: every update below it is stored
        self._confirmed: int | None = None  # the offset Telegram last saw (what it considers read)
        self._webhook_runner: web.AppRunner | None = None

    @property
    def connected(self) -> bool:
        return self._running

    async def start(self, gateway: "Gateway") -> None:
        self._gateway = gateway
        self._stopping.clear()
        await self._bot.initialize()  # getMe: fails fast on a bad token
        self._bot_id, self._username = self._bot.id, (self._bot.username or "")
        await self._register_commands(gateway.commands.all())
        if self._webhook is not None:
            await self._start_webhook(self._webhook)
        else:
            await self._bot.delete_webhook()  # getUpdates refuses to work while a webhook is set
            self._poller = asyncio.create_task(self._poll(), name="telegram-polling")
        self._running = True
        log.info("telegram: connected as @%s (%s)", self._username, "webhook" if self._webhook else "polling")

    async def stop_receiving(self) -> None:
        """Stop polling (or the webhook): unread updates stay on Telegram's side for next time.

        A long poll in flight is cancelled (it had taken nothing yet); a batch being
        handed to the gateway is allowed to finish, then acknowledged.
        """
        self._stopping.set()
        poller, self._poller = self._poller, None
        if poller is not None:
            if self._long_polling:
                poller.cancel()
            _, pending = await asyncio.wait({poller}, timeout=STOP_TIMEOUT)
            if pending:
                log.warning("telegram: handing received messages over took longer than %gs; cancelled", STOP_TIMEOUT)
                poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await self._acknowledge()
        runner, self._webhook_runner = self._webhook_runner, None
        if runner is not None:
            await runner.cleanup()  # lets requests in flight finish; later ones are redelivered

    async def stop(self) -> None:
        """Close everything; call after the gateway has finished its turns."""
        await self.stop_receiving()
        self._running = False
        self._gateway = None
        await self._bot.shutdown()

    async def _register_commands(self, commands: list[Command]) -> None:
        from bots.access import Role

        def menu(cmds: list[Command]) -> list[BotCommand]:
            return [BotCommand(c.name, c.description[:256]) for c in cmds]

        try:
            await self._bot.set_my_commands(
                menu([c for c in commands if c.role <= Role.USER]), scope=BotCommandScopeDefault()
            )
            for owner in self._owners:
                platform, _, uid = owner.partition(":")
                if platform == "telegram" and uid.lstrip("-").isdigit():
                    await self._bot.set_my_commands(menu(commands), scope=BotCommandScopeChat(int(uid)))
        except TelegramError as exc:
            log.warning("telegram: could not register the command menu: %s", translate_error(exc))

    # ---- polling -------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Fetch a batch, hand it to the gateway, then acknowledge it -- until stopped.

        Transient failures (network errors, 5xx, timeouts, 409 while another poller
        shuts down, flood control) are retried forever with capped back-off; a rejected
        token is reported as fatal, since no retry can fix it. Never ends silently: an
        unexpected error is fatal too, rather than a process that no longer reads.
        """
        try:
            delays = self._backoff.delays()
            while not self._stopping.is_set():
                updates = await self._fetch()
                if isinstance(updates, InvalidToken):
                    self.health.fatal(token_rejected(updates))
                    return
                if isinstance(updates, RetryAfter):
                    wait = translate_error(updates)
                    assert isinstance(wait, RateLimited)
                    self._poll_failed(f"flood control, retry after {wait.retry_after:g}s", wait.retry_after)
                    await self._pause(wait.retry_after)
                    continue
                if isinstance(updates, Exception):  # TelegramError, or an answer PTB could not read
                    delay = next(delays)
                    self._poll_failed(describe_poll_error(updates), delay)
                    await self._pause(delay)
                    continue
                self._confirmed = self._offset  # Telegram forgot every update below it
                self._poll_works()
                delays = self._backoff.delays()
                if updates and await self._hand_over(updates):
                    self._offset = updates[-1].update_id + 1  # the next getUpdates acknowledges them
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("telegram: polling stopped on an unexpected error")
            self.health.fatal(
                f"telegram: receiving stopped on an unexpected error ({type(exc).__name__}); "
                "restart parley, and please report this bug with the log"
            )

    async def _fetch(self) -> Sequence[Update] | Exception:
        """One long poll from the current offset: the batch, or what went wrong."""
        self._long_polling = True
        try:
            return await self._bot.get_updates(
                offset=self._offset, timeout=timedelta(seconds=self._poll_timeout), allowed_updates=ALLOWED_UPDATES
            )
        except Exception as exc:
            return exc
        finally:
            self._long_polling = False

    def _poll_failed(self, cause: str, retry_in: float) -> None:
        if self.health.failing("getUpdates", cause):
            log.warning(
                "telegram: getUpdates failed (%s); retrying in %.1fs, with back-off until it works "
                "(failing for %.0fs)", cause, retry_in, self.health.failing_for,
            )
        else:
            log.debug("telegram: getUpdates failed again (%s); retrying in %.1fs", cause, retry_in)

    def _poll_works(self) -> None:
        streak = self.health.ok()
        if streak is not None:
            seconds, attempts = streak
            log.info("telegram: getUpdates works again after %.0fs (%d failed attempts)", seconds, attempts)

    async def _hand_over(self, updates: Sequence[Update]) -> bool:
        """Give a batch to the gateway until it is stored. False: stopping first, batch not taken.

        While the store fails the batch stays unacknowledged -- on Telegram's side, where
        a crash cannot lose it -- and polling waits, keeping the order of messages.
        """
        gateway = self._gateway
        if gateway is None:  # stopped meanwhile: leave the batch to the next process
            return False
        inbounds = self._inbounds(updates)
        if not inbounds:
            return True  # nothing for parley in it (e.g. no text): acknowledged as read
        delays = self._store_backoff.delays()
        warned_at: float | None = None
        while True:
            try:
                await gateway.receive(inbounds)
                if warned_at is not None:
                    log.info("telegram: the %d held message(s) are stored now", len(inbounds))
                return True
            except StoreError as exc:
                delay = next(delays)
                now = self._clock.now()
                if warned_at is None or now - warned_at >= WARN_EVERY:
                    warned_at = now
                    log.warning(
                        "telegram: could not store %d received message(s) (%s); they stay unacknowledged "
                        "on Telegram's side, retrying in %.1fs", len(inbounds), exc, delay,
                    )
                else:
                    log.debug("telegram: storing %d message(s) failed again (%s)", len(inbounds), exc)
                if await self._pause(delay):
                    return False
            except Exception:
                # A bug, not a full disk: retrying would block every chat behind this batch.
                log.exception("telegram: handing %d message(s) to the gateway failed; skipped", len(inbounds))
                return True

    def _inbounds(self, updates: Sequence[Update]) -> list[Inbound]:
        """The batch as messages for the gateway; an update that cannot be read is skipped, logged."""
        inbounds = []
        for update in updates:
            try:
                inbound = self.to_inbound(update)
            except Exception:
                log.exception("telegram: cannot read update %s; skipped", update.update_id)
                continue
            if inbound is not None:
                inbounds.append(inbound)
        return inbounds

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less when receiving stops. True: stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _acknowledge(self) -> None:
        """Tell Telegram the last batch was stored (getUpdates with the new offset, no waiting).

        Otherwise the next start fetches it once more -- harmless, since stored updates
        are recognised and ignored, but pointless.
        """
        if self._offset is None or self._offset == self._confirmed or self.health.fatal_reason is not None:
            return
        try:
            await self._bot.get_updates(offset=self._offset, limit=1, timeout=timedelta(0), allowed_updates=ALLOWED_UPDATES)
            self._confirmed = self._offset
        except TelegramError as exc:
            log.info("telegram: could not acknowledge the last updates (%s); the next start fetches them "
                     "again and ignores them", exc)

    # ---- webhook -------------------------------------------------------------------------

    async def _start_webhook(self, options: WebhookOptions) -> None:
        """Serve `options.path`, then point Telegram at it (in this order, so nothing is refused)."""
        app = web.Application()
        app.router.add_post(options.path, self._on_webhook)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, options.listen, options.port).start()
            await self._bot.set_webhook(
                url=options.url, secret_token=options.secret_token, allowed_updates=ALLOWED_UPDATES
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._webhook_runner = runner

    async def _on_webhook(self, request: web.Request) -> web.Response:
        """One update from Telegram: 200 once stored, 503 when the store failed (Telegram retries).

        A request without the right secret token is refused (403). A body that is no
        update is answered 200 and dropped: refusing it would make Telegram retry it
        forever and hold up every update behind it.
        """
        secret = self._webhook.secret_token if self._webhook is not None else None
        if secret is not None:
            given = request.headers.get(SECRET_HEADER, "")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                log.warning("telegram: refused a webhook request from %s without the right secret token", request.remote)
                return web.Response(status=403)
        try:
            update = Update.de_json(json.loads(await request.read()), self._bot)
            if update is None:
                raise ValueError("empty update")
        except Exception as exc:
            log.warning("telegram: dropped a webhook request that is no update (%s)", type(exc).__name__)
            return web.Response(status=200)
        gateway = self._gateway
        if gateway is None or self._stopping.is_set():
            return web.Response(status=503)  # stopping: Telegram keeps it for the next process
        inbounds = self._inbounds([update])
        if not inbounds:
            return web.Response(status=200)
        try:
            await gateway.receive(inbounds)
        except StoreError as exc:
            log.warning("telegram: could not store update %s (%s); answered 503, Telegram delivers it again",
                        update.update_id, exc)
            return web.Response(status=503)
        except Exception:
            log.exception("telegram: handing update %s to the gateway failed; skipped", update.update_id)
        return web.Response(status=200)

    # ---- incoming ------------------------------------------------------------------------

    def to_inbound(self, update: Update) -> Inbound | None:
        """A Telegram update as a platform-neutral message (None: not for the gateway)."""
        if update.message is None and update.edited_message is not None:
            return self._edit_to_inbound(update)
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


    def _edit_to_inbound(self, update: Update) -> Inbound | None:
        """An `edited_message` update: the message as it reads now, marked as an edit of itself.

        Its own update_id keeps it apart in the inbox (Telegram numbers every update).
        """
        edited = update.edited_message
        assert edited is not None
        inbound = self.to_inbound(Update(update.update_id, message=edited))
        if inbound is None:
            return None
        return replace(inbound, edit_of=inbound.message_id)


def describe_poll_error(exc: BaseException) -> str:
    """A getUpdates failure in a few words (PTB's texts carry no token; redacted anyway)."""
    from bots.logs import redact

    if isinstance(exc, TimedOut):
        return "timed out"
    if isinstance(exc, TelegramError):  # e.g. "Conflict: terminated by other getUpdates request; ..."
        return redact(str(exc) or type(exc).__name__)
    return redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


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
