"""Floods cost the flooder alone: per-person queues, one notice per burst, `access.user_rate`.

Gateway-level: a real Store (SQLite), the real Agent against the fake provider, the
in-memory Outbox (tests/test_gateway.py's MemoryConnector), and the real `limits` library
whose clock the test moves (`limits_clock`) instead of sleeping. Turns are held on a gate
in the fake provider, so what is queued, refused or told is exact, not a race.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent import Agent, ToolRegistry
from bots.access import Access, AccessPolicy
from bots.config import load_config
from bots.errors import ConfigError
from bots.gateway import QUEUE_FULL_TEXT, QUEUED_TEXT, RATE_LIMITED_TEXT, ChatDefaults, Gateway
from bots.inbound import Inbound
from bots.inbound_rate import InboundRate, Verdict, parse_rate
from bots.outbox import ChatRef
from bots.store import Store
from tests.fakes.llm import FakeLLM, Reply
from tests.test_gateway import MemoryConnector

OWNER = "1"
_ids = itertools.count(1)


class LimitsClock:
    """The wall clock `limits`' memory storage reads (`time.time()`), moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def limits_clock(monkeypatch: pytest.MonkeyPatch) -> LimitsClock:
    """`limits.aio.storage.memory` reads `time.time()` through its module global `time`:
    only that module's view of time changes; the library's own counting runs unchanged."""
    import limits.aio.storage.memory as memory

    clock = LimitsClock()
    monkeypatch.setattr(memory, "time", clock)
    return clock


Make = Callable[..., Awaitable[tuple[Gateway, MemoryConnector, Store]]]


@pytest.fixture
async def make(sqlite_url: str, fake_llm: FakeLLM) -> AsyncIterator[Make]:
    """`await make(queue_max=.., user_rate=..)`: a gateway where everyone may talk, "memory:1" owns."""
    built: list[tuple[Gateway, Agent, Store, InboundRate | None]] = []

    async def build(*, queue_max: int = 5, user_rate: str | None = None) -> tuple[Gateway, MemoryConnector, Store]:
        store = await Store.open(sqlite_url)
        agent = Agent(fake_llm.config(), tools=ToolRegistry())
        rate = InboundRate(user_rate) if user_rate else None
        gateway = Gateway(
            store=store,
            agent=agent,
            access=Access(store, AccessPolicy(owners=frozenset({f"memory:{OWNER}"}), allow_everyone=True)),
            defaults=ChatDefaults(model="fake-model", queue_max=queue_max),
            inbound_rate=rate,
        )
        connector = MemoryConnector()
        gateway.attach(connector)
        built.append((gateway, agent, store, rate))
        return gateway, connector, store

    try:
        yield build
    finally:
        for gateway, agent, store, rate in built:
            await gateway.shutdown(1)
            await agent.aclose()
            if rate is not None:
                await rate.aclose()
            await store.close()


def private(user: str) -> ChatRef:
    return ChatRef("memory", user, is_private=True)


GROUP = ChatRef("memory", "-100", is_private=False)


def says(chat: ChatRef, user: str, text: str, *, command: str | None = None) -> Inbound:
    n = next(_ids)
    return Inbound(
        chat, user, text, message_id=str(n), update_id=f"u{n}", command=command, mentions_bot=not chat.is_private
    )


async def routed(gateway: Gateway) -> None:
    """Wait until every stored message was routed: started, queued or refused (turns may still run)."""
    while pending := [t for t in gateway._tasks if not isinstance(t, asyncio.Task) and not t.done()]:
        await asyncio.wait(pending)


async def statuses(store: Store) -> dict[str, int]:
    """Final inbox statuses, counted; fails if any message was left unfinished."""
    assert await store.unfinished_messages() == [], "every accepted message ends with a final status"
    counts: dict[str, int] = {}
    inbox_id = 1
    while (row := await store.inbox_message(inbox_id)) is not None:
        counts[row.status] = counts.get(row.status, 0) + 1
        inbox_id += 1
    return counts


def asked(fake_llm: FakeLLM) -> list[str]:
    """The user message of each model request, in the order the turns started."""
    return [r.messages[-1]["content"] for r in fake_llm.requests]


# ---- queue limits and notices, per person ---------------------------------------------


