"""The admin commands: declared once, exposed on every platform.

Each `Command` names itself, says who may run it and what arguments it takes, and has
one handler. The Telegram connector turns the registry into its `setMyCommands` menu, the
Discord connector into slash commands plus a text-prefix form, and the console accepts
them as typed -- so /model behaves the same everywhere.

Every call checks the caller's role, including subcommands that need more power than
the command itself (viewing /model is for users, switching it is for admins). A bad
argument gets a one-line usage message (`CommandError`), never a stack trace. Only
messages that people send reach this module: the model's output is never parsed for
commands.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Awaitable, Callable

from bots.access import Role
from bots.errors import ParleyError
from bots.ids import one_line, quote_input, user_id_problem
from bots.inbound import Inbound
from bots.logs import url_without_secrets
from bots.model_choice import ChoiceRefused
from bots.outbox import Button
from bots.store import ChatSettings

if TYPE_CHECKING:
    from bots.gateway import Gateway

log = logging.getLogger(__name__)


class CommandError(ParleyError):
    """Bad use of a command; the message is shown to the user as is."""


class PermissionDenied(CommandError):
    """The caller's role is too weak for what they asked."""


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a command (also a Discord slash-command option)."""

    name: str
    description: str
    required: bool = False
    choices: tuple[str, ...] = ()
    rest: bool = False  # takes the rest of the line (free text)


Handler = Callable[["CommandContext"], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    description: str
    role: Role
    handler: Handler
    args: tuple[Arg, ...] = ()
    aliases: tuple[str, ...] = ()
    runs_turn: bool = False  # /retry: starts a turn in the chat's lane instead of replying
    private: bool = False  # the answer concerns the caller alone (Discord: ephemeral)

    @property
    def usage(self) -> str:
        parts = [f"/{self.name}"]
        for arg in self.args:
            label = "|".join(arg.choices) if arg.choices else arg.name
            parts.append(f"<{label}>" if arg.required else f"[{label}]")
        return " ".join(parts)


@dataclass(slots=True)
class CommandContext:
    """Everything a handler may use: who asked, where, and the gateway's services."""

    inbound: Inbound
    role: Role
    gateway: "Gateway"
    command: Command
    # Whether the answer concerns the caller alone: denials, usage errors, what only they
    # asked to see. Connectors that can (Discord) show such answers to the caller only.
    private: bool = False
    # Buttons under the answer (the /model picker); a press reaches `Gateway.on_button`.
    buttons: list[Button] = field(default_factory=list)

    @property
    def args(self) -> str:
        return self.inbound.args.strip()

    def words(self) -> list[str]:
        return self.args.split()

    def require(self, role: Role, what: str) -> None:
        if self.role < role:
            raise PermissionDenied(f"Only {role.label}s can {what}.")

    def bad_usage(self, hint: str = "") -> CommandError:
        return CommandError(f"Usage: {self.command.usage}" + (f" — {hint}" if hint else ""))

    async def target_user(self, token: str | None) -> str:
        """Resolve a user given by id, @username, mention, or by replying to their message."""
        platform = self.inbound.platform
        if not token:
            if self.inbound.reply_to_user_id:
                return f"{platform}:{self.inbound.reply_to_user_id}"
            raise self.bad_usage("name a user by id or @username, or reply to one of their messages")
        token = token.strip()
        m = re.fullmatch(r"<@!?(\d+)>", token)  # a Discord mention
        if m:
            return _user_key(platform, m.group(1))
        m = re.fullmatch(r"(telegram|discord|console):@?(\w+)", token)
        if m:  # a user key, possibly of another platform: "discord:9001", "telegram:@alice"
            platform, token = m.group(1), m.group(2)
        if re.fullmatch(r"[-+]?\d+", token):
            return _user_key(platform, token)
        if not re.fullmatch(r"@?\w{1,32}", token):
            raise CommandError(
                f"{quote_input(token)} is not a user: name one by id or @username, or reply to one of their messages."
            )
        found = await self.gateway.store.find_user(platform, token.lstrip("@"))
        if found is None:
            raise CommandError(
                f"I don't know {token} yet: they need to write to me once, or use their numeric id "
                "(or reply to one of their messages)."
            )
        return found

    async def who(self, user_key: str) -> str:
        """A user as people know them, plus the key to act on them: "@alice (telegram:61)".

        The bare key when parley never saw the user (they have not written yet). The key
        stays in the answer because it is what an admin types next (/deny telegram:61).
        """
        known = await self.gateway.store.known_user(user_key)
        username, display = known if known is not None else (None, None)
        if username:
            return f"@{username} ({user_key})"
        name = " ".join("".join(ch if ch.isprintable() else " " for ch in display or "").split())
        if not name:
            return user_key
        if len(name) > 32:
            name = name[:31].rstrip() + "…"
        return f"{name} ({user_key})"

    # ---- the role ladder: owner > admin > user > blocked --------------------------------

    async def may_change_user(self, target: str, thing: str, *, set_by: str | None) -> None:
        """Refuse (saying who can) what would let someone overrule the role ladder.

        Nobody changes a setting that applies to themselves (owners excepted: nobody is
        above them), nobody acts on a user of their own role or higher, and nobody undoes
        what a higher role decided (`set_by`: who made the current setting). `thing` names
        the setting: "access", "budget", "role".
        """
        me = self.inbound.user_key
        if target == me:
            if self.role < Role.OWNER:
                raise PermissionDenied(f"You can't change your own {thing}; only an owner can.")
            return
        theirs = await self.gateway.access.role_of(target)
        if theirs == Role.OWNER:
            raise PermissionDenied(f"{await self.who(target)} is an owner; nobody else can change their {thing}.")
        if theirs >= self.role:
            raise PermissionDenied(
                f"{await self.who(target)} is an {theirs.label} like you; only an owner can change their {thing}."
            )
        await self._not_overruling(set_by, f"{await self.who(target)}'s {thing}")

    async def may_change_setting(self, settings: ChatSettings, field: str, thing: str) -> None:
        """Refuse changing a chat setting that someone of a higher role made."""
        await self._not_overruling(settings.set_by.get(field), f"this chat's {thing}")

    async def _not_overruling(self, set_by: str | None, what: str) -> None:
        if set_by is None or set_by == self.inbound.user_key:
            return
        setter = await self.gateway.access.role_of(set_by)
        if setter > self.role:
            raise PermissionDenied(f"An {setter.label} set {what}; only an {setter.label} can change it.")


