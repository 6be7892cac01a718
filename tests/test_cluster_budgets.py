"""Shared outbound budgets (bots/cluster/budgets.py) against a real Redis.

A "replica" here is what one `parley run` process has: its own `SharedBudgets` (its own
Redis connections) and its own `Pacing`; replicas share only the Redis key prefix. Each
test records the wall-clock moment every call was let out (the clock the shared windows
stamp with) and counts calls per window: never elapsed times. Calls are recorded just
after Redis admitted them, so windows are checked `MARGIN` short of their length, the
most the event loop may delay a record here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from bots.cluster.budgets import SharedBudgets, moving_window
from bots.outbox import ChatRef
from bots.pacing import Budget, Pacing, PacingPolicy, Priority
from tests.support.crash import TcpProxy

MARGIN = 0.05
LOGGER = "bots.cluster.budgets"

Replica = Callable[..., SharedBudgets]


def policy(*, bot: Budget = Budget(100.0, 100), chat: Budget = Budget(100.0, 100)) -> PacingPolicy:
    """Budgets for the tests; `in_flight` out of the way so only the budgets decide."""
    return PacingPolicy(private=chat, group=chat, platform=bot, in_flight=1000, final_reserve=0)


def chat(n: int | str, *, private: bool = True) -> ChatRef:
    return ChatRef("telegram", str(n), is_private=private)


def most_in_window(stamps: list[float], length: float) -> int:
    """The most calls recorded within any `length` seconds."""
    ordered = sorted(stamps)
    most, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - length:
            start += 1
        most = max(most, end - start + 1)
    return most


async def send(pacing: Pacing, to: ChatRef, stamps: list[float], priority: Priority = Priority.FINAL) -> None:
    async with pacing.for_chat(to).sending(priority):
        stamps.append(time.time())


@pytest.fixture
async def replica(redis_url: str, redis_prefix: str) -> AsyncIterator[Replica]:
    """`replica(url=..., live=N, probe_every=...)`: a SharedBudgets on the test's prefix; closed after."""
    made: list[SharedBudgets] = []

    def make(*, url: str | None = None, live: int = 3, probe_every: float = 0.05, **kwargs: Any) -> SharedBudgets:
        budgets = SharedBudgets(url or redis_url, redis_prefix, lambda: live, probe_every=probe_every, **kwargs)
        made.append(budgets)
        return budgets

    try:
        yield make
    finally:
        for budgets in made:
            await budgets.aclose()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for observable state (checked every few ms), failing after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------ conversion


def test_a_budget_becomes_a_moving_window_no_looser_than_the_bucket() -> None:
    assert str(moving_window(Budget(25.0, 25))) == "25 per 1 second"  # Telegram, the bot
    assert str(moving_window(Budget(1.0, 2))) == "2 per 2 second"  # Telegram, a private chat
    assert str(moving_window(Budget(0.3, 2))) == "2 per 7 second"  # Telegram, a group: 17/min, not 20
    assert str(moving_window(Budget(40.0, 40))) == "40 per 1 second"  # Discord, the bot
    # 1/N shares: N replicas on their shares stay within the whole budget together.
    assert str(moving_window(Budget(25.0, 25), share=3)) == "8 per 1 second"
    assert str(moving_window(Budget(1.0, 2), share=3)) == "1 per 3 second"
    assert str(moving_window(Budget(0.3, 2), share=2)) == "1 per 7 second"


# ------------------------------------------------------------------------------ sharing


@pytest.mark.redis
async def test_three_replicas_together_never_exceed_the_bot_budget(replica: Replica) -> None:
    bot = Budget(20.0, 20)  # 20 in any second; each replica alone would let 20 go at once
    replicas = [replica() for _ in range(3)]
    pacings = [Pacing(policy(bot=bot), shared=budgets) for budgets in replicas]
    stamps: list[float] = []
    await asyncio.gather(
        *(send(pacing, chat(f"{r}-{i}"), stamps) for r, pacing in enumerate(pacings) for i in range(20))
    )
    assert len(stamps) == 60, "every call went out"
    assert most_in_window(stamps, 1.0 - MARGIN) <= 20
    assert sum(b.waits for b in replicas) >= 40, "two thirds of the demand had to wait for the shared budget"
    assert all(b.status() is None for b in replicas)