async def test_a_private_flood_is_told_once_not_once_per_message(make: Make, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make(queue_max=2)
    chat, gate = private("50"), asyncio.Event()
    fake_llm.script(Reply.text("first answer", hold=gate))
    for i in range(30):
        await gateway.handle(says(chat, "50", f"m{i}"))
    await routed(gateway)
    # One acknowledgement, one "full" notice: not 27 of them.
    assert connector.texts() == [QUEUED_TEXT, QUEUE_FULL_TEXT]
    gate.set()
    await gateway.settle(chat.key)
    assert asked(fake_llm) == ["m0", "m1", "m2"]
    assert connector.texts()[2:] == ["first answer", "You said: m1", "You said: m2"]
    assert await statuses(store) == {"answered": 3, "failed": 27}
    assert gateway.metrics.queue_full.labels("memory")._value.get() == 27

    # The queue drained: a new burst is a new wait, acknowledged and told again, once each.
    gate = asyncio.Event()
    fake_llm.script(Reply.text("second answer", hold=gate))
    for i in range(30, 40):
        await gateway.handle(says(chat, "50", f"m{i}"))
    await routed(gateway)
    assert connector.texts()[5:] == [QUEUED_TEXT, QUEUE_FULL_TEXT]
    gate.set()
    await gateway.settle(chat.key)
    assert await statuses(store) == {"answered": 6, "failed": 34}


async def test_a_flooder_in_a_group_costs_another_member_one_turn_at_most(make: Make, fake_llm: FakeLLM) -> None:
    gateway, connector, store = await make(queue_max=5)
    gate = asyncio.Event()
    fake_llm.script(Reply.text("answer to f0", hold=gate))
    await gateway.handle(says(GROUP, "66", "f0"))
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 1)
    for i in range(1, 41):
        await gateway.handle(says(GROUP, "66", f"f{i}"))
    await gateway.handle(says(GROUP, "77", "a real question"))
    await routed(gateway)
    # Each person has their own queue, their own acknowledgement, their own notice.
    assert gateway.lanes.waiting(GROUP.key) == {"memory:77": 1, "memory:66": 5}
    assert sorted(connector.texts()) == sorted([QUEUED_TEXT, QUEUE_FULL_TEXT, QUEUED_TEXT])
    gate.set()
    await gateway.settle(GROUP.key)
    # The member's question was the very next turn, ahead of the flooder's backlog.
    assert asked(fake_llm) == ["f0", "a real question", "f1", "f2", "f3", "f4", "f5"]
    assert len(connector.texts()) == 3 + 7, "three notices and seven answers: bounded"
    assert await statuses(store) == {"answered": 7, "failed": 35}


# ---- the inbound rate limit ----------------------------------------------------------------


async def test_the_rate_limit_drops_a_flood_with_one_notice_and_lets_the_sender_back_later(
    make: Make, fake_llm: FakeLLM, limits_clock: LimitsClock
) -> None:
    gateway, connector, store = await make(queue_max=50, user_rate="3/minute")
    chat, gate = private("50"), asyncio.Event()
    fake_llm.script(Reply.text("first answer", hold=gate))
    for i in range(12):
        await gateway.handle(says(chat, "50", f"m{i}"))
    await routed(gateway)
    notice = RATE_LIMITED_TEXT.format(rate="3 per minute")
    assert connector.texts() == [QUEUED_TEXT, notice], "three let in (one ack), nine dropped with one notice"
    assert gateway.lanes.queue_depths() == {chat.key: 2}
    assert gateway.metrics.inbound_rate_limited.labels("memory")._value.get() == 9
    # Commands are not counted, and still work for someone over the limit.
    await gateway.handle(says(chat, "50", "/stop", command="stop"))
    await gateway.settle(chat.key)
    assert asked(fake_llm) == ["m0"], "/stop dropped the two waiting messages"
    assert await statuses(store) == {"stopped": 3, "failed": 9, "answered": 1}
    assert connector.texts().count(notice) == 1

    # A minute later the window has moved on: let in again; the next flood is told again, once.
    limits_clock.advance(61)
    for i in range(12, 18):
        await gateway.handle(says(chat, "50", f"m{i}"))
        await routed(gateway)
        await gateway.settle(chat.key)
    assert asked(fake_llm) == ["m0", "m12", "m13", "m14"]
    assert connector.texts().count(notice) == 2
    assert gateway.metrics.inbound_rate_limited.labels("memory")._value.get() == 12


