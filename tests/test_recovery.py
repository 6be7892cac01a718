"""Start-up recovery decisions: what the chat sees for each kind of message an earlier
process left unfinished (the real SIGKILL drills are in tests/test_crash.py).

The earlier process's state is written through the real Store, exactly as a dying
gateway leaves it (message stored, turn begun, reply state noted); the chat side is the
in-memory Outbox, so every message and its edit history can be checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots.access import Access, AccessPolicy
from bots.gateway import (
    CONTINUING_TEXT,
    CRASH_LOOP_TEXT,
    INTERRUPTED_MARKER,
    LOST_TEXT,
    ChatDefaults,
    Gateway,
)
from bots.inbound import Inbound
from bots.inbound import to_json as inbound_json
from bots.store import NewMessage, Store
from tests.fakes.llm import FakeLLM
from tests.test_gateway import CHAT, OWNER, MemoryConnector


class Earlier:
    """What an earlier parley process left in the store and in the chat when it died."""

    def __init__(self, store: Store, connector: MemoryConnector) -> None:
        self.store = store
        self.outbox = connector.outbox
        self.n = 100

    async def message(self, text: str, *, started: bool = False, shown: str | None = None) -> tuple[int, str | None]:
        """Store a message; optionally begin its turn and show a partial reply. Returns (inbox id, message id)."""
        self.n += 1
        inbound = Inbound(CHAT, "1", text, message_id=str(self.n), update_id=f"u{self.n}")
        [inbox_id] = await self.store.accept(
            [NewMessage("memory", inbound.update_id, CHAT.key, OWNER, inbound_json(inbound))]
        )
        assert inbox_id is not None
        mid = None
        if started:
            session = await self.store.current_session(CHAT.key)
            await self.store.begin_turn(
                session, user_message={"role": "user", "content": text}, user_key=OWNER,
                update_id=inbound.update_id, inbox_ids=[inbox_id],
            )
        if shown is not None:
            ref = await self.outbox.send(CHAT, shown, reply_to=inbound.message_id)
            mid = ref.message_id
            await self.store.note_reply([inbox_id], {"pieces": [{"id": mid, "text": shown, "markdown": False}]})
        return inbox_id, mid


@pytest.fixture
async def world(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[dict[str, Any]]:
    store = await Store.open(sqlite_url)
    connector = MemoryConnector()
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    made: list[Gateway] = []

    async def restart(**defaults: Any) -> Gateway:
        """A new process: stale turns marked (App.create), unfinished messages recovered (App.start)."""
        await store.mark_stale_turns()
        gateway = Gateway(
            store=store,
            agent=agent,
            access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
            defaults=ChatDefaults(model="fake-model", **defaults),
        )
        gateway.attach(connector)
        made.append(gateway)
        await gateway.load_unfinished(["memory"])
        gateway.resume_unfinished()
        await gateway.settle_all()
        return gateway

    try:
        yield {"url": sqlite_url, "store": store, "earlier": Earlier(store, connector), "outbox": connector.outbox, "restart": restart}
    finally:
        for gateway in made:
            await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


async def test_a_reply_cut_off_mid_stream_continues_in_the_same_message(world: dict, fake_llm: FakeLLM) -> None:
    inbox_id, mid = await world["earlier"].message("weather?", started=True, shown="You sa")
    await world["restart"]()
    outbox = world["outbox"]
    assert outbox.texts() == ["You said: weather?"], "one complete reply, in the message the chat already had"
    shown = [text for _, text, _ in outbox.messages[mid].history]
    assert shown[0] == "You sa" and shown[1] == CONTINUING_TEXT, "marked at once, before the new answer"
    assert len(fake_llm.requests) == 1
    assert [m["content"] for m in fake_llm.requests[0].messages if m["role"] == "user"] == ["weather?"]
    row = await world["store"].inbox_message(inbox_id)
    assert row is not None and (row.status, row.attempts) == ("answered", 2)
    assert row.reply["pieces"][0]["id"] == mid


async def test_queued_messages_are_answered_in_their_order_before_new_ones(world: dict, fake_llm: FakeLLM) -> None:
    earlier = world["earlier"]
    await earlier.message("first", started=True, shown="You said: fi")
    await earlier.message("second")
    await earlier.message("third")
    gateway = await world["restart"]()
    await gateway.handle(Inbound(CHAT, "1", "fourth", message_id="900", update_id="u900"))
    await gateway.settle_all()
    assert world["outbox"].texts() == ["You said: first", "You said: second", "You said: third", "You said: fourth"]
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == ["first", "second", "third", "fourth"]
    assert await world["store"].unfinished_messages() == []


async def test_a_message_too_old_to_answer_marks_its_partial_reply(world: dict, fake_llm: FakeLLM) -> None:
    store, earlier = world["store"], world["earlier"]
    long_ago = datetime.now(UTC) - timedelta(minutes=11)
    async with await Store.open(world["url"], utcnow=lambda: long_ago) as past:
        earlier.store = past
        cut, mid = await earlier.message("weather?", started=True, shown="It is sunny in")
        lost, _ = await earlier.message("and tomorrow?")
    await world["restart"]()
    outbox = world["outbox"]
    assert outbox.messages[mid].text.startswith("It is sunny in")
    assert outbox.messages[mid].text.endswith(INTERRUPTED_MARKER)
    assert outbox.texts()[-1] == LOST_TEXT
    assert outbox.messages[[m for m in outbox.messages if outbox.messages[m].text == LOST_TEXT][0]].reply_to == "102"
    assert fake_llm.requests == [], "the provider is not called for messages this old"
    assert [(await store.inbox_message(i)).status for i in (cut, lost)] == ["expired", "expired"]


async def test_a_reply_cut_off_again_and_again_ends_with_the_failure_line(world: dict, fake_llm: FakeLLM) -> None:
    store, earlier = world["store"], world["earlier"]
    inbox_id, mid = await earlier.message("crashy", started=True, shown="Thinking ab")
    session = await store.current_session(CHAT.key)
    # The second attempt (after the first restart) was cut off too.
    await store.mark_stale_turns()
    await store.begin_turn(session, user_message={"role": "user", "content": "crashy"}, user_key=OWNER,
                           update_id="u101", inbox_ids=[inbox_id])
    await world["restart"](max_attempts=2)
    text = world["outbox"].messages[mid].text
    assert text.startswith("Thinking ab") and text.endswith(CRASH_LOOP_TEXT)
    assert fake_llm.requests == []
    row = await store.inbox_message(inbox_id)
    assert row is not None and row.status == "failed"
