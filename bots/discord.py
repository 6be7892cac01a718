"""The Discord connector (discord.py).

It turns Discord messages and slash commands into `Inbound` messages for the gateway and
implements the `Outbox` for Discord. Replies never ping @everyone, roles or users from
model output (`AllowedMentions.none()`), and reference the message they answer. Slash
commands are declared from the same registry as Telegram's menu and acknowledged at once
with an ephemeral "thinking…" (only the caller sees it): an answer that concerns the
caller alone (a denial, a usage error, /usage) replaces it, and one for the whole channel
(/new, a /retry's streamed reply) replaces it with a public follow-up -- so what a
stranger's slash command gets is never seen by anyone else. The text-prefix form
(`!model gpt-4.1`) works in any channel the bot can read; its answers are public.

discord.py sleeps through short 429s itself (the request simply takes longer); only a
wait above `max_ratelimit_timeout` surfaces, as `RateLimited`, and so does Cloudflare's
429 without a `Via` header (scope "global": it blocks the whole bot). 429 answers are
counted through an aiohttp trace hook either way. Sends reuse their nonce after an
unknown outcome, so a retried send never posts a message twice. Only people's messages
are read: the bot's own messages (echoed back by the Gateway), other bots, webhooks
and system messages never reach the gateway. `bots.discord_endpoints` points
discord.py at the configured REST base and Gateway URL (proxies, the test fake).

Buttons (`bots.outbox.Button`) go under a message as one action row of button
components (more than five wrap into further rows, at most 25); an edit always states
the components the message has afterwards (`components: []` removes them). A press is a
component interaction: it becomes a `ButtonPress` for `Gateway.on_button`, and the
connector makes sure it is acknowledged exactly once (see `_Press`).

Media: a message's attachments (and stickers) reach the gateway as `Attachment`s whose
`ref` is the attachment's signed CDN URL (see `message_attachments`); `download` fetches
it through discord.py's HTTP client, bounded in bytes and time, in memory only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import aiohttp
import discord
from discord import app_commands

from bots.backoff import PLATFORM_BACKOFF, Backoff
from bots.clock import REAL_CLOCK, Clock
from bots.commands import Command
from bots.discord_endpoints import DEFAULT_API_BASE, DEFAULT_GATEWAY_URL, point_discord_at
from bots.errors import (
    OutboxError,
    RateLimited,
    TargetGone,
    TooLong,
    Transient,
    Undeliverable,
)
from bots.health import PlatformHealth
from bots.inbound import ButtonPress, GroupTrigger, Inbound
from bots.media import Attachment, MediaUnavailable
from bots.media_kinds import bare_mime, classify, too_large
from bots.orphans import send_key, without_key
from bots.outbox import Button, ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy

if TYPE_CHECKING:
    from bots.cluster.budgets import SharedBudgets
    from bots.gateway import Gateway

log = logging.getLogger(__name__)

# parley never joins voice channels; without this every start warns about missing voice libraries.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

DISCORD_LIMITS = PlatformLimits(max_message_len=2000, utf16=False, typing_interval=8.0)

DEFAULT_PACING = PacingPolicy(
    # Message routes: about 5 per 5 s per channel, in fixed windows. A burst of 3 is one
    # early interim edit plus the final edit's reserve (`PacingPolicy.final_reserve`); a
    # larger one let edits bunch at the start, fill Discord's window, and then stall
    # inside discord.py until the window reset (bench/latency.py --platform discord).
    private=Budget(rate=0.9, burst=3),
    group=Budget(rate=0.9, burst=3),
    platform=Budget(rate=40.0, burst=40),  # 50 requests per second per bot, with headroom
)

_NO_PINGS = discord.AllowedMentions.none()
_INTERACTION = "interaction:"
_INTERACTION_TTL = 15 * 60  # interaction tokens stay valid 15 minutes
_THINKING, _PRIVATE, _PUBLIC = "thinking", "private", "public"  # what an interaction's @original is now
_NONCE_TTL = 120.0  # Discord de-duplicates an enforced nonce for "a few minutes"
_DOWNLOAD_ATTEMPTS = 2  # a network failure or 5xx from the CDN is retried once, within the time limit
_BUTTON_STYLES = {
    "primary": discord.ButtonStyle.primary,
    "secondary": discord.ButtonStyle.secondary,
    "success": discord.ButtonStyle.success,
    "danger": discord.ButtonStyle.danger,
}
_LABEL_MAX = 80  # Discord's limit for a button label
_MAX_BUTTONS = 25  # 5 action rows of 5 buttons
_PRESS_ACK_AFTER = 2.0  # seconds: an unanswered press is deferred well inside Discord's 3 s
_LATE_OR_TAKEN = (10062, 40060)  # Unknown interaction, Interaction has already been acknowledged
_NETWORK_ERRORS = (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class _ButtonRow(discord.ui.View):
    """parley's buttons as Discord components: a `discord.ui.View` in form only.

    discord.py takes components only as a View, and keeps every *dispatchable* view it
    sends (any with a custom_id button) in its ViewStore, running the view's item callback
    for each press on that message -- next to the `on_interaction` event parley handles.
    That is a second handler per press: one that acknowledges collides with parley's
    answer (40060), and one that does nothing (discord.py 2.7's default) still keeps the
    view in memory per message until its timeout -- forever with `timeout=None` -- while
    after a restart the buttons stay on screen with no view behind them anyway. So this
    view declares itself not dispatchable: discord.py renders it (`to_components`: action
    rows of buttons, five per row) and never stores it, and every press reaches
    `DiscordConnector.on_interaction` alone, whose `_Press` acknowledges it exactly once.
    Building the component payload by hand instead would mean bypassing discord.py's
    message methods (nonce, rate limits, webhook follow-ups, `components: []` on
    `view=None`); this keeps all of them.
    """

    def __init__(self, buttons: Sequence[Button]) -> None:
        super().__init__(timeout=None)
        for button in buttons:
            self.add_item(
                discord.ui.Button(style=_BUTTON_STYLES[button.style], label=_label(button.label), custom_id=button.data)
            )

    def is_dispatchable(self) -> bool:
        return False  # never stored in discord.py's ViewStore: on_interaction answers presses


def _label(label: str) -> str:
    return label if len(label) <= _LABEL_MAX else label[: _LABEL_MAX - 1] + "…"


def button_view(buttons: Sequence[Button]) -> _ButtonRow | None:
    """The components for `buttons`; None (no components, `components: []` on an edit) for none."""
    if not buttons:
        return None
    if len(buttons) > _MAX_BUTTONS:
        raise Undeliverable(f"Discord shows at most {_MAX_BUTTONS} buttons under a message, not {len(buttons)}")
    return _ButtonRow(buttons)


def shown_buttons(message: discord.Message) -> list[tuple[str | None, str | None, int]]:
    """(label, custom_id, style) of the buttons a message shows, for comparing with `wanted_buttons`."""
    return [
        (c.label, c.custom_id, c.style.value)
        for row in message.components
        for c in getattr(row, "children", ())
        if isinstance(c, discord.Button)
    ]


def wanted_buttons(buttons: Sequence[Button]) -> list[tuple[str | None, str | None, int]]:
    return [(_label(b.label), b.data, _BUTTON_STYLES[b.style].value) for b in buttons]


def translate_error(exc: BaseException) -> OutboxError:
    """Map a discord.py / aiohttp exception to parley's neutral error."""
    if isinstance(exc, discord.RateLimited):
        return RateLimited(exc.retry_after)
    if isinstance(exc, discord.NotFound):
        if exc.code == 10003:
            return Undeliverable("unknown channel")
        return TargetGone(exc.text or "unknown message")
    if isinstance(exc, discord.Forbidden):
        if exc.code == 50005:
            return TargetGone("cannot edit a message authored by another user")
        return Undeliverable(f"forbidden ({exc.code})")
    if isinstance(exc, discord.HTTPException):
        if exc.status == 429:
            # A 429 without `Via` (and a text body) is Cloudflare's, per IP: discord.py does
            # not retry it, and nothing this bot sends gets through until it lifts.
            retry = exc.response.headers.get("Retry-After") if exc.response is not None else None
            return RateLimited(float(retry) if retry else 5.0, scope="global")
        if exc.code == 50035 and "2000" in (exc.text or ""):
            return TooLong(exc.text)
        if exc.status in (401,) and exc.code == 50027:
            return TargetGone("interaction token expired")
        if exc.status >= 500:
            return Transient(f"discord {exc.status}")
        return Undeliverable(f"Discord refused the call ({exc.status}, code {exc.code})")
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return Transient(type(exc).__name__)
    return Transient(repr(exc))


@dataclass(slots=True)
class _Answering:
    """A slash command being answered: its interaction, and what its `@original` is now.

    `_THINKING`: the ephemeral "thinking…" of the deferral; `_PRIVATE`: a private answer
    replaced it; `_PUBLIC`: it was deleted for a public answer, which followed up.
    """

    interaction: discord.Interaction
    since: float
    original: str = _THINKING
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Press:
    """One button press (a component interaction) being acknowledged -- exactly once.

    Discord wants the initial response within 3 s, and exactly one. Two parties may give
    it: the gateway, through `answer` (`ButtonPress.answer`), and the connector's timer
    (`defer_after`), which defers (type 6, DEFERRED_UPDATE_MESSAGE) if the gateway has
    not answered after `DiscordConnector.press_ack_after` seconds. Both decide under one
    lock and mark `acked` *before* calling Discord, so whichever comes second never sends
    a second initial response:

    - `answer(None, _)` first: type 6; `answer(text, _)` first: type 4, ephemeral
      (flags 64: only the presser sees it; Discord has no alert, so `alert` is moot);
    - after the timer's deferral, `answer(text, _)` is an ephemeral follow-up on the
      interaction's webhook and `answer(None, _)` does nothing;
    - a second `answer` does nothing.

    Nothing here raises: "Unknown interaction" (10062, too late) and "Interaction has
    already been acknowledged" (40060) are logged at INFO, anything else at WARNING.
    """

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.lock = asyncio.Lock()
        self.acked = False  # an initial response was sent or attempted: never another
        self.ack_ok = False  # ... and Discord took it (follow-ups need that)
        self.answered = False  # the gateway's answer was given; later ones are no-ops
        self.timer: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.interaction.id}"

    async def answer(self, text: str | None, alert: bool = False) -> None:
        async with self.lock:
            if self.answered:
                log.debug("discord: button press %s was answered already; ignoring another answer", self.key)
                return
            self.answered = True
            if self.timer is not None and self.timer is not asyncio.current_task():
                self.timer.cancel()  # it waits for the lock or sleeps: it has not acknowledged
            if text is not None and len(text) > DISCORD_LIMITS.max_message_len:
                text = text[: DISCORD_LIMITS.max_message_len - 1] + "…"
            response = self.interaction.response
            if not self.acked:
                self.acked = True
                if text:
                    self.ack_ok = await self._call(
                        "answer", response.send_message(content=text, ephemeral=True, allowed_mentions=_NO_PINGS)
                    )
                else:
                    self.ack_ok = await self._call("acknowledge", response.defer())
            elif text and self.ack_ok:
                await self._call(
                    "answer (follow-up)",
                    self.interaction.followup.send(content=text, ephemeral=True, allowed_mentions=_NO_PINGS),
                )
            elif text:
                log.info("discord: button press %s was never acknowledged; its answer is dropped", self.key)

    async def defer_after(self, seconds: float) -> None:
        """Defer the press if nothing acknowledged it within `seconds`."""
        await asyncio.sleep(seconds)
        async with self.lock:
            if self.acked:
                return
            self.acked = True
            log.info("discord: button press %s not answered within %.1fs; deferring it", self.key, seconds)
            self.ack_ok = await self._call("defer", self.interaction.response.defer())

    async def _call(self, what: str, coro: Any) -> bool:
        try:
            await coro
            return True
        except discord.InteractionResponded:  # discord.py's own guard: something answered it already
            log.info("discord: button press %s: %s skipped, already acknowledged", self.key, what)
        except discord.HTTPException as exc:
            level = logging.INFO if exc.code in _LATE_OR_TAKEN else logging.WARNING
            log.log(level, "discord: button press %s: %s failed (%s, code %s: %s)",
                    self.key, what, exc.status, exc.code, exc.text)
        except _NETWORK_ERRORS as exc:
            log.warning("discord: button press %s: %s failed (%s)", self.key, what, translate_error(exc))
        return False


