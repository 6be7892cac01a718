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

Buttons: a `Button` goes out as an inline keyboard button (one row, `callback_data` = its
data); an edit states the buttons the message keeps (editMessageText without
`reply_markup` removes the keyboard). A press arrives as a `callback_query` update: it
becomes a `ButtonPress` handed to `Gateway.on_button` in a task of its own, never stored
and never in the way of the messages around it (see `_dispatch_presses`).

Media: photos, files, voice notes, stickers... arrive as `Attachment`s holding the
Telegram `file_id` (see `message_attachments`); the caption is the message's text.
`download` fetches the bytes later, when the turn runs: getFile through PTB, then the
file's URL (which carries the bot token: it never reaches a log line or an error
message), bounded in bytes and time, in memory only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Message,
    MessageEntity,
    PhotoSize,
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
from bots.inbound import ButtonPress, GroupTrigger, Inbound, PressAnswer
from bots.media import Attachment, MediaTooLarge, MediaUnavailable
from bots.media_kinds import classify, megabytes, too_large
from bots.orphans import SendLedger
from bots.outbox import Button, ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy
from bots.render import text_length
from bots.store import StoreError

if TYPE_CHECKING:
    from bots.cluster.budgets import SharedBudgets
    from bots.cluster.leader import Leadership
    from bots.cluster.member import ClusterMember
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

    @staticmethod
    def _keyboard(buttons: Sequence[Button]) -> InlineKeyboardMarkup | None:
        """`buttons` as an inline keyboard (None: no keyboard): up to three side by side in
        one row (Approve / Deny), more one per row (a list of models to pick from reads
        better down than across a phone's width)."""
        if not buttons:
            return None
        keys = [InlineKeyboardButton(b.label, callback_data=b.data) for b in buttons]
        return InlineKeyboardMarkup([keys] if len(keys) <= 3 else [[key] for key in keys])

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
        """`private` changes nothing: Telegram cannot show a message to one member of a group only."""
        kwargs = self._text_args(text, markdown)
        if chat.thread_id:
            kwargs["message_thread_id"] = int(chat.thread_id)
        if reply_to:
            kwargs["reply_parameters"] = ReplyParameters(message_id=int(reply_to), allow_sending_without_reply=True)
        keyboard = self._keyboard(buttons)
        if keyboard is not None:
            kwargs["reply_markup"] = keyboard
        async with self.ledger.sending(chat) as sent:
            msg: Message = await self._call(
                self._bot.send_message(
                    chat_id=int(chat.chat_id), link_preview_options=LinkPreviewOptions(is_disabled=True), **kwargs
                )
            )
            sent.id = msg.message_id
        return MessageRef(chat, str(msg.message_id))

    async def edit(
        self, ref: MessageRef, text: str, *, markdown: bool = False, buttons: Sequence[Button] = ()
    ) -> None:
        """The text and the buttons the message has afterwards: without `buttons` the
        keyboard goes (editMessageText drops a keyboard it is not given again). Telegram
        answers "message is not modified" only when text, entities and keyboard are all
        unchanged, so removing the buttons under an unchanged text is a real edit."""
        await self._call(
            self._bot.edit_message_text(
                chat_id=int(ref.chat.chat_id),
                message_id=int(ref.message_id),
                link_preview_options=LinkPreviewOptions(is_disabled=True),
                reply_markup=self._keyboard(buttons),
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


ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]
"""The update types parley reads: Telegram then drops other kinds instead of delivering them.
An edited message becomes an `Inbound` with `edit_of` set (it can restart its turn:
`Gateway._edit`); a callback query (someone pressed one of parley's buttons) a `ButtonPress`."""

ANSWER_TEXT_LIMIT = 200
"""answerCallbackQuery's `text` is "0-200 characters" (Bot API); a longer one is refused
(`MESSAGE_TOO_LONG`), so parley cuts it instead."""

_PRESSES_REMEMBERED = 256  # callback query ids already handed over (a webhook may deliver one twice)

DOWNLOAD_LIMIT = 20 * 1024 * 1024
"""Telegram's cap on what a bot can download ("files of up to 20MB in size", Bot API getFile);
a larger file is refused by getFile ("file is too big"). A local Bot API server allows more."""

_ALBUMS_REMEMBERED = 256
_DOWNLOAD_ATTEMPTS = 2  # a network failure is retried once, within the download's time limit

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

STOP_TIMEOUT = 10.0
"""Seconds `stop_receiving` waits for a batch being handed to the gateway before cancelling it."""

POLLING_DUTY = "telegram-polling"
"""The cluster duty of the one replica that polls (see `bots.cluster.leader`)."""

WEBHOOK_FACT = "telegram.webhook"
"""`cluster_state` name (with the bot id) of the fingerprint of the webhook settings last set."""

_SET_WEBHOOK_ATTEMPTS = 3  # setWebhook is limited to once a second: flood control is waited out, twice


def webhook_fingerprint(options: WebhookOptions) -> str:
    """What `setWebhook` was asked to set, as a digest the replicas can compare (holds no secret)."""
    from bots.cluster.member import fingerprint

    return fingerprint(options.url, options.secret_token or "", sorted(ALLOWED_UPDATES))


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

    Button presses (callback queries) are no messages: they go to `Gateway.on_button` at
    once, each in a task of its own, and are acknowledged with the batch they came in.

    Cluster mode (`cluster`, one `ClusterMember` per replica): every replica connects and
    sends (the turns it runs reply through its outbox), but receiving changes.

    - Polling: Telegram lets one bot have one getUpdates at a time (a second one is
      answered 409), so only the replica elected for `POLLING_DUTY` polls: it deletes the
      webhook and polls from the first unacknowledged update; when deposed it stops at
      once, and what it had not acknowledged is fetched again by the next leader (the
      store recognises updates it already has). The others are connected and healthy,
      just not polling.
    - Webhook: every replica serves the endpoint (a load balancer spreads Telegram's
      deliveries), and `setWebhook` is called once for the cluster, under a cluster-wide
      lock, only when the settings differ from those recorded (a fingerprint in
      `cluster_state`, never the secret) or from what getWebhookInfo reports.
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
        max_photo_bytes: int = DOWNLOAD_LIMIT,
        shared_budgets: SharedBudgets | None = None,
        cluster: ClusterMember | None = None,
    ) -> None:
        """`max_photo_bytes`: of the sizes Telegram offers for a photo, the largest one
        within this many bytes is the one reported (and later downloaded).
        `shared_budgets`: in cluster mode, the outbound budgets every replica shares
        (bots.cluster.budgets); every call then also draws from them. `cluster`: this
        replica, in cluster mode (None: one process, receiving on its own)."""
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
        self.pacing = Pacing(pacing, clock, shared_budgets)  # shared: cluster mode (bots.cluster.budgets)
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
        self._max_photo_bytes = max_photo_bytes
        self._addressed_albums: OrderedDict[tuple[str, str], None] = OrderedDict()  # (chat key, media group)
        self._presses_seen: OrderedDict[str, None] = OrderedDict()  # callback query ids handed over
        self._press_tasks: set[asyncio.Task[None]] = set()
        self._files: httpx.AsyncClient | None = None  # downloads, opened on first use
        # Receiving state.
        self._cluster = cluster
        self._leadership: Leadership | None = None  # cluster polling: competing for POLLING_DUTY
        self._stopping = asyncio.Event()  # receiving stops for good
        self._halt = asyncio.Event()  # the poller must stop (stopping, or no longer the cluster's poller)
        self._poller: asyncio.Task[None] | None = None
        self._long_polling = False  # the poller waits on getUpdates (safe to cancel: nothing taken yet)
        self._offset: int | None = None  # the next getUpdates offset: every update below it is stored
        self._confirmed: int | None = None  # the offset Telegram last saw (what it considers read)
        self._webhook_runner: web.AppRunner | None = None

    @property
    def connected(self) -> bool:
        return self._running

    @property
    def polling(self) -> bool:
        """This process polls Telegram right now (in a cluster: it is the elected poller)."""
        return self._poller is not None

    async def poller(self) -> str | None:
        """For /status and /readyz in a cluster: the replica id that polls Telegram now (None:
        none, or webhook mode, or not a cluster)."""
        if self._cluster is None or self._webhook is not None:
            return None
        if self._leadership is not None and self._leadership.is_leader:
            return self._cluster.replica_id
        return await self._cluster.leader_of(POLLING_DUTY)

    async def start(self, gateway: "Gateway") -> None:
        self._gateway = gateway
        self._stopping.clear()
        self._halt.clear()
        await self._bot.initialize()  # getMe: fails fast on a bad token
        self._bot_id, self._username = self._bot.id, (self._bot.username or "")
        await self._register_commands(gateway.commands.all())
        if self._webhook is not None:
            await self._start_webhook(self._webhook)
        elif self._cluster is None:
            await self._bot.delete_webhook()  # getUpdates refuses to work while a webhook is set
            self._poller = asyncio.create_task(self._poll(), name="telegram-polling")
        else:  # polls once elected (`_lead`); until then it only sends
            self._leadership = self._cluster.leadership(POLLING_DUTY, on_elected=self._lead, on_deposed=self._step_down)
            self._leadership.start()
        self._running = True
        mode = "webhook" if self._webhook else "polling" if self._cluster is None else "polling when elected"
        log.info("telegram: connected as @%s (%s)", self._username, mode)

    async def stop_receiving(self) -> None:
        """Stop polling (or the webhook): unread updates stay on Telegram's side for next time.

        A long poll in flight is cancelled (it had taken nothing yet); a batch being
        handed to the gateway is allowed to finish, then acknowledged. In a cluster this
        replica also leaves the election, so another one takes over polling at once.
        """
        self._stopping.set()
        self._halt.set()
        leadership, self._leadership = self._leadership, None
        if leadership is not None:
            await leadership.aclose()  # deposes this replica: `_step_down` stops the poller
        await self._stop_poller()
        runner, self._webhook_runner = self._webhook_runner, None
        if runner is not None:
            await runner.cleanup()  # lets requests in flight finish; later ones are redelivered

    async def _stop_poller(self) -> None:
        """Stop the poller (`_halt` is set): cancel a long poll, let a hand-over finish, acknowledge."""
        poller, self._poller = self._poller, None
        if poller is None:
            return
        if self._long_polling:
            poller.cancel()
        _, pending = await asyncio.wait({poller}, timeout=STOP_TIMEOUT)
        if pending:
            log.warning("telegram: handing received messages over took longer than %gs; cancelled", STOP_TIMEOUT)
            poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await self._acknowledge()

    async def _lead(self) -> None:
        """Elected the cluster's poller: poll from the first update no one acknowledged."""
        if self._stopping.is_set():
            return
        self._halt.clear()
        self._offset = self._confirmed = None  # what an earlier term acknowledged is long gone
        self._poller = asyncio.create_task(self._poll_as_leader(), name="telegram-polling")

    async def _step_down(self) -> None:
        """No longer the cluster's poller: stop polling now (another replica may start soon)."""
        self._halt.set()
        await self._stop_poller()
        self.health.ok()  # polling failures were the leader's; a replica that only sends is fine

    async def _poll_as_leader(self) -> None:
        """deleteWebhook (retried until it works: getUpdates is refused while a webhook is set), then poll."""
        delays = self._backoff.delays()
        while not self._halt.is_set():
            try:
                await self._bot.delete_webhook()
                break
            except InvalidToken as exc:
                self.health.fatal(token_rejected(exc))
                return
            except TelegramError as exc:
                delay = next(delays)
                if self.health.failing("deleteWebhook", describe_poll_error(exc)):
                    log.warning("telegram: deleteWebhook failed (%s); retrying in %.1fs", describe_poll_error(exc),
                                delay)  # fmt: skip
                if await self._pause(delay):
                    return
        else:
            return
        log.info("telegram: this replica polls now")
        await self._poll()

    async def stop(self) -> None:
        """Close everything; call after the gateway has finished its turns."""
        await self.stop_receiving()
        self._running = False
        self._gateway = None
        files, self._files = self._files, None
        if files is not None:
            await files.aclose()
        await self._finish_presses()
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
            while not self._halt.is_set():
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
        # Presses first, and once: they are answered within seconds or never, so they do
        # not wait for the messages of the batch to be stored (nor for a store that is down).
        self._dispatch_presses(gateway, updates)
        inbounds = self._inbounds(updates)
        if not inbounds:
            return True  # nothing for parley in it (e.g. service messages): acknowledged as read
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
        """Wait `seconds`, or less when polling stops. True: stopping."""
        try:
            await asyncio.wait_for(self._halt.wait(), seconds)
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
            if self._cluster is None:
                await self._bot.set_webhook(
                    url=options.url, secret_token=options.secret_token, allowed_updates=ALLOWED_UPDATES
                )
            else:
                await self._set_webhook_once(self._cluster, options)
        except BaseException:
            await runner.cleanup()
            raise
        self._webhook_runner = runner

    async def _set_webhook_once(self, cluster: ClusterMember, options: WebhookOptions) -> None:
        """setWebhook once for the cluster: only when the wanted settings differ from those
        the cluster recorded, or Telegram reports another URL (someone changed it, or a
        replica in polling mode deleted it). Replicas starting together take turns."""
        wanted = webhook_fingerprint(options)

        async def in_place() -> bool:
            info = await self._bot.get_webhook_info()
            return info.url == options.url

        async def apply() -> None:
            for attempt in range(1, _SET_WEBHOOK_ATTEMPTS + 1):
                try:
                    await self._bot.set_webhook(
                        url=options.url, secret_token=options.secret_token, allowed_updates=ALLOWED_UPDATES
                    )
                    return
                except RetryAfter as exc:  # at most one setWebhook a second, per bot
                    wait = translate_error(exc)
                    if attempt == _SET_WEBHOOK_ATTEMPTS or not isinstance(wait, RateLimited):
                        raise
                    await asyncio.sleep(wait.retry_after)

        name = f"{WEBHOOK_FACT}:{self._bot_id}"
        if await cluster.once(name, wanted, in_place=in_place, apply=apply):
            log.info("telegram: this replica pointed the webhook at the new settings, for the cluster")
        else:
            log.info("telegram: the webhook is already set as configured (by the cluster)")

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
        if update.callback_query is not None:
            self._dispatch_presses(gateway, [update])  # answered in its own task: 200 at once
            return web.Response(status=200)
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
        """A Telegram update as a platform-neutral message (None: not for the gateway).

        A message with media (photo, file, voice note, sticker, location...) carries it
        as `attachments`, its caption as `text`. A caption is never a command: as in
        python-telegram-bot's `CommandHandler` (which reads `text` only) and in
        Telegram's apps (whose command menu sends text), "/summarize" under a photo is
        words for the model, not a command -- though `/cmd@this_bot` in a caption still
        counts as addressing the bot in a group. An edited message (`edited_message`)
        comes back with `edit_of` set to its own message id.
        """
        msg, edit_of = update.message, None
        if msg is None and update.edited_message is not None:
            msg = update.edited_message
            edit_of = str(msg.message_id)
        if msg is None or msg.from_user is None or msg.from_user.is_bot:
            return None
        attachments = message_attachments(msg, max_photo_bytes=self._max_photo_bytes)
        if msg.text is not None:
            text, entities, parse, commands = msg.text, msg.entities, msg.parse_entity, True
        elif msg.caption is not None or attachments:
            text, entities, parse, commands = msg.caption or "", msg.caption_entities, msg.parse_caption_entity, False
        else:
            return None  # a service message (someone joined, a pin...): nothing a person said
        chat = msg.chat
        thread = str(msg.message_thread_id) if msg.is_topic_message and msg.message_thread_id else None
        ref = ChatRef("telegram", str(chat.id), thread_id=thread, is_private=chat.type == "private")
        command, args = None, ""
        mentions = False
        for entity in entities:
            fragment = parse(entity)
            if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
                name, _, target = fragment[1:].partition("@")
                if target and target.lower() != self._username.lower():
                    if commands:
                        return None  # a command for another bot in this group
                    continue
                if commands:
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
        listening = not ref.is_private and self._trigger.listens(ref.chat_id)
        if msg.media_group_id and edit_of is None and not ref.is_private and not listening:
            addressed = mentions or reply_to_bot
            if self._album_addressed(ref.key, msg.media_group_id, addressed) and not addressed:
                mentions = True  # an album is one message: its later items follow the captioned first one
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
            listening=listening,
            reply_to_bot=reply_to_bot,
            reply_to_user_id=reply_user,
            reply_to_username=reply_name,
            attachments=attachments,
            media_group_id=msg.media_group_id,
            edit_of=edit_of,
        )

    # ---- button presses ------------------------------------------------------------------

    def to_press(self, query: CallbackQuery) -> ButtonPress | None:
        """A callback query as a press of one of parley's buttons (None: not one).

        Not one: a press under an inline-mode message (no `message`), under a message
        too old for Telegram to show the bot (an `InaccessibleMessage`), of a button
        without `callback_data` (a game), or by a bot (ignored like bots' messages). The
        chat is named as for messages (`to_inbound`): the topic of a forum, if any.
        """
        user = query.from_user
        if user is None or user.is_bot:
            return None
        msg = query.message
        if msg is None or not msg.is_accessible or not query.data:
            return None
        assert isinstance(msg, Message)
        chat = msg.chat
        thread = str(msg.message_thread_id) if msg.is_topic_message and msg.message_thread_id else None
        return ButtonPress(
            chat=ChatRef("telegram", str(chat.id), thread_id=thread, is_private=chat.type == "private"),
            user_id=str(user.id),
            message_id=str(msg.message_id),
            data=query.data,
            answer=self._answerer(query.id),
            username=user.username,
            display_name=user.full_name,
        )

    def _dispatch_presses(self, gateway: "Gateway", updates: Sequence[Update]) -> None:
        """Hand every callback query among `updates` to `Gateway.on_button`, each in a task.

        Never blocks: the caller goes on storing (and acknowledging) the messages of the
        batch. A press is handed over once, even when delivered twice; one that is not
        for parley (see `to_press`) is only acknowledged, so its button stops spinning.
        """
        for update in updates:
            query = update.callback_query
            if query is None:
                continue
            if query.id in self._presses_seen:
                continue
            self._presses_seen[query.id] = None
            while len(self._presses_seen) > _PRESSES_REMEMBERED:
                self._presses_seen.popitem(last=False)
            if query.from_user is None or query.from_user.is_bot:
                log.debug("telegram: ignored a callback query from a bot (update %s)", update.update_id)
                continue
            try:
                press = self.to_press(query)
            except Exception:
                log.exception("telegram: cannot read button press in update %s; acknowledged", update.update_id)
                press = None
            if press is None:
                log.debug("telegram: callback query in update %s is no press of parley's buttons; acknowledged",
                          update.update_id)
                self._spawn_press(self._answerer(query.id)(None, False))
                continue
            self._spawn_press(self._press(gateway, press))

    def _spawn_press(self, coro: Any) -> None:
        task = asyncio.create_task(coro, name="telegram-press")
        self._press_tasks.add(task)
        task.add_done_callback(self._press_tasks.discard)

    async def _press(self, gateway: "Gateway", press: ButtonPress) -> None:
        try:
            await gateway.on_button(press)
        except Exception:
            log.exception("telegram: chat %s: handling a button press failed", press.chat.key)
        finally:
            await press.answer(None, False)  # does nothing when the gateway answered it

    def _answerer(self, query_id: str) -> PressAnswer:
        """`ButtonPress.answer` for one callback query: the first call answers it, later ones do nothing."""
        answered = False

        async def answer(text: str | None, alert: bool) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            await self._answer_query(query_id, text, alert)

        return answer

    async def _answer_query(self, query_id: str, text: str | None, alert: bool) -> None:
        """answerCallbackQuery, never raising: a press answered too late is only logged.

        Not paced: answerCallbackQuery has no flood limit of its own (an edit it leads to
        has), and a person is watching a spinning button.
        """
        try:
            await self._bot.answer_callback_query(
                query_id, text=cut_answer(text) if text else None, show_alert=True if alert and text else None
            )
        except BadRequest as exc:
            reason = exc.message.lower()
            if "query is too old" in reason or "query id is invalid" in reason:
                log.info("telegram: a button press was answered too late (%s)", exc.message)
            else:
                log.warning("telegram: answering a button press failed: %s", exc.message)
        except TelegramError as exc:
            log.warning("telegram: answering a button press failed (%s)", translate_error(exc))

    async def _finish_presses(self) -> None:
        """Let presses being handled finish (they may unblock a turn), for a while."""
        tasks = set(self._press_tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _album_addressed(self, chat_key: str, group: str, addressed: bool) -> bool:
        """Whether an album item in a group is for the bot.

        An album is one message to the person who sent it, but only its first item
        carries the caption that mentions the bot; the gateway would not even store the
        others. Telegram delivers an album's items one after the other, so an item
        whose album was addressed earlier is addressed too (the last few hundred albums
        are remembered).
        """
        key = (chat_key, group)
        if addressed:
            self._addressed_albums[key] = None
            self._addressed_albums.move_to_end(key)
            while len(self._addressed_albums) > _ALBUMS_REMEMBERED:
                self._addressed_albums.popitem(last=False)
            return True
        return key in self._addressed_albums

    # ---- media ---------------------------------------------------------------------------

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        """The bytes of a file a person sent (`attachment.ref` is its `file_id`).

        getFile through PTB (which honours `telegram.api_base`), then a streamed GET of
        the file URL it returns, kept in memory. `max_bytes` is checked before anything
        is fetched (the size in the message, then the size getFile reports) and while
        reading (a server may send more than it said). A file_id stays valid across
        restarts, so a message answered after one still downloads. Network failures are
        retried once; everything must finish within `timeout` seconds.

        Raises `MediaTooLarge` (over `max_bytes`, or over Telegram's 20 MB for bots) or
        `MediaUnavailable` (gone, unreachable, too slow); their messages are short, say
        what happened, and never contain the file URL (it carries the bot token).
        """
        if not attachment.ref:
            raise MediaUnavailable(f"a {attachment.what or 'message part'} has no file to fetch")
        if attachment.size is not None and attachment.size > max_bytes:
            raise too_large(attachment.size, max_bytes)
        if not self._running:
            raise MediaUnavailable("parley is not connected to Telegram")
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
                    try:
                        return await self._download_once(attachment.ref, max_bytes)
                    except _RetryableDownload as exc:
                        if attempt == _DOWNLOAD_ATTEMPTS:
                            raise MediaUnavailable(str(exc)) from None
                        log.info("telegram: fetching a file failed (%s); trying once more", exc)
        except TimeoutError:
            raise MediaUnavailable(f"Telegram did not deliver the file within {timeout:g}s") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _download_once(self, file_id: str, max_bytes: int) -> bytes:
        try:
            file = await self._bot.get_file(file_id)
        except BadRequest as exc:
            reason = exc.message.lower()
            if "too big" in reason:
                raise MediaTooLarge(
                    f"the file is larger than the {megabytes(DOWNLOAD_LIMIT)} Telegram lets bots download"
                ) from None
            if "file_id" in reason or "unavailable" in reason:
                raise MediaUnavailable("Telegram no longer has this file") from None
            raise MediaUnavailable(f"Telegram refused the file ({exc.message})") from None
        except RetryAfter:
            raise _RetryableDownload("Telegram asked the bot to slow down") from None
        except (TimedOut, NetworkError):  # NetworkError includes 5xx answers
            raise _RetryableDownload("could not reach Telegram") from None
        except TelegramError as exc:
            raise MediaUnavailable(f"Telegram refused the file ({type(exc).__name__})") from None
        if file.file_size is not None and file.file_size > max_bytes:
            raise too_large(file.file_size, max_bytes)
        if not file.file_path:
            raise MediaUnavailable("Telegram gave no way to fetch the file")
        return await self._read_file(file.file_path, max_bytes)

    async def _read_file(self, url: str, max_bytes: int) -> bytes:
        """GET the file URL, stopping as soon as it exceeds `max_bytes` (nothing is written to disk)."""
        if self._files is None:
            # PTB's own HTTP library; no timeout of its own: `download` bounds the whole fetch.
            self._files = httpx.AsyncClient(timeout=None, follow_redirects=False)
        try:
            async with self._files.stream("GET", url) as response:
                if response.status_code == 404:
                    raise MediaUnavailable("Telegram no longer has this file")
                if response.status_code >= 500 or response.status_code == 429:
                    raise _RetryableDownload(f"Telegram's file server answered {response.status_code}")
                if response.status_code != 200:
                    raise MediaUnavailable(f"Telegram's file server answered {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise too_large(int(declared), max_bytes)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise too_large(None, max_bytes)
                return bytes(data)
        except httpx.HTTPError as exc:  # never str(exc): httpx may name the URL, and the URL holds the token
            raise _RetryableDownload(f"could not fetch the file from Telegram ({type(exc).__name__})") from None


def cut_answer(text: str, limit: int = ANSWER_TEXT_LIMIT) -> str:
    """`text` within `limit` characters for answerCallbackQuery, cut with "…" when longer.

    Counted in UTF-16 code units, so the text fits whichever way Telegram counts it.
    """
    if text_length(text, utf16=True) <= limit:
        return text
    kept: list[str] = []
    used = 0
    for char in text:
        size = 2 if ord(char) > 0xFFFF else 1
        if used + size > limit - 1:
            break
        kept.append(char)
        used += size
    return "".join(kept).rstrip() + "…"


class _RetryableDownload(Exception):
    """A download failure worth one more try (network, 5xx, flood control); the text is for people."""


def _seconds(media: Any) -> float | None:
    """A PTB media object's `duration` in seconds (PTB 22 warns that it will become a timedelta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        value = getattr(media, "duration", None)
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _best_photo(sizes: Sequence[PhotoSize], max_bytes: int) -> PhotoSize:
    """The largest size within `max_bytes` (or the smallest, when none is)."""
    fitting = [p for p in sizes if p.file_size is None or p.file_size <= max_bytes]
    if not fitting:
        return min(sizes, key=lambda p: p.width * p.height)
    return max(fitting, key=lambda p: (p.width * p.height, p.file_size or 0))


# Message contents that are no file: one line tells the person what parley can read.
_NOT_FILES = (
    ("location", "location"), ("venue", "place"), ("contact", "contact"), ("poll", "poll"), ("dice", "dice roll"),
    ("game", "game"), ("story", "story"), ("invoice", "invoice"), ("paid_media", "paid media"),
)  # fmt: skip


def message_attachments(msg: Message, *, max_photo_bytes: int = DOWNLOAD_LIMIT) -> tuple[Attachment, ...]:
    """What a Telegram message carries besides text, as parley attachments (kind by content).

    photo → "image" (the largest size within `max_photo_bytes`, JPEG); a document →
    "image", "audio", "document" or "other" by its MIME type or name (`bots.media_kinds`);
    voice, audio and video notes → "audio" with their duration; stickers, videos, GIFs →
    "other" naming what it is; a location, poll, contact... → "other" with no file (an
    empty `ref`), so the person hears what parley can read instead of silence.
    """
    if msg.photo:
        photo = _best_photo(msg.photo, max_photo_bytes)
        return (Attachment("image", photo.file_id, mime="image/jpeg", size=photo.file_size,
                           unique_id=photo.file_unique_id),)
    if msg.sticker is not None:
        sticker = msg.sticker
        mime = "video/webm" if sticker.is_video else "application/x-tgsticker" if sticker.is_animated else "image/webp"
        return (Attachment("other", sticker.file_id, mime=mime, size=sticker.file_size, what="sticker",
                           unique_id=sticker.file_unique_id),)
    if msg.animation is not None:  # before `document`: an animation carries both
        animation = msg.animation
        return (Attachment("other", animation.file_id, mime=animation.mime_type, size=animation.file_size,
                           name=animation.file_name, what="animation", duration=_seconds(animation),
                           unique_id=animation.file_unique_id),)
    if msg.voice is not None:
        voice = msg.voice
        return (Attachment("audio", voice.file_id, mime=voice.mime_type or "audio/ogg", size=voice.file_size,
                           duration=_seconds(voice), unique_id=voice.file_unique_id),)
    if msg.audio is not None:
        audio = msg.audio
        _, _, mime = classify(audio.mime_type, audio.file_name)
        return (Attachment("audio", audio.file_id, mime=mime, size=audio.file_size, name=audio.file_name,
                           duration=_seconds(audio), unique_id=audio.file_unique_id),)
    if msg.video_note is not None:
        note = msg.video_note
        return (Attachment("audio", note.file_id, mime="video/mp4", size=note.file_size, duration=_seconds(note),
                           what="video note", unique_id=note.file_unique_id),)
    if msg.video is not None:
        video = msg.video
        return (Attachment("other", video.file_id, mime=video.mime_type, size=video.file_size, name=video.file_name,
                           what="video", duration=_seconds(video), unique_id=video.file_unique_id),)
    if msg.document is not None:
        document = msg.document
        kind, what, mime = classify(document.mime_type, document.file_name)
        return (Attachment(kind, document.file_id, mime=mime, size=document.file_size, name=document.file_name,
                           what=what, unique_id=document.file_unique_id),)
    for field_name, what in _NOT_FILES:
        if getattr(msg, field_name, None):
            return (Attachment("other", "", what=what),)
    return ()


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