def _user_key(platform: str, ident: str) -> str:
    """`platform:ident` for an id someone typed, refused unless the platform could send it."""
    problem = user_id_problem(platform, ident)
    if problem:
        raise CommandError(f"{quote_input(ident)} is not a user id: {problem}.")
    return f"{platform}:{ident}"


class CommandRegistry:
    """The one list of commands every connector exposes."""

    def __init__(self, commands: list[Command] | None = None) -> None:
        self._by_name: dict[str, Command] = {}
        self._ordered: list[Command] = []
        for cmd in commands or []:
            self.add(cmd)

    def add(self, command: Command) -> None:
        for name in (command.name, *command.aliases):
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise ValueError(f"invalid command name {name!r}")
            if name in self._by_name:
                raise ValueError(f"command {name!r} declared twice")
            self._by_name[name] = command
        self._ordered.append(command)

    def get(self, name: str) -> Command | None:
        return self._by_name.get(name.lower())

    def all(self) -> list[Command]:
        return list(self._ordered)

    def visible_to(self, role: Role) -> list[Command]:
        return [c for c in self._ordered if role >= c.role]

    async def run(self, ctx: CommandContext) -> str:
        """Run a command after checking the caller may; errors become one-line replies."""
        ctx.private = ctx.private or ctx.command.private
        if ctx.role < ctx.command.role:
            ctx.private = True
            return f"⛔ /{ctx.command.name} is for {ctx.command.role.label}s only."
        try:
            return await ctx.command.handler(ctx)
        except PermissionDenied as exc:
            ctx.private = True
            return f"⛔ {exc}"
        except CommandError as exc:
            ctx.private = True
            return str(exc)
        except Exception:
            ctx.private = True
            # A bug or a failing database: the log gets the details, the chat one calm line.
            log.exception("command /%s failed in chat %s", ctx.command.name, ctx.inbound.chat.key)
            return f"⚠️ /{ctx.command.name} failed. Please try again in a moment."