class DiscordOutbox:
    """Send, edit, delete and typing through a discord.py `Client`."""

    platform = "discord"
    limits = DISCORD_LIMITS

    def __init__(self, client: discord.Client, *, clock: Clock = REAL_CLOCK) -> None:
        self._client = client
        self._clock = clock
        self._interactions: dict[str, _Answering] = {}  # interaction id -> its answer so far
        self._unsure: dict[tuple[str, str | None], tuple[int, float]] = {}  # (chat, reply_to) -> (nonce, t)

    def remember_interaction(self, interaction: discord.Interaction) -> str:
        """Keep a deferred interaction so the answer can replace its original response."""
        now = self._clock.now()
        for key in [k for k, a in self._interactions.items() if now - a.since > _INTERACTION_TTL]:
            del self._interactions[key]
        key = str(interaction.id)
        self._interactions[key] = _Answering(interaction, now)
        return _INTERACTION + key

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise translate_error(exc) from None

    def _channel(self, chat: ChatRef) -> discord.PartialMessageable:
        return self._client.get_partial_messageable(int(chat.chat_id))

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
        """Post a new message, replying to `reply_to` (a message id, or a deferred interaction).

        Only the answer to a slash command can be `private` (ephemeral, see
        `_send_interaction`); any other message is seen by everyone in the channel.
        `buttons` go under it (`button_view`), on an ephemeral answer too.

        Sends are idempotent across retries. A send whose outcome is unknown (the
        connection dropped after Discord may have created the message) leaves its nonce
        behind; the next send to the same chat and reply target reuses it with
        `enforce_nonce`, so Discord hands back the message it already created instead of
        posting a second one -- and that message is then edited to the newest text. A
        sender that gives its own key (`bots.orphans.sending_as`, a LiveReply: the key is in
        its journal) gets it as the nonce instead, so this holds across a restart too.
        """
        if reply_to and reply_to.startswith(_INTERACTION):
            return await self._send_interaction(
                chat, text, reply_to[len(_INTERACTION) :], private=private, buttons=buttons
            )
        view = button_view(buttons)
        reference = None
        if reply_to:
            reference = discord.MessageReference(
                message_id=int(reply_to), channel_id=int(chat.chat_id), fail_if_not_exists=False
            )
        slot = (chat.key, reply_to)
        now = self._clock.now()
        given = send_key()
        unsure = self._unsure.pop(slot, None) if given is None else None
        nonce: int | str
        if given is not None:
            nonce = given
        else:
            nonce = unsure[0] if unsure is not None and now - unsure[1] < _NONCE_TTL else secrets.randbits(64)
        channel = self._channel(chat)
        try:
            msg = await self._call(
                channel.send(content=text, reference=reference, allowed_mentions=_NO_PINGS, nonce=nonce, view=view)
            )
        except TargetGone:
            if unsure is None and given is None:
                raise Undeliverable("Discord refused the message as gone") from None
            # The message the earlier attempt created was deleted meanwhile: start afresh.
            with without_key():
                return await self.send(chat, text, reply_to=reply_to, buttons=buttons)
        except OutboxError:
            if given is None:
                self._keep_nonce(slot, nonce, unsure[1] if unsure is not None else now)
            raise
        ref = MessageRef(chat, str(msg.id))
        came_back = unsure is not None or given is not None
        if came_back and (msg.content != text or shown_buttons(msg) != wanted_buttons(buttons)):
            try:  # an earlier attempt's message came back: update it
                await self.edit(ref, text, buttons=buttons)
            except OutboxError:
                if unsure is not None:
                    self._keep_nonce(slot, nonce, unsure[1])
                raise
        return ref

    def _keep_nonce(self, slot: tuple[str, str | None], nonce: int, since: float) -> None:
        """Remember the nonce of a send that may have happened, for the retry to reuse."""
        if len(self._unsure) > 1000:
            now = self._clock.now()
            for stale in [k for k, (_, t) in self._unsure.items() if now - t >= _NONCE_TTL]:
                del self._unsure[stale]
        self._unsure[slot] = (nonce, since)

    async def _send_interaction(
        self, chat: ChatRef, text: str, key: str, *, private: bool, buttons: Sequence[Button] = ()
    ) -> MessageRef:
        """Answer a slash command, which `DiscordConnector._on_slash` deferred ephemerally.

        A private answer replaces the ephemeral "thinking…", or follows up ephemerally
        once that is taken. A public one must not inherit the deferral's ephemeral flag,
        which Discord keeps for a follow-up sent while the response is still loading
        (discord-api-docs#2742): so the "thinking…" is deleted first and the answer follows
        up for everyone; later edits of a streamed reply edit that follow-up.

        When the interaction cannot carry the answer (its 15-minute token expired, it was
        never acknowledged, parley restarted since), a public answer becomes a plain
        message in the channel; so does a private one in a DM, while in a server channel
        it is dropped rather than shown to everyone.

        Buttons ride along either way: on the edited `@original` (an ephemeral message
        with buttons: pressing them is an interaction like any other) or on the follow-up.
        """
        answering = self._interactions.get(key)
        if answering is None:  # expired or unknown
            return await self._without_interaction(chat, text, private=private, buttons=buttons)
        interaction = answering.interaction
        view = button_view(buttons)
        try:
            async with answering.lock:
                if private and answering.original == _THINKING:
                    msg = await self._call(
                        interaction.edit_original_response(content=text, allowed_mentions=_NO_PINGS, view=view)
                    )
                    answering.original = _PRIVATE
                    return MessageRef(chat, str(msg.id), handle=("original", interaction))
                if not private and answering.original == _THINKING:
                    try:
                        await self._call(interaction.delete_original_response())
                    except TargetGone:
                        pass  # dismissed by the caller, or never acknowledged: the follow-up tells
                    answering.original = _PUBLIC
                msg = await self._call(
                    interaction.followup.send(
                        content=text,
                        allowed_mentions=_NO_PINGS,
                        ephemeral=private,
                        wait=True,
                        # a follow-up refuses view=None: no components is "not given"
                        view=view if view is not None else discord.utils.MISSING,
                    )
                )
                return MessageRef(chat, str(msg.id), handle=("followup", msg))
        except TargetGone as exc:
            log.info("discord: interaction %s cannot carry the answer (%s)", key, exc)
            self._interactions.pop(key, None)
            return await self._without_interaction(chat, text, private=private, buttons=buttons)

    async def _without_interaction(
        self, chat: ChatRef, text: str, *, private: bool, buttons: Sequence[Button] = ()
    ) -> MessageRef:
        """A slash command's answer without its interaction: a plain message, never a public private one."""
        if private and not chat.is_private:
            raise Undeliverable("a private answer to a slash command cannot reach its caller alone; not posted")
        return await self.send(chat, text, buttons=buttons)

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False, buttons: Sequence[Button] = ()) -> None:
        """Replace the text and the buttons: `view=None` makes discord.py send `components: []`,
        so an edit without buttons removes any the message had (Discord keeps components
        an edit does not mention). Discord accepts an edit that changes nothing, so this
        never raises `NotModified`."""
        view = button_view(buttons)
        kind, obj = ref.handle if ref.handle else ("message", None)
        if kind == "original":
            await self._call(obj.edit_original_response(content=text, allowed_mentions=_NO_PINGS, view=view))
        elif kind == "followup":
            await self._call(obj.edit(content=text, allowed_mentions=_NO_PINGS, view=view))
        else:
            partial = self._channel(ref.chat).get_partial_message(int(ref.message_id))
            await self._call(partial.edit(content=text, allowed_mentions=_NO_PINGS, view=view))

    async def delete(self, ref: MessageRef) -> None:
        kind, obj = ref.handle if ref.handle else ("message", None)
        if kind == "original":
            await self._call(obj.delete_original_response())
        elif kind == "followup":
            await self._call(obj.delete())
        else:
            await self._call(self._channel(ref.chat).get_partial_message(int(ref.message_id)).delete())

    async def typing(self, chat: ChatRef) -> None:
        await self._call(self._channel(chat).typing())

    async def draft(self, chat: ChatRef, draft_id: int, text: str) -> None:
        raise Undeliverable("Discord has no drafts")

    def measure(self, text: str, *, markdown: bool) -> int:
        return len(text)  # Discord renders Markdown natively and counts the source

    def plain(self, text: str) -> str:
        return text


