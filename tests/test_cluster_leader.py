"""Leadership: one replica per duty, elected through a PostgreSQL advisory lock (issue 17, point 5).

Real PostgreSQL (the `postgres_url` fixture: a fresh schema per test). Connection loss is
real too: the leader's backend is terminated from an admin connection, or the network
to PostgreSQL goes silent through a relay that stops forwarding (`BlackholeRelay`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from bots.cluster.leader import Leadership, leader_of
from bots.cluster.pg import pg_target
from tests.support.blackhole import BlackholeRelay

pytestmark = pytest.mark.postgres

FAST = {"retry_every": 0.3, "check_every": 0.3, "check_timeout": 0.5, "server_timeout": 2.0}


class Replica:
    """A Leadership plus a log of its terms: (elected at, deposed at or None)."""

    def __init__(self, url: str, name: str, duty: str = "test-duty", **timing: float) -> None:
        self.name = name
        self.terms: list[list[float | None]] = []
        self.changed = asyncio.Event()
        self.leadership = Leadership(url, duty, name, on_elected=self._elected, on_deposed=self._deposed,
                                     **{**FAST, **timing})  # fmt: skip

    async def _elected(self) -> None:
        self.terms.append([time.monotonic(), None])
        self.changed.set()

    async def _deposed(self) -> None:
        self.terms[-1][1] = time.monotonic()
        self.changed.set()

    @property
    def leads(self) -> bool:
        return bool(self.terms) and self.terms[-1][1] is None


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[Callable[..., Replica]]:
    """`replicas(name, url=...)`: a started Replica, closed after the test."""
    made: list[Replica] = []

    tag = uuid.uuid4().hex[:8]  # replica ids unique to this test: the database is shared

    def make(name: str, url: str | None = None, **timing: float) -> Replica:
        replica = Replica(url or postgres_url, f"{name}.{tag}", **timing)
        replica.leadership.start()
        made.append(replica)
        return replica

    try:
        yield make
    finally:
        for replica in made:
            await replica.leadership.aclose()


async def until(predicate: Callable[[], Any], replicas: list[Replica], timeout: float) -> Any:
    """Wait for `predicate` to hold, woken by any change of leadership; fail after `timeout` s."""
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            waits = [asyncio.ensure_future(r.changed.wait()) for r in replicas]
            for r in replicas:
                r.changed.clear()
            if (value := predicate()):
                for w in waits:
                    w.cancel()
                return value
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
    return value


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.leads]


def overlaps(replicas: list[Replica]) -> float:
    """The longest time two replicas both ran the duty (0: never)."""
    terms = [(r.name, t[0], t[1] if t[1] is not None else time.monotonic()) for r in replicas for t in r.terms]
    worst = 0.0
    for i, (a, s1, e1) in enumerate(terms):
        for b, s2, e2 in terms[i + 1:]:
            if a != b:
                worst = max(worst, min(e1, e2) - max(s1, s2))
    return worst


async def admin_kill(postgres_url: str, replica_id: str) -> int:
    """pg_terminate_backend every connection of `replica_id` (a real connection loss)."""
    dsn = make_url(postgres_url).set(query={}).render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", f"parley:{replica_id}"
        )
    finally:
        await admin.close()
    return len(rows)


async def test_exactly_one_of_three_leads_and_everyone_can_say_who(postgres_url: str, replicas) -> None:  # noqa: ANN001
    group = [replicas(f"r{i}") for i in range(3)]
    (leader,) = await until(lambda: leaders(group), group, timeout=5)
    assert leader.leadership.is_leader
    assert [r.leadership.is_leader for r in group].count(True) == 1
    for r in group:
        assert await r.leadership.leader() == leader.name
    assert await leader_of(postgres_url, "test-duty") == leader.name
    assert await leader_of(postgres_url, "another-duty") is None


async def test_a_leader_that_closes_hands_over_at_once(postgres_url: str, replicas) -> None:  # noqa: ANN001
    group = [replicas(f"r{i}") for i in range(2)]
    (first,) = await until(lambda: leaders(group), group, timeout=5)
    await first.leadership.aclose()
    assert not first.leads and not first.leadership.is_leader
    (second,) = await until(lambda: leaders(group), group, timeout=5)
    assert second is not first
    assert overlaps(group) == 0.0


async def test_terminated_backend_steps_down_at_once_and_another_takes_over(
    postgres_url: str, replicas  # noqa: ANN001
) -> None:
    # Production timing: another replica must lead within 10 s of the leader's connection ending.
    group = [replicas(f"r{i}", retry_every=2.0, check_every=2.0, check_timeout=1.5, server_timeout=6.0)
             for i in range(3)]  # fmt: skip
    (first,) = await until(lambda: leaders(group), group, timeout=10)
    killed_at = time.monotonic()
    assert await admin_kill(postgres_url, first.name) == 1
    await until(lambda: not first.leads, group, timeout=1)  # the termination listener, not the next check
    assert first.terms[-1][1] - killed_at < 1.0  # type: ignore[operator]
    (second,) = await until(lambda: leaders(group), group, timeout=10)
    assert second.terms[-1][0] - killed_at < 10.0  # type: ignore[operator]
    # The server frees the lock as it ends the session, and the old holder hears of it a
    # moment later (its socket's EOF): a competitor that tried in that moment overlaps it
    # by milliseconds, never by a check interval.
    assert overlaps(group) < 0.5
    # The old leader competes again (with a new connection) and can be seen doing so.
    dsn = make_url(postgres_url).set(query={}).render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(10):
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", f"parley:{first.name}"
            ):
                await asyncio.sleep(0.1)
    finally:
        await admin.close()
    assert await leader_of(postgres_url, "test-duty") == second.name


async def test_silent_network_makes_the_leader_step_down_before_the_server_frees_the_lock(
    postgres_url: str, replicas  # noqa: ANN001
) -> None:
    target = pg_target(postgres_url)
    relay = BlackholeRelay(target.params["host"], target.params.get("port", 5432))
    await relay.start()
    try:
        via_relay = make_url(postgres_url).set(port=relay.port).render_as_string(hide_password=False)
        cut_off = replicas("cut-off", url=via_relay)
        (first,) = await until(lambda: leaders([cut_off]), [cut_off], timeout=5)
        other = replicas("other")
        group = [cut_off, other]
        assert leaders(group) == [cut_off]
        frozen_at = time.monotonic()
        relay.freeze()
        (second,) = await until(lambda: leaders(group) == [other] and leaders(group), group, timeout=10)
        assert second is other
        stepped_down = cut_off.terms[-1][1]
        assert stepped_down is not None
        # The holder noticed on its own (a check timed out), before the server let the other one in.
        assert stepped_down - frozen_at < FAST["check_every"] + FAST["check_timeout"] + 0.5
        assert overlaps(group) == 0.0
        assert other.terms[0][0] - frozen_at < 10.0  # type: ignore[operator]
    finally:
        await relay.stop()


def test_server_timeout_must_outlast_the_holders_own_check() -> None:
    with pytest.raises(ValueError, match="server_timeout"):
        Leadership("postgresql://u@127.0.0.1/db", "d", "r", on_elected=_noop, on_deposed=_noop,
                   check_every=2, check_timeout=2, server_timeout=3)  # fmt: skip


async def _noop() -> None:
    return None


def test_the_store_url_gives_the_connection_and_schema_scoped_lock_names() -> None:
    target = pg_target("postgresql://bot:pw@db.internal:5433/parley?schema=tenant_a&sslmode=require&timeout=3")
    assert target.params == {"host": "db.internal", "port": 5433, "user": "bot", "password": "pw",
                             "database": "parley", "ssl": "require"}  # fmt: skip
    assert target.schema == "tenant_a" and target.connect_timeout == 3.0
    assert target.lock_name("leader", "telegram-polling") == "parley.leader:tenant_a:telegram-polling"
    assert pg_target("postgresql://bot@db/parley").lock_name("once", "x") == "parley.once::x"