@pytest.mark.redis
async def test_two_replicas_together_never_exceed_a_chats_budget(replica: Replica) -> None:
    per_chat = Budget(10.0, 10)
    replicas = [replica(), replica()]
    pacings = [Pacing(policy(chat=per_chat), shared=budgets) for budgets in replicas]
    group, stamps, others = chat(-100, private=False), [], []
    await asyncio.gather(
        *(send(pacing, group, stamps) for pacing in pacings for _ in range(10)),
        *(send(pacings[0], chat(f"other-{i}"), others) for i in range(10)),
    )
    assert len(stamps) == 20 and most_in_window(stamps, 1.0 - MARGIN) <= 10
    assert len(others) == 10 and max(others) < sorted(stamps)[10], "other chats did not wait for the busy one"


@pytest.mark.redis
async def test_waiting_calls_of_a_replica_go_in_priority_order(replica: Replica) -> None:
    tight = policy(bot=Budget(3.0, 3))
    filler, budgets = replica(), replica()
    filler.register("telegram", tight)
    budgets.register("telegram", tight)
    for i in range(3):  # another replica spent this second's budget
        await filler.admit("telegram", f"f{i}", private=True)
    order: list[str] = []

    async def admit(name: str, priority: Priority) -> None:
        await budgets.admit("telegram", name, private=True, priority=priority)
        order.append(name)

    first = asyncio.create_task(admit("interim-1", Priority.INTERIM))  # waits, in turn
    await until(lambda: not budgets._platforms["telegram"].turnstile.idle)
    rest = [asyncio.create_task(admit("interim-2", Priority.INTERIM))]
    await asyncio.sleep(0)
    rest.append(asyncio.create_task(admit("final", Priority.FINAL)))
    await asyncio.gather(first, *rest)
    assert order == ["interim-1", "final", "interim-2"]
    assert budgets.waits == 3


@pytest.mark.redis
async def test_typing_is_skipped_when_the_shared_budget_is_spent(replica: Replica) -> None:
    tight = policy(bot=Budget(2.0, 2))
    other, budgets = replica(), replica()
    other.register("telegram", tight)
    pacing = Pacing(tight, shared=budgets)
    async with pacing.for_chat(chat(1)).try_sending() as allowed:
        assert allowed
    await other.admit("telegram", "2", private=True)  # the second token of this second, elsewhere
    async with pacing.for_chat(chat(3)).try_sending() as allowed:
        assert not allowed, "the bot's shared budget is spent: typing is skipped, not waited for"
    assert budgets.waits == 0


# ------------------------------------------------------------------------------ freezes


@pytest.mark.redis
async def test_a_429_on_one_replica_freezes_the_chat_on_the_others(replica: Replica) -> None:
    a, b = replica(), replica()
    pacing_a, pacing_b = Pacing(policy(), shared=a), Pacing(policy(), shared=b)
    frozen, free = chat(7), chat(8)
    ends = time.time() + 0.3
    pacing_a.for_chat(frozen).pause(0.3)  # the platform answered 429, retry_after 0.3
    await a.flush()
    to_frozen: list[float] = []
    to_free: list[float] = []
    await asyncio.gather(send(pacing_b, frozen, to_frozen), send(pacing_b, free, to_free))
    assert to_frozen[0] >= ends, "replica b held the frozen chat until the freeze ended"
    assert to_free[0] < ends, "other chats were not frozen"
    assert b.waits == 1


@pytest.mark.redis
async def test_a_global_429_freezes_the_bot_on_every_replica(replica: Replica) -> None:
    a, b = replica(), replica()
    pacing_a, pacing_b = Pacing(policy(), shared=a), Pacing(policy(), shared=b)
    ends = time.time() + 0.3
    pacing_a.for_chat(chat(1)).pause(0.3, scope="global")
    pacing_a.for_chat(chat(2)).pause(0.1)  # a shorter freeze after it does not cut it short
    await a.flush()
    stamps: list[float] = []
    await asyncio.gather(*(send(pacing_b, chat(n), stamps) for n in range(3, 8)))
    assert len(stamps) == 5 and min(stamps) >= ends


# ------------------------------------------------------------------------------ Redis down