FATAL_CLOSE_CODES: dict[int, str] = {
    4004: (
        "the Gateway rejected the bot token (close code 4004, authentication failed); it was reset or is wrong: "
        "set discord.token (DISCORD_BOT_TOKEN) to the token of the Developer Portal's Bot page, then restart parley"
    ),
    4010: (
        "the Gateway refused the shard (close code 4010, invalid shard); parley connects unsharded: "
        "check discord.gateway_url, then restart parley"
    ),
    4011: (
        "the bot is in too many servers for one Gateway connection (close code 4011, sharding required); "
        "parley does not shard: remove the bot from servers it need not serve, then restart parley"
    ),
    4012: (
        "the Gateway refused the API version (close code 4012, invalid API version): "
        "upgrade parley (and discord.py), then restart it"
    ),
    4013: (
        "the Gateway refused the intents (close code 4013, invalid intents): "
        "upgrade parley (and discord.py) and report this bug, then restart it"
    ),
    4014: (
        "the Gateway refused the Message Content intent (close code 4014, disallowed intents): enable "
        "Message Content Intent on the Developer Portal's Bot page (Privileged Gateway Intents), then restart parley"
    ),
}
"""Gateway close codes no reconnect can fix, with the cause and the fix for the operator."""


def fatal_close(exc: BaseException) -> str | None:
    """The operator's line when `Client.connect` ended for a reason no retry fixes (else None)."""
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return f"discord: {FATAL_CLOSE_CODES[4014]}"
    if isinstance(exc, discord.LoginFailure):
        return f"discord: {FATAL_CLOSE_CODES[4004]}"
    if isinstance(exc, discord.ConnectionClosed) and exc.code in FATAL_CLOSE_CODES:
        return f"discord: {FATAL_CLOSE_CODES[exc.code]}"
    return None