# ---- the built-in commands ------------------------------------------------------------


async def _help(ctx: CommandContext) -> str:
    lines = ["Commands you can use here:"]
    for cmd in ctx.gateway.commands.visible_to(ctx.role):
        lines.append(f"{cmd.usage} — {cmd.description}")
    return "\n".join(lines)


async def _may_control_others(ctx: CommandContext) -> bool:
    """Whether the caller may stop other people's replies and reset a shared conversation.

    In a group one member must not be able to cut everyone else off: that takes an admin,
    unless the chat's `control` (or `chat.group_control`) says "everyone".
    """
    if ctx.inbound.chat.is_private or ctx.role >= Role.ADMIN:
        return True
    settings = await ctx.gateway.store.chat_settings(_group(ctx))
    return (settings.control or ctx.gateway.defaults.group_control) == "everyone"


async def _new(ctx: CommandContext) -> str:
    gw = ctx.gateway
    session_key = gw.session_key(ctx.inbound)
    if session_key == ctx.inbound.chat.key and not await _may_control_others(ctx):
        raise PermissionDenied("Only admins can start a new conversation for the whole group here.")
    if session_key == ctx.inbound.chat.key:
        # The chat's one conversation ends: so does its running reply and its queue.
        gw.lanes.stop(ctx.inbound.chat.key)
    # (With a session per user in a group, the lane is shared: others' turns go on.)
    await gw.store.new_session(session_key)
    return "🆕 Started a new conversation."


async def _stop(ctx: CommandContext) -> str:
    lanes, key = ctx.gateway.lanes, ctx.inbound.chat.key
    if await _may_control_others(ctx):
        running, dropped = lanes.stop(key)
        if not running and not dropped:
            ctx.private = True
            return "Nothing is running."
        return "⏹️ Stopped." + _dropped_text(dropped)
    # A member in a group: their own reply and their own queued messages, nobody else's.
    me = ctx.inbound.user_key
    current = lanes.running(key)
    dropped = lanes.drop_queued(key, me)
    mine = current is not None and current.user_key == me
    if mine:
        lanes.stop(key, clear_queue=False)
        return "⏹️ Stopped." + _dropped_text(dropped)
    if current is None:
        ctx.private = not dropped
        return "⏹️ Stopped." + _dropped_text(dropped) if dropped else "Nothing is running."
    others = "The reply being written is someone else's; only admins can stop it."
    if dropped:
        return f"⏹️ Dropped {dropped} of your queued message{'s' if dropped != 1 else ''}. {others}"
    ctx.private = True
    return "⛔ " + others


def _dropped_text(dropped: int) -> str:
    return f" Dropped {dropped} queued message{'s' if dropped != 1 else ''}." if dropped else ""


async def _control(ctx: CommandContext) -> str:
    gw = ctx.gateway
    if ctx.inbound.chat.is_private:
        raise CommandError("/control is for groups: in a private chat only you can stop your replies.")
    group = _group(ctx)
    settings = await gw.store.chat_settings(group)
    if not ctx.args:
        current = settings.control or gw.defaults.group_control
        suffix = "" if settings.control else " (default)"
        return f"Who may stop others' replies and reset the group: {current}{suffix}."
    if ctx.args not in ("admins", "everyone"):
        raise ctx.bad_usage()
    await ctx.may_change_setting(settings, "control", "control setting")
    await gw.store.update_chat_settings(group, by=ctx.inbound.user_key, control=ctx.args)
    if ctx.args == "everyone":
        return "Everyone here may now stop any reply and reset the group's conversation."
    return "Only admins may now stop others' replies or reset the group's conversation."


async def _retry(ctx: CommandContext) -> str:
    return await ctx.gateway.retry(ctx.inbound)


