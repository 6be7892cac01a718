"""The Discord connector (discord.py).

It turns Discord messages and slash commands into `Inbound` messages for the gateway and
implements the `Outbox` for Discord. Replies never ping @everyone, roles or users from
model output (`AllowedMentions.none()`), and reference the message they answer. Slash
commands are declared from the same registry as Telegram's menu, acknowledged at once
(deferred) and answered by editing the original response; the text-prefix form
(`!model gpt-4.1`) works in any channel the bot can read.

discord.py sleeps through short 429s itself (the request simply takes longer); only a
wait above `max_ratelimit_timeout` surfaces, as `RateLimited`. 429 answers are counted
through an aiohttp trace hook either way. `bots.discord_endpoints` points discord.py at
the configured REST base and Gateway URL (proxies, the test fake).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import aiohttp
import discord
from discord import app_commands

from bots.clock import REAL_CLOCK, Clock
from bots.commands import Command
from bots.discord_endpoints import DEFAULT_API_BASE, DEFAULT_GATEWAY_URL, point_discord_at
from bots.errors import (
    NotModified,
    OutboxError,
    RateLimited,
    TargetGone,
    TooLong,
    Transient,
    Undeliverable,
)
from bots.inbound import Inbound
from bots.outbox import ChatRef, MessageRef, PlatformLimits
from bots.pacing import Budget, Pacing, PacingPolicy

if TYPE_CHECKING:
    from bots.gateway import Gateway

log = logging.getLogger(__name__)

DISCORD_LIMITS = PlatformLimits(max_message_len=2000, utf16=False, typing_interval=8.0)

DEFAULT_PACING = PacingPolicy(
    private=Budget(rate=0.9, burst=4),  # message routes: about 5 per 5 s per channel
    group=Budget(rate=0.9, burst=4),
    platform=Budget(rate=40.0, burst=40),  # 50 requests per second per bot, with headroom
)

_NO_PINGS = discord.AllowedMentions.none()
_INTERACTION = "interaction:"
_INTERACTION_TTL = 15 * 60  # interaction tokens stay valid 15 minutes


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
        if exc.status == 429:  # a 429 discord.py did not honour (no Via header: Cloudflare)
            retry = exc.response.headers.get("Retry-After") if exc.response is not None else None
            return RateLimited(float(retry) if retry else 5.0)
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


class DiscordOutbox:
    """Send, edit, delete and typing through a discord.py `Client`."""

    platform = "discord"
    limits = DISCORD_LIMITS

    def __init__(self, client: discord.Client) -> None:
        self._client = client
        self._interactions: dict[str, tuple[discord.Interaction, float, bool]] = {}  # id -> (it, t, original used)

    def remember_interaction(self, interaction: discord.Interaction) -> str:
        now = time.monotonic()
        for key in [k for k, (_, t, _) in self._interactions.items() if now - t > _INTERACTION_TTL]:
            del self._interactions[key]
        key = str(interaction.id)
        self._interactions[key] = (interaction, now, False)
        return _INTERACTION + key

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (discord.DiscordException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise translate_error(exc) from None

    def _channel(self, chat: ChatRef) -> discord.PartialMessageable:
        return self._client.get_partial_messageable(int(chat.chat_id))

    async def send(self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None) -> MessageRef:
        if reply_to and reply_to.startswith(_INTERACTION):
            return await self._send_interaction(chat, text, reply_to[len(_INTERACTION) :])
        reference = None
        if reply_to:
            reference = discord.MessageReference(
                message_id=int(reply_to), channel_id=int(chat.chat_id), fail_if_not_exists=False
            )
        msg = await self._call(self._channel(chat).send(content=text, reference=reference, allowed_mentions=_NO_PINGS))
        return MessageRef(chat, str(msg.id))

    async def _send_interaction(self, chat: ChatRef, text: str, key: str) -> MessageRef:
        entry = self._interactions.get(key)
        if entry is None:  # expired or unknown: a plain message in the channel still reaches the user
            return await self.send(chat, text)
        interaction, t, used = entry
        if not used:
            self._interactions[key] = (interaction, t, True)
            msg = await self._call(interaction.edit_original_response(content=text, allowed_mentions=_NO_PINGS))
            return MessageRef(chat, str(msg.id), handle=("original", interaction))
        msg = await self._call(interaction.followup.send(content=text, allowed_mentions=_NO_PINGS, wait=True))
        return MessageRef(chat, str(msg.id), handle=("followup", msg))

    async def edit(self, ref: MessageRef, text: str, *, markdown: bool = False) -> None:
        kind, obj = ref.handle if ref.handle else ("message", None)
        if kind == "original":
            await self._call(obj.edit_original_response(content=text, allowed_mentions=_NO_PINGS))
        elif kind == "followup":
            await self._call(obj.edit(content=text, allowed_mentions=_NO_PINGS))
        else:
            partial = self._channel(ref.chat).get_partial_message(int(ref.message_id))
            await self._call(partial.edit(content=text, allowed_mentions=_NO_PINGS))

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


class DiscordConnector:
    """Receives Discord messages and slash commands and offers the Discord outbox."""

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
    ) -> None:
        point_discord_at(api_base, gateway_url)
        self._token = token
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
        self.tree = app_commands.CommandTree(self.client)
        self.outbox = DiscordOutbox(self.client)
        self.pacing = Pacing(pacing, clock)
        self.drafts = False
        self._gateway: Gateway | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.client.event(self.on_ready)
        self.client.event(self.on_message)

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self.client.is_closed()

    async def start(self, gateway: "Gateway") -> None:
        self._gateway = gateway
        await self.client.login(self._token)  # GET /users/@me: fails fast on a bad token
        if self._slash:
            for command in gateway.commands.all():
                self.tree.add_command(self._slash_command(command))
        self._task = asyncio.create_task(self.client.connect(reconnect=True), name="discord-gateway")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            ready.cancel()
            self._task.result()  # raises the connection error
        if ready not in done:
            ready.cancel()
            raise Transient("Discord gateway did not become ready in time")
        if self._slash:
            try:
                await self.tree.sync()
            except discord.HTTPException as exc:
                log.warning("discord: could not register slash commands: %s", translate_error(exc))
        log.info("discord: connected as %s", self.client.user)

    async def stop_receiving(self) -> None:
        """Ignore new messages from now on; the connection stays up for finishing replies."""
        self._gateway = None

    async def stop(self) -> None:
        self._gateway = None
        self._ready.clear()
        await self.client.close()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                pass

    async def on_ready(self) -> None:
        self._ready.set()

    async def _trace_request_end(self, session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429 and self._on_rate_limited is not None:
            self._on_rate_limited()

    # ---- incoming ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or self._gateway is None:
            return  # never our own messages: model output cannot trigger anything
        inbound = self.to_inbound(message)
        if inbound is not None:
            await self._gateway.handle(inbound)

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
            reply_to_bot=reply_to_bot,
            reply_to_user_id=reply_user,
            reply_to_username=reply_name,
        )

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
        return slash

    async def _on_slash(self, interaction: discord.Interaction, command: Command, options: dict[str, Any]) -> None:
        # Acknowledge within Discord's 3 s at once; the answer edits the original response.
        await interaction.response.defer(thinking=True)
        if self._gateway is None:
            return
        reply_to = self.outbox.remember_interaction(interaction)
        args = " ".join(str(options[a.name]) for a in command.args if options.get(a.name))
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