class DiscordConnector:
    """Receives Discord messages, slash commands and button presses and offers the Discord outbox.

    The Gateway connection is supervised: discord.py reconnects and resumes by itself
    after most closes; when `Client.connect` ends anyway, a close code no reconnect can
    fix (4004, 4010-4014) is reported to `self.health` as fatal, and anything else is
    retried with back-off. Losing the connection marks the platform failing until it
    is back (READY or RESUMED), so `/readyz` can tell.
    """

    platform = "discord"

    def __init__(
        self,
        token: str,
        *,
        api_base: str = DEFAULT_API_BASE,
        gateway_url: str = DEFAULT_GATEWAY_URL,
        command_prefix: str = "!",
        slash_commands: bool = True,
        pacing: PacingPolicy = DEFAULT_PACING,
        clock: Clock = REAL_CLOCK,
        on_rate_limited: Callable[[], None] | None = None,
        ready_timeout: float = 30.0,
        max_ratelimit_timeout: float = 30.0,
        group_trigger: GroupTrigger = GroupTrigger(),
        backoff: Backoff = PLATFORM_BACKOFF,
        shared_budgets: SharedBudgets | None = None,
    ) -> None:
        point_discord_at(api_base, gateway_url)
        self._token = token
        self._backoff = backoff
        self.health = PlatformHealth(self.platform, clock=clock)
        self._started = False  # start() returned: from now on a fatal close is reported, not raised
        self._closing = False
        self._trigger = group_trigger
        self._prefix = command_prefix
        self._slash = slash_commands
        self._ready_timeout = ready_timeout
        self._on_rate_limited = on_rate_limited
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._trace_request_end)
        intents = discord.Intents.default()
        intents.message_content = True
        self.client = discord.Client(
            intents=intents,
            max_ratelimit_timeout=30.0,
            http_trace=trace,
            guild_ready_timeout=0.5,
            chunk_guilds_at_startup=False,
        )
        self.max_ratelimit_timeout = max_ratelimit_timeout
        self.tree = app_commands.CommandTree(self.client)
        self.outbox = DiscordOutbox(self.client, clock=clock)
        self.pacing = Pacing(pacing, clock, shared_budgets)  # shared: cluster mode (bots.cluster.budgets)
        self.drafts = False
        self._gateway: Gateway | None = None
        self._ready = asyncio.Event()
        self._awaited_guilds: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self.press_ack_after = _PRESS_ACK_AFTER
        """Seconds after which a button press the gateway has not answered is deferred by
        the connector (Discord invalidates an interaction not acknowledged within 3 s)."""
        self._press_tasks: set[asyncio.Task[None]] = set()
        for handler in (
            self.on_connect, self.on_resumed, self.on_disconnect, self.on_guild_available, self.on_guild_join,
            self.on_ready, self.on_message, self.on_raw_message_edit, self.on_interaction,
        ):
            self.client.event(handler)

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self.client.is_closed()

    @property
    def max_ratelimit_timeout(self) -> float:
        """The longest 429 discord.py sleeps through itself; longer ones raise `RateLimited`.

        A 429 that surfaces pauses the chat's `Pacer` (every call to that chat waits, and
        interim edits collapse into one); one that discord.py sleeps through only delays
        the call in flight. discord.py's constructor refuses values under 30 s, so a lower
        threshold is set on its HTTP client directly (read on every 429, and by each
        rate-limit bucket created afterwards).
        """
        return self.client.http.max_ratelimit_timeout or 30.0

    @max_ratelimit_timeout.setter
    def max_ratelimit_timeout(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("max_ratelimit_timeout must be positive")
        self.client.http.max_ratelimit_timeout = float(seconds)

    async def start(self, gateway: "Gateway") -> None:
        self._gateway = gateway
        await self.client.login(self._token)  # GET /users/@me: fails fast on a bad token
        if self._slash:
            for command in gateway.commands.all():
                self.tree.add_command(self._slash_command(command))
        self._task = asyncio.create_task(self._supervise(), name="discord-gateway")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # raises the connection error
            raise Transient("the Discord Gateway connection ended before it was ready")
        if ready not in done:
            ready.cancel()
            raise Transient("Discord gateway did not become ready in time")
        if self._slash:
            try:
                await self.tree.sync()
            except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                # The prefix form still works; the menu is registered on the next start.
                log.warning("discord: could not register slash commands: %s", translate_error(exc))
        if self._task.done():  # the connection ended while the commands were registered
            self._task.result()
            raise Transient("the Discord Gateway connection ended during start-up")
        self._started = True  # no pause since the check: a fatal close from now on is reported
        log.info("discord: connected as %s", self.client.user)

    async def _supervise(self) -> None:
        """Run the Gateway connection until `stop()`; never end silently.

        Before `start()` returned, a fatal close is raised (start-up fails with its
        reason); after, it is reported to `self.health`, which makes parley shut down
        and exit with its own status.
        """
        delays = self._backoff.delays()
        while True:
            failure: Exception | None = None
            try:
                await self.client.connect(reconnect=True)
            except Exception as exc:
                failure = exc
            if self._closing:
                return
            reason = fatal_close(failure) if failure is not None else None
            if reason is not None:
                if not self._started:
                    raise Undeliverable(reason.removeprefix("discord: "))
                self.health.fatal(reason)
                return
            cause = describe_gateway_end(failure)
            delay = next(delays)
            if self.health.failing("Gateway connection", cause):
                log.warning("discord: the Gateway connection ended (%s); connecting again in %.1fs", cause, delay)
            await asyncio.sleep(delay)
            if self._closing:
                return
            if self.client.is_closed():  # discord.py closed the client: reopen it and log in again
                self.client.clear()
                try:
                    await self.client.login(self._token)
                except discord.LoginFailure:
                    if self._started:
                        self.health.fatal(f"discord: {FATAL_CLOSE_CODES[4004]}")
                        return
                    raise Undeliverable(FATAL_CLOSE_CODES[4004]) from None
                except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    log.warning("discord: logging in again failed (%s); retrying", translate_error(exc))

    async def stop_receiving(self) -> None:
        """Nothing to do: Discord never redelivers, so messages that still arrive go to the
        gateway, which (no longer accepting) tells their senders to resend after the restart.
        The connection stays up for finishing replies until `stop()`."""

    async def stop(self) -> None:
        self._closing = True
        self._gateway = None
        self._ready.clear()
        presses = list(self._press_tasks)
        for task in presses:
            task.cancel()
        await asyncio.gather(*presses, return_exceptions=True)
        await self.client.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # ends a back-off wait; a connection loop ends by itself once closed
            await asyncio.gather(task, return_exceptions=True)

    # ---- readiness ----------------------------------------------------------------------
    # discord.py fires on_ready only once `guild_ready_timeout` passed without another
    # GUILD_CREATE -- a guess. READY lists every guild of the bot, so parley is ready as
    # soon as each of them has arrived (or at on_ready, whichever comes first).

    async def on_connect(self) -> None:
        """READY arrived: note the guilds still to come."""
        self._connection_back()
        self._awaited_guilds = {g.id for g in self.client.guilds if g.unavailable}
        if not self._awaited_guilds:
            self._ready.set()

    async def on_resumed(self) -> None:
        """The session resumed after a reconnect: nothing was missed."""
        self._connection_back()

    async def on_disconnect(self) -> None:
        """The Gateway connection dropped; discord.py reconnects (or `_supervise` does)."""
        if not self._closing and self.health.failing("Gateway connection", "disconnected; reconnecting"):
            log.info("discord: the Gateway connection dropped; reconnecting")

    def _connection_back(self) -> None:
        streak = self.health.ok()
        if streak is not None:
            seconds, _ = streak
            log.info("discord: the Gateway connection is back after %.1fs", seconds)

    async def on_guild_available(self, guild: discord.Guild) -> None:
        self._awaited_guilds.discard(guild.id)
        if not self._awaited_guilds:
            self._ready.set()

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self.on_guild_available(guild)

    async def on_ready(self) -> None:
        self._ready.set()

    async def _trace_request_end(self, session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429 and self._on_rate_limited is not None:
            self._on_rate_limited()

    # ---- incoming ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if self._gateway is None or not self.from_a_person(message):
            return
        inbound = self.to_inbound(message)
        if inbound is not None:
            await self._gateway.handle(inbound)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A person edited their message: handed over as an edit of it (`Inbound.edit_of`).

        The raw event, not `on_message_edit`: that one fires only for messages still in
        discord.py's cache, and an edit must be seen after a restart too. Discord also
        sends MESSAGE_UPDATE when it adds a link preview (no `edited_timestamp` then):
        not an edit. The edit time makes the update id, so one edit delivered twice (a
        preview added to an edited message repeats it) is stored once.
        """
        message = payload.message
        if self._gateway is None or message.edited_at is None or not self.from_a_person(message):
            return
        inbound = self.to_inbound(message)
        if inbound is not None:
            stamp = int(message.edited_at.timestamp() * 1000)
            await self._gateway.handle(
                replace(inbound, update_id=f"edit:{message.id}:{stamp}", edit_of=str(message.id))
            )

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """A button under one of parley's messages was pressed: hand it to `Gateway.on_button`.

        Slash commands come through the command tree, not here; other components (select
        menus) are not parley's. A bot's press is ignored like a bot's message. The
        gateway's handling runs in a task of its own, next to the timer that defers the
        press if the gateway has not answered in time (`_Press`).
        """
        if interaction.type is not discord.InteractionType.component:
            return
        data: Any = interaction.data or {}
        if data.get("component_type") != discord.ComponentType.button.value:
            return
        gateway = self._gateway
        if gateway is None or interaction.user.bot:
            return
        pending = _Press(interaction)
        press = self.to_press(interaction, pending)
        pending.timer = self._spawn_press(pending.defer_after(self.press_ack_after), f"press-ack-{interaction.id}")
        self._spawn_press(self._run_press(gateway, press), f"press-{interaction.id}")

    def to_press(self, interaction: discord.Interaction, pending: _Press) -> ButtonPress:
        """The platform-neutral press; `chat` is built as for messages (a thread is its own chat)."""
        data: Any = interaction.data or {}
        is_private = isinstance(interaction.channel, discord.DMChannel) or interaction.guild_id is None
        message = interaction.message
        return ButtonPress(
            chat=ChatRef("discord", str(interaction.channel_id), is_private=is_private),
            user_id=str(interaction.user.id),
            message_id=str(message.id) if message is not None else "",
            data=str(data.get("custom_id", "")),
            answer=pending.answer,
            username=interaction.user.name,
            display_name=interaction.user.display_name,
        )

    async def _run_press(self, gateway: "Gateway", press: ButtonPress) -> None:
        try:
            await gateway.on_button(press)
        except Exception:  # on_button answers whatever happens; the timer still acknowledges
            log.exception("discord: a button press in %s failed", press.chat.key)

    def _spawn_press(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._press_tasks.add(task)
        task.add_done_callback(self._press_tasks.discard)
        return task

    def from_a_person(self, message: discord.Message) -> bool:
        """Only what people write is handled: never a bot's message (parley's own output is
        echoed back by the Gateway, so model output can never run a command or start a
        turn), and never a system message (a thread named "!deny chat" is not a command).
        """
        me = self.client.user
        if message.author.bot or message.webhook_id is not None or (me is not None and message.author.id == me.id):
            return False
        return message.type in (discord.MessageType.default, discord.MessageType.reply)

    def to_inbound(self, message: discord.Message) -> Inbound | None:
        me = self.client.user
        if me is None:
            return None
        channel = message.channel
        is_private = isinstance(channel, discord.DMChannel)
        chat = ChatRef("discord", str(channel.id), is_private=is_private)
        mentions = any(u.id == me.id for u in message.mentions)
        text = re.sub(rf"<@!?{me.id}>", "", message.content).strip() if mentions else message.content.strip()
        reply_to_bot, reply_user, reply_name = False, None, None
        resolved = message.reference.resolved if message.reference is not None else None
        if isinstance(resolved, discord.Message):
            reply_to_bot = resolved.author.id == me.id
            reply_user, reply_name = str(resolved.author.id), resolved.author.name
        command, args = None, ""
        if self._prefix and text.startswith(self._prefix):
            name, _, rest = text[len(self._prefix) :].partition(" ")
            if re.fullmatch(r"[A-Za-z0-9_]{1,32}", name):
                command, args = name.lower(), rest.strip()
        return Inbound(
            chat=chat,
            user_id=str(message.author.id),
            text=text,
            message_id=str(message.id),
            update_id=f"message:{message.id}",
            username=message.author.name,
            display_name=message.author.display_name,
            command=command,
            args=args,
            mentions_bot=mentions,
            listening=not is_private and self._trigger.listens(chat.chat_id),
            reply_to_bot=reply_to_bot,
            reply_to_user_id=reply_user,
            reply_to_username=reply_name,
            attachments=message_attachments(message),
        )

    # ---- media ---------------------------------------------------------------------------

    async def download(self, attachment: Attachment, *, max_bytes: int, timeout: float) -> bytes:
        """The bytes of a file a person attached (`attachment.ref` is its CDN URL).

        Fetched through discord.py's own HTTP client (`HTTPClient.get_from_cdn`, what
        `discord.Attachment.read()` uses, so a configured proxy applies). The size
        Discord reported is checked before fetching; discord.py reads the body whole,
        so its length is checked again after (Discord's CDN serves what it declared).
        A network failure or 5xx is retried once; everything must finish within
        `timeout` seconds.

        Discord's attachment URLs are signed and expire (about a day after they were
        issued). parley stores the URL it received with the message, so a message
        answered after a restart uses that stored URL as is: while it is valid the file
        downloads, once it expired (or the message was deleted) this raises
        `MediaUnavailable` -- parley does not look the message up again for a fresh URL.
        """
        if not attachment.ref:
            raise MediaUnavailable(f"a {attachment.what or 'message part'} has no file to fetch")
        if attachment.size is not None and attachment.size > max_bytes:
            raise too_large(attachment.size, max_bytes)
        if self.client.is_closed() or self.client.user is None:
            raise MediaUnavailable("parley is not connected to Discord")
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
                    try:
                        data = await self.client.http.get_from_cdn(attachment.ref)
                        break
                    except (discord.NotFound, discord.Forbidden):
                        raise MediaUnavailable(
                            "Discord no longer serves this file (its link expired or the message was deleted)"
                        ) from None
                    except discord.HTTPException as exc:
                        if exc.status < 500 or attempt == _DOWNLOAD_ATTEMPTS:
                            raise MediaUnavailable(f"Discord's file server answered {exc.status}") from None
                        log.info("discord: fetching a file failed (%s); trying once more", exc.status)
                    except (aiohttp.ClientError, OSError) as exc:
                        if attempt == _DOWNLOAD_ATTEMPTS:
                            raise MediaUnavailable("could not reach Discord's file server") from None
                        log.info("discord: fetching a file failed (%s); trying once more", type(exc).__name__)
        except TimeoutError:
            raise MediaUnavailable(f"Discord did not deliver the file within {timeout:g}s") from None
        if len(data) > max_bytes:
            raise too_large(len(data), max_bytes)
        return data

    def _slash_command(self, command: Command) -> app_commands.Command:
        async def callback(interaction: discord.Interaction, **options: Optional[str]) -> None:
            await self._on_slash(interaction, command, options)

        params = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)]
        for arg in command.args:
            params.append(
                inspect.Parameter(
                    arg.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if arg.required else None,
                    annotation=str if arg.required else Optional[str],
                )
            )
        callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        slash = app_commands.Command(name=command.name, description=command.description[:100], callback=callback)
        if command.args:
            app_commands.describe(**{a.name: a.description[:100] for a in command.args})(slash)
        choices = {a.name: [app_commands.Choice(name=c, value=c) for c in a.choices] for a in command.args if a.choices}
        if choices:
            app_commands.choices(**choices)(slash)
        return slash

    async def _on_slash(self, interaction: discord.Interaction, command: Command, options: dict[str, Any]) -> None:
        # Acknowledge within Discord's 3 s at once, ephemerally: whoever runs a command (a
        # stranger too) sees "thinking…", nobody else does. The answer replaces it, in
        # private or for everyone (DiscordOutbox._send_interaction).
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
        except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # Too late (10062) or already answered: the command still runs, and a public
            # answer goes to the channel as a plain message; a private one does not.
            log.warning("discord: could not acknowledge /%s: %s", command.name, translate_error(exc))
        if self._gateway is None:
            return
        reply_to = self.outbox.remember_interaction(interaction)
        args = " ".join(str(getattr(options[a.name], "value", options[a.name]))
                        for a in command.args if options.get(a.name))
        channel = interaction.channel
        is_private = isinstance(channel, discord.DMChannel) or interaction.guild_id is None
        chat = ChatRef("discord", str(interaction.channel_id), is_private=is_private)
        await self._gateway.handle(
            Inbound(
                chat=chat,
                user_id=str(interaction.user.id),
                text=f"/{command.name} {args}".strip(),
                message_id=reply_to,
                update_id=f"interaction:{interaction.id}",
                username=interaction.user.name,
                display_name=interaction.user.display_name,
                command=command.name,
                args=args,
                expects_answer=True,
            )
        )


def message_attachments(message: discord.Message) -> tuple[Attachment, ...]:
    """A Discord message's files and stickers as parley attachments.

    Kind by content type, or by file name when Discord gives none (`bots.media_kinds`);
    a voice message (flag IS_VOICE_MESSAGE: `duration_secs` and `waveform` set) is
    "audio" with its duration; a sticker is "other"/"sticker". `ref` is the URL to
    fetch, `unique_id` the attachment's (or sticker's) id.
    """
    found: list[Attachment] = []
    for item in message.attachments:
        if item.is_voice_message() or message.flags.voice:
            mime = bare_mime(item.content_type) or "audio/ogg"
            found.append(Attachment("audio", item.url, mime=mime, size=item.size, name=item.filename,
                                    duration=item.duration, unique_id=str(item.id)))
            continue
        kind, what, mime = classify(item.content_type, item.filename)
        found.append(Attachment(kind, item.url, mime=mime, size=item.size, name=item.filename, what=what,
                                duration=item.duration, unique_id=str(item.id)))
    for sticker in message.stickers:
        found.append(Attachment("other", sticker.url, what="sticker", unique_id=str(sticker.id)))
    return tuple(found)


def describe_gateway_end(exc: BaseException | None) -> str:
    """Why `Client.connect` returned, in a few words (discord.py's texts carry no token)."""
    if exc is None:
        return "the connection was closed"
    if isinstance(exc, discord.ConnectionClosed):
        return f"closed with code {exc.code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def check(token: str, api_base: str, gateway_url: str) -> str:
    """For `parley check`: log in over REST with this token (GET /users/@me); returns the bot's name."""
    point_discord_at(api_base, gateway_url)
    client = discord.Client(intents=discord.Intents.none())
    try:
        await client.login(token)
        return str(client.user)
    except discord.LoginFailure:
        raise Undeliverable("the token was rejected (401 Unauthorized)") from None
    except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise translate_error(exc) from None
    finally:
        await client.close()