async def _usage(ctx: CommandContext) -> str:
    gw = ctx.gateway
    scope = ctx.args
    day = _today()
    month = day.replace(day=1)
    kw: dict[str, str] = {}
    if not scope or scope == "me":
        kw, title = {"user_key": ctx.inbound.user_key}, "Your usage"
    elif scope == "chat":
        ctx.require(Role.ADMIN, "see a chat's usage")
        kw, title = {"chat_key": ctx.inbound.chat.key}, "This chat's usage"
    elif scope == "all":
        ctx.require(Role.ADMIN, "see everyone's usage")
        title = "Everyone's usage"
    else:
        ctx.require(Role.ADMIN, "see another user's usage")
        user = await ctx.target_user(scope)
        kw, title = {"user_key": user}, f"Usage of {await ctx.who(user)}"
    lines = [title + ":"]
    for label, since in (("today", day), ("this month", month)):
        rows = await gw.store.usage(since=since, **kw)
        if not rows:
            lines.append(f"• {label}: nothing yet")
            continue
        total = sum(r.prompt + r.completion for r in rows)
        estimated = sum(r.estimated for r in rows)
        cost = [r.cost for r in rows if r.cost is not None]
        money = f", {_about(estimated)}{_dollars(sum(cost))}" if cost else ""
        turns = sum(r.turns for r in rows)
        lines.append(
            f"• {label}: {_about(estimated)}{total:,} tokens in {turns} turn{'' if turns == 1 else 's'}{money}"
            + _estimated_note(estimated, total)
        )
        for r in rows:
            about = _about(r.estimated)
            reasoning = f" ({r.reasoning:,} reasoning)" if r.reasoning else ""
            lines.append(f"    {r.model}: {about}{r.prompt:,} in / {about}{r.completion:,} out tokens{reasoning}")
    return "\n".join(lines)


def _dollars(amount: float) -> str:
    """"$0.0123"; an amount too small to show in 4 decimals is "under $0.0001", never "$0.0000"."""
    if 0 < amount < 0.00005:
        return "under $0.0001"
    return f"${amount:.4f}"


def _today() -> datetime:
    """Midnight UTC: where the day's usage and budgets start."""
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _about(estimated: int) -> str:
    """"~" before numbers that are (partly) estimates: turns cut off before the provider reported usage."""
    return "~" if estimated else ""


def _estimated_note(estimated: int, total: int) -> str:
    if not estimated:
        return ""
    return " (estimated)" if estimated >= total else f" ({estimated:,} tokens estimated)"


async def _model(ctx: CommandContext) -> str:
    """Show the model with a button per model the caller may pick, or pick one by name.

    Who may pick, and for whom, is `chat.model_choice` (`bots.model_choice`)."""
    gw = ctx.gateway
    chat = ctx.inbound.chat
    choice = gw.model_choice
    allowed = choice.allowed(ctx.role)
    available = ", ".join(choice.label(m) for m in allowed)
    if not ctx.args:
        ctx.private = True  # what the caller asked to see
        settings = await gw.store.chat_settings(chat.key)
        current = await choice.current(chat, ctx.inbound.user_key, settings.model)
        text, ctx.buttons = choice.picker(current, ctx.role, chat)
        return text
    typed = ctx.args
    name = None if typed == "default" else choice.resolve(typed, ctx.role)
    if typed != "default" and name is None:
        raise CommandError(f"Unknown model {quote_input(typed)}. Available: {available}")
    try:
        return await choice.choose(chat, ctx.inbound.user_key, ctx.role, name)
    except ChoiceRefused as refused:
        raise PermissionDenied(str(refused)) from None


async def _system(ctx: CommandContext) -> str:
    gw = ctx.gateway
    key = ctx.inbound.chat.key
    if not ctx.args:
        settings = await gw.store.chat_settings(key)
        prompt = settings.system_prompt or gw.defaults.system_prompt
        suffix = "" if settings.system_prompt else " (default)"
        return f"System prompt{suffix}:\n{prompt}"
    if len(ctx.args) > 8000:
        raise CommandError("That system prompt is too long (8000 characters at most).")
    await ctx.may_change_setting(await gw.store.chat_settings(key), "system_prompt", "system prompt")
    if ctx.args == "reset":
        await gw.store.update_chat_settings(key, by=ctx.inbound.user_key, system_prompt=None)
        return "System prompt reset to the default."
    await gw.store.update_chat_settings(key, by=ctx.inbound.user_key, system_prompt=ctx.args)
    return "System prompt updated for this chat."


