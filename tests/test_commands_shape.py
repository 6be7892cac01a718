"""Every command's answer is written for people (issue 13.3): short lines, units, no Python.

Table-driven over the whole registry (`bots.commands.builtin_commands()`), end to end on
Telegram: real connector, real config, real store, against the fake servers. Each
command runs in the states that give its different answers (showing, setting,
resetting; on a known user, on a blocked one) and every answer is checked for shape:

- no Python reprs: no braces, no `['...']`, no `None`, `True`, `False`, `object at 0x`;
  square brackets only in the usage notation of /help (`[user]`, `[queue|interrupt]`);
- short lines (at most 80 characters), except free text someone set (a system prompt);
- a unit on every number: tokens, turns, chats, messages, $, seconds (`1h 2m 3s`) ...;
  user keys (`telegram:61`) and model names are names, not numbers;
- people named as people know them: "@uma (telegram:61)" once parley has seen them.

A new command without cases here fails `test_every_command_has_cases`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bots.commands import _streaming_lines, builtin_commands
from tests.fakes.llm import Reply
from tests.support.conversations import Stack, key, start

USER_ID, BLOCKED_ID, STRANGER_ID = 61, 63, 64
USER, BLOCKED = f"telegram:{USER_ID}", f"telegram:{BLOCKED_ID}"
PROMPT = "You answer like a patient teacher who explains every step, with an example for each idea you introduce."
MODELS = ("fake-model", "other-model")


@dataclass(frozen=True)
class Case:
    text: str
    where: str = "owner"  # "owner": the owner's private chat; "group": a group the owner is in
    free_text: tuple[str, ...] = ()  # what someone set, shown as is (exempt from the line length)


CASES: dict[str, list[Case]] = {
    "help": [Case("/help"), Case("/start")],
    "new": [Case("/new"), Case("/new", "group")],
    "stop": [Case("/stop")],
    "retry": [Case("/retry", "group")],  # nothing asked in that group yet
    "usage": [Case("/usage"), Case("/usage chat"), Case("/usage all"), Case("/usage @uma"), Case("/usage 64")],
    "model": [Case("/model"), Case("/model other-model"), Case("/model default")],
    "system": [Case("/system"), Case(f"/system {PROMPT}"), Case("/system", free_text=(PROMPT,)), Case("/system reset")],
    "mode": [Case("/mode"), Case("/mode interrupt"), Case("/mode"), Case("/mode queue")],
    "stream": [Case("/stream"), Case("/stream off"), Case("/stream"), Case("/stream on")],
    "control": [Case("/control", "group"), Case("/control everyone", "group"), Case("/control", "group"),
                Case("/control admins", "group"), Case("/control")],
    "allow": [Case("/allow @uma"), Case("/allow 64"), Case("/allow chat", "group"), Case("/allow 63")],
    "deny": [Case("/deny 64"), Case("/deny 64"), Case("/deny chat", "group"), Case("/deny 63")],
    "admins": [Case("/admins")],
    "promote": [Case("/promote @uma"), Case("/promote @uma"), Case("/promote 63")],
    "demote": [Case("/demote @uma"), Case("/demote @uma"), Case("/demote 63")],
    "budget": [Case("/budget @uma 5000"), Case("/budget @uma"), Case("/budget @uma off"), Case("/budget 63 100"),
               Case("/budget 63")],
    "status": [Case("/status")],
}  # fmt: skip

# A number is fine when a unit (or what it counts) goes with it.
UNITS = (
    r"\$\d[\d,]*(\.\d+)?"
    r"|\d+d \d+h \d+m \d+s|\d+h \d+m \d+s|\d+m \d+s"
    r"|\d[\d,]* (tokens?|turns?|chats?|messages?|characters|failures?|fallbacks?|reasoning|tools?|approvals?)\b"
    r"|\d[\d,]* in / ~?\d[\d,]* out tokens"
)
NAMES = r"https?://\S+|\d+(\.\d+){3}|(telegram|discord|console):-?\d+|@\w+|" + "|".join(map(re.escape, MODELS))
USAGE_NOTATION = r"\[[\w|]+\]|<[\w|]+>"
REPRS = (r"[{}]", r"\[['\"]", r"['\"]\]", r"\bNone\b", r"\bTrue\b", r"\bFalse\b", r"object at 0x", r"\w+\(\w+=")


def shape_problems(text: str, free_text: tuple[str, ...] = ()) -> list[str]:
    """What makes an answer read like a program's output rather than a sentence for people."""
    problems = []
    for piece in free_text:
        text = text.replace(piece, "")
    for pattern in REPRS:
        if re.search(pattern, text):
            problems.append(f"looks like a Python repr ({pattern!r})")
    if re.search(r"[\[\]]", re.sub(USAGE_NOTATION, "", text)):
        problems.append("square brackets outside the usage notation")
    for line in text.splitlines():
        if len(line) > 80:
            problems.append(f"line of {len(line)} characters: {line!r}")
    bare = re.sub(UNITS, "", re.sub(NAMES, "", text))
    for number in re.findall(r"\d[\d,.]*", bare):
        problems.append(f"a number without a unit: {number!r}")
    return problems


