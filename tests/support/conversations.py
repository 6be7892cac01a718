"""Helpers for the conversation end-to-end tests (no tests here).

`Stack` wraps a running parley (real App, real python-telegram-bot connector, real
openai SDK, SQLite store) and the fake Telegram and fake provider it talks to, with the
few moves those tests repeat: a person says something, the bot answers, the chat is
settled, the database is inspected.

Waiting is always on a condition, never on a sleep:

- `ask()` waits for the bot's next message in that chat (a command's answer; a command
  writes what it changes before it answers, so the store is up to date by then);
- `turn()` waits until the model was called and the chat's lane is idle again;
- `barrier()` proves that every update sent so far has been *handled*: the owner sends
  /help in a separate group and waits for the answer. python-telegram-bot fetches
  updates in order and starts handling them in order, so once that answer exists every
  earlier update has at least entered `Gateway.handle`; `settle_all()` then waits for the
  ones still being routed and for anything they spawned.
  It is how a test shows that something did *not* happen (an ignored message).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.llm import FakeLLM
from tests.fakes.telegram import FakeChat, FakeTelegram, FakeUser, SeenMessage
from tests.support.stack import OWNER_TG, Parley

# Tables whose rows are parley's decisions (what a refused command must not change).
STATE_TABLES = ("chats", "roles", "budgets", "sessions", "turns", "messages", "usage")


def key(chat: FakeChat, thread: int | None = None) -> str:
    """The gateway's chat key for a fake Telegram chat."""
    return f"telegram:{chat.id}" + (f":{thread}" if thread else "")


@dataclass
class Stack:
    p: Parley
    tg: FakeTelegram
    llm: FakeLLM
    owner: FakeUser
    _sync_group: FakeChat | None = field(default=None, repr=False)

    @property
    def gateway(self):  # noqa: ANN201
        return self.p.gateway

    @property
    def store(self):  # noqa: ANN201
        return self.p.store

    # ---- people and chats ----------------------------------------------------------

    def user(self, user_id: int, name: str | None = None, *, username: str | None = None) -> FakeUser:
        return self.tg.user(user_id, name or f"User{user_id}", username=username)

    def private(self, user: FakeUser) -> FakeChat:
        return self.tg.private_chat(user)

    def owner_chat(self) -> FakeChat:
        return self.tg.private_chat(self.owner)

    # ---- what the chat shows ---------------------------------------------------------

    def bot_msgs(self, chat: FakeChat) -> list[SeenMessage]:
        return [m for m in self.tg.messages(chat.id) if m.from_bot and not m.deleted]

    def bot_texts(self, chat: FakeChat) -> list[str]:
        return self.tg.bot_texts(chat.id)

    # ---- moves -----------------------------------------------------------------------

    def say(self, chat: FakeChat, user: FakeUser, text: str, **kw: Any) -> int:
        """The person writes `text`; returns the update id Telegram gave it."""
        self.tg.user_says(chat, user, text, **kw)
        return int(self.tg.pending_updates[-1]["update_id"])

    async def ask(self, chat: FakeChat, user: FakeUser, text: str, *, timeout: float = 10, **kw: Any) -> str:
        """Send `text` (usually a command) and return the bot's next message in this chat."""
        before = len(self.bot_msgs(chat))
        self.say(chat, user, text, **kw)
        await self.tg.wait_for(lambda: len(self.bot_msgs(chat)) > before, timeout=timeout, what=f"answer to {text!r}")
        return self.bot_msgs(chat)[before].text

    async def turn(self, chat: FakeChat, user: FakeUser, text: str, *, thread: int | None = None, **kw: Any) -> str:
        """Send a message that runs a model turn; wait until it is answered; return the reply."""
        before_requests = len(self.llm.requests)
        before = len(self.bot_msgs(chat))
        self.say(chat, user, text, thread=thread, **kw)
        await self.llm.wait_for(lambda: len(self.llm.requests) > before_requests, timeout=10)
        await self.settle(chat, thread)
        msgs = self.bot_msgs(chat)
        assert len(msgs) > before, f"no reply to {text!r}; chat shows {self.bot_texts(chat)}"
        return msgs[-1].text

    async def settle(self, chat: FakeChat, thread: int | None = None) -> None:
        await self.gateway.settle(key(chat, thread))

    async def settle_all(self) -> None:
        await self.gateway.settle_all()

    async def barrier(self) -> None:
        """Wait until every update sent so far has been handled (see module docstring)."""
        if self._sync_group is None:
            self._sync_group = self.tg.group("sync", id=-999_000_001)
        group = self._sync_group
        before = len(self.bot_msgs(group))
        self.tg.user_says(group, self.owner, "/help")
        await self.tg.wait_for(lambda: len(self.bot_msgs(group)) > before, timeout=10, what="barrier")
        await self.settle_all()

    # ---- the database ------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        url = self.p.app.settings.store.get_secret_value()
        assert url.startswith("sqlite:///"), url
        return Path(url.removeprefix("sqlite:///"))

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of a table, read through a separate SQLite connection (the real file)."""
        con = sqlite3.connect(self.db_path)
        try:
            return sorted(con.execute(f"SELECT * FROM {table}").fetchall(), key=repr)  # noqa: S608 - fixed names
        finally:
            con.close()

    def state(self) -> dict[str, list[tuple[Any, ...]]]:
        """parley's decisions: settings, roles, budgets, sessions, history, usage."""
        return {table: self.rows(table) for table in STATE_TABLES}

    async def chat_settings(self, chat: FakeChat):  # noqa: ANN201
        return await self.store.chat_settings(key(chat))


async def start(parley: Any, tg: FakeTelegram, llm: FakeLLM, **overrides: Any) -> Stack:
    """Start parley against the fakes; `overrides` is merged into its parley.yaml."""
    p = await parley(telegram=tg, overrides=overrides or None)
    return Stack(p, tg, llm, tg.user(OWNER_TG, "Owner", username="the_owner"))


def last_request_messages(llm: FakeLLM) -> list[dict[str, Any]]:
    return llm.requests[-1].messages


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) pairs: what a request carried, easy to compare."""
    return [(m["role"], m.get("content") or "") for m in messages]