async def _mode(ctx: CommandContext) -> str:
    gw = ctx.gateway
    key = ctx.inbound.chat.key
    if not ctx.args:
        settings = await gw.store.chat_settings(key)
        policy = settings.busy_policy or gw.defaults.busy_policy
        suffix = "" if settings.busy_policy else " (default)"
        return f"Busy policy: {policy}{suffix} — new messages {_BUSY_POLICIES[policy]}."
    if ctx.args not in _BUSY_POLICIES:
        raise ctx.bad_usage()
    await ctx.may_change_setting(await gw.store.chat_settings(key), "busy_policy", "busy policy")
    await gw.store.update_chat_settings(key, by=ctx.inbound.user_key, busy_policy=ctx.args)
    return f"Busy policy set to {ctx.args}: new messages {_BUSY_POLICIES[ctx.args]}."


_BUSY_POLICIES = {"queue": "wait in a queue", "interrupt": "interrupt the running reply"}


async def _stream(ctx: CommandContext) -> str:
    gw = ctx.gateway
    key = ctx.inbound.chat.key
    if not ctx.args:
        settings = await gw.store.chat_settings(key)
        on = gw.defaults.streaming if settings.streaming is None else settings.streaming
        suffix = " (default)" if settings.streaming is None else ""
        return f"Streaming is {'on' if on else 'off'}{suffix}."
    if ctx.args not in ("on", "off"):
        raise ctx.bad_usage()
    await ctx.may_change_setting(await gw.store.chat_settings(key), "streaming", "streaming setting")
    await gw.store.update_chat_settings(key, by=ctx.inbound.user_key, streaming=ctx.args == "on")
    return f"Streaming {ctx.args}."


def _is_chat_word(ctx: CommandContext) -> bool:
    return ctx.args in ("chat", "group")


async def _allow(ctx: CommandContext) -> str:
    gw = ctx.gateway
    if _is_chat_word(ctx):
        if ctx.inbound.chat.is_private:
            raise CommandError("/allow chat is for groups: it lets everyone in the group use the bot.")
        await ctx.may_change_setting(await gw.store.chat_settings(_group(ctx)), "allowed", "access")
        await gw.store.update_chat_settings(_group(ctx), by=ctx.inbound.user_key, allowed=True)
        return "✅ Everyone in this chat may now use the bot."
    user = await ctx.target_user(ctx.args)
    current = await gw.access.role_of(user)
    if current >= Role.ADMIN:
        return f"{await ctx.who(user)} is already an {current.label}."
    await ctx.may_change_user(user, "access", set_by=await gw.store.role_granted_by(user))
    if current == Role.USER and await gw.store.role(user) == "user":
        return f"{await ctx.who(user)} may use the bot already."
    await gw.store.set_role(user, "user", by=ctx.inbound.user_key)
    if current == Role.BLOCKED:
        return f"✅ {await ctx.who(user)} is no longer blocked and may use the bot."
    return f"✅ {await ctx.who(user)} may now use the bot."


async def _deny(ctx: CommandContext) -> str:
    gw = ctx.gateway
    if _is_chat_word(ctx):
        if ctx.inbound.chat.is_private:
            raise CommandError("/deny chat is for groups.")
        await ctx.may_change_setting(await gw.store.chat_settings(_group(ctx)), "allowed", "access")
        await gw.store.update_chat_settings(_group(ctx), by=ctx.inbound.user_key, allowed=False)
        return "🚫 This chat is no longer allowed as a whole.\nOnly allowed users may use the bot here."
    user = await ctx.target_user(ctx.args)
    current = await gw.access.role_of(user)
    if current == Role.OWNER:
        raise PermissionDenied("Owners are set in the configuration and cannot be denied from chat.")
    if current == Role.ADMIN and user != ctx.inbound.user_key:
        ctx.require(Role.OWNER, "deny an admin")
    await ctx.may_change_user(user, "access", set_by=await gw.store.role_granted_by(user))
    if current == Role.BLOCKED:
        return f"{await ctx.who(user)} is blocked already."
    await gw.store.set_role(user, "blocked", by=ctx.inbound.user_key)
    return f"🚫 {await ctx.who(user)} may no longer use the bot."


