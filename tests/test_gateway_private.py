"""The gateway marks answers that concern the caller alone as private, for every piece of them.

Over the in-memory Outbox, which records what the gateway asked for; what Discord makes of
`private` is covered end to end in tests/test_e2e_discord_private.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots.access import Access, AccessPolicy
from bots.gateway import ChatDefaults, Gateway
from bots.inbound import Inbound
from bots.outbox import ChatRef, MessageRef
from bots.store import Store
from tests.fakes.llm import FakeLLM
from tests.test_gateway import MemoryConnector
from tests.support.memory_outbox import MemoryOutbox

OWNER = "memory:1"
GROUP = ChatRef("memory", "-5", is_private=False)


class RecordingOutbox(MemoryOutbox):
    """Remembers, per message, whether it was sent as private."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.private: dict[str, bool] = {}

    async def send(
        self, chat: ChatRef, text: str, *, markdown: bool = False, reply_to: str | None = None, private: bool = False
    ) -> MessageRef:
        ref = await super().send(chat, text, markdown=markdown, reply_to=reply_to)
        self.private[ref.message_id] = private
        return ref


class Connector(MemoryConnector):
    """`MemoryConnector` over the recording outbox, with a platform message limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.outbox = RecordingOutbox(limit=limit)

    def sent(self) -> list[tuple[str, str | None, bool]]:
        """(text, reply_to, private) of every message, in order."""
        msgs = sorted(self.outbox.messages.values(), key=lambda m: int(m.id))
        return [(m.text, m.reply_to, self.outbox.private[m.id]) for m in msgs]


@pytest.fixture
async def gateway(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[Gateway]:
    store = await Store.open(sqlite_url)
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    gw = Gateway(store=store, agent=agent, access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
                 defaults=ChatDefaults(model="fake-model"))
    try:
        yield gw
    finally:
        await gw.shutdown(1)
        await agent.aclose()
        await store.close()


def said(user: str, text: str, n: int, *, command: str | None = None, args: str = "", slash: bool = False) -> Inbound:
    return Inbound(GROUP, user, text, message_id=f"m{n}", update_id=f"u{n}", command=command, args=args,
                   mentions_bot=True, expects_answer=slash)


async def test_denials_and_usage_errors_are_private_channel_answers_are_not(gateway: Gateway) -> None:
    connector = Connector(limit=4096)
    gateway.attach(connector)
    await gateway.handle(said("77", "/model", 1, command="model", slash=True))  # a stranger
    await gateway.handle(said("1", "/budget 5 lots", 2, command="budget", args="5 lots", slash=True))
    await gateway.handle(said("1", "/nosuch", 3, command="nosuch", slash=True))
    await gateway.handle(said("1", "/usage", 4, command="usage", slash=True))
    await gateway.handle(said("1", "/new", 5, command="new", slash=True))
    await gateway.settle(GROUP.key)
    sent = connector.sent()
    assert [(reply_to, private) for _, reply_to, private in sent] == [
        ("m1", True), ("m2", True), ("m3", True), ("m4", True), ("m5", False),
    ]
    assert sent[0][0].startswith("🔒") and sent[1][0].startswith("Usage: /budget")
    assert sent[2][0].startswith("Unknown command") and sent[4][0] == "🆕 Started a new conversation."


async def test_every_piece_of_a_long_private_answer_answers_the_slash_command(gateway: Gateway) -> None:
    connector = Connector(limit=60)
    gateway.attach(connector)
    text = " ".join(f"line{i}" for i in range(40))
    await gateway.reply(said("1", "/status", 1, command="status", slash=True), text, private=True)
    pieces = connector.sent()
    assert len(pieces) >= 3 and " ".join(t for t, _, _ in pieces).split() == text.split()
    assert all(reply_to == "m1" and private for _, reply_to, private in pieces)
    # A text command (no interaction to answer through) or a public answer: the first piece
    # replies to the message, the rest simply follow, as before.
    for n, (slash, private) in enumerate([(False, True), (True, False)], start=2):
        connector.outbox.messages.clear()
        await gateway.reply(said("1", "!status", n, command="status", slash=slash), text, private=private)
        replies = [reply_to for _, reply_to, _ in connector.sent()]
        assert replies[0] == f"m{n}" and set(replies[1:]) == {None}
