"""Budget holds in the store: reserve before the model is called, settle after (issue 12.3).

Every case runs on SQLite and on PostgreSQL (tests/store_fixtures.py). Without holds, five
turns started at once all saw a budget of 30 unspent and used 125 tokens; with them, a turn
starts only while used + held < budget, so the overspend is at most one turn's hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from bots.store import BudgetHold, BudgetRefused, NewMessage, Store, Usage, budget_holds, create_engine

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TODAY = T0.replace(hour=0)
USER = "telegram:42"
TTL = timedelta(minutes=10)


class FakeWallClock:
    """The store's clock, moved by hand so expiry is tested exactly."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
async def db(store_url: str, clock: FakeWallClock) -> AsyncIterator[Store]:
    opened = await Store.open(store_url, utcnow=clock)
    try:
        yield opened
    finally:
        await opened.close()


def hold(tokens: int, ttl: timedelta = TTL) -> BudgetHold:
    return BudgetHold(tokens=tokens, since=TODAY, ttl=ttl)


async def start(store: Store, tokens: int, *, user: str = USER, supersede: list[int] | None = None) -> int:
    """Begin a turn holding `tokens` (raises `BudgetRefused` when there is no room)."""
    session = await store.current_session(f"telegram:{user}")
    return await store.begin_turn(
        session,
        user_message={"role": "user", "content": "hi"},
        user_key=user,
        update_id=None,
        supersede=supersede or [],
        hold=hold(tokens),
    )


def used(tokens: int, user: str = USER) -> Usage:
    return Usage(user, "telegram:5", "m", tokens - tokens // 2, tokens // 2, 0, None)


async def hold_rows(store_url: str) -> int:
    engine = create_engine(store_url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(budget_holds)))
    finally:
        await engine.dispose()


async def test_a_hold_is_settled_by_the_real_usage_in_the_same_transaction(db: Store) -> None:
    await db.set_budget(USER, 1000)
    turn = await start(db, 300)
    assert await db.tokens_held(USER) == 300
    await db.finish_turn(turn, [{"role": "assistant", "content": "ok"}], status="ok", usage=used(40))
    assert (await db.tokens_held(USER), await db.tokens_used(USER, TODAY)) == (0, 40)


async def test_a_user_without_a_budget_is_never_refused_and_holds_nothing(db: Store, store_url: str) -> None:
    for _ in range(3):
        await start(db, 10_000)
    assert await db.tokens_held(USER) == 0
    assert await hold_rows(store_url) == 0


async def test_a_turn_starts_only_while_used_plus_held_is_below_the_budget(db: Store) -> None:
    await db.set_budget(USER, 100)
    first = await start(db, 80)  # 0 used + 0 held < 100
    await start(db, 80)  # 0 + 80 < 100: at most one hold beyond the budget
    with pytest.raises(BudgetRefused) as held_up:
        await start(db, 80)  # 0 + 160 >= 100
    assert (held_up.value.budget, held_up.value.used, held_up.value.held, held_up.value.spent) == (100, 0, 160, False)
    await db.finish_turn(first, [], status="ok", usage=used(120))
    with pytest.raises(BudgetRefused) as spent:
        await start(db, 1)
    assert (spent.value.used, spent.value.held, spent.value.spent) == (120, 80, True)
    # Another user's budget is theirs alone.
    await start(db, 80, user="telegram:7")


async def test_a_refused_turn_writes_nothing(db: Store) -> None:
    await db.set_budget(USER, 10)
    [inbox_id] = await db.accept([NewMessage("telegram", "1", "telegram:5", USER, {"text": "hi"})])
    session = await db.current_session("telegram:5")
    await start(db, 50)
    with pytest.raises(BudgetRefused):
        await db.begin_turn(
            session, user_message={"role": "user", "content": "hi"}, user_key=USER, update_id="1",
            inbox_ids=[inbox_id], hold=hold(5),
        )
    [row] = await db.unfinished_messages()
    assert (row.status, row.attempts, row.turn_id) == ("pending", 0, None)
    assert await db.history(session) == []


async def test_usage_before_the_budget_day_does_not_count(db: Store, clock: FakeWallClock) -> None:
    await db.set_budget(USER, 100)
    clock.now = T0 - timedelta(days=1)
    await db.add_usage(user_key=USER, chat_key="telegram:5", model="m", prompt_tokens=500, completion_tokens=0,
                       reasoning_tokens=0, cost=None)
    clock.now = T0
    await start(db, 50)


@pytest.mark.parametrize("ending", ["ok", "error", "interrupted", "superseded", "restart"])
async def test_every_end_of_a_turn_releases_its_hold(db: Store, store_url: str, ending: str) -> None:
    await db.set_budget(USER, 100)
    turn = await start(db, 500)
    with pytest.raises(BudgetRefused):
        await start(db, 1)
    if ending == "superseded":  # a second attempt at the same message, after a crash
        await db.mark_stale_turns()
        await start(db, 1, supersede=[turn])
        assert await db.tokens_held(USER) == 1
        return
    if ending == "restart":
        assert await db.mark_stale_turns() == 1
    else:
        await db.finish_turn(turn, [], status=ending)
    assert await db.tokens_held(USER) == 0
    assert await hold_rows(store_url) == 0
    await start(db, 1)


async def test_the_hold_of_a_process_that_died_expires(db: Store, store_url: str, clock: FakeWallClock) -> None:
    await db.set_budget(USER, 100)
    await start(db, 500)  # its process dies: nobody finishes this turn
    clock.now += TTL - timedelta(seconds=1)
    with pytest.raises(BudgetRefused):
        await start(db, 10)
    clock.now += timedelta(seconds=1)
    assert await db.tokens_held(USER) == 0
    await start(db, 10)
    assert await hold_rows(store_url) == 1, "the expired hold was cleared on the next admission"
    assert await db.tokens_held(USER) == 10


async def test_concurrent_admissions_admit_exactly_as_many_as_fit(db: Store) -> None:
    await db.set_budget(USER, 1000)
    results = await asyncio.gather(*(start(db, 300) for _ in range(8)), return_exceptions=True)
    admitted = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, BudgetRefused)]
    assert (len(admitted), len(refused)) == (4, 4), results  # held 0, 300, 600, 900 < 1000
    assert all(not r.spent for r in refused)
    assert await db.tokens_held(USER) == 1200


@pytest.mark.postgres
async def test_admissions_from_two_processes_on_one_postgresql_take_turns(postgres_url: str) -> None:
    # Two stores, two engines, two connection pools: what two replicas would be.
    a, b = await Store.open(postgres_url), await Store.open(postgres_url)
    try:
        await a.set_budget(USER, 1000)
        for _ in range(3):  # several rounds: a race lost once would show
            results = await asyncio.gather(*(start(s, 300) for s in (a, b) * 5), return_exceptions=True)
            admitted = [r for r in results if isinstance(r, int)]
            assert len(admitted) == 4, results
            assert all(isinstance(r, (int, BudgetRefused)) for r in results), results
            assert await b.tokens_held(USER) == 1200
            for turn in admitted:
                await (a if turn % 2 else b).finish_turn(turn, [], status="error")
            assert await a.tokens_held(USER) == 0
    finally:
        await a.close()
        await b.close()