async def _admins(ctx: CommandContext) -> str:
    gw = ctx.gateway
    lines = []
    for title, keys in (
        ("Owners (set in the configuration)", sorted(gw.access.policy.owners)),
        ("Admins", await gw.store.users_with_role("admin")),
    ):
        if not keys:
            lines.append(f"{title}: none")
            continue
        lines.append(f"{title}:")
        lines += [f"  {await ctx.who(k)}" for k in keys]
    return "\n".join(lines)


async def _promote(ctx: CommandContext) -> str:
    gw = ctx.gateway
    user = await ctx.target_user(ctx.args)
    role = await gw.access.role_of(user)
    who = await ctx.who(user)
    if role == Role.OWNER:
        return f"{who} is an owner already."
    if role == Role.ADMIN:
        return f"{who} is an admin already."
    if role == Role.BLOCKED:
        # Never lift a block as a side effect: unblocking is its own, deliberate step.
        raise CommandError(f"{who} is blocked.\nSend /allow {user} first, then /promote.")
    await gw.store.set_role(user, "admin", by=ctx.inbound.user_key)
    return f"⭐ {who} is now an admin."


async def _demote(ctx: CommandContext) -> str:
    gw = ctx.gateway
    user = await ctx.target_user(ctx.args)
    role = await gw.access.role_of(user)
    who = await ctx.who(user)
    if role == Role.OWNER:
        raise PermissionDenied("Owners are set in the configuration and cannot be demoted from chat.")
    if role == Role.BLOCKED:
        return f"{who} is blocked, not an admin (/allow lifts the block)."
    if role != Role.ADMIN:
        return f"{who} is not an admin."
    await gw.store.set_role(user, "user", by=ctx.inbound.user_key)
    return f"{who} is no longer an admin (still allowed as a user)."


async def _budget(ctx: CommandContext) -> str:
    gw = ctx.gateway
    words = ctx.words()
    reply_target = ctx.inbound.reply_to_user_id is not None
    if not words and not reply_target or len(words) > 2:
        raise ctx.bad_usage()
    # "/budget 5000" while replying to someone names the amount only.
    if reply_target and len(words) <= 1 and (not words or re.fullmatch(r"\d+|off", words[0])):
        who, amount = None, words[0] if words else None
    else:
        who, amount = words[0], words[1] if len(words) > 1 else None
    # Check the amount before looking the user up: a typo in it gets the usage line.
    if amount is not None and amount != "off" and (not re.fullmatch(r"\d{1,12}", amount) or int(amount) <= 0):
        raise ctx.bad_usage("the budget is a positive whole number of tokens per day, or 'off'")
    user = await ctx.target_user(who)
    name = await ctx.who(user)
    blocked = await gw.access.role_of(user) == Role.BLOCKED
    if amount is None:
        ctx.private = True
        budget = await gw.store.budget(user)
        rows = await gw.store.usage(since=_today(), user_key=user)
        used = sum(r.prompt + r.completion for r in rows)
        estimated = sum(r.estimated for r in rows)
        lines = [
            f"Budget of {name}: " + (f"{budget:,} tokens per day" if budget else "none"),
            f"Used today: {_about(estimated)}{used:,} tokens{_estimated_note(estimated, used)}",
        ]
        if blocked:
            lines.append("⛔ Blocked: /allow lifts the block.")
        return "\n".join(lines)
    await ctx.may_change_user(user, "budget", set_by=await gw.store.budget_set_by(user))
    if amount == "off":
        await gw.store.set_budget(user, None)
        text = f"{name} has no daily budget now."
    else:
        await gw.store.set_budget(user, int(amount), by=ctx.inbound.user_key)
        text = f"{name} may now use {int(amount):,} tokens per day."
    # A budget never lifts a block: say so, so nobody expects the user back.
    return text + ("\nThey stay blocked until /allow lifts the block." if blocked else "")


