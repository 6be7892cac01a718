"""Every command, run by everyone too weak for it, is refused and changes nothing.

Table-driven over the whole registry (`bots.commands.builtin_commands()`), end to end on
Telegram: real connector, real config, real store. The table is derived from the
registry, so a new command without plausible arguments here fails this test instead
of going untested.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bots.access import Role
from bots.commands import builtin_commands
from tests.fakes.llm import Reply
from tests.support.stack import OWNER_TG
from tests.support.conversations import Stack, start

ACCESS_REPLY_START = "🔒 You don't have access to this bot yet."

USER_ID, ADMIN_ID = 61, 62  # the callers with a role
TARGET_USER, TARGET_ADMIN, TARGET_UNKNOWN = 63, 64, 65  # whom the commands are about

# Plausible arguments: what someone trying the command for real would type.
PLAUSIBLE: dict[str, str] = {
    "help": "",
    "new": "",
    "stop": "",
    "retry": "",
    "usage": "",
    "model": "",
    "system": "You are a pirate now.",
    "mode": "interrupt",
    "stream": "off",
    "control": "everyone",
    "allow": str(TARGET_UNKNOWN),
    "deny": str(TARGET_USER),
    "admins": "",
    "promote": str(TARGET_USER),
    "demote": str(TARGET_ADMIN),
    "budget": f"{TARGET_USER} 5",
    "status": "",
}

# Who may run what (issue 5's table): the registry must not drift from it.
REQUIRED_ROLES: dict[str, Role] = {
    **dict.fromkeys(("help", "new", "stop", "retry", "usage", "model"), Role.USER),
    **dict.fromkeys(("system", "mode", "stream", "control", "allow", "deny", "budget", "status"), Role.ADMIN),
    **dict.fromkeys(("admins", "promote", "demote"), Role.OWNER),
}

# Parts of a command that need more power than the command itself: (text, caller, refusal).
# In groups only: in private chats each person picks their own model (chat.model_choice: auto).
GROUP_SUBCOMMANDS: list[tuple[str, Role, str]] = [
    ("/model other-model", Role.USER, "⛔ Only admins can switch the model."),
    ("/model default", Role.USER, "⛔ Only admins can switch the model."),
]
SUBCOMMANDS: list[tuple[str, Role, str]] = [
    ("/usage chat", Role.USER, "⛔ Only admins can see a chat's usage."),
    ("/usage all", Role.USER, "⛔ Only admins can see everyone's usage."),
    (f"/usage {TARGET_USER}", Role.USER, "⛔ Only admins can see another user's usage."),
    (f"/deny {TARGET_ADMIN}", Role.ADMIN, "⛔ Only owners can deny an admin."),
    (f"/budget {TARGET_ADMIN} 5", Role.ADMIN, f"⛔ telegram:{TARGET_ADMIN} is an admin like you; only an owner can change their budget."),
    (f"/budget {OWNER_TG} 5", Role.ADMIN, f"⛔ telegram:{OWNER_TG} is an owner; nobody else can change their budget."),
    (f"/budget {ADMIN_ID} off", Role.ADMIN, "⛔ You can't change your own budget; only an owner can."),
    (f"/deny {ADMIN_ID}", Role.ADMIN, "⛔ You can't change your own access; only an owner can."),
]


@dataclass(frozen=True)
class Case:
    text: str
    caller: Role  # NOBODY, USER or ADMIN
    where: str  # "private" or "group"
    refusal: str  # the exact line, or the start of the access reply for unknown callers

    def __str__(self) -> str:
        return f"{self.text!r} by {self.caller.label} in {self.where}"


def cases() -> list[Case]:
    out: list[Case] = []
    registry = builtin_commands()
    for command in registry.all():
        text = f"/{command.name} {PLAUSIBLE[command.name]}".strip()
        out.append(Case(text, Role.NOBODY, "private", ACCESS_REPLY_START))
        for role in (Role.USER, Role.ADMIN):
            if role < command.role:
                refusal = f"⛔ /{command.name} is for {command.role.label}s only."
                out.append(Case(text, role, "private", refusal))
                out.append(Case(text, role, "group", refusal))
        for alias in command.aliases:
            out.append(Case(f"/{alias}", Role.NOBODY, "private", ACCESS_REPLY_START))
    for what in ("chat", ""):
        # /allow chat and /deny chat make sense in groups only; a user tries anyway.
        for name in ("allow", "deny"):
            out.append(Case(f"/{name} {what}".strip(), Role.USER, "group", f"⛔ /{name} is for admins only."))
    for text, caller, refusal in SUBCOMMANDS:
        out.append(Case(text, caller, "private", refusal))
        out.append(Case(text, caller, "group", refusal))
    for text, caller, refusal in GROUP_SUBCOMMANDS:
        out.append(Case(text, caller, "group", refusal))
    return out


async def prepare(s: Stack) -> None:
    """Roles, a budget and settings that a refused command could change."""
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    await s.store.set_role(f"telegram:{ADMIN_ID}", "admin")
    await s.store.set_role(f"telegram:{TARGET_USER}", "user")
    await s.store.set_role(f"telegram:{TARGET_ADMIN}", "admin")
    await s.store.set_budget(f"telegram:{TARGET_USER}", 1000)
    for uid in (USER_ID, ADMIN_ID, TARGET_USER):
        s.user(uid)


async def test_the_table_covers_the_whole_registry() -> None:
    registry = builtin_commands()
    assert set(PLAUSIBLE) == {c.name for c in registry.all()}, "give every command plausible arguments"
    assert {c.name: c.role for c in registry.all()} == REQUIRED_ROLES
    covered = {(c.text.split()[0][1:], c.caller) for c in cases()}
    for command in registry.all():
        for role in (Role.NOBODY, Role.USER, Role.ADMIN):
            if role < command.role:
                assert (command.name, role) in covered, (command.name, role)


async def test_every_command_refuses_callers_below_its_role_and_changes_nothing(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    await prepare(s)
    group = fast_telegram.supergroup("Team")
    # Some history and usage, so /new, /retry and /usage have something they could touch.
    for uid in (USER_ID, ADMIN_ID):
        await s.turn(s.private(s.user(uid)), s.user(uid), "hello")
    await s.turn(group, s.user(USER_ID), "@parley_bot hello")

    failures: list[str] = []
    stranger_ids = iter(range(5000, 6000))
    for case in cases():
        if case.caller is Role.NOBODY:
            caller = s.user(next(stranger_ids), "Stranger")  # fresh: the access reply is rate-limited per person
        else:
            caller = s.user(USER_ID if case.caller is Role.USER else ADMIN_ID)
        chat = s.private(caller) if case.where == "private" else group
        before = s.state()
        requests = len(fake_llm.requests)
        answer = await s.ask(chat, caller, case.text)  # a command writes before it answers
        ok = answer.startswith(case.refusal) if case.caller is Role.NOBODY else answer == case.refusal
        if not ok:
            failures.append(f"{case}: answered {answer!r}, expected {case.refusal!r}")
        after = s.state()
        changed = [table for table in before if before[table] != after[table]]
        if changed:
            failures.append(f"{case}: changed {changed}")
        if len(fake_llm.requests) != requests:
            failures.append(f"{case}: called the model")
    await s.barrier()
    assert not failures, "\n".join(failures)


async def test_roles_are_checked_on_the_busy_path_too(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    await prepare(s)
    user = s.user(USER_ID)
    chat = s.private(user)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("A long, slow answer.", chunk=7, hold=gate, hold_at=1))
    s.say(chat, user, "go")
    await fast_telegram.wait_for(lambda: s.bot_texts(chat) == ["A long,"], timeout=10)
    before = s.state()
    for text in ("/mode interrupt", "/system pwned", "/stream off", f"/promote {USER_ID}"):
        assert (await s.ask(chat, user, text)).startswith("⛔"), text
    assert s.gateway.lanes.is_busy(f"telegram:{chat.id}")
    after = s.state()
    assert {t: after[t] for t in ("chats", "roles", "budgets", "sessions")} == {
        t: before[t] for t in ("chats", "roles", "budgets", "sessions")
    }
    # What the user may do works while busy: /stop.
    assert await s.ask(chat, user, "/stop") == "⏹️ Stopped."
    gate.set()