async def test_owners_are_exempt_and_each_person_has_their_own_allowance(
    make: Make, fake_llm: FakeLLM, limits_clock: LimitsClock
) -> None:
    gateway, connector, store = await make(queue_max=50, user_rate="2/minute")
    for i in range(5):
        await gateway.handle(says(private(OWNER), OWNER, f"owner {i}"))
        await gateway.handle(says(GROUP, "66", f"flood {i}"))
    await gateway.handle(says(GROUP, "77", "member question"))
    await routed(gateway)
    await gateway.settle_all()
    owner_answers = [t for t in connector.texts() if t.startswith("You said: owner")]
    assert len(owner_answers) == 5, "owners are never rate-limited"
    group_turns = [a for a in asked(fake_llm) if not a.startswith("owner")]
    assert sorted(group_turns) == ["flood 0", "flood 1", "member question"]
    assert gateway.metrics.inbound_rate_limited.labels("memory")._value.get() == 3
    assert await statuses(store) == {"answered": 8, "failed": 3}


async def test_a_message_recovered_after_a_restart_is_not_counted_again(
    make: Make, fake_llm: FakeLLM, limits_clock: LimitsClock
) -> None:
    from bots.inbound import to_json
    from bots.store import NewMessage

    gateway, connector, store = await make(user_rate="1/minute")
    chat = private("50")
    left = [says(chat, "50", f"left {i}") for i in range(3)]  # accepted by an earlier process, never answered
    await store.accept([NewMessage("memory", m.update_id, chat.key, m.user_key, to_json(m)) for m in left])
    assert await gateway.load_unfinished(["memory"]) == 3
    gateway.resume_unfinished()
    await routed(gateway)
    await gateway.settle(chat.key)
    assert asked(fake_llm) == ["left 0", "left 1", "left 2"]
    assert await statuses(store) == {"answered": 3}


# ---- the limiter and its configuration -----------------------------------------------------


async def test_inbound_rate_counts_a_moving_window_per_sender(limits_clock: LimitsClock) -> None:
    rate = InboundRate("3 per 10 seconds")
    try:
        verdicts = [await rate.hit("telegram:5") for _ in range(6)]
        assert verdicts == [Verdict.ALLOWED] * 3 + [Verdict.LIMITED] + [Verdict.LIMITED_QUIETLY] * 2
        assert await rate.hit("telegram:6") is Verdict.ALLOWED, "another sender has their own window"
        limits_clock.advance(5)
        assert await rate.hit("telegram:5") is Verdict.LIMITED_QUIETLY, "one notice per window"
        limits_clock.advance(5.1)
        assert [await rate.hit("telegram:5") for _ in range(4)] == [Verdict.ALLOWED] * 3 + [Verdict.LIMITED]
    finally:
        await rate.aclose()


@pytest.mark.parametrize(
    "value,expected",
    [("20/minute", "20 per minute"), ("20 per minute", "20 per minute"), ("5 per 10 seconds", "5 per 10 seconds"),
     ("100/hour", "100 per hour")],
)
def test_user_rate_notation(value: str, expected: str) -> None:
    assert InboundRate(value).description == expected


def test_user_rate_off_and_default(tmp_path: Any) -> None:
    path = tmp_path / "parley.yaml"
    path.write_text("provider: {base_url: 'http://127.0.0.1:9/v1'}\naccess: {user_rate: off}\n")
    assert load_config(path, env={}, env_file=None).access.user_rate is None
    path.write_text("provider: {base_url: 'http://127.0.0.1:9/v1'}\n")
    assert load_config(path, env={}, env_file=None).access.user_rate == "20/minute"
    assert load_config(path, env={"PARLEY_ACCESS__USER_RATE": "off"}, env_file=None).access.user_rate is None
    assert parse_rate("off") is None and parse_rate(None) is None


@pytest.mark.parametrize(
    "value,words",
    [("twenty a minute", "must be a rate like '20/minute'"), ("0/minute", "at least 1 message"),
     ("20/fortnight", "must be a rate like"), ("1/second;20/minute", "one rate"), ("20", "must be a rate like")],
)
def test_an_invalid_user_rate_is_a_config_error_naming_the_key(tmp_path: Any, value: str, words: str) -> None:
    path = tmp_path / "parley.yaml"
    path.write_text(f"provider: {{base_url: 'http://127.0.0.1:9/v1'}}\naccess: {{user_rate: '{value}'}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, env_file=None)
    assert "access.user_rate" in str(caught.value) and words in str(caught.value)