async def _status(ctx: CommandContext) -> str:
    """What an admin needs at a glance; configuration only for an owner in a private chat.

    /status may run in a group (on Discord, a public channel), so it names the provider by
    its host alone: a base URL can carry a password or an `?api-key=`.
    """
    gw = ctx.gateway
    up = int(time.monotonic() - gw.started_at)
    days = f"{up // 86400}d " if up >= 86400 else ""
    platforms = ", ".join(f"{name} {'✅' if c.connected else '❌'}" for name, c in gw.connectors.items()) or "none"
    depths = gw.lanes.queue_depths()
    queued = sum(depths.values())
    health = gw.agent.health()
    base_url = str(health.get("base_url") or "")
    lines = [
        f"Uptime: {days}{up % 86400 // 3600}h {up % 3600 // 60}m {up % 60}s",
        f"Platforms: {platforms}",
        f"Running: {_plural(gw.lanes.active, 'turn')}; queued: {_plural(queued, 'message')} in "
        f"{_plural(len(depths), 'chat')}",
    ]
    providers = health.get("providers")
    if isinstance(providers, dict) and len(providers) > 1:
        lines.append("Providers: " + ", ".join(
            f"{name} ({urlsplit(str(p.get('base_url') or '')).hostname or 'unknown'})" for name, p in providers.items()
        ))
        states = [(m, st) for p in providers.values() for m, st in (p.get("models") or {}).items()]
    else:
        lines.append(f"Provider: {urlsplit(base_url).hostname or 'unknown'}")
        models = health.get("models")
        states = list(models.items()) if isinstance(models, dict) else []
    for model, state in states:
        lines += _streaming_lines(str(model), state)
    lines += _breaker_lines(health.get("breaker"))
    lines += _tool_lines(gw)
    if gw.cluster_status is not None:
        lines += _cluster_lines(await gw.cluster_status())
    if ctx.role >= Role.OWNER and ctx.inbound.chat.is_private:
        allowed = gw.defaults.allowed_models()
        lines += [
            "Configuration (shown to owners in private chats only):",
            f"  endpoint: {url_without_secrets(base_url)}",
            f"  API: {health.get('api', 'unknown')}; streaming {'on' if health.get('streaming_enabled') else 'off'}",
            f"  models: {allowed[0]} (default)" + "".join(f", {m}" for m in allowed[1:]),
        ]
    return "\n".join(lines)


def _breaker_lines(breakers: object) -> list[str]:
    """Models skipped after failing repeatedly (their circuit breaker), in words."""
    lines = []
    for model, state in (breakers.items() if isinstance(breakers, dict) else ()):
        if not isinstance(state, dict):
            continue
        if state.get("state") == "open":
            left = int(float(state.get("retry_in") or 0))
            failures = _plural(int(state.get("failures") or 0), "failure")
            lines.append(f"  {model}: skipped after {failures} in a row; tried again in {left // 60}m {left % 60}s")
        elif state.get("state") == "half_open":
            lines.append(f"  {model}: skipped until now; the next message tries it again")
    return lines


def _tool_lines(gw: "Gateway") -> list[str]:
    """Tools at a glance: how many, each MCP server's state, approvals waiting."""
    servers = gw.mcp_status() if gw.mcp_status is not None else []
    waiting = gw.approvals.waiting
    line = f"Tools: {_plural(len(gw.agent.tools), 'tool')}"
    if waiting:
        line += f"; {_plural(waiting, 'approval')} waiting"
    lines = [line]
    for server in servers:
        if server.state == "ready":
            state = f"ready, {_plural(server.tools, 'tool')}"
        elif server.state == "failed":
            why = f" ({one_line(server.error, 50)})" if server.error else ""
            left = int(server.retry_in or 0)
            retry = f", retrying in {left // 60}m {left % 60}s" if server.retry_in is not None else ""
            state = f"failed{why}{retry}"
        else:
            state = server.state
        lines.append(f"  MCP {server.name}: {state}")
    return lines