async def setup(s: Stack) -> dict[str, object]:
    """A world in which every answer has something to show: usage with prices, a known user, a blocked one."""
    group = s.tg.supergroup("Team")
    await s.store.update_chat_settings(key(group), allowed=True)
    await s.store.set_role(USER, "user")
    uma = s.user(USER_ID, "Uma", username="uma")
    await s.turn(s.private(uma), uma, "hello there")  # parley now knows @uma, and she used tokens
    s.llm.script(Reply.text("A stream that breaks, then comes whole.", fault="abort_midstream"))
    await s.turn(s.owner_chat(), s.owner, "and hello from me")  # /status has a fallback to report
    blocked = s.user(BLOCKED_ID, "Bob Blocked")
    await s.store.set_role(BLOCKED, "user")
    await s.turn(s.private(blocked), blocked, "hi")
    await s.store.set_role(BLOCKED, "blocked")
    return {"owner": s.owner_chat(), "group": group}


async def test_every_command_has_cases() -> None:
    assert set(CASES) == {c.name for c in builtin_commands().all()}


async def test_every_answer_is_written_for_people(fast_telegram, fake_llm, parley) -> None:
    s = await start(
        parley, fast_telegram, fake_llm, provider={"prices": {"fake-model": {"prompt": 1.0, "completion": 2.0}}}
    )
    chats = await setup(s)
    failures = []
    for name, cases in CASES.items():
        for case in cases:
            answer = await s.ask(chats[case.where], s.owner, case.text)  # type: ignore[arg-type]
            failures += [f"{case.text!r}: {p}\n    {answer!r}" for p in shape_problems(answer, case.free_text)]
    assert not failures, "\n".join(failures)


async def test_people_are_named_as_people_know_them(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm)
    await setup(s)
    owner = s.owner_chat()
    assert await s.ask(owner, s.owner, "/budget @uma 5000") == "@uma (telegram:61) may now use 5,000 tokens per day."
    assert await s.ask(owner, s.owner, "/promote 61") == "⭐ @uma (telegram:61) is now an admin."
    assert (await s.ask(owner, s.owner, "/admins")).splitlines() == [
        "Owners (set in the configuration):",
        "  discord:9001",  # never wrote: the key alone
        "  @the_owner (telegram:1)",
        "Admins:",
        "  @uma (telegram:61)",
    ]
    # A user without a username is named by their display name.
    assert await s.ask(owner, s.owner, "/allow 63") == "✅ Bob Blocked (telegram:63) is no longer blocked and may use the bot."
    assert (await s.ask(owner, s.owner, "/usage 61")).splitlines()[0] == "Usage of @uma (telegram:61):"


def test_streaming_health_in_status_reads_as_sentences() -> None:
    """The /status lines of a model in cooldown (hard to reach end to end without waiting)."""
    state = {"streaming": "cooldown", "cooldown_remaining": 250.4, "consecutive_failures": 3, "fallbacks": 5,
             "last_error": "connection_dropped", "last_error_class": "RemoteProtocolError", "stream_options": True}
    lines = _streaming_lines("fake-model", state)
    assert lines == [
        "  fake-model: streaming paused for 4m 10s (answers come whole meanwhile)",
        "    3 failures in a row, 5 fallbacks so far; last: 'connection dropped'",
    ]
    assert not shape_problems("\n".join(lines))


def test_the_shape_check_catches_what_issue_13_saw() -> None:
    """The check itself: the /status line of issue 13 and friends fail it."""
    assert shape_problems("  fake-model(fake-model={'streaming': 'ok', 'consecutive_failures': 0})")
    assert shape_problems("Owners: ['telegram:1']")
    assert shape_problems("Streaming: True")
    assert shape_problems("budget: None")
    assert shape_problems("Active turns: 1; queued: 3")  # 3 what?
    assert shape_problems("x" * 81)
    assert not shape_problems("• today: ~1,234 tokens in 2 turns, $0.0004 (12 tokens estimated)")
    assert not shape_problems("/budget [user] [tokens] — a user's daily token budget ('off' removes it)")
    assert not shape_problems("Uptime: 2d 3h 4m 5s")
