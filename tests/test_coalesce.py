"""Split messages become one turn, and edits change what is still to be answered.

The gateway runs on a virtual clock (tests/support/fakeclock.py), so the coalescing
window passes only when a test advances it: "no wait" is asserted as "handed to the
lane without the clock moving, nothing held", never by timing. The store is the real
one (SQLite), the model the fake provider through the real openai SDK, the chat the
in-memory Outbox. The Telegram and Discord paths run end to end in
tests/test_e2e_split_and_edits.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots.access import Access, AccessPolicy
from bots.coalesce import ALBUM_WINDOW, JOINER, SPLIT_MIN, Coalescer, regroup
from bots.gateway import EDITED_TEXT, ChatDefaults, Gateway
from bots.inbound import Inbound
from bots.inbound import to_json as inbound_json
from bots.outbox import ChatRef
from bots.store import NewMessage, Store
from tests.fakes.llm import FakeLLM, Reply
from tests.support.fakeclock import FakeClock
from tests.support.media import MediaConnector, jpeg
from tests.test_gateway import CHAT, OWNER, MemoryConnector

WINDOW = 1.0
_ids = itertools.count(1)


def says(text: str, **kw: Any) -> Inbound:
    n = next(_ids)
    return Inbound(CHAT, "1", text, message_id=str(n), update_id=f"u{n}", **kw)


def edits(original: Inbound, text: str) -> Inbound:
    n = next(_ids)
    return Inbound(CHAT, "1", text, message_id=original.message_id, update_id=f"e{n}", edit_of=original.message_id)


def part(tag: str, size: int = 4096) -> str:
    """A part of a split paste: `size` characters of words, starting with `tag`."""
    words = " ".join(f"{tag}{i}" for i in range(size))
    return words[:size]


def user_texts(fake_llm: FakeLLM) -> list[str]:
    return [r.messages[-1]["content"] for r in fake_llm.requests]


@pytest.fixture
async def stack(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[tuple[Gateway, MemoryConnector, FakeClock]]:
    store = await Store.open(sqlite_url)
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    clock = FakeClock()
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
        defaults=ChatDefaults(model="fake-model", coalesce_window={"memory": WINDOW}, still_working_after=0),
        clock=clock,
    )
    connector = MediaConnector()  # serves the photos an album carries
    gateway.attach(connector)
    try:
        yield gateway, connector, clock
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


def spy_turns(gateway: Gateway) -> list[Inbound]:
    """Record every message the lanes hand to a turn (our own seam, not a library)."""
    seen: list[Inbound] = []
    runner = gateway.lanes._runner  # noqa: SLF001

    async def recording(inbound: Inbound, interrupt: asyncio.Event) -> None:
        seen.append(inbound)
        await runner(inbound, interrupt)

    gateway.lanes._runner = recording  # noqa: SLF001
    return seen


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait for the in-memory chat to reach a state (it has no change notifications)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def routed(gateway: Gateway) -> None:
    """Wait until every message handed over was routed (held, queued or started); no time passes."""
    while True:
        # The gateway counts each message being routed as a plain future in its tasks.
        pending = [t for t in gateway._tasks if not t.done() and not isinstance(t, asyncio.Task)]  # noqa: SLF001
        if not pending:
            return
        await asyncio.wait(pending)


# ---------------------------------------------------------------------------- the rules


def test_only_a_message_that_may_be_split_waits() -> None:
    coalescer = Coalescer(lambda platform: WINDOW)
    short = says("hello")
    offered = coalescer.offer([short], 0.0)
    assert offered.ready == [short] and offered.started is None and coalescer.held() == 0
    long = says("x" * SPLIT_MIN)
    offered = coalescer.offer([long], 0.0)
    assert offered.ready == [] and offered.started is not None and coalescer.deadline(offered.started) == WINDOW
    # Emoji count double, as Telegram counts them (UTF-16).
    assert Coalescer(lambda p: WINDOW).offer([says("😀" * (SPLIT_MIN // 2))], 0.0).started is not None


def test_albums_wait_even_with_coalescing_off() -> None:
    coalescer = Coalescer(lambda platform: 0.0)
    assert coalescer.offer([says("x" * 5000)], 0.0).ready, "coalescing off: a long message goes at once"
    first = says("look", media_group_id="a1")
    offered = coalescer.offer([first], 0.0)
    assert offered.started is not None and coalescer.deadline(offered.started) == ALBUM_WINDOW


def test_recovery_regroups_by_when_the_parts_came() -> None:
    a, b, c = says(part("a")), says(part("b")), says("tail")
    later = says(part("z"))  # five minutes later: queued behind a long turn, its own turn
    times = [0.0, 0.4, 0.8, 300.0]
    stored = [(replace_ids(m, i + 1), t) for i, (m, t) in enumerate(zip([a, b, c, later], times))]
    groups = regroup(stored, lambda platform: WINDOW)
    assert [g.inbox_ids for g in groups] == [(1, 2, 3), (4,)]
    assert groups[0].text == JOINER.join([a.text, b.text, "tail"])


def replace_ids(inbound: Inbound, inbox_id: int) -> Inbound:
    return replace(inbound, inbox_ids=(inbox_id,))


# ---------------------------------------------------------------------------- through the gateway


async def test_a_lone_short_message_starts_at_once_with_no_timer(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    started = clock.now()
    gate = asyncio.Event()
    fake_llm.script(Reply.text("hi there", hold=gate))
    await gateway.handle(says("hello"))
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1)  # the model is asked...
    assert clock.now() == started  # ...while no time passed,
    assert gateway.coalescer.held() == 0 and not gateway._holds  # noqa: SLF001 - and nothing was held
    gate.set()
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["hi there"]


async def test_a_split_paste_of_three_parts_is_one_turn_and_one_reply(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    seen = spy_turns(gateway)
    parts = [part("a"), part("b"), "and that is my question"]
    fake_llm.script(Reply.text("one answer"))
    first, second, tail = says(parts[0]), says(parts[1]), says(parts[2])
    await gateway.handle(first)
    await gateway.handle(second)
    await gateway.handle(tail)
    await gateway.settle(CHAT.key)  # no clock advance: the short tail ended the wait
    assert user_texts(fake_llm) == [JOINER.join(parts)]
    assert connector.texts() == ["one answer"]
    (turn,) = seen
    assert turn.message_id == first.message_id, "the reply quotes the start of the paste"
    rows = [await gateway.store.inbox_message(i) for i in turn.inbox_ids]
    assert len(rows) == 3 and {r.status for r in rows} == {"answered"} and len({r.turn_id for r in rows}) == 1


async def test_a_lone_long_message_waits_exactly_the_window(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    fake_llm.script(Reply.text("answered"))
    await gateway.handle(says(part("a")))
    await routed(gateway)
    assert gateway.coalescer.held() == 1
    await clock.advance(WINDOW - 0.001)
    assert gateway.coalescer.held() == 1 and not fake_llm.requests
    await clock.advance(0.001)
    await gateway.settle(CHAT.key)
    assert gateway.coalescer.held() == 0 and len(fake_llm.requests) == 1
    assert connector.texts() == ["answered"]


async def test_a_part_after_the_window_is_a_turn_of_its_own(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    fake_llm.script(Reply.text("first"), Reply.text("second"))
    await gateway.handle(says(part("a")))
    await routed(gateway)
    await clock.advance(WINDOW)
    await gateway.settle(CHAT.key)
    await gateway.handle(says("late tail"))
    await gateway.settle(CHAT.key)
    assert user_texts(fake_llm) == [part("a"), "late tail"]


async def test_a_command_in_the_middle_of_a_split_is_not_merged(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    seen = spy_turns(gateway)
    fake_llm.script(Reply.text("to a"), Reply.text("to b and tail"))
    await gateway.handle(says(part("a")))
    await gateway.handle(says("/status", command="status"))  # flushes what was held, then runs
    await gateway.handle(says(part("b")))
    await gateway.handle(says("tail"))
    await gateway.settle(CHAT.key)
    assert user_texts(fake_llm) == [part("a"), JOINER.join([part("b"), "tail"])]
    assert all(m.command is None for m in seen)
    assert any(t.startswith("Uptime:") for t in connector.texts()), connector.texts()


async def test_an_album_of_three_updates_is_one_turn_with_every_attachment(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    gateway.defaults = ChatDefaults(model="fake-model", coalesce_window={}, still_working_after=0)  # coalescing off
    seen = spy_turns(gateway)
    fake_llm.script(Reply.text("three photos"))
    photos = [connector.add("image", jpeg(1000 + i, seed=i), mime="image/jpeg") for i in range(3)]
    items = [
        says("what are these?" if i == 0 else "", attachments=(photos[i],), media_group_id="album-1") for i in range(3)
    ]
    for item in items:
        await gateway.handle(item)
    await routed(gateway)
    assert gateway.coalescer.held() == 1 and not fake_llm.requests
    await clock.advance(ALBUM_WINDOW)
    await gateway.settle(CHAT.key)
    (turn,) = seen
    assert turn.attachments == tuple(photos) and turn.text == "what are these?"
    assert len(turn.inbox_ids) == 3
    rows = [await gateway.store.inbox_message(i) for i in turn.inbox_ids]
    assert {r.status for r in rows} == {"answered"} and len({r.turn_id for r in rows}) == 1
    assert len(fake_llm.requests) == 1 and connector.texts() == ["three photos"]


async def test_another_persons_message_neither_joins_nor_waits(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    group = ChatRef("memory", "g1", is_private=False)
    mine = Inbound(group, "1", part("a"), message_id="901", update_id="g901", listening=True)
    theirs = Inbound(group, "2", "short question", message_id="902", update_id="g902", listening=True)
    gateway.access.policy = AccessPolicy(owners=frozenset({OWNER, "memory:2"}))
    fake_llm.script(Reply.text("to theirs"), Reply.text("to mine"))
    await gateway.handle(mine)
    await gateway.handle(theirs)
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1)
    await routed(gateway)
    assert gateway.coalescer.held(group.key) == 1
    await clock.advance(WINDOW)
    await gateway.settle(group.key)
    assert user_texts(fake_llm) == ["short question", part("a")]


# ---------------------------------------------------------------------------- edits


async def test_an_edit_while_streaming_restarts_the_turn_in_the_same_message(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    old_answer, new_answer = asyncio.Event(), asyncio.Event()
    fake_llm.script(
        Reply.text("The capital of Franse is", chunk=4, hold=old_answer, hold_at=3),
        Reply.text("The capital of France is Paris.", hold=new_answer),
    )
    question = says("capital of franse?")
    await gateway.handle(question)
    outbox = connector.outbox
    await until(lambda: outbox.visible())  # the partial answer is on screen
    (live,) = outbox.visible()
    await gateway.handle(edits(question, "capital of France?"))
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 2)
    await until(lambda: live.text == EDITED_TEXT)  # the old answer gives way in its own message
    new_answer.set()
    await gateway.settle(CHAT.key)
    old_answer.set()
    assert user_texts(fake_llm) == ["capital of franse?", "capital of France?"]
    # The model never sees the old question again: the first turn is superseded.
    assert [m["role"] for m in fake_llm.requests[-1].messages] == ["system", "user"]
    shown = outbox.visible()
    assert [m.text for m in shown] == ["The capital of France is Paris."]
    assert shown[0].id == live.id, "the new answer replaces the old one in place"
    assert await gateway.store.unfinished_messages() == []
    row = await gateway.store.inbox_message(1)
    assert row is not None and row.status == "answered" and row.inbound["text"] == "capital of France?"


async def test_an_edit_of_an_older_message_is_ignored_silently(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    fake_llm.script(Reply.text("first answer"))
    old = says("first question")
    await gateway.handle(old)
    await gateway.settle(CHAT.key)
    edit = edits(old, "first question, edited")
    await gateway.handle(edit)
    await gateway.settle(CHAT.key)
    assert connector.texts() == ["first answer"]
    assert len(fake_llm.requests) == 1
    rows = await gateway.store.unfinished_messages()
    assert rows == []
    (edit_row,) = [r for r in await _all_rows(gateway) if r.update_id == edit.update_id]
    assert edit_row.status == "ignored"


async def test_an_edit_of_a_held_or_queued_message_changes_what_is_answered(stack: Any, fake_llm: FakeLLM) -> None:
    gateway, connector, clock = stack
    gate = asyncio.Event()
    fake_llm.script(Reply.text("busy", hold=gate), Reply.text("queued answer"), Reply.text("held answer"))
    await gateway.handle(says("keep the lane busy"))
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1)
    queued = says("queued typo")
    await gateway.handle(queued)
    await gateway.handle(edits(queued, "queued, fixed"))
    gate.set()
    await gateway.settle(CHAT.key)
    held = says(part("a"))
    await gateway.handle(held)
    await routed(gateway)
    await gateway.handle(edits(held, part("b")))
    await routed(gateway)
    await clock.advance(WINDOW)
    await gateway.settle(CHAT.key)
    assert user_texts(fake_llm) == ["keep the lane busy", "queued, fixed", part("b")]


async def _all_rows(gateway: Gateway) -> list[Any]:
    rows = []
    for inbox_id in range(1, 50):
        row = await gateway.store.inbox_message(inbox_id)
        if row is not None:
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- after a restart


async def test_parts_left_inside_the_window_are_answered_once_after_a_restart(
    sqlite_url: str, fake_llm: FakeLLM
) -> None:
    store = await Store.open(sqlite_url)
    now = datetime.now(UTC)
    texts = [part("a"), part("b"), "tail"]
    for i, text in enumerate(texts):  # stored, never routed: the process died inside the window
        inbound = says(text)
        await store.accept([NewMessage("memory", inbound.update_id, CHAT.key, OWNER, inbound_json(inbound))])
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
        defaults=ChatDefaults(model="fake-model", coalesce_window={"memory": WINDOW}),
        wall=lambda: now + timedelta(seconds=5),
    )
    connector = MemoryConnector()
    gateway.attach(connector)
    fake_llm.script(Reply.text("one answer"))
    try:
        assert await gateway.load_unfinished(["memory"]) == 3
        gateway.resume_unfinished()
        await gateway.settle_all()
        assert user_texts(fake_llm) == [JOINER.join(texts)]
        assert connector.texts() == ["one answer"]
        assert await store.unfinished_messages() == []
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


async def test_an_edit_left_unsettled_by_a_crash_is_answered_once_with_the_new_text(
    sqlite_url: str, fake_llm: FakeLLM
) -> None:
    store = await Store.open(sqlite_url)
    original = says("what is 2+3?")
    edit = edits(original, "what is 2+2?")
    for inbound in (original, edit):  # both stored; the process died before routing the edit
        await store.accept([NewMessage("memory", inbound.update_id, CHAT.key, OWNER, inbound_json(inbound))])
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
        defaults=ChatDefaults(model="fake-model"),
    )
    connector = MemoryConnector()
    gateway.attach(connector)
    fake_llm.script(Reply.text("4"))
    try:
        await gateway.load_unfinished(["memory"])
        gateway.resume_unfinished()
        await gateway.settle_all()
        assert user_texts(fake_llm) == ["what is 2+2?"], "asked once, with the edited text"
        assert connector.texts() == ["4"]
        assert await store.unfinished_messages() == []
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()


async def test_a_merged_turn_cut_off_by_a_crash_is_continued_once_in_its_message(
    sqlite_url: str, fake_llm: FakeLLM
) -> None:
    store = await Store.open(sqlite_url)
    connector = MemoryConnector()
    parts = [says(part("a")), says("tail")]
    ids = []
    for inbound in parts:
        [inbox_id] = await store.accept(
            [NewMessage("memory", inbound.update_id, CHAT.key, OWNER, inbound_json(inbound))]
        )
        ids.append(inbox_id)
    question = JOINER.join(p.text for p in parts)
    session = await store.current_session(CHAT.key)
    await store.begin_turn(
        session, user_message={"role": "user", "content": question}, user_key=OWNER, update_id="u", inbox_ids=ids
    )
    partial = await connector.outbox.send(CHAT, "The first words", reply_to=parts[0].message_id)
    await store.note_reply(ids, {"pieces": [{"id": partial.message_id, "text": "The first words", "markdown": False}]})
    agent = Agent(fake_llm.config(), tools=ToolRegistry())
    gateway = Gateway(
        store=store,
        agent=agent,
        access=Access(store, AccessPolicy(owners=frozenset({OWNER}))),
        defaults=ChatDefaults(model="fake-model"),
    )
    gateway.attach(connector)
    fake_llm.script(Reply.text("The whole answer."))
    try:
        await gateway.load_unfinished(["memory"])
        gateway.resume_unfinished()
        await gateway.settle_all()
        assert user_texts(fake_llm) == [question], "one turn for the rows one turn answered"
        shown = connector.outbox.visible()
        assert [(m.id, m.text) for m in shown] == [(partial.message_id, "The whole answer.")]
        assert await store.unfinished_messages() == []
    finally:
        await gateway.shutdown(1)
        await agent.aclose()
        await store.close()