@pytest.mark.redis
async def test_unreachable_redis_means_local_budgets_of_one_nth(replica: Replica, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    budgets = replica(url="redis://:hunter2@127.0.0.1:1/0", live=2)  # nothing listens on port 1
    pacing = Pacing(policy(bot=Budget(10.0, 10)), shared=budgets)
    stamps: list[float] = []
    await asyncio.gather(*(send(pacing, chat(n), stamps) for n in range(10)))
    assert len(stamps) == 10, "every send went out"
    assert most_in_window(stamps, 1.0 - MARGIN) <= 5, "half the bot budget: 2 live replicas"
    assert budgets.status() == "Redis unreachable (ConnectionError); local budgets of 1/2 each"
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "1/2" in warnings[0].getMessage() and "127.0.0.1:1" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text


@pytest.mark.redis
async def test_redis_back_means_shared_budgets_again(
    replica: Replica, redis_url: str, redis_prefix: str, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    target = urlsplit(redis_url)
    proxy = await TcpProxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    try:
        userinfo = target.netloc.rpartition("@")[0]
        via_proxy = target._replace(netloc=f"{userinfo}{'@' if userinfo else ''}127.0.0.1:{proxy.port}").geturl()
        budgets = replica(url=via_proxy, live=2, probe_every=0.05)
        pacing = Pacing(policy(), shared=budgets)
        stamps: list[float] = []
        await send(pacing, chat("before"), stamps)
        assert budgets.status() is None

        await proxy.refuse()
        await send(pacing, chat("during"), stamps)
        status = budgets.status() or ""
        assert status.startswith("Redis unreachable (Connection") and status.endswith("; local budgets of 1/2 each")
        assert await redis_client.exists([f"{redis_prefix}budget/telegram/chat/during/100/1/second"]) == 0
        await send(pacing, chat("during-2"), stamps)

        await proxy.restore()
        await until(lambda: budgets.status() is None)
        await send(pacing, chat("after"), stamps)
        assert await redis_client.exists([f"{redis_prefix}budget/telegram/chat/after/100/1/second"]) == 1
    finally:
        await proxy.aclose()
    assert len(stamps) == 4
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO], records
    assert "reachable again" in records[1][1]


# ------------------------------------------------------------------------------ end to end


async def _push(connectors: list[Any], fake: Any, per_connector: int) -> list[BaseException]:
    """Each connector sends one message to `per_connector` private chats of its own, all at
    once, through its Pacing and its Telegram outbox; returns the errors."""
    from bots.errors import OutboxError

    errors: list[BaseException] = []

    async def one(connector: Any, user_id: int) -> None:
        fake.private_chat(fake.user(user_id, f"U{user_id}"))
        to = ChatRef("telegram", str(user_id))
        try:
            async with connector.pacing.for_chat(to).sending(Priority.FINAL):
                await connector.outbox.send(to, f"hello {user_id}")
        except OutboxError as exc:
            errors.append(exc)

    await asyncio.gather(
        *(one(c, 10_000 * (k + 1) + i) for k, c in enumerate(connectors) for i in range(per_connector))
    )
    return errors


@pytest.fixture
async def telegram_connectors() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    from bots.telegram import TelegramConnector

    made: list[Any] = []

    async def make(fake: Any, **kwargs: Any) -> Any:
        connector = TelegramConnector(fake.token, api_base=fake.url, **kwargs)
        made.append(connector)
        return connector

    try:
        yield make
    finally:
        for connector in made:
            await connector.stop()


@pytest.mark.redis
async def test_two_telegram_connectors_with_one_shared_budget_get_no_429(
    make_fake_telegram: Any, telegram_connectors: Any, replica: Replica
) -> None:
    """parley's Telegram budget (25/s) on two replicas is 50/s of demand against Telegram's
    ~30/s: shared through Redis the fake (enforcing 30/s, answering 429) sees no flood."""
    fake = await make_fake_telegram()
    connectors = [await telegram_connectors(fake, shared_budgets=replica(live=2)) for _ in range(2)]
    errors = await _push(connectors, fake, per_connector=40)
    assert errors == []
    assert fake.count_429() == 0
    assert len(fake.calls_to("sendMessage")) == 80


async def test_two_telegram_connectors_without_shared_budgets_trip_flood_control(
    make_fake_telegram: Any, telegram_connectors: Any
) -> None:
    """The control for the test above: the same demand, budgets per process only."""
    fake = await make_fake_telegram()
    connectors = [await telegram_connectors(fake) for _ in range(2)]
    errors = await _push(connectors, fake, per_connector=25)
    assert fake.count_429() > 0 and len(errors) == fake.count_429()