def _cluster_lines(info: dict[str, object]) -> list[str]:
    """Cluster mode: which replica answers, how many run, the shared queue, who polls."""
    live = int(info.get("live_replicas") or 1)  # type: ignore[call-overload]
    lines = [
        f"Cluster: replica {info.get('replica')} of {_plural(live, 'live replica')}; "
        f"{_plural(int(info.get('conversations_here') or 0), 'conversation')} here"  # type: ignore[call-overload]
    ]
    if "waiting_messages" in info:
        lines.append(
            f"  queue: {_plural(int(info['waiting_messages']), 'message')} waiting"  # type: ignore[call-overload]
            f", oldest {info.get('oldest_waiting_seconds', 0)}s; "
            f"{_plural(int(info.get('jobs_running') or 0), 'conversation')} running, "  # type: ignore[call-overload]
            f"{int(info.get('jobs_waiting') or 0)} waiting for a replica"  # type: ignore[call-overload]
        )
    elif "queue" in info:
        lines.append(f"  queue: {info['queue']}")
    for key, value in info.items():
        if key.endswith("_leader"):
            lines.append(f"  {key.removesuffix('_leader').replace('_', ' ')}: {value}")
    if info.get("budgets"):
        lines.append(f"  shared budgets: {info['budgets']}")
    return lines


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _streaming_lines(model: str, state: object) -> list[str]:
    """One model's streaming health in words, on at most two short lines:

      fake-model: streaming paused for 4m 10s (answers come whole meanwhile)
        3 failures in a row, 5 fallbacks so far; last: 'connection dropped'
    """
    if not isinstance(state, dict):
        return [f"  {model}: no calls yet"]
    failures = int(state.get("consecutive_failures") or 0)
    fallbacks = int(state.get("fallbacks") or 0)
    cause = state.get("last_error")
    if state.get("streaming") == "cooldown":
        left = int(float(state.get("cooldown_remaining") or 0))
        lines = [f"  {model}: streaming paused for {left // 60}m {left % 60}s (answers come whole meanwhile)"]
    else:
        lines = [f"  {model}: streaming ok"]
    details = []
    if failures:
        details.append(f"{_plural(failures, 'failure')} in a row")
    if fallbacks:
        details.append(f"{_plural(fallbacks, 'fallback')} so far")
    if details:
        last = f"; last: {quote_input(str(cause).replace('_', ' '), 30)}" if cause else ""
        lines.append("    " + ", ".join(details) + last)
    return lines


def _group(ctx: CommandContext) -> str:
    return f"{ctx.inbound.chat.platform}:{ctx.inbound.chat.chat_id}"


_USER_ARG = Arg("user", "a user id, @username, or reply to their message")


def builtin_commands() -> CommandRegistry:
    """The registry parley ships with."""
    return CommandRegistry(
        [
            Command("help", "list the commands you can use", Role.USER, _help, aliases=("start",), private=True),
            Command("new", "start a fresh conversation", Role.USER, _new, aliases=("reset",)),
            Command("stop", "stop the running reply", Role.USER, _stop),
            Command("retry", "answer your last message again", Role.USER, _retry, runs_turn=True),
            Command("usage", "tokens and cost, today and this month", Role.USER, _usage, private=True,
                    args=(Arg("scope", "me, chat, all, or a user (chat/all/user: admins)"),)),
            Command("model", "show or switch this chat's model", Role.USER, _model,
                    args=(Arg("name", "the model to switch to (admins)"),)),
            Command("system", "show or set this chat's system prompt", Role.ADMIN, _system,
                    args=(Arg("text", "the new system prompt, or 'reset'", rest=True),)),
            Command("mode", "what new messages do while a reply runs", Role.ADMIN, _mode,
                    args=(Arg("policy", "queue or interrupt", choices=("queue", "interrupt")),)),
            Command("stream", "streaming on or off in this chat", Role.ADMIN, _stream,
                    args=(Arg("state", "on or off", choices=("on", "off")),)),
            Command("control", "who may stop others' replies and reset the group", Role.ADMIN,
                    _control, args=(Arg("who", "admins or everyone", choices=("admins", "everyone")),)),
            Command("allow", "let a user (or this whole group: 'chat') use the bot", Role.ADMIN, _allow,
                    args=(_USER_ARG,)),
            Command("deny", "stop a user (or this group: 'chat') from using the bot", Role.ADMIN, _deny,
                    args=(_USER_ARG,)),
            Command("admins", "list owners and admins", Role.OWNER, _admins, private=True),
            Command("promote", "make a user an admin", Role.OWNER, _promote, args=(_USER_ARG,)),
            Command("demote", "take admin rights away", Role.OWNER, _demote, args=(_USER_ARG,)),
            Command("budget", "a user's daily token budget ('off' removes it)", Role.ADMIN, _budget,
                    args=(_USER_ARG, Arg("tokens", "tokens per day, or off"))),
            Command("status", "uptime, platforms, turns, queues, provider health", Role.ADMIN, _status,
                    private=True),
        ]
    )
